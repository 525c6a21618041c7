"""Where ``ee-analyze`` finds checkpoints and how it loads them: train.py run directories and Lightning ``.ckpt``
files (the model rebuilt from the run's saved config), Hugging Face directories and hub ids, GGUF files. Loading never
probes random weights quietly (:func:`check_all_weights_loaded`). :mod:`ee_callbacks.analyze` re-exports the public
names."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["ArchitectureNeededError", "Checkpoint", "LoadOptions", "UninitialisedWeightsError",
           "check_all_weights_loaded", "default_device_and_dtype", "discover", "load_gguf", "load_tokenizer",
           "parse_dtype"]


class UninitialisedWeightsError(ValueError):
    """A checkpoint that would leave weights of the model at their random initialisation."""


class ArchitectureNeededError(ValueError):
    """A checkpoint that holds weights but not the architecture to load them into; the message says what to pass."""


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded: the dtype of their weights and whether Hugging Face remote code may run.

    ``model_config``: a Hugging Face ``config.json`` (or a directory holding one) giving the architecture of
    checkpoints that do not carry it (a Lightning ``.ckpt`` of one's own LightningModule, a bare state-dict file);
    ``model_attr``: where the model's weights sit in such a checkpoint (the attribute path in the LightningModule,
    e.g. ``net`` or ``model.backbone``; found automatically when None)."""

    dtype: torch.dtype = torch.float32
    trust_remote_code: bool = False
    model_config: Optional[str] = None
    model_attr: Optional[str] = None


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


class _Unimportable:
    """Stands in for an object whose class the analysing process cannot import (a config class defined in the
    training script, saved by ``save_hyperparameters()``): its state is kept, the weights load."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.__dict__["state"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Unimportable,), {"__module__": f"unimportable.{module}"})


def _torch_load(path: Path):
    """``torch.load`` of a whole file; objects of classes this process cannot import load as stand-ins (with a
    warning) instead of failing the checkpoint."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as err:
        warnings.warn(f"{path}: {err}; the objects of classes that cannot be imported here are replaced by "
                      "stand-ins (only the weights are needed)", RuntimeWarning)
        lenient = types.SimpleNamespace(__name__="pickle", Unpickler=_LenientUnpickler, load=pickle.load)
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=lenient)


def _load_lightning_ckpt(path: Path, run_cfg: Optional[dict], options: LoadOptions = LoadOptions()):
    """Rebuild the model of a Lightning checkpoint and load its weights (every weight, or an error): a train.py
    checkpoint from its saved zoo config, any other from ``options.model_config`` or a Hugging Face config found in
    its hyper_parameters (:func:`_foreign_model`)."""
    from .training.zoo import build_model

    ckpt = _torch_load(path)
    if isinstance(ckpt, torch.nn.Module):  # torch.save(module) under a .ckpt name
        ckpt = {"state_dict": ckpt.state_dict()}
    hparams = ckpt.get("hyper_parameters") or {}
    # Lightning keeps the module's weights under state_dict; Fabric's fabric.save(path, {"model": ...}) at the top
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else _flatten_tensors(ckpt)
    model_cfg = hparams.get("model") or (run_cfg or {}).get("model")
    vocab = hparams.get("vocab_size")
    if options.model_config is None and isinstance(model_cfg, dict) and "arch" in model_cfg and vocab is not None:
        model, tok = build_model(model_cfg, vocab), _run_tokenizer(path)
        _load_weights(model, state, "model.", str(path))
    else:
        model, tok = _load_foreign(path, state, hparams, options)
    model.to(dtype=options.dtype).eval()
    return model, tok, int(ckpt.get("global_step", _step_from_name(path.name)))


def _load_weights(model: torch.nn.Module, state: dict, prefix: str, source: str) -> None:
    """Load the weights under ``prefix`` of ``state`` into ``model``: every weight of the model, or an error."""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: another width, depth or vocabulary
        raise UninitialisedWeightsError(f"{source}: the weights do not fit the model built from its config ({err}); "
                                        "is the model config this checkpoint's architecture?") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied unembedding is stored once; it must really be tied to count as loaded
    check_all_weights_loaded(model, list(missing), list(unexpected), source)


def _load_foreign(path: Path, state: dict, hparams: dict, options: LoadOptions):
    """(model, tokenizer or None) of a checkpoint train.py did not write: the architecture from
    :func:`_foreign_model`, every weight of it from ``state`` under the prefix :func:`_weights_prefix` finds."""
    model, tok = _foreign_model(path, hparams, options)
    _load_weights(model, state, _weights_prefix(model, state, path, options.model_attr), str(path))
    return model, tok


_NEEDS_CONFIG = ("pass --model-config DIR: a Hugging Face config.json of the model, or the directory holding one "
                 "(what `model.config.save_pretrained(DIR)` or `model.save_pretrained(DIR)` writes); the weights "
                 "are then found in the file by their names (--model-attr net picks the attribute when several "
                 "models of that architecture are in it)")


def _foreign_model(path: Path, hparams: dict, options: LoadOptions):
    """(model with fresh weights, tokenizer or None) for a checkpoint train.py did not write: the architecture comes
    from ``--model-config``, else from a Hugging Face config the LightningModule saved with
    ``save_hyperparameters()`` (a ``PretrainedConfig`` or a dict with ``model_type``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    remote = {"trust_remote_code": True} if options.trust_remote_code else {}
    tok = None
    if options.model_config is not None:
        where = Path(os.path.expanduser(options.model_config))
        if not (where / "config.json").is_file() and not (where.is_file() and where.suffix == ".json"):
            raise ArchitectureNeededError(f"--model-config {options.model_config}: no config.json there; "
                                          + _NEEDS_CONFIG)
        config = AutoConfig.from_pretrained(str(where), **remote)
        tok = load_tokenizer(where, required=False) if where.is_dir() else None
    else:
        found = [v for v in (hparams or {}).values()
                 if isinstance(v, PretrainedConfig) or (isinstance(v, dict) and "model_type" in v)]
        if not found:
            raise ArchitectureNeededError(f"{path}: its hyper_parameters hold no model config (not written by "
                                          f"train.py, no Hugging Face config saved with it); " + _NEEDS_CONFIG)
        config = found[0] if isinstance(found[0], PretrainedConfig) else AutoConfig.for_model(**found[0])
    return AutoModelForCausalLM.from_config(config, **remote), tok


def _weights_prefix(model: torch.nn.Module, state: dict, source: Path, model_attr: Optional[str]) -> str:
    """The key prefix under which ``state`` holds the weights of ``model`` (``net.`` for a LightningModule's
    ``self.net``): ``model_attr`` when given, else the one prefix under which every weight of the model is found."""
    if model_attr is not None:
        prefix = model_attr.strip(".") + "." if model_attr.strip(".") else ""
        if not any(key.startswith(prefix) for key in state):
            raise ValueError(f"{source}: no weights under --model-attr {model_attr!r}; its top-level names are "
                             f"{sorted({key.split('.')[0] for key in state})[:12]}")
        return prefix
    needed = {name for name, _ in model.named_parameters()}  # a tied weight once
    found: dict = {}  # prefix -> the model's weight names found under it
    for key in state:
        parts = key.split(".")
        for cut in range(len(parts)):
            if ".".join(parts[cut:]) in needed:
                found.setdefault(".".join(parts[:cut]) + "." if cut else "", set()).add(".".join(parts[cut:]))
    counts = {prefix: len(names) for prefix, names in found.items()}
    complete = sorted(prefix for prefix, count in counts.items() if count == len(needed))
    if len(complete) > 1:
        raise ValueError(f"{source}: the weights of several models of this architecture are in the file, under "
                         f"{[p.rstrip('.') or '(top level)' for p in complete]}: pass --model-attr with one of them")
    if complete:
        return complete[0]
    if not counts:
        raise ValueError(f"{source}: no weight of the {type(model).__name__} built from the model config is in the "
                         f"file (its keys look like {list(state)[:4]}): is the config the architecture of this "
                         "checkpoint?")
    return max(counts, key=counts.get)  # the nearest; loading names the weights it lacks


def _run_tokenizer(ckpt_path: Path):
    """The run's saved Hugging Face tokenizer (``<run dir>/tokenizer``, written by ``train``), else ``None``."""
    for run_dir in (ckpt_path.parent.parent, ckpt_path.parent):
        if (run_dir / "tokenizer" / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    return None


def load_tokenizer(path, required: bool = True):
    """A Hugging Face tokenizer from a directory (``save_pretrained``, or a lone ``tokenizer.json`` of the
    ``tokenizers`` package) or a ``tokenizer.json`` file; ``None`` when ``required`` is False and there is none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(os.path.expanduser(str(path)))
    file = path if path.is_file() else path / "tokenizer.json"
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    if file.is_file() and file.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(file))
    if required:
        raise FileNotFoundError(f"--tokenizer {path}: not a tokenizer directory (tokenizer_config.json or "
                                "tokenizer.json) nor a tokenizer.json file")
    return None


_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _load_state_dict_file(path: Path, options: LoadOptions):
    """A model from a bare weights file (``torch.save(model.state_dict())``, a safetensors file, or a dict holding
    one) and the architecture of ``options.model_config``."""
    if options.model_config is None:
        raise ArchitectureNeededError(f"{path}: a weights file without the model's architecture; " + _NEEDS_CONFIG)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = _torch_load(path)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    state = _flatten_tensors(state) if isinstance(state, dict) else {}
    model, tok = _load_foreign(path, state, {}, options)
    return model.to(dtype=options.dtype).eval(), tok


def _flatten_tensors(mapping: dict, prefix: str = "") -> dict:
    """The tensors of a nested dict under dotted keys (``{"model": state_dict}`` → ``model.<name>``)."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            out.update(_flatten_tensors(value, f"{prefix}{key}."))
    return out


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
            entries = [_lightning_entry(ck, run_cfg, series=str(path), options=options)
                       for ck in _distinct_checkpoints(ckpt_dir)]
            found.extend(sorted(entries, key=lambda e: e.step))
        elif path.is_file() and path.suffix == ".ckpt":
            run_cfg = _run_config(path.parent.parent) or _run_config(path.parent)
            found.append(_lightning_entry(path, run_cfg, series=str(path.parent), options=options))
        elif path.is_file() and path.suffix in _STATE_DICT_SUFFIXES:
            found.append(_weights_file_entry(path, str(path), options))
        elif path.is_file() and path.suffix == ".gguf":
            found.append(Checkpoint(key=str(path.resolve()), step=0, series=str(path), name=path.stem,
                                    load=lambda p=path: load_gguf(p, options)))
        elif path.is_dir() and (path / "config.json").exists():
            found.append(Checkpoint(key=str(path.resolve()), step=_hf_dir_step(path), series=str(path.parent),
                                    name=path.name, load=lambda p=path: _hf_load(str(p), options=options)))
        elif path.is_dir():
            subs = sorted((p for p in path.iterdir() if (p / "config.json").exists()), key=lambda p: _hf_dir_step(p))
            # weights files only where there are no model directories (a HF Trainer's training_args.bin is none)
            files = [] if subs else [p for p in path.iterdir() if p.is_file() and p.suffix in _STATE_DICT_SUFFIXES]
            if not subs and not files:
                raise FileNotFoundError(f"{path}: no checkpoints/*.ckpt, config.json, model sub-directories or weights "
                                        f"files ({', '.join(_STATE_DICT_SUFFIXES)}) found")
            for sub in subs:
                found.append(Checkpoint(key=str(sub.resolve()), step=_hf_dir_step(sub), series=str(path),
                                        name=path.name, load=lambda p=sub: _hf_load(str(p), options=options)))
            found.extend(sorted((_weights_file_entry(f, str(path), options) for f in files), key=lambda e: e.step))
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
                f"{source}: not a run directory, .ckpt, weights file ({', '.join(_STATE_DICT_SUFFIXES)}), GGUF file, "
                "Hugging Face model directory or hub id"
            )
    return found


def _weights_file_entry(path: Path, series: str, options: LoadOptions) -> Checkpoint:
    return Checkpoint(key=str(path.resolve()), step=_step_from_name(path.stem), series=series, name=path.stem,
                      load=lambda: _load_state_dict_file(path, options))


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

    step = _ckpt_step(ck)
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
    try:  # mmap: only the small global_step is read, not the weights
        return int(torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:  # not Lightning's (Fabric's, a torch.save of one's own) or unreadable: the name's number
        return _step_from_name(path.name)


def _ckpt_step(path: Path) -> int:
    """A Lightning checkpoint's step: from its name when it says (``epoch=0-step=10``), else its ``global_step``."""
    named = re.findall(r"step[=_-]?(\d+)", path.stem)
    return int(named[-1]) if named else _ckpt_global_step(path)


def _distinct_checkpoints(ckpt_dir: Path) -> list:
    """The ``*.ckpt`` files of a directory, one per step: a symlink (``last.ckpt`` -> ``epoch=1-step=20.ckpt``)
    and a copy of another step (``last.ckpt`` written at the same step) are left out, the named file kept."""
    by_target: dict = {}
    for ck in sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.is_symlink() or p.name.startswith("last"), p.name)):
        by_target.setdefault(ck.resolve(), ck)
    by_step: dict = {}
    for ck in by_target.values():  # named files first: a last.ckpt of an already seen step adds nothing
        by_step.setdefault(_ckpt_step(ck), ck)
    return [by_step[step] for step in sorted(by_step)]


# ------------------------------------------------------------------------------------------------------------ probe data
