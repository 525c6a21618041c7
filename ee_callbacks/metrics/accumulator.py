"""Accumulators with declared sum/count state, and a suite that reduces all of them at once (DESIGN §2b).

The vocabulary is torchmetrics' (``add_state``, ``update``, ``compute``, ``reset``, ``state_dict``), without its
per-state syncing: every state is a float64 tensor declared in ``__init__`` and summed across processes, and a
:class:`MetricSuite` packs the states of all its accumulators into one vector for one all-reduce. The layout is fixed
by the declarations, so it is the same on every rank by construction (a rank that saw no token holds zeros).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Accumulator", "MetricSuite", "mean_stderr"]


def mean_stderr(total, squares, count) -> Optional[float]:
    """Standard error of a mean over tokens from its sums: ``sqrt((Σx²/n − (Σx/n)²)/n)`` (numpy's ``std/sqrt(n)``,
    ddof 0); None without tokens or for a non-finite value."""
    n = float(count)
    if n <= 0:
        return None
    mean = float(total) / n
    variance = max(float(squares) / n - mean * mean, 0.0)
    value = (variance / n) ** 0.5
    return value if value == value and value != float("inf") else None


class Accumulator:
    """A metric family: declared float64 sum/count states, ``update`` adds to them, ``compute`` divides."""

    def __init__(self):
        self._defaults: dict = {}

    def add_state(self, name: str, default: Tensor) -> None:
        """Declare a summed state (kept in float64); ``reset`` restores ``default``."""
        self._defaults[name] = torch.as_tensor(default, dtype=torch.float64).clone()
        setattr(self, name, self._defaults[name].clone())

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, default.clone())

    def update(self, *args, **kwargs) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> None:
        """Fold in anything buffered between updates; called once before the reduce."""

    def compute(self):  # pragma: no cover - interface
        raise NotImplementedError

    def states(self) -> dict:
        """The declared states by name (what a suite reduces)."""
        return {name: getattr(self, name) for name in self._defaults}

    def state_dict(self) -> dict:
        return self.states()

    def load_state_dict(self, state: dict) -> None:
        for name in self._defaults:
            setattr(self, name, torch.as_tensor(state[name], dtype=torch.float64))

    def _add(self, name: str, value: Tensor) -> None:
        """``state += value`` (value summed into the state's shape, moved to the CPU in float64)."""
        setattr(self, name, getattr(self, name) + value.detach().to("cpu", torch.float64))


class MetricSuite:
    """Named accumulators reduced together: ``reduce(all_reduce)`` sums every state across ranks in one call."""

    def __init__(self, accumulators: Optional[dict] = None):
        self.accumulators: dict = dict(accumulators or {})

    def __getitem__(self, name: str) -> Accumulator:
        return self.accumulators[name]

    def __contains__(self, name: str) -> bool:
        return name in self.accumulators

    def add(self, name: str, accumulator: Accumulator) -> Accumulator:
        self.accumulators[name] = accumulator
        return accumulator

    def items(self):
        return self.accumulators.items()

    def reduce(self, all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        """Finish every accumulator, then sum all states across ranks with one call of ``all_reduce``."""
        states = []
        for accumulator in self.accumulators.values():
            accumulator.finish()
            states.extend((accumulator, name, value) for name, value in accumulator.states().items())
        if all_reduce is None or not states:
            return
        flat = all_reduce(torch.cat([value.reshape(-1) for _, _, value in states]))
        offset = 0
        for accumulator, name, value in states:
            setattr(accumulator, name, flat[offset: offset + value.numel()].reshape(value.shape).cpu())
            offset += value.numel()

    def compute(self) -> dict:
        return {name: accumulator.compute() for name, accumulator in self.accumulators.items()}
