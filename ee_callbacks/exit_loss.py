"""Early-exit-aware training (LayerSkip, Elhoushi et al. 2024): early-exit loss through the shared head, curricula,
and layer dropout that grows with depth.

**This changes training on purpose.** Unlike the probe and ``ExitHeads`` (which never alter a run), everything here
adds gradients through the model's own final norm and unembedding from intermediate layers, or skips blocks at
random, so that a sweep can compare plain pretraining with early-exit-aware pretraining on the same budget.

Plain PyTorch; a LightningModule uses it through :class:`EarlyExitAwareLM` (a mixin) or by calling
:class:`EarlyExitLoss` in its ``training_step``.

Loss (block indices ℓ = 1..L, ℓ = L the model's own output; ``CE_ℓ`` the next-token cross-entropy of the logit-lens
readout ``T(U(N(h_ℓ)))``, with gradients into the blocks *and* the shared head)::

    loss(t) = Σ_{ℓ ∈ A(t) ∪ {L}} e(t, ℓ) · CE_ℓ,     e(t, ℓ) = ẽ(ℓ) / Σ_{i ∈ A(t) ∪ {L}} ẽ(i)   (normalize=True)

with per-layer weights ẽ (``weights``): ``"layerskip"`` ẽ(ℓ) = scale · ℓ(ℓ−1)/2 for ℓ < L and ẽ(L) = L(L−1)/2 (the
0-indexed Σ_{i≤ℓ} i of the paper), ``"linear"`` scale · ℓ and L, ``"uniform"`` scale and 1, or an explicit list of
L−1 early weights (ẽ(L) = ``final_weight``, default 1). The active early layers A(t) (``curriculum``):

- ``"none"``: every early layer in ``layers``;
- ``"rotational"`` (period R): ℓ with (ℓ − 1) mod R = t mod R — a few layers per step, rotating (R = L−1 gives
  one layer per step, cycling through all);
- ``"gradual"`` (over ``total_steps`` T): ℓ joins once t·L ≥ T·(L − ℓ) — from the last early layer (at t = T/L) to
  the first (at t = T(L−1)/L).

Layer dropout (:class:`LayerDropout`): in training mode only, block ℓ is skipped (its output replaced by its input)
for each sequence with probability p_ℓ = p_max · D(ℓ), D(ℓ) = 2^{(ℓ−1)/(L−1)} − 1 (``"exp"``, LayerSkip) or
(ℓ−1)/(L−1) (``"linear"``): 0 for the first block, p_max for the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .capture import HiddenStateCapture, first_tensor, model_forward
from .model_parts import ModelParts, find_model_parts, unwrap_model

__all__ = ["EarlyExitLoss", "EarlyExitOutput", "LayerDropout", "EarlyExitAwareLM", "WEIGHT_SCHEMES", "CURRICULA"]

WEIGHT_SCHEMES = ("layerskip", "linear", "uniform")
CURRICULA = ("none", "rotational", "gradual")


@dataclass
class EarlyExitOutput:
    """``loss`` (the total, for backward), ``final_loss`` (CE of the model's own logits), ``layer_losses``
    ``{ℓ: CE_ℓ}`` of the active early layers, ``coefficients`` ``{ℓ: e(t, ℓ)}`` (including ℓ = L) and
    ``aux_loss``: a Mixture-of-Experts router's load-balancing loss as the model returned it (unscaled; None for
    models without one). :meth:`EarlyExitAwareLM.early_exit_step` adds ``router_aux_loss_coef · aux_loss`` to
    ``loss``."""

    loss: torch.Tensor
    final_loss: torch.Tensor
    layer_losses: dict = field(default_factory=dict)
    coefficients: dict = field(default_factory=dict)
    aux_loss: Optional[torch.Tensor] = None


def _parts_of(model_or_parts) -> ModelParts:
    if isinstance(model_or_parts, ModelParts):
        return model_or_parts
    if isinstance(model_or_parts, nn.Module):
        return find_model_parts(model_or_parts)
    raise TypeError(f"expected a model (nn.Module) or ModelParts, got {type(model_or_parts).__name__}")


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """Mean next-token cross-entropy (nats): ``logits[:, t]`` against ``labels[:, t+1]``; −100 and padding ignored."""
    labels = labels.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    z = logits[:, :-1, :].float()
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


class EarlyExitLoss:
    """LayerSkip early-exit loss through the model's shared head (changes training on purpose; see module docs).

    Args:
        model: the language model (or its :class:`ModelParts`); its final norm and unembedding read out every layer.
        layers: early layers that may get a loss (None: all of 1..L−1).
        weights: ``"layerskip"``, ``"linear"``, ``"uniform"`` or a list of L−1 per-block weights (block 1 first).
        scale: multiplies the early-layer weights (LayerSkip's e_scale).
        final_weight: ẽ(L); None: the scheme's own (L(L−1)/2, L, 1; 1 for an explicit list).
        curriculum: ``"none"``, ``"rotational"`` or ``"gradual"``.
        rotation_period: R of the rotational curriculum (default L−1: one early layer per step).
        total_steps: T of the gradual curriculum.
        normalize: divide by the sum of the active weights (a weighted mean, as in LayerSkip); otherwise a sum.

    Call ``loss_fn(hidden_states, labels, step, logits=..., attention_mask=...)`` with ``hidden_states`` the
    captured block outputs (``HiddenStateCapture(parts, detach=False).states``: index ℓ is block ℓ's raw output) or a
    Hugging Face ``output_hidden_states`` tuple (same indexing for ℓ < L), or a dict ``{ℓ: h_ℓ}``; ``labels``
    aligned with the inputs (shifted inside, −100 ignored). Pass the model's ``logits`` or its ``final_loss``.
    """

    def __init__(
        self,
        model,
        layers: Optional[Sequence[int]] = None,
        weights: Union[str, Sequence[float]] = "layerskip",
        scale: float = 1.0,
        final_weight: Optional[float] = None,
        curriculum: str = "none",
        rotation_period: Optional[int] = None,
        total_steps: Optional[int] = None,
        normalize: bool = True,
    ):
        self.parts = _parts_of(model)
        if self.parts.unembed is None:
            raise ValueError("EarlyExitLoss needs the model's unembedding (LM head)")
        L = self.parts.n_layers
        if L < 2:
            raise ValueError(f"EarlyExitLoss needs at least 2 blocks, the model has {L}")
        self.n_layers = L
        self.layers = list(range(1, L)) if layers is None else sorted({int(x) for x in layers})
        bad = [x for x in self.layers if not 1 <= x < L]
        if bad:
            raise ValueError(f"EarlyExitLoss layers must lie in 1..{L - 1}, got {bad}")
        if isinstance(weights, str):
            if weights not in WEIGHT_SCHEMES:
                raise ValueError(f"weights must be one of {list(WEIGHT_SCHEMES)} or a list of {L - 1} floats, "
                                 f"got {weights!r}")
            early = {"layerskip": lambda l: l * (l - 1) / 2.0, "linear": float, "uniform": lambda l: 1.0}[weights]
            default_final = {"layerskip": L * (L - 1) / 2.0, "linear": float(L), "uniform": 1.0}[weights]
            self.weights = {l: float(scale) * early(l) for l in range(1, L)}
        else:
            weights = [float(w) for w in weights]
            if len(weights) != L - 1:
                raise ValueError(f"weights as a list needs one weight per early block ({L - 1}), got {len(weights)}")
            default_final = 1.0
            self.weights = {l: float(scale) * weights[l - 1] for l in range(1, L)}
        if any(w < 0 or not math.isfinite(w) for w in self.weights.values()):
            raise ValueError("EarlyExitLoss weights must be finite and ≥ 0")
        self.final_weight = float(default_final if final_weight is None else final_weight)
        if not self.final_weight > 0:
            raise ValueError(f"final_weight must be positive, got {self.final_weight}")
        if curriculum not in CURRICULA:
            raise ValueError(f"curriculum must be one of {list(CURRICULA)}, got {curriculum!r}")
        self.curriculum = curriculum
        self.rotation_period = int(rotation_period) if rotation_period is not None else L - 1
        if self.rotation_period < 1:
            raise ValueError(f"rotation_period must be ≥ 1, got {rotation_period}")
        if curriculum == "gradual" and (total_steps is None or int(total_steps) < 1):
            raise ValueError("the gradual curriculum needs total_steps (the step by which every layer is enabled)")
        self.total_steps = int(total_steps) if total_steps is not None else None
        self.normalize = bool(normalize)

    # ------------------------------------------------------------------ schedule
    def active_layers(self, step: int) -> list:
        """Early layers with a loss at training step ``step`` (before dropping zero weights)."""
        step = int(step)
        L = self.n_layers
        if self.curriculum == "rotational":
            R = self.rotation_period
            return [l for l in self.layers if (l - 1) % R == step % R]
        if self.curriculum == "gradual":
            return [l for l in self.layers if step * L >= self.total_steps * (L - l)]
        return list(self.layers)

    def coefficients(self, step: int) -> dict:
        """``{ℓ: e(t, ℓ)}`` for the active layers with a non-zero weight, and ℓ = L."""
        raw = {l: self.weights[l] for l in self.active_layers(step) if self.weights[l] > 0}
        raw[self.n_layers] = self.final_weight
        total = sum(raw.values()) if self.normalize else 1.0
        return {l: w / total for l, w in raw.items()}

    # ------------------------------------------------------------------ the loss
    def __call__(self, hidden_states, labels: torch.Tensor, step: int, logits: Optional[torch.Tensor] = None,
                 final_loss: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> EarlyExitOutput:
        coef = self.coefficients(step)
        L = self.n_layers
        if final_loss is None:
            if logits is None:
                raise ValueError("EarlyExitLoss needs the model's logits or its final_loss")
            final_loss = next_token_ce(logits, labels, attention_mask)
        total = final_loss * coef[L]
        layer_losses = {}
        for layer in sorted(l for l in coef if l != L):
            h = _hidden(hidden_states, layer, L)
            if torch.is_grad_enabled() and not h.requires_grad:
                raise ValueError(
                    f"EarlyExitLoss: h_{layer} carries no gradient (captured detached, or inside reentrant gradient "
                    "checkpointing). Capture with HiddenStateCapture(parts, detach=False), use non-reentrant "
                    "checkpointing, or pass output_hidden_states"
                )
            ce = next_token_ce(self.parts.readout(h), labels, attention_mask)
            layer_losses[layer] = ce
            total = total + coef[layer] * ce
        return EarlyExitOutput(loss=total, final_loss=final_loss, layer_losses=layer_losses, coefficients=coef)


def _hidden(hidden_states, layer: int, L: int) -> torch.Tensor:
    if isinstance(hidden_states, Mapping):
        h = hidden_states.get(layer)
    elif isinstance(hidden_states, (list, tuple)):
        if len(hidden_states) != L + 1:
            raise ValueError(f"hidden_states has {len(hidden_states)} entries; expected L + 1 = {L + 1} "
                             "(index ℓ is block ℓ's output, index 0 the embedding)")
        h = hidden_states[layer]
    else:
        raise TypeError(f"hidden_states must be a sequence of L + 1 tensors or a dict {{layer: tensor}}, "
                        f"got {type(hidden_states).__name__}")
    if not isinstance(h, torch.Tensor):
        raise ValueError(f"no hidden state for block {layer}")
    return h


class LayerDropout:
    """Stochastic depth on the blocks, the rate growing with depth (LayerSkip). Changes training on purpose.

    In training mode (``block.training``) block ℓ's output is replaced by its input for each sequence with
    probability p_ℓ = p_max · D(ℓ) (see module docs); in eval mode the blocks run unchanged. Implemented by forward
    hooks (the dropped block still computes; the hook discards its output), so it works for any block that maps a
    (B, T, d) hidden state to one of the same shape. Masks come from a private generator keyed by
    (seed, step, micro-batch, layer): no global RNG draw, the same masks after a resume and when gradient
    checkpointing recomputes a block. Call :meth:`set_step` once per training micro-batch.

    Use as a context manager or call :meth:`attach` / :meth:`detach`.
    """

    def __init__(self, model, p_max: float = 0.1, curve: str = "exp", seed: int = 0):
        self.parts = _parts_of(model)
        if not 0.0 <= float(p_max) <= 1.0:
            raise ValueError(f"p_max must lie in [0, 1], got {p_max}")
        if curve not in ("exp", "linear"):
            raise ValueError(f"curve must be 'exp' or 'linear', got {curve!r}")
        self.p_max = float(p_max)
        self.curve = curve
        self.seed = int(seed)
        self.step = 0
        self.micro = 0
        self._handles: list = []

    def rates(self) -> list:
        """``[p_1, …, p_L]``: the drop probability of each block."""
        L = self.parts.n_layers
        out = []
        for layer in range(1, L + 1):
            x = (layer - 1) / (L - 1) if L > 1 else 1.0
            d = (2.0 ** x - 1.0) if self.curve == "exp" else x
            out.append(self.p_max * d)
        return out

    def set_step(self, step: int, micro_batch: int = 0) -> None:
        self.step, self.micro = int(step), int(micro_batch)

    def attach(self) -> "LayerDropout":
        self.detach()
        for layer, (block, p) in enumerate(zip(self.parts.blocks, self.rates()), start=1):
            if p > 0:
                self._handles.append(block.register_forward_hook(self._hook(layer, p), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LayerDropout":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def _hook(self, layer: int, p: float):
        def hook(module, args, kwargs, output):
            if not module.training:
                return None
            x = first_tensor(args) if args else None
            if x is None:
                x = kwargs.get("hidden_states")
            out = first_tensor(output)
            if x is None or out is None or x.shape != out.shape or out.dim() < 2:
                raise ValueError(f"LayerDropout: block {layer} does not map a hidden state to one of the same shape")
            key = (self.seed * 1_000_003 + self.step * 9_973 + self.micro * 101 + layer) % (2**63 - 1)
            gen = torch.Generator().manual_seed(key)
            keep = torch.rand(out.shape[0], generator=gen) >= p
            keep = keep.to(out.device).reshape((-1,) + (1,) * (out.dim() - 1))
            new = torch.where(keep, out, x.to(out.dtype))
            if isinstance(output, torch.Tensor):
                return new
            if isinstance(output, (tuple, list)):
                items = list(output)
                index = next(i for i, item in enumerate(items) if isinstance(item, torch.Tensor))
                items[index] = new
                return type(output)(items) if isinstance(output, tuple) else items
            raise ValueError(f"LayerDropout: cannot replace the output of block {layer} ({type(output).__name__})")

        return hook


class EarlyExitAwareLM:
    """Mixin for a LightningModule whose language model is ``self.model``: LayerSkip-style training in one call.

    Changes training on purpose. Usage::

        class MyLM(EarlyExitAwareLM, L.LightningModule):
            def configure_model(self):
                self.model = ...
                self.configure_early_exit(weights="layerskip", scale=0.1, curriculum="rotational",
                                          layer_dropout=0.1)

            def training_step(self, batch, batch_idx):
                out = self.early_exit_step(batch["input_ids"], batch.get("attention_mask"), micro_batch=batch_idx)
                self.log("train/loss", out.final_loss)
                return out.loss

    ``early_exit_step`` runs the ordinary forward once, capturing the block outputs by hooks (with gradients), and
    returns :class:`EarlyExitOutput`. Without ``configure_early_exit`` (or in eval mode for the dropout) it is the
    plain next-token loss. ``step`` defaults to ``trainer.global_step``; pass ``micro_batch=batch_idx`` so that the
    micro-batches of one accumulated step draw different layer-dropout masks. The model is called through
    ``capture.model_forward``; a Mixture-of-Experts model's router load-balancing loss (its output's ``aux_loss``,
    present when the config sets ``output_router_logits``) is kept: ``loss`` includes
    ``config.router_aux_loss_coef · aux_loss`` and ``aux_loss`` holds the unscaled value, as in plain training.
    """

    early_exit_loss: Optional[EarlyExitLoss] = None
    layer_dropout: Optional[LayerDropout] = None

    def configure_early_exit(self, layer_dropout: float = 0.0, dropout_curve: str = "exp", seed: int = 0,
                             enabled: bool = True, **loss_kwargs) -> None:
        """Build the loss (``loss_kwargs`` go to :class:`EarlyExitLoss`) and attach layer dropout (p_max)."""
        model = unwrap_model(self.model)
        if self.layer_dropout is not None:
            self.layer_dropout.detach()
        self.early_exit_loss = EarlyExitLoss(model, **loss_kwargs) if enabled else None
        self.layer_dropout = (LayerDropout(model, layer_dropout, dropout_curve, seed).attach()
                              if layer_dropout > 0 else None)

    def early_exit_step(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        labels: Optional[torch.Tensor] = None, step: Optional[int] = None,
                        micro_batch: int = 0) -> EarlyExitOutput:
        model = unwrap_model(self.model)
        if step is None:
            trainer = getattr(self, "_trainer", None)
            step = int(trainer.global_step) if trainer is not None else 0
        if self.layer_dropout is not None:
            self.layer_dropout.set_step(step, micro_batch)
        labels = input_ids if labels is None else labels
        loss_fn = self.early_exit_loss
        outputs: list = []
        grab = model.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            if loss_fn is None:
                logits = model_forward(model, input_ids, attention_mask)
                final = next_token_ce(logits, labels, attention_mask)
                result = EarlyExitOutput(loss=final, final_loss=final, coefficients={})
            else:
                with HiddenStateCapture(loss_fn.parts, detach=False, with_input=False) as cap:
                    logits = model_forward(model, input_ids, attention_mask)
                result = loss_fn(cap.states, labels, step, logits=logits, attention_mask=attention_mask)
        finally:
            grab.remove()
        return _with_router_aux_loss(result, model, outputs[-1] if outputs else None)


def _with_router_aux_loss(result: EarlyExitOutput, model, output) -> EarlyExitOutput:
    """Keep a MoE router's load-balancing loss: ``loss += router_aux_loss_coef · aux_loss`` (coef 0 if unset)."""
    aux = output.get("aux_loss") if isinstance(output, dict) else getattr(output, "aux_loss", None)
    if not isinstance(aux, torch.Tensor):
        return result
    coef = float(getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0)
    result.aux_loss = aux
    result.loss = result.loss + coef * aux
    return result
