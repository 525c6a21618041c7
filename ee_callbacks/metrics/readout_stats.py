"""Per-layer means of a readout's per-token statistics (logit lens, tuned lens and exit heads alike), and the
calibration sums of a confidence classifier."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ee_callbacks.metrics.accumulator import Accumulator, mean_stderr

__all__ = ["ReadoutStats", "ConfidenceStats", "finite_or_none"]


def finite_or_none(value) -> Optional[float]:
    """A float, or None for a missing or non-finite value (recorded as null)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class ReadoutStats(Accumulator):
    """``mean_t stat_t`` per layer and statistic: states ``sums`` (layers × keys) and ``count`` (layers); with
    ``squares`` also ``sq_sums`` (layers × squares) of those statistics, for their standard errors."""

    def __init__(self, layers, keys, squares=()):
        super().__init__()
        self.layers = [int(layer) for layer in layers]
        self.keys = tuple(keys)
        self.squares = tuple(squares)
        self.row = {layer: row for row, layer in enumerate(self.layers)}
        self.add_state("sums", torch.zeros(len(self.layers), len(self.keys)))
        self.add_state("count", torch.zeros(len(self.layers)))
        if self.squares:
            self.add_state("sq_sums", torch.zeros(len(self.layers), len(self.squares)))

    def update(self, layer: int, token_stats: dict) -> None:
        """Add one chunk of per-token statistics ``{key: (n,)}`` of ``layer``."""
        row = self.row[layer]
        sums = torch.stack([token_stats[key].sum(dtype=torch.float64) for key in self.keys]).cpu()
        self.sums[row] += sums
        self.count[row] += token_stats[self.keys[0]].shape[0]
        if self.squares:
            self.sq_sums[row] += torch.stack([token_stats[key].double().square().sum() for key in self.squares]).cpu()

    def compute(self) -> dict:
        """``{layer: {key: mean or None}}`` (None everywhere for a layer without tokens)."""
        out = {}
        for layer, row in self.row.items():
            n = float(self.count[row])
            out[layer] = {key: finite_or_none(self.sums[row, col] / n) if n > 0 else None
                          for col, key in enumerate(self.keys)}
        return out

    def stderr(self) -> dict:
        """``{layer: {key: standard error of the mean}}`` for the ``squares`` statistics."""
        return {layer: {key: mean_stderr(self.sums[row, self.keys.index(key)], self.sq_sums[row, col], self.count[row])
                        for col, key in enumerate(self.squares)}
                for layer, row in self.row.items() if float(self.count[row]) > 0}


class ConfidenceStats(Accumulator):
    """A confidence classifier per layer: mean confidence, mean confidence on tokens whose logit-lens top-1 is the
    final one, and the share of such tokens."""

    def __init__(self, layers):
        super().__init__()
        self.layers = [int(layer) for layer in layers]
        self.row = {layer: row for row, layer in enumerate(self.layers)}
        for name in ("conf_sum", "agree_conf_sum", "agree_count", "count"):
            self.add_state(name, torch.zeros(len(self.layers)))

    def update(self, layer: int, confidence: Tensor, lens_agree: Tensor) -> None:
        row = self.row[layer]
        confidence, agree = confidence.double().cpu(), lens_agree.double().cpu()
        self.conf_sum[row] += confidence.sum()
        self.agree_conf_sum[row] += (confidence * agree).sum()
        self.agree_count[row] += agree.sum()
        self.count[row] += confidence.numel()

    def compute(self) -> dict:
        out = {}
        for layer, row in self.row.items():
            n, n_agree = float(self.count[row]), float(self.agree_count[row])
            if n > 0:
                out[layer] = {
                    "mean_conf": finite_or_none(self.conf_sum[row] / n),
                    "mean_conf_when_agree": finite_or_none(self.agree_conf_sum[row] / n_agree) if n_agree > 0 else None,
                    "lens_agree": finite_or_none(n_agree / n),
                }
        return out
