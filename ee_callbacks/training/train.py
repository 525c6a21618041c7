"""``train(cfg)``: one training run from a composed Hydra config, and :func:`main`, the Hydra app around it (console
script ``ee-train``; ``train.py`` at the repository root calls the same function).

Everything the run writes lands in ``cfg.paths.output_dir`` (Hydra's run directory under ``@hydra.main``):
checkpoints (``checkpoints/``), logger files (``csv/``, ``tensorboard/``, ``wandb/``), ``config.yaml`` (the resolved
config), ``tokenizer/`` (the run's tokenizer as a Hugging Face ``PreTrainedTokenizerFast``, when it has one) and
whatever the callbacks write (e.g. ``ee_probes.jsonl``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ee_callbacks.training.config import config_source, instantiation_kwargs, register_configs, trainer_kwargs

log = logging.getLogger(__name__)


def resolve_output_dir(cfg: DictConfig) -> Path:
    """The run directory ``cfg.paths.output_dir`` (a clear error when it cannot be resolved outside Hydra)."""
    try:
        output_dir = cfg.paths.output_dir
    except Exception as error:  # InterpolationResolutionError without Hydra's runtime, or a missing key
        raise ValueError("cfg.paths.output_dir is not set: under @hydra.main it is Hydra's run directory; when "
                         "composing the config yourself pass compose_config(..., output_dir=DIR) or the override "
                         "paths.output_dir=DIR") from error
    if output_dir is None:
        raise ValueError("cfg.paths.output_dir is null; set paths.output_dir=DIR")
    return Path(str(output_dir))


def instantiate_group(group_cfg: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a ``callbacks``/``logger`` config.

    Entries that are ``None`` or have no ``_target_`` are skipped (the latter with a warning).
    """
    from hydra.utils import instantiate

    objects: list[Any] = []
    if not group_cfg:
        return objects
    if not isinstance(group_cfg, DictConfig):
        raise TypeError(f"cfg.{kind} must be a mapping of name -> config with _target_, got {type(group_cfg)}")
    for name, entry in group_cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            # e.g. an experiment's settings for a callback that was removed with callbacks=none
            log.warning("cfg.%s.%s has no _target_; skipped", kind, name)
            continue
        obj = instantiate(instantiation_kwargs(entry))
        if obj is None:  # a builder that declined (e.g. W&B could not start)
            log.warning("%s %r was not created; continuing without it", kind, name)
            continue
        objects.append(obj)
    return objects


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured model and return a summary.

    Returns:
        ``{"run_dir", "first_train_loss" (step 0), "final_train_loss" (mean of the last 10 steps), "val_loss" (at the
        last step), "global_step", "checkpoints" (sorted paths), "model_name", "model_family", "vocab_size",
        "probe" (the ``summary`` of the last probe record in ``ee_probes.jsonl``: probe set ``default`` if present,
        else the last set; None without the probe callback and on ranks other than 0), "probe_step" (its step),
        "instrumentation" (``{callback class: {piece: {wall_s, cpu_s, calls}}}``, see ``EarlyExitProbe.cost_summary``
        and ``ExitHeads.cost_summary``)}``.
        :func:`objective_value` turns this into the number a sweeper optimises.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    from ee_callbacks.training.data import LMDataModule
    from ee_callbacks.training.module import LMModule

    run_dir = resolve_output_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    apply_callback_settings(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    seed = int(cfg.get("seed", 0))
    pl.seed_everything(seed, workers=True)

    datamodule = LMDataModule(cfg.data, cfg.tokenizer, shuffle_seed=seed)
    module = LMModule(cfg.model, datamodule.vocab_size, cfg.get("optim"), init_seed=seed, run_config=resolved,
                      early_exit=cfg.get("early_exit"))
    save_tokenizer(datamodule.tokenizer, run_dir / "tokenizer")

    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    wandb_run_before = _current_wandb_run()
    loggers: list[Any] = []
    failed = True
    try:
        loggers = instantiate_group(cfg.get("logger"), "logger")
        kwargs = trainer_kwargs(cfg.trainer)
        # LMDataModule's batch sampler shards itself over ranks (and resumes mid-epoch): no injected sampler
        kwargs["use_distributed_sampler"] = False
        trainer = pl.Trainer(**kwargs, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if cfg.get("validate_at_end", True) and module.last_validated_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        failed = False
    finally:
        # One W&B run per job, closed even when the job fails (a sweep's next job must not log into it).
        if any(isinstance(logger, WandbLogger) for logger in loggers) or _current_wandb_run() is not wandb_run_before:
            _finish_wandb(exit_code=1 if failed else 0)

    val_loss = trainer.callback_metrics.get("val/loss")
    checkpoints: list[str] = []
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            checkpoints += [str(p) for p in sorted(Path(callback.dirpath).glob("*.ckpt"))]
    probe_summary, probe_step = last_probe_summary(callbacks, trainer)
    return {
        "run_dir": str(run_dir),
        "first_train_loss": module.first_train_loss,
        "final_train_loss": module.recent_train_loss(),
        "val_loss": None if val_loss is None else float(val_loss),
        "global_step": int(trainer.global_step),
        "checkpoints": checkpoints,
        "model_name": module.model_name,
        "model_family": module.model_family,
        "vocab_size": datamodule.vocab_size,
        "probe": probe_summary,
        "probe_step": probe_step,
        # wall/CPU seconds of each piece of instrumentation (EarlyExitProbe, ExitHeads): where the overhead goes
        "instrumentation": {type(cb).__name__: cb.cost_summary() for cb in callbacks if hasattr(cb, "cost_summary")},
    }


def apply_callback_settings(cfg: DictConfig) -> None:
    """Fill ``cfg.callback_settings.<name>`` into ``cfg.callbacks.<name>`` where the callback's own config leaves a
    key null or absent.

    ``conf/callbacks/ee_probe.yaml`` and ``exit_heads.yaml`` hold no interpolation into this app's keys (so they can
    be copied into another Hydra project as they are); this app passes its own values (``data.seq_len``, the run
    directory, the model name) from ``conf/train.yaml``'s ``callback_settings``; a nested mapping fills the callback's
    nested node key by key (``probe_set.seq_len``). A value set on the callback itself
    (``callbacks.ee_probe.probe_set.seq_len=64``) wins. Settings for a callback the run does not use are ignored.
    """
    settings, callbacks = cfg.get("callback_settings"), cfg.get("callbacks")
    if not settings or not callbacks:
        return
    from omegaconf import open_dict

    def fill(entry: DictConfig, values) -> None:
        with open_dict(entry):
            for key in values:
                if isinstance(entry.get(key), DictConfig) and isinstance(values[key], DictConfig):
                    fill(entry[key], values[key])
                elif entry.get(key) is None:
                    entry[key] = values[key]

    for name, values in settings.items():
        entry = callbacks.get(name)
        if isinstance(entry, DictConfig) and values:
            fill(entry, values)


def save_tokenizer(tokenizer: Any, directory: Path) -> Path | None:
    """Save the run's tokenizer into ``directory`` as a Hugging Face tokenizer (``save_pretrained``), so that a run
    directory is self-contained: ``AutoTokenizer.from_pretrained(run_dir / "tokenizer")`` loads it.

    A trained BPE is wrapped in a ``PreTrainedTokenizerFast`` (EOS ``<|endoftext|>``); a ``tokenizer=hf`` tokenizer
    is saved as it is; the byte tokenizer (no vocabulary file) is not saved. An existing directory is kept (a
    resumed run, or another rank that wrote it first). Returns the directory, or ``None`` when nothing was saved.
    """
    if directory.exists():
        return directory
    hf_tokenizer = tokenizer.to_hf()
    if hf_tokenizer is None:
        return None
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=directory.parent))
    try:
        hf_tokenizer.save_pretrained(str(staging))
        os.rename(staging, directory)  # atomic: readers never see half a tokenizer
    except OSError:
        if not directory.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def last_probe_summary(callbacks: list[Any], trainer: Any = None) -> tuple[dict | None, int | None]:
    """``(summary, step)`` of the last training record the run's ``EarlyExitProbe`` wrote (probe set ``default`` if
    present, else the last set), read back from its ``ee_probes.jsonl``; ``(None, None)`` without the callback, on
    ranks other than global rank zero (only rank zero writes the file), or when no record was written."""
    from ee_callbacks.callbacks.probe import EarlyExitProbe
    from ee_callbacks.records import read_records

    if trainer is not None and not getattr(trainer, "is_global_zero", True):
        return None, None
    for callback in callbacks:
        if not isinstance(callback, EarlyExitProbe):
            continue
        path = getattr(callback, "_path", None) or callback.output_path
        if path is None or not Path(path).is_file():
            continue
        records = [r for r in read_records(path) if r.get("source", "train") == "train"]
        chosen = [r for r in records if r.get("set") == "default"] or records
        if chosen:
            return dict(chosen[-1].get("summary") or {}), int(chosen[-1].get("step", -1))
    return None, None


# ----------------------------------------------------------------------------------------------------------------------
# The sweep objective: what train.py returns to a Hydra sweeper (e.g. Optuna), configured by ``cfg.objective``.

#: objectives computed from the training summary itself; any other name is read from the probe summary
#: (``ee/summary/<name>``, e.g. ``eas``, ``oracle_skip_strict``, ``static_skip_5pct``, ``spec_speedup_est``)
TRAINING_OBJECTIVES = ("val_loss", "train_loss")
COMPOUND_OBJECTIVES = ("eas_at_loss_bound", "val_loss_at_skip_floor")
#: the direction each known objective is optimised in (a sweeper set the other way gets a warning)
OBJECTIVE_DIRECTIONS = {
    "val_loss": "minimize", "train_loss": "minimize", "val_loss_at_skip_floor": "minimize", "final_ce": "minimize",
    "eas": "maximize", "eas_at_loss_bound": "maximize", "oracle_skip_strict": "maximize",
    "oracle_skip_lenient": "maximize", "static_skip_5pct": "maximize", "spec_speedup_est": "maximize",
    "final_acc": "maximize",
}


def objective_spec(objective: Any) -> dict[str, Any]:
    """The objective config as a dict ``{name, loss_bound, skip_floor, penalty}`` (a bare string is the name),
    checked: a clear error for a missing bound or a bad penalty."""
    if objective is None:
        objective = "val_loss"
    if isinstance(objective, str):
        spec: dict[str, Any] = {"name": objective}
    else:
        spec = dict(OmegaConf.to_container(objective, resolve=True) if isinstance(objective, DictConfig)
                    else objective)
    unknown = set(spec) - {"name", "loss_bound", "skip_floor", "penalty"}
    if unknown:
        raise ValueError(f"objective has unknown keys {sorted(unknown)}; allowed: name, loss_bound, skip_floor, "
                         "penalty")
    spec.setdefault("name", "val_loss")
    spec.setdefault("loss_bound", None)
    spec.setdefault("skip_floor", None)
    spec.setdefault("penalty", 10.0)
    name = spec["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"objective.name must be a string such as val_loss, eas, oracle_skip_strict, "
                         f"eas_at_loss_bound or val_loss_at_skip_floor; got {name!r}")
    if name == "eas_at_loss_bound" and spec["loss_bound"] is None:
        raise ValueError("objective eas_at_loss_bound needs objective.loss_bound (nats), e.g. objective.loss_bound=3.5")
    if name == "val_loss_at_skip_floor" and spec["skip_floor"] is None:
        raise ValueError("objective val_loss_at_skip_floor needs objective.skip_floor in [0, 1], "
                         "e.g. objective.skip_floor=0.3")
    if float(spec["penalty"]) < 0:
        raise ValueError(f"objective.penalty must be >= 0, got {spec['penalty']}")
    return spec


def objective_needs_probe(objective: Any) -> bool:
    """Whether the objective reads the probe summary (and so needs the ``ee_probe`` callback)."""
    return objective_spec(objective)["name"] not in TRAINING_OBJECTIVES


def objective_value(summary: dict[str, Any], objective: Any = "val_loss") -> float:
    """The number a sweeper optimises, from ``train(cfg)``'s summary and the ``objective`` config.

    - ``val_loss`` (minimise; the default), ``train_loss`` (minimise: mean of the last 10 steps);
    - a probe summary figure by name (``eas``, ``oracle_skip_strict``, ``oracle_skip_lenient``, ``static_skip_5pct``,
      ``spec_speedup_est``, ``final_ce``, ...): its value at the last probe (the end of training);
    - ``eas_at_loss_bound`` (maximise): ``eas − penalty · max(0, val_loss − loss_bound)`` — the final EAS, with
      every nat of validation loss above the bound costing ``penalty`` (default 10: 0.1 nat over the bound costs a
      whole unit of EAS, whose range is [0, 1]);
    - ``val_loss_at_skip_floor`` (minimise): ``val_loss + penalty · max(0, skip_floor − oracle_skip_strict)`` — the
      validation loss, with every unit of strict oracle skip below the floor costing ``penalty`` nats.

    A figure that is missing or non-finite (e.g. NaN loss) gives ``nan``, which Optuna records as a failed trial.
    """
    spec = objective_spec(objective)
    name = spec["name"]
    probe = summary.get("probe")
    if name not in TRAINING_OBJECTIVES and probe is None:
        raise ValueError(f"objective {name!r} reads the probe summary, but the run has no probe record: keep the "
                         "ee_probe callback (callbacks=default) or use objective.name=val_loss")

    def number(value: Any) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return float("nan")
        return value if math.isfinite(value) else float("nan")

    def from_probe(key: str) -> float:
        if key not in probe:
            raise ValueError(f"objective {key!r} is not in the probe summary; available: {sorted(probe)}")
        return number(probe[key])

    if name == "val_loss":
        return number(summary.get("val_loss"))
    if name == "train_loss":
        return number(summary.get("final_train_loss"))
    penalty = float(spec["penalty"])
    # (a NaN input must give NaN: max(0.0, nan) would silently be 0.0)
    if name == "eas_at_loss_bound":
        eas, val_loss = from_probe("eas"), number(summary.get("val_loss"))
        if math.isnan(eas) or math.isnan(val_loss):
            return float("nan")
        return eas - penalty * max(0.0, val_loss - float(spec["loss_bound"]))
    if name == "val_loss_at_skip_floor":
        skip, val_loss = from_probe("oracle_skip_strict"), number(summary.get("val_loss"))
        if math.isnan(skip) or math.isnan(val_loss):
            return float("nan")
        return val_loss + penalty * max(0.0, float(spec["skip_floor"]) - skip)
    return from_probe(name)


# ----------------------------------------------------------------------------------------------------------------------
# The Hydra app: ``ee-train`` and ``python train.py``.


def check_objective(cfg: DictConfig) -> None:
    """Fail before training when the objective cannot be computed; warn when the sweeper optimises it the wrong way."""
    objective = cfg.get("objective")
    name = objective_spec(objective)["name"]
    if objective_needs_probe(objective) and not (cfg.get("callbacks") or {}).get("ee_probe"):
        raise ValueError(f"objective {name!r} is a probe figure but the ee_probe callback is off; keep "
                         "callbacks.ee_probe or use objective.name=val_loss")
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = HydraConfig.get().sweeper.get("direction")
    except Exception:  # noqa: BLE001  (no Hydra runtime, or a sweeper without a direction)
        direction = None
    expected = OBJECTIVE_DIRECTIONS.get(name)
    if isinstance(direction, str) and expected and direction.lower() != expected:
        log.warning("objective %r is meant to be %sd but hydra.sweeper.direction=%s", name, expected, direction)


def run_app(cfg: DictConfig) -> float:
    """One job of the Hydra app: train, then return ``cfg.objective`` (what a sweeper such as Optuna optimises)."""
    check_objective(cfg)
    summary = train(cfg)
    value = objective_value(summary, cfg.get("objective"))
    log.info("objective %s = %s", OmegaConf.select(cfg, "objective.name", default=cfg.get("objective")), value)
    return value


def main() -> None:
    """``ee-train [group=option ...] [key=value ...] [-m ...]``: the Hydra app with this package's configs (the
    checkout's ``conf/``, or ``pkg://ee_callbacks.conf`` inside an installed wheel)."""
    import hydra

    # On a CPU shared with other processes, OpenMP threads that spin while waiting make every step many times slower
    # (measured 14x on 2 cores); passive waiting costs little when the machine is idle. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    register_configs()
    app = hydra.main(config_path=config_source(), config_name="train", version_base="1.3")(run_app)
    app()


def _current_wandb_run() -> Any:
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _finish_wandb(exit_code: int) -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except Exception as error:  # noqa: BLE001  (closing W&B must never mask the run's own outcome)
        warnings.warn(f"wandb.finish() failed: {error}", stacklevel=2)
