"""EarlyExitProbe on W&B and Lightning logger set-ups that are the user's, not ours: their own ``wandb.init`` and
``define_metric``, a prefixed logger, checkpoints as artifacts, a resumed run id, two W&B loggers, W&B + CSV +
TensorBoard, a name clash under ``ee/``, two fits in one process, several probe sets and checkpoint monitors.

Every run is real (offline W&B, a real Trainer) and is read back with W&B's own ``wandb leet inspect --json``: the
values W&B holds must be the records' (``read_records``) at the same training steps.
"""

import csv
import warnings

import lightning as L
import pytest
import wandb
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from ee_callbacks import EarlyExitProbe, read_records
from ee_callbacks.sinks.loggers import flatten_record_metrics
from tests.helpers import TinyLM, loaders, pattern_tokens
from tests.wandb_inspect import inspect_run

STEPS, EVERY = 4, 2  # probes at 0, 2, 4


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    yield
    wandb.finish()


def _probe(**kw):
    kw.setdefault("probe_set", {"sequences": 4})
    return EarlyExitProbe(every_n_steps=kw.pop("every", EVERY), print_table=False, **kw)


def _fit(root, probe, logger, steps=STEPS, callbacks=(), layers=2, module=TinyLM, **kw):
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("enable_checkpointing", bool(callbacks))
    trainer = L.Trainer(max_steps=steps, callbacks=[probe, *callbacks], logger=logger, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **kw)
    train, val = loaders()
    trainer.fit(module(kind="llama", layers=layers), train, val)
    return trainer


def _assert_history_is_the_records(run, records, prefix=""):
    """Every probe scalar W&B holds equals the record's at the same trainer/global_step."""
    assert records
    for record in records:
        want = {prefix + key: value for key, value in flatten_record_metrics(record).items()}
        rows = [row for row in run.history if row.get("trainer/global_step") == record["step"]
                and prefix + "ee/summary/eas" in row]
        assert rows, f"no W&B row at step {record['step']}"
        for row in rows:
            assert {key: row[key] for key in want} == pytest.approx(want)


def _agree_chart(run, key="ee/charts/agree"):
    table_key = f"Custom Chart Tables/{key}_table"
    return run.table_file(run.rows_with(table_key)[-1], table_key)["data"]


def test_user_run_and_their_define_metric_keep_their_axis_ours_keep_ours(tmp_path):
    run = wandb.init(project="theirs", config={"dataset": "theirs-v2"}, dir=str(tmp_path))
    wandb.define_metric("my_step")
    wandb.define_metric("*", step_metric="my_step")
    wandb.define_metric("train/*", step_metric="my_step")
    probe = _probe()
    _fit(tmp_path, probe, WandbLogger())  # attaches to the user's run
    wandb.log({"my_step": 1, "train/own": 3.0})
    wandb.finish()
    records = read_records(probe._path)
    assert [r["step"] for r in records] == [0, 2, 4] and probe._path.parent.parent.name.endswith(run.id)
    got = inspect_run(tmp_path)
    _assert_history_is_the_records(got, records)
    assert got.definition("ee/agree/layer_01")["step_metric"] == "trainer/global_step" and got.hidden("ee/kl/layer_02")
    assert got.definition("ee/summary/eas")["step_metric"] == "trainer/global_step"
    assert got.definition("ee/summary/eas")["summary"] == {"last": True, "max": True}
    assert got.definition("train/own")["step_metric"] == "my_step" and not got.hidden("train/own")
    assert got.config["dataset"] == "theirs-v2" and got.config["ee_probe"]["every_n_steps"] == EVERY
    (artifact,) = [a for a in got.artifacts if a["type"] == "ee-probes"]
    assert artifact["name"] == f"ee-probes-{run.id}" and artifact["metadata"]["steps"] == [0, 2, 4]


def test_a_prefixed_logger_prefixes_the_probe_keys_and_their_declarations(tmp_path):
    probe = _probe()
    _fit(tmp_path, probe, WandbLogger(prefix="exp", save_dir=str(tmp_path)))
    wandb.finish()
    records = read_records(probe._path)
    got = inspect_run(tmp_path)
    _assert_history_is_the_records(got, records, prefix="exp-")
    per_layer = {key for key in got.scalar_keys("exp-ee/") if "/layer_" in key}
    assert len(per_layer) >= 3 * 10 and all(got.hidden(key) for key in per_layer)  # declared as Lightning logs them
    assert got.definition("exp-ee/summary/eas")["summary"] == {"last": True, "max": True}
    assert not got.scalar_keys("ee/") and len(got.visible_scalar_keys("exp-ee/")) == 16
    assert {"exp-ee/charts/agree", "exp-ee/charts/tradeoff"} <= set(got.charts)
    assert [row["exp-ee/table.increment_num"] for row in got.rows_with("exp-ee/table")] == [0, 1, 2]
    assert len(_agree_chart(got, "exp-ee/charts/agree")) == 3 * 3  # 3 readouts × 3 probes


def test_checkpoints_as_artifacts_beside_the_probe_records(tmp_path):
    probe = _probe()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    _fit(tmp_path, probe, WandbLogger(save_dir=str(tmp_path), log_model="all"), callbacks=[checkpoint])
    wandb.finish()
    got = inspect_run(tmp_path)
    _assert_history_is_the_records(got, read_records(probe._path))
    models = [a for a in got.artifacts if a["type"] == "model"]
    assert [a["metadata"]["original_filename"] for a in models] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    (probes,) = [a for a in got.artifacts if a["type"] == "ee-probes"]
    assert set(probes["aliases"]) == {"latest", "step-4"}


def test_a_run_resumed_by_id_gets_each_process_its_records(tmp_path):
    paths = []
    for steps in (2, 4):
        wandb.init(project="theirs", id="strangerrun", resume="allow", dir=str(tmp_path))
        probe = _probe()
        _fit(tmp_path, probe, WandbLogger(), steps=steps)
        wandb.finish()
        paths.append(probe._path)
    assert paths[0] != paths[1]  # W&B gives each process of the run its own directory (offline-run-<time>-<id>)
    for path, steps in zip(paths, ([0, 2], [0, 2, 4])):
        records = read_records(path)
        assert [r["step"] for r in records] == steps
        got = inspect_run(path.parent.parent)
        _assert_history_is_the_records(got, records)
        (artifact,) = [a for a in got.artifacts if a["type"] == "ee-probes"]
        assert artifact["name"] == "ee-probes-strangerrun" and artifact["metadata"]["steps"] == steps


def test_two_wandb_loggers_share_one_run_and_wandb_csv_tensorboard_get_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Lightning lets a second WandbLogger attach to the first one's run: each probe row arrives twice, equal
    probe = _probe()
    _fit(tmp_path / "two", probe, [WandbLogger(save_dir=str(tmp_path / "two")),
                                   WandbLogger(save_dir=str(tmp_path / "two"))])
    wandb.finish()
    got = inspect_run(tmp_path / "two")
    assert [row["trainer/global_step"] for row in got.rows_with("ee/agree/layer_01")] == [0, 0, 2, 2, 4, 4]
    _assert_history_is_the_records(got, read_records(probe._path))
    assert len([a for a in got.artifacts if a["type"] == "ee-probes"]) == 1

    root = tmp_path / "three"
    probe = _probe()
    _fit(root, probe, [WandbLogger(save_dir=str(root)), CSVLogger(str(root)), TensorBoardLogger(str(root))])
    wandb.finish()
    records = read_records(probe._path)
    _assert_history_is_the_records(inspect_run(root), records)
    want = {(r["step"], key): value for r in records for key, value in flatten_record_metrics(r).items()}
    (metrics_csv,) = root.rglob("metrics.csv")
    with open(metrics_csv) as handle:
        rows = list(csv.DictReader(handle))
    from_csv = {(int(row["step"]), key): float(row[key]) for row in rows for key in row
                if key.startswith("ee/") and row[key] != ""}
    assert from_csv == pytest.approx(want)
    (events,) = root.rglob("events.out.tfevents.*")
    board = EventAccumulator(str(events), size_guidance={"scalars": 0})
    board.Reload()
    from_board = {(event.step, key): event.value for key in board.Tags()["scalars"] if key.startswith("ee/")
                  for event in board.Scalars(key)}
    assert from_board == pytest.approx(want, rel=1e-6)  # TensorBoard keeps float32


class LogsUnderEe(TinyLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("ee/summary/eas", 0.5)  # the probe's own key
        self.log("ee/mine", 1.0)
        return loss


def test_a_module_logging_under_ee_gets_a_warning_and_the_probe_values_stay_in_the_history(tmp_path):
    probe = _probe()
    with pytest.warns(RuntimeWarning, match=r"logs \['ee/mine', 'ee/summary/eas'\] itself.*rename yours"):
        _fit(tmp_path, probe, WandbLogger(save_dir=str(tmp_path)), module=LogsUnderEe)
    wandb.finish()
    records = read_records(probe._path)
    got = inspect_run(tmp_path)
    for record in records:
        values = [row["ee/summary/eas"] for row in got.rows_with("ee/summary/eas")
                  if row["trainer/global_step"] == record["step"]]
        assert record["summary"]["eas"] == pytest.approx(values[0]) and 0.5 not in values[:1]
    last = got.rows_with("ee/agree/layer_01")[-1]
    assert last["ee/agree/layer_01"] == pytest.approx(records[-1]["layers"][1]["agree"])


def test_two_fits_in_one_process_land_in_their_own_runs(tmp_path):
    # two Trainers, one probe callback, wandb.finish() between: each run gets only its own probes and charts
    probe = _probe()
    runs = []
    for index, layers in enumerate((2, 3)):
        _fit(tmp_path / str(index), probe, WandbLogger(save_dir=str(tmp_path / str(index))), layers=layers)
        wandb.finish()
        runs.append((probe._path, inspect_run(tmp_path / str(index))))
    for (path, got), layers in zip(runs, (2, 3)):
        records = read_records(path)
        assert [r["step"] for r in records] == [0, 2, 4] and records[0]["model"]["n_layers"] == layers
        _assert_history_is_the_records(got, records)
        assert len(_agree_chart(got)) == 3 * (layers + 1)  # this run's three probes, none of the other's
        (artifact,) = [a for a in got.artifacts if a["type"] == "ee-probes"]
        assert artifact["name"] == f"ee-probes-{got.file.stem[len('run-'):]}"

    # two Trainers on one WandbLogger: one run, both fits' probes, one table that keeps growing
    probe, logger = _probe(), WandbLogger(save_dir=str(tmp_path / "same"))
    _fit(tmp_path / "same", probe, logger)
    with pytest.warns(RuntimeWarning, match="starts again at step 0 and appends to the last fit's .*two series"):
        _fit(tmp_path / "same", probe, logger)
    wandb.finish()
    records = read_records(probe._path)
    assert [r["step"] for r in records] == [0, 2, 4, 0, 2, 4]
    got = inspect_run(tmp_path / "same")
    rows = got.rows_with("ee/agree/layer_01")
    assert [row["ee/agree/layer_01"] for row in rows] == pytest.approx([r["layers"][1]["agree"] for r in records])
    assert [row["ee/table.increment_num"] for row in got.rows_with("ee/table")] == [0, 1, 2, 3, 4, 5]
    assert [a["metadata"]["records"] for a in got.artifacts if a["type"] == "ee-probes"] == [3, 6]


def test_several_probe_sets_get_their_own_keys_charts_and_tables(tmp_path):
    probe = _probe(probe_data={"a": pattern_tokens(4, 16, seed=2), "b": pattern_tokens(4, 16, seed=3)})
    _fit(tmp_path, probe, WandbLogger(save_dir=str(tmp_path)))
    wandb.finish()
    records = read_records(probe._path)
    got = inspect_run(tmp_path)
    for name in ("a", "b"):
        mine = [r for r in records if r["set"] == name]
        assert [r["step"] for r in mine] == [0, 2, 4]
        for record in mine:
            want = flatten_record_metrics(record, f"ee/{name}")
            (row,) = [row for row in got.rows_with(f"ee/{name}/agree/layer_01")
                      if row["trainer/global_step"] == record["step"]]
            assert {key: row[key] for key in want} == pytest.approx(want)
        assert got.hidden(f"ee/{name}/agree/layer_01") and not got.hidden(f"ee/{name}/summary/eas")
        assert len(got.visible_scalar_keys(f"ee/{name}/")) == 16
        chart = {(step, line): value for step, line, value in _agree_chart(got, f"ee/{name}/charts/agree")}
        assert chart == pytest.approx({(r["step"], f"layer_{lay['layer']:02d}"): lay["agree"]
                                       for r in mine for lay in r["layers"]})
        increments = [got.table_file(row, f"ee/{name}/table") for row in got.rows_with(f"ee/{name}/table")]
        assert [row[2] for inc in increments for row in inc["data"]] == pytest.approx(
            [lay["agree"] for r in mine for lay in r["layers"]])
        assert [len(inc["data"]) for inc in increments] == [len(r["layers"]) for r in mine]
    assert {f"ee/{name}/charts/{chart}" for name in "ab" for chart in ("agree", "tradeoff")} <= set(got.charts)


def test_checkpoint_and_early_stopping_monitors_find_the_probe_figures(tmp_path):
    # probes at 0, 5, 10 (+ 12 at the end); validation after batches 3 and 6 of each 8-batch epoch: steps 3, 6, 11
    probe = _probe(every=5)
    best = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="ee/summary/eas", mode="max")
    stop = EarlyStopping(monitor="ee/summary/final_ce", patience=100)
    with pytest.warns(RuntimeWarning, match=r"EarlyStopping\(monitor='ee/summary/final_ce'\) checks every 3 "
                                            r"optimizer steps, more often than the probe runs \(every 5 steps\)"):
        trainer = _fit(tmp_path, probe, WandbLogger(save_dir=str(tmp_path)), steps=12, callbacks=[best, stop],
                       limit_val_batches=1, val_check_interval=3)
    wandb.finish()
    records = {r["step"]: r["summary"] for r in read_records(probe._path)}
    assert sorted(records) == [0, 5, 10, 12]
    seen = {3: records[0], 6: records[5], 11: records[10]}  # what each validation saw
    assert best.best_model_score.item() == pytest.approx(max(s["eas"] for s in seen.values()), rel=1e-6)
    assert stop.best_score.item() == pytest.approx(min(s["final_ce"] for s in seen.values()), rel=1e-6)
    assert trainer.callback_metrics["ee/summary/eas"].item() == pytest.approx(records[12]["eas"], rel=1e-6)
    _assert_history_is_the_records(inspect_run(tmp_path), read_records(probe._path))

    # no probe at step 0: the first validation comes before any probe; the warning says why Lightning stops
    stop = EarlyStopping(monitor="ee/summary/final_ce", patience=100)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="ee/summary/final_ce"):
        warnings.simplefilter("always")
        _fit(tmp_path / "late", _probe(every=5, probe_at=[]), None, steps=12, callbacks=[stop],
             limit_val_batches=1, val_check_interval=3)
    assert any("exists only once the first probe ran (step 5)" in str(w.message) for w in caught)
