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
``unembed="lm_head"``; ``final_norm=""`` means "no final norm"). When discovery cannot decide it raises
:class:`ModelPartsError` naming what it found and the argument to pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["ModelParts", "ModelPartsError", "find_model_parts", "unwrap_model"]


class ModelPartsError(ValueError):
    """The model's block stack, final norm or unembedding could not be determined."""


@dataclass
class ModelParts:
    """The pieces of a model the probe reads out from.

    ``readout(h)`` computes ``z = T(U(N(h)))`` for a hidden state ``h``: ``N`` the final norm (identity if None),
    ``U`` the unembedding and ``T`` the model's own logit post-processing (final-logit soft-capping as in Gemma 2,
    or a constant logit scale), so that ``readout(h_L)`` equals the model's logits.
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
        """Logit lens: ``T(U(N(h)))``."""
        if self.unembed is None:
            raise ModelPartsError("this model has no unembedding (LM head): logit-lens readouts are unavailable")
        return self.transform_logits(self.unembed(self.normed(h)))

    def describe(self) -> dict:
        return {
            "blocks": self.blocks_path,
            "n_layers": self.n_layers,
            "final_norm": self.final_norm_path,
            "unembed": self.unembed_path,
            "logit_softcap": self.logit_softcap,
            "logit_scale": self.logit_scale,
        }


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


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _find_blocks(model: nn.Module) -> tuple[str, nn.Module]:
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


def _find_unembed(model: nn.Module, blocks_path: str) -> tuple[Optional[str], Optional[nn.Module]]:
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
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _is_inside(n, blocks_path)
    ]
    if vocab is not None:
        matches = [(n, m) for n, m in linears if m.out_features == vocab]
        if matches:
            return matches[-1]
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
        norm_path, norm_mod = (final_norm, _get(model, final_norm, "final_norm")) if final_norm else (None, None)
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
