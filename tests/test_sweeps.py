"""Sweeps on real Hydra launchers: joblib (parallel local jobs), the SLURM launcher config, Optuna on a probe figure,
the sweep objective, and multi-run safety (one W&B run per job, finished even when the job fails; no shared dirs)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

from ee_callbacks import read_records
from ee_callbacks.training.config import CONF_DIR, compose_config, register_configs
from ee_callbacks.training.train import objective_spec, objective_value

ROOT = Path(__file__).resolve().parents[1]


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so that ${hydra:...} and ${trainer...} tie-ins resolve
    return cfg


def test_slurm_launcher_config_composes_with_trainer_tie_ins():
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                               "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.timeout_min == 90
    # one SLURM task per device, as Lightning's SLURMEnvironment expects
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.cpus_per_task == 8 and launcher.mem_gb == 64
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2
    # the launcher can be instantiated from this config (nothing is submitted)
    from hydra.utils import instantiate

    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"


def test_run_and_sweep_directories_never_collide():
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.to_container(_compose_with_hydra([]).hydra, resolve=False)
    # microsecond timestamps: runs started in the same second differ; sweep jobs get their job number below the
    # sweep's directory; jobs do not chdir (relative paths keep meaning the launch directory)
    assert hydra_cfg["run"]["dir"].endswith("${now:%Y-%m-%d_%H-%M-%S_%f}")
    assert hydra_cfg["sweep"]["dir"].endswith("${now:%Y-%m-%d_%H-%M-%S_%f}")
    assert hydra_cfg["sweep"]["subdir"] == "${hydra.job.num}"
    assert hydra_cfg["job"]["chdir"] is False


def test_objective_values_and_errors():
    summary = {"val_loss": 3.0, "final_train_loss": 2.9, "probe": {"eas": 0.4, "oracle_skip_strict": 0.25}}
    assert objective_value(summary) == 3.0
    assert objective_value(summary, "train_loss") == 2.9
    assert objective_value(summary, "eas") == 0.4
    assert objective_value(summary, {"name": "oracle_skip_strict"}) == 0.25
    # maximise EAS at a loss bound: inside the bound the value is the EAS, above it each nat costs `penalty`
    assert objective_value(summary, {"name": "eas_at_loss_bound", "loss_bound": 3.5}) == 0.4
    assert objective_value(summary, {"name": "eas_at_loss_bound", "loss_bound": 2.9, "penalty": 10}) == \
        pytest.approx(0.4 - 1.0)
    # minimise the loss with an oracle-skip floor
    assert objective_value(summary, {"name": "val_loss_at_skip_floor", "skip_floor": 0.2}) == 3.0
    assert objective_value(summary, {"name": "val_loss_at_skip_floor", "skip_floor": 0.35, "penalty": 2}) == \
        pytest.approx(3.2)
    # a NaN figure is NaN (Optuna: a failed trial), never a silently unpenalised value
    assert math.isnan(objective_value({**summary, "val_loss": float("nan")}, {"name": "eas_at_loss_bound",
                                                                            "loss_bound": 1.0}))
    assert math.isnan(objective_value({**summary, "val_loss": None}))
    with pytest.raises(ValueError, match="loss_bound"):
        objective_spec({"name": "eas_at_loss_bound"})
    with pytest.raises(ValueError, match="ee_probe"):
        objective_value({**summary, "probe": None}, "eas")
    with pytest.raises(ValueError, match="available"):
        objective_value(summary, "no_such_figure")
    # the config's default, and the Optuna example
    assert objective_spec(compose_config([]).objective)["name"] == "val_loss"
    cfg = _compose_with_hydra(["hparams_search=eas_optuna"])
    assert cfg.objective.name == "eas_at_loss_bound" and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.early_exit.weights == "layerskip"


class FailAtStep(Callback):
    """Raises during training (a job that fails half-way)."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("job failed on purpose")


def test_failed_job_still_finishes_its_wandb_run_and_the_next_job_gets_its_own(tmp_path, monkeypatch):
    import wandb

    from ee_callbacks.training.train import train

    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    common = ["experiment=smoke", "logger=wandb", "~callbacks.model_checkpoint", "trainer.max_steps=4",
              "trainer.val_check_interval=2", "trainer.enable_checkpointing=false"]
    failing = compose_config([*common, "~callbacks.ee_probe", "+callbacks.boom._target_=tests.test_sweeps.FailAtStep",
                              "+callbacks.boom.step=2"], output_dir=tmp_path / "job0")
    with pytest.raises(RuntimeError, match="on purpose"):
        train(failing)
    assert wandb.run is None  # finished in train()'s finally
    failed_runs = list((tmp_path / "job0" / "wandb").glob("offline-run-*"))
    assert len(failed_runs) == 1  # the failed job did start (and log to) its own run

    summary = train(compose_config(common, output_dir=tmp_path / "job1"))
    assert summary["global_step"] == 4 and wandb.run is None
    # train() returns the last probe record's summary (what probe objectives read)
    last = read_records(tmp_path / "job1" / "ee_probes.jsonl")[-1]
    assert summary["probe_step"] == last["step"] == 4 and summary["probe"] == last["summary"]
    assert objective_value(summary, "eas") == last["summary"]["eas"]
    runs = list((tmp_path / "job1" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.split("-")[-1] != failed_runs[0].name.split("-")[-1]


@pytest.mark.slow
def test_optuna_on_a_probe_figure_through_the_parallel_joblib_launcher(tmp_path):
    """One multirun: the Optuna sweeper asks two trials at once (n_jobs=2) and the joblib launcher runs them in two
    worker processes at the same time; each trial logs to its own offline W&B run and returns the final EAS."""
    sweep_dir = tmp_path / "sweep"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
               NETRC=str(tmp_path / "no_netrc"), OMP_WAIT_POLICY="PASSIVE")
    args = ["-m", "hparams_search=eas_optuna", "experiment=smoke", f"hydra.sweep.dir={sweep_dir}",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
            "logger=wandb", "trainer.max_steps=4", "trainer.val_check_interval=2", "~callbacks.model_checkpoint",
            "objective.loss_bound=6.0"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert math.isfinite(results["best_value"]) and 0.0 <= results["best_value"] <= 1.0  # EAS within the bound
    assert set(results["best_params"]) == {"early_exit.scale", "early_exit.layer_dropout", "optim.lr"}

    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit())
    assert [job.name for job in jobs] == ["0", "1"]  # distinct directories, one per job
    run_ids, names, groups = set(), set(), set()
    for job in jobs:
        assert "JoblibLauncher" in (job / ".hydra" / "hydra.yaml").read_text()
        records = [line for line in (job / "ee_probes.jsonl").read_text().splitlines() if line.strip()]
        assert len(records) == 2  # step 0 and the end of training (step 4)
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1  # one W&B run per job
        run_ids.add(offline[0].name.split("-")[-1])
        wandb_cfg = yaml.safe_load((job / "config.yaml").read_text())["logger"]["wandb"]
        # each trial has its own W&B name (job number + its overrides), all trials share the sweep's group
        assert wandb_cfg["name"].startswith(f"llama_tiny-synthetic-s7-j{job.name}-")
        assert "-early_exit.layer_dropout=" in wandb_cfg["name"]  # the trial's own sampled values
        from tests.wandb_inspect import inspect_run

        run_record = next(r["run"] for r in inspect_run(offline[0]).records if r.get("type") == "run")
        assert run_record["display_name"] == wandb_cfg["name"] and run_record["run_group"] == wandb_cfg["group"]
        names.add(wandb_cfg["name"])
        groups.add(wandb_cfg["group"])
    assert len(run_ids) == 2 and len(names) == 2
    assert groups == {"smoke-sweep"}  # <task_name>-<sweep directory name>
    # the two jobs ran at the same time: each started (config.yaml) before the other finished (its last record)
    start = {job.name: (job / "config.yaml").stat().st_mtime for job in jobs}
    end = {job.name: (job / "ee_probes.jsonl").stat().st_mtime for job in jobs}
    assert start["0"] < end["1"] and start["1"] < end["0"]
    # the best value is one of the trials' final EAS (no penalty: the loss stayed under the bound)
    import json

    final_eas = [json.loads((job / "ee_probes.jsonl").read_text().splitlines()[-1])["summary"]["eas"] for job in jobs]
    assert results["best_value"] == pytest.approx(max(final_eas))
