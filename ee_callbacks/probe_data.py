"""Probe sets: drawn once, seeded, from a tensor, a dataset or a dataloader (plain PyTorch, no Lightning)."""

from __future__ import annotations

import contextlib
import random
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


def _rows_from_item(item) -> tuple:
    """(input_ids (B, T), attention_mask or None) from a batch/dataset item."""
    if isinstance(item, torch.Tensor):
        ids = item
        mask = None
    elif isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"probe data items need 'input_ids'; got keys {list(item.keys())}")
        ids, mask = item["input_ids"], item.get("attention_mask")
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        ids, mask = item[0], None
    else:
        raise TypeError(
            f"probe data must yield LongTensors or dicts with 'input_ids', got {type(item).__name__}"
        )
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        mask = torch.as_tensor(mask).unsqueeze(0) if mask is not None else None
    return ids, (torch.as_tensor(mask) if mask is not None else None)


def draw_probe_set(source, n_sequences: int, seq_len: Optional[int] = None, seed: int = 0,
                   batch_size: int = 8, pool_factor: int = 4) -> list:
    """Draw a fixed probe set once: ``n_sequences`` rows chosen with a seeded generator.

    ``source``: a LongTensor (N, T), a map-style dataset, a DataLoader or any iterable of batches. Whatever the
    container, the first ``pool_factor × n_sequences`` rows form the pool, so a tensor of validation blocks and a
    non-shuffled loader over them give the same probe set. Rows are cut to ``seq_len`` tokens and grouped in
    batches of ``batch_size`` dicts (``input_ids``, ``attention_mask`` when the source has one). The global RNG
    streams are left untouched (iterating a DataLoader draws a seed from them).
    """
    if n_sequences < 1:
        raise ValueError(f"probe_sequences must be ≥ 1, got {n_sequences}")
    gen = torch.Generator().manual_seed(int(seed))
    pool = pool_factor * n_sequences
    with preserved_rng():
        rows, masks = [], []
        if isinstance(source, torch.Tensor):
            ids, mask = _rows_from_item(source)
            rows, masks = [ids[:pool]], [mask[:pool] if mask is not None else None]
        elif hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, (list, tuple)) \
                and not hasattr(source, "batch_size"):
            # a map-style dataset: its first rows, in order (the same pool a non-shuffled loader would give)
            for i in range(min(len(source), pool)):
                ids, mask = _rows_from_item(source[i])
                rows.append(ids)
                masks.append(mask)
        else:
            count = 0
            for item in source:
                ids, mask = _rows_from_item(item)
                rows.append(ids)
                masks.append(mask)
                count += ids.shape[0]
                if count >= pool:
                    break
        if not rows:
            raise ValueError("the probe data yielded no rows: give probe_data or a non-empty validation set")
        width = min(r.shape[1] for r in rows)
        if seq_len is not None:
            width = min(width, int(seq_len))
        if width < 2:
            raise ValueError(f"probe sequences must have at least 2 tokens, got {width}; raise seq_len")
        ids = torch.cat([r[:, :width] for r in rows]).long()[:pool]
        has_mask = any(m is not None for m in masks)
        if has_mask:
            mask = torch.cat([
                (m[:, :width] if m is not None else torch.ones(r.shape[0], width, dtype=torch.long))
                for r, m in zip(rows, masks)
            ])[:pool]
        if ids.shape[0] > n_sequences:
            pick = torch.randperm(ids.shape[0], generator=gen)[:n_sequences].sort().values
            ids = ids[pick]
            if has_mask:
                mask = mask[pick]
    batches = []
    for start in range(0, ids.shape[0], batch_size):
        batch = {"input_ids": ids[start : start + batch_size]}
        if has_mask:
            batch["attention_mask"] = mask[start : start + batch_size]
        batches.append(batch)
    return batches
