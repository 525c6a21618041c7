"""EarlyExitProbe with a real offline WandbLogger: read back what landed in the run's .wandb file."""

import lightning as L
import pytest
import wandb
from lightning.pytorch.loggers import WandbLogger

from ee_callbacks import EarlyExitProbe, read_records
from ee_callbacks.sinks.wandb_reader import read_offline_run
from tests.helpers import TinyLM, loaders


def test_offline_wandb_run_holds_scalars_tables_images_and_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train, val = loaders()
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="ee-test")
    probe = EarlyExitProbe(every_n_steps=3, probe_sequences=8, print_table=False)
    trainer = L.Trainer(max_steps=6, callbacks=[probe], logger=logger, default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, log_every_n_steps=1)
    try:
        trainer.fit(TinyLM(), train, val)
    finally:
        wandb.finish()
    records = read_records(tmp_path / "ee_probes.jsonl")  # WandbLogger: log_dir is its save_dir
    assert [r["step"] for r in records] == [0, 3, 6]
    run = read_offline_run(tmp_path, wait_s=60)
    assert run.complete
    rows = [row for row in run.history if "ee/agree/layer_01" in row]
    assert [row["trainer/global_step"] for row in rows] == [0, 3, 6]
    for row, rec in zip(rows, records):
        assert row["ee/agree/layer_01"] == pytest.approx(rec["layers"][1]["agree"])
        assert row["ee/summary/eas"] == pytest.approx(rec["summary"]["eas"])
    tables = [row for row in run.history if "ee/table" in row]
    assert len(tables) == 3
    table = run.load_table(tables[-1]["ee/table"])
    assert len(table["data"]) == len(records[-1]["layers"])
    for key in ("ee/heatmap_agree", "ee/heatmap_kl", "ee/tradeoff", "ee/cka"):
        image = run.media_path(tables[-1][key])
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.config["ee_probe"]["every_n_steps"] == 3
    assert run.summary["ee/final/step"] == 6
    assert any(a["type"] == "ee-probes" for a in run.artifacts)
    # no per-threshold or per-token scalar keys
    keys = {k for row in run.history for k in row}
    assert not any("threshold" in k for k in keys)
