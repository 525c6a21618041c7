"""The optimiser settings of :class:`~ee_callbacks.ExitHeads` (its ``optim=`` argument), and the optimizer and
learning-rate schedule built from them. Plain PyTorch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .settings import settings_from_any

__all__ = ["OptimSettings", "lr_lambda"]

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("constant", "cosine", "linear")


def lr_lambda(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warmup over ``warmup_steps``, then constant, or cosine / linear
    decay from 1 to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"optim.scheduler must be 'constant', 'cosine' or 'linear', got {schedule!r}")


@dataclass(frozen=True)
class OptimSettings:
    """How the exit heads are optimised.

    Attributes:
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9, Nesterov).
        lr, weight_decay, betas: optimizer settings (``betas`` unused by ``sgd``).
        schedule: None/``constant``, ``cosine`` or ``linear`` decay to ``min_lr_ratio`` over ``total_steps``
            (default: the trainer's estimated optimizer steps), after ``warmup_steps`` of linear warm-up.
        grad_clip: clip the heads' gradient norm (per kind) to this value; None for no clipping.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Sequence[float] = (0.9, 0.999)
    schedule: Optional[str] = None
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None

    def __post_init__(self):
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optim.optimizer must be one of {list(_OPTIMIZERS)}, got {self.optimizer!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.schedule is not None and self.schedule not in _SCHEDULES:
            raise ValueError(f"optim.schedule must be None or one of {list(_SCHEDULES)}, got {self.schedule!r}")
        if int(self.warmup_steps) < 0 or (self.total_steps is not None and int(self.total_steps) < 1):
            raise ValueError(f"optim.warmup_steps must be ≥ 0 and optim.total_steps ≥ 1, got {self.warmup_steps}, "
                             f"{self.total_steps}")
        if not 0.0 <= float(self.min_lr_ratio) <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not float(self.grad_clip) > 0:
            raise ValueError(f"optim.grad_clip must be positive or None, got {self.grad_clip}")
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {self.betas!r}")
        set_ = object.__setattr__  # frozen: normalise the types once
        set_(self, "lr", float(self.lr))
        set_(self, "weight_decay", float(self.weight_decay))
        set_(self, "betas", betas)
        set_(self, "warmup_steps", int(self.warmup_steps))
        set_(self, "total_steps", int(self.total_steps) if self.total_steps is not None else None)
        set_(self, "min_lr_ratio", float(self.min_lr_ratio))
        set_(self, "grad_clip", float(self.grad_clip) if self.grad_clip is not None else None)

    @classmethod
    def from_any(cls, value: Union["OptimSettings", Mapping, None]) -> "OptimSettings":
        """``value`` as settings: None (the defaults), an :class:`OptimSettings`, or a mapping of some of its fields
        (e.g. ``{"lr": 1e-2, "schedule": "cosine"}``); an unknown key is an error listing the allowed ones."""
        return settings_from_any(cls, value, "optim")

    def make_optimizer(self, groups: list) -> torch.optim.Optimizer:
        """The optimizer over parameter ``groups``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return torch.optim.Adam(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: Optional[int]):
        """The warm-up/decay schedule (a ``LambdaLR``), or None without schedule and warm-up. ``total_steps``: the
        trainer's estimate, used when the settings name none."""
        if self.schedule is None and self.warmup_steps <= 0:
            return None
        total = self.total_steps or total_steps or 0
        warmup, schedule, floor = self.warmup_steps, self.schedule or "constant", self.min_lr_ratio
        if schedule != "constant" and total <= 0:
            raise ValueError("ExitHeads: schedule needs total_steps (or a trainer with max_steps/max_epochs)")
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, total, warmup, schedule, floor))
