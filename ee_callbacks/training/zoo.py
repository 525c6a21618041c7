"""The model zoo: causal LMs built from Hugging Face config classes (nothing is downloaded), or loaded from disk.

A model config (Hydra group ``model``) is a mapping:

```yaml
name: llama_tiny          # a label used in logs and probe records
family: dense             # dense | moe | ssm
arch: llama               # a transformers ``model_type`` (llama, gpt2, gpt_neox, qwen2, mixtral, olmoe, mamba2, ...)
dropout: 0.0              # mapped onto the family's dropout kwargs (see DROPOUT_KWARGS)
config: {hidden_size: 128, ...}   # kwargs of the transformers config class
```

``arch: pretrained`` loads a local Hugging Face directory (``path``), a GGUF file in it (``gguf_file``) or a hub id
(``path: owner/name`` with an optional ``revision``: a branch, tag or commit; online only) with ``from_pretrained``;
``config`` then holds config overrides. Offline (``HF_HUB_OFFLINE=1``) a hub id fails at once with a clear message.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ee_callbacks.training.config import plain_dict

FAMILIES = ("dense", "moe", "ssm")

# Which config kwargs a single ``dropout`` value sets, per ``model_type``. Families absent here have no dropout.
DROPOUT_KWARGS: dict[str, tuple[str, ...]] = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "gpt_neox": ("hidden_dropout", "attention_dropout"),
    "llama": ("attention_dropout",),
    "qwen2": ("attention_dropout",),
    "mistral": ("attention_dropout",),
    "mixtral": ("attention_dropout",),
    "olmoe": ("attention_dropout",),
    "olmo2": ("attention_dropout",),
    "qwen3": ("attention_dropout",),
    "qwen2_moe": ("attention_dropout",),
    "qwen3_moe": ("attention_dropout",),
    "phi3": ("attention_dropout", "resid_pdrop", "embd_pdrop"),
    "gemma": ("attention_dropout",),
    "gemma2": ("attention_dropout",),
    "mamba": (),
    "mamba2": (),
}


def dropout_kwargs(arch: str, dropout: float | None) -> dict[str, float]:
    """The config kwargs that set ``dropout`` for ``arch`` (empty when it is ``None``/0 or the family has none)."""
    if dropout is None:
        return {}
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    if arch not in DROPOUT_KWARGS:
        if dropout > 0:
            raise ValueError(f"model.dropout={dropout} is not mapped for arch {arch!r}; set the config's own dropout "
                             f"kwargs under model.config (known archs: {sorted(DROPOUT_KWARGS)})")
        return {}
    keys = DROPOUT_KWARGS[arch]
    if dropout > 0 and not keys:
        warnings.warn(f"arch {arch!r} has no dropout; model.dropout={dropout} is ignored", stacklevel=3)
    return {key: dropout for key in keys}


def model_config(cfg: Mapping[str, Any], vocab_size: int | None = None):
    """The transformers config object for a zoo entry (``arch`` is a transformers ``model_type``)."""
    from transformers import CONFIG_MAPPING

    cfg = plain_dict(cfg)
    arch = cfg.get("arch")
    if not arch:
        raise ValueError(f"model config {cfg.get('name', '?')!r} has no 'arch' (a transformers model_type such as "
                         "'llama', or 'pretrained')")
    if arch not in CONFIG_MAPPING:
        raise ValueError(f"model.arch={arch!r} is not a transformers model_type (e.g. llama, gpt2, gpt_neox, qwen2, "
                         "mixtral, olmoe, mamba, mamba2)")
    kwargs = dict(cfg.get("config") or {})
    kwargs.update(dropout_kwargs(arch, cfg.get("dropout")))
    if vocab_size is not None:
        kwargs["vocab_size"] = int(vocab_size)
    # The class defaults (e.g. GPT-2's 50256) lie outside a tiny vocabulary; the data pipeline never uses these
    # ids (documents are separated by the tokenizer's own separator), so unset them unless given.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = kwargs.get(key)
        if value is None or (isinstance(value, int) and vocab_size is not None and value >= vocab_size):
            kwargs[key] = None
    return CONFIG_MAPPING[arch](**kwargs)


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be reached (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_pretrained_source(path: str, revision: str | None, what: str = "model.path") -> tuple[str, dict]:
    """``(path or hub id, from_pretrained kwargs)`` for a local directory or a hub id ``owner/name`` (+ revision).

    Raises at once, without touching the network, for a missing local path, a revision on a local directory, or a hub
    id while the hub is offline.
    """
    path = os.path.expanduser(str(path))
    if Path(path).exists():
        if revision:
            raise ValueError(f"{what}={path!r} is a local directory; revision={revision!r} applies to hub ids only "
                             "(check out that revision into its own directory, or pass the hub id)")
        return path, {}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        if hub_offline():
            raise RuntimeError(
                f"{what}={path!r} looks like a Hugging Face hub id, but the hub is offline (HF_HUB_OFFLINE=1): "
                "download it elsewhere (huggingface-cli download {path}"
                + (f" --revision {revision}" if revision else "") + ") and pass the local directory, or unset "
                "HF_HUB_OFFLINE"
            )
        return path, ({"revision": str(revision)} if revision else {})
    raise FileNotFoundError(f"{what}={path!r} does not exist (neither a local directory nor a hub id 'owner/name'; "
                            "nothing is downloaded for other forms)")


def load_pretrained(cfg: Mapping[str, Any]):
    """A causal LM from a local Hugging Face directory (``path``), a GGUF file in it (``gguf_file``), or a hub id
    ``owner/name`` at ``revision`` (online only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = plain_dict(cfg)
    path = cfg.get("path")
    if not path:
        raise ValueError("model=hf_pretrained needs model.path=<local Hugging Face model directory or hub id>")
    path, source_kwargs = resolve_pretrained_source(path, cfg.get("revision"))
    load_kwargs: dict[str, Any] = dict(source_kwargs)
    gguf_file = cfg.get("gguf_file")
    if gguf_file:
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("loading a GGUF file needs the `gguf` package: `pip install gguf` "
                              "(or `pip install -e .[gguf]`)")
        load_kwargs["gguf_file"] = gguf_file
    # Config overrides (``config`` and the mapped ``dropout``) are applied before the modules are built.
    overrides: dict[str, Any] = dict(cfg.get("config") or {})
    if cfg.get("dropout") is not None:
        model_type = AutoConfig.from_pretrained(path, **load_kwargs).model_type
        overrides.update(dropout_kwargs(model_type, cfg["dropout"]))
    if cfg.get("dtype"):
        load_kwargs["dtype"] = getattr(torch, str(cfg["dtype"]))
    if cfg.get("attn_implementation"):
        load_kwargs["attn_implementation"] = cfg["attn_implementation"]
    return AutoModelForCausalLM.from_pretrained(path, **load_kwargs, **overrides)


def build_model(cfg: Mapping[str, Any], vocab_size: int | None = None, seed: int | None = None):
    """Build a causal LM (a transformers ``PreTrainedModel``) from a zoo config.

    Args:
        cfg: the ``model`` config (``name``, ``family``, ``arch``, ``dropout``, ``config``; or ``arch: pretrained``
            with ``path``/``gguf_file``).
        vocab_size: the tokenizer's vocabulary size (ignored for pretrained models, whose vocabulary is fixed).
        seed: if given, the initial weights are drawn under ``torch.manual_seed(seed)`` without touching the caller's
            global RNG state.
    """
    cfg = plain_dict(cfg)
    family = cfg.get("family", "dense")
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {family!r}")
    if cfg.get("arch") == "pretrained":
        model = load_pretrained(cfg)
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the pretrained model's embedding only "
                             f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer "
                             "(tokenizer=hf tokenizer.path=<model dir>)")
        return model
    from transformers import AutoModelForCausalLM

    config = model_config(cfg, vocab_size)
    if cfg.get("attn_implementation"):
        config._attn_implementation = cfg["attn_implementation"]
    if seed is None:
        return AutoModelForCausalLM.from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: ``total`` (unique tensors), ``embedding`` (input + untied output embedding) and
    ``non_embedding``."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    embedding_ids: set[int] = set()
    embedding = 0
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        for parameter in module.parameters():
            if id(parameter) not in embedding_ids:
                embedding_ids.add(id(parameter))
                embedding += parameter.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
