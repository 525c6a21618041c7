"""Early-exit suitability (EAS), the Jensen–Shannon layer similarity, and a self-speculative speedup estimate.

EAS is *reconstructed* from the description in arXiv:2603.23701 (its full text was not available): the similarity
``S_ℓ`` and the exponent ``α`` are configurable and every EAS value should be recorded with both (DESIGN §3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ee_callbacks.metrics.accumulator import Accumulator
from ee_callbacks.metrics.saturation import check_layers

__all__ = ["eas", "js_similarity", "spec_speedup_estimate", "spec_speedup_table", "acceptance_runs", "spec_cycle_costs", "best_speedup",
           "SpecRunStats"]

SPEC_ASSUMPTIONS = (
    "estimate, not a measurement: a cycle drafts k tokens with blocks 1..E (k passes of E blocks) and verifies them "
    "with blocks E+1..L over the k positions, reusing the draft's early-layer cache: cost (k*E + L - E)/L full passes; "
    "it emits the accepted prefix plus the full model's token at the first rejection, at most k tokens (no bonus "
    "token: it would need a (k+1)-th draft pass); acceptance a = agree at the draft layer, independent per token, "
    "expected tokens (1 - a^k)/(1 - a); cost in blocks only (no unembedding, attention-length or bandwidth effects)"
)
SPEC_RUNS_ASSUMPTIONS = (
    "the same cycle simulated along each probe sequence with the observed per-token acceptance (top-1 at the draft "
    "layer = final top-1), instead of an independent acceptance rate"
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
    length ``k``: expected tokens per cycle ``T = Σ_{i=0..k−1} a^i = (1 − a^k)/(1 − a)`` (``= k`` at ``a = 1``; the
    accepted prefix plus the full model's token at the first rejection), cost ``C = (k·E + L − E)/L`` full-model
    passes, speedup ``T / C``. With ``E = L − 1`` and ``k = 1`` it is exactly 1. Returns the best
    ``{"speedup", "layer", "draft_len", "tokens_per_cycle", "acceptance", "assumptions"}`` (ties go to the shallower
    layer, then the shorter draft). If no pair beats 1.0 (or no candidate exists): ``speedup = 1.0``,
    ``tokens_per_cycle = 1.0`` and ``layer``/``draft_len``/``acceptance`` None.
    """
    draft_layer, ks, accept, tokens, cost = spec_speedup_table(agree, layers, n_layers, draft_lengths)
    result = best_speedup(tokens, cost, draft_layer, ks)
    if result["layer"] is not None:
        row = int((draft_layer == result["layer"]).nonzero()[0])
        result["acceptance"] = float(accept[row])
    result["assumptions"] = SPEC_ASSUMPTIONS
    return result


def spec_speedup_table(agree: Tensor, layers: Tensor, n_layers: int, draft_lengths: Iterable[int] = range(1, 9)):
    """Every ``(E, k)`` pair of :func:`spec_speedup_estimate`'s model: ``(draft layers (E,), draft lengths (D,),
    acceptance (E,), tokens per cycle Σ_{i<k} a^i (E, D), cost (k·E + L − E)/L (E, D))``, float64, over the layers
    with ``1 ≤ E < L`` and a finite agreement, in the order given."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be a positive number of blocks, got {n_layers}")
    agree = torch.as_tensor(agree).detach().reshape(-1).double().cpu()
    layers = check_layers(layers, agree.numel()).cpu()
    ks = _draft_lengths(draft_lengths)
    keep = (layers >= 1) & (layers < n_layers) & ~torch.isnan(agree)
    draft_layer = layers[keep].double()                          # (E,)
    accept = agree[keep].clamp(0.0, 1.0)                         # (E,)
    powers = accept[:, None] ** torch.arange(int(ks.max()), dtype=torch.float64)   # (E, kmax): a^i, i < kmax
    tokens = powers.cumsum(-1)[:, ks - 1]                        # (E, D): Σ_{i<k} a^i
    return draft_layer, ks, accept, tokens, _cycle_cost(draft_layer, ks, n_layers)


def _draft_lengths(draft_lengths: Iterable[int]) -> Tensor:
    ks = torch.as_tensor(list(draft_lengths), dtype=torch.long)
    if ks.numel() == 0 or bool((ks < 1).any()):
        raise ValueError(f"draft_lengths must be positive integers, got {ks.tolist()}")
    return ks


def _cycle_cost(draft_layer: Tensor, ks: Tensor, n_layers: int) -> Tensor:
    """Full-model passes of one cycle, (E, D): ``(k·E + L − E)/L``."""
    return (ks.double()[None, :] * draft_layer[:, None] + (n_layers - draft_layer[:, None])) / n_layers


def best_speedup(tokens: Tensor, cost: Tensor, draft_layer: Tensor, ks: Tensor) -> dict:
    """The best ``tokens / cost`` over draft layers (rows) and draft lengths (columns); 1.0 with no choice when no
    pair beats plain decoding (first maximum: shallowest layer, then shortest draft)."""
    none = {"speedup": 1.0, "layer": None, "draft_len": None, "tokens_per_cycle": 1.0, "acceptance": None}
    if tokens.numel() == 0:
        return none
    speedup = tokens / cost
    best = int(torch.argmax(speedup.reshape(-1)))
    row, col = divmod(best, ks.numel())
    if not float(speedup[row, col]) > 1.0:
        return none
    return {"speedup": float(speedup[row, col]), "layer": int(draft_layer[row]), "draft_len": int(ks[col]),
            "tokens_per_cycle": float(tokens[row, col]), "acceptance": None}


def acceptance_runs(accept: Tensor, sequence: Tensor) -> Tensor:
    """Per token, how many consecutive tokens from it on (itself included, same sequence) are accepted.

    ``accept`` (E, N) bool, tokens in sequence order; ``sequence`` (N,) ids, each sequence's tokens contiguous.
    ``run_t = accept_t · (1 + run_{t+1})`` when token t+1 belongs to the same sequence, else ``accept_t``.
    """
    n = accept.shape[1]
    if n == 0:
        return torch.zeros_like(accept, dtype=torch.long)
    backwards = accept.flip(-1)
    seq = sequence.flip(-1)
    index = torch.arange(n)
    starts = torch.ones(n, dtype=torch.bool)                     # a new sequence, read backwards
    starts[1:] = seq[1:] != seq[:-1]
    marker = torch.where(starts, index - 1, torch.full_like(index, -1)).expand_as(backwards)
    marker = torch.where(backwards, marker, index.expand_as(backwards))   # a rejected token ends every run
    last_break = torch.cummax(marker, dim=-1).values
    return torch.where(backwards, index - last_break, 0).flip(-1)


def spec_cycle_costs(accept: Tensor, sequence: Tensor, draft_layers: Tensor, n_layers: int,
                     draft_lengths: Iterable[int]) -> Tensor:
    """Total full-model passes to emit every probe token by self-speculation, simulated along the sequences, (E, D).

    Each sequence is decoded in cycles from its first token: a cycle at position t drafts ``k' = min(k, tokens left)``
    tokens at cost ``(k'·E + L − E)/L`` and emits ``min(run_t + 1, k')`` tokens (``run_t`` from
    :func:`acceptance_runs` on row E of ``accept``). Tokens emitted always total N, so speedup = N / cost.
    """
    ks = _draft_lengths(draft_lengths)
    runs = acceptance_runs(accept, sequence)                     # (E, N)
    n = sequence.numel()
    bounds = torch.ones(n + 1, dtype=torch.bool)
    if n:
        bounds[1:-1] = sequence[1:] != sequence[:-1]
    edges = bounds.nonzero().squeeze(1)
    start, end = edges[:-1], edges[1:]                           # (S,) each
    n_draft = draft_layers.numel()
    position = start.expand(n_draft, ks.numel(), -1).clone()     # (E, D, S)
    end = end.expand_as(position)
    k = ks[None, :, None].expand_as(position)
    e = draft_layers.double()[:, None, None]
    rows = torch.arange(n_draft)[:, None, None].expand_as(position)
    cost = torch.zeros(n_draft, ks.numel(), dtype=torch.float64)
    active = position < end
    while bool(active.any()):
        drafted = torch.minimum(k, end - position)
        emitted = torch.minimum(runs[rows, position.clamp_max(max(n - 1, 0))] + 1, drafted)
        cost += torch.where(active, (drafted * e + n_layers - e) / n_layers, 0.0).sum(-1)
        position = torch.where(active, position + emitted, position)
        active = position < end
    return cost


class SpecRunStats(Accumulator):
    """Self-speculation simulated along the probe sequences (:func:`spec_cycle_costs`), fed chunk by chunk.

    A sequence may continue into the next chunk, so the last sequence of each update is held back until a later
    token belongs to another sequence, or until :meth:`finish`. States: ``cost`` (draft layers × draft lengths),
    ``tokens``.
    """

    def __init__(self, draft_layers, n_layers: int, draft_lengths):
        super().__init__()
        self.draft_layers = torch.as_tensor(list(draft_layers), dtype=torch.long)
        self.n_layers = int(n_layers)
        self.draft_lengths = _draft_lengths(draft_lengths)
        self.add_state("cost", torch.zeros(self.draft_layers.numel(), self.draft_lengths.numel()))
        self.add_state("tokens", torch.zeros(()))
        self._held = (torch.zeros(self.draft_layers.numel(), 0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))

    def update(self, accept: Tensor, sequence: Tensor) -> None:
        """``accept`` (E, n): the draft layer's top-1 equals the final one; ``sequence`` (n,) ids in token order."""
        accept = torch.cat([self._held[0], accept.cpu()], dim=1)
        sequence = torch.cat([self._held[1], sequence.cpu()])
        if sequence.numel() == 0:
            return
        complete = int((sequence != sequence[-1]).sum())  # tokens before the last sequence
        self._held = (accept[:, complete:], sequence[complete:])
        self._simulate(accept[:, :complete], sequence[:complete])

    def finish(self) -> None:
        accept, sequence = self._held
        self._held = (accept[:, :0], sequence[:0])
        self._simulate(accept, sequence)

    def _simulate(self, accept: Tensor, sequence: Tensor) -> None:
        if sequence.numel() and self.draft_layers.numel():
            self._add("cost", spec_cycle_costs(accept, sequence, self.draft_layers, self.n_layers, self.draft_lengths))
            self._add("tokens", torch.tensor(float(sequence.numel())))

    def compute(self) -> dict:
        return best_speedup(torch.full_like(self.cost, float(self.tokens)), self.cost, self.draft_layers,
                            self.draft_lengths)
