"""A train.py run killed with SIGKILL and resumed from its last checkpoint loses no record and duplicates none."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ee_callbacks import read_records

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "experiment=smoke", "trainer.max_steps=40", "callbacks.model_checkpoint.every_n_train_steps=10",
    "callbacks.ee_probe.every_n_steps=5", "trainer.val_check_interval=1000", "validate_at_end=false",
    "callbacks=[default,exit_heads]",
]


def _cmd(run_dir, *extra):
    return [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *OVERRIDES, *extra]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    run = tmp_path / "killed"
    slow = "+callbacks.slow={_target_: tests.helpers.SlowSteps, seconds: 0.25}"
    proc = subprocess.Popen(_cmd(run, slow), cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    jsonl = run / "ee_probes.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}")
            steps = [r["step"] for r in read_records(jsonl)] if jsonl.exists() else []
            if steps and max(steps) >= 25:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = [r["step"] for r in read_records(jsonl)]
    assert 25 <= max(before) < 40 and (run / "checkpoints" / "last.ckpt").exists()
    with open(jsonl, "a") as fh:  # what a kill in the middle of a write leaves behind
        fh.write('{"schema": 1, "step": 3')

    resumed = subprocess.run(_cmd(run, "ckpt_path=last"), cwd=str(REPO), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "does not parse" in resumed.stderr  # the torn line was detected (and dropped) with a warning
    records = read_records(jsonl)  # the resumed run rewrote the file: every line parses
    assert [r["step"] for r in records] == list(range(0, 41, 5))  # no duplicate, no gap

    from ee_callbacks.training.config import compose_config
    from ee_callbacks.training.train import train

    straight = tmp_path / "straight"
    train(compose_config(OVERRIDES, output_dir=str(straight)))
    reference = read_records(straight / "ee_probes.jsonl")
    assert [r["step"] for r in reference] == list(range(0, 41, 5))
    for got, ref in zip(records, reference):
        for row_got, row_ref in zip(got["layers"], ref["layers"]):
            for key in ("agree", "kl", "ce", "logit_corr"):
                assert row_got[key] == pytest.approx(row_ref[key], abs=1e-6), (got["step"], key)
        assert got["summary"]["eas"] == pytest.approx(ref["summary"]["eas"], abs=1e-9)
        assert got["heads"].keys() == ref["heads"].keys() and got["heads"]  # exit heads restored and evaluated
        for kind in ref["heads"]:
            for row_got, row_ref in zip(got["heads"][kind], ref["heads"][kind]):
                for key, value in row_ref.items():
                    if isinstance(value, float):
                        assert row_got[key] == pytest.approx(value, abs=1e-6), (got["step"], kind, key)
