"""Where ``ee-analyze`` finds checkpoints and how it loads them: train.py run directories and Lightning ``.ckpt``
files (the model rebuilt from the run's saved config), Hugging Face directories and hub ids, GGUF files. Loading never
probes random weights quietly (:func:`check_all_weights_loaded`). :mod:`ee_callbacks.analyze` re-exports the public
names."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["Checkpoint", "LoadOptions", "UninitialisedWeightsError", "check_all_weights_loaded",
           "default_device_and_dtype", "discover", "load_gguf", "parse_dtype"]


class UninitialisedWeightsError(ValueError):
    """A checkpoint that would leave weights of the model at their random initialisation."""


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded: the dtype of their weights and whether Hugging Face remote code may run."""

    dtype: torch.dtype = torch.float32
    trust_remote_code: bool = False


def default_device_and_dtype() -> tuple[str, torch.dtype]:
    """``("cuda", bfloat16)`` when a CUDA GPU is available (float16 where it lacks bfloat16), else ``("cpu", float32)``."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype from its name (``float32``, ``bfloat16``/``bf16``, ``float16``/``fp16``, ``float64``)."""
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def check_all_weights_loaded(model: torch.nn.Module, missing: list, unexpected: list, source: str) -> None:
    """Raise :class:`UninitialisedWeightsError` unless every weight of ``model`` came from the checkpoint.

    A missing key is accepted only when the parameter it names shares its storage with a loaded one (a tied
    unembedding, e.g. ``lm_head.weight`` tied to the input embedding after ``tie_weights()``). Unexpected keys mean
    the file belongs to another architecture and fail as well.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    missing_set = set(missing)
    loaded = {id(p) for name, p in params.items() if name not in missing_set}
    # only parameters count: buffers the model recomputes itself (rotary inv_freq, causal masks) are not weights
    really_missing = [name for name in missing if name in params and id(params[name]) not in loaded]
    if really_missing or unexpected:
        raise UninitialisedWeightsError(
            f"{source}: loading would leave {len(really_missing)} weight(s) uninitialised "
            f"{really_missing[:6]}{' ...' if len(really_missing) > 6 else ''}"
            + (f" and ignore {len(unexpected)} unexpected key(s) {list(unexpected)[:6]}" if unexpected else "")
            + "; refusing to probe random weights (is this checkpoint from another architecture or version?)")


@dataclass
class Checkpoint:
    """One model to probe: how to load it, its step and the key under which it is recorded."""

    key: str
    step: int
    load: Callable[[], tuple]  # -> (model, tokenizer or None)
    series: str = ""
    probe_source: Optional[Callable[[], torch.Tensor]] = None
    probe_defaults: dict = field(default_factory=dict)
    name: Optional[str] = None  # the model's name in records and reports


def _step_from_name(name: str) -> int:
    """Integer step from a checkpoint or revision name: 'step=000200', 'step_000200', 'checkpoint-1000', 'step1000'."""
    for pattern in (r"step[=_-]?(\d+)", r"checkpoint[-_](\d+)", r"(\d+)"):
        found = re.findall(pattern, name)
        if found:
            return int(found[-1])
    return 0


def _cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("EE_CACHE_DIR", "~/.cache/ee_callbacks")))


# ------------------------------------------------------------------------------------------------------------ loaders


def _run_config(run_dir: Path) -> Optional[dict]:
    """The run's resolved ``config.yaml`` (plain YAML: read without Hydra), else Hydra's ``.hydra/config.yaml``."""
    if (run_dir / "config.yaml").exists():
        import yaml

        return yaml.safe_load((run_dir / "config.yaml").read_text())
    candidate = run_dir / ".hydra" / "config.yaml"
    if candidate.exists():
        try:
            from omegaconf import OmegaConf
        except ImportError as err:
            raise ImportError(f"{candidate} needs omegaconf to read: pip install 'ee_callbacks[train]'") from err
        cfg = OmegaConf.load(candidate)
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:
            return OmegaConf.to_container(cfg, resolve=False)
    return None


def _load_lightning_ckpt(path: Path, run_cfg: Optional[dict], options: LoadOptions = LoadOptions()):
    """Rebuild the zoo model of a train.py checkpoint and load its weights (every weight, or an error)."""
    from .training.zoo import build_model

    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    hparams = ckpt.get("hyper_parameters") or {}
    model_cfg = hparams.get("model") or (run_cfg or {}).get("model")
    vocab = hparams.get("vocab_size")
    if model_cfg is None or vocab is None:
        raise ValueError(f"{path} holds no model config / vocab_size in its hyper_parameters: not a train.py checkpoint")
    model = build_model(model_cfg, vocab)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied unembedding is stored once; it must really be tied to count as loaded
    check_all_weights_loaded(model, list(missing), list(unexpected), str(path))
    model.to(dtype=options.dtype).eval()
    return model, _run_tokenizer(path), int(ckpt.get("global_step", _step_from_name(path.name)))


def _run_tokenizer(ckpt_path: Path):
    """The run's saved Hugging Face tokenizer (``<run dir>/tokenizer``, written by ``train``), else ``None``."""
    for run_dir in (ckpt_path.parent.parent, ckpt_path.parent):
        if (run_dir / "tokenizer" / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    return None


def _hf_load(path_or_id: str, revision: Optional[str] = None, gguf_file: Optional[str] = None,
             options: LoadOptions = LoadOptions()):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if revision:
        kwargs["revision"] = revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if options.trust_remote_code:
        kwargs["trust_remote_code"] = True
    model, info = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=options.dtype, output_loading_info=True,
                                                       **kwargs)
    check_all_weights_loaded(model, list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or []),
                             path_or_id if not revision else f"{path_or_id}@{revision}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise UninitialisedWeightsError(f"{path_or_id}: {len(mismatched)} weight(s) have another shape in the file "
                                        f"and were re-initialised: {[m[0] if isinstance(m, (tuple, list)) else m for m in mismatched][:6]}")
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    except Exception:
        tok = None
    return model.eval(), tok


def load_gguf(path: Path, options: LoadOptions = LoadOptions()):
    """A GGUF causal LM as a transformers model in ``options.dtype``; dequantised once and cached as float32
    safetensors. Fails if the dequantised weights leave any weight of the model uninitialised."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError("reading GGUF files needs `pip install gguf accelerate`") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cache = _cache_dir() / "gguf" / f"{path.stem}-{digest}"
    if (cache / "config.json").exists():
        model, info = AutoModelForCausalLM.from_pretrained(str(cache), dtype=options.dtype, output_loading_info=True)
        check_all_weights_loaded(model, list(info.get("missing_keys") or []),
                                 list(info.get("unexpected_keys") or []), str(cache))
        tok = AutoTokenizer.from_pretrained(str(cache))
        return model.eval(), tok
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # weights are dequantised: store them as plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    check_all_weights_loaded(model, list(missing), list(unexpected), str(path))
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(cache))
    tok.save_pretrained(str(cache))
    return model.to(dtype=options.dtype).eval(), tok


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def discover(sources: list, revisions: Optional[list] = None, options: LoadOptions = LoadOptions()) -> list:
    """Expand SOURCE arguments into :class:`Checkpoint` entries, ordered by step within each source; their models
    load as ``options`` says."""
    found: list = []
    for source in sources:
        path = Path(os.path.expanduser(str(source)))
        if path.is_dir() and ((path / "checkpoints").is_dir() or list(path.glob("*.ckpt"))):
            ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            run_cfg = _run_config(path)
            ckpts = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
            if not ckpts:
                ckpts = sorted(ckpt_dir.glob("*.ckpt"))
            entries = []
            for ck in ckpts:
                entries.append(_lightning_entry(ck, run_cfg, series=str(path), options=options))
            found.extend(sorted(entries, key=lambda e: e.step))
        elif path.is_file() and path.suffix == ".ckpt":
            run_cfg = _run_config(path.parent.parent) or _run_config(path.parent)
            found.append(_lightning_entry(path, run_cfg, series=str(path.parent), options=options))
        elif path.is_file() and path.suffix == ".gguf":
            found.append(Checkpoint(key=str(path.resolve()), step=0, series=str(path), name=path.stem,
                                    load=lambda p=path: load_gguf(p, options)))
        elif path.is_dir() and (path / "config.json").exists():
            found.append(Checkpoint(key=str(path.resolve()), step=_hf_dir_step(path), series=str(path.parent),
                                    name=path.name, load=lambda p=path: _hf_load(str(p), options=options)))
        elif path.is_dir():
            subs = sorted((p for p in path.iterdir() if (p / "config.json").exists()), key=lambda p: _hf_dir_step(p))
            if not subs:
                raise FileNotFoundError(f"{path}: no checkpoints/*.ckpt, config.json or model sub-directories found")
            for sub in subs:
                found.append(Checkpoint(key=str(sub.resolve()), step=_hf_dir_step(sub), series=str(path),
                                        name=path.name, load=lambda p=sub: _hf_load(str(p), options=options)))
        elif not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            if _hub_offline():
                raise RuntimeError(
                    f"{source!r} looks like a Hugging Face hub id, but the hub is offline (HF_HUB_OFFLINE=1): "
                    "download the revisions elsewhere and pass their local directories, or unset HF_HUB_OFFLINE"
                )
            revs = revisions or ["main"]
            for rev in revs:
                found.append(Checkpoint(key=f"{source}@{rev}", step=_step_from_name(rev) if rev != "main" else 0,
                                        series=str(source), name=str(source),
                                        load=lambda s=str(source), r=rev: _hf_load(s, r, options=options)))
        else:
            raise FileNotFoundError(
                f"{source}: not a run directory, .ckpt, GGUF file, Hugging Face model directory or hub id"
            )
    return found


def _hf_dir_step(path: Path) -> int:
    state = path / "trainer_state.json"
    if state.exists():
        try:
            return int(json.loads(state.read_text()).get("global_step", 0))
        except (ValueError, OSError):
            pass
    return _step_from_name(path.name)


def _lightning_entry(ck: Path, run_cfg: Optional[dict], series: str, options: LoadOptions = LoadOptions()) -> Checkpoint:
    def load(p=ck, cfg=run_cfg):
        model, tok, _ = _load_lightning_ckpt(p, cfg, options)
        return model, tok

    step = _step_from_name(ck.stem) if ck.name != "last.ckpt" else _ckpt_global_step(ck)
    probe_src, defaults = None, {}
    if run_cfg is not None and run_cfg.get("data") and run_cfg.get("tokenizer"):
        def probe_src(cfg=run_cfg):  # noqa: F811
            from .training.corpus import validation_blocks

            return validation_blocks(cfg["data"], cfg["tokenizer"])

        ee = ((run_cfg.get("callbacks") or {}).get("ee_probe") or {})
        # the callback's probe_set group (runs saved before it was grouped kept the keys flat, probe_sequences)
        drawn = {**{k: ee.get(k) for k in ("probe_sequences", "seq_len", "seed", "batch_size")},
                 **{("probe_sequences" if k == "sequences" else k): v for k, v in (ee.get("probe_set") or {}).items()}}
        defaults = {k: v for k, v in drawn.items() if v is not None}
        if ee.get("config"):
            defaults["config"] = ee["config"]
    name = ((run_cfg or {}).get("model") or {}).get("name")
    return Checkpoint(key=str(ck.resolve()), step=step, load=load, series=series, probe_source=probe_src,
                      probe_defaults=defaults, name=name)


def _ckpt_global_step(path: Path) -> int:
    try:
        return int(torch.load(str(path), map_location="cpu", weights_only=False).get("global_step", 0))
    except Exception:
        return _step_from_name(path.name)


# ------------------------------------------------------------------------------------------------------------ probe data
