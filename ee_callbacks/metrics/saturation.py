"""Per-token saturation layers (DESIGN §3) and the oracle skip ratio they imply.

Conventions shared by the metrics package:
- ``layers`` is a 1-D LongTensor ``(K,)`` of strictly increasing block indices at which a readout exists (e.g.
  ``[1, 2, ..., L]``); its last entry is always the final layer ``L``.
- Per-token per-layer arrays are ``(K, N)``: row ``k`` belongs to block ``layers[k]``, column ``t`` to token ``t``.
- Results are reported as block indices (entries of ``layers``), never as row indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ee_callbacks.metrics.accumulator import Accumulator, mean_stderr

__all__ = [
    "check_layers",
    "first_true_index",
    "saturation_layers",
    "saturation_histogram",
    "oracle_skip",
    "SaturationStats",
]


def check_layers(layers: Tensor, n_rows: int | None = None) -> Tensor:
    """Validate a candidate-layer vector and return it as a LongTensor.

    Requires a 1-D integer tensor of strictly increasing, non-negative block indices, of length ``n_rows`` when
    given (the number of rows ``K`` of the per-layer arrays it labels).
    """
    layers = torch.as_tensor(layers)
    if layers.dim() != 1 or layers.numel() == 0:
        raise ValueError(f"layers must be a non-empty 1-D tensor of block indices, got shape {tuple(layers.shape)}")
    if layers.dtype.is_floating_point or layers.dtype.is_complex or layers.dtype == torch.bool:
        raise ValueError(f"layers must hold integer block indices, got dtype {layers.dtype}")
    layers = layers.long()
    if n_rows is not None and layers.numel() != n_rows:
        raise ValueError(f"layers has {layers.numel()} entries but the per-layer array has {n_rows} rows; "
                         "pass one layer index per row")
    if bool((layers < 0).any()):
        raise ValueError("layers must be non-negative block indices (0 = embedding output, L = final block)")
    if layers.numel() > 1 and not bool((layers[1:] > layers[:-1]).all()):
        raise ValueError(f"layers must be strictly increasing, got {layers.tolist()}")
    return layers


def first_true_index(mask: Tensor, dim: int = 0) -> Tensor:
    """Index of the first ``True`` along ``dim``; ``mask.shape[dim]`` where a slice holds no ``True``.

    ``first(mask)_j = min{k : mask[k, j]}`` (``= size`` when the set is empty). Computed with one ``argmax`` over a
    uint8 view (PyTorch documents that ``argmax`` returns the first maximal index) and an ``any`` for empty slices.
    """
    size = mask.shape[dim]
    if size == 0:
        return torch.zeros(mask.shape[:dim] + mask.shape[dim + 1:], dtype=torch.long, device=mask.device)
    first = torch.argmax(mask.to(torch.uint8), dim=dim)
    return torch.where(mask.any(dim=dim), first, torch.full_like(first, size))


def saturation_layers(top1: Tensor, layers: Tensor) -> tuple[Tensor, Tensor]:
    """Strict and lenient saturation layer of every token.

    With ``m_{k,t} = 1[argmax z_{layers[k]} = argmax z_L]`` (the last row is the final layer, so ``m_{K-1,t} = 1``):

    - strict  ``ℓ*_t = min{layers[k] : m_{j,t} = 1 for all j ≥ k}`` — the layer after which the top-1 never changes
      again (one past the last disagreeing row);
    - lenient ``ℓ°_t = min{layers[k] : m_{k,t} = 1}`` — the first layer whose top-1 matches the final one.

    Always ``ℓ°_t ≤ ℓ*_t ≤ L``. Args: ``top1`` (K, N) integer top-1 token ids per layer and token; ``layers`` (K,).
    Returns ``(strict, lenient)``, two LongTensors ``(N,)`` of block indices (entries of ``layers``).
    """
    if top1.dim() != 2:
        raise ValueError(f"top1 must be (K, N) = (layers, tokens), got shape {tuple(top1.shape)}")
    n_rows = top1.shape[0]
    layers = check_layers(layers, n_rows).to(top1.device)
    match = top1 == top1[-1:]                                   # (K, N); last row all True
    # strict: last disagreeing row r (found as the first True of the row-reversed mismatch), saturate at r + 1;
    # with no disagreement first_true_index returns K on the reversed mask, giving row 0.
    last_mismatch_from_end = first_true_index(torch.flip(~match, dims=(0,)), dim=0)
    strict_row = n_rows - last_mismatch_from_end                  # = (K-1 - (from_end)) + 1
    lenient_row = first_true_index(match, dim=0)                  # < K always (last row matches)
    return layers[strict_row], layers[lenient_row]


def saturation_histogram(sat: Tensor, n_layers: int) -> Tensor:
    """Histogram of saturation layers: ``hist[ℓ] = #{t : ℓ*_t = ℓ}`` for ``ℓ = 0..L``.

    Returns a LongTensor ``(n_layers + 1,)`` (index 0 is the embedding output, used only when it is a candidate).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be a positive number of blocks, got {n_layers}")
    sat = sat.reshape(-1).long()
    if sat.numel() and (bool((sat < 0).any()) or bool((sat > n_layers).any())):
        raise ValueError(f"saturation layers must lie in 0..{n_layers}, got range "
                         f"[{int(sat.min())}, {int(sat.max())}]")
    return torch.bincount(sat, minlength=n_layers + 1)


def oracle_skip(sat: Tensor, n_layers: int) -> float:
    """Oracle skip ratio ``1 − E_t[ℓ*_t] / L`` (fraction of blocks an oracle exit would save).

    Returns ``nan`` for an empty token set (recorded as null downstream).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be a positive number of blocks, got {n_layers}")
    if sat.numel() == 0:
        return float("nan")
    return float(1.0 - sat.double().mean() / n_layers)


class SaturationStats(Accumulator):
    """Strict and lenient saturation layers as sums: ``oracle_skip = 1 − Σ_t ℓ_t / (n·L)``, histograms of ℓ*, ℓ°."""

    def __init__(self, layers: Tensor, n_layers: int):
        super().__init__()
        self.layers = check_layers(layers)
        self.n_layers = int(n_layers)
        for name in ("strict_sum", "lenient_sum", "strict_sq", "lenient_sq", "count"):
            self.add_state(name, torch.zeros(()))
        self.add_state("hist_strict", torch.zeros(self.n_layers + 1))
        self.add_state("hist_lenient", torch.zeros(self.n_layers + 1))

    def update(self, top1: Tensor) -> None:
        """Add a chunk of per-layer top-1 ids (K, n), rows ``layers``."""
        strict, lenient = saturation_layers(top1, self.layers)
        self._add("strict_sum", strict.double().sum())
        self._add("lenient_sum", lenient.double().sum())
        self._add("strict_sq", strict.double().square().sum())
        self._add("lenient_sq", lenient.double().square().sum())
        self._add("hist_strict", saturation_histogram(strict, self.n_layers).double())
        self._add("hist_lenient", saturation_histogram(lenient, self.n_layers).double())
        self._add("count", torch.tensor(float(top1.shape[1])))

    def compute(self) -> dict:
        n, L = float(self.count), self.n_layers
        if n == 0:
            return {}
        return {
            "oracle_skip_strict": 1.0 - float(self.strict_sum) / n / L,
            "oracle_skip_lenient": 1.0 - float(self.lenient_sum) / n / L,
            "saturation_mean_strict": float(self.strict_sum) / n,
            "hist_strict": [int(v) for v in self.hist_strict.round().tolist()],
            "hist_lenient": [int(v) for v in self.hist_lenient.round().tolist()],
            "count": n,
            "stderr": {  # of the means over tokens; the skips are 1 − ℓ/L, so their errors are the layers' over L
                "oracle_skip_strict": mean_stderr(self.strict_sum / L, self.strict_sq / L ** 2, n),
                "oracle_skip_lenient": mean_stderr(self.lenient_sum / L, self.lenient_sq / L ** 2, n),
                "saturation_mean_strict": mean_stderr(self.strict_sum, self.strict_sq, n),
            },
        }
