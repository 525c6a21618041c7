"""Linear CKA between layers with the unbiased HSIC estimator, summed over minibatches, and CKA drift over probes.

References: Song et al. 2012 (unbiased HSIC estimator), Nguyen, Raghu & Kornblith 2021 ("Do Wide and Deep Networks
Learn the Same Things?", minibatch CKA).

For a minibatch of ``n`` tokens and layer features ``X_i`` (n, d) the linear Gram matrix is ``K_i = X_i X_iᵀ``.
The unbiased estimator is

    HSIC_1(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)),

with ``K̃`` = ``K`` with its diagonal set to zero; it equals ``<U(K), U(L)> / (n(n−3))`` with ``U`` the U-centring
below, so all K×K pairs come from one matmul. Minibatch CKA sums HSIC_1 over minibatches ``b`` before the ratio:

    CKA_ij = Σ_b HSIC_1(K_i^b, K_j^b) / sqrt(Σ_b HSIC_1(K_i^b, K_i^b) · Σ_b HSIC_1(K_j^b, K_j^b)).

Everything is computed in float64 (Gram entries of wide residual streams are large and the estimator subtracts
nearly equal terms). All state is held as sums so that ranks combine by an all-reduce of ``state_tensor()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ee_callbacks.metrics.accumulator import Accumulator

__all__ = [
    "gram_linear",
    "u_centre",
    "hsic_all_pairs",
    "cka_from_sums",
    "MinibatchCKA",
    "drift_sums",
    "CKADrift",
]

_MIN_TOKENS = 4


def gram_linear(x: Tensor | Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """Linear Gram matrices ``G_k = X_k X_kᵀ`` for every layer ``k``, computed in ``dtype`` (default float64).

    ``x``: (K, n, d) features (or a sequence of K tensors (n, d_k) when widths differ). Returns (K, n, n).
    """
    if isinstance(x, Tensor):
        if x.dim() != 3:
            raise ValueError(f"features must be (K, n, d) = (layers, tokens, width), got shape {tuple(x.shape)}")
        x = x.to(dtype)
        return x @ x.transpose(-1, -2)
    grams = [gram_linear(feature.unsqueeze(0), dtype)[0] for feature in x]   # a handful of layers
    if not grams:
        raise ValueError("features must hold at least one layer")
    return torch.stack(grams)


def u_centre(gram: Tensor) -> Tensor:
    """U-centring of Gram matrices (K, n, n) -> (K, n, n), for n ≥ 3.

    ``U(K)_ij = K̃_ij − r_i/(n−2) − c_j/(n−2) + s/((n−1)(n−2))`` for ``i ≠ j`` and ``U(K)_ii = 0``, where
    ``K̃`` is ``K`` with a zero diagonal, ``r``/``c`` its row/column sums and ``s`` its total. Then
    ``<U(K), U(L)> / (n(n−3))`` is Song et al.'s unbiased ``HSIC_1(K, L)`` (see the module docstring).
    """
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be (K, n, n), got shape {tuple(gram.shape)}")
    n = gram.shape[-1]
    if n < 3:
        raise ValueError(f"U-centring needs at least 3 tokens per minibatch, got n={n}")
    eye = torch.eye(n, dtype=torch.bool, device=gram.device)
    zeroed = gram.masked_fill(eye, 0.0)
    row = zeroed.sum(-1, keepdim=True)                           # (K, n, 1)
    col = zeroed.sum(-2, keepdim=True)                           # (K, 1, n)
    total = zeroed.sum((-1, -2), keepdim=True)                   # (K, 1, 1)
    centred = zeroed - row / (n - 2) - col / (n - 2) + total / ((n - 1) * (n - 2))
    return centred.masked_fill(eye, 0.0)


def hsic_all_pairs(ucentred: Tensor) -> Tensor:
    """Unbiased ``HSIC_1`` for every pair of layers: ``H_ij = <U_i, U_j> / (n(n−3))`` (one matmul), (K, K).

    ``ucentred``: (K, n, n) output of ``u_centre``; requires n ≥ 4.
    """
    if ucentred.dim() != 3 or ucentred.shape[-1] != ucentred.shape[-2]:
        raise ValueError(f"ucentred must be (K, n, n), got shape {tuple(ucentred.shape)}")
    n = ucentred.shape[-1]
    if n < _MIN_TOKENS:
        raise ValueError(f"the unbiased HSIC estimator needs at least {_MIN_TOKENS} tokens per minibatch, got n={n}; "
                         "use larger probe minibatches")
    flat = ucentred.reshape(ucentred.shape[0], -1)
    return (flat @ flat.T) / (n * (n - 3))


def cka_from_sums(cross: Tensor, self_a: Tensor, self_b: Tensor) -> Tensor:
    """``CKA = cross / sqrt(self_a · self_b)`` elementwise; NaN where ``self_a · self_b ≤ 0`` (undefined)."""
    denom = self_a * self_b
    ok = denom > 0
    safe = torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, cross / safe.sqrt(), torch.full_like(cross, float("nan")))


class MinibatchCKA(Accumulator):
    """Streaming linear CKA (unbiased HSIC) between all K layers, summed over minibatches.

    ``update(features)`` adds ``H^b_ij = HSIC_1(K_i^b, K_j^b)`` to a float64 running sum ``S`` (K, K) and counts
    the minibatch; ``compute()`` returns ``CKA_ij = S_ij / sqrt(S_ii S_jj)`` (NaN where undefined).
    States (summed across ranks by a :class:`~ee_callbacks.metrics.accumulator.MetricSuite`): ``hsic_sum``,
    ``minibatches``; ``state_tensor()`` / ``load_state_tensor`` pack them into one vector.
    """

    def __init__(self, n_reps: int, *, device: torch.device | str | None = None):
        """``n_reps``: number of representations (layers) K compared; ``device`` is accepted for compatibility
        (sums are kept in float64 on the CPU)."""
        super().__init__()
        if int(n_reps) != n_reps or n_reps < 1:
            raise ValueError(f"n_reps must be a positive number of layers, got {n_reps!r}")
        self.n_reps = int(n_reps)
        self.add_state("hsic_sum", torch.zeros(self.n_reps, self.n_reps))
        self.add_state("minibatches", torch.zeros(()))

    @property
    def n_minibatches(self) -> int:
        return int(round(float(self.minibatches)))

    def update(self, features: Tensor | Sequence[Tensor], *, return_ucentred: bool = False) -> Tensor | None:
        """Add one minibatch: ``features`` (K, n, d) (same n tokens for every layer, n ≥ 4).

        Returns the float64 U-centred Grams (K, n, n) when ``return_ucentred`` (for ``CKADrift``), else None.
        """
        grams = gram_linear(features)
        if grams.shape[0] != self.n_reps:
            raise ValueError(f"expected features for {self.n_reps} layers, got {grams.shape[0]}")
        ucentred = u_centre(grams)
        self._add("hsic_sum", hsic_all_pairs(ucentred))
        self._add("minibatches", torch.ones(()))
        return ucentred if return_ucentred else None

    def compute(self) -> Tensor:
        """CKA matrix (K, K) float64: ``S_ij / sqrt(S_ii S_jj)``; all NaN before any update."""
        diag = torch.diagonal(self.hsic_sum)
        return cka_from_sums(self.hsic_sum, diag[:, None], diag[None, :])

    def state_tensor(self) -> Tensor:
        """One float64 vector ``[S.flatten() (K·K), count]``; summing it across ranks merges the accumulators."""
        return torch.cat([self.hsic_sum.reshape(-1), self.minibatches.reshape(1)])

    def load_state_tensor(self, state: Tensor) -> None:
        """Inverse of ``state_tensor`` (e.g. after an all-reduce)."""
        size = self.n_reps * self.n_reps + 1
        if state.dim() != 1 or state.numel() != size:
            raise ValueError(f"state tensor must be 1-D with {size} entries, got shape {tuple(state.shape)}")
        state = state.to(torch.float64)
        self.hsic_sum = state[:-1].reshape(self.n_reps, self.n_reps).clone()
        self.minibatches = state[-1].clone()


def drift_sums(previous: Tensor, current: Tensor) -> Tensor:
    """Per-layer drift sums of one minibatch pair, (3, K) float64:
    rows ``[<U_prev_k, U_cur_k>, <U_prev_k, U_prev_k>, <U_cur_k, U_cur_k>]`` (Frobenius products).

    The common ``1/(n(n−3))`` HSIC factor cancels in the CKA ratio only if every minibatch has the same n, so it is
    applied here to keep minibatches of different sizes correctly weighted.
    """
    if previous.shape != current.shape:
        raise ValueError(f"previous and current U-centred Grams differ in shape: {tuple(previous.shape)} vs "
                         f"{tuple(current.shape)}; drift needs the same probe tokens in the same minibatches")
    n = current.shape[-1]
    if n < _MIN_TOKENS:
        raise ValueError(f"the unbiased HSIC estimator needs at least {_MIN_TOKENS} tokens per minibatch, got n={n}")
    prev = previous.to(torch.float64)
    cur = current.to(torch.float64)
    scale = 1.0 / (n * (n - 3))
    return torch.stack([
        (prev * cur).sum((-1, -2)),
        (prev * prev).sum((-1, -2)),
        (cur * cur).sum((-1, -2)),
    ]) * scale


class CKADrift(Accumulator):
    """CKA of each layer against the same layer at the previous probe (representation drift over training).

    Minibatch ``b`` of this probe is paired with minibatch ``b`` of the previous probe (the probe set is fixed, so
    they hold the same tokens); per layer ``k``:

        drift_k = Σ_b HSIC_1(U_prev_bk, U_cur_bk) / sqrt(Σ_b HSIC_1(U_prev_bk, U_prev_bk) · Σ_b HSIC_1(U_cur_bk, U_cur_bk)).

    Use: ``begin_probe()``; ``update(ucentred, key)`` per minibatch (the U-centred Grams returned by
    ``MinibatchCKA.update(..., return_ucentred=True)``; ``key`` names the minibatch, default its call index since
    ``begin_probe``); reduce the states ``sums`` (3, K) and ``pairs`` across ranks if distributed; ``compute()``;
    ``end_probe()`` (the current Grams become the reference). Minibatches without a partner only get stored. The
    stored Grams take ``K·n²·B`` values in ``storage_dtype`` on ``storage_device`` (default float32 on CPU).
    ``state_dict()`` / ``load_state_dict()`` carry the reference Grams across a resume.
    """

    def __init__(self, n_reps: int, *, storage_dtype: torch.dtype = torch.float32,
                 storage_device: torch.device | str = "cpu"):
        """``n_reps``: number of layers K; ``storage_dtype``/``storage_device``: where reference Grams are kept."""
        super().__init__()
        if int(n_reps) != n_reps or n_reps < 1:
            raise ValueError(f"n_reps must be a positive number of layers, got {n_reps!r}")
        if not storage_dtype.is_floating_point:
            raise ValueError(f"storage_dtype must be a floating dtype, got {storage_dtype}")
        self.n_reps = int(n_reps)
        self.storage_dtype = storage_dtype
        self.storage_device = torch.device(storage_device)
        self.add_state("sums", torch.zeros(3, self.n_reps))
        self.add_state("pairs", torch.zeros(()))
        self.reference: dict = {}
        self.current: dict = {}

    @property
    def has_reference(self) -> bool:
        """Whether Grams from an earlier probe are stored."""
        return bool(self.reference)

    @property
    def n_pairs(self) -> int:
        return int(round(float(self.pairs)))

    def begin_probe(self) -> None:
        """Start a probe: zero the sums and the paired-minibatch count; forget unfinished current Grams."""
        self.reset()
        self.current = {}

    def update(self, ucentred: Tensor, key=None) -> None:
        """Add one minibatch: U-centred Grams (K, n, n), paired with the reference minibatch of the same ``key``."""
        if ucentred.dim() != 3 or ucentred.shape[0] != self.n_reps:
            raise ValueError(f"expected U-centred Grams (K={self.n_reps}, n, n), got shape {tuple(ucentred.shape)}")
        key = len(self.current) if key is None else key
        stored = ucentred.detach().to(device=self.storage_device, dtype=self.storage_dtype)
        previous = self.reference.get(key)
        if previous is not None:
            # compare stored-precision copies on both sides, on the caller's device
            self._add("sums", drift_sums(previous.to(ucentred.device), stored.to(ucentred.device)))
            self._add("pairs", torch.ones(()))
        self.current[key] = stored

    def compute(self) -> Tensor:
        """Drift CKA per layer, (K,) float64; NaN when no minibatch was paired (e.g. the first probe)."""
        return cka_from_sums(self.sums[0], self.sums[1], self.sums[2])

    def end_probe(self) -> None:
        """Make this probe's Grams the reference for the next probe."""
        self.reference, self.current = self.current, {}

    def state_tensor(self) -> Tensor:
        """One float64 vector ``[sums.flatten() (3K), n_pairs]`` for an all-reduce (sum)."""
        return torch.cat([self.sums.reshape(-1), self.pairs.reshape(1)])

    def load_state_tensor(self, state: Tensor) -> None:
        """Inverse of ``state_tensor``."""
        size = 3 * self.n_reps + 1
        if state.dim() != 1 or state.numel() != size:
            raise ValueError(f"state tensor must be 1-D with {size} entries, got shape {tuple(state.shape)}")
        state = state.to(torch.float64)
        self.sums = state[:-1].reshape(3, self.n_reps).clone()
        self.pairs = state[-1].clone()

    def state_dict(self) -> dict:
        """Reference Grams (this rank's) for checkpointing."""
        return {"n_reps": self.n_reps, "previous": {key: gram.clone() for key, gram in self.reference.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore reference Grams saved by ``state_dict`` (a dict by minibatch key, or a list by call index)."""
        if int(state["n_reps"]) != self.n_reps:
            raise ValueError(f"saved drift state has {state['n_reps']} layers, this accumulator {self.n_reps}")
        previous = state["previous"]
        items = previous.items() if isinstance(previous, dict) else enumerate(previous)
        self.reference = {key: gram.to(device=self.storage_device, dtype=self.storage_dtype) for key, gram in items}

    def states(self) -> dict:
        return {"sums": self.sums, "pairs": self.pairs}
