"""Module-level helpers of :class:`~ee_callbacks.callbacks.probe.EarlyExitProbe`: where the records file goes and
whether it is writable, the run's labels, the metrics a checkpoint monitor sees, the cross-rank reduction of the drift
reference, and the W&B extras sink. :mod:`ee_callbacks.callbacks.probe` re-exports ``default_records_path``."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from lightning.pytorch import Trainer


def _prefix(set_name: str) -> str:
    return "ee" if set_name == "default" else f"ee/{set_name}"


def _publish_callback_metrics(trainer: Trainer, metrics: Mapping) -> None:
    """Put the probe's figures where ModelCheckpoint / EarlyStopping look (every rank: they decide on every rank).
    Lightning keeps ``trainer.callback_metrics`` until the next fit, so a monitor sees the latest probe's value."""
    store = trainer.callback_metrics
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            store[key] = torch.tensor(float(value))


def default_records_path(trainer: Trainer) -> Path:
    """Where a run's ``ee_probes.jsonl`` goes when ``output_path`` is not given (call on global rank zero):

    - a ``WandbLogger``: the W&B run's own directory (``wandb/run-<time>-<id>/files``, synced with the run);
    - a ``TensorBoardLogger`` / ``CSVLogger``: its ``log_dir`` (``<save_dir>/<name>/version_<n>``);
    - any other logger: ``<default_root_dir>/ee_probes/<logger name>/<version or run id>/``;
    - no logger (``fast_dev_run``'s stand-in included): ``default_root_dir`` itself (as Lightning's own
      checkpoints: without a logger there is no run identity, so the directory is the run's; give each run its own,
      or pass ``output_path``).
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from lightning.pytorch.loggers.logger import DummyLogger

    root = Path(trainer.default_root_dir)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            with contextlib.suppress(Exception):
                run_dir = getattr(lg.experiment, "dir", None)
                if run_dir:
                    return Path(run_dir) / "ee_probes.jsonl"
    for lg in trainer.loggers:
        if isinstance(lg, (TensorBoardLogger, CSVLogger)) and lg.log_dir:
            return Path(lg.log_dir) / "ee_probes.jsonl"
    for lg in trainer.loggers:
        if isinstance(lg, DummyLogger):  # fast_dev_run's stand-in: no run of its own, so no directory of its own
            continue
        with contextlib.suppress(Exception):
            name, version = lg.name, lg.version
            if version is not None:
                return root / "ee_probes" / _safe_name(name or type(lg).__name__) / _safe_name(version) \
                    / "ee_probes.jsonl"
    return root / "ee_probes.jsonl"


def _safe_name(value) -> str:
    text = str(value).strip().replace(os.sep, "_")
    return text if text and text not in (".", "..") else "run"


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise OSError(
            f"EarlyExitProbe cannot write its records to {path} ({err}): pass output_path= to a writable file"
        ) from None


def _check_not_shared(trainer: Trainer, callback) -> None:
    """Two probe callbacks writing the same probe set to one file would interleave records no reader can tell
    apart (same step, same set): refuse at fit start, saying how to separate them."""
    for other in trainer.callbacks:
        if other is callback or not isinstance(other, type(callback)) or getattr(other, "_path", None) is None:
            continue
        common = sorted(set(other._sets or {}) & set(callback._sets or {}))
        if callback._path is not None and other._path.resolve() == callback._path.resolve() and common:
            raise ValueError(f"two {type(callback).__name__} callbacks would write probe set(s) {common} to "
                             f"{callback._path}, where their records could not be told apart: give one its own "
                             "output_path=, or name its probe sets (probe_data={'name': data})")


def _looks_like_batch(data: Mapping) -> bool:
    return "input_ids" in data


def _describe_source(source, name: str) -> str:
    if source is None:
        return "validation"
    if isinstance(source, Mapping):
        source = source.get(name)
    return type(source).__name__


def _run_info(trainer: Trainer) -> dict:
    info = {}
    for lg in trainer.loggers:
        with contextlib.suppress(Exception):
            info.setdefault("name", str(lg.name) if lg.name is not None else None)
            info.setdefault("version", str(lg.version) if lg.version is not None else None)
    exp = os.environ.get("EE_EXPERIMENT")
    if exp:
        info["experiment"] = exp
    return info


def _share_drift_reference(reduce, grams: dict, n_reps: int, n_batches: int) -> dict:
    """Every batch's CKA Grams on every rank (two sum all-reduces).

    Each rank computes the Grams of its own batches, but the callback state in a checkpoint is rank 0's: without
    this, every rank resumes with rank 0's reference and drift then covers rank 0's batches only.
    """
    sizes = torch.zeros(n_batches, dtype=torch.float64)
    for index, gram in grams.items():
        sizes[index] = gram.shape[-1]
    sizes = [int(n) for n in reduce(sizes).tolist()]
    flat = torch.zeros(sum(n_reps * n * n for n in sizes), dtype=torch.float32)
    offset = 0
    for index, n in enumerate(sizes):
        if index in grams:
            flat[offset: offset + n_reps * n * n] = grams[index].reshape(-1).float().cpu()
        offset += n_reps * n * n
    flat, offset, shared = reduce(flat).float(), 0, {}
    for index, n in enumerate(sizes):
        if n:
            shared[index] = flat[offset: offset + n_reps * n * n].reshape(n_reps, n, n).clone()
        offset += n_reps * n * n
    return shared


def _make_reduce(trainer: Trainer):
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        device = trainer.strategy.root_device
        out = trainer.strategy.reduce(tensor.to(device), reduce_op="sum")
        return out.to("cpu", torch.float64)

    return reduce


def _make_wandb_extras(trainer: Trainer, wandb_images: bool = False):
    from lightning.pytorch.loggers import WandbLogger

    if not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        return None
    try:
        from ..sinks.wandb_extras import WandbExtras
    except Exception as err:  # pragma: no cover - optional sink
        warnings.warn(f"EarlyExitProbe: W&B extras unavailable ({err})", RuntimeWarning)
        return None
    return WandbExtras(wandb_images=wandb_images)


def _wandb_args(value) -> tuple[bool, bool]:
    """``wandb=``: a bool (the W&B extras on or off) or ``{"extras": bool, "images": bool}`` -> (extras, images)."""
    if isinstance(value, bool):
        return value, False
    if not isinstance(value, Mapping):
        raise TypeError(f"wandb must be true/false or a mapping of extras, images; got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in ("extras", "images"))
    if unknown:
        raise ValueError(f"unknown wandb key(s) {unknown}; allowed: extras, images")
    return bool(value.get("extras", True)), bool(value.get("images", False))


def _cadence_args(value) -> tuple[Optional[float], Optional[int]]:
    """``cadence=``: None (fixed), a share of wall time (``max_overhead``), or ``{"max_overhead": ...,
    "max_every_n_steps": ...}`` -> (max_overhead, max_every_n_steps)."""
    if value is None:
        return None, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    if not isinstance(value, Mapping):
        raise TypeError(f"cadence must be None, a share of wall time (e.g. 0.02) or a mapping of max_overhead, "
                        f"max_every_n_steps; got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in ("max_overhead", "max_every_n_steps"))
    if unknown:
        raise ValueError(f"unknown cadence key(s) {unknown}; allowed: max_overhead, max_every_n_steps")
    return value.get("max_overhead"), value.get("max_every_n_steps")


def _probe_at_args(value: Sequence[str]) -> tuple[bool, bool]:
    """``probe_at=``: which of ``start`` (step 0) and ``end`` (after the last step) also get a probe."""
    points = [value] if isinstance(value, str) else list(value or ())
    unknown = [p for p in points if p not in ("start", "end")]
    if unknown:
        raise ValueError(f"probe_at takes a list of 'start' and/or 'end', got {list(points)!r}")
    return "start" in points, "end" in points


# flat keywords of earlier releases -> (grouped argument, key)
_PROBE_FLAT_KEYWORDS = {
    "probe_sequences": ("probe_set", "sequences"), "seq_len": ("probe_set", "seq_len"),
    "seed": ("probe_set", "seed"), "batch_size": ("probe_set", "batch_size"), "data_name": ("probe_set", "data_name"),
    "max_overhead": ("cadence", "max_overhead"), "max_every_n_steps": ("cadence", "max_every_n_steps"),
    "wandb_extras": ("wandb", "extras"), "wandb_images": ("wandb", "images"),
    "probe_at_start": ("probe_at", "start"), "probe_at_end": ("probe_at", "end"),
}


def _fold_probe_keywords(keywords: Mapping, probe_set, cadence, wandb, probe_at) -> tuple:
    """``EarlyExitProbe``'s flat keywords folded into ``(probe_set, cadence, wandb, probe_at)``."""
    import dataclasses

    from ..settings import fold_flat_keywords

    if dataclasses.is_dataclass(probe_set):
        probe_set = dataclasses.asdict(probe_set)
    if isinstance(cadence, (int, float)) and not isinstance(cadence, bool):
        cadence = {"max_overhead": float(cadence)}
    # a bool `wandb` and the `probe_at` list have no keys to disagree with: flat keywords refine them
    wandb_default = {"extras": wandb} if isinstance(wandb, bool) else None
    start, end = _probe_at_args(probe_at)
    groups = fold_flat_keywords("EarlyExitProbe", keywords, _PROBE_FLAT_KEYWORDS,
                                {"probe_set": probe_set, "cadence": cadence,
                                 "wandb": None if wandb_default else wandb, "probe_at": None})
    if wandb_default is not None:
        wandb = {**wandb_default, **(groups["wandb"] or {})}
        groups["wandb"] = wandb
    at = {"start": start, "end": end, **(groups["probe_at"] or {})}
    return groups["probe_set"], groups["cadence"], groups["wandb"], [p for p in ("start", "end") if at[p]]


def _wandb_run(logger):
    """The W&B run of a ``WandbLogger`` (None without one, or when W&B failed to start: the extras then warn)."""
    with contextlib.suppress(Exception):
        return logger.experiment if logger is not None else None
    return None


def _logged_by_module(trainer: Trainer) -> list:
    """Keys in the probe's ``ee/`` namespace that the module logs itself: the probe logs past ``self.log``, so only
    the user's own keys reach ``trainer.logged_metrics``."""
    return sorted(key for key in trainer.logged_metrics if key == "ee" or key.startswith("ee/"))


def _monitor_notes(trainer: Trainer, every_n_steps: int, probe_at_start: bool, adaptive: bool) -> list:
    """What a ModelCheckpoint / EarlyStopping that watches a probe figure should know about the probe's cadence."""
    from lightning.pytorch.callbacks import EarlyStopping

    notes = []
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if not isinstance(monitor, str) or not monitor.startswith("ee/"):
            continue
        name = f"{type(callback).__name__}(monitor={monitor!r})"
        if not probe_at_start:
            notes.append(f"{name} watches a probe figure, which exists only once the first probe ran (step "
                         f"{every_n_steps}): a check before then finds no value and Lightning says the key is not "
                         "available; keep probe_at=['start'] (the default) so that it exists from step 0")
        checks = _steps_between_checks(trainer, callback) if isinstance(callback, EarlyStopping) else None
        if checks is not None and (adaptive or checks < every_n_steps):
            notes.append(f"{name} checks every {checks:g} optimizer steps, more often than the probe runs (every "
                         f"{every_n_steps}{' or more' if adaptive else ''} steps): a check between probes sees the "
                         "last probe's value again and counts it as no improvement, so patience="
                         f"{callback.patience} counts checks, not probes; validate at the probe's cadence "
                         f"(val_check_interval={every_n_steps} batches × accumulation) or raise patience")
    return notes


def _steps_between_checks(trainer: Trainer, early_stopping) -> Optional[float]:
    """Optimizer steps between two EarlyStopping checks (None when unknown or when it never checks)."""
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    if getattr(early_stopping, "_check_on_train_epoch_end", False):
        batches = trainer.num_training_batches
    elif getattr(trainer, "enable_validation", True):
        batches = getattr(trainer, "val_check_batch", None)
    else:
        return None
    if not isinstance(batches, (int, float)) or isinstance(batches, bool) or not math.isfinite(batches):
        return None
    return max(1.0, batches / accumulate)
