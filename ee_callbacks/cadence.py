"""How often to probe, and what instrumentation costs: plain Python, no torch or Lightning.

:class:`AdaptiveCadence` spaces probes so that their measured share of wall time stays under a budget;
:class:`CostMeter` adds up the wall and CPU seconds of each piece of instrumentation (probe arithmetic, record
writes, logger writes, W&B extras, exit-head training) so benchmarks and users can see where the overhead goes.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

__all__ = ["AdaptiveCadence", "CadenceDecision", "CostMeter", "reaches_multiple"]


def reaches_multiple(before: Optional[int], step: int, every_n_steps: int) -> bool:
    """Whether a batch that moved the optimizer step from ``before`` to ``step`` reached or passed a multiple of
    ``every_n_steps``: a fixed cadence that still acts when a batch jumps over a multiple (manual optimization
    stepping several optimizers moves ``global_step`` by more than one). ``before`` None, or not below ``step``
    (unknown, or a micro-batch of an accumulated step): whether ``step`` itself is a multiple."""
    start = before if before is not None and before < step else step - 1
    return step // every_n_steps > start // every_n_steps


@dataclass(frozen=True)
class CadenceDecision:
    """One spacing decision, taken right after the probe at ``step``.

    ``probe_s``: wall seconds of that probe (everything it did on the training thread); ``step_s``: wall seconds per
    training step since the previous probe ended (None for the first probe: nothing measured yet);
    ``every_n_steps``: the spacing chosen; ``next_step``: the step of the next probe; ``expected_share``:
    probe_s / (probe_s + every_n_steps · step_s), the share of wall time probing takes at that spacing.
    """

    step: int
    probe_s: float
    step_s: Optional[float]
    every_n_steps: int
    next_step: int
    expected_share: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


class AdaptiveCadence:
    r"""Choose the gap to the next probe so that probing takes at most ``max_overhead`` of the run's wall time.

    After a probe that took ``c`` seconds, with training running at ``t`` seconds per step since the previous
    probe, probing every ``n`` steps costs the share ``c / (c + n·t)`` of wall time. The smallest ``n`` within the
    budget ``b`` is

        n = ceil(c·(1 − b) / (b·t)),

    clamped to ``[min_every_n_steps, max_every_n_steps]``: ``min_every_n_steps`` (the callback's
    ``every_n_steps``) is the densest cadence, ``max_every_n_steps`` (None: unbounded) keeps probes from thinning out
    to nothing. Before any training step was timed (the probe at step 0) the gap is ``min_every_n_steps``.
    Decisions use the last probe's cost and the last gap's step time only, so a cadence follows a run whose step
    time or probe cost changes (e.g. a longer sequence length, a slower logger).
    """

    def __init__(self, min_every_n_steps: int, max_overhead: float, max_every_n_steps: Optional[int] = None):
        if isinstance(min_every_n_steps, bool) or not isinstance(min_every_n_steps, int) or min_every_n_steps < 1:
            raise ValueError(f"min_every_n_steps must be a positive integer, got {min_every_n_steps!r}")
        if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not 0 < max_overhead < 1:
            raise ValueError(f"max_overhead must be a fraction of wall time in (0, 1), e.g. 0.02; got {max_overhead!r}")
        if max_every_n_steps is not None and (not isinstance(max_every_n_steps, int)
                                              or max_every_n_steps < min_every_n_steps):
            raise ValueError(f"max_every_n_steps must be None or an integer ≥ every_n_steps ({min_every_n_steps}), "
                             f"got {max_every_n_steps!r}")
        self.min_every_n_steps = int(min_every_n_steps)
        self.max_overhead = float(max_overhead)
        self.max_every_n_steps = max_every_n_steps
        self.every_n_steps = self.min_every_n_steps
        self.next_step: Optional[int] = None
        self.decisions: list = []

    def gap(self, probe_s: float, step_s: Optional[float]) -> int:
        """Steps to the next probe for a probe of ``probe_s`` seconds and training at ``step_s`` seconds per step."""
        if step_s is None or not math.isfinite(step_s) or step_s <= 0 or not math.isfinite(probe_s):
            n = self.min_every_n_steps
        else:
            b = self.max_overhead
            n = math.ceil(max(0.0, probe_s) * (1.0 - b) / (b * step_s) - 1e-9)
        n = max(self.min_every_n_steps, n)
        if self.max_every_n_steps is not None:
            n = min(self.max_every_n_steps, n)
        return int(n)

    def after_probe(self, step: int, probe_s: float, train_s: Optional[float], train_steps: int) -> CadenceDecision:
        """Record the probe just done at ``step`` (``probe_s`` wall seconds) after ``train_steps`` training steps that
        took ``train_s`` wall seconds since the previous probe ended; returns the decision (also kept)."""
        step_s = train_s / train_steps if train_s is not None and train_steps > 0 else None
        n = self.gap(probe_s, step_s)
        share = probe_s / (probe_s + n * step_s) if step_s is not None and probe_s + n * step_s > 0 else None
        decision = CadenceDecision(step=int(step), probe_s=float(probe_s), step_s=step_s, every_n_steps=n,
                                   next_step=int(step) + n, expected_share=share)
        self.every_n_steps, self.next_step = n, decision.next_step
        self.decisions.append(decision)
        return decision

    def due(self, step: int) -> bool:
        """Whether the probe is due at ``step`` (the first one at ``min_every_n_steps`` if nothing was decided)."""
        target = self.next_step if self.next_step is not None else self.min_every_n_steps
        return step >= target

    def state_dict(self) -> dict:
        return {"every_n_steps": self.every_n_steps, "next_step": self.next_step,
                "decisions": [d.to_dict() for d in self.decisions]}

    def load_state_dict(self, state: dict) -> None:
        self.every_n_steps = int(state.get("every_n_steps", self.min_every_n_steps))
        self.next_step = state.get("next_step")
        self.decisions = [CadenceDecision(**d) for d in state.get("decisions", [])]


class CostMeter:
    """Wall and process-CPU seconds per named piece of work, summed over the run.

    Process CPU time (all threads, user + system) is far less sensitive than wall time to other processes sharing
    the cores; both are kept. ``with meter.measure("records"): ...`` adds one piece.
    """

    def __init__(self):
        self.wall_s: dict = {}
        self.cpu_s: dict = {}
        self.calls: dict = {}

    @contextlib.contextmanager
    def measure(self, piece: str) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(piece, time.perf_counter() - wall0, time.process_time() - cpu0)

    def add(self, piece: str, wall_s: float, cpu_s: float) -> None:
        self.wall_s[piece] = self.wall_s.get(piece, 0.0) + float(wall_s)
        self.cpu_s[piece] = self.cpu_s.get(piece, 0.0) + float(cpu_s)
        self.calls[piece] = self.calls.get(piece, 0) + 1

    def summary(self) -> dict:
        """``{piece: {"wall_s", "cpu_s", "calls"}}``."""
        return {piece: {"wall_s": self.wall_s[piece], "cpu_s": self.cpu_s[piece], "calls": self.calls[piece]}
                for piece in self.wall_s}
