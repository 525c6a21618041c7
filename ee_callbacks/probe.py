"""The probe core: ``run_probe(model, batches, config=...) -> ProbeRecord``. Plain PyTorch, no Lightning.

Pipeline (DESIGN §2): capture ``h_0..h_L`` by hooks → logit-lens readouts per layer, chunked over tokens → streaming
sums → one :class:`~ee_callbacks.records.ProbeRecord`. Every accumulator is a sum or a count, so the same code gives
the single-process answer under data parallelism when a ``reduce`` (an all-reduce of sums) is passed.

Per-layer metrics (a mean over probe tokens t with a next-token label; ``z_ℓ = U(N(h_ℓ))`` for ℓ < L and the model's
own logits for ℓ = L; ``p_ℓ = softmax(z_ℓ)``):

========================  ===============================================================
``agree``                 1[argmax z_ℓ = argmax z_L]
``acc``                   1[argmax z_ℓ = y_t]
``ce``                    −log p_ℓ(y_t)   (nats)
``kl``                    KL(p_L ‖ p_ℓ) = Σ_v p_L (log p_L − log p_ℓ)   (nats)
``entropy``               H(p_ℓ) = −Σ_v p_ℓ log p_ℓ   (nats)
``max_prob``              max_v p_ℓ
``margin``                top-1 minus top-2 probability of p_ℓ
``logit_cos``             cos(z_ℓ, z_L)
``logit_corr``            cos(z_ℓ − mean z_ℓ, z_L − mean z_L)  (Pearson correlation over the vocabulary)
``js_sim``                1 − JS(p_ℓ, p_L)/ln 2   (only when EAS uses it)
``hidden_cos_final``      cos(h_ℓ, h_L)
``block_influence``       BI_ℓ = 1 − cos(h_{ℓ−1}, h_ℓ)   (ShortGPT; ℓ ≥ 1)
``saturation_frac``       share of tokens whose strict saturation layer is ℓ
========================  ===============================================================

Summary, curves, CKA and the rest are documented on :func:`run_probe`.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .capture import HiddenStateCapture, model_forward
from .metrics import exits as exits_m
from .metrics import saturation as sat_m
from .metrics import similarity as sim_m
from .metrics import suitability as suit_m
from .model_parts import ModelParts, find_model_parts, model_summary, unwrap_model
from .records import ProbeRecord

__all__ = ["ProbeConfig", "run_probe", "prepare_batches", "METRIC_FAMILIES", "EAS_SIMILARITIES"]

METRIC_FAMILIES = ("lens", "saturation", "exits", "eas", "redundancy", "cka", "spec")
EAS_SIMILARITIES = ("logit_corr", "logit_cos", "agree", "js", "hidden_cos_final")
_RULES = ("max_prob", "margin", "entropy", "patience")
_DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_DEFAULT_ENTROPY_THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


# readout dtypes that work with an unembedding of a given dtype: the same precision or a narrower one
_READOUT_DTYPES_FOR = {
    torch.float64: ("float64", "float32", "bfloat16", "float16"),
    torch.float32: ("float32", "bfloat16", "float16"),
    torch.bfloat16: ("bfloat16",),
    torch.float16: ("float16",),
}


def check_readout_dtype(readout_dtype: str, weight_dtype: torch.dtype) -> None:
    """Reject a readout dtype the model's unembedding cannot run in, naming the ones it can."""
    allowed = _READOUT_DTYPES_FOR.get(weight_dtype)
    if allowed is not None and readout_dtype not in allowed:
        raise ValueError(
            f"ProbeConfig(dtype={readout_dtype!r}) cannot read out this model: its unembedding is "
            f"{str(weight_dtype).replace('torch.', '')}; allowed for this model: {list(allowed)} (or cast the model)"
        )


def _default_thresholds() -> dict:
    return {
        "max_prob": list(_DEFAULT_THRESHOLDS),
        "margin": list(_DEFAULT_THRESHOLDS),
        "entropy": list(_DEFAULT_ENTROPY_THRESHOLDS),
    }


@dataclass
class ProbeConfig:
    """What the probe computes and how.

    Attributes:
        metrics: metric families to compute, a subset of ``METRIC_FAMILIES``
            (lens, saturation, exits, eas, redundancy, cka, spec).
        thresholds: per confidence rule, the thresholds λ to simulate: ``max_prob ≥ λ``, ``margin ≥ λ`` and
            ``entropy/ln V ≤ λ`` (entropy is normalised by its maximum so every λ lies in [0, 1]).
        patience: PABEE patience values k (exit once the top-1 has been unchanged for k consecutive layers).
        angular_n: block distances n for the angular distance d(ℓ, ℓ+n).
        eas_alpha: α of EAS = mean_ℓ S_ℓ^α · w_ℓ^(1−α), in [0, 1].
        eas_similarity: S_ℓ: one of ``EAS_SIMILARITIES`` (default the centred logit correlation).
        chunk_tokens: tokens per readout chunk and per forward micro-batch: peak memory ~ chunk_tokens × V.
        dtype: dtype of the readout matmul and softmax statistics (sums are kept in float64).
        cka_batch_tokens: tokens per CKA minibatch (taken evenly spaced from one probe batch).
        cka_max_batches: CKA uses the first this-many probe batches (bounds the drift reference memory).
        consistency_levels: the levels at which the largest skip per rule is reported.
        static_tolerance: relative accuracy loss allowed by the static exit (0.05 = 5 %).
        spec_draft_lengths: draft lengths k tried by the self-speculative estimate.
        min_exit_layer: the shallowest block after which a token may exit (1: at least one block runs).
        max_tokens: cap on probe tokens (None: all).
    """

    metrics: tuple = METRIC_FAMILIES
    thresholds: dict = field(default_factory=_default_thresholds)
    patience: tuple = (1, 2, 3)
    angular_n: tuple = (1, 2, 4)
    eas_alpha: float = 0.5
    eas_similarity: str = "logit_corr"
    chunk_tokens: int = 2048
    dtype: str = "float32"
    cka_batch_tokens: int = 256
    cka_max_batches: int = 4
    consistency_levels: tuple = (0.99, 0.95)
    static_tolerance: float = 0.05
    spec_draft_lengths: tuple = (1, 2, 3, 4, 5, 6, 7, 8)
    min_exit_layer: int = 1
    max_tokens: Optional[int] = None

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        unknown = sorted(set(self.metrics) - set(METRIC_FAMILIES))
        if unknown:
            raise ValueError(f"unknown metric families {unknown}; allowed: {list(METRIC_FAMILIES)}")
        thresholds = dict(self.thresholds or {})
        unknown = sorted(set(thresholds) - {"max_prob", "margin", "entropy"})
        if unknown:
            raise ValueError(f"unknown exit rules in thresholds: {unknown}; allowed: ['max_prob', 'margin', 'entropy']")
        for rule, values in thresholds.items():
            values = [float(v) for v in values]
            bad = [v for v in values if not (0.0 <= v <= 1.0) or math.isnan(v)]
            if bad:
                raise ValueError(f"thresholds[{rule!r}] has values outside [0, 1]: {bad}")
            thresholds[rule] = sorted(set(values))
        self.thresholds = thresholds
        self.patience = tuple(int(k) for k in self.patience)
        if any(k < 1 for k in self.patience):
            raise ValueError(f"patience values must be integers ≥ 1, got {list(self.patience)}")
        self.angular_n = tuple(int(n) for n in self.angular_n)
        if any(n < 1 for n in self.angular_n):
            raise ValueError(f"angular_n values must be integers ≥ 1, got {list(self.angular_n)}")
        if not (0.0 <= float(self.eas_alpha) <= 1.0):
            raise ValueError(f"eas_alpha must lie in [0, 1], got {self.eas_alpha}")
        self.eas_alpha = float(self.eas_alpha)
        if self.eas_similarity not in EAS_SIMILARITIES:
            raise ValueError(f"eas_similarity must be one of {list(EAS_SIMILARITIES)}, got {self.eas_similarity!r}")
        if int(self.chunk_tokens) < 1:
            raise ValueError(f"chunk_tokens must be a positive integer, got {self.chunk_tokens}")
        self.chunk_tokens = int(self.chunk_tokens)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if int(self.cka_batch_tokens) < 4:
            raise ValueError(f"cka_batch_tokens must be ≥ 4 (the unbiased HSIC needs n ≥ 4), got {self.cka_batch_tokens}")
        if isinstance(self.cka_max_batches, bool) or int(self.cka_max_batches) != self.cka_max_batches \
                or int(self.cka_max_batches) < 1:
            raise ValueError(f"cka_max_batches must be an integer ≥ 1 (leave 'cka' out of metrics to turn CKA off), "
                             f"got {self.cka_max_batches!r}")
        self.cka_max_batches = int(self.cka_max_batches)
        self.spec_draft_lengths = tuple(self.spec_draft_lengths)
        if not self.spec_draft_lengths or any(isinstance(k, bool) or int(k) != k or int(k) < 1
                                              for k in self.spec_draft_lengths):
            raise ValueError(f"spec_draft_lengths must be integers ≥ 1 (draft tokens per cycle), e.g. (1, 2, 4), got "
                             f"{list(self.spec_draft_lengths)}")
        self.spec_draft_lengths = tuple(int(k) for k in self.spec_draft_lengths)
        self.consistency_levels = tuple(float(c) for c in self.consistency_levels)
        if any(not 0.0 <= c <= 1.0 for c in self.consistency_levels):
            raise ValueError(f"consistency_levels must lie in [0, 1], got {list(self.consistency_levels)}")
        if not 0.0 <= float(self.static_tolerance) < 1.0:
            raise ValueError(f"static_tolerance must lie in [0, 1), got {self.static_tolerance}")
        if int(self.min_exit_layer) < 0:
            raise ValueError(f"min_exit_layer must be ≥ 0, got {self.min_exit_layer}")
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be a positive integer or None, got {self.max_tokens}")

    @classmethod
    def from_any(cls, config) -> "ProbeConfig":
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if hasattr(config, "items"):
            data = dict(config.items())
            for key in ("metrics", "patience", "angular_n", "consistency_levels", "spec_draft_lengths"):
                if key in data and data[key] is not None:
                    data[key] = tuple(data[key])
            if "thresholds" in data and data["thresholds"] is not None:
                merged = _default_thresholds()
                merged.update({k: list(v) for k, v in dict(data["thresholds"]).items()})
                data["thresholds"] = merged
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(data) - known)
            if unknown:
                raise ValueError(f"unknown ProbeConfig fields {unknown}; allowed: {sorted(known)}")
            return cls(**data)
        raise TypeError(f"config must be a ProbeConfig or a mapping, got {type(config).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# input handling


def _unpack(batch) -> tuple:
    """(input_ids, attention_mask or None, labels or None) from a tensor, a tuple or a dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        if "input_ids" not in batch:
            raise ValueError(f"a probe batch dict needs 'input_ids'; got keys {list(batch.keys())}")
        return batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None, None
    raise TypeError(
        f"probe batches must be LongTensors (B, T) or dicts with 'input_ids'; got {type(batch).__name__}"
    )


def prepare_batches(batches, vocab_size: Optional[int] = None) -> list:
    """Validate probe batches once (clear errors up front) and return them as a list of dicts.

    Checks: at least one batch; integer ids of shape (B, T) with T ≥ 2; ids within ``[0, vocab_size)``; at least
    one position with a next-token label. Rows that are entirely padding are allowed (they contribute nothing).
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    out = []
    total = 0
    for i, batch in enumerate(batches):
        ids, mask, labels = _unpack(batch)
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"probe batch {i}: input_ids must be an integer tensor, got {getattr(ids, 'dtype', ids)}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None else None
            labels = labels.unsqueeze(0) if labels is not None else None
        if ids.dim() != 2:
            raise ValueError(f"probe batch {i}: input_ids must have shape (B, T), got {tuple(ids.shape)}")
        if ids.shape[1] < 2:
            raise ValueError(
                f"probe batch {i}: sequences of length {ids.shape[1]} have no next-token label; use seq_len ≥ 2"
            )
        ids = ids.long()
        if ids.numel() and vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"probe batch {i}: token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's "
                f"vocabulary has {vocab_size} entries; the probe data was tokenised for another model"
            )
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"probe batch {i}: attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
        if labels is not None and labels.shape != ids.shape:
            raise ValueError(f"probe batch {i}: labels shape {tuple(labels.shape)} != input_ids {tuple(ids.shape)}")
        valid = _valid_positions(ids, mask, labels)[0]
        total += int(valid.sum())
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "valid": valid})
    if not out:
        raise ValueError("the probe set is empty: give at least one batch of token ids")
    if total == 0:
        raise ValueError("the probe set has no position with a next-token label (all padding or all ignored)")
    return out


def _valid_positions(ids, mask, labels):
    """(valid (B, T) bool, targets (B, T) long): position t is valid when token t+1 is a real label."""
    target = labels if labels is not None else ids
    target = torch.roll(target, shifts=-1, dims=1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    if mask is not None:
        m = mask.bool()
        valid &= m & torch.roll(m, shifts=-1, dims=1)
    if labels is not None:
        valid &= target != -100
    return valid, target


# --------------------------------------------------------------------------------------------------------------------
# per-chunk statistics


class _Workspace:
    """Reusable (rows, V) float buffers for the readouts of one probe.

    On CPU a fresh (chunk × V) tensor costs page faults as slow as the operation that fills it, so the logits and the
    softmax of every layer land in the same two buffers (and a third for the final layer's distribution when
    vocabulary-space comparisons need it). They live for one ``run_probe`` call: peak ≈ a few × chunk_tokens × V.
    """

    def __init__(self):
        self.buffers: dict = {}

    def get(self, name: str, n: int, V: int, dtype: torch.dtype, device) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < n or buf.shape[1] != V or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(name, None)
            buf = torch.empty(n, V, dtype=dtype, device=device)
            self.buffers[name] = buf
        return buf[:n]


def _softmax_into(z: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(z) over the last dim, written into ``out`` when given (falls back to a fresh tensor)."""
    if out is not None:
        try:
            return torch.ops.aten._softmax.out(z, -1, False, out=out)
        except (RuntimeError, AttributeError, NotImplementedError):  # pragma: no cover - op missing in this build
            pass
    return torch.softmax(z, dim=-1)


_TOP2_BLOCK = 64


def _top2(z: torch.Tensor):
    """(largest value, its index, second-largest value or None when V = 1) per row of ``z`` (n, V).

    One pass over the logits: the maxima of blocks of ``_TOP2_BLOCK`` columns (a vectorised ``amax``, about 3×
    faster on CPU than ``topk`` or ``max`` with indices over the whole row), then the winning block is searched on
    its own. The index is the first maximal one (as ``argmax``); values are exact (no arithmetic). Small
    vocabularies use ``topk``.
    """
    n, V = z.shape
    S = _TOP2_BLOCK
    if V < 4 * S or n == 0 or z.stride(-1) != 1:
        top_v, top_i = z.topk(2 if V > 1 else 1, dim=-1)
        return top_v[:, 0], top_i[:, 0], (top_v[:, 1] if V > 1 else None)
    B = V // S
    bmax = z[:, : B * S].unflatten(1, (B, S)).amax(dim=-1)  # (n, B)
    if B * S < V:
        bmax = torch.cat([bmax, z[:, B * S :].amax(dim=-1, keepdim=True)], dim=1)
    _, block = bmax.max(dim=-1)
    cols = block[:, None] * S + torch.arange(S, device=z.device)
    inside = cols < V
    vals = z.gather(1, cols.clamp_max(V - 1)).masked_fill_(~inside, float("-inf"))
    v1, local = vals.max(dim=-1)
    i1 = block * S + local
    second_inside = vals.scatter_(1, local[:, None], float("-inf")).amax(dim=-1)
    second_outside = bmax.scatter_(1, block[:, None], float("-inf")).amax(dim=-1)
    return v1, i1, torch.maximum(second_inside, second_outside)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij b_ij per row (small (n, d) operands only: it materialises the product)."""
    return torch.linalg.vecdot(a, b)


class _LinearLens:
    """The logit lens of a model whose unembedding is a plain ``nn.Linear``: ``z = s·(W N(h) + b)``.

    Being affine, the readout lets the probe (1) write *centred* logits ``z − mean_v z`` straight out of the matmul
    (with the centred unembedding ``W − w̄``, ``w̄`` the mean unembedding row, or ``addmm`` subtracting the per-token
    mean ``w̄·N(h)``), so the centred norm needs no variance pass and every shift-invariant statistic is computed
    away from a large shared offset; the mean itself is ``s·(w̄·N(h) + b̄)``; and (2) take the dot products of every
    layer's logits with the final layer's distribution and centred logits in model space:
    ``Σ_v z_v a_v = s·(N(h)·(Wᵀa) + b·a)`` with ``Wᵀa`` computed once per chunk (two (chunk × V) @ (V × d) matmuls)
    instead of two passes over (chunk × V) per layer. The second pays off when the number of layers is large
    against d/64 (see ``dspace``).
    """

    def __init__(self, parts: ModelParts, n_layers: int, chunk_tokens: int = 0):
        unembed = parts.unembed
        self.parts = parts
        self.W = unembed.weight.detach()
        self.b = unembed.bias.detach() if unembed.bias is not None else None
        self.scale = float(parts.logit_scale) if parts.logit_scale is not None else None
        self.w_mean = self.W.mean(dim=0)
        # the bias enters centred (b − b̄) so that a large shared offset never meets the centred logits' rounding
        self.b_mean = self.b.mean() if self.b is not None else None
        self.b_centred = self.b - self.b_mean if self.b is not None else None
        # a centred copy W − w̄ (as large as the unembedding; kept when that is at most one chunk of logits) makes the
        # matmul write centred logits directly; otherwise addmm subtracts the mean (one more write pass per layer)
        self.W_centred = self.W - self.w_mean if self.W.shape[1] <= chunk_tokens else None
        d = self.W.shape[1]
        # model-space dots cost 2 matmuls per chunk against 2 vocabulary passes per layer: a pass over (chunk × V)
        # costs about 64/d of the readout matmul on CPUs and GPUs alike (memory- against compute-bound)
        self.dspace = n_layers * _DSPACE_LAYERS_PER_WIDTH >= d

    @classmethod
    def of(cls, parts: ModelParts, rdtype: torch.dtype, n_layers: int,
           chunk_tokens: int = 0) -> Optional["_LinearLens"]:
        unembed = parts.unembed
        if type(unembed) is not nn.Linear or parts.logit_softcap is not None:
            return None
        if unembed._forward_hooks or unembed._forward_pre_hooks:
            return None
        from torch.nn.modules import module as _module

        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        weight = unembed.weight
        if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype != rdtype or weight.dim() != 2:
            return None
        if rdtype not in (torch.float32, torch.float64):
            return None
        return cls(parts, n_layers, chunk_tokens)

    def centred_logits(self, h: torch.Tensor, out: torch.Tensor):
        """(centred logits written into ``out``, their per-token mean, the normed hidden state)."""
        nh = self.parts.normed(h)
        mu = nh @ self.w_mean
        if self.W_centred is not None:
            zc = torch.mm(nh, self.W_centred.t(), out=out)
        else:
            zc = torch.addmm(-mu[:, None], nh, self.W.t(), out=out)
        if self.b is not None:
            zc.add_(self.b_centred)
            mu = mu + self.b_mean
        if self.scale is not None:
            zc.mul_(self.scale)
            mu = mu * self.scale
        return zc, mu, nh

    def project(self, a: torch.Tensor, total: float):
        """(Wᵀa per token (n, d), b·a per token or None) for rows a (n, V) of the final layer's chunk summing to
        ``total`` (1 for p_L, 0 for the centred logits): b·a = (b − b̄)·a + b̄·total."""
        if self.b is None:
            return a @ self.W, None
        return a @ self.W, a @ self.b_centred + self.b_mean * total

    def dots(self, nh: torch.Tensor, final: "_FinalChunk"):
        """(Σ_v p_L z, Σ_v zc_L z) per token from the normed hidden states, without the (n, V) logits."""
        a_p = _rowdot(nh, final.Wp)
        a_zc = _rowdot(nh, final.Wzc)
        if final.bp is not None:
            a_p = a_p + final.bp
            a_zc = a_zc + final.bzc
        if self.scale is not None:
            a_p = a_p * self.scale
            a_zc = a_zc * self.scale
        return a_p, a_zc


_DSPACE_LAYERS_PER_WIDTH = 64


class _FinalChunk:
    """What every layer's readout is compared against: the final layer's logits of one token chunk.

    ``z_final`` (n, V) is owned by the probe and centred in place. Kept per token: top-1, target, lse, the final
    negative entropy Σ p_L log p_L, ‖z_L‖, ‖z_L − mean‖ and the mean; for comparisons in vocabulary space
    (``keep_vocab``: exit heads, JS, non-affine readouts) also ``p`` = p_L and ``zc`` = centred z_L; for an affine
    lens in model space ``Wp`` = Wᵀp_L and ``Wzc`` = Wᵀzc_L (and their bias terms). ``stats`` are the final layer's
    own per-token statistics.
    """

    def __init__(self, z_final: torch.Tensor, targets: torch.Tensor, *, ws: Optional[_Workspace] = None,
                 lens: Optional[_LinearLens] = None, keep_vocab: bool = True, want_js: bool = False):
        z = z_final
        n, V = z.shape
        self.targets = targets
        self.V = V
        _, top1, v2 = _top2(z)  # on the model's own logits, before any rounding by the centring
        self.top1 = top1
        self.mean = z.mean(dim=-1)
        zc = z.sub_(self.mean[:, None])
        self.zc_norm = torch.linalg.vector_norm(zc, dim=-1)
        self.norm = (self.zc_norm.square() + V * self.mean.square()).sqrt()  # ‖z‖² = ‖z − mean‖² + V·mean²
        buf = ws.get("final_p" if keep_vocab else "p", n, V, zc.dtype, zc.device) if ws is not None else None
        p = _softmax_into(zc, buf)
        p1 = p.gather(1, top1[:, None]).squeeze(1)
        lse_c = zc.gather(1, top1[:, None]).squeeze(1) - p1.log()  # p1 ≥ 1/V: a well-conditioned log
        p2 = (v2 - self.mean - lse_c).exp() if v2 is not None else torch.zeros_like(p1)
        self.lse_c = lse_c
        self.lse = lse_c + self.mean
        ce = lse_c - zc.gather(1, targets[:, None]).squeeze(1)
        self.Wp = self.Wzc = self.bp = self.bzc = None
        if lens is not None and lens.dspace:
            self.Wp, self.bp = lens.project(p, 1.0)
            self.Wzc, self.bzc = lens.project(zc, 0.0)
        if keep_vocab:
            tmp = ws.get("z", n, V, zc.dtype, zc.device) if ws is not None else None
            pz = (torch.mul(p, zc, out=tmp) if tmp is not None else p * zc).sum(dim=-1)
            self.p, self.zc = p, zc
        else:
            pz = p.mul_(zc).sum(dim=-1)  # p is not needed any more
            self.p = self.zc = None
        self.neg_entropy = pz - lse_c  # Σ p_L log p_L
        self._logp = (zc - lse_c[:, None]) if (want_js and keep_vocab) else None
        self.stats = {
            "top1": top1,
            "agree": torch.ones_like(top1, dtype=torch.bool),
            "acc": top1 == targets,
            "ce": ce,
            "kl": torch.zeros_like(ce),  # exact by definition, not up to rounding
            "entropy": (-self.neg_entropy).clamp_min(0.0),
            "max_prob": p1,
            "margin": p1 - p2,
            "logit_cos": torch.ones_like(ce),
            "logit_corr": torch.ones_like(ce),
        }
        if want_js:
            self.stats["js_sim"] = torch.ones_like(ce)

    @property
    def logp(self) -> torch.Tensor:
        if self._logp is None:
            if self.zc is None:
                raise RuntimeError("the final chunk kept no vocabulary-space tensors (keep_vocab=False)")
            self._logp = self.zc - self.lse_c[:, None]
        return self._logp


def _centred_stats(zc: torch.Tensor, mu: torch.Tensor, final: _FinalChunk, P: Optional[torch.Tensor],
                   dots=None, want_js: bool = False) -> dict:
    """Per-token statistics of one layer from its centred logits ``zc`` = z − mu (n, V), which are overwritten.

    Passes over (n, V): top-2, softmax (into ``P``), ‖zc‖, Σ p·zc (in place in P), and — without ``dots`` from an
    affine lens — Σ p_L·zc and Σ zc_L·zc (into P again). Every statistic is shift-invariant except ``logit_cos``,
    which adds the means back: Σ z·z_L = Σ zc·zc_L + V·mu·mu_L and ‖z‖² = ‖zc‖² + V·mu².
    """
    V = zc.shape[-1]
    v1, top1, v2 = _top2(zc)
    p = _softmax_into(zc, P)
    p1 = p.gather(1, top1[:, None]).squeeze(1)
    lse_c = v1 - p1.log()  # p1 ≥ 1/V: a well-conditioned log
    p2 = (v2 - lse_c).exp() if v2 is not None else torch.zeros_like(p1)
    ce = lse_c - zc.gather(1, final.targets[:, None]).squeeze(1)
    sq = torch.linalg.vector_norm(zc, dim=-1).square()
    js = suit_m.js_similarity(zc - lse_c[:, None], final.logp) if want_js else None
    pz = p.mul_(zc).sum(dim=-1)  # Σ p·zc; p is spent
    if dots is None:
        p_final_z = torch.mul(final.p, zc, out=p).sum(dim=-1)  # Σ p_L·zc
        zc_dot = torch.mul(final.zc, zc, out=p).sum(dim=-1)  # Σ zc_L·zc (= Σ zc_L·z)
    else:
        p_final_z = dots[0] - mu  # Σ p_L·z − mu
        zc_dot = dots[1]
    # KL(p_L ‖ p_ℓ) = Σ p_L log p_L − Σ p_L (z − lse) ; the shift mu cancels
    kl = final.neg_entropy - p_final_z + lse_c
    entropy = lse_c - pz
    norm = (sq + V * mu.square()).sqrt()
    logit_cos = (zc_dot + V * mu * final.mean) / (norm * final.norm)
    logit_corr = zc_dot / (sq.sqrt() * final.zc_norm)
    out = {
        "top1": top1,
        "agree": top1 == final.top1,
        "acc": top1 == final.targets,
        "ce": ce,
        "kl": kl.clamp_min(0.0),
        "entropy": entropy.clamp_min(0.0),
        "max_prob": p1,
        "margin": p1 - p2,
        "logit_cos": logit_cos,
        "logit_corr": logit_corr,
    }
    if want_js:
        out["js_sim"] = js
    return out


def _lens_token_stats(z: torch.Tensor, final: _FinalChunk, want_js: bool, *, owned: bool = False,
                      P: Optional[torch.Tensor] = None) -> dict:
    """Per-token statistics of one layer's logits ``z`` (N, V) against the final layer (kept in vocabulary space).

    ``owned``: ``z`` may be overwritten (it is centred in place); otherwise it is copied first.
    """
    zc = z if owned else z.clone()
    mu = zc.mean(dim=-1)
    zc.sub_(mu[:, None])
    return _centred_stats(zc, mu, final, P, None, want_js)


_LENS_KEYS = ("agree", "acc", "ce", "kl", "entropy", "max_prob", "margin", "logit_cos", "logit_corr")
_HEAD_KEYS = ("agree", "acc", "ce", "kl", "max_prob", "logit_corr")


class _Sums:
    """Named float64 sums, kept in insertion order so a distributed all-reduce visits them identically."""

    def __init__(self):
        self.values: dict = {}

    def add(self, key, value: torch.Tensor):
        value = value.detach().to(torch.float64)
        if key in self.values:
            self.values[key] = self.values[key] + value
        else:
            self.values[key] = value.clone()

    def get(self, key, default=None):
        return self.values.get(key, default)


# --------------------------------------------------------------------------------------------------------------------
# the probe


@contextlib.contextmanager
def _isolated(model: nn.Module):
    """Eval mode, no grad and autocast off for the probe; modes and RNG states restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        model.eval()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if device_type == "cuda" and not torch.cuda.is_available():
                    continue
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _micro_batches(ids, mask, labels, rows: int):
    for start in range(0, ids.shape[0], rows):
        sl = slice(start, start + rows)
        yield ids[sl], (mask[sl] if mask is not None else None), (labels[sl] if labels is not None else None), start


def _cka_selection(valid: torch.Tensor, n_max: int) -> torch.Tensor:
    """Evenly spaced subset (at most n_max) of a batch's valid positions, as a (B, T) bool mask."""
    flat = valid.reshape(-1).nonzero().squeeze(1)
    chosen = torch.zeros_like(valid.reshape(-1))
    if flat.numel() > n_max:
        pick = torch.linspace(0, flat.numel() - 1, n_max).round().long()
        flat = flat[pick]
    chosen[flat] = True
    return chosen.reshape(valid.shape)


def run_probe(
    model: nn.Module,
    batches,
    *,
    config=None,
    parts: Optional[ModelParts] = None,
    step: int = 0,
    epoch: int = 0,
    source: str = "train",
    checkpoint: Optional[str] = None,
    set_name: str = "default",
    data_name: str = "",
    seed: Optional[int] = None,
    readouts: Optional[dict] = None,
    previous=None,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    shard: tuple = (0, 1),
    forward_module=None,
    readout_context: Optional[Callable[[], "contextlib.AbstractContextManager"]] = None,
) -> ProbeRecord:
    """Probe every layer of ``model`` on ``batches`` and return one :class:`ProbeRecord`.

    Args:
        model: a causal LM (any ``nn.Module``; Hugging Face or one's own).
        batches: LongTensors (B, T) or dicts with ``input_ids`` and optionally ``attention_mask`` / ``labels``
            (labels aligned with the inputs as in Hugging Face; −100 ignored). Token t is scored on label t+1.
        config: :class:`ProbeConfig` or a mapping of its fields.
        parts: the model's parts; found with :func:`find_model_parts` when None.
        step, epoch, source, checkpoint, set_name, data_name, seed: copied into the record.
        readouts: extra readouts (trained exit heads), ``{kind: readout}``; each has ``layers`` (block indices) and
            ``logits(h, layer)`` (or ``confidence(h, layer)`` for a confidence classifier).
        previous: the ``state`` of the previous record of the same probe set (CKA drift reference).
        reduce: all-reduce (sum) of a float64 tensor across ranks; identity when None.
        shard: ``(rank, world_size)``: this process probes batches ``i`` with ``i % world_size == rank`` (pass
            ``reduce`` too); CKA minibatches and the ``max_tokens`` cap follow global batch indices, so the record
            equals the single-process one.
        forward_module: what the forward passes call instead of ``model`` (under FSDP: the wrapped root, see
            :func:`ee_callbacks.distributed.probe_forward_target`); ``model`` when None.
        readout_context: a zero-argument callable returning a context manager inside which the unembedding, final
            norm and input embedding hold full parameters (FSDP: :func:`ee_callbacks.distributed.
            readout_context_factory`). Entered around every parameter read outside the forward; never around a
            forward. With it, every rank must run the same batches (``shard=(0, 1)``).

    Summary scalars (``record.summary``):

    - ``oracle_skip_strict`` = 1 − E[ℓ*]/L with ℓ*_t = min{ℓ : argmax z_k = argmax z_L ∀ k ≥ ℓ} (strict saturation);
      ``oracle_skip_lenient`` the same with the first ℓ whose top-1 matches; ``saturation_hist`` counts ℓ* per layer.
    - exit curves per rule (``curves``): for each threshold λ, the exit layer per token (L if the rule never fires),
      ``skip`` = 1 − E[exit]/L, ``consistency`` = agreement of the exit prediction with the final top-1, ``acc``;
      ``skip_at_consistency_<c>`` the largest skip with consistency ≥ c per rule.
    - ``static_exit_layer``/``static_skip_5pct``: the shallowest fixed layer whose accuracy is within 5 % (relative)
      of the final layer's, and 1 − ℓ/L.
    - ``eas`` = mean_{ℓ=1..L} S_ℓ^α · ((L − ℓ)/L)^(1−α) with S = clamp(similarity, 0, 1); ``eas_similarity``,
      ``eas_alpha`` name the choice.
    - ``spec_speedup_est``: the LayerSkip-style self-speculative estimate (see ``metrics.suitability``).
    - ``angular``: d(ℓ, ℓ+n) = E_t[arccos(cos(h_ℓ, h_{ℓ+n}))/π]; ``angular_min_<n>`` its minimum and argmin start ℓ.
    - ``cka``: linear CKA between every pair of captured layers, unbiased HSIC summed over minibatches;
      ``cka_drift`` CKA of each layer with the same layer at the previous probe (same tokens).
    """
    t_start = time.perf_counter()
    cfg = ProbeConfig.from_any(config)
    distributed = reduce is not None
    reduce = reduce or (lambda t: t)
    model_u = unwrap_model(model)
    if parts is None:
        parts = find_model_parts(model_u)
    L = parts.n_layers
    fams = set(cfg.metrics)
    has_head = parts.has_lm_head
    ctx = readout_context or contextlib.nullcontext
    vocab = None
    with ctx():  # under FSDP the weights are shards outside it
        if has_head and hasattr(parts.unembed, "weight"):
            vocab = int(parts.unembed.weight.shape[0])
            check_readout_dtype(cfg.dtype, parts.unembed.weight.dtype)
        elif has_head and getattr(getattr(model_u, "config", None), "vocab_size", None):
            vocab = int(model_u.config.vocab_size)
        emb = model_u.get_input_embeddings() if hasattr(model_u, "get_input_embeddings") else None
        input_vocab = int(emb.weight.shape[0]) if emb is not None and hasattr(emb, "weight") else vocab
    batches = prepare_batches(batches, input_vocab)
    if cfg.max_tokens is not None:  # a global cap, applied in batch order before any sharding
        room = int(cfg.max_tokens)
        for batch in batches:
            flat = batch["valid"].reshape(-1)
            keep = flat.cumsum(0) <= room
            room -= int((flat & keep).sum())
            batch["valid"] = (flat & keep).reshape(batch["valid"].shape)
    readouts = dict(readouts or {})
    device = _model_device(model_u)
    rdtype = _DTYPES[cfg.dtype]
    want_js = cfg.eas_similarity == "js" and "eas" in fams
    need_tokens = bool(fams & {"saturation", "exits", "spec"}) or bool(readouts)
    min_exit = max(int(cfg.min_exit_layer), 0)
    if not has_head:
        warnings.warn(
            "ee_callbacks: the model has no unembedding; only similarity metrics (block influence, angular "
            "distance, hidden cosine, CKA) are computed",
            RuntimeWarning,
        )

    sums = _Sums()
    token_top1: list = []  # per chunk: (L+1, n) top-1 ids of layers 0..L (row 0 may be a placeholder)
    token_conf = {"max_prob": [], "margin": [], "entropy": []}
    token_targets: list = []
    token_sequences: list = []
    head_tokens: dict = {kind: {"top1": [], "conf": []} for kind in readouts}
    has_h0 = True
    cka_layers = None
    cka_sum = None
    cka_batches = 0
    drift_cross = drift_prev_self = drift_cur_self = None
    new_grams: dict = {}
    prev_grams = previous.get("cka_grams", {}) if isinstance(previous, dict) else {}
    n_tokens = 0
    n_sequences = 0
    rows_per_forward = None
    t_forward = 0.0
    log_v = math.log(vocab) if vocab and vocab > 1 else 1.0
    nonfinite_tokens = 0
    batches_seen = 0
    batches_without_h0 = 0

    # affine logit lens (plain nn.Linear unembedding): centred logits out of the matmul, model-space dot products
    with ctx():
        lens = _LinearLens.of(parts, rdtype, L, cfg.chunk_tokens) if has_head and not want_js else None
        keep_vocab = lens is None or not lens.dspace or bool(readouts) or want_js
    ws = _Workspace()

    with _isolated(model_u):
        rank, world = int(shard[0]), int(shard[1])
        for b_index, batch in enumerate(batches):
            if b_index % world != rank:
                continue
            ids_all = batch["input_ids"]
            mask_all, labels_all = batch["attention_mask"], batch["labels"]
            valid_all = batch["valid"]
            if not bool(valid_all.any()):
                continue
            n_sequences += int(valid_all.any(dim=1).sum())
            T = ids_all.shape[1]
            rows_per_forward = max(1, cfg.chunk_tokens // T)
            do_cka = "cka" in fams and b_index < cfg.cka_max_batches
            cka_mask = _cka_selection(valid_all, cfg.cka_batch_tokens) if do_cka else None
            cka_feats: list = []
            for ids, mask, labels, row0 in _micro_batches(ids_all, mask_all, labels_all, rows_per_forward):
                valid = valid_all[row0 : row0 + ids.shape[0]]
                if not bool(valid.any()):
                    continue
                _, target = _valid_positions(ids, mask, labels)
                t0 = time.perf_counter()
                ids_d = ids.to(device)
                mask_d = mask.to(device) if mask is not None else None
                with HiddenStateCapture(parts) as cap:
                    logits = model_forward(model_u if forward_module is None else forward_module, ids_d, mask_d)
                cap.check()
                t_forward += time.perf_counter() - t0
                states = cap.states
                batches_seen += 1
                if states[0] is None:
                    has_h0 = False
                    batches_without_h0 += 1
                sel = valid.reshape(-1).to(device)
                flat_states = [s.reshape(-1, s.shape[-1])[sel] if s is not None else None for s in states]
                y = target.reshape(-1).to(device)[sel]
                # one id per probe sequence (batch, row): self-speculation is simulated along each
                rows_here = row0 + torch.arange(ids.shape[0])[:, None].expand(ids.shape)
                sequence_ids = ((b_index << 32) + rows_here).reshape(-1)[sel.cpu()]
                if cka_mask is not None:
                    csel = cka_mask[row0 : row0 + ids.shape[0]].reshape(-1).to(device)
                    cka_feats.append([s.reshape(-1, s.shape[-1])[csel] for s in states if s is not None])
                z_final_all = None
                if has_head:
                    if logits is None:
                        raise ValueError(
                            f"{type(model_u).__name__}.forward returned no logits; return a tensor, a tuple whose "
                            "first item is the logits, or an object with .logits"
                        )
                    flat_logits = logits.reshape(-1, logits.shape[-1])
                    del logits
                    n_sel = int(sel.sum())
                    if n_sel <= cfg.chunk_tokens and flat_logits.dtype == rdtype and rdtype in (torch.float32, torch.float64):
                        # one chunk: gather the scored rows straight into a reusable buffer (no fresh chunk × V copy)
                        buf = ws.get("final_z" if keep_vocab else "z", n_sel, flat_logits.shape[1], rdtype, flat_logits.device)
                        z_final_all = torch.index_select(flat_logits, 0, sel.nonzero().squeeze(1), out=buf)
                    else:
                        z_final_all = flat_logits[sel]
                    del flat_logits
                n = int(sel.sum())
                n_tokens += n
                # ---- similarity metrics on hidden states (cheap: d-dimensional)
                first = 0 if states[0] is not None else 1
                if "redundancy" in fams or "eas" in fams:
                    # cos(a, b) = a·b / (max(‖a‖, ε)·max(‖b‖, ε)) as F.cosine_similarity, each norm computed once
                    hf = [s.float() if s is not None else None for s in flat_states]
                    inv = [1.0 / torch.linalg.vector_norm(s, dim=-1).clamp_min(1e-8) if s is not None else None
                           for s in hf]

                    def _cos(a: int, b: int) -> torch.Tensor:
                        return torch.linalg.vecdot(hf[a], hf[b]) * inv[a] * inv[b]

                    for layer in range(first, L + 1):
                        sums.add(("hidden_cos_final", layer), _cos(layer, L).sum())
                        if layer >= 1 and hf[layer - 1] is not None:
                            sums.add(("block_influence", layer), (1.0 - _cos(layer - 1, layer)).sum())
                    if "redundancy" in fams:
                        for dist in cfg.angular_n:
                            for start in range(first, L - dist + 1):
                                c = _cos(start, start + dist)
                                ang = torch.arccos(c.clamp(-1.0, 1.0)) / math.pi
                                sums.add(("angular", dist, start), ang.sum())
                    del hf, inv
                if not has_head:
                    sums.add(("count",), torch.tensor(float(n)))
                    continue
                # ---- readouts, chunked over tokens (full unembedding / final norm under FSDP)
                with ctx():
                    if readout_context is not None:  # the gathered weights live only inside ctx()
                        lens = _LinearLens.of(parts, rdtype, L, cfg.chunk_tokens) if has_head and not want_js else None
                    sdtype = torch.float32 if rdtype in (torch.bfloat16, torch.float16) else rdtype
                    for c0 in range(0, n, cfg.chunk_tokens):
                        c1 = min(n, c0 + cfg.chunk_tokens)
                        zf = z_final_all[c0:c1].to(rdtype)
                        if zf.dtype != sdtype:
                            zf = zf.float()
                        if c0 == 0 and c1 == n:
                            z_final_all = None  # the only chunk: its logits die with the final statistics
                        yc = y[c0:c1]
                        nc, V = zf.shape
                        final = _FinalChunk(zf, yc, ws=ws, lens=lens, keep_vocab=keep_vocab, want_js=want_js)
                        zf = None
                        bad = ~torch.isfinite(final.lse)
                        nonfinite_tokens += int(bad.sum())
                        chunk_top1 = torch.zeros(L + 1, nc, dtype=torch.long, device=device)
                        conf = {k: torch.zeros(L + 1, nc, dtype=torch.float32, device=device) for k in token_conf}
                        for layer in range(first, L + 1):
                            if layer == L:
                                st = final.stats
                            else:
                                h = flat_states[layer][c0:c1].to(rdtype)
                                P = ws.get("p", nc, V, sdtype, device)
                                if lens is not None:
                                    zc, mu, nh = lens.centred_logits(h, ws.get("z", nc, V, sdtype, device))
                                    dots = lens.dots(nh, final) if lens.dspace else None
                                    st = _centred_stats(zc, mu, final, P, dots, want_js)
                                    del zc, nh
                                else:
                                    z = parts.readout(h)
                                    if z.dtype != sdtype:
                                        z = z.to(sdtype)
                                    st = _lens_token_stats(z, final, want_js, owned=True, P=P)
                                    del z
                            for key in _LENS_KEYS:
                                sums.add(("lens", key, layer), st[key].sum(dtype=torch.float64))
                            if want_js:
                                sums.add(("lens", "js_sim", layer), st["js_sim"].sum(dtype=torch.float64))
                            chunk_top1[layer] = st["top1"]
                            conf["max_prob"][layer] = st["max_prob"].float()
                            conf["margin"][layer] = st["margin"].float()
                            conf["entropy"][layer] = (st["entropy"] / log_v).float()
                        sums.add(("count",), torch.tensor(float(c1 - c0)))
                        if need_tokens:
                            token_top1.append(chunk_top1.cpu())
                            for k in token_conf:
                                token_conf[k].append(conf[k].cpu())
                            token_targets.append(yc.cpu())
                            token_sequences.append(sequence_ids[c0:c1])
                        for kind, head in readouts.items():
                            _head_chunk(kind, head, flat_states, c0, c1, final, rdtype, sums, head_tokens[kind], ws)
                        del final
            if cka_feats:
                feats = [torch.cat([f[k] for f in cka_feats], dim=0) for k in range(len(cka_feats[0]))]
                n_cka = feats[0].shape[0]
                if n_cka >= 4:
                    layers_here = list(range(0 if has_h0 else 1, L + 1))
                    if cka_layers is None:
                        cka_layers = layers_here
                    stacked = torch.stack([f.double() for f in feats], dim=0)
                    u = sim_m.u_centre(sim_m.gram_linear(stacked))
                    hs = sim_m.hsic_all_pairs(u)
                    cka_sum = hs if cka_sum is None else cka_sum + hs
                    cka_batches += 1
                    new_grams[b_index] = u.float().cpu()
                    prev = prev_grams.get(b_index)
                    if prev is not None and prev.shape == u.shape:
                        cross, pself, cself = sim_m.drift_sums(prev.to(u.device), u.float())
                        drift_cross = cross if drift_cross is None else drift_cross + cross
                        drift_prev_self = pself if drift_prev_self is None else drift_prev_self + pself
                        drift_cur_self = cself if drift_cur_self is None else drift_cur_self + cself

    # ---- agree on the layout across ranks (a rank may have seen no batch) --------------------------------------------
    meta = reduce(torch.tensor(
        [float(batches_seen), float(batches_without_h0), float(n_tokens), float(n_sequences)], dtype=torch.float64
    ))
    n_sequences = int(meta[3])
    if float(meta[0]) == 0 or float(meta[2]) == 0:
        raise ValueError("the probe saw no token with a next-token label")
    has_h0 = float(meta[1]) == 0
    first = 0 if has_h0 else 1
    exit_layers = list(range(max(min_exit, first), L + 1))
    if nonfinite_tokens:
        warnings.warn(
            f"ee_callbacks: {nonfinite_tokens} probe tokens have non-finite final logits; affected metrics are null",
            RuntimeWarning,
        )
    _register_layout(sums, cfg, L, first, has_head, readouts)

    # ---- token-level metrics as sums (saturation, exits, spec) -----------------------------------------------------
    layers_ids = torch.tensor(exit_layers, dtype=torch.long)
    if has_head and need_tokens:
        K = len(exit_layers)
        if token_top1:
            top1 = torch.cat(token_top1, dim=1)[exit_layers]
            targets = torch.cat(token_targets)
            sequences = torch.cat(token_sequences)
            conf = {k: torch.cat(v, dim=1)[exit_layers] for k, v in token_conf.items()}
        else:
            top1 = torch.zeros(K, 0, dtype=torch.long)
            targets = sequences = torch.zeros(0, dtype=torch.long)
            conf = {k: torch.zeros(K, 0) for k in token_conf}
        # a token with a non-finite readout at any layer has no defined exit or saturation layer: leave it out
        finite = torch.ones(top1.shape[1], dtype=torch.bool)
        for values in conf.values():
            finite &= torch.isfinite(values).all(dim=0)
        if not bool(finite.all()):
            top1, targets, sequences = top1[:, finite], targets[finite], sequences[finite]
            conf = {k: v[:, finite] for k, v in conf.items()}
        sums.add(("sat", "n"), torch.tensor(float(finite.sum()), dtype=torch.float64))
        spec_rows = [row for row, layer in enumerate(exit_layers) if 1 <= layer < L]
        if "spec" in fams and spec_rows:
            accept = top1[spec_rows] == top1[-1]
            sums.add(("spec", "cost"), suit_m.spec_cycle_costs(
                accept, sequences, layers_ids[spec_rows], L, cfg.spec_draft_lengths))
        if "saturation" in fams:
            strict, lenient = sat_m.saturation_layers(top1, layers_ids)
            sums.add(("sat", "strict_sum"), strict.double().sum())
            sums.add(("sat", "lenient_sum"), lenient.double().sum())
            sums.add(("sat", "hist_strict"), sat_m.saturation_histogram(strict, L).double())
            sums.add(("sat", "hist_lenient"), sat_m.saturation_histogram(lenient, L).double())
        if "exits" in fams:
            for rule in ("max_prob", "margin", "entropy"):
                thr = cfg.thresholds.get(rule)
                if not thr:
                    continue
                thr_t = torch.tensor(thr, dtype=torch.float32)
                ex = exits_m.threshold_exit_layers(
                    conf[rule], thr_t, layers_ids, higher_is_confident=(rule != "entropy")
                )
                _add_outcomes(sums, ("exit", rule), exits_m.exit_outcome_sums(ex, top1, targets, layers_ids))
            for k in cfg.patience:
                ex = exits_m.patience_exit_layers(top1, k, layers_ids)
                _add_outcomes(sums, ("exit", "patience", k), exits_m.exit_outcome_sums(ex, top1, targets, layers_ids))
        for kind, store in head_tokens.items():
            _head_token_sums(kind, readouts[kind], store, top1, targets, layers_ids, cfg, sums, finite)

    # ---- one all-reduce of every sum, in a fixed order ---------------------------------------------------------------
    keys = sorted(sums.values, key=repr)
    if keys:
        flat = torch.cat([sums.values[k].reshape(-1).cpu() for k in keys])
        flat = reduce(flat)
        offset = 0
        for k in keys:
            numel = sums.values[k].numel()
            sums.values[k] = flat[offset : offset + numel].reshape(sums.values[k].shape)
            offset += numel
    if "cka" in fams:
        K = (L + 1) if has_h0 else L
        packed = torch.zeros(K * K + 1 + 3 * K, dtype=torch.float64)
        if cka_sum is not None and cka_sum.shape == (K, K):
            packed[: K * K] = cka_sum.reshape(-1).cpu()
            packed[K * K] = cka_batches
        if drift_cross is not None and drift_cross.numel() == K:
            packed[K * K + 1 : K * K + 1 + K] = drift_cross.cpu()
            packed[K * K + 1 + K : K * K + 1 + 2 * K] = drift_prev_self.cpu()
            packed[K * K + 1 + 2 * K :] = drift_cur_self.cpu()
        packed = reduce(packed)
        cka_sum = packed[: K * K].reshape(K, K) if packed[K * K] > 0 else None
        if packed[K * K + 1 :].abs().sum() > 0:
            drift_cross = packed[K * K + 1 : K * K + 1 + K]
            drift_prev_self = packed[K * K + 1 + K : K * K + 1 + 2 * K]
            drift_cur_self = packed[K * K + 1 + 2 * K :]
        else:
            drift_cross = None
        if cka_layers is None:
            cka_layers = list(range(0 if has_h0 else 1, L + 1))

    count = float(sums.get(("count",), torch.tensor(0.0)))
    with ctx():
        record = _finalize(
            cfg, parts, model_u, sums, count, L, has_h0, has_head, exit_layers, readouts,
            cka_sum, cka_layers, drift_cross, drift_prev_self, drift_cur_self,
        )
    record.step, record.epoch, record.source, record.checkpoint, record.set = int(step), int(epoch), source, checkpoint, set_name
    record.probe = {
        "tokens": int(count),
        "sequences": n_sequences,
        "seed": seed,
        "data": data_name,
        "batches": len(batches),
        "nonfinite_tokens": nonfinite_tokens,
    }
    record.timing = {"probe_s": time.perf_counter() - t_start, "forward_s": t_forward}
    record.config = cfg.to_dict()
    record.state = {"cka_grams": new_grams}
    return record


def _add_outcomes(sums: _Sums, key: tuple, outcome: dict):
    for name in ("exit_sum", "consistent_sum", "correct_sum", "count"):
        sums.add(key + (name,), torch.as_tensor(outcome[name]).double())


def _outcome_curve(sums: _Sums, key: tuple, thresholds, L: int) -> list:
    got = {name: sums.get(key + (name,)) for name in ("exit_sum", "consistent_sum", "correct_sum", "count")}
    if got["count"] is None:
        return []
    return exits_m.finalize_curve(got, thresholds, L)


def _head_chunk(kind, head, flat_states, c0, c1, final, rdtype, sums, store, ws=None):
    """Per-layer statistics of a trained exit head on one token chunk."""
    layers = list(head.layers)
    conf_rows, top1_rows = {}, {}
    for layer in layers:
        h = flat_states[layer][c0:c1].to(rdtype)
        if getattr(head, "kind", "logits") == "confidence":
            prob = head.confidence(h, layer).float().reshape(-1)
            conf_rows[layer] = prob.cpu()
            # the confidence head's calibration target: does layer ℓ's logit-lens top-1 equal the final top-1?
            continue
        z = head.logits(h, layer).float()
        # our own readouts return fresh logits that may be centred in place; anyone else's are copied first
        P = ws.get("p", z.shape[0], z.shape[1], z.dtype, z.device) if ws is not None else None
        st = _lens_token_stats(z, final, False, owned=type(head).__module__.startswith("ee_callbacks."), P=P)
        for key in _HEAD_KEYS:
            sums.add(("head", kind, key, layer), st[key].sum(dtype=torch.float64))
        sums.add(("head", kind, "count", layer), torch.tensor(float(c1 - c0)))
        top1_rows[layer] = st["top1"].cpu()
        conf_rows[layer] = st["max_prob"].float().cpu()
    store["top1"].append(top1_rows)
    store["conf"].append(conf_rows)


def _head_token_sums(kind, head, store, top1_lens, targets, layers_ids, cfg, sums, finite):
    """Exit curve and oracle skip of one head; layers without a head fall back to the logit lens' top-1.

    ``finite`` marks the tokens the logit lens kept (finite at every layer); the head drops the others too.
    """
    layers_list = layers_ids.tolist()
    n = top1_lens.shape[1]
    is_conf = getattr(head, "kind", "logits") == "confidence"
    conf = torch.zeros(len(layers_list), n)
    top1 = top1_lens.clone()
    head_layers = set(int(l) for l in head.layers)
    for row, layer in enumerate(layers_list):
        if layer in head_layers and store["conf"]:
            conf[row] = torch.cat([c[layer] for c in store["conf"]])[finite]
            if not is_conf:
                top1[row] = torch.cat([t[layer] for t in store["top1"]])[finite]
    if n:
        conf[-1] = 1.0  # the final layer always exits
    thr = torch.tensor(cfg.thresholds.get("max_prob", list(_DEFAULT_THRESHOLDS)), dtype=torch.float32)
    ex = exits_m.threshold_exit_layers(conf, thr, layers_ids, higher_is_confident=True)
    _add_outcomes(sums, ("headexit", kind), exits_m.exit_outcome_sums(ex, top1, targets, layers_ids))
    if not is_conf:
        strict, lenient = sat_m.saturation_layers(top1, layers_ids)
        sums.add(("headsat", kind, "strict_sum"), strict.double().sum())
        sums.add(("headsat", kind, "lenient_sum"), lenient.double().sum())
    else:
        # how the classifier's confidence separates tokens whose logit-lens top-1 already equals the final top-1
        agree = (top1_lens == top1_lens[-1]).double()
        for row, layer in enumerate(layers_list):
            if layer in head_layers:
                sums.add(("headconf", kind, "agree_conf", layer), (conf[row].double() * agree[row]).sum())
                sums.add(("headconf", kind, "agree_n", layer), agree[row].sum())
                sums.add(("headconf", kind, "conf_sum", layer), conf[row].double().sum())
                sums.add(("headconf", kind, "n", layer), torch.tensor(float(n), dtype=torch.float64))


def _register_layout(sums: _Sums, cfg, L: int, first: int, has_head: bool, readouts: dict):
    """Make sure every rank holds the same keys (zeros where it saw nothing), so the all-reduce lines up."""
    zero = torch.zeros((), dtype=torch.float64)
    sums.add(("count",), zero)
    fams = set(cfg.metrics)
    if "redundancy" in fams or "eas" in fams:
        for layer in range(first, L + 1):
            sums.add(("hidden_cos_final", layer), zero)
            if layer >= first + 1:
                sums.add(("block_influence", layer), zero)
    if "redundancy" in fams:
        for dist in cfg.angular_n:
            for start in range(first, L - dist + 1):
                sums.add(("angular", dist, start), zero)
    if has_head:
        for layer in range(first, L + 1):
            for key in _LENS_KEYS:
                sums.add(("lens", key, layer), zero)
            if cfg.eas_similarity == "js" and "eas" in fams:
                sums.add(("lens", "js_sim", layer), zero)
        for kind, head in readouts.items():
            if getattr(head, "kind", "logits") != "confidence":
                for layer in head.layers:
                    for key in _HEAD_KEYS + ("count",):
                        sums.add(("head", kind, key, int(layer)), zero)


def _num(x) -> Optional[float]:
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def _finalize(cfg, parts, model_u, sums, count, L, has_h0, has_head, exit_layers, readouts,
              cka_sum, cka_layers, drift_cross, drift_prev_self, drift_cur_self) -> ProbeRecord:
    record = ProbeRecord(step=0)
    record.model = model_summary(model_u, parts)
    record.model["parts"] = parts.describe()
    first = 0 if has_h0 else 1
    rows = []
    for layer in range(first, L + 1):
        row = {"layer": layer}
        if has_head and count > 0:
            for key in _LENS_KEYS + (("js_sim",) if cfg.eas_similarity == "js" else ()):
                s = sums.get(("lens", key, layer))
                row[key] = _num(s / count) if s is not None else None
        for key in ("hidden_cos_final", "block_influence"):
            s = sums.get((key, layer))
            row[key] = _num(s / count) if (s is not None and count > 0) else None
        rows.append(row)
    record.layers = rows
    by_layer = {r["layer"]: r for r in rows}
    summary: dict = {}
    if has_head and count > 0:
        summary["final_ce"] = by_layer[L].get("ce")
        summary["final_acc"] = by_layer[L].get("acc")
    # angular distances
    if "redundancy" in cfg.metrics and count > 0:
        for dist in cfg.angular_n:
            values = []
            for start in range(first, L - dist + 1):
                s = sums.get(("angular", dist, start))
                values.append({"start": start, "end": start + dist, "d": _num(s / count) if s is not None else None})
            record.angular[str(dist)] = values
            finite = [v for v in values if v["d"] is not None]
            if finite:
                best = min(finite, key=lambda v: v["d"])
                summary[f"angular_min_{dist}"] = best["d"]
                summary[f"angular_argmin_{dist}"] = best["start"]
    # saturation
    n_sat = float(sums.get(("sat", "n"), torch.tensor(count)))  # tokens finite at every layer
    if has_head and "saturation" in cfg.metrics and sums.get(("sat", "strict_sum")) is not None and n_sat > 0:
        summary["oracle_skip_strict"] = _num(1.0 - float(sums.get(("sat", "strict_sum"))) / n_sat / L)
        summary["oracle_skip_lenient"] = _num(1.0 - float(sums.get(("sat", "lenient_sum"))) / n_sat / L)
        summary["saturation_mean_strict"] = _num(float(sums.get(("sat", "strict_sum"))) / n_sat)
        hist = sums.get(("sat", "hist_strict"))
        record.saturation_hist = [int(v) for v in hist.round().tolist()]
        record.saturation_hist_lenient = [int(v) for v in sums.get(("sat", "hist_lenient")).round().tolist()]
        for row in rows:
            row["saturation_frac"] = record.saturation_hist[row["layer"]] / n_sat if row["layer"] < len(hist) else None
    # exits
    if has_head and "exits" in cfg.metrics and count > 0:
        curves = {}
        for rule in ("max_prob", "margin", "entropy"):
            if cfg.thresholds.get(rule):
                curves[rule] = _outcome_curve(sums, ("exit", rule), cfg.thresholds[rule], L)
        pat = []
        for k in cfg.patience:
            c = _outcome_curve(sums, ("exit", "patience", k), [float(k)], L)
            pat.extend(c)
        if pat:
            curves["patience"] = pat
        for kind in readouts:
            c = _outcome_curve(sums, ("headexit", kind), cfg.thresholds.get("max_prob", list(_DEFAULT_THRESHOLDS)), L)
            if c:
                curves[f"head_{kind}"] = c
        record.curves = curves
        for level in cfg.consistency_levels:
            summary[f"skip_at_consistency_{level:g}"] = {
                rule: exits_m.best_skip_at_consistency(curve, level) for rule, curve in curves.items()
            }
        acc = torch.tensor([by_layer[l]["acc"] if by_layer[l].get("acc") is not None else float("nan")
                            for l in exit_layers])
        if torch.isfinite(acc).all():
            layer, skip = exits_m.static_exit(acc, torch.tensor(exit_layers), L, cfg.static_tolerance)
            summary["static_exit_layer"] = int(layer)
            summary[f"static_skip_{round(cfg.static_tolerance * 100):d}pct"] = _num(skip)
    # EAS
    if "eas" in cfg.metrics and count > 0 and (has_head or cfg.eas_similarity == "hidden_cos_final"):
        key = {"js": "js_sim"}.get(cfg.eas_similarity, cfg.eas_similarity)
        eas_layers = [l for l in range(1, L + 1)]
        values = [by_layer[l].get(key) for l in eas_layers]
        if all(v is not None for v in values):
            summary["eas"] = _num(suit_m.eas(torch.tensor(values, dtype=torch.float64), L, cfg.eas_alpha))
        else:
            summary["eas"] = None
        summary["eas_similarity"] = cfg.eas_similarity
        summary["eas_alpha"] = cfg.eas_alpha
    # self-speculative estimate
    if has_head and "spec" in cfg.metrics and count > 0:
        spec_layers = [l for l in exit_layers if l < L]
        agree = [by_layer[l].get("agree") for l in spec_layers]
        if spec_layers and all(a is not None for a in agree):
            est = suit_m.spec_speedup_estimate(
                torch.tensor(agree, dtype=torch.float64), torch.tensor(spec_layers), L, cfg.spec_draft_lengths
            )
            summary["spec_speedup_est"] = _num(est["speedup"])
            summary["spec_draft_layer"] = est.get("layer")
            summary["spec_draft_len"] = est.get("draft_len")
            summary["spec_acceptance"] = _num(est.get("acceptance")) if est.get("acceptance") is not None else None
            summary["spec_assumptions"] = suit_m.SPEC_ASSUMPTIONS
        cost = sums.get(("spec", "cost"))
        if spec_layers and cost is not None and n_sat > 0:
            ks = torch.tensor(cfg.spec_draft_lengths)
            draft_layers = torch.tensor([l for l in spec_layers if l >= 1])
            runs = suit_m.best_speedup(torch.full_like(cost, n_sat), cost, draft_layers, ks)
            summary["spec_speedup_est_runs"] = _num(runs["speedup"])
            summary["spec_runs_draft_layer"] = runs["layer"]
            summary["spec_runs_draft_len"] = runs["draft_len"]
            summary["spec_runs_assumptions"] = suit_m.SPEC_RUNS_ASSUMPTIONS
    # heads
    for kind, head in readouts.items():
        rows_h = []
        for layer in head.layers:
            n_h = sums.get(("head", kind, "count", layer))
            if n_h is not None and float(n_h) > 0:
                rows_h.append({"layer": int(layer), **{k: _num(sums.get(("head", kind, k, layer)) / n_h)
                                                       for k in _HEAD_KEYS}})
            elif sums.get(("headconf", kind, "n", layer)) is not None:
                n_c = sums.get(("headconf", kind, "n", layer))
                n_agree = sums.get(("headconf", kind, "agree_n", layer))
                rows_h.append({
                    "layer": int(layer),
                    "mean_conf": _num(sums.get(("headconf", kind, "conf_sum", layer)) / n_c),
                    "mean_conf_when_agree": _num(sums.get(("headconf", kind, "agree_conf", layer)) / n_agree)
                    if float(n_agree) > 0 else None,
                    "lens_agree": _num(n_agree / n_c),
                })
        record.heads[kind] = rows_h
        head_corr = {r["layer"]: r.get("logit_corr") for r in rows_h}
        if rows_h and count > 0 and "eas" in cfg.metrics:
            # layers without a head read out through the logit lens; the final layer is the model itself
            sim = [head_corr.get(l, by_layer[l].get("logit_corr")) for l in range(1, L + 1)]
            sim[-1] = 1.0
            if all(v is not None for v in sim):
                summary[f"head_{kind}_eas"] = _num(suit_m.eas(torch.tensor(sim, dtype=torch.float64), L, cfg.eas_alpha))
        if sums.get(("headsat", kind, "strict_sum")) is not None and n_sat > 0:
            summary[f"head_{kind}_oracle_skip_strict"] = _num(
                1.0 - float(sums.get(("headsat", kind, "strict_sum"))) / n_sat / L)
    # CKA
    if cka_sum is not None:
        diag = cka_sum.diagonal().clamp_min(0)
        denom = (diag[:, None] * diag[None, :]).sqrt()
        cka = cka_sum / denom
        record.cka = [[_num(v) for v in row] for row in cka.tolist()]
        record.cka_layers = cka_layers
        if drift_cross is not None:
            drift = drift_cross / (drift_prev_self.clamp_min(0) * drift_cur_self.clamp_min(0)).sqrt()
            record.cka_drift = [_num(v) for v in drift.tolist()]
            for row, value in zip((by_layer.get(l) for l in cka_layers), record.cka_drift):
                if row is not None:
                    row["cka_drift"] = value
            finite = [v for v in record.cka_drift if v is not None]
            summary["cka_drift_mean"] = sum(finite) / len(finite) if finite else None
    record.summary = summary
    return record
