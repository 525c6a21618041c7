"""Hidden-state capture by forward hooks on the blocks.

Hooks work for any ``nn.Module`` whose blocks are called once per forward, so the probe does not depend on a model
family's ``output_hidden_states`` conventions (in transformers the last entry of ``hidden_states`` is already passed
through the final norm, and Mamba's tuple has no embedding entry). Here ``h_0`` is the input of the first block (the
embedding output, after any embedding scaling or position embeddings) and ``h_ℓ`` the raw output of block ℓ — the
final norm is never applied by the capture.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from .model_parts import ModelParts, ModelPartsError

__all__ = ["HiddenStateCapture", "capture_hidden_states", "model_forward", "first_tensor"]


def first_tensor(obj) -> Optional[torch.Tensor]:
    """The hidden state inside a block's output: the tensor itself, or the first tensor of a tuple/list/dict."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                return item
        return None
    for key in ("hidden_states", "last_hidden_state"):
        val = getattr(obj, key, None) if not isinstance(obj, dict) else obj.get(key)
        if isinstance(val, torch.Tensor):
            return val
    return None


class HiddenStateCapture:
    """Context manager that records ``h_0..h_L`` during one forward pass.

    Args:
        parts: the model's parts (``find_model_parts``).
        detach: store detached tensors (always true for probing; exit heads also train on detached states).
        with_input: also capture ``h_0`` (the first block's input).

    After the forward, ``states[ℓ]`` is ``h_ℓ`` (``states[0]`` is None when the first block's input is not a tensor).
    The hooks are removed on exit, also when the forward raised.
    """

    def __init__(self, parts: ModelParts, detach: bool = True, with_input: bool = True):
        self.parts = parts
        self.detach = detach
        self.with_input = with_input
        self.handles: list = []
        self.states: list = [None] * (parts.n_layers + 1)
        self.calls = [0] * (parts.n_layers + 1)

    def _store(self, index: int, tensor: Optional[torch.Tensor]):
        if tensor is None:
            return
        self.calls[index] += 1
        self.states[index] = tensor.detach() if self.detach else tensor

    def reset(self):
        self.states = [None] * (self.parts.n_layers + 1)
        self.calls = [0] * (self.parts.n_layers + 1)

    def __enter__(self) -> "HiddenStateCapture":
        self.reset()
        blocks = self.parts.blocks
        if self.with_input:

            def pre_hook(module, args, kwargs):
                tensor = first_tensor(args) if args else None
                if tensor is None:
                    for key in ("hidden_states", "x", "hidden_state", "inputs_embeds", "input"):
                        if isinstance(kwargs.get(key), torch.Tensor):
                            tensor = kwargs[key]
                            break
                self._store(0, tensor)

            self.handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i, block in enumerate(blocks, start=1):

            def hook(module, args, output, index=i):
                tensor = first_tensor(output)
                if tensor is None:
                    raise ModelPartsError(
                        f"block {index} ({type(module).__name__}) returned {type(output).__name__} with no tensor: "
                        "pass blocks='path' pointing at modules that return the hidden state"
                    )
                self._store(index, tensor)

            self.handles.append(block.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False

    def check(self):
        """Raise if a block did not run exactly once during the forward."""
        bad = [i for i in range(1, len(self.calls)) if self.calls[i] != 1]
        if bad:
            raise ModelPartsError(
                f"blocks {bad} ran {[self.calls[i] for i in bad]} times in one forward; the probe needs every block "
                "to run exactly once. Pass blocks='path' to the real per-layer blocks."
            )


def capture_hidden_states(parts: ModelParts, detach: bool = True, with_input: bool = True) -> HiddenStateCapture:
    """Shorthand for :class:`HiddenStateCapture`."""
    return HiddenStateCapture(parts, detach=detach, with_input=with_input)


_FORWARD_KW_CACHE: dict = {}


def _accepts(model: nn.Module, name: str) -> bool:
    key = (type(model), name)
    if key not in _FORWARD_KW_CACHE:
        try:
            params = inspect.signature(model.forward).parameters
            _FORWARD_KW_CACHE[key] = name in params or any(
                p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        except (TypeError, ValueError):
            _FORWARD_KW_CACHE[key] = False
    return _FORWARD_KW_CACHE[key]


def model_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """Call ``model`` on a batch the way a causal LM expects, returning its logits (or None without LM head).

    Hugging Face models get ``attention_mask`` and ``use_cache=False``; a plain module is called as ``model(ids)``.
    """
    kwargs = {}
    if attention_mask is not None and _accepts(model, "attention_mask"):
        kwargs["attention_mask"] = attention_mask
    if _accepts(model, "use_cache") and hasattr(model, "config"):
        kwargs["use_cache"] = False
    out = model(input_ids, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None) if not isinstance(out, dict) else out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None
