"""Structured-config schemas for the Hydra groups, and helpers to compose the project's config outside ``@hydra.main``.

The schemas are registered in Hydra's ``ConfigStore`` (``register_configs()``) and each group's YAML files list
theirs first in their defaults list (e.g. ``trainer/default.yaml``: ``defaults: [schema_trainer, _self_]``). Types
are therefore checked when the config is composed: ``trainer.max_steps=abc`` fails before anything runs, and an
unknown key (``trainer.max_step=5``) is rejected.

Lightning ``Trainer`` kwargs that the schema does not list go under ``trainer.extra`` (``+trainer.extra.plugins=...``);
they are passed to the ``Trainer`` as they are.

The ``callbacks`` and ``logger`` groups are typed the same way, but their schemas are derived from the signature of
each entry's ``_target_`` (:func:`schema_from_signature`), so they cannot drift from the classes they configure. Their
YAML files name the schema as an *optional* default (``- optional /ee_schema/callbacks@ee_probe: ee_probe``):
copied into another Hydra project they compose as they are (untyped), and typed there too once that project calls
:func:`register_configs`. Keywords a schema does not list go under ``extra`` (as for ``trainer.extra``).

The app's configs live in the repository's top-level ``conf/``; the wheel ships the same files as the package data
``ee_callbacks/conf`` (see ``pyproject.toml``), found through Hydra's ``pkg://`` search path (:func:`config_source`).

This module imports neither Lightning nor transformers at import time (:func:`register_configs` imports the callback
and logger classes to read their signatures).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_CHECKOUT_DIR = _PACKAGE_DIR.parent
#: the package holding the configs inside an installed wheel (Hydra: ``pkg://ee_callbacks.conf``)
CONF_PACKAGE = "ee_callbacks.conf"


def checkout_conf_dir() -> Path | None:
    """The repository's ``conf/`` when the package is used from a checkout (``PYTHONPATH`` or ``pip install -e``)."""
    candidate = _CHECKOUT_DIR / "conf"
    if (candidate / "train.yaml").is_file() and (_CHECKOUT_DIR / "pyproject.toml").is_file():
        return candidate
    return None


def config_source() -> str:
    """Where the app's configs are, as Hydra takes it for ``config_path``: the checkout's ``conf/`` directory
    (absolute path) when there is one, else ``pkg://ee_callbacks.conf`` (the copy inside the installed wheel)."""
    checkout = checkout_conf_dir()
    if checkout is not None:
        return str(checkout)
    if (_PACKAGE_DIR / "conf" / "train.yaml").is_file() or importlib.util.find_spec(CONF_PACKAGE) is not None:
        return f"pkg://{CONF_PACKAGE}"
    raise FileNotFoundError(f"the ee_callbacks configs were found neither in a checkout ({_CHECKOUT_DIR / 'conf'}) nor "
                            f"in the installed package ({_PACKAGE_DIR / 'conf'}); reinstall ee_callbacks")


# Kept for code that composes with ``initialize_config_dir`` from a checkout; prefer :func:`config_source`.
CONF_DIR = checkout_conf_dir() or (_PACKAGE_DIR / "conf")


def plain_dict(cfg: Any) -> dict:
    """A plain ``dict`` from a DictConfig / Mapping / ``None``, with interpolations resolved."""
    if cfg is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


# Typing note: OmegaConf validates the annotated types below; ``Any`` leaves a field unchecked (used where Lightning
# accepts several types, e.g. ``devices: 1 | "auto" | [0, 1]``). ``typing.Dict/List/Optional`` are used because
# OmegaConf's structured configs read the annotations at runtime.


@dataclass
class TrainerSchema:
    """``lightning.pytorch.Trainer`` kwargs (same defaults as Lightning) plus ``extra`` for anything else."""

    accelerator: str = "auto"
    strategy: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None
    fast_dev_run: Any = False
    max_epochs: Optional[int] = None
    min_epochs: Optional[int] = None
    max_steps: int = -1
    min_steps: Optional[int] = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: Optional[int] = None
    log_every_n_steps: Optional[int] = None
    enable_checkpointing: Optional[bool] = None
    enable_progress_bar: Optional[bool] = None
    enable_model_summary: Optional[bool] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None
    deterministic: Any = None
    benchmark: Optional[bool] = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: Any = None
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    enable_autolog_hparams: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSchema:
    """Fields every data source has."""

    source: str = "fortunes"
    seq_len: int = 128
    batch_size: int = 16
    val_batch_size: Optional[int] = None
    val_fraction: float = 0.05
    max_val_blocks: Optional[int] = None
    split_seed: int = 0
    num_workers: int = 0
    cache_tokens: bool = True
    cache_dir: Optional[str] = None


@dataclass
class FortunesDataSchema(DataSchema):
    source: str = "fortunes"
    files: Optional[List[str]] = None


@dataclass
class SyntheticDataSchema(DataSchema):
    source: str = "synthetic"
    num_documents: int = 256
    document_length: int = 512
    generator_seed: int = 0
    num_patterns: int = 16
    pattern_length: int = 6
    segment_weights: Optional[Dict[str, float]] = None
    num_token_ids: Optional[int] = None  # tokens lie in [0, num_token_ids); null: the whole vocabulary


@dataclass
class TextFilesDataSchema(DataSchema):
    source: str = "text_files"
    paths: List[str] = field(default_factory=list)
    document_separator: Optional[str] = None
    encoding: str = "utf-8"


@dataclass
class HFDataSchema(DataSchema):
    source: str = "hf"
    name: Optional[str] = None
    config_name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    max_documents: Optional[int] = None


@dataclass
class TokenizerSchema:
    kind: str = "byte"  # byte | bpe | hf
    vocab_size: int = 4096  # bpe only
    min_frequency: int = 2  # bpe only
    path: Optional[str] = None  # bpe: a saved tokenizer.json; hf: a local tokenizer directory or a hub id
    revision: Optional[str] = None  # hf with a hub id only
    cache_dir: Optional[str] = None


@dataclass
class ModelSchema:
    name: str = "model"
    family: str = "dense"  # dense | moe | ssm
    arch: str = "llama"  # a transformers model_type, or "pretrained"
    dropout: Optional[float] = 0.0  # null (hf_pretrained): keep the checkpoint's dropout
    attn_implementation: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)
    # arch: pretrained only
    path: Optional[str] = None  # a local directory or a hub id owner/name (online)
    revision: Optional[str] = None  # hub ids only: a branch, tag or commit
    gguf_file: Optional[str] = None
    dtype: Optional[str] = None


@dataclass
class OptimSchema:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    scheduler: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.1


# ------------------------------------------------------------------------------------------------------------------
# Callback and logger schemas, derived from the signature of what they instantiate.

_SIMPLE_TYPES = (int, float, bool, str)


def _omegaconf_type(annotation: Any) -> Any:
    """The closest type OmegaConf can validate: ``int/float/bool/str``, their ``Optional``, ``List[...]`` of them;
    ``Any`` for everything else (a path, a union of several types, an object)."""
    if annotation in _SIMPLE_TYPES:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            inner = _omegaconf_type(rest[0])
            return Any if inner is Any else Optional[inner]
        return Any
    if origin in (list, tuple, Sequence, typing.Sequence) and args:
        item = args[0]
        if item in _SIMPLE_TYPES and (origin is not tuple or len(args) == 1 or args[1] is Ellipsis):
            return List[item]
    return Any


#: settings dataclasses that a grouped argument takes (``ExitHeads(optim=...)``, ``EarlyExitProbe(probe_set=...)``):
#: in a schema each becomes a nested node typed field by field, so ``callbacks.exit_heads.optim.lr=fast`` fails at
#: compose time like a flat key
NESTED_SETTINGS = ("ee_callbacks.heads_optim.OptimSettings", "ee_callbacks.probe_data.ProbeSetSettings")


def _nested_settings(annotation: Any) -> Optional[type]:
    """The settings dataclass of :data:`NESTED_SETTINGS` that ``annotation`` (a class or a union) names, or None."""
    for member in (typing.get_args(annotation) or (annotation,)):
        if dataclasses.is_dataclass(member) and f"{member.__module__}.{member.__qualname__}" in NESTED_SETTINGS:
            return member
    return None


def _settings_schema(settings: type) -> type:
    """A mutable structured-config twin of the dataclass ``settings``: its fields, defaults and nearest types."""
    hints = typing.get_type_hints(settings)
    fields_: list[tuple] = []
    for item in dataclasses.fields(settings):
        default = item.default
        value = list(default) if isinstance(default, tuple) else default
        made = field(default_factory=lambda v=value: v) if isinstance(value, (list, dict)) else field(default=value)
        fields_.append((item.name, _omegaconf_type(hints.get(item.name, Any)), made))
    return dataclasses.make_dataclass(f"{settings.__name__}Schema", fields_)


def schema_from_signature(target: str, name: str | None = None) -> type:
    """A structured-config dataclass for the keyword arguments of ``target`` (a dotted class or function path).

    Each parameter becomes a field with the signature's default (``MISSING`` if it has none) and the nearest type
    OmegaConf checks (:func:`_omegaconf_type`); one taking a settings dataclass of :data:`NESTED_SETTINGS` becomes a
    nested node typed field by field (its defaults filled in), plus ``_target_`` (default ``target``) and ``extra: Dict[str, Any]``
    for keywords the schema does not list (the target's ``**kwargs``, or a parameter whose default is an object),
    which :func:`instantiation_kwargs` passes on as keywords. An unknown key or a badly typed value fails when the
    config is composed.
    """
    module_name, _, attr = target.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attr)
    function = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001  (an annotation that cannot be evaluated: leave every field untyped)
        hints = {}
    fields: list[tuple] = [("_target_", str, field(default=target))]
    for parameter in list(inspect.signature(function).parameters.values()):
        if parameter.name in ("self", "extra") or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        settings = _nested_settings(hints.get(parameter.name))
        if settings is not None and parameter.default is None:  # a grouped argument: a typed nested node
            nested = _settings_schema(settings)
            fields.append((parameter.name, Optional[nested], field(default_factory=nested)))
            continue
        kind = _omegaconf_type(hints.get(parameter.name, Any))
        default = parameter.default
        if default is inspect.Parameter.empty:
            fields.append((parameter.name, kind, field(default="???")))  # OmegaConf's MISSING: must be set
            continue
        if isinstance(default, (list, tuple, dict)):
            value = list(default) if isinstance(default, tuple) else default
            fields.append((parameter.name, kind, field(default_factory=lambda v=value: v)))
        elif default is None or isinstance(default, _SIMPLE_TYPES):
            fields.append((parameter.name, kind, field(default=default)))
        # else: an object default (e.g. a timedelta) that a config cannot hold: left to the target (set it via extra)
    fields.append(("extra", Dict[str, Any], field(default_factory=dict)))
    camel = attr if inspect.isclass(obj) else "".join(part.title() for part in attr.split("_"))
    return dataclasses.make_dataclass(name or f"{camel}Schema", fields)


#: ``(ConfigStore group, name) -> _target_`` of the schemas that the callback and logger YAML files name
TARGET_SCHEMAS = {
    ("ee_schema/callbacks", "ee_probe"): "ee_callbacks.callbacks.probe.EarlyExitProbe",
    ("ee_schema/callbacks", "exit_heads"): "ee_callbacks.callbacks.exit_heads.ExitHeads",
    ("ee_schema/callbacks", "model_checkpoint"): "lightning.pytorch.callbacks.ModelCheckpoint",
    ("ee_schema/callbacks", "lr_monitor"): "lightning.pytorch.callbacks.LearningRateMonitor",
    ("ee_schema/logger", "wandb"): "ee_callbacks.training.loggers.make_wandb_logger",
    ("ee_schema/logger", "csv"): "lightning.pytorch.loggers.CSVLogger",
    ("ee_schema/logger", "tensorboard"): "lightning.pytorch.loggers.TensorBoardLogger",
}


def instantiation_kwargs(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A callback/logger entry as plain keyword arguments for ``hydra.utils.instantiate``: interpolations resolved,
    the ``extra`` mapping (keywords a schema does not list) merged in."""
    kwargs = plain_dict(entry)
    extra = kwargs.pop("extra", None) or {}
    kwargs.update(extra)
    return kwargs


SCHEMAS = {
    ("trainer", "schema_trainer"): TrainerSchema,
    ("data", "schema_fortunes"): FortunesDataSchema,
    ("data", "schema_synthetic"): SyntheticDataSchema,
    ("data", "schema_text_files"): TextFilesDataSchema,
    ("data", "schema_hf"): HFDataSchema,
    ("tokenizer", "schema_tokenizer"): TokenizerSchema,
    ("model", "schema_model"): ModelSchema,
    ("optim", "schema_optim"): OptimSchema,
}


_REGISTERED = False


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore and this app's OmegaConf resolvers (idempotent). Call before
    composing the config. Another Hydra project that copies ``conf/callbacks/ee_probe.yaml`` calls it to get the
    callback's schema checked too."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=group, name=name, node=schema)
    for (group, name), target in TARGET_SCHEMAS.items():
        store.store(group=group, name=name, node=schema_from_signature(target))
    OmegaConf.register_new_resolver("ee_sweep_job", sweep_job_suffix, replace=True)
    OmegaConf.register_new_resolver("ee_sweep_group", sweep_group, replace=True)
    _REGISTERED = True


def _multirun_job() -> Any:
    """Hydra's ``hydra.job`` node when this process runs one job of a ``-m`` sweep, else ``None``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None
    except Exception:  # noqa: BLE001  (no Hydra runtime)
        return None


def sweep_job_suffix(max_overrides_chars: int = 80) -> str:
    """``-j<job number>[-<override dirname>]`` inside a sweep job (resolver ``${ee_sweep_job:}``), ``""`` otherwise:
    appended to W&B run names so that every trial of a sweep has its own name."""
    from omegaconf import OmegaConf

    hydra_cfg = _multirun_job()
    num = None if hydra_cfg is None else OmegaConf.select(hydra_cfg, "job.num", default=None)
    if num is None:  # not a sweep job (or a config composed for a sweep but not launched as one)
        return ""
    suffix = f"-j{num}"
    overrides = str(OmegaConf.select(hydra_cfg, "job.override_dirname", default=None) or "")
    if overrides:
        suffix += "-" + overrides[:max_overrides_chars]
    return suffix


def sweep_group(base: str) -> str:
    """``<base>-<sweep directory name>`` inside a sweep job (resolver ``${ee_sweep_group:${task_name}}``), ``base``
    otherwise: the W&B group that gathers one sweep's trials."""
    from omegaconf import OmegaConf

    hydra_cfg = _multirun_job()
    sweep_dir = None if hydra_cfg is None else OmegaConf.select(hydra_cfg, "sweep.dir", default=None)
    if sweep_dir is None:
        return str(base)
    return f"{base}-{Path(str(sweep_dir)).name}"


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None,
                   config_name: str = "train"):
    """Compose ``conf/<config_name>.yaml`` (:func:`config_source`) with Hydra's compose API (for tests, notebooks and tools).

    ``paths.output_dir`` (normally Hydra's run directory) is set to ``output_dir`` when given; without Hydra's
    runtime it must be given (here or as an override) before calling ``train``.
    """
    from hydra import compose, initialize_config_dir, initialize_config_module
    from omegaconf import open_dict

    register_configs()
    source = config_source()
    if source.startswith("pkg://"):
        context = initialize_config_module(config_module=source[len("pkg://"):], version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=source, version_base="1.3")
    with context:
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def trainer_kwargs(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Trainer`` kwargs of a ``trainer`` config: its fields, with ``extra`` merged in."""
    kwargs = plain_dict(trainer_cfg)
    extra = kwargs.pop("extra", None) or {}
    kwargs.update(extra)
    return kwargs
