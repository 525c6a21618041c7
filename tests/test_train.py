"""Hydra configs, the train(cfg) function, train.py (one run and one sweep), W&B offline mode and the LR schedule."""

import csv
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from ee_callbacks.training.config import compose_config
from ee_callbacks.training.loggers import make_wandb_logger, resolve_wandb_mode
from ee_callbacks.training.train import apply_callback_settings

ROOT = Path(__file__).resolve().parents[1]
# The probe callback is tested on its own; these tests cover the training side.
NO_PROBE = "~callbacks.ee_probe"


def test_compose_rejects_bad_types_and_unknown_keys():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["trainer.max_steps=abc"])
    message = f"{error.value} {error.value.__cause__}"
    assert "trainer.max_steps=abc" in message and "could not be converted to Integer" in message
    with pytest.raises(ConfigCompositionException, match="max_step"):
        compose_config(["trainer.max_step=5"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["data.seq_len=1.5"])
    # unlisted Trainer kwargs go through trainer.extra
    cfg = compose_config(["+trainer.extra.plugins=null", "trainer.max_steps=7"])
    from ee_callbacks.training.config import trainer_kwargs

    kwargs = trainer_kwargs(cfg.trainer)
    assert kwargs["max_steps"] == 7 and "plugins" in kwargs and "extra" not in kwargs


def test_default_config_composes_with_every_group():
    cfg = compose_config([], output_dir="/tmp/somewhere")
    assert cfg.model.name == "llama_tiny" and cfg.data.source == "fortunes" and cfg.tokenizer.kind == "bpe"
    assert set(cfg.callbacks) == {"model_checkpoint", "ee_probe"}
    assert cfg.callbacks.model_checkpoint.dirpath == "/tmp/somewhere/checkpoints"
    # the drop-in callback config leaves probe_set.seq_len null; the app fills it from its own config when it trains
    assert cfg.callbacks.ee_probe.probe_set.seq_len is None
    apply_callback_settings(cfg)
    assert cfg.callbacks.ee_probe.probe_set.seq_len == cfg.data.seq_len == 128
    assert cfg.callbacks.ee_probe.output_path == "/tmp/somewhere/ee_probes.jsonl"
    assert cfg.callbacks.ee_probe.run_info.name == "llama_tiny"
    assert cfg.logger.wandb.save_dir == "/tmp/somewhere"
    assert "ee_probe" not in compose_config([NO_PROBE]).callbacks
    for model in ("gpt2_tiny", "gptneox_tiny", "qwen2_tiny", "mixtral_tiny", "olmoe_tiny", "mamba_tiny",
                  "mamba2_tiny"):
        assert compose_config([f"model={model}"]).model.name == model
    assert compose_config(["logger=none"]).get("logger") in (None, {})
    assert set(compose_config(["logger=many"]).logger) == {"csv", "tensorboard", "wandb"}


def test_smoke_experiment_trains_checkpoints_and_reloads(tmp_path):
    from ee_callbacks.training.corpus import validation_blocks
    from ee_callbacks.training.module import LMModule, next_token_loss
    from ee_callbacks.training.train import train

    cfg = compose_config(["experiment=smoke", NO_PROBE], output_dir=tmp_path)
    summary = train(cfg)

    assert summary["global_step"] == 20
    names = sorted(Path(path).name for path in summary["checkpoints"])
    assert names == ["last.ckpt", "step_000010.ckpt", "step_000020.ckpt"]
    assert summary["first_train_loss"] == pytest.approx(math.log(256), abs=0.3)  # untrained: near uniform
    assert summary["final_train_loss"] < summary["first_train_loss"] - 0.5
    assert (tmp_path / "config.yaml").is_file()
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    train_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    val_steps = [int(row["step"]) for row in rows if row.get("val/loss")]
    assert train_steps[:2] == [4, 9] and val_steps == [9, 19]

    # the checkpoint carries the model config: reload it and recompute the validation loss by hand
    module = LMModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.model is not None and module.model_name == "llama_tiny"
    assert module.hparams["run_config"]["data"]["source"] == "synthetic"
    blocks = validation_blocks(cfg.data, cfg.tokenizer)
    module.eval()
    with torch.no_grad():
        loss = next_token_loss(module.model(input_ids=blocks).logits, blocks)
    assert loss.item() == pytest.approx(summary["val_loss"], abs=1e-4)
    # configure_model builds once: calling it again keeps the same (trained) model
    model = module.model
    module.configure_model()
    assert module.model is model


def test_lr_schedule_by_hand():
    from ee_callbacks.training.module import lr_lambda

    assert lr_lambda(0, 110, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 110, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 110, 10, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_lambda(110, 110, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(35, 110, 10, "linear", 0.0) == pytest.approx(0.75)
    assert lr_lambda(500, 110, 0, "constant", 0.1) == 1.0
    with pytest.raises(ValueError, match="scheduler"):
        lr_lambda(50, 110, 10, "exponential", 0.1)


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_wandb_mode_is_offline_without_credentials(no_wandb_credentials, monkeypatch):
    home = no_wandb_credentials
    assert resolve_wandb_mode("auto") == "offline"
    (home / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    (home / "netrc").unlink()
    (home / "wandb_config").mkdir()
    (home / "wandb_config" / "settings").write_text("[default]\napi_key = abc\n")
    assert resolve_wandb_mode("auto") == "online"
    (home / "wandb_config" / "settings").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("offline") == "offline"
    assert make_wandb_logger(mode="disabled") is None
    with pytest.raises(ValueError, match="wandb mode"):
        resolve_wandb_mode("sometimes")


def test_wandb_init_failure_is_a_warning(no_wandb_credentials):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = make_wandb_logger(project="p", save_dir=str(no_wandb_credentials), mode="offline", id="bad/id")
    assert logger is None
    assert any("continuing without the W&B logger" in str(w.message) for w in caught)


def _run(args, cwd, env=None, timeout=300):
    result = subprocess.run([sys.executable, "train.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_py_writes_checkpoints_and_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), NETRC=str(tmp_path / "no_netrc"), WANDB_SILENT="true")
    _run([f"hydra.run.dir={run_dir}", "experiment=smoke", "logger=wandb", "trainer.max_steps=12", NO_PROBE],
         cwd=ROOT, env=env)
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", "step_000010.ckpt"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1  # auto mode chose offline: no credentials were configured


@pytest.mark.slow
def test_train_py_multirun_gives_each_job_its_own_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _run(["-m", f"hydra.sweep.dir={sweep_dir}", "experiment=smoke", "model=llama_tiny,mixtral_tiny",
          "trainer.max_steps=4", "trainer.val_check_interval=2", NO_PROBE], cwd=ROOT)
    for job, model in (("0", "llama_tiny"), ("1", "mixtral_tiny")):
        job_dir = sweep_dir / job
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert f"name: {model}" in (job_dir / "config.yaml").read_text()
        assert (job_dir / "csv" / "metrics.csv").is_file()


def test_moe_under_layerskip_trains_its_router_aux_loss(tmp_path):
    """train.py's module keeps a MoE router's load-balancing loss under early_exit=layerskip: it reaches the module
    (logged every step; the sum it trains on is tested in test_exit_loss.py)."""
    from ee_callbacks.training.train import train

    cfg = compose_config(["experiment=smoke", NO_PROBE, "model=mixtral_tiny", "early_exit=layerskip",
                          "trainer.max_steps=3", "trainer.log_every_n_steps=1", "validate_at_end=false",
                          "trainer.val_check_interval=3", "~callbacks.model_checkpoint"], output_dir=tmp_path)
    train(cfg)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    aux = [float(r["train/aux_loss"]) for r in rows if r.get("train/aux_loss")]
    assert len(aux) == 3 and all(a > 0 for a in aux)
