"""W&B extras: log through real offline runs, read the .wandb file back, check what landed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from ee_callbacks import plotting
from ee_callbacks.sinks.wandb_extras import WandbExtras
from ee_callbacks.sinks.wandb_reader import read_offline_run
from tests.record_factory import make_history, make_record, write_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEDIA_KEYS = ("heatmap_agree", "heatmap_kl", "tradeoff", "cka")


@pytest.fixture(scope="module", autouse=True)
def wandb_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(home / name.lower()))
        yield


def _pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"))


def _heatmap_pixels(records, dpi: int = 50) -> np.ndarray:
    """What WandbExtras(image_dpi=dpi) draws for ``heatmap_agree`` over these records."""
    return _pixels(plotting.heatmap(records, "agree", "agree with final layer").to_pil(dpi))


def test_log_probe_final_config_and_artifact_on_a_plain_run(tmp_path):
    import wandb

    records = make_history([0, 100, 200], n_layers=4)
    val_records = make_history([100, 200], n_layers=4, set_name="val")
    extras = WandbExtras(image_dpi=50)
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    (heads_dir / "head_02.pt").write_bytes(b"weights")
    jsonl = write_jsonl(tmp_path / "ee_probes.jsonl", records)

    run = wandb.init(mode="offline", dir=tmp_path, project="extras")
    try:
        assert extras.log_config(run, {"every_n_steps": 100, "rules": ["max_prob", "margin"]})
        for index, record in enumerate(records):
            run.log({"train/loss": 3.0 - index, "trainer/global_step": record["step"]})
            # The history passed includes both sets; the default set's heatmap must use only its own records.
            assert extras.log_probe(run, record, records[:index] + val_records[:index], set_name="default")
        assert extras.log_probe(run, val_records[-1], val_records, set_name="val")
        assert extras.log_final(run, records[-1])
        artifact = extras.log_artifact(run, jsonl, heads_dir=heads_dir)
        assert artifact is not None
        run_id = run.id
    finally:
        wandb.finish()

    logged = read_offline_run(tmp_path, wait_s=60)
    assert logged.complete
    probe_rows = [row for row in logged.history if "ee/table" in row]
    assert [row["trainer/global_step"] for row in probe_rows] == [0, 100, 200]
    assert [row["ee/heatmap_agree"]["caption"] for row in probe_rows] == ["step 0", "step 100", "step 200"]
    for row in probe_rows:
        assert set(row) >= {f"ee/{key}" for key in MEDIA_KEYS}
        assert not any(key.startswith("ee/val/") for key in row)

    # The per-layer table of the last probe holds exactly the record's numbers (null stays null).
    table = logged.load_table(probe_rows[-1]["ee/table"])
    assert table["columns"] == ["step", "layer", *plotting.LAYER_METRICS]
    expected = [[200, entry["layer"], *(entry[m] for m in plotting.LAYER_METRICS)] for entry in records[-1]["layers"]]
    assert table["data"] == expected
    assert table["data"][0][-1] is None  # block influence of the embedding output

    # Each heatmap image is the heatmap of the history so far (redrawn each probe), not of the latest probe alone.
    for index, row in enumerate(probe_rows):
        path = logged.media_path(row["ee/heatmap_agree"])
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        drawn = _pixels(path)
        assert np.array_equal(drawn, _heatmap_pixels(records[: index + 1]))
        if index > 0:
            alone = _heatmap_pixels(records[index : index + 1])
            assert drawn.shape != alone.shape or not np.array_equal(drawn, alone)
    for key in ("ee/heatmap_kl", "ee/tradeoff", "ee/cka"):
        assert logged.media_path(probe_rows[-1][key]).read_bytes()[:8] == PNG_SIGNATURE

    val_row = next(row for row in logged.history if "ee/val/table" in row)
    assert set(val_row) >= {"ee/val/table", *(f"ee/val/{key}" for key in MEDIA_KEYS)}
    assert val_row["ee/val/cka"]["caption"] == "step 200, probe set val"
    val_drawn = _pixels(logged.media_path(val_row["ee/val/heatmap_agree"]))
    assert np.array_equal(val_drawn, _heatmap_pixels(val_records))

    last = records[-1]
    assert logged.summary["ee/final/step"] == 200
    assert logged.summary["ee/final/eas"] == last["summary"]["eas"]
    assert logged.summary["ee/final/oracle_skip_strict"] == last["summary"]["oracle_skip_strict"]
    assert (
        logged.summary["ee/final/skip_at_consistency_0.95/max_prob"]
        == last["summary"]["skip_at_consistency_0.95"]["max_prob"]
    )
    assert logged.summary["ee/final/agree/layer_02"] == last["layers"][2]["agree"]
    assert "ee/final/eas_similarity" not in logged.summary  # strings are not summary figures

    assert logged.config["ee_probe"] == {"every_n_steps": 100, "rules": ["max_prob", "margin"]}
    (probes,) = [a for a in logged.artifacts if a["type"] == "ee-probes"]
    assert probes["name"] == f"ee-probes-{run_id}"
    assert sorted(probes["entries"]) == ["ee_probes.jsonl", "exit_heads/head_02.pt"]
    assert probes["metadata"] == {"records": 3}


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
    with pytest.warns(RuntimeWarning, match="log_final failed"):
        assert extras.log_final(run, record) is False
    with pytest.warns(RuntimeWarning, match="log_config failed"):
        assert extras.log_config(run, {"a": 1}) is False
    with pytest.warns(RuntimeWarning, match="probe records not found"):
        assert extras.log_artifact(run, tmp_path / "missing.jsonl") is None
    with pytest.warns(RuntimeWarning, match="no W&B run"):
        assert extras.log_probe(None, record) is False
    with pytest.raises(ValueError, match="prefix"):
        WandbExtras(prefix="ee/")


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
            self.extras = WandbExtras(image_dpi=40)
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
        assert WandbExtras().log_final(logger, make_record(6, n_layers=3))
    finally:
        wandb.finish()

    logged = read_offline_run(tmp_path, wait_s=60)
    assert logged.complete
    probe_steps = [row["trainer/global_step"] for row in logged.history if "ee/table" in row]
    loss_steps = [row["trainer/global_step"] for row in logged.history if "train/loss" in row]
    assert probe_steps == [2, 4, 6]
    assert loss_steps == [0, 1, 2, 3, 4, 5]
    # wandb's own row counter only ever increases: no row was dropped for a stale step.
    internal = [row["_step"] for row in logged.history]
    assert internal == sorted(internal) and len(set(internal)) == len(internal)
    for row in logged.history:
        if "ee/table" in row:
            assert logged.load_table(row["ee/table"])["data"][0][0] == row["trainer/global_step"]
    assert logged.summary["ee/final/step"] == 6
