"""The Lightning data module that ``train.py`` uses; corpora, split and blocks live in :mod:`corpus`.

Batches are ``{"input_ids": LongTensor(B, seq_len)}``: fixed blocks, no padding, so no ``attention_mask``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ee_callbacks.training.config import plain_dict
from ee_callbacks.training.corpus import LMCorpus, build_corpus, load_text_documents, validation_blocks
from ee_callbacks.training.tokenizers import Tokenizer, build_tokenizer

__all__ = ["BlockDataset", "EpochBatchSampler", "LMDataModule", "validation_blocks"]

log = logging.getLogger(__name__)


class BlockDataset(Dataset):
    """Fixed-length token blocks as ``{"input_ids": LongTensor(T)}`` items."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class EpochBatchSampler(Sampler):
    """Shuffled batches whose order depends only on ``(seed, epoch)``, sharded over ranks, resumable mid-epoch.

    Epoch ``e`` visits ``randperm(n)`` drawn from a generator seeded with ``seed * 1_000_003 + e``, cut into global
    batches (last partial batch dropped); under data parallelism rank ``r`` of ``W`` takes global batches
    ``b ≡ r (mod W)`` among the first ``⌊B/W⌋·W`` (every rank the same count). A run resumed from a mid-epoch
    checkpoint passes ``skip_batches`` (the batches this rank had consumed in that epoch), so it sees exactly the
    batches an uninterrupted run would — which keeps resumed training, and the probe records after a resume, equal
    to an uninterrupted run. Lightning calls ``set_epoch``; the Trainer must not inject its own distributed sampler
    (``train`` passes ``use_distributed_sampler=False``).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, epoch: int = 0, skip_batches: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), max(1, int(world_size))
        self.epoch = int(epoch)
        self._skip = {int(epoch): int(skip_batches)} if skip_batches else {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        # the full epoch of this rank: Lightning counts the restored batches of a resumed epoch itself
        return (self.n // self.batch_size) // self.world_size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen)
        skip = self._skip.pop(self.epoch, 0)
        mine = range(self.rank, len(self) * self.world_size, self.world_size)
        for b in list(mine)[skip:]:
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class LMDataModule(pl.LightningDataModule):
    """Causal-LM data: batches are ``{"input_ids": LongTensor(B, seq_len)}`` (fixed blocks, no padding).

    Args:
        data: the ``data`` config (``source``, ``seq_len``, ``batch_size``, ``val_fraction``, ``split_seed``, ...).
        tokenizer: the ``tokenizer`` config (``kind`` and its options) or a ready :class:`Tokenizer`.
        shuffle_seed: seed of the training sampler's own generator (independent of the global RNG, so anything
            that draws random numbers between steps cannot change the data order).
    """

    def __init__(self, data: Mapping[str, Any], tokenizer: Mapping[str, Any] | Tokenizer, shuffle_seed: int = 0):
        super().__init__()
        self.data_cfg = plain_dict(data)
        self._tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self.tokenizer_cfg = {} if isinstance(tokenizer, Tokenizer) else plain_dict(tokenizer)
        self.shuffle_seed = int(shuffle_seed)
        self.save_hyperparameters({"data": self.data_cfg, "tokenizer": self.tokenizer_cfg,
                                   "shuffle_seed": self.shuffle_seed})
        self.corpus: LMCorpus | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_cfg, corpus=lambda: load_text_documents(self.data_cfg))
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return int(self.data_cfg.get("seq_len", 128))

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = build_corpus(self.data_cfg, self.tokenizer)
            log.info("data %s: %d train blocks, %d validation blocks of %d tokens", self.corpus.description,
                     len(self.corpus.train_blocks), len(self.corpus.val_blocks), self.seq_len)

    def _require_corpus(self) -> LMCorpus:
        self.setup()
        assert self.corpus is not None
        return self.corpus

    def val_blocks(self) -> torch.Tensor:
        """The validation blocks ``(N, seq_len)``, identical on every run with the same config."""
        return self._require_corpus().val_blocks

    def val_difficulty(self) -> torch.Tensor | None:
        """Per-token difficulty labels of the validation blocks (synthetic data only)."""
        return self._require_corpus().val_difficulty

    def train_dataloader(self) -> DataLoader:
        corpus = self._require_corpus()
        batch_size = int(self.data_cfg.get("batch_size", 16))
        if len(corpus.train_blocks) < batch_size:
            raise ValueError(f"only {len(corpus.train_blocks)} training blocks for data.batch_size={batch_size}")
        epoch, skip = self._resume_position()
        trainer = getattr(self, "trainer", None)
        rank, world = (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)
        sampler = EpochBatchSampler(len(corpus.train_blocks), batch_size, self.shuffle_seed, epoch, skip, rank, world)
        return DataLoader(BlockDataset(corpus.train_blocks), batch_sampler=sampler,
                          num_workers=int(self.data_cfg.get("num_workers", 0)))

    def _resume_position(self) -> tuple[int, int]:
        """(epoch, batches already consumed in it) when Lightning restores a mid-epoch checkpoint, else (0, 0)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        loop = trainer.fit_loop
        if not getattr(loop, "restarting", False):
            return int(trainer.current_epoch), 0
        done = int(loop.epoch_loop.batch_progress.current.ready)
        return int(trainer.current_epoch), done

    def val_dataloader(self) -> DataLoader:
        corpus = self._require_corpus()
        batch_size = int(self.data_cfg.get("val_batch_size") or self.data_cfg.get("batch_size", 16))
        return DataLoader(BlockDataset(corpus.val_blocks), batch_size=batch_size, shuffle=False, drop_last=False,
                          num_workers=int(self.data_cfg.get("num_workers", 0)))
