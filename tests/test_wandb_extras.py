"""W&B extras: log through real offline runs, read them back with ``wandb leet inspect --json``, check what landed."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from ee_callbacks import plotting
from ee_callbacks.sinks.loggers import flatten_record_metrics
from ee_callbacks.sinks.wandb_extras import WandbExtras, _spread
from tests.record_factory import make_history, make_record, write_jsonl
from tests.wandb_inspect import inspect_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHART_KEYS = ("charts/agree", "charts/kl", "charts/ce", "charts/layer_profile", "charts/tradeoff")
IMAGE_KEYS = ("heatmap_agree", "heatmap_kl", "tradeoff", "cka")


@pytest.fixture(scope="module", autouse=True)
def wandb_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(home / name.lower()))
        yield


def _chart_table(run, key):
    table_key = f"Custom Chart Tables/{key}_table"
    return run.table_file(run.rows_with(table_key)[-1], table_key)


def test_define_log_and_artifact_on_a_plain_run(tmp_path):
    import wandb

    records = make_history([0, 100, 200], n_layers=4)
    val_records = make_history([100, 200], n_layers=4, set_name="val")
    extras = WandbExtras()
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    (heads_dir / "head_02.pt").write_bytes(b"weights")
    jsonl = write_jsonl(tmp_path / "ee_probes.jsonl", records + val_records)

    run = wandb.init(mode="offline", dir=tmp_path, project="extras")
    try:
        assert extras.log_config(run, {"every_n_steps": 100, "rules": ["max_prob", "margin"]})
        for index, record in enumerate(records):
            scalars = flatten_record_metrics(record, "ee")
            assert extras.define_metrics(run, scalars)
            run.log({**scalars, "train/loss": 3.0 - index, "trainer/global_step": record["step"]})
            # The history passed includes both sets; the default set's charts must use only its own records.
            assert extras.log_probe(run, record, records[:index] + val_records[:index], set_name="default")
        val_scalars = flatten_record_metrics(val_records[-1], "ee/val")
        assert extras.define_metrics(run, val_scalars, set_name="val")
        run.log({**val_scalars, "trainer/global_step": 200})
        assert extras.log_probe(run, val_records[-1], val_records, set_name="val")
        artifact = extras.log_artifact(run, jsonl, heads_dir=heads_dir)
        assert artifact is not None
        run_id = run.id
    finally:
        wandb.finish()

    logged = inspect_run(tmp_path)
    assert logged.state["state"] == "finished"
    probe_rows = logged.rows_with("ee/table")
    assert [row["trainer/global_step"] for row in probe_rows] == [0, 100, 200]

    # Visible: the headline summary figures with their modes; hidden: everything per layer, for both sets.
    visible = logged.visible_scalar_keys("ee/")
    assert visible == {key for key in flatten_record_metrics(records[0], "ee") | val_scalars
                       if extras.metric_definition(key, "val" if key.startswith("ee/val/") else "default")
                       .get("hidden") is None}
    assert "ee/summary/eas" in visible and "ee/val/summary/eas" in visible
    assert "ee/summary/static_exit_layer" not in visible and "ee/agree/layer_02" not in visible
    assert logged.definition("ee/val/summary/static_skip_5pct")["summary"] == {"last": True, "max": True}
    assert logged.definition("ee/summary/probe_s")["summary"] == {"mean": True}
    assert logged.definition("ee/agree/layer_02")["summary"] == {"none": True}
    eas = [r["summary"]["eas"] for r in records]
    assert logged.summary["ee/summary/eas"] == {"last": eas[-1], "max": max(eas)}
    skips = [r["summary"]["skip_at_consistency_0.95"]["margin"] for r in records]
    assert logged.summary["ee/summary/skip_at_consistency_0.95/margin"] == {"last": skips[-1], "max": max(skips)}
    assert logged.summary["ee/summary/probe_s"]["mean"] == pytest.approx(np.mean([r["timing"]["probe_s"]
                                                                                  for r in records]))

    # Charts: one per entry and set; the per-layer chart spans the default set's history, layer by layer.
    assert set(logged.charts) == {f"ee/{key}" for key in CHART_KEYS} | {f"ee/val/{key}" for key in CHART_KEYS}
    kl = _chart_table(logged, "ee/charts/kl")
    assert kl["columns"] == ["step", "lineKey", "lineVal"]
    assert kl["data"] == [[r["step"], f"layer_{r['layers'][i]['layer']:02d}", r["layers"][i]["kl"]]
                          for i in range(5) for r in records]  # one line per layer, in step order
    val_kl = _chart_table(logged, "ee/val/charts/kl")
    assert sorted({step for step, _, _ in val_kl["data"]}) == [100, 200]
    profile = _chart_table(logged, "ee/charts/layer_profile")
    assert profile["data"] == [[layer["layer"], metric, layer[metric]] for metric in extras.profile_metrics
                               for layer in records[-1]["layers"]]
    tradeoff = _chart_table(logged, "ee/charts/tradeoff")
    assert tradeoff["data"] == [[rule, p["threshold"], p["skip"], p["consistency"], p["acc"]]
                                for rule, points in records[-1]["curves"].items() for p in points]
    assert logged.charts["ee/charts/tradeoff"]["panel_config"]["stringSettings"]["title"].endswith("(step 200)")

    # The probe table grows: three increments of one incremental table hold exactly the records' numbers.
    assert [row["ee/table.increment_num"] for row in probe_rows] == [0, 1, 2]
    columns = ["step", "layer", *plotting.LAYER_METRICS]
    rows = []
    for row in probe_rows:
        increment = logged.table_file(row, "ee/table")
        assert increment["columns"] == columns
        rows += increment["data"]
    assert rows == [[r["step"], entry["layer"], *(entry[m] for m in plotting.LAYER_METRICS)]
                    for r in records for entry in r["layers"]]
    assert rows[0][-1] is None  # block influence of the embedding output: null stays null
    assert not any(key.startswith(("ee/heatmap", "ee/cka")) for row in logged.history for key in row)

    assert logged.config["ee_probe"] == {"every_n_steps": 100, "rules": ["max_prob", "margin"]}
    (probes,) = [a for a in logged.artifacts if a["type"] == "ee-probes"]
    assert probes["name"] == f"ee-probes-{run_id}"
    assert set(probes["aliases"]) == {"latest", "step-200"}
    assert probes["entries"] == ["ee_probes.jsonl", "exit_heads/head_02.pt"]
    meta = probes["metadata"]
    assert meta["records"] == 5 and meta["steps"] == [0, 100, 200] and meta["sets"] == ["default", "val"]
    assert meta["model"] == records[-1]["model"] and meta["status"] == "finished"
    assert meta["probe"]["val"] == val_records[-1]["probe"]


def test_images_only_when_asked(tmp_path):
    import wandb

    records = make_history([0, 50], n_layers=3)
    extras = WandbExtras(wandb_images=True, image_dpi=40)
    run = wandb.init(mode="offline", dir=tmp_path, project="extras-images")
    try:
        for index, record in enumerate(records):
            assert extras.log_probe(run, record, records[:index])
    finally:
        wandb.finish()
    logged = inspect_run(tmp_path)
    last = logged.rows_with("ee/heatmap_agree")[-1]
    for key in IMAGE_KEYS:
        assert logged.media_file(last, f"ee/{key}").read_bytes()[:8] == PNG_SIGNATURE
    # the heatmap is the history so far (redrawn each probe), exactly what plotting draws
    drawn = np.asarray(Image.open(logged.media_file(last, "ee/heatmap_agree")).convert("RGB"))
    expected = plotting.heatmap(records, "agree", "agree with final layer").to_pil(40).convert("RGB")
    assert np.array_equal(drawn, np.asarray(expected))
    assert {f"ee/{key}" for key in CHART_KEYS} <= set(logged.charts)


def test_default_extras_never_import_matplotlib(tmp_path):
    code = (
        "import sys, wandb\n"
        "from ee_callbacks.sinks.wandb_extras import WandbExtras\n"
        "from tests.record_factory import make_history\n"
        "records = make_history([0, 10], n_layers=3)\n"
        "run = wandb.init(mode='offline', dir=sys.argv[1], project='no-mpl')\n"
        "extras = WandbExtras()\n"
        "assert all(extras.log_probe(run, r, records) for r in records)\n"
        "run.finish()\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_layer_chart_keeps_at_most_max_points_evenly_spread_with_the_latest():
    records = make_history(list(range(0, 1000, 10)), n_layers=2)  # 100 probes
    assert [r["step"] for r in _spread(records, 5)] == [0, 250, 500, 740, 990]  # indices 0, 25, 50, 74, 99
    assert _spread(records[:3], 5) == records[:3]
    chart = WandbExtras(max_chart_points=5).layer_chart(records, "agree")
    data = chart.table.data
    assert sorted({step for step, _, _ in data}) == [0, 250, 500, 740, 990]
    assert len(data) == 5 * 3  # layers 0, 1, 2
    assert WandbExtras().layer_chart(records, "no_such_metric") is None


def test_metric_definitions():
    extras = WandbExtras()
    assert extras.metric_definition("ee/summary/eas") == {"step_metric": "trainer/global_step", "summary": "last,max"}
    assert extras.metric_definition("ee/summary/final_ce")["summary"] == "last,min"
    assert extras.metric_definition("ee/summary/skip_at_consistency_0.99/patience_2")["summary"] == "last,max"
    hidden = {"step_metric": "trainer/global_step", "hidden": True, "summary": "none"}
    for key in ("ee/agree/layer_03", "ee/summary/static_exit_layer", "ee/heads/tuned_lens/ce/layer_01",
                "ee/val/summary/eas", "ee/summary/skip_at_consistency_0.99"):
        assert extras.metric_definition(key) == hidden, key  # ee/val/... is visible only for the set "val"
    assert extras.metric_definition("ee/val/summary/eas", "val")["summary"] == "last,max"
    assert WandbExtras(step_key=None).metric_definition("ee/summary/eas") == {"summary": "last,max"}


def test_failures_warn_once_and_never_raise(tmp_path):
    import wandb

    extras = WandbExtras()
    record = make_record(10, n_layers=3)
    run = wandb.init(mode="offline", dir=tmp_path, project="extras-fail")
    wandb.finish()  # every call on a finished run raises wandb's UsageError

    with pytest.warns(RuntimeWarning, match=r"log_probe failed \(UsageError"):
        assert extras.log_probe(run, record, [record]) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure of the same kind must stay quiet
        assert extras.log_probe(run, record, [record]) is False
    with pytest.warns(RuntimeWarning, match="define_metrics failed"):
        assert extras.define_metrics(run, ["ee/summary/eas"]) is False
    with pytest.warns(RuntimeWarning, match="log_config failed"):
        assert extras.log_config(run, {"a": 1}) is False
    with pytest.warns(RuntimeWarning, match="probe records not found"):
        assert extras.log_artifact(run, tmp_path / "missing.jsonl") is None
    with pytest.warns(RuntimeWarning, match="no W&B run"):
        assert extras.log_probe(None, record) is False
    with pytest.raises(ValueError, match="prefix"):
        WandbExtras(prefix="ee/")
    with pytest.raises(ValueError, match="layer_charts must be a list"):
        WandbExtras(layer_charts="agree")
    with pytest.raises(ValueError, match="max_chart_points"):
        WandbExtras(max_chart_points=1)


def test_extras_through_lightning_trainer_share_its_step_axis(tmp_path):
    import torch
    import wandb
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.loggers import WandbLogger

    class TinyRegression(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            loss = torch.nn.functional.mse_loss(self.layer(inputs), targets)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class ProbeEveryTwoSteps(Callback):
        def __init__(self):
            self.extras = WandbExtras()
            self.history = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 2 == 0:
                record = make_record(trainer.global_step, n_layers=3)
                self.history.append(record)
                assert self.extras.log_probe(trainer.logger, record, self.history)

    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(24, 4, generator=generator), torch.randn(24, 1, generator=generator)
    data = torch.utils.data.TensorDataset(inputs, targets)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="extras-pl")
    trainer = Trainer(
        max_steps=6,
        logger=logger,
        callbacks=[ProbeEveryTwoSteps()],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    try:
        trainer.fit(TinyRegression(), torch.utils.data.DataLoader(data, batch_size=4))
    finally:
        wandb.finish()

    logged = inspect_run(tmp_path)
    probe_steps = [row["trainer/global_step"] for row in logged.rows_with("ee/table")]
    loss_steps = [row["trainer/global_step"] for row in logged.history if "train/loss" in row]
    assert probe_steps == [2, 4, 6]
    assert loss_steps == [0, 1, 2, 3, 4, 5]
    # wandb's own row counter only ever increases: no row was dropped for a stale step.
    internal = [row["_step"] for row in logged.history]
    assert internal == sorted(internal) and len(set(internal)) == len(internal)
    for row in logged.rows_with("ee/table"):
        assert logged.table_file(row, "ee/table")["data"][0][0] == row["trainer/global_step"]


def test_benchmark_quick_counts_panels_from_what_wandb_reads(monkeypatch, tmp_path):
    from benchmarks import bench_wandb_extras

    monkeypatch.chdir(tmp_path)
    result = bench_wandb_extras.main(["--quick"])
    (row,) = result["rows"]
    assert len(row["probe_s"]) == 2 and all(s > 0 for s in row["probe_s"])
    assert set(row["variants"]) == {"scalars", "extras"}
    assert row["variants"]["scalars"]["extras_s"] == [0.0, 0.0]
    extras = row["panels"]["extras"]
    # 3 layers: 8 headline summary scalars + 2 levels × 4 rules of skip-at-consistency stay visible
    assert extras == {"visible_scalars": 16, "charts": 5, "media": 1, "panels": 22, "chart_tables": 5,
                      "all_ee_scalars": row["panels"]["scalars"]["all_ee_scalars"]}
    assert row["panels"]["scalars"]["visible_scalars"] == row["panels"]["scalars"]["all_ee_scalars"] > 16
    assert "| L | probe | variant |" in result["markdown"]
