"""``ExitHeads``: train tuned lenses, exit heads and CALM confidence classifiers online, beside the model."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

from ..cadence import CostMeter, reaches_multiple
from ..capture import first_tensor
from ..distributed import probe_forward_target, readout_context_factory
from ..heads_optim import OptimSettings
from ..probe_data import tuple_marks_padding
from ..model_parts import ModelPartsError, find_language_model, find_model_parts, prove_model_parts
from ..readouts import (
    HEAD_KINDS,
    OBJECTIVES,
    HeadTargets,
    build_readout,
    load_exit_heads,
    proven_parts,
    resolve_layers,
    save_exit_heads,
)
from ..sinks.loggers import log_to_loggers

__all__ = ["ExitHeads", "load_exit_heads"]

log = logging.getLogger("ee_callbacks")



class ExitHeads(Callback):
    r"""Train lightweight exit heads online from the hidden states the training forward already computes.

    Forward hooks on the blocks and on the unembedding keep, for a sample of at most ``max_tokens`` positions of each
    training micro-batch, the detached hidden states ``h_ℓ`` and the model's own logits ``z_L`` (no extra forward).
    After the model's step the heads take their own optimizer step on them. The model trains exactly as without the
    callback: the captures are detached, the heads read the model's norm and unembedding with detached parameters
    (never touching their ``.grad``), the token sample uses a private generator (no global RNG draw), and
    ``LightningModule.log`` is never called.

    Head kinds (see :mod:`ee_callbacks.readouts`): ``tuned_lens`` (residual affine translator, zero-init, shared
    frozen head; KL to the final distribution), ``linear`` (own norm + unembedding copied from the model), ``mlp``
    (residual MLP before the shared head), ``confidence`` (CALM classifier, BCE against
    ``1[argmax z_ℓ = argmax z_L]``). Every ``EarlyExitProbe`` in the trainer evaluates them (its ``heads`` section,
    curves ``head_<kind>``, summary ``head_<kind>_oracle_skip_strict`` and ``head_<kind>_eas``).

    Logged keys (through every logger of the trainer, with ``step=trainer.global_step``, every
    ``log_every_n_steps`` optimizer steps, global rank zero only):

    - ``ee/heads_train/<kind>/loss``: the head's training loss (mean over its layers and the step's micro-batches;
      KL or CE in nats for logits kinds, BCE in nats for ``confidence``);
    - ``ee/heads_train/lr``: the heads' learning rate.

    Cost (see docs/exit_heads.md for the measured trade-off): the heads train on ``max_tokens`` sampled positions of
    every ``every_n_steps``-th optimizer step (no capture at all on the other steps). Kinds that read through the
    model's own head (``tuned_lens``, ``mlp``) stack their layers into one unembedding matmul and one backward, and
    the confidence heads' logit-lens targets of all layers come from one matmul, as long as the stacked
    (layers × tokens × V) logits stay under ``stack_elements``. ``cost_summary()`` gives the wall and CPU seconds
    spent (``capture``, ``heads_train``).

    Rules:

    - Once per optimizer step: each training micro-batch adds its gradients; the heads step (gradients averaged over
      the micro-batches) when ``trainer.global_step`` has advanced, i.e. under gradient accumulation once per step.
    - Only the first call of each block per training batch is kept, and capture stops after the unembedding ran: so
      gradient checkpointing's recomputation in backward, validation, sanity checks and the probe's own forwards
      are ignored. A ``training_step`` that runs the model several times trains heads on its first forward only.
    - Under data parallelism every rank captures its own tokens and the head gradients are averaged across ranks
      (one all-reduce per head step), so the heads stay identical.
    - State (heads, optimizer, scheduler, step counter) is saved in the Lightning checkpoint and restored whether
      Lightning restores callbacks before ``on_fit_start`` (single device, DDP: kept pending until the heads are
      built) or after (FSDP, DeepSpeed). Gradients of a half-accumulated step are not saved.
    - Hooks are removed at the end of fit (also when fit fails).

    Args:
        kinds: head kinds to train, a subset of ``tuned_lens``, ``linear``, ``mlp``, ``confidence``.
        layers: blocks with a head: None (all of 1..L−1), an int stride k (k, 2k, …), or a list of block indices.
        max_tokens: positions sampled per training micro-batch (None: all valid positions).
        every_n_steps: train the heads on every this-many-th optimizer step only (1: every step); when a batch moves
            ``global_step`` past a multiple (manual optimization with several optimizers), on the first step reached
            past it.
        stack_elements: the most readout-logit elements (layers × tokens × V) one stacked matmul may produce.
        objective: ``kl`` (KL(p_L ‖ p_head), the tuned-lens objective) or ``ce`` (next-token cross-entropy) for the
            logits kinds.
        optim: the heads' optimiser settings, an :class:`~ee_callbacks.heads_optim.OptimSettings` or a mapping of
            some of its keys (the rest keep their defaults): ``optimizer`` (``adam``, ``adamw`` or ``sgd``: momentum
            0.9, Nesterov; default ``adam``), ``lr`` (1e-3), ``weight_decay`` (0), ``betas`` ((0.9, 0.999)),
            ``schedule`` (None/``constant``, ``cosine`` or ``linear`` decay to ``min_lr_ratio`` (0) over
            ``total_steps``, default the trainer's estimated optimizer steps, after ``warmup_steps`` (0) of linear
            warm-up) and ``grad_clip`` (clip each kind's gradient norm to this; None: no clipping). E.g.
            ``optim={"lr": 1e-2, "schedule": "cosine"}``.
        mlp_hidden: width of the ``mlp`` heads (default d).
        seed: seed of the token sample and of the ``mlp`` initialisation.
        model_attr, blocks, final_norm, unembed: as for ``EarlyExitProbe`` (the language model is found structurally
            and its parts are proven at fit start on a few seeded random token ids against the model's own logits).
        save_dir: when set, ``save()`` the heads there at the end of fit; an ``EarlyExitProbe`` finds them through
            :meth:`readout_artifacts` (the W&B artifact then includes the heads).
        log_every_n_steps: optimizer steps between logged training losses.
        **flat_keywords: the ``optim`` keys may also be passed flat, as in earlier releases (``ExitHeads(lr=1e-2)``).
    """

    def __init__(
        self,
        kinds: Sequence[str] = ("tuned_lens", "confidence"),
        layers: Union[None, int, str, Sequence[int]] = None,
        max_tokens: Optional[int] = 128,
        every_n_steps: int = 4,
        stack_elements: int = 2**25,
        objective: str = "kl",
        optim: Union[OptimSettings, Mapping, None] = None,
        mlp_hidden: Optional[int] = None,
        seed: int = 0,
        model_attr: Optional[str] = None,
        blocks: Optional[str] = None,
        final_norm: Optional[str] = None,
        unembed: Optional[str] = None,
        save_dir: Optional[Union[str, Path]] = None,
        log_every_n_steps: int = 50,
        **flat_keywords: Any,
    ):
        super().__init__()
        if flat_keywords:  # optimiser settings passed flat, as in earlier releases: ExitHeads(lr=1e-2)
            from ..settings import fold_flat_keywords

            flat = {name: ("optim", name) for name in OptimSettings.__dataclass_fields__}
            current = dataclasses.asdict(optim) if dataclasses.is_dataclass(optim) else optim
            optim = fold_flat_keywords("ExitHeads", flat_keywords, flat, {"optim": current})["optim"]
        if isinstance(kinds, str):
            kinds = [kinds]
        kinds = [str(k) for k in kinds]
        unknown = [k for k in kinds if k not in HEAD_KINDS]
        if not kinds or unknown or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct entries of {list(HEAD_KINDS)}, got {kinds}")
        if layers is not None and not isinstance(layers, (int, str)):
            layers = [int(x) for x in layers]
        if isinstance(layers, str) and layers != "all":
            raise ValueError(f"layers must be None, 'all', an int stride or a list of block indices, got {layers!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or int(max_tokens) < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer (1: train the heads every step), got "
                             f"{every_n_steps!r}")
        if isinstance(stack_elements, bool) or not isinstance(stack_elements, int) or stack_elements < 1:
            raise ValueError(f"stack_elements must be a positive integer, got {stack_elements!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        self.optim = OptimSettings.from_any(optim)
        if isinstance(log_every_n_steps, bool) or int(log_every_n_steps) < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        self.kinds = kinds
        self.layers_arg = layers
        self.max_tokens = int(max_tokens) if max_tokens is not None else None
        self.every_n_steps = every_n_steps
        self.stack_elements = stack_elements
        self.objective = objective
        self.mlp_hidden = mlp_hidden
        self.seed = int(seed)
        self.model_attr = model_attr
        self.part_paths = {"blocks": blocks, "final_norm": final_norm, "unembed": unembed}
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self._saved_at_step: Optional[int] = None
        self.log_every_n_steps = int(log_every_n_steps)
        # state
        self.heads: Optional[torch.nn.ModuleDict] = None
        self.head_steps = 0
        self._optimizer = None
        self._scheduler = None
        self._pending_state: Optional[dict] = None
        self._init_runtime()

    def _init_runtime(self) -> None:
        """The per-fit runtime attributes: parts, hooks, captures, loss sums, warnings, costs."""
        self._parts = None
        self._lm = None
        self._layers: list = []
        self._needed: list = []
        self._handles: list = []
        self._armed = False
        self._captures: dict = {}
        self._final: Optional[torch.Tensor] = None
        self._selection: Optional[torch.Tensor] = None
        self._positions: tuple = (0, 0)
        self._batch_info: Optional[tuple] = None
        self._sample_key = (0, 0)
        self._step_at_start = 0
        self._heads_choice: Optional[tuple] = None  # (a batch's start step, whether the heads train on it)
        self._start_before: Optional[int] = None  # the start step before the first batch (restored on resume)
        self._micro_batches = 0
        self._loss_sums: dict = {}
        self._loss_counts: dict = {}
        self._warned: set = set()
        self._next_log_step = self.log_every_n_steps
        self.costs = CostMeter()

    # ------------------------------------------------------------------ identity / state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(kinds=tuple(self.kinds), layers=str(self.layers_arg))

    def state_dict(self) -> dict:
        if self.heads is None:  # restored but not yet built: pass the pending state on unchanged
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {
            "version": 1,
            "kinds": list(self.kinds),
            "layers": list(self._layers),
            "heads": {kind: {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
                      for kind, head in self.heads.items()},
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "scheduler": self._scheduler.state_dict() if self._scheduler is not None else None,
            "head_steps": self.head_steps,
            "last_start_step": self._heads_choice[0] if self._heads_choice is not None else self._start_before,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self._start_before = state_dict.get("last_start_step")
        if self.heads is None:  # DDP / single device: Lightning restores callbacks before on_fit_start
            self._pending_state = dict(state_dict)
        else:  # FSDP / DeepSpeed: after on_fit_start built the heads
            self._apply_state(state_dict)

    def _apply_state(self, state: dict) -> None:
        if list(state.get("kinds", [])) != list(self.kinds):
            raise ValueError(f"ExitHeads: the checkpoint holds heads of kinds {state.get('kinds')}, this callback "
                             f"trains {self.kinds}; use the same kinds to resume")
        if list(state.get("layers", [])) != list(self._layers):
            raise ValueError(f"ExitHeads: the checkpoint's heads cover layers {state.get('layers')}, this callback "
                             f"{self._layers}; use the same layers to resume")
        for kind, head in self.heads.items():
            head.load_state_dict(state["heads"][kind], strict=True)
        if state.get("optimizer") is not None and self._optimizer is not None:
            self._optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None and self._scheduler is not None:
            self._scheduler.load_state_dict(state["scheduler"])
        self.head_steps = int(state.get("head_steps", 0))
        self._pending_state = None

    # ------------------------------------------------------------------ building
    def build(self, lm: torch.nn.Module, device=None, total_steps: Optional[int] = None, parts=None) -> dict:
        """Build the heads for language model ``lm`` (idempotent), their optimizer and schedule; apply any state
        restored before the heads existed. ``parts``: ``lm``'s (proven) parts, found when None. Returns
        ``{kind: readout}``."""
        if self.heads is not None and self._lm is lm:
            return dict(self.heads.items())
        if parts is None:  # proven, as fit start does: a structural guess misses OPT's final path and its width
            parts = proven_parts(lm, self.part_paths, strict=True)
        if parts.unembed is None:
            raise ModelPartsError("ExitHeads needs the model's unembedding (LM head) to train exit heads; pass "
                                  "unembed='path.to.lm_head' if discovery missed it")
        self._lm, self._parts = lm, parts
        self._layers = resolve_layers(self.layers_arg, parts.n_layers)
        if device is None:
            device = parts.unembed.weight.device
        heads = {}
        for kind in self.kinds:
            options = {"hidden": self.mlp_hidden, "seed": self.seed} if kind == "mlp" else {}
            heads[kind] = build_readout(kind, parts, self._layers, self.objective, **options)
        self.heads = torch.nn.ModuleDict(heads).to(device)
        self._needed = sorted(set(self._layers))
        self._make_optimizer(total_steps)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
        return dict(self.heads.items())

    def _make_optimizer(self, total_steps: Optional[int]) -> None:
        groups = [{"params": list(head.parameters()), "kind": kind} for kind, head in self.heads.items()]
        self._optimizer = self.optim.make_optimizer(groups)
        self._scheduler = self.optim.make_scheduler(self._optimizer, total_steps)

    def probe_readouts(self) -> dict:
        """``{kind: readout}`` for ``EarlyExitProbe`` (empty before the heads are built)."""
        return dict(self.heads.items()) if self.heads is not None else {}

    # ------------------------------------------------------------------ hooks
    def _register_hooks(self) -> None:
        self._remove_hooks()
        blocks = self._parts.blocks
        for layer in self._needed:
            self._handles.append(blocks[layer - 1].register_forward_hook(self._block_hook(layer)))
        self._handles.append(self._parts.unembed.register_forward_hook(self._unembed_hook))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _select(self, shape: torch.Size, device) -> Optional[torch.Tensor]:
        """Flat indices of the sampled positions of this micro-batch (same for every layer and the logits)."""
        if self._selection is not None:
            return self._selection
        if len(shape) != 3:
            return None
        B, T = int(shape[0]), int(shape[1])
        self._positions = (B, T)
        valid = torch.ones(B, T, dtype=torch.bool)
        info = self._batch_info
        if info is not None and info[0].shape == (B, T):
            valid = info[2]
        flat = valid.reshape(-1).nonzero().squeeze(1)
        if self.max_tokens is not None and flat.numel() > self.max_tokens:
            # a private generator keyed by (seed, step, batch index): no global RNG draw, identical after a resume
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self._sample_key[0] * 7_919 + self._sample_key[1]) % (2**63 - 1))
            pick = torch.randperm(flat.numel(), generator=gen)[: self.max_tokens].sort().values
            flat = flat[pick]
        self._selection = flat.to(device)
        return self._selection

    def _block_hook(self, layer: int):
        def hook(module, args, output):
            if not self._armed or layer in self._captures:
                return None
            h = first_tensor(output)
            if h is None or h.dim() != 3:
                self._disarm_with_warning("block_shape", f"block {layer} returned no (B, T, d) hidden state")
                return None
            sel = self._select(h.shape, h.device)
            self._captures[layer] = h.detach().reshape(-1, h.shape[-1]).index_select(0, sel)
            return None

        return hook

    def _unembed_hook(self, module, args, output):
        if not self._armed:
            return None
        self._armed = False  # the training forward is over: ignore backward recomputation, probes, validation
        z = first_tensor(output)
        sel = self._selection
        if z is None or sel is None or z.dim() != 3 or tuple(z.shape[:2]) != self._positions:
            self._disarm_with_warning("logits_shape", "the unembedding's output is not (B, T, V) over the batch "
                                      "(logits_to_keep?) — heads skip this batch")
            return None
        self._final = z.detach().reshape(-1, z.shape[-1]).index_select(0, sel)
        return None

    def _disarm_with_warning(self, key: str, message: str) -> None:
        self._armed = False
        self._captures = {}
        self._final = None
        self._warn_once(key, f"ExitHeads: {message}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        lm = find_language_model(pl_module, self.model_attr)
        total = None
        try:
            total = int(trainer.estimated_stepping_batches)
        except Exception:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is not None and not (0 < total < 2**62):
            total = None
        parts = None
        if self.heads is None or self._lm is not lm:
            parts = self._prove(trainer, pl_module, lm)
        self.build(lm, device=pl_module.device, total_steps=total, parts=parts)
        self._register_hooks()

    def _prove(self, trainer: Trainer, pl_module: LightningModule, lm: torch.nn.Module):
        """``lm``'s parts, proven against its own logits on seeded random token ids (a private generator: the global
        RNG streams are untouched)."""
        parts = find_model_parts(lm, **self.part_paths)
        if parts.unembed is None:
            return parts
        emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(lm, "config", None), "vocab_size", None) or 2
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, int(vocab), (2, 16), generator=gen)
        target = probe_forward_target(trainer, pl_module, lm)
        return prove_model_parts(lm, ids, None, **self.part_paths, forward_module=None if target is lm else target,
                                 readout_context=readout_context_factory(trainer, pl_module, lm, parts))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.heads is None or trainer.sanity_checking:
            return
        self._captures, self._final, self._selection = {}, None, None
        self._step_at_start = int(trainer.global_step)
        if not self._heads_step(self._step_at_start):
            return  # not a step the heads train on: no capture, no cost
        with self.costs.measure("capture"):
            self._batch_info = _batch_tokens(batch)
            if self.head_steps == 0 and tuple_marks_padding(batch):  # checked until the heads first step
                self._warn_once("tuple", "ExitHeads: tuple batches name only their first item (read as input_ids): "
                                "the heads also train on the padding or ignored labels another of their tensors "
                                "marks; yield dicts {'input_ids', 'attention_mask', 'labels'}")
        self._sample_key = (int(trainer.global_step), int(batch_idx))
        self._armed = True

    def _heads_step(self, step: int) -> bool:
        """Whether the heads train on the batches starting at optimizer step ``step``: the first step reached in each
        block of ``every_n_steps`` (a multiple of it, unless a batch jumped past one: manual optimization stepping
        several optimizers moves ``global_step`` by more than one per batch). Decided once per step, so every
        micro-batch of an accumulated step gets the same answer."""
        if self._heads_choice is None or self._heads_choice[0] != step:
            before = self._heads_choice[0] if self._heads_choice is not None else self._start_before
            self._heads_choice = (step, reaches_multiple(before, step, self.every_n_steps))
        return self._heads_choice[1]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.heads is None or trainer.sanity_checking:
            return
        self._armed = False
        complete = self._final is not None and all(layer in self._captures for layer in self._needed)
        if complete:
            with self.costs.measure("heads_train"):
                self._accumulate(self._captures, self._final, self._selection)
        elif self._captures or self._final is not None:
            self._warn_once("incomplete", "ExitHeads: a training forward did not run every headed block and the "
                                          "unembedding; that micro-batch is skipped")
        self._captures, self._final, self._selection = {}, None, None
        if int(trainer.global_step) != self._step_at_start and self._heads_step(self._step_at_start):
            with self.costs.measure("heads_train"):  # the model's optimizer stepped: so do the heads
                self._step(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        self._armed = False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.readout_artifacts(trainer.is_global_zero)

    def readout_artifacts(self, is_global_zero: bool) -> Optional[str]:
        """Save the heads to ``save_dir`` (once per fit, global rank zero writes) and return it; a readout provider's
        artifact hook: ``EarlyExitProbe`` uploads the directory with its records, whichever callback ends first."""
        if self.save_dir is None or self.heads is None:
            return None
        if is_global_zero and self._saved_at_step != self.head_steps:
            self.save(self.save_dir)
            self._saved_at_step = self.head_steps
        return str(self.save_dir)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._armed = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._armed = False

    # ------------------------------------------------------------------ training the heads
    def _targets(self, captures: dict, final_logits: torch.Tensor) -> HeadTargets:
        final = self._parts.transform_logits(final_logits.float())
        labels = None
        info = self._batch_info
        if info is not None and self._selection is not None:
            labels = info[1].reshape(-1).to(self._selection.device).index_select(0, self._selection)
        lens_agree = None
        if "confidence" in self.heads:
            confidence = self.heads["confidence"]
            top_final = final.argmax(dim=-1)
            lens_agree = {}
            with torch.no_grad():  # the logit lens of a group of layers in one unembedding matmul
                for group in self._layer_groups(confidence.layers, final.shape[0]):
                    stacked = torch.cat([captures[layer].float() for layer in group])
                    top = confidence.shared(stacked).argmax(dim=-1).view(len(group), -1)
                    for i, layer in enumerate(group):
                        lens_agree[layer] = top[i] == top_final
        return HeadTargets(final_logp=F.log_softmax(final, dim=-1), labels=labels, lens_agree=lens_agree)

    def _accumulate(self, captures: dict, final_logits: torch.Tensor, selection) -> None:
        """Add one micro-batch's head gradients; every kind's loss goes backward per group of layers (see
        ``_layer_groups``), bounding memory by ``stack_elements`` (or one layer's N × V)."""
        if final_logits.shape[0] == 0:
            return
        with torch.enable_grad():
            targets = self._targets(captures, final_logits)
            for kind, head in self.heads.items():
                total = 0.0
                for loss in self._layer_losses(head, captures, targets, final_logits.shape[0]):
                    loss.backward()
                    total = total + loss.detach()
                self._loss_sums[kind] = self._loss_sums.get(kind, 0.0) + total / max(1, len(head.layers))
                self._loss_counts[kind] = self._loss_counts.get(kind, 0) + 1
        self._micro_batches += 1

    def _layer_losses(self, head, captures: dict, targets: HeadTargets, rows: int):
        """The head's training losses to back-propagate, summing to Σ_ℓ loss_ℓ: one per group of stacked layers for
        kinds that read through the model's own head (one unembedding matmul per group), one per layer otherwise."""
        if not hasattr(head, "transform"):  # own unembedding per layer (linear) or no logits (confidence)
            for layer in head.layers:
                yield head.loss(captures[layer].float(), layer, targets)
            return
        for group in self._layer_groups(head.layers, rows):
            inputs = torch.cat([head.transform(captures[layer].float(), layer) for layer in group])
            logits = head.shared(inputs).view(len(group), rows, -1)
            yield head.loss_from_logits(logits, targets) * len(group)  # mean over the group × its size

    def _layer_groups(self, layers: list, rows: int) -> list:
        """``layers`` cut into consecutive groups whose stacked (group × rows × V) readout logits fit ``stack_elements``
        (bounding memory as one layer at a time did when a single layer exceeds it)."""
        vocab = int(self._parts.unembed.weight.shape[0])
        size = max(1, self.stack_elements // max(1, rows * vocab))
        return [layers[i : i + size] for i in range(0, len(layers), size)]

    def cost_summary(self) -> dict:
        """Wall and CPU seconds spent so far: ``capture`` (token sample of the batch), ``heads_train`` (losses,
        backward and optimizer steps of the heads); ``{piece: {wall_s, cpu_s, calls}}``."""
        return self.costs.summary()

    def _step(self, trainer: Trainer) -> None:
        params = [p for p in self.heads.parameters()]
        if self._micro_batches > 0 or int(trainer.world_size) > 1:
            world = int(trainer.world_size)
            scale = 1.0 / max(1, self._micro_batches)
            if world > 1:  # every rank joins the same all-reduce, even one that skipped its micro-batches
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * scale
                                  for p in params])
                counted = torch.tensor([1.0 if self._micro_batches > 0 else 0.0], device=flat.device)
                packed = trainer.strategy.reduce(torch.cat([flat, counted.to(flat.dtype)]), reduce_op="sum")
                n_ranks = float(packed[-1])
                offset = 0
                for p in params:
                    n = p.numel()
                    if n_ranks > 0:
                        p.grad = (packed[offset : offset + n] / n_ranks).reshape(p.shape).to(p.dtype)
                    offset += n
                do_step = n_ranks > 0
            else:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
                do_step = True
            if do_step:
                if self.optim.grad_clip is not None:
                    for head in self.heads.values():
                        torch.nn.utils.clip_grad_norm_(head.parameters(), self.optim.grad_clip)
                self._optimizer.step()
                if self._scheduler is not None:
                    self._scheduler.step()
                self.head_steps += 1
        self._optimizer.zero_grad(set_to_none=True)
        self._micro_batches = 0
        step = int(trainer.global_step)
        log_now = step >= self._next_log_step  # the first head step at or past each multiple of log_every_n_steps
        if log_now:
            self._next_log_step = (step // self.log_every_n_steps + 1) * self.log_every_n_steps
        if self._loss_counts and log_now and trainer.is_global_zero and trainer.loggers:
            metrics = {f"ee/heads_train/{kind}/loss": float(self._loss_sums[kind]) / self._loss_counts[kind]
                       for kind in self._loss_counts}
            metrics["ee/heads_train/lr"] = float(self._optimizer.param_groups[0]["lr"])
            for name, err in log_to_loggers(trainer.loggers, metrics, step=step):
                self._warn_once(f"logger:{name}", f"ExitHeads: logging to {name} failed ({err}); continuing")
        self._loss_sums, self._loss_counts = {}, {}

    # ------------------------------------------------------------------ save / load
    def save(self, directory: Union[str, Path]) -> Path:
        """Write the heads (config JSON, safetensors weights, fingerprint of the model's norm and unembedding)."""
        if self.heads is None or self._parts is None:
            raise RuntimeError("ExitHeads.save: the heads are not built yet (they are built at fit start)")
        return save_exit_heads(directory, dict(self.heads.items()), self._parts,
                               extra={"trained": {"head_steps": self.head_steps, "objective": self.objective,
                                                  "max_tokens": self.max_tokens, "lr": self.optim.lr}})


def _batch_tokens(batch) -> Optional[tuple]:
    """(input_ids (B, T), next-token labels (B, T), valid (B, T) bool) of a training batch, or None if not found.

    Position t is valid when token t+1 exists, is not padding and is not ignored (−100); labels are shifted by one.
    """
    ids = mask = labels = None
    if isinstance(batch, torch.Tensor):
        ids = batch
    elif isinstance(batch, dict) or hasattr(batch, "keys"):
        ids, mask, labels = batch.get("input_ids"), batch.get("attention_mask"), batch.get("labels")
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        ids = batch[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None
    ids = ids.detach().cpu()
    target = labels.detach().cpu() if isinstance(labels, torch.Tensor) and labels.shape == ids.shape else ids
    target = torch.roll(target, shifts=-1, dims=1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        m = mask.detach().cpu().bool()
        valid &= m & torch.roll(m, shifts=-1, dims=1)
    valid &= target != -100
    return ids, target.clamp_min(0), valid
