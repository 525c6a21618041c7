"""Find the parts of a language model that the probe needs: the block stack, the final norm and the unembedding.

Discovery is structural, so it works for Hugging Face causal LMs of families it has never seen and for a user's own
``nn.Module``:

- unembedding: ``model.get_output_embeddings()`` when the model has it, otherwise the last ``nn.Linear`` outside the
  block stack whose output size is the vocabulary (``config.vocab_size``) or, without a config, the widest one;
- blocks: the longest ``nn.ModuleList`` (or ``nn.Sequential``) that is not nested inside another candidate list,
  ties broken by parameter count;
- final norm: the last normalisation module (class name containing "norm") outside the block stack and the
  unembedding, registered after the blocks.

Every guess can be overridden by a dotted module path (``blocks="transformer.h"``, ``final_norm="transformer.ln_f"``,
``unembed="lm_head"``; ``final_norm=""`` means "no final norm"; ``final_norm="a.norm,a.proj"`` names a *final path*
of several modules applied in order, e.g. OPT's final norm then ``project_out``). When discovery cannot decide it
raises :class:`ModelPartsError` naming what it found and the argument to pass.

A structural guess is only a guess: :func:`prove_model_parts` runs the model once, reads the last block's output
through the guessed final path and unembedding, and requires the model's own logits back; when they differ it tries
the other candidates (the modules the forward actually runs between the last block and the unembedding, every norm
outside the blocks, none) and raises, listing what was tried, when none passes. :func:`find_language_model` finds the
language model inside a wrapper (a LightningModule keeping it under any attribute).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = [
    "FinalPath",
    "ModelParts",
    "ModelPartsError",
    "find_language_model",
    "find_model_parts",
    "prove_model_parts",
    "prove_on_probe_set",
    "unwrap_model",
]


class ModelPartsError(ValueError):
    """The model's block stack, final norm or unembedding could not be determined."""


def _call_in_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, with the module's floating-point parameters cast to ``x``'s dtype when they differ (the module
    itself is left as it is)."""
    params = dict(module.named_parameters())
    if not x.is_floating_point() or all(p.dtype == x.dtype for p in params.values() if p.is_floating_point()):
        return module(x)
    from torch.func import functional_call

    cast = {name: p.to(x.dtype) if p.is_floating_point() else p for name, p in params.items()}
    return functional_call(module, cast, (x,))


class FinalPath(nn.Sequential):
    """Several of the model's modules applied in order between the last block and the unembedding (OPT's final norm
    then ``project_out``; a BERT-style head's transform). Registered nowhere in the model: its state never changes."""

    def __init__(self, modules, paths):
        super().__init__(*modules)
        self.paths = list(paths)


@dataclass
class ModelParts:
    """The pieces of a model the probe reads out from.

    ``readout(h)`` computes ``z = T(U(N(h)))`` for a hidden state ``h``: ``N`` the final path (the final norm, or a
    :class:`FinalPath` of several modules; identity if None), ``U`` the unembedding and ``T`` the model's own logit
    post-processing (final-logit soft-capping as in Gemma 2, or a constant logit scale), so that ``readout(h_L)``
    equals the model's logits. ``proof`` says how that was checked (:func:`prove_model_parts`), None if never.
    """

    blocks: list
    final_norm: Optional[nn.Module]
    unembed: Optional[nn.Module]
    blocks_path: str = ""
    final_norm_path: Optional[str] = None
    unembed_path: Optional[str] = None
    logit_softcap: Optional[float] = None
    logit_scale: Optional[float] = None
    notes: list = field(default_factory=list)
    proof: Optional[dict] = None
    hidden_size: Optional[int] = None  # width of the blocks' output (known once proven)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def has_lm_head(self) -> bool:
        return self.unembed is not None

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_norm(h) if self.final_norm is not None else h

    def transform_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Apply the model's own logit post-processing (scale, then soft-cap), if any."""
        if self.logit_scale is not None:
            z = z * self.logit_scale
        if self.logit_softcap is not None:
            z = torch.tanh(z / self.logit_softcap) * self.logit_softcap
        return z

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logit lens: ``T(U(N(h)))``, computed in ``h``'s dtype (a bf16 model read out in float32 uses float32
        copies of its norm and unembedding weights; gradients still flow through the cast)."""
        if self.unembed is None:
            raise ModelPartsError("this model has no unembedding (LM head): logit-lens readouts are unavailable")
        normed = _call_in_dtype(self.final_norm, h) if self.final_norm is not None else h
        return self.transform_logits(_call_in_dtype(self.unembed, normed))

    def describe(self) -> dict:
        return {
            "blocks": self.blocks_path,
            "n_layers": self.n_layers,
            "final_norm": self.final_norm_path,
            "unembed": self.unembed_path,
            "logit_softcap": self.logit_softcap,
            "logit_scale": self.logit_scale,
            "proof": self.proof,
        }

    def readout_modules(self) -> list:
        """The model's own modules a readout runs (the final path's members and the unembedding)."""
        norm = self.final_norm
        mods = list(norm) if isinstance(norm, FinalPath) else ([norm] if norm is not None else [])
        mods = [m.parent if isinstance(m, InputOf) else m for m in mods]
        return mods + ([self.unembed] if self.unembed is not None else [])


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip common wrappers (DDP ``.module``, ``torch.compile``'s ``_orig_mod``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
            continue
    return model


def _get(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        names = [n for n, _ in model.named_modules() if n][:40]
        raise ModelPartsError(
            f"{what}={path!r} does not name a submodule of {type(model).__name__} ({err}). "
            f"Some module paths of this model: {names}"
        ) from None


class InputOf(nn.Module):
    """What a head module feeds into its unembedding: runs ``parent`` on ``h`` and stops at the call of ``child``,
    returning that call's input (a head computing ``decoder(layer_norm(gelu(dense(h))))`` in its own ``forward``, as
    RoBERTa's, has no module for the activation, so no list of modules can stand for it). ``child`` never runs."""

    class _Stop(Exception):
        pass

    def __init__(self, parent: nn.Module, child: nn.Module, child_path: str):
        super().__init__()
        self.parent = parent
        self.child_path = child_path
        self._child = [child]  # not registered: it is a submodule of parent already

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        seen = []

        def stop(module, args):
            seen.append(args[0])
            raise InputOf._Stop

        handle = self._child[0].register_forward_pre_hook(stop)
        try:
            self.parent(h)
        except InputOf._Stop:
            return seen[0]
        finally:
            handle.remove()
        raise ModelPartsError(f"final_norm='input_of:{self.child_path}': the head never called {self.child_path}")


_INPUT_OF = "input_of:"


def _final_path(model: nn.Module, spec) -> tuple[Optional[str], Optional[nn.Module]]:
    """``final_norm=`` as given: "" (none), one dotted path, or several (a list, or comma-separated) run in order;
    an item ``"input_of:lm_head.decoder"`` is what ``lm_head`` feeds into ``lm_head.decoder`` (see :class:`InputOf`)."""
    paths = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    paths = [p for p in paths if p]
    if not paths:
        return None, None
    mods = [_input_of(model, p) if p.startswith(_INPUT_OF) else _get(model, p, "final_norm") for p in paths]
    if len(mods) == 1:
        return paths[0], mods[0]
    return ",".join(paths), FinalPath(mods, paths)


def _input_of(model: nn.Module, spec: str) -> "InputOf":
    child_path = spec[len(_INPUT_OF):]
    parent_path = child_path.rpartition(".")[0]
    child = _get(model, child_path, "final_norm")
    return InputOf(_get(model, parent_path, "final_norm") if parent_path else model, child, child_path)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _find_blocks(model: nn.Module, tied: Optional[list] = None) -> tuple[str, nn.Module]:
    """The block stack; ``tied`` (a list) receives the paths of equally long and large candidates, if any."""
    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 0 and name
    ]
    # keep only lists whose every element holds parameters
    # (registered parameters, not their size: under FSDP a rank's shard of a block may be empty)
    lists = [(n, m) for n, m in lists if all(next(b.parameters(), None) is not None for b in m)]
    # drop lists nested inside another candidate list (MoE experts, per-layer sub-lists)
    top = [(n, m) for n, m in lists if not any(n != o and n.startswith(o + ".") for o, _ in lists)]
    if not top:
        raise ModelPartsError(
            f"could not find the block stack of {type(model).__name__}: it has no nn.ModuleList or nn.Sequential "
            "of parameterised modules. Pass blocks='dotted.path.to.layers' (e.g. blocks='model.layers')."
        )
    ranked = sorted(top, key=lambda nm: (len(nm[1]), _n_params(nm[1])), reverse=True)
    if len(ranked) > 1 and tied is not None:
        tied.extend(n for n, m in ranked if len(m) == len(ranked[0][1]) and _n_params(m) == _n_params(ranked[0][1]))
    if len(ranked) > 1:
        (n0, m0), (n1, m1) = ranked[0], ranked[1]
        if len(m0) == len(m1) and _n_params(m0) == _n_params(m1):
            found = [(n, len(m)) for n, m in ranked]
            raise ModelPartsError(
                f"cannot decide which module list is the block stack of {type(model).__name__}: "
                f"found {found} (path, length) tied in length and size. Pass blocks='<one of these paths>'."
            )
    return ranked[0]


def _is_inside(name: str, prefix: Optional[str]) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def _vocab_size(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for attr in ("vocab_size", "n_vocab", "padded_vocab_size"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _find_unembed(
    model: nn.Module, blocks_path: str, strict: bool = False
) -> tuple[Optional[str], Optional[nn.Module]]:
    """``strict``: only an output embedding the model declares or a ``Linear`` onto the vocabulary (never the widest
    ``Linear``, which inside a base model may be an input projection)."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # some models raise NotImplementedError
            out = None
        if isinstance(out, nn.Module):
            for name, mod in model.named_modules():
                if mod is out:
                    return name, mod
            return "get_output_embeddings()", out
    vocab = _vocab_size(model)
    if vocab is None:
        emb = _input_embedding(model)
        vocab = int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _is_inside(n, blocks_path)
    ]
    if vocab is not None:
        matches = [(n, m) for n, m in linears if m.out_features == vocab]
        if matches:
            return matches[-1]
    if strict:
        return None, None
    wide = [(n, m) for n, m in linears if m.out_features > m.in_features]
    if wide:
        best = max(m.out_features for _, m in wide)
        cands = [(n, m) for n, m in wide if m.out_features == best]
        return cands[-1]
    return None, None


def _find_final_norm(
    model: nn.Module, blocks_path: str, unembed_path: Optional[str]
) -> tuple[Optional[str], Optional[nn.Module]]:
    names = [n for n, _ in model.named_modules()]
    try:
        after = names.index(blocks_path)
    except ValueError:
        after = 0
    cands = []
    for i, (name, mod) in enumerate(model.named_modules()):
        if not name or _is_inside(name, blocks_path) or _is_inside(name, unembed_path):
            continue
        if "norm" in type(mod).__name__.lower() or isinstance(mod, nn.LayerNorm):
            if not any(True for _ in mod.children()):  # a leaf normalisation module
                cands.append((i, name, mod))
    # only a norm registered after the block stack can be the final norm (an embedding LayerNorm comes before it)
    later = [c for c in cands if c[0] > after]
    if not later:
        return None, None
    _, name, mod = later[-1]
    return name, mod


def _logit_postprocessing(model: nn.Module) -> tuple[Optional[float], Optional[float]]:
    cfg = getattr(model, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies the logits by it
    if scale is None and getattr(cfg, "logits_scaling", None):  # Granite divides by it
        scale = 1.0 / float(cfg.logits_scaling)
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap and math.isfinite(softcap) else None
    scale = float(scale) if isinstance(scale, (int, float)) and scale and float(scale) != 1.0 else None
    return softcap, scale


def find_model_parts(
    model: nn.Module,
    blocks: Optional[str] = None,
    final_norm: Optional[str] = None,
    unembed: Optional[str] = None,
    *,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> ModelParts:
    """Locate the block stack, the final norm and the unembedding of ``model``.

    Args:
        model: any ``nn.Module`` language model (a Hugging Face causal LM, or one's own).
        blocks: dotted path of the block list (``"model.layers"``); discovered when None.
        final_norm: dotted path of the norm applied to the last block's output; ``""`` for none; discovered when None.
        unembed: dotted path of the output projection (``"lm_head"``); ``""`` for a model without LM head
            (similarity metrics only); discovered when None.
        logit_softcap, logit_scale: override the logit post-processing read from ``model.config``.

    Raises:
        ModelPartsError: naming what was found and which argument to pass.
    """
    if not isinstance(model, nn.Module):
        raise ModelPartsError(f"expected an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    notes = []
    if blocks is not None:
        blocks_mod = _get(model, blocks, "blocks")
        if not isinstance(blocks_mod, (nn.ModuleList, nn.Sequential)):
            raise ModelPartsError(
                f"blocks={blocks!r} is a {type(blocks_mod).__name__}, not an nn.ModuleList/nn.Sequential of blocks"
            )
        blocks_path = blocks
    else:
        blocks_path, blocks_mod = _find_blocks(model)

    if unembed is not None:
        unembed_path, unembed_mod = (unembed, _get(model, unembed, "unembed")) if unembed else (None, None)
    else:
        unembed_path, unembed_mod = _find_unembed(model, blocks_path)
        if unembed_mod is None:
            notes.append("no unembedding found: only similarity metrics are available (pass unembed='path' if wrong)")

    if final_norm is not None:
        norm_path, norm_mod = _final_path(model, final_norm)
    else:
        norm_path, norm_mod = _find_final_norm(model, blocks_path, unembed_path)
        if norm_mod is None:
            notes.append("no final norm found: readouts use the unembedding alone (pass final_norm='path' if wrong)")

    softcap, scale = _logit_postprocessing(model)
    if logit_softcap is not None:
        softcap = logit_softcap or None
    if logit_scale is not None:
        scale = logit_scale if logit_scale != 1.0 else None
    return ModelParts(
        blocks=list(blocks_mod),
        final_norm=norm_mod,
        unembed=unembed_mod,
        blocks_path=blocks_path,
        final_norm_path=norm_path,
        unembed_path=unembed_path,
        logit_softcap=softcap,
        logit_scale=scale,
        notes=notes,
    )


def model_summary(model: nn.Module, parts: ModelParts) -> dict:
    """Name, family, sizes of a model for the ProbeRecord's ``model`` section."""
    model = unwrap_model(model)
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None) or type(model).__name__
    model_type = getattr(cfg, "model_type", "") or ""
    family = "dense"
    if any(getattr(cfg, a, None) for a in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")):
        family = "moe"
    if "mamba" in model_type or "rwkv" in model_type or "ssm" in model_type:
        family = "ssm"
    d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    vocab = _vocab_size(model)
    if parts.unembed is not None and hasattr(parts.unembed, "weight"):
        vocab = int(parts.unembed.weight.shape[0])
        d_model = d_model or int(parts.unembed.weight.shape[1])
    return {
        "name": str(name),
        "type": model_type or type(model).__name__,
        "family": family,
        "n_layers": parts.n_layers,
        "d_model": int(d_model) if d_model else None,
        "vocab": int(vocab) if vocab else None,
        "params": int(sum(p.numel() for p in model.parameters())),
    }


# --------------------------------------------------------------------------------------------------------------------
# finding the language model inside a LightningModule (or any wrapper)

_INPUT_NAMES = ("input_ids", "idx", "ids", "tokens", "token_ids", "input_tokens", "x", "input", "inputs")
_UNIMPLEMENTED = ("_forward_unimplemented", "Module._forward_unimplemented", "LightningModule.forward")
_TAKES_IDS: dict = {}


def _takes_input_ids(module: nn.Module) -> bool:
    """Has a forward of its own whose first argument is the token ids (named ``input_ids``, ``idx``, ``x``, …)."""
    cls = type(module)
    if cls not in _TAKES_IDS:
        forward = getattr(cls, "forward", None)
        ok = forward is not None and getattr(forward, "__qualname__", "") not in _UNIMPLEMENTED
        if ok:
            try:
                params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
            except (TypeError, ValueError):
                params = []
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            ok = any(p.name == "input_ids" for p in params) or bool(positional and positional[0].name in _INPUT_NAMES)
        _TAKES_IDS[cls] = ok
    return _TAKES_IDS[cls]


def _input_embedding(module: nn.Module) -> Optional[nn.Module]:
    get_in = getattr(module, "get_input_embeddings", None)
    if callable(get_in):
        with contextlib.suppress(Exception):
            emb = get_in()
            if isinstance(emb, nn.Module):
                return emb
    return next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)


def _why_not_lm(module: nn.Module) -> Optional[str]:
    """None when ``module`` has the shape of a language model, else what it lacks."""
    if not _takes_input_ids(module):
        return "no forward taking input_ids"
    if _input_embedding(module) is None:
        return "no input embedding"
    try:
        blocks_path, _ = _find_blocks(module)
    except ModelPartsError as err:
        if "cannot decide" not in str(err):
            return "no block list"
        blocks_path = ""
    if _find_unembed(module, blocks_path, strict=True)[1] is None:
        return "no unembedding onto the vocabulary"
    return None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def find_language_model(module: nn.Module, model_attr: Optional[str] = None) -> nn.Module:
    """The language model inside ``module`` (a LightningModule or any wrapper), found structurally.

    ``model_attr`` (a dotted path, ``""`` for ``module`` itself) wins. Otherwise the candidates are the submodules
    (``module`` included) that own a block list, an input embedding and an unembedding onto the vocabulary and whose
    ``forward`` takes the token ids; the smallest wins (one holding no other candidate). So an HF model kept in
    ``self.net``, ``self.lm``, ``self.backbone`` or ``self.wrapper.model`` is found, as is a module that *is* the
    model (blocks and head as its own attributes, with a ``forward``). Several disjoint candidates (a policy and a
    frozen reference model): the only trainable one, else a :class:`ModelPartsError` naming them.
    """
    root = unwrap_model(module)
    if model_attr is not None:
        if model_attr == "":
            return root
        try:
            return root.get_submodule(model_attr)
        except AttributeError:
            raise ModelPartsError(
                f"model_attr={model_attr!r} is not a submodule of {type(root).__name__}; its children are "
                f"{[n for n, _ in root.named_children()]}"
            ) from None
    found = [(name, sub) for name, sub in root.named_modules() if _why_not_lm(sub) is None]
    minimal = [(n, m) for n, m in found
               if not any(o != n and (n == "" or o.startswith(n + ".")) for o, _ in found)]
    if len(minimal) > 1:
        trainable = [(n, m) for n, m in minimal if _trainable(m)]
        minimal = trainable if len(trainable) == 1 else minimal
    if len(minimal) == 1:
        return minimal[0][1]
    label = lambda n: repr(n) if n else "'' (the module itself)"  # noqa: E731
    if minimal:
        raise ModelPartsError(
            f"{type(root).__name__} holds several language models: {', '.join(label(n) for n, _ in minimal)}. "
            "Pass model_attr='<one of these>' to choose the one to probe."
        )
    near = [(n, _why_not_lm(m)) for n, m in root.named_modules()
            if any(isinstance(c, (nn.ModuleList, nn.Sequential)) for c in m.children())][:8]
    raise ModelPartsError(
        f"found no language model in {type(root).__name__}: no submodule owns a block list, an input embedding and "
        "an unembedding onto the vocabulary, with a forward taking the token ids (input_ids). "
        + (f"Closest: {', '.join(f'{label(n)} ({why})' for n, why in near)}. " if near else "")
        + "Pass model_attr='path.to.lm' (and blocks=/final_norm=/unembed= if its parts are unusual)."
    )


# proving the parts lives in model_proof.py; re-exported here, where callers have always imported it from
from .model_proof import prove_model_parts, prove_on_probe_set  # noqa: E402

