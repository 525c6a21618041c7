"""AdaptiveCadence decisions against hand-computed gaps, CostMeter sums, and the callback's adaptive mode."""

from __future__ import annotations

import math
import time

import pytest

from ee_callbacks.cadence import AdaptiveCadence, CostMeter, reaches_multiple


def test_gap_is_the_smallest_within_budget():
    # n = ceil(c (1 - b) / (b t))
    cadence = AdaptiveCadence(1, 0.02)
    assert cadence.gap(probe_s=1.0, step_s=0.1) == 490  # 0.98 / 0.002 = 490 exactly: share 1 / (1 + 49) = 0.02
    assert cadence.gap(probe_s=2.0, step_s=0.25) == 392  # 1.96 / 0.005 = 392
    cadence = AdaptiveCadence(1, 0.03)
    assert cadence.gap(probe_s=2.0, step_s=0.25) == 259  # 1.94 / 0.0075 = 258.67 -> 259
    assert cadence.gap(probe_s=0.0, step_s=0.25) == 1  # a free probe: the densest cadence


def test_gap_clamped_to_the_callers_bounds():
    cadence = AdaptiveCadence(50, 0.02, max_every_n_steps=300)
    assert cadence.gap(probe_s=0.01, step_s=0.1) == 50  # 4.9 steps would do, but never denser than every_n_steps
    assert cadence.gap(probe_s=1.0, step_s=0.1) == 300  # 490 wanted, capped
    assert cadence.gap(probe_s=1.0, step_s=None) == 50  # nothing measured yet
    assert cadence.gap(probe_s=1.0, step_s=0.0) == 50


def test_decisions_follow_the_measurements():
    cadence = AdaptiveCadence(10, 0.05)
    assert cadence.due(9) is False and cadence.due(10) is True  # before any decision: the first gap
    first = cadence.after_probe(step=0, probe_s=3.0, train_s=None, train_steps=0)
    assert (first.every_n_steps, first.next_step, first.step_s, first.expected_share) == (10, 10, None, None)
    # 10 steps in 2.0 s -> t = 0.2; n = ceil(3 * 0.95 / (0.05 * 0.2)) = ceil(285.0) = 285
    second = cadence.after_probe(step=10, probe_s=3.0, train_s=2.0, train_steps=10)
    assert second.step_s == pytest.approx(0.2)
    assert (second.every_n_steps, second.next_step) == (285, 295)
    assert second.expected_share == pytest.approx(3.0 / (3.0 + 285 * 0.2))
    assert second.expected_share <= 0.05
    assert not cadence.due(294) and cadence.due(295)
    # the probe got cheaper and training slower: t = 0.5, n = ceil(0.5 * 0.95 / (0.05 * 0.5)) = 19
    third = cadence.after_probe(step=295, probe_s=0.5, train_s=142.5, train_steps=285)
    assert (third.every_n_steps, third.next_step) == (19, 314)
    assert third.expected_share == pytest.approx(0.5 / (0.5 + 19 * 0.5))
    assert [d.every_n_steps for d in cadence.decisions] == [10, 285, 19]


def test_state_round_trip():
    cadence = AdaptiveCadence(10, 0.05)
    cadence.after_probe(step=0, probe_s=3.0, train_s=None, train_steps=0)
    cadence.after_probe(step=10, probe_s=3.0, train_s=2.0, train_steps=10)
    restored = AdaptiveCadence(10, 0.05)
    restored.load_state_dict(cadence.state_dict())
    assert restored.next_step == 295 and restored.every_n_steps == 285
    assert restored.decisions == cadence.decisions


@pytest.mark.parametrize("kwargs", [
    {"min_every_n_steps": 0, "max_overhead": 0.02},
    {"min_every_n_steps": 10, "max_overhead": 0.0},
    {"min_every_n_steps": 10, "max_overhead": 1.5},
    {"min_every_n_steps": 10, "max_overhead": 0.02, "max_every_n_steps": 5},
])
def test_bad_arguments_say_what_is_allowed(kwargs):
    with pytest.raises(ValueError, match="must be"):
        AdaptiveCadence(**kwargs)


def test_cost_meter_sums_wall_and_cpu():
    meter = CostMeter()
    for _ in range(2):
        with meter.measure("busy"):
            end = time.process_time() + 0.02
            while time.process_time() < end:  # burn CPU: cpu_s must see it
                pass
    meter.add("sleep", 0.5, 0.0)
    summary = meter.summary()
    assert summary["busy"]["calls"] == 2
    assert summary["busy"]["cpu_s"] >= 0.04 - 1e-3
    assert summary["busy"]["wall_s"] >= summary["busy"]["cpu_s"] * 0.5  # one thread: wall >= cpu, loosely
    assert summary["sleep"] == {"wall_s": 0.5, "cpu_s": 0.0, "calls": 1}
    assert math.isfinite(summary["busy"]["wall_s"])


# --------------------------------------------------------------------------------------------------------------------
# the callback's adaptive mode, on a stranger's module (model in self.net, dict batches, a lone CSVLogger)


def test_probe_with_max_overhead_follows_and_logs_its_decisions(tmp_path):
    import csv
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from ee_callbacks import EarlyExitProbe, read_records
    from tests.helpers import pattern_tokens, tiny_llama

    class DictLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_llama(vocab=64, layers=3, hidden=32)

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    ids = pattern_tokens(64, 16, 64, 0)
    train = DataLoader([{"input_ids": row} for row in ids], batch_size=8)
    # a budget no probe can meet: every gap after the first is the sparsest allowed (5), whatever the timings
    probe = EarlyExitProbe(every_n_steps=2, cadence={"max_overhead": 1e-6, "max_every_n_steps": 5},
                           probe_data=pattern_tokens(8, 16, 64, 3), print_table=False, model_attr="net")
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = L.Trainer(max_steps=12, callbacks=[probe], logger=logger, default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(DictLM(), train)
    records = read_records(Path(logger.log_dir) / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 2, 7, 12]
    decisions = probe.cadence_decisions
    assert [(d["step"], d["every_n_steps"], d["next_step"]) for d in decisions] == [
        (0, 2, 2), (2, 5, 7), (7, 5, 12), (12, 5, 17)]
    assert decisions[0]["step_s"] is None and all(d["step_s"] > 0 for d in decisions[1:])
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("ee/cadence/every_n_steps")]
    logged = {int(row["step"]): float(row["ee/cadence/every_n_steps"]) for row in rows}
    assert logged == {0: 2.0, 2: 5.0, 7: 5.0, 12: 5.0}
    shares = [float(row["ee/cadence/expected_share"]) for row in rows if row.get("ee/cadence/expected_share")]
    assert len(shares) == 3 and all(0 < s < 1 for s in shares)
    costs = probe.cost_summary()
    assert costs["probe"]["calls"] == 4 and costs["records"]["calls"] == 4 and costs["total"]["calls"] == 4
    assert costs["total"]["wall_s"] >= costs["probe"]["wall_s"] > 0
    assert probe.state_dict()["cadence"]["next_step"] == 17


def test_max_every_n_steps_needs_max_overhead():
    from ee_callbacks import EarlyExitProbe

    with pytest.raises(ValueError, match="pass cadence.max_overhead too"):
        EarlyExitProbe(every_n_steps=10, cadence={"max_every_n_steps": 100})
    with pytest.raises(ValueError, match="max_overhead must be"):
        EarlyExitProbe(every_n_steps=10, cadence=2.0)
    with pytest.raises(ValueError, match=r"unknown cadence key\(s\) \['overhead'\]; allowed: max_overhead, max_every_n_steps"):
        EarlyExitProbe(every_n_steps=10, cadence={"overhead": 0.02})
    probe = EarlyExitProbe(every_n_steps=10, cadence=0.02)  # a number is the share of wall time
    assert probe.max_overhead == 0.02 and probe.cadence is not None


@pytest.mark.parametrize("before, step, expected", [
    (None, 6, True), (None, 7, False),  # unknown start: whether the step is a multiple
    (5, 6, True), (6, 7, False),  # one step at a time
    (5, 7, True), (7, 9, True), (1, 2, False),  # a batch stepping two optimizers jumps over 6 (or reaches 9)
    (6, 6, True), (7, 7, False),  # a micro-batch of an accumulated step: the step itself decides
    (2, 13, True), (13, 14, False),
])
def test_reaches_multiple_every_3(before, step, expected):
    assert reaches_multiple(before, step, 3) is expected
