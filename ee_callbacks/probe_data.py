"""Probe sets: drawn once, seeded, from a tensor, a dataset or a dataloader (plain PyTorch, no Lightning)."""

from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from .settings import settings_from_any

__all__ = ["ProbeSetSettings", "draw_probe_set", "preserved_rng"]


@dataclass(frozen=True)
class ProbeSetSettings:
    """How ``EarlyExitProbe`` draws each probe set (its ``probe_set=`` argument; a mapping of some keys also does).

    Attributes:
        sequences: sequences per probe set (drawn once, seeded).
        seq_len: cut probe sequences to this many tokens (None: the source's length).
        seed: seed of the probe-set draw.
        batch_size: probe sequences per forward batch.
        data_name: a label of the probe data for the record (None: the source's type).
    """

    sequences: int = 32
    seq_len: Optional[int] = None
    seed: int = 0
    batch_size: int = 8
    data_name: Optional[str] = None

    def __post_init__(self):
        def positive(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        if not positive(self.sequences):
            raise ValueError(f"probe_set.sequences must be a positive integer, got {self.sequences!r}")
        if self.seq_len is not None and (not positive(self.seq_len) or self.seq_len < 2):
            raise ValueError(f"probe_set.seq_len must be an integer ≥ 2 or None, got {self.seq_len!r}")
        if not positive(self.batch_size):
            raise ValueError(f"probe_set.batch_size must be a positive integer, got {self.batch_size!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def from_any(cls, value) -> "ProbeSetSettings":
        """None (the defaults), a :class:`ProbeSetSettings`, or a mapping of some of its fields."""
        return settings_from_any(cls, value, "probe_set")


@contextlib.contextmanager
def preserved_rng():
    """Leave the torch (CPU and CUDA), numpy and Python RNG streams exactly as they were."""
    torch_state = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _rows_from_item(item) -> dict:
    """``{"input_ids": (B, T), "attention_mask": ..., "labels": ...}`` (the last two when the item has them) from a
    batch or dataset item: a tensor, a mapping with ``input_ids``, or a tuple/list whose first item is the ids."""
    if isinstance(item, torch.Tensor):
        fields = {"input_ids": item}
    elif isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"probe data items need 'input_ids'; got keys {list(item.keys())}")
        fields = {key: item[key] for key in ("input_ids", "attention_mask", "labels") if item.get(key) is not None}
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        fields = {"input_ids": item[0]}
    else:
        raise TypeError(
            f"probe data must yield LongTensors or dicts with 'input_ids', got {type(item).__name__}"
        )
    fields = {key: torch.as_tensor(value) for key, value in fields.items()}
    # a mask or labels not shaped like the ids (a classification label per row) is not the probe's
    fields = {key: value for key, value in fields.items()
              if key == "input_ids" or value.shape == fields["input_ids"].shape}
    if fields["input_ids"].dim() == 1:
        fields = {key: value.unsqueeze(0) for key, value in fields.items()}
    return fields


def aligned_labels(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` in Hugging Face's alignment (label t is token t; the probe scores position t on label t+1).

    Labels equal to the ids wherever they are not ignored (−100) already are. Labels equal to the *next* ids instead
    (``y = x`` shifted by one, as nanoGPT-style data hands them over, here under the key ``labels``) are shifted right
    by one, so that position t is still scored on token t+1 and not on token t+2; the label after the last position
    has no input and is dropped. Anything else (other targets of the same shape) is taken as aligned."""
    kept = labels != -100
    if bool((labels[kept] == ids[kept]).all()):
        return labels
    ahead, kept_ahead = labels[:, :-1], kept[:, :-1]
    if bool(kept_ahead.any()) and bool((ahead[kept_ahead] == ids[:, 1:][kept_ahead]).all()):
        aligned = torch.full_like(labels, -100)
        aligned[:, 1:] = ahead
        return aligned
    return labels


def tuple_marks_padding(item) -> bool:
    """Whether a tuple/list item (whose first tensor is read as input_ids: a tuple names nothing else) carries another
    tensor of that shape that marks positions out: a 0/1 mask with zeros, or labels with negative (ignored) entries."""
    if not isinstance(item, (tuple, list)) or not item or not isinstance(item[0], torch.Tensor):
        return False
    for x in item[1:]:
        if isinstance(x, torch.Tensor) and x.shape == item[0].shape and not x.is_floating_point() and x.numel():
            x = x.long()
            if bool((x < 0).any()) or (int(x.min()) == 0 and int(x.max()) <= 1):
                return True
    return False


def draw_probe_set(source, n_sequences: int, seq_len: Optional[int] = None, seed: int = 0,
                   batch_size: int = 8, pool_factor: int = 4) -> list:
    """Draw a fixed probe set once: ``n_sequences`` rows chosen with a seeded generator.

    ``source``: a LongTensor (N, T), one batch ``{"input_ids": (N, T), ...}``, a map-style dataset, a DataLoader or
    any iterable of batches. Whatever the container, the first ``pool_factor × n_sequences`` rows form the pool, so a
    tensor of validation blocks and a non-shuffled loader over them give the same probe set. Rows are cut to
    ``seq_len`` tokens and grouped in batches of ``batch_size`` dicts: ``input_ids``, and ``attention_mask`` and
    ``labels`` when the source has them (so padding and ignored labels, −100, are not scored; a tuple batch names
    neither, only its first item is read). The global RNG streams are left untouched (iterating a DataLoader draws
    a seed from them).
    """
    if n_sequences < 1:
        raise ValueError(f"probe_sequences must be ≥ 1, got {n_sequences}")
    gen = torch.Generator().manual_seed(int(seed))
    pool = pool_factor * n_sequences
    with preserved_rng():
        rows, dropped = [], False
        if isinstance(source, (torch.Tensor, Mapping)):  # one tensor, or one batch {"input_ids": ..., ...}
            rows = [{key: value[:pool] for key, value in _rows_from_item(source).items()}]
        elif hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, (list, tuple)) \
                and not hasattr(source, "batch_size"):
            # a map-style dataset: its first rows, in order (the same pool a non-shuffled loader would give)
            for i in range(min(len(source), pool)):
                item = source[i]
                dropped = dropped or tuple_marks_padding(item)
                rows.append(_rows_from_item(item))
        else:
            count = 0
            for item in source:
                dropped = dropped or tuple_marks_padding(item)
                rows.append(_rows_from_item(item))
                count += rows[-1]["input_ids"].shape[0]
                if count >= pool:
                    break
        if dropped:
            warnings.warn("the probe data yields tuples: only their first item is read (as input_ids), so the padding "
                          "or ignored labels marked in another of its tensors are scored as text. Yield dicts "
                          "{'input_ids', 'attention_mask', 'labels'} or pass probe_data= (e.g. a dict of tensors)",
                          RuntimeWarning, stacklevel=2)
        if not rows:
            raise ValueError("the probe data yielded no rows: give probe_data or a non-empty validation set")
        width = min(r["input_ids"].shape[1] for r in rows)
        if seq_len is not None:
            width = min(width, int(seq_len))
        if width < 2:
            raise ValueError(f"probe sequences must have at least 2 tokens, got {width}; raise seq_len")
        # rows without a mask are all text, rows without labels are labelled by their own ids
        fill = {"input_ids": None, "attention_mask": torch.ones_like, "labels": lambda ids: ids}
        drawn = {key: torch.cat([(r[key] if key in r else fill[key](r["input_ids"]))[:, :width] for r in rows]
                                ).long()[:pool]
                 for key in fill if any(key in r for r in rows)}
        if drawn["input_ids"].shape[0] > n_sequences:
            pick = torch.randperm(drawn["input_ids"].shape[0], generator=gen)[:n_sequences].sort().values
            drawn = {key: value[pick] for key, value in drawn.items()}
        if "labels" in drawn:
            drawn["labels"] = aligned_labels(drawn["input_ids"], drawn["labels"])
    return [{key: value[start : start + batch_size] for key, value in drawn.items()}
            for start in range(0, drawn["input_ids"].shape[0], batch_size)]
