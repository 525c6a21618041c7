"""What the probe needs to run under a sharded strategy (FSDP) without touching a sharded module's weights.

Under DDP every rank holds the whole model: the probe calls the language model directly, each rank probes its shard
of the probe set and the accumulators are all-reduced (``run_probe(reduce=..., shard=(rank, world))``).

Under FSDP (Lightning's ``FSDPStrategy`` = torch's ``FullyShardedDataParallel``, "FSDP1", ``use_orig_params=True``
by default; and, on paper, torch's ``fully_shard``, "FSDP2") a parameter is, outside its FSDP unit's forward, only
this rank's piece of a flat shard (FSDP1: a 1-D view, empty on some ranks; FSDP2: a ``DTensor``). So:

1. **The forward goes through the wrapped root** (:func:`probe_forward_target`): the outermost FSDP unit above the
   language model is called, with its wrapped module's ``forward`` routed to the language model for that one call,
   so that every unit all-gathers its parameters in its own pre-forward and frees them after, exactly as in
   training. Hidden states are captured by the probe's forward hooks on the blocks as usual (on an FSDP1
   auto-wrapped block the hook sits on the wrapper, whose input and output are the block's).
2. **Readouts run inside** :func:`readout_context`, which gathers in full only the FSDP units that own the given
   modules (the unembedding, the final norm, the input embedding): ``FullyShardedDataParallel.summon_full_params(
   unit, recurse=False, writeback=False)`` for FSDP1, ``unit.unshard()`` / ``unit.reshard()`` for FSDP2. Transformer
   blocks auto-wrapped in their own units stay sharded. Nothing is written back; gradients are not touched.
3. **The probe set is not sharded** (:func:`probe_shard` gives ``(0, 1)``): every FSDP forward and every summon is
   a collective, so every rank must run the same forwards in the same order. Each rank probes the whole set, the
   records are identical on every rank, no all-reduce is needed, and global rank zero alone writes (as under DDP).
   The probe therefore costs under FSDP what it costs in one process (plus the all-gathers), not 1/world of it.

Everything here is a no-op (the language model itself, a null context, the DDP sharding) when no FSDP unit is
present, so the DDP and single-process paths are unchanged. The module imports neither Lightning nor
transformers; ``trainer`` is anything with ``.strategy.model`` / ``.global_rank`` / ``.world_size``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

__all__ = [
    "wrapped_root",
    "is_sharded",
    "fsdp_units",
    "probe_shard",
    "probe_forward_target",
    "readout_context",
    "readout_context_factory",
    "param_count",
]


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel
    except Exception:  # pragma: no cover - torch built without distributed
        return None


def _fsdp2_class():
    try:
        from torch.distributed.fsdp import FSDPModule

        return FSDPModule
    except Exception:  # pragma: no cover - older torch
        return None


def _is_unit(module: nn.Module) -> bool:
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    return (fsdp1 is not None and isinstance(module, fsdp1)) or (fsdp2 is not None and isinstance(module, fsdp2))


def _is_fsdp1(module: nn.Module) -> bool:
    fsdp1 = _fsdp1_class()
    return fsdp1 is not None and isinstance(module, fsdp1)


def wrapped_root(trainer: Any, pl_module: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """The model as the strategy runs it (``trainer.strategy.model``: FSDP root, DDP wrapper, or the module)."""
    strategy = getattr(trainer, "strategy", None)
    root = getattr(strategy, "model", None) if strategy is not None else None
    return root if isinstance(root, nn.Module) else pl_module


def fsdp_units(module: Optional[nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(qualified name, unit)`` of every FSDP unit (FSDP1 wrapper or FSDP2 module) in ``module``, in module order."""
    if module is None:
        return []
    return [(name, m) for name, m in module.named_modules() if _is_unit(m)]


def is_sharded(trainer: Any, pl_module: Optional[nn.Module] = None) -> bool:
    """True when the model the strategy runs holds an FSDP unit (its parameters are sharded across ranks)."""
    root = wrapped_root(trainer, pl_module)
    if root is not None and fsdp_units(root):
        return True
    return pl_module is not None and pl_module is not root and bool(fsdp_units(pl_module))


def probe_shard(trainer: Any, pl_module: Optional[nn.Module] = None) -> tuple[int, int]:
    """``(rank, world)`` for ``run_probe(shard=...)``: the global rank and world size under DDP, ``(0, 1)`` under
    FSDP (every rank probes the whole set, in lockstep; pass ``reduce=None`` then)."""
    if is_sharded(trainer, pl_module):
        return 0, 1
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def _names(root: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


def _is_prefix(prefix: str, name: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


class _RoutedForward:
    """Calls the FSDP unit ``unit`` with ``inner.forward`` routed to ``lm`` for the duration of the call.

    ``inner`` is the module whose ``forward`` the unit's ``__call__`` ends in: FSDP1's wrapped module, or the FSDP2
    module itself. Keyword arguments the language model's ``forward`` does not take are dropped, so that
    :func:`ee_callbacks.capture.model_forward` can treat this object like the language model.
    """

    def __init__(self, unit: nn.Module, inner: nn.Module, lm: nn.Module):
        self.unit, self.inner, self.lm = unit, inner, lm

    @property
    def config(self):
        config = getattr(self.lm, "config", None)
        if config is None:
            raise AttributeError("config")
        return config

    def forward(self, input_ids: torch.Tensor, **kwargs):
        from .capture import _accepts

        kwargs = {k: v for k, v in kwargs.items() if _accepts(self.lm, k)}
        had_own = "forward" in self.inner.__dict__
        own = self.inner.__dict__.get("forward")
        lm = self.lm
        self.inner.forward = lambda *args, **kw: lm(*args, **kw)
        try:
            return self.unit(input_ids, **kwargs)
        finally:
            if had_own:
                self.inner.forward = own
            else:
                del self.inner.forward

    __call__ = forward

    def __repr__(self) -> str:
        return f"_RoutedForward({type(self.unit).__name__} -> {type(self.lm).__name__})"


def probe_forward_target(trainer: Any, pl_module: nn.Module, lm: nn.Module):
    """What the probe should call for its forward passes (``model_forward(target, ids, mask)``).

    - no FSDP unit above ``lm`` (no FSDP at all, DDP, or units only inside ``lm``, or ``lm`` itself a unit): ``lm``;
    - the outermost FSDP unit above ``lm`` wraps ``lm`` directly (FSDP1): that unit;
    - otherwise (Lightning's FSDP wraps the whole LightningModule): an object that calls the outermost unit with its
      wrapped module's ``forward`` routed to ``lm``, so the unit gathers its parameters as in training.
    """
    root = wrapped_root(trainer, pl_module)
    if root is None:
        return lm
    names = _names(root)
    if id(lm) not in names:
        return lm
    lm_name = names[id(lm)]
    above = [(name, unit) for name, unit in fsdp_units(root) if unit is not lm and _is_prefix(name, lm_name)]
    if not above:
        return lm
    name, unit = min(above, key=lambda item: len(item[0]))
    if _is_fsdp1(unit):
        inner = unit._fsdp_wrapped_module
        if inner is lm:
            return unit
        return _RoutedForward(unit, inner, lm)
    return _RoutedForward(unit, unit, lm)


def _owners(root: nn.Module, modules: Iterable[Optional[nn.Module]]) -> list[nn.Module]:
    """The FSDP units holding the parameters of ``modules``: each one's nearest unit at or above it, and every unit
    inside it; in module order (the same on every rank)."""
    names = _names(root)
    units = fsdp_units(root)
    chosen: dict[int, tuple[int, nn.Module]] = {}
    order = {id(unit): index for index, (_, unit) in enumerate(units)}
    for module in modules:
        if module is None or id(module) not in names:
            continue
        name = names[id(module)]
        above = [(n, u) for n, u in units if _is_prefix(n, name)]
        if above:
            _, nearest = max(above, key=lambda item: len(item[0]))
            chosen[id(nearest)] = (order[id(nearest)], nearest)
        for n, u in units:
            if n != name and _is_prefix(name, n):
                chosen[id(u)] = (order[id(u)], u)
    return [unit for _, unit in sorted(chosen.values(), key=lambda item: item[0])]


@contextlib.contextmanager
def readout_context(trainer: Any, pl_module: Optional[nn.Module], modules: Iterable[Optional[nn.Module]]):
    """Within the block, the parameters of ``modules`` are full tensors (no-op without FSDP).

    A collective under FSDP: every rank must enter it the same number of times, in the same order, and it must not
    be entered during a forward or backward pass (never around a forward: use :func:`probe_forward_target`).
    The gathered parameters are freed on exit; nothing is written back.
    """
    root = wrapped_root(trainer, pl_module)
    owners = _owners(root, modules) if root is not None else []
    if not owners:
        yield
        return
    with contextlib.ExitStack() as stack:
        for unit in owners:
            if _is_fsdp1(unit):
                stack.enter_context(type(unit).summon_full_params(unit, recurse=False, writeback=False))
            else:  # FSDP2 (on paper: not exercised by the tests)
                unit.unshard()
                stack.callback(unit.reshard)
        yield


def readout_context_factory(
    trainer: Any, pl_module: nn.Module, lm: nn.Module, parts: Any = None
) -> Optional[Callable[[], ContextManager]]:
    """``None`` without FSDP, else a zero-argument callable returning :func:`readout_context` over the input
    embedding, the unembedding and the final norm of ``lm`` (``parts``: its :class:`ModelParts`, found when None)."""
    if not is_sharded(trainer, pl_module):
        return None
    modules: list[Optional[nn.Module]] = []
    get_in = getattr(lm, "get_input_embeddings", None)
    if callable(get_in):
        with contextlib.suppress(Exception):
            modules.append(get_in())
    if parts is None:
        from .model_parts import find_model_parts

        parts = find_model_parts(lm)
    readout_modules = getattr(parts, "readout_modules", None)  # a final path of several modules: each one
    modules += readout_modules() if callable(readout_modules) else [getattr(parts, "unembed", None),
                                                                     getattr(parts, "final_norm", None)]
    modules = [m for m in modules if isinstance(m, nn.Module)]
    return lambda: readout_context(trainer, pl_module, modules)


def param_count(module: nn.Module, root: Optional[nn.Module] = None) -> int:
    """The number of parameters of ``module`` as if unsharded. Under FSDP1 (``use_orig_params=True``) a parameter's
    ``numel()`` is this rank's shard, so the count comes from the flat parameters' recorded shapes; pass ``root``
    (``trainer.strategy.model``) when FSDP units above ``module`` own some of its parameters. FSDP2's DTensors
    report their global size already. Shared parameters count once, as in ``module.parameters()``."""
    inside = set(id(m) for m in module.modules())
    counted: set = set()
    total = 0
    search = root if root is not None else module
    for unit in (m for m in search.modules() if _is_fsdp1(m)):
        handle = getattr(unit, "_handle", None)
        flat = getattr(handle, "flat_param", None) if handle is not None else None
        if flat is None:
            continue
        for info, shape in zip(flat._param_infos, flat._shapes):
            if id(info.module) not in inside:
                continue
            param = getattr(info.module, info.param_name, None)
            if param is not None:
                if id(param) in counted:
                    continue
                counted.add(id(param))
            total += int(torch.Size(shape).numel())
    for param in module.parameters():
        if id(param) in counted or type(param).__name__ == "FlatParameter":
            continue
        counted.add(id(param))
        total += int(param.numel())
    return total
