"""What the probe computes (:class:`ProbeConfig`) and the probe batches it reads (:func:`prepare_batches`).

Plain PyTorch. Values that cannot work are rejected at construction with the allowed ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

__all__ = ["ProbeConfig", "prepare_batches", "cap_tokens", "valid_positions", "resolve_layers", "METRIC_FAMILIES",
           "EAS_SIMILARITIES", "DTYPES", "DEFAULT_THRESHOLDS"]

METRIC_FAMILIES = ("lens", "saturation", "exits", "eas", "redundancy", "cka", "spec")
EAS_SIMILARITIES = ("logit_corr", "logit_cos", "agree", "js", "hidden_cos_final")
_RULES = ("max_prob", "margin", "entropy", "patience")
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_DEFAULT_ENTROPY_THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _default_thresholds() -> dict:
    return {
        "max_prob": list(DEFAULT_THRESHOLDS),
        "margin": list(DEFAULT_THRESHOLDS),
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
        layers: the blocks to read out (None: all of 0..L). A list of block indices, or a string of ``+``-joined
            terms ``every:k`` (blocks k, 2k, …), ``last:m`` (the last m blocks) and plain indices, e.g.
            ``"every:4+last:3"``. The final block L is always added (it is the reference). Per-layer rows, exits,
            saturation, static exit, EAS and the speculation estimate are then defined on the probed blocks only
            (a token can exit only at a probed block); the record says so in ``summary["layers_probed"]``.
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
    layers: Optional[object] = None

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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
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
        if self.layers is not None:
            self.layers = _parse_layers(self.layers)

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


_LAYERS_HELP = ("layers must be None (every block), a list of block indices, or a string of '+'-joined terms "
                "'every:k', 'last:m' and block indices, e.g. 'every:4+last:3'")


def _parse_layers(spec):
    """Validate a ``layers`` spec; a string stays a string (it is resolved against L), a list becomes a tuple."""
    if isinstance(spec, str):
        terms = [term.strip() for term in spec.split("+")]
        for term in terms:
            kind, _, value = term.partition(":")
            number = value if kind in ("every", "last") else kind
            if (kind in ("every", "last") or not value) and number.isdigit() and \
                    (int(number) >= 1 or kind not in ("every", "last")):
                continue
            raise ValueError(f"{_LAYERS_HELP}; got the term {term!r} in {spec!r}")
        return spec.replace(" ", "")
    if not isinstance(spec, (list, tuple)) and hasattr(spec, "__iter__") and not hasattr(spec, "items"):
        spec = list(spec)  # e.g. a Hydra ListConfig
    if isinstance(spec, (list, tuple)) and spec and all(
            not isinstance(v, bool) and isinstance(v, int) and v >= 0 for v in spec):
        return tuple(sorted(set(int(v) for v in spec)))
    raise ValueError(f"{_LAYERS_HELP}; got {spec!r}")


def resolve_layers(spec, n_layers: int) -> list:
    """The sorted blocks a ``layers`` spec probes in a model of ``n_layers`` blocks (always including L).

    ``None`` → ``0..L``; ``every:k`` → ``k, 2k, … ≤ L``; ``last:m`` → ``L−m+1 … L``; an index ℓ → ℓ (0 ≤ ℓ ≤ L).
    """
    L = int(n_layers)
    if spec is None:
        return list(range(L + 1))
    spec = _parse_layers(spec)
    chosen = {L}
    terms = spec if isinstance(spec, tuple) else spec.split("+")
    for term in terms:
        kind, _, value = str(term).partition(":")
        if kind == "every":
            chosen.update(range(int(value), L + 1, int(value)))
        elif kind == "last":
            chosen.update(range(max(0, L - int(value) + 1), L + 1))
        elif int(kind) > L:
            raise ValueError(f"layers={spec!r} names block {int(kind)} but the model has blocks 0..{L}")
        else:
            chosen.add(int(kind))
    return sorted(chosen)


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
        valid = valid_positions(ids, mask, labels)[0]
        total += int(valid.sum())
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "valid": valid})
    if not out:
        raise ValueError("the probe set is empty: give at least one batch of token ids")
    if total == 0:
        raise ValueError("the probe set has no position with a next-token label (all padding or all ignored)")
    return out


def valid_positions(ids, mask, labels):
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


def cap_tokens(batches: list, max_tokens: Optional[int]) -> list:
    """Keep the first ``max_tokens`` scored positions in batch order (a global cap, applied before any sharding)."""
    if max_tokens is None:
        return batches
    room = int(max_tokens)
    for batch in batches:
        flat = batch["valid"].reshape(-1)
        keep = flat & (flat.cumsum(0) <= room)
        room -= int(keep.sum())
        batch["valid"] = keep.reshape(batch["valid"].shape)
    return batches
