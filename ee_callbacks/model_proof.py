"""Prove a structural guess of a model's parts: run the model once and require its own logits back from the last
block's output read through the guessed final path and unembedding (see :func:`prove_model_parts`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, ContextManager, Optional, Sequence, Union

import torch
from torch import nn

from .model_parts import (
    _INPUT_OF,
    ModelParts,
    ModelPartsError,
    _final_path,
    _find_blocks,
    _get,
    _is_inside,
    find_model_parts,
    unwrap_model,
)

__all__ = ["prove_model_parts", "prove_on_probe_set"]

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
    base = find_model_parts(model, blocks, final_norm, unembed, logit_softcap=logit_softcap, logit_scale=logit_scale)
    if base.unembed is None:
        base.proof = {"passed": None, "why": "no unembedding: nothing to prove"}
        return base
    h, ref, order = _run_once(model, base, input_ids, attention_mask, forward_module)
    if h is None:  # nothing to compare: keep the structural guess, the probe records nulls
        base.notes.append("the model's logits were not finite at fit start: its parts are not proven")
        base.proof = {"passed": None, "why": "non-finite logits or hidden states"}
        return base
    tol = _proof_tolerance(ref)
    finals = [final_norm if isinstance(final_norm, str) else ",".join(final_norm)] if final_norm is not None \
        else _final_path_candidates(model, base, order)
    unembeds = [unembed] if unembed is not None else _unembed_candidates(model, base, order, int(ref.shape[-1]))
    tried: list = []
    with (readout_context or contextlib.nullcontext)(), torch.no_grad():
        for u_path in unembeds:
            for f_path in finals:
                cand = _try_readout(model, base, h, ref.float(), tol, f_path, u_path, tried,
                                    fit_scale=logit_scale is None)
                if cand is not None:
                    cand.proof["tokens"] = int(ref.shape[0])
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


def _run_once(model, base: ModelParts, input_ids, attention_mask, forward_module):
    """One isolated forward: the last block's output and the logits at the unmasked positions where both are finite
    (rows × features), and the modules' call order. ``h`` is None when no position is finite."""
    from .capture import HiddenStateCapture, model_forward
    from .probe import _isolated as isolated  # the probe's own isolation: eval, no grad, no autocast, RNG restored

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    with isolated(model), _CallOrder(model) as order, HiddenStateCapture(base, with_input=False) as cap:
        logits = model_forward(forward_module or model, input_ids, attention_mask)
    cap.check()
    h = cap.states[base.n_layers]
    _check_lines_up(model, logits, h)
    keep = attention_mask.reshape(-1).bool().to(h.device) if attention_mask is not None else None
    h = h.reshape(-1, h.shape[-1])
    ref = logits.reshape(-1, logits.shape[-1]).detach()
    if keep is not None:
        h, ref = h[keep], ref[keep]
    finite = torch.isfinite(ref).all(dim=-1) & torch.isfinite(h).all(dim=-1)
    if not bool(finite.any()):
        return None, ref, order
    return h[finite], ref[finite], order


def _check_lines_up(model, logits, h) -> None:
    """Raise when there are no logits to compare, or the last block's output does not hold one state per logit row."""
    if logits is None or h is None:
        raise ModelPartsError(
            f"{type(model).__name__}.forward returned no logits (or the last block no hidden state), so the parts "
            "cannot be checked: return a tensor, a tuple whose first item is the logits, or an object with .logits"
        )
    if tuple(logits.shape[:-1]) == tuple(h.shape[:-1]):
        return
    if h.dim() != logits.dim():
        why = "it holds several residual streams (hyper-connections), not one hidden state per position"
    elif tuple(h.shape[:2]) == tuple(logits.shape[:2])[::-1]:
        why = "it is laid out (positions, batch), not (batch, positions)"
    elif logits.dim() == 3 and logits.shape[:1] == h.shape[:1] and logits.shape[1] == 1 < h.shape[1]:
        why = ("the forward returned logits for the last position only (nanoGPT does so when called without "
               "targets): make it return logits at every position (Hugging Face models: logits_to_keep=0)")
    else:
        why = ("it covers other positions than the logits (a prompt or extra streams the model adds, or logits "
               "kept for the last positions only: call it with logits_to_keep=0)")
    raise ModelPartsError(
        f"the last block's output {tuple(h.shape)} does not line up with the model's logits "
        f"{tuple(logits.shape)}: {why}. The probe reads one hidden state per token position; pass blocks='path' "
        "if another module list holds such states."
    )


def _try_readout(model, base: ModelParts, h, ref32, tol: float, f_path: str, u_path: str, tried: list, *,
                 fit_scale: bool) -> Optional[ModelParts]:
    """The parts with final path ``f_path`` and unembedding ``u_path`` when their readout of ``h`` gives ``ref32``
    within ``tol`` (fitting a constant logit factor when ``fit_scale`` and there is no soft-cap), else None; appends
    ``(f_path, u_path, outcome)`` to ``tried``."""
    norm_path, norm_mod = _final_path(model, f_path)
    cand = dataclasses.replace(base, final_norm=norm_mod, final_norm_path=norm_path,
                               unembed=base.unembed if u_path == base.unembed_path
                               else _get(model, u_path, "unembed"), unembed_path=u_path, notes=[])
    try:
        z = cand.readout(h).float()
    except Exception as err:  # a wrong candidate may not even accept the shape
        tried.append((f_path, u_path, f"fails ({type(err).__name__}: {str(err)[:80]})"))
        return None
    if z.shape != ref32.shape:
        tried.append((f_path, u_path, f"gives shape {tuple(z.shape)}"))
        return None
    diff = float((z - ref32).abs().max())
    fitted = None
    if not diff <= tol and cand.logit_softcap is None and fit_scale:
        denom = float((z * z).sum())
        factor = float((z * ref32).sum()) / denom if denom > 0 else 0.0
        if factor and math.isfinite(factor):
            scaled = float((z * factor - ref32).abs().max())
            if scaled <= tol:
                fitted, diff = factor, scaled
    tried.append((f_path, u_path, f"max |Δlogit| {diff:.3g}"))
    if not diff <= tol:
        return None
    if fitted is not None:
        cand.logit_scale = (cand.logit_scale or 1.0) * fitted
        cand.notes.append(f"logit scale {cand.logit_scale:.6g} measured from the model's logits")
    if f_path != (base.final_norm_path or "") or u_path != base.unembed_path:
        cand.notes.append(f"the structural guess (final_norm={base.final_norm_path!r}, unembed="
                          f"{base.unembed_path!r}) is not the model's readout; proven instead: "
                          f"final_norm={f_path!r}, unembed={u_path!r}")
    cand.notes = [n for n in base.notes if "final norm" not in n] + cand.notes
    cand.hidden_size = int(h.shape[-1])
    cand.proof = {"passed": True, "max_abs_diff": diff, "tolerance": tol, "tokens": None,
                  "candidates_tried": len(tried)}
    return cand
