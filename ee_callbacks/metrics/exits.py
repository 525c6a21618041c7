"""Simulated early-exit rules on the probe set (DESIGN §3 "Exit rules").

A rule assigns each token an exit layer (a block index from ``layers``; the final layer ``L = layers[-1]`` when the
rule never fires). For each rule and threshold we keep *sums* over tokens (exit layers, consistent predictions,
correct predictions, token count) so that token chunks and distributed ranks can be combined by plain addition
(``merge_sums`` / an all-reduce), and only ``finalize_curve`` turns them into ratios:

- ``skip        = 1 − Σ_t exit_t / (count · L)``
- ``consistency = Σ_t 1[top1_{exit_t,t} = top1_{L,t}] / count``
- ``acc         = Σ_t 1[top1_{exit_t,t} = y_t] / count``

Sums are float64 tensors (exact for integer counts below 2**53), one entry per threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ee_callbacks.metrics.accumulator import Accumulator, mean_stderr
from ee_callbacks.metrics.saturation import check_layers, first_true_index

__all__ = [
    "threshold_exit_layers",
    "patience_counters",
    "patience_exit_layers",
    "exit_index",
    "exit_outcome_sums",
    "merge_sums",
    "finalize_curve",
    "best_skip_at_consistency",
    "static_exit",
    "ExitRuleStats",
]

# Booleans materialised per chunk by threshold_exit_layers when no chunk size is given (M·K·chunk ≤ this).
_DEFAULT_CHUNK_ELEMENTS = 1 << 24


def threshold_exit_layers(
    score: Tensor,
    thresholds: Tensor,
    layers: Tensor,
    *,
    higher_is_confident: bool = True,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Exit layer of every token for every threshold of a confidence rule.

    ``exit_{m,t} = layers[min{k : s_{k,t} ≥ λ_m}]`` (``s_{k,t} ≤ λ_m`` when ``higher_is_confident=False``, e.g. for
    entropy), and ``L = layers[-1]`` when no row fires. Ties at exactly ``λ`` fire. A NaN score never fires.
    The comparison is done in the promoted dtype of ``score`` and ``thresholds`` (at least float32).

    Args: ``score`` (K, N); ``thresholds`` (M,) (a scalar is treated as M = 1); ``layers`` (K,).
    ``chunk_tokens``: tokens per chunk; the work holds ``M·K·chunk_tokens`` booleans at a time (default: chunks of
    about 16 M booleans). Returns a LongTensor ``(M, N)`` of block indices.
    """
    if score.dim() != 2:
        raise ValueError(f"score must be (K, N) = (layers, tokens), got shape {tuple(score.shape)}")
    n_rows, n_tokens = score.shape
    layers = check_layers(layers, n_rows).to(score.device)
    thresholds = torch.as_tensor(thresholds, device=score.device).reshape(-1)
    dtype = torch.promote_types(score.dtype, thresholds.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        dtype = torch.promote_types(dtype, torch.float32)
    score = score.to(dtype)
    thr = thresholds.to(dtype)[:, None, None]                    # (M, 1, 1)
    n_thr = thr.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, n_thr * n_rows))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
    out = torch.empty(n_thr, n_tokens, dtype=torch.long, device=score.device)
    for start in range(0, n_tokens, chunk_tokens):              # loop over token *chunks*, not tokens
        chunk = score[None, :, start:start + chunk_tokens]      # (1, K, n)
        fires = chunk >= thr if higher_is_confident else chunk <= thr
        row = first_true_index(fires, dim=1).clamp_(max=n_rows - 1)   # never fires -> last row = L
        out[:, start:start + chunk_tokens] = layers[row]
    return out


def patience_counters(top1: Tensor) -> Tensor:
    """PABEE patience counters ``c`` (K, N): ``c_0 = 0``; ``c_k = c_{k−1} + 1`` if ``top1_k = top1_{k−1}`` else 0.

    Vectorised as ``c_k = k − r_k`` with ``r_k`` the last row ``≤ k`` that resets the counter (row 0 or a change of
    top-1), found by a cumulative max over rows.
    """
    n_rows = top1.shape[0]
    rows = torch.arange(n_rows, device=top1.device).unsqueeze(1).expand_as(top1)
    reset = torch.ones_like(top1, dtype=torch.bool)
    reset[1:] = top1[1:] != top1[:-1]
    last_reset = torch.cummax(torch.where(reset, rows, torch.zeros_like(rows)), dim=0).values
    return rows - last_reset


def patience_exit_layers(top1: Tensor, patience: int, layers: Tensor) -> Tensor:
    """PABEE patience exit (Zhou et al. 2020): exit once the top-1 has stayed the same for ``patience`` steps.

    Counter over the candidate rows: ``c_0 = 0`` at the first candidate layer, ``c_k = c_{k−1} + 1`` if
    ``top1_k = top1_{k−1}`` else ``0``. ``exit_t = layers[min{k : c_{k,t} ≥ patience}]``, ``L`` if none.
    So ``patience=1`` exits at the first layer that repeats its predecessor's top-1, ``patience=0`` at the first
    candidate layer. Args: ``top1`` (K, N) integer ids; ``patience`` ≥ 0; ``layers`` (K,). Returns LongTensor (N,).
    """
    if top1.dim() != 2:
        raise ValueError(f"top1 must be (K, N) = (layers, tokens), got shape {tuple(top1.shape)}")
    if isinstance(patience, bool) or int(patience) != patience or patience < 0:
        raise ValueError(f"patience must be a non-negative integer number of layers, got {patience!r}")
    n_rows = top1.shape[0]
    layers = check_layers(layers, n_rows).to(top1.device)
    fires = patience_counters(top1) >= int(patience)
    row = first_true_index(fires, dim=0).clamp_(max=n_rows - 1)
    return layers[row]


def exit_index(exit_layers: Tensor, layers: Tensor) -> Tensor:
    """Row index ``k`` with ``layers[k] = exit_layer`` for every entry (same shape as ``exit_layers``).

    Raises ValueError if an exit layer is not one of ``layers``.
    """
    layers = check_layers(layers).to(exit_layers.device)
    exit_layers = exit_layers.long()
    row = torch.searchsorted(layers, exit_layers.contiguous()).clamp_(max=layers.numel() - 1)
    if not bool((layers[row] == exit_layers).all()):
        raise ValueError(f"exit layers must be entries of layers={layers.tolist()}")
    return row


def exit_outcome_sums(
    exit_layers: Tensor,
    top1: Tensor,
    labels: Tensor | None,
    layers: Tensor,
) -> dict[str, Tensor]:
    """Additive outcome sums of an exit rule.

    For exit layers ``e`` of shape (M, N) (or (N,)), with ``p_{m,t} = top1[row(e_{m,t}), t]``:
    ``exit_sum_m = Σ_t e_{m,t}``, ``consistent_sum_m = Σ_t 1[p_{m,t} = top1_{L,t}]``,
    ``correct_sum_m = Σ_t 1[p_{m,t} = y_t]`` (only when ``labels`` (N,) are given; they are assumed valid) and
    ``count_m = N``. Every value is a float64 tensor of shape (M,) — or 0-dim for (N,) input — on ``top1``'s
    device, so chunks and ranks combine by summation.
    """
    if top1.dim() != 2:
        raise ValueError(f"top1 must be (K, N) = (layers, tokens), got shape {tuple(top1.shape)}")
    n_tokens = top1.shape[1]
    layers = check_layers(layers, top1.shape[0]).to(top1.device)
    exit_layers = exit_layers.to(top1.device)
    if exit_layers.shape[-1] != n_tokens or exit_layers.dim() not in (1, 2):
        raise ValueError(f"exit_layers must be (M, N) or (N,) with N={n_tokens}, got {tuple(exit_layers.shape)}")
    row = exit_index(exit_layers, layers)
    token = torch.arange(n_tokens, device=top1.device)
    pred = top1[row, token]                                     # broadcasts to exit_layers' shape
    sums = {
        "exit_sum": exit_layers.double().sum(-1),
        "consistent_sum": (pred == top1[-1]).double().sum(-1),
        "count": torch.full(exit_layers.shape[:-1], float(n_tokens), dtype=torch.float64, device=top1.device),
    }
    if labels is not None:
        labels = labels.to(top1.device).reshape(-1)
        if labels.numel() != n_tokens:
            raise ValueError(f"labels must have one entry per token ({n_tokens}), got {labels.numel()}")
        sums["correct_sum"] = (pred == labels).double().sum(-1)
    return sums


def merge_sums(a: dict[str, Tensor] | None, b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add two outcome-sum dicts key by key (``a`` may be None for the first chunk)."""
    if a is None:
        return {key: value.clone() for key, value in b.items()}
    if a.keys() != b.keys():
        raise ValueError(f"cannot merge outcome sums with different keys: {sorted(a)} vs {sorted(b)}")
    return {key: a[key] + b[key] for key in a}


def finalize_curve(
    sums: dict[str, Tensor],
    thresholds: Tensor | Sequence[float] | float,
    n_layers: int,
) -> list[dict[str, float | None]]:
    """Turn outcome sums into trade-off points, one per threshold.

    ``skip = 1 − exit_sum / (count · L)``, ``consistency = consistent_sum / count``,
    ``acc = correct_sum / count`` (``None`` when no labels were given). A zero count gives NaN ratios.
    Returns ``[{"threshold", "skip", "consistency", "acc"}, ...]`` in threshold order.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be a positive number of blocks, got {n_layers}")
    exit_sum = sums["exit_sum"].double().reshape(-1).cpu()
    consistent = sums["consistent_sum"].double().reshape(-1).cpu()
    count = sums["count"].double().reshape(-1).cpu()
    correct = sums.get("correct_sum")
    correct = None if correct is None else correct.double().reshape(-1).cpu()
    thr = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1).tolist()
    if len(thr) != count.numel():
        raise ValueError(f"got {len(thr)} thresholds for {count.numel()} sets of sums")
    safe = torch.where(count > 0, count, torch.full_like(count, float("nan")))
    skip = (1.0 - exit_sum / (safe * n_layers)).tolist()
    consistency = (consistent / safe).tolist()
    acc = None if correct is None else (correct / safe).tolist()
    return [
        {"threshold": thr[m], "skip": skip[m], "consistency": consistency[m], "acc": None if acc is None else acc[m]}
        for m in range(len(thr))
    ]


def best_skip_at_consistency(curve: Sequence[dict], level: float) -> Optional[float]:
    """Largest ``skip`` among curve points with ``consistency ≥ level`` (1e-12 slack for float rounding).

    ``0.0`` when no point qualifies: the full model (skip 0) is consistent by definition. Points whose skip or
    consistency is None/NaN are ignored. None for an empty curve (no token was measured).
    """
    if not curve:
        return None
    def _value(point: dict, key: str) -> float:
        value = point.get(key)
        return float("nan") if value is None else float(value)

    skip = torch.tensor([_value(point, "skip") for point in curve], dtype=torch.float64)
    consistency = torch.tensor([_value(point, "consistency") for point in curve], dtype=torch.float64)
    ok = (consistency >= level - 1e-12) & ~torch.isnan(skip)     # NaN consistency compares False
    if not bool(ok.any()):
        return 0.0
    return max(0.0, float(skip[ok].max()))


def static_exit(
    acc_per_layer: Tensor,
    layers: Tensor,
    n_layers: int,
    rel_tolerance: float = 0.05,
) -> tuple[int, float]:
    """Shallowest fixed exit layer within ``rel_tolerance`` (relative) of the final layer's accuracy.

    ``ℓ_static = min{layers[k] : acc_k ≥ (1 − tol) · acc_L}``, ``skip = 1 − ℓ_static / L`` (the paper's headline form).
    Compared in float64 with a slack of a few ulps of the input dtype, so a layer exactly at the tolerance
    qualifies. If ``acc_L = 0`` every layer qualifies and the first candidate layer is returned; if nothing
    qualifies (NaN accuracies) the final layer is returned with skip 0.
    """
    if not 0.0 <= rel_tolerance <= 1.0:
        raise ValueError(f"rel_tolerance must be in [0, 1], got {rel_tolerance}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be a positive number of blocks, got {n_layers}")
    acc_per_layer = torch.as_tensor(acc_per_layer)
    layers = check_layers(layers, acc_per_layer.numel()).cpu()
    in_dtype = acc_per_layer.dtype if acc_per_layer.dtype.is_floating_point else torch.float64
    acc = acc_per_layer.detach().reshape(-1).double().cpu()
    slack = 4.0 * torch.finfo(in_dtype).eps                      # accuracies lie in [0, 1]
    qualifies = acc >= (1.0 - rel_tolerance) * acc[-1] - slack
    row = int(first_true_index(qualifies, dim=0))
    layer = int(layers[row]) if row < layers.numel() else int(n_layers)
    return layer, 1.0 - layer / n_layers


class ExitRuleStats(Accumulator):
    """Outcome sums of one exit rule at M operating points (thresholds or patience values), see
    :func:`exit_outcome_sums`; ``compute(points, L)`` gives the trade-off curve."""

    def __init__(self, n_points: int):
        super().__init__()
        for name in ("exit_sum", "exit_sq_sum", "consistent_sum", "correct_sum", "count"):
            self.add_state(name, torch.zeros(int(n_points)))

    def update(self, exit_layers: Tensor, top1: Tensor, labels: Tensor, layers: Tensor) -> None:
        """Add a chunk: exit layers (M, n), per-layer top-1 (K, n), labels (n,), candidate ``layers`` (K,)."""
        for name, value in exit_outcome_sums(exit_layers, top1, labels, layers).items():
            self._add(name, value)
        self._add("exit_sq_sum", exit_layers.double().square().sum(-1))

    def stderr(self, n_layers: int) -> list:
        """Per point, the standard errors of ``skip`` (= 1 − e/L per token), ``consistency`` and ``acc`` (0/1 per
        token, so their squares sum to their sums)."""
        L = float(n_layers)
        return [{"skip": mean_stderr(self.exit_sum[m] / L, self.exit_sq_sum[m] / L ** 2, self.count[m]),
                 "consistency": mean_stderr(self.consistent_sum[m], self.consistent_sum[m], self.count[m]),
                 "acc": mean_stderr(self.correct_sum[m], self.correct_sum[m], self.count[m])}
                for m in range(self.count.numel())]

    def compute(self, points, n_layers: int) -> list:
        if float(self.count.sum()) == 0:
            return []
        return finalize_curve(self.states(), points, n_layers)
