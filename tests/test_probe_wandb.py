"""EarlyExitProbe with a lone offline WandbLogger, read back with wandb's own ``wandb leet inspect --json``."""

import lightning as L
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from ee_callbacks import EarlyExitProbe, read_records
from tests.helpers import TinyLM, loaders, pattern_tokens, tiny_llama
from tests.wandb_inspect import inspect_run

MAX_VISIBLE_EE_SCALARS = 30


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))


def _trainer(tmp_path, probe, max_steps, project):
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project=project)
    return L.Trainer(max_steps=max_steps, callbacks=[probe], logger=logger, default_root_dir=str(tmp_path),
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     limit_val_batches=0, log_every_n_steps=1)


def test_twelve_layer_run_gives_a_readable_workspace(tmp_path):
    train, val = loaders()
    probe = EarlyExitProbe(every_n_steps=3, probe_set={"sequences": 8}, print_table=False)
    trainer = _trainer(tmp_path, probe, 6, "ee-workspace")
    try:
        trainer.fit(TinyLM(kind="llama", layers=12), train, val)
    finally:
        wandb.finish()
    # WandbLogger: the records go into the W&B run's own directory, never a file shared by runs
    (path,) = tmp_path.glob("wandb/offline-run-*/files/ee_probes.jsonl")
    assert str(path) == str(probe._path)
    records = read_records(path)
    assert [r["step"] for r in records] == [0, 3, 6] and records[0]["model"]["n_layers"] == 12
    run = inspect_run(tmp_path)
    assert run.state["state"] == "finished" and run.state["exit_code"] == 0

    # 1. Per-layer scalars are in the history with the record's numbers, but hidden; few visible ee keys remain.
    rows = run.rows_with("ee/agree/layer_01")
    assert [row["trainer/global_step"] for row in rows] == [0, 3, 6]
    for row, record in zip(rows, records):
        assert row["ee/agree/layer_07"] == pytest.approx(record["layers"][7]["agree"])
        assert row["ee/kl/layer_12"] == pytest.approx(record["layers"][12]["kl"])
        assert row["ee/summary/eas"] == pytest.approx(record["summary"]["eas"])
    per_layer = {key for key in run.scalar_keys("ee/") if "/layer_" in key}
    assert len(per_layer) >= 13 * 10  # every per-layer metric of 13 readouts (h_0..h_12) is still logged
    assert all(run.hidden(key) for key in per_layer)
    visible = run.visible_scalar_keys("ee/")
    assert len(visible) <= MAX_VISIBLE_EE_SCALARS, sorted(visible)
    assert {"ee/summary/eas", "ee/summary/oracle_skip_strict", "ee/summary/static_skip_5pct",
            "ee/summary/skip_at_consistency_0.99/max_prob", "ee/summary/final_ce"} <= visible

    # 2. Summary modes for the runs table: EAS and skips last+max, final CE last+min; hidden keys stay out.
    assert run.definition("ee/summary/eas")["summary"] == {"last": True, "max": True}
    assert run.definition("ee/summary/skip_at_consistency_0.95/margin")["summary"] == {"last": True, "max": True}
    assert run.definition("ee/summary/final_ce")["summary"] == {"last": True, "min": True}
    assert run.definition("ee/summary/eas")["step_metric"] == "trainer/global_step"
    eas = [r["summary"]["eas"] for r in records]
    assert run.summary["ee/summary/eas"] == pytest.approx({"last": eas[-1], "max": max(eas)})
    final_ce = [r["summary"]["final_ce"] for r in records]
    assert run.summary["ee/summary/final_ce"] == pytest.approx({"last": final_ce[-1], "min": min(final_ce)})
    skips = [r["summary"]["skip_at_consistency_0.99"]["max_prob"] for r in records]
    assert run.summary["ee/summary/skip_at_consistency_0.99/max_prob"] == pytest.approx({"last": skips[-1],
                                                                                         "max": max(skips)})
    assert not any(key.startswith("ee/") and "/layer_" in key for key in run.summary)  # summary="none"

    # At least 3 interactive charts; the agree chart holds every layer's agree at every probe so far.
    charts = run.charts
    assert {f"ee/charts/{name}" for name in ("agree", "kl", "ce", "layer_profile", "tradeoff")} <= set(charts)
    assert charts["ee/charts/agree"]["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    assert charts["ee/charts/tradeoff"]["panel_config"]["fieldSettings"] == {"x": "skip", "y": "consistency",
                                                                            "stroke": "rule"}
    last_row = run.rows_with("Custom Chart Tables/ee/charts/agree_table")[-1]
    agree = run.table_file(last_row, "Custom Chart Tables/ee/charts/agree_table")
    got = {(step, key): value for step, key, value in agree["data"]}
    want = {(r["step"], f"layer_{lay['layer']:02d}"): lay["agree"] for r in records for lay in r["layers"]}
    assert len(agree["data"]) == len(want) == 3 * 13 and got == pytest.approx(want)  # one point per probe
    tradeoff = run.table_file(run.rows_with("Custom Chart Tables/ee/charts/tradeoff_table")[-1],
                              "Custom Chart Tables/ee/charts/tradeoff_table")
    curve = [value for p in records[-1]["curves"]["max_prob"] for value in (p["skip"], p["consistency"])]
    drawn = [value for rule, _, skip, cons, _ in tradeoff["data"] if rule == "max_prob" for value in (skip, cons)]
    assert drawn == pytest.approx(curve)

    # 3. One probe table that grows: the same key, incremental, its increments are the records' layer rows.
    table_rows = run.rows_with("ee/table")
    assert [row["ee/table.log_mode"] for row in table_rows] == ["INCREMENTAL"] * 3
    assert [row["ee/table.increment_num"] for row in table_rows] == [0, 1, 2]
    assert table_rows[-1]["ee/table.nrows"] == 3 * 13
    increments = [run.table_file(row, "ee/table") for row in table_rows]
    assert increments[0]["columns"][:4] == ["step", "layer", "agree", "acc"]
    for increment, record in zip(increments, records):
        assert [row[:2] for row in increment["data"]] == [[record["step"], layer] for layer in range(13)]
        assert [row[2] for row in increment["data"]] == pytest.approx([lay["agree"] for lay in record["layers"]])
    assert not any(key.startswith("ee/heatmap") for row in run.history for key in row)  # no images by default

    # 4. The records as an artifact with aliases and metadata.
    (artifact,) = [a for a in run.artifacts if a["type"] == "ee-probes"]
    assert set(artifact["aliases"]) == {"latest", "step-6"}
    assert artifact["entries"] == ["ee_probes.jsonl"]
    meta = artifact["metadata"]
    assert meta["status"] == "finished" and meta["steps"] == [0, 3, 6] and meta["records"] == 3
    assert meta["model"]["n_layers"] == 12 and meta["probe"]["default"]["sequences"] == 8
    assert run.config["ee_probe"]["every_n_steps"] == 3


class Crashes(Exception):
    pass


class StrangerLM(L.LightningModule):
    """Someone else's module: the LM in ``self.net``, dict batches, and a bug that fires at step 5."""

    def __init__(self):
        super().__init__()
        self.net = tiny_llama(layers=3)

    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise Crashes("a bug in the user's training step")
        return self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_records_reach_wandb_when_the_run_crashes(tmp_path):
    ids = pattern_tokens(32, 16)
    train = DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    probe = EarlyExitProbe(every_n_steps=2, probe_data=ids[:4], model_attr="net", print_table=False)
    trainer = _trainer(tmp_path, probe, 20, "ee-crash")
    try:
        with pytest.raises(Crashes):
            trainer.fit(StrangerLM(), train)
    finally:
        wandb.finish(exit_code=1)
    assert [r["step"] for r in read_records(probe._path)] == [0, 2, 4]  # in the W&B run's own directory
    run = inspect_run(tmp_path)
    (artifact,) = [a for a in run.artifacts if a["type"] == "ee-probes"]
    assert set(artifact["aliases"]) == {"latest", "step-4"}
    assert artifact["metadata"]["status"] == "failed" and artifact["metadata"]["steps"] == [0, 2, 4]
    assert run.state["exit_code"] == 1
