"""``train(cfg)``: one training run from a composed Hydra config. ``train.py`` at the repository root wraps it.

Everything the run writes lands in ``cfg.paths.output_dir`` (Hydra's run directory under ``@hydra.main``):
checkpoints (``checkpoints/``), logger files (``csv/``, ``tensorboard/``, ``wandb/``), ``config.yaml`` (the resolved
config) and whatever the callbacks write (e.g. ``ee_probes.jsonl``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ee_callbacks.training.config import trainer_kwargs

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
        obj = instantiate(entry)
        if obj is None:  # a builder that declined (e.g. W&B could not start)
            log.warning("%s %r was not created; continuing without it", kind, name)
            continue
        objects.append(obj)
    return objects


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured model and return a summary.

    Returns:
        ``{"run_dir", "first_train_loss" (step 0), "final_train_loss" (mean of the last 10 steps), "val_loss" (at the
        last step), "global_step", "checkpoints" (sorted paths), "model_name", "model_family", "vocab_size"}``.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    from ee_callbacks.training.data import LMDataModule
    from ee_callbacks.training.module import LMModule

    run_dir = resolve_output_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    seed = int(cfg.get("seed", 0))
    pl.seed_everything(seed, workers=True)

    datamodule = LMDataModule(cfg.data, cfg.tokenizer, shuffle_seed=seed)
    module = LMModule(cfg.model, datamodule.vocab_size, cfg.get("optim"), init_seed=seed, run_config=resolved,
                      early_exit=cfg.get("early_exit"))

    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    wandb_run_before = _current_wandb_run()
    loggers: list[Any] = []
    failed = True
    try:
        loggers = instantiate_group(cfg.get("logger"), "logger")
        trainer = pl.Trainer(**trainer_kwargs(cfg.trainer), callbacks=callbacks, logger=loggers or False,
                             default_root_dir=str(run_dir))
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
    }


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
