"""Early-exit suitability (EAS), the Jensen–Shannon layer similarity, and a self-speculative speedup estimate.

EAS is *reconstructed* from the description in arXiv:2603.23701 (its full text was not available): the similarity
``S_ℓ`` and the exponent ``α`` are configurable and every EAS value should be recorded with both (DESIGN §3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ee_callbacks.metrics.saturation import check_layers

__all__ = ["eas", "js_similarity", "spec_speedup_estimate"]

SPEC_ASSUMPTIONS = (
    "estimate, not a measurement: per-token acceptance a = agree at the draft layer, independent across positions; "
    "expected tokens per cycle (1 - a^(k+1))/(1 - a); cost per cycle k*E/L + (L - E)/L full passes (verification "
    "runs only layers E+1..L over the drafts, reusing the draft's early-layer cache); cost in blocks only "
    "(no unembedding, attention-length or memory-bandwidth effects)"
)


def eas(similarity: Tensor, n_layers: int, alpha: float = 0.5, layers: Tensor | None = None) -> float:
    """Early-exit suitability ``EAS = mean_ℓ S_ℓ^α · w_ℓ^(1−α)`` with ``w_ℓ = (L − ℓ)/L``.

    ``S_ℓ`` (the layer-to-final similarity, one per entry of ``layers``; default layers ``1..L``, so the last term is
    0) is clamped to [0, 1] first. ``0^0 := 1`` explicitly, so ``α = 0`` gives ``mean_ℓ w_ℓ`` (S ignored) and
    ``α = 1`` gives ``mean_ℓ S_ℓ`` (w ignored). A NaN similarity gives NaN.
    """
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1] (0: depth weight only, 1: similarity only), got {alpha}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be a positive number of blocks, got {n_layers}")
    sim = torch.as_tensor(similarity).detach().reshape(-1).double().cpu()
    if layers is None:
        layers = torch.arange(1, n_layers + 1)
    layers = check_layers(layers, sim.numel()).cpu()
    if bool((layers > n_layers).any()):
        raise ValueError(f"layers must lie in 0..{n_layers}, got {layers.tolist()}")
    s = sim.clamp(0.0, 1.0)                                      # clamp keeps NaN
    w = (n_layers - layers).double() / n_layers

    def _pow(base: Tensor, exponent: float) -> Tensor:
        """``base ** exponent`` with ``0^0 = 1`` stated explicitly."""
        if exponent == 0.0:
            return torch.where(torch.isnan(base), base, torch.ones_like(base))
        return base.pow(exponent)

    return float((_pow(s, alpha) * _pow(w, 1.0 - alpha)).mean())


def js_similarity(logp: Tensor, logq: Tensor) -> Tensor:
    """Per-token similarity ``1 − JS(p, q) / ln 2`` in [0, 1] from log-probabilities (..., V) -> (...).

    ``JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)``, ``m = (p + q)/2``, in nats (so ``JS ≤ ln 2``). ``log m`` is a
    log-sum-exp of ``logp`` and ``logq``, and terms with zero probability contribute 0 (``0 · log 0 := 0``), so
    ``-inf`` log-probabilities are safe. Computed in at least float32.
    """
    if logp.shape != logq.shape:
        raise ValueError(f"logp and logq must have the same shape, got {tuple(logp.shape)} and {tuple(logq.shape)}")
    dtype = torch.promote_types(torch.promote_types(logp.dtype, logq.dtype), torch.float32)
    logp = logp.to(dtype)
    logq = logq.to(dtype)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)

    def _kl_to_m(log_a: Tensor) -> Tensor:
        """``Σ_v a_v (log a_v − log m_v)`` with zero-probability terms dropped."""
        a = log_a.exp()
        term = torch.where(a > 0, a * (log_a - logm), torch.zeros_like(a))
        return term.sum(-1)

    js = 0.5 * (_kl_to_m(logp) + _kl_to_m(logq))
    return (1.0 - js / math.log(2.0)).clamp(0.0, 1.0)


def spec_speedup_estimate(
    agree: Tensor,
    layers: Tensor,
    n_layers: int,
    draft_lengths: Iterable[int] = range(1, 9),
) -> dict:
    """LayerSkip-style self-speculative decoding speedup — an ESTIMATE from per-layer agreement, not a measurement.

    For draft exit layer ``E`` (candidates with ``1 ≤ E < L``) with acceptance ``a = clamp(agree_E, 0, 1)`` and draft
    length ``k``: tokens per cycle ``T = Σ_{i=0..k} a^i = (1 − a^{k+1})/(1 − a)`` (``= k + 1`` at ``a = 1``, exact
    since it is computed as the sum), cost ``C = k·E/L + (L − E)/L`` full-model passes, speedup ``T / C``.
    Returns the best ``{"speedup", "layer", "draft_len", "tokens_per_cycle", "acceptance", "assumptions"}``
    (ties go to the shallower layer, then the shorter draft). If no pair beats 1.0 (or no candidate exists):
    ``speedup = 1.0``, ``tokens_per_cycle = 1.0`` and ``layer``/``draft_len``/``acceptance`` None.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be a positive number of blocks, got {n_layers}")
    agree = torch.as_tensor(agree).detach().reshape(-1).double().cpu()
    layers = check_layers(layers, agree.numel()).cpu()
    ks = torch.as_tensor(list(draft_lengths), dtype=torch.long)
    if ks.numel() == 0 or bool((ks < 1).any()):
        raise ValueError(f"draft_lengths must be positive integers, got {ks.tolist()}")
    none = {"speedup": 1.0, "layer": None, "draft_len": None, "tokens_per_cycle": 1.0, "acceptance": None,
            "assumptions": SPEC_ASSUMPTIONS}
    keep = (layers >= 1) & (layers < n_layers) & ~torch.isnan(agree)
    if not bool(keep.any()):
        return none
    draft_layer = layers[keep].double()                          # (E,)
    accept = agree[keep].clamp(0.0, 1.0)                         # (E,)
    powers = accept[:, None] ** torch.arange(int(ks.max()) + 1, dtype=torch.float64)   # (E, kmax+1): a^i
    tokens = powers.cumsum(-1)[:, ks]                            # (E, D): Σ_{i≤k} a^i
    cost = (ks.double()[None, :] * draft_layer[:, None] + (n_layers - draft_layer[:, None])) / n_layers
    speedup = tokens / cost
    best = int(torch.argmax(speedup.reshape(-1)))                # first maximum: shallowest E, then shortest k
    e_row, k_col = divmod(best, ks.numel())
    if not float(speedup[e_row, k_col]) > 1.0:
        return none
    return {
        "speedup": float(speedup[e_row, k_col]),
        "layer": int(draft_layer[e_row]),
        "draft_len": int(ks[k_col]),
        "tokens_per_cycle": float(tokens[e_row, k_col]),
        "acceptance": float(accept[e_row]),
        "assumptions": SPEC_ASSUMPTIONS,
    }
