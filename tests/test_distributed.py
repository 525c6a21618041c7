"""DDP on CPU (gloo, 2 processes): the probe record equals the single-process record on the same probe set."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from ee_callbacks import EarlyExitProbe, read_records, run_probe
from tests.helpers import TinyLM, loaders

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from ddp_probe_check import comparable, max_abs_diff, probe_set  # noqa: E402


@pytest.mark.slow
def test_ddp_spawn_record_equals_single_process(tmp_path):
    train, val = loaders()
    out = tmp_path / "ee_probes.jsonl"
    probe = EarlyExitProbe(every_n_steps=2, probe_data=probe_set(), probe_set={"batch_size": 2}, output_path=out, print_table=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, callbacks=[probe], logger=False,
        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0,
    )
    trainer.fit(TinyLM(), train, val)
    records = read_records(out)
    assert [r["step"] for r in records] == [0, 2]  # rank 0 alone wrote: no duplicates
    module = TinyLM()
    module.configure_model()
    single = run_probe(module.model, [{"input_ids": b} for b in probe_set().split(2)]).to_dict()
    assert records[0]["probe"]["tokens"] == single["probe"]["tokens"] == 5 * 23  # uneven shards: nothing lost
    assert max_abs_diff(comparable(records[0]), comparable(single)) < 1e-5


@pytest.mark.slow
def test_ddp_subprocess_record_equals_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ddp_probe_check.py"), str(tmp_path), "--strategy", "ddp"],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["world_size"] == 2
    assert result["steps"] == [0, 2]
    assert result["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_exit_heads_stay_identical_on_every_rank(tmp_path):
    import torch

    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "ddp_heads_check.py"), str(tmp_path)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "heads_rank0.pt")
    r1 = torch.load(tmp_path / "heads_rank1.pt")
    assert r0["head_steps"] == r1["head_steps"] > 0
    moved = False
    for kind, params in r0["heads"].items():
        for name, value in params.items():
            assert torch.equal(value, r1["heads"][kind][name]), (kind, name)  # bit-identical across ranks
            moved = moved or bool(value.abs().sum() > 0)
    assert moved  # the heads did train (zero-initialised tuned lens moved away from zero)


def test_every_rank_keeps_every_batch_drift_reference():
    """After a probe under DDP each rank holds the CKA Grams of every batch, so the reference saved in a checkpoint
    (rank 0's callback state) serves every rank on resume; before, a resumed rank 1 paired none of its batches."""
    import threading

    import torch

    from ee_callbacks.callbacks.probe import _share_drift_reference

    barrier, pending, results = threading.Barrier(2), {}, {}

    def reduce_for(rank):
        def reduce(tensor):
            pending[rank] = tensor.double()
            barrier.wait()
            total = pending[0] + pending[1]
            barrier.wait()
            return total
        return reduce

    gen = torch.Generator().manual_seed(0)
    grams = {b: torch.randn(3, n, n, generator=gen) for b, n in ((0, 5), (1, 6), (2, 4))}  # batch b on rank b % 2
    own = {rank: {b: g for b, g in grams.items() if b % 2 == rank} for rank in (0, 1)}

    def run(rank):
        results[rank] = _share_drift_reference(reduce_for(rank), own[rank], n_reps=3, n_batches=4)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for rank in (0, 1):
        assert sorted(results[rank]) == [0, 1, 2]
        for b, gram in grams.items():
            assert torch.equal(results[rank][b], gram.float()), (rank, b)
