"""The offline-run reader against runs really written by wandb (plain ``wandb.init`` and Lightning's WandbLogger)."""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ee_callbacks.sinks.wandb_reader import (
    BLOCK_SIZE,
    WandbFileError,
    find_wandb_file,
    iter_records,
    read_offline_run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BIG_TEXT = "".join(chr(ord("a") + i % 26) for i in range(100_000))  # spans several 32 KiB blocks


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline, silent wandb whose caches and settings live in a temporary directory."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(home / name.lower()))
        yield home


def _gradient_image() -> np.ndarray:
    pixels = np.zeros((6, 8, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(8, dtype=np.uint8)[None, :] * 30
    pixels[..., 1] = np.arange(6, dtype=np.uint8)[:, None] * 40
    pixels[..., 2] = 200
    return pixels


@pytest.fixture(scope="module")
def plain_run(wandb_env, tmp_path_factory):
    import wandb

    save_dir = tmp_path_factory.mktemp("plain")
    probes = save_dir / "probes.jsonl"
    probes.write_text('{"step": 1}\n{"step": 2}\n')
    run = wandb.init(mode="offline", dir=save_dir, project="reader", config={"lr": 0.001, "model": {"depth": 3}})
    try:
        run.log({"loss": 2.5, "tokens": 128})
        run.log({"loss": 1.25, "text": BIG_TEXT})
        run.log({"table": wandb.Table(columns=["layer", "agree"], data=[[0, 0.25], [1, None], [2, 1.0]])})
        run.log({"picture": wandb.Image(_gradient_image(), caption="step 7")})
        run.config.update({"late": "yes"})
        run.summary["best"] = 0.125
        artifact = wandb.Artifact("reader-probes", type="ee-probes")
        artifact.add_file(str(probes), name="ee_probes.jsonl")
        run.log_artifact(artifact)
        run_id = run.id
    finally:
        wandb.finish()
    # finish() may return before wandb-core flushed the file; every test below reads the complete file.
    assert read_offline_run(save_dir, wait_s=60).complete
    return save_dir, run_id


def test_plain_run_values_read_back_exactly(plain_run):
    save_dir, run_id = plain_run
    run = read_offline_run(save_dir)

    assert run.run_id == run_id and run.project == "reader"
    assert run.wandb_file.name == f"run-{run_id}.wandb"
    assert [row["_step"] for row in run.history] == [0, 1, 2, 3]
    assert run.column("loss") == [2.5, 1.25]
    assert run.history[0]["tokens"] == 128
    # 100 kB of text is split over FIRST/MIDDLE/LAST chunks in several blocks; it must come back intact.
    assert run.wandb_file.stat().st_size > 3 * BLOCK_SIZE
    assert run.history[1]["text"] == BIG_TEXT

    assert run.config["lr"] == 0.001 and run.config["model"] == {"depth": 3} and run.config["late"] == "yes"
    assert run.summary["best"] == 0.125
    assert run.summary["loss"] == 1.25  # the last logged value

    table_value = run.history[2]["table"]
    assert table_value["_type"] == "table-file" and table_value["nrows"] == 3
    assert run.load_table(table_value) == {"columns": ["layer", "agree"], "data": [[0, 0.25], [1, None], [2, 1.0]]}

    image_value = run.history[3]["picture"]
    assert image_value["caption"] == "step 7" and (image_value["width"], image_value["height"]) == (8, 6)
    image_path = run.media_path(image_value)
    assert image_path.read_bytes()[:8] == PNG_SIGNATURE
    assert np.array_equal(np.asarray(Image.open(image_path).convert("RGB")), _gradient_image())
    assert image_path in run.files and run.media_path(table_value) in run.files

    by_name = {artifact["name"]: artifact for artifact in run.artifacts}
    assert by_name["reader-probes"]["type"] == "ee-probes"
    assert by_name["reader-probes"]["entries"] == ["ee_probes.jsonl"]
    assert run.exit_code == 0 and run.complete


def test_find_wandb_file_accepts_file_run_dir_and_save_dir(plain_run):
    save_dir, _ = plain_run
    wandb_file = find_wandb_file(save_dir)
    assert find_wandb_file(wandb_file) == wandb_file
    assert find_wandb_file(wandb_file.parent) == wandb_file
    with pytest.raises(FileNotFoundError, match="no run-"):
        find_wandb_file(save_dir / "wandb" / wandb_file.parent.name / "files")


def test_lightning_wandb_logger_run(wandb_env, tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="reader-pl")
    try:
        logger.log_hyperparams({"probe_every": 50, "rules": ["max_prob", "margin"]})
        logger.log_metrics({"train/loss": 3.0}, step=10)
        logger.log_metrics({"train/loss": 2.0}, step=20)
        logger.log_table(key="ee/table", columns=["layer", "kl"], data=[[1, 0.5], [2, 0.0]], step=20)
        logger.log_image(key="ee/picture", images=[_gradient_image()], step=30, caption=["step 30"])
        run_id = logger.experiment.id
    finally:
        wandb.finish()

    run = read_offline_run(tmp_path, wait_s=60)
    assert run.run_id == run_id
    assert run.config["probe_every"] == 50 and run.config["rules"] == ["max_prob", "margin"]
    # WandbLogger puts the trainer step into every row under trainer/global_step.
    assert [(row.get("train/loss"), row["trainer/global_step"]) for row in run.history] == [
        (3.0, 10),
        (2.0, 20),
        (None, 20),
        (None, 30),
    ]
    table_row, image_row = run.history[2], run.history[3]
    assert run.load_table(table_row["ee/table"]) == {"columns": ["layer", "kl"], "data": [[1, 0.5], [2, 0.0]]}
    # A list of images is stored as "images/separated" with parallel filenames and captions.
    assert image_row["ee/picture"]["captions"] == ["step 30"]
    (image_path,) = run.media_paths(image_row["ee/picture"])
    assert image_path in run.files
    assert np.array_equal(np.asarray(Image.open(image_path).convert("RGB")), _gradient_image())


def test_unknown_header_and_version_raise_clear_errors(plain_run, tmp_path):
    save_dir, _ = plain_run
    original = find_wandb_file(save_dir).read_bytes()

    not_wandb = tmp_path / "run-x.wandb"
    not_wandb.write_bytes(b"PK\x03\x04" + original[4:])
    with pytest.raises(WandbFileError, match="not a W&B run log"):
        read_offline_run(not_wandb)

    future = tmp_path / "run-future.wandb"
    future.write_bytes(original[:6] + bytes([7]) + original[7:])
    with pytest.raises(WandbFileError, match="unknown .wandb format version 7"):
        list(iter_records(future))

    short = tmp_path / "run-short.wandb"
    short.write_bytes(b":W&B")
    with pytest.raises(WandbFileError, match="too short"):
        read_offline_run(short)


def test_corrupt_chunk_raises_and_torn_tail_warns(plain_run, tmp_path):
    save_dir, _ = plain_run
    original = find_wandb_file(save_dir).read_bytes()

    corrupt = bytearray(original)
    corrupt[7 + 7 + 3] ^= 0xFF  # a data byte of the first chunk
    path = tmp_path / "run-corrupt.wandb"
    path.write_bytes(bytes(corrupt))
    with pytest.raises(WandbFileError, match="checksum mismatch in the chunk at byte 7"):
        read_offline_run(path)

    # Cut inside the second chunk: the first record survives, the rest is reported as torn.
    _, first_length, _ = struct.unpack_from("<IHB", original, 7)
    second_start = 7 + 7 + first_length
    torn = tmp_path / "run-torn.wandb"
    torn.write_bytes(original[: second_start + 10])
    with pytest.warns(RuntimeWarning, match="incomplete"):
        records = list(iter_records(torn))
    assert [record.WhichOneof("record_type") for record in records] == ["header"]
    with pytest.warns(RuntimeWarning) as caught:
        partial = read_offline_run(torn, wait_s=0.2)
    messages = [str(warning.message) for warning in caught]
    assert any("incomplete" in message for message in messages)
    assert any("no exit record after 0.2 s" in message for message in messages)
    assert not partial.complete and partial.history == []
    # The checksum really is CRC-32 of the type byte then the data (what the reader checks).
    checksum, length, chunk_type = struct.unpack_from("<IHB", original, 7)
    assert zlib.crc32(original[14 : 14 + length], zlib.crc32(bytes([chunk_type]))) == checksum


def test_several_runs_under_one_dir_is_an_error(plain_run, tmp_path):
    save_dir, _ = plain_run
    run_dir = find_wandb_file(save_dir).parent
    for copy in ("offline-run-a", "offline-run-b"):
        shutil.copytree(run_dir, tmp_path / "wandb" / copy)
    with pytest.raises(WandbFileError, match="found 2 runs"):
        read_offline_run(tmp_path)
    # Each copy on its own reads fine and yields the same history.
    first = read_offline_run(tmp_path / "wandb" / "offline-run-a")
    assert json.dumps(first.history[0], sort_keys=True) == json.dumps(
        read_offline_run(run_dir).history[0], sort_keys=True
    )
