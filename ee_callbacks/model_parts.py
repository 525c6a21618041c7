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
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence, Union

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


# --------------------------------------------------------------------------------------------------------------------
# proving the parts against the model's own logits

_RTOL = {torch.float64: 1e-3, torch.float32: 1e-3}
_RTOL_HALF = 3e-2


def _proof_tolerance(logits: torch.Tensor) -> float:
    """Allowed max |Δlogit|: relative to the logit scale, looser for half precision (bf16 has 8 mantissa bits)."""
    rtol = _RTOL.get(logits.dtype, _RTOL_HALF)
    return rtol * (1.0 + float(logits.detach().abs().max()))


class _CallOrder:
    """Forward pre/post hooks on every module of ``model``: the order in which the last call of each began and
    ended, and the size of its output's last dimension."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.began: dict = {}
        self.ended: dict = {}
        self.width: dict = {}
        self.clock = 0
        self.handles: list = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            if not name:
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))
        return self

    def _pre(self, name):
        def hook(module, args):
            self.clock += 1
            self.began[name] = self.clock

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.clock += 1
            self.ended[name] = self.clock
            out = output if isinstance(output, torch.Tensor) else None
            self.width[name] = int(out.shape[-1]) if out is not None and out.dim() > 0 else None

        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False

    def between(self, after: str, before: str) -> list:
        """The outermost modules whose last call ran wholly after ``after`` ended and before ``before`` began."""
        t0, t1 = self.ended.get(after), self.began.get(before)
        if t0 is None or t1 is None:
            return []
        inside = [n for n, t in self.began.items() if t > t0 and self.ended.get(n, t1) < t1]
        outer = [n for n in inside if not any(o != n and n.startswith(o + ".") for o in inside)]
        return sorted(outer, key=lambda n: self.began[n])


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() or isinstance(module, nn.LayerNorm)


def _final_path_candidates(model: nn.Module, parts: ModelParts, order: _CallOrder) -> list:
    """Final paths to try, best guess first: the structural guess, the modules the forward ran between the last block
    and the unembedding (all, parameterised only, norms only), each norm outside the blocks (last first), none."""
    names = {id(m): n for n, m in model.named_modules()}
    last_block = names.get(id(parts.blocks[-1])) if parts.blocks else None
    unembed = names.get(id(parts.unembed))
    ran = order.between(last_block, unembed) if last_block is not None and unembed is not None else []
    mods = dict(model.named_modules())
    ran = [n for n in ran if next(mods[n].parameters(), None) is not None or _is_norm(mods[n])]
    norms_after = [n for n in ran if _is_norm(mods[n])]
    all_norms = [n for n, m in model.named_modules() if n and _is_norm(m) and not any(True for _ in m.children())
                 and not _is_inside(n, parts.blocks_path) and not _is_inside(n, parts.unembed_path)]
    cands = ([parts.final_norm_path.split(",")] if parts.final_norm_path else []) + [ran, norms_after]
    parent = (parts.unembed_path or "").rpartition(".")[0]
    if parent and not _is_inside(parent, parts.blocks_path) and parent in order.began:
        # a head with functional steps between its modules (RoBERTa's gelu), after any norm outside the head
        before = [n for n in ran if not _is_inside(n, parent)]
        cands += [[_INPUT_OF + parts.unembed_path], before + [_INPUT_OF + parts.unembed_path]]
    cands += [[n] for n in reversed(all_norms)] + [[]]
    out, seen = [], set()
    for cand in cands:
        key = ",".join(cand)
        # a module the forward never ran cannot be on the way to the logits (a vision tower's norm in a text-only
        # forward), however well it fits: at initialisation a LayerNorm is the identity on already normed states
        ran_all = all((n[len(_INPUT_OF):].rpartition(".")[0] if n.startswith(_INPUT_OF) else n) in order.began
                      for n in cand)
        if key not in seen and ran_all:
            seen.add(key)
            out.append(key)
    return out


def _unembed_candidates(model: nn.Module, parts: ModelParts, order: _CallOrder, vocab: int) -> list:
    """The discovered unembedding first, then any module outside the blocks whose output is vocabulary-wide and whose
    call ended last (a head applied after the declared output embedding)."""
    out = [parts.unembed_path] if parts.unembed_path else []
    mods = dict(model.named_modules())
    wide = [n for n, w in order.width.items() if w == vocab and not _is_inside(n, parts.blocks_path)
            and isinstance(mods.get(n), nn.Linear)]
    for name in sorted(wide, key=lambda n: order.ended[n], reverse=True):
        if name not in out:
            out.append(name)
    return out


def prove_model_parts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    blocks: Optional[str] = None,
    final_norm: Union[str, Sequence[str], None] = None,
    unembed: Optional[str] = None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    forward_module=None,
    readout_context: Optional[Callable[[], ContextManager]] = None,
) -> ModelParts:
    """Find the parts of ``model`` and prove them: the last block's output read through the final path and the
    unembedding must give back the model's own logits on ``input_ids``.

    One forward pass (eval mode, no grad, autocast off, RNG streams and module modes restored) captures the last
    block's output ``h_L`` and the logits ``z``, and records which modules ran between the last block and the
    unembedding. Candidates (final path × unembedding; only the given one where ``final_norm=`` / ``unembed=`` is
    passed) are tried in turn; one passes when ``max |readout(h_L) − z| ≤ rtol · (1 + max |z|)`` over the unmasked
    positions (rtol 1e-3 in float32, 3e-2 in half precision). Without a soft-cap, a constant factor between the two
    (a logit scale the config does not declare, or a hidden-state division before the head as in MiniCPM) is
    measured and kept when it makes the readout pass. The result's ``proof`` records the check.

    Args:
        model: the language model; input_ids / attention_mask: one small batch (any valid token ids do).
        blocks, final_norm, unembed, logit_softcap, logit_scale: as for :func:`find_model_parts`.
        forward_module: what to call for the forward instead of ``model`` (an FSDP root routed to it).
        readout_context: a zero-argument callable returning a context inside which the readout modules' weights are
            whole (FSDP); None elsewhere.

    Raises:
        ModelPartsError: no candidate reproduces the logits (listing each with its error and the arguments to pass),
            a block runs more than once per forward (looped models), or the forward returns no logits.
    """
    model = unwrap_model(model)
    args = dict(final_norm=final_norm, unembed=unembed, logit_softcap=logit_softcap, logit_scale=logit_scale,
                forward_module=forward_module, readout_context=readout_context)
    tied: list = []
    if blocks is None:
        try:
            _find_blocks(model, tied)
        except ModelPartsError:
            if len(tied) < 2:
                raise
    if blocks is not None or len(tied) < 2:
        return _prove(model, input_ids, attention_mask, blocks=blocks, **args)
    # block lists tied in length and size (a vision tower beside the text decoder): the one that proves wins
    failures = []
    for path in tied:
        try:
            return _prove(model, input_ids, attention_mask, blocks=path, **args)
        except ModelPartsError as err:
            failures.append(f"blocks={path!r}: {err}")
    raise ModelPartsError(f"no block list of {type(model).__name__} gives a proven readout. " + " | ".join(failures))


def prove_on_probe_set(model: nn.Module, batches, rows: int = 2, **kwargs) -> ModelParts:
    """:func:`prove_model_parts` on the first ``rows`` sequences of the first batch of a probe set (anything
    ``run_probe`` accepts as ``batches``); ``kwargs`` as for :func:`prove_model_parts`."""
    from .probe import prepare_batches

    first = prepare_batches(batches if isinstance(batches, torch.Tensor) else list(batches)[:1])[0]
    mask = first["attention_mask"]
    return prove_model_parts(model, first["input_ids"][:rows], mask[:rows] if mask is not None else None, **kwargs)


def _prove(model, input_ids, attention_mask, *, blocks, final_norm, unembed, logit_softcap, logit_scale,
           forward_module, readout_context) -> ModelParts:
    from .capture import HiddenStateCapture, model_forward
    from .probe import _isolated as isolated  # the probe's own isolation: eval, no grad, no autocast, RNG restored

    base = find_model_parts(model, blocks, final_norm, unembed, logit_softcap=logit_softcap, logit_scale=logit_scale)
    if base.unembed is None:
        base.proof = {"passed": None, "why": "no unembedding: nothing to prove"}
        return base
    ctx = readout_context or contextlib.nullcontext
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    with isolated(model), _CallOrder(model) as order, HiddenStateCapture(base, with_input=False) as cap:
        logits = model_forward(forward_module or model, input_ids, attention_mask)
    cap.check()
    h = cap.states[base.n_layers]
    if logits is None or h is None:
        raise ModelPartsError(
            f"{type(model).__name__}.forward returned no logits (or the last block no hidden state), so the parts "
            "cannot be checked: return a tensor, a tuple whose first item is the logits, or an object with .logits"
        )
    if tuple(logits.shape[:-1]) != tuple(h.shape[:-1]):
        if h.dim() != logits.dim():
            why = "it holds several residual streams (hyper-connections), not one hidden state per position"
        elif tuple(h.shape[:2]) == tuple(logits.shape[:2])[::-1]:
            why = "it is laid out (positions, batch), not (batch, positions)"
        else:
            why = ("it covers other positions than the logits (a prompt or extra streams the model adds, or logits "
                   "kept for the last positions only: call it with logits_to_keep=0)")
        raise ModelPartsError(
            f"the last block's output {tuple(h.shape)} does not line up with the model's logits "
            f"{tuple(logits.shape)}: {why}. The probe reads one hidden state per token position; pass blocks='path' "
            "if another module list holds such states."
        )
    keep = attention_mask.reshape(-1).bool().to(h.device) if attention_mask is not None else None
    h = h.reshape(-1, h.shape[-1])
    ref = logits.reshape(-1, logits.shape[-1]).detach()
    if keep is not None:
        h, ref = h[keep], ref[keep]
    finite = torch.isfinite(ref).all(dim=-1) & torch.isfinite(h).all(dim=-1)
    if not bool(finite.any()):  # nothing to compare: keep the structural guess, the probe records nulls
        base.notes.append("the model's logits were not finite at fit start: its parts are not proven")
        base.proof = {"passed": None, "why": "non-finite logits or hidden states"}
        return base
    h, ref = h[finite], ref[finite]
    ref32 = ref.float()
    tol = _proof_tolerance(ref)
    finals = [final_norm if isinstance(final_norm, str) else ",".join(final_norm)] if final_norm is not None \
        else _final_path_candidates(model, base, order)
    unembeds = [unembed] if unembed is not None else _unembed_candidates(model, base, order, int(ref.shape[-1]))
    scale_given = logit_scale is not None
    tried = []
    with ctx(), torch.no_grad():
        for u_path in unembeds:
            for f_path in finals:
                norm_path, norm_mod = _final_path(model, f_path)
                cand = dataclasses.replace(base, final_norm=norm_mod, final_norm_path=norm_path,
                                           unembed=base.unembed if u_path == base.unembed_path
                                           else _get(model, u_path, "unembed"), unembed_path=u_path, notes=[])
                try:
                    z = cand.readout(h).float()
                except Exception as err:  # a wrong candidate may not even accept the shape
                    tried.append((f_path, u_path, f"fails ({type(err).__name__}: {str(err)[:80]})"))
                    continue
                if z.shape != ref32.shape:
                    tried.append((f_path, u_path, f"gives shape {tuple(z.shape)}"))
                    continue
                diff = float((z - ref32).abs().max())
                fitted = None
                if not diff <= tol and cand.logit_softcap is None and not scale_given:
                    denom = float((z * z).sum())
                    factor = float((z * ref32).sum()) / denom if denom > 0 else 0.0
                    if factor and math.isfinite(factor):
                        scaled = float((z * factor - ref32).abs().max())
                        if scaled <= tol:
                            fitted, diff = factor, scaled
                tried.append((f_path, u_path, f"max |Δlogit| {diff:.3g}"))
                if diff <= tol:
                    if fitted is not None:
                        cand.logit_scale = (cand.logit_scale or 1.0) * fitted
                        cand.notes.append(f"logit scale {cand.logit_scale:.6g} measured from the model's logits")
                    if f_path != (base.final_norm_path or "") or u_path != base.unembed_path:
                        cand.notes.append(f"the structural guess (final_norm={base.final_norm_path!r}, unembed="
                                          f"{base.unembed_path!r}) is not the model's readout; proven instead: "
                                          f"final_norm={f_path!r}, unembed={u_path!r}")
                    cand.notes = [n for n in base.notes if "final norm" not in n] + cand.notes
                    cand.hidden_size = int(h.shape[-1])
                    cand.proof = {"passed": True, "max_abs_diff": diff, "tolerance": tol, "tokens": int(ref.shape[0]),
                                  "candidates_tried": len(tried)}
                    return cand
    lines = "; ".join(f"final_norm={f!r} unembed={u!r}: {what}" for f, u, what in tried[:12])
    given = "the given final_norm=/unembed= do not" if (final_norm is not None or unembed is not None) \
        else "no candidate readout does"
    raise ModelPartsError(
        f"{given} reproduce {type(model).__name__}'s own logits from its last block's output (blocks="
        f"{base.blocks_path!r}, tolerance {tol:.3g}). Tried {lines}. Pass final_norm='path' (several modules "
        "applied in order: 'a,b'; none: ''), unembed='path', blocks='path' or logit_scale=/logit_softcap= to name "
        "the model's real readout. (A model that adds the residual outside its blocks, x = x + block(x), has blocks "
        "whose outputs are not hidden states: point blocks= at modules that return the whole hidden state.)"
    )
