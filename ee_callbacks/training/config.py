"""Structured-config schemas for the Hydra groups, and helpers to compose the project's config outside ``@hydra.main``.

The schemas are registered in Hydra's ``ConfigStore`` (``register_configs()``) and each group's YAML files list
theirs first in their defaults list (e.g. ``trainer/default.yaml``: ``defaults: [schema_trainer, _self_]``). Types
are therefore checked when the config is composed: ``trainer.max_steps=abc`` fails before anything runs, and an
unknown key (``trainer.max_step=5``) is rejected.

Lightning ``Trainer`` kwargs that the schema does not list go under ``trainer.extra`` (``+trainer.extra.plugins=...``);
they are passed to the ``Trainer`` as they are.

This module imports neither Lightning nor transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

# The repository's Hydra config directory (the package is used from a checkout: ``pip install -e .``).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent). Call before composing the config."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=group, name=name, node=schema)


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None,
                   config_name: str = "train"):
    """Compose ``conf/<config_name>.yaml`` with Hydra's compose API (for tests, notebooks and tools).

    ``paths.output_dir`` (normally Hydra's run directory) is set to ``output_dir`` when given; without Hydra's
    runtime it must be given (here or as an override) before calling ``train``.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
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
