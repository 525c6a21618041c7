"""``LMModule``: causal-LM pretraining / fine-tuning of a zoo model with Lightning.

The Hugging Face model is ``module.model`` (a ``transformers.PreTrainedModel`` with a causal-LM head). It is built in
``configure_model()``, not in ``__init__``: a module pickled to a spawned DDP worker would otherwise carry a model
whose forward hooks (the probes' hidden-state capture) were registered in another process.

Logged metrics: ``train/loss`` (next-token cross-entropy in nats, per step), ``train/aux_loss`` (MoE router
load-balancing loss, when the model returns one), ``train/lr`` (per step), ``val/loss`` (mean over the validation set).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from ee_callbacks.exit_loss import EarlyExitAwareLM
from ee_callbacks.heads_optim import lr_lambda  # the LM and the exit heads share one schedule
from ee_callbacks.training.config import plain_dict
from ee_callbacks.training.zoo import build_model

DEFAULT_OPTIM: dict[str, Any] = {
    "lr": 3e-3,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "warmup_steps": 0,
    "scheduler": "constant",  # constant | cosine | linear
    "min_lr_ratio": 0.1,
}


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting ``input_ids[:, t+1]`` from ``logits[:, t]``; padding (mask 0) and
    positions whose label is ``-100`` are ignored. This is the shift Hugging Face causal LMs apply to ``labels``."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                           ignore_index=-100)


class LMModule(EarlyExitAwareLM, pl.LightningModule):
    """Causal-LM training of a zoo model (``ee_callbacks.training.zoo.build_model``).

    Args:
        model: the ``model`` config (``name``, ``family``, ``arch``, ``dropout``, ``config``).
        vocab_size: the tokenizer's vocabulary size.
        optim: AdamW + schedule settings (see :data:`DEFAULT_OPTIM`); weight decay applies to matrices only.
        init_seed: seed of the initial weights (drawn without touching the global RNG).
        run_config: the whole resolved run config, stored in the checkpoint so tools can rebuild data and tokenizer.
        early_exit: opt-in early-exit-aware training (changes training on purpose): keyword arguments of
            ``EarlyExitAwareLM.configure_early_exit`` — ``EarlyExitLoss`` settings (``weights``, ``scale``,
            ``curriculum``, ...) plus ``layer_dropout`` (p_max) and ``dropout_curve``. None: plain pretraining.
    """

    def __init__(self, model: Mapping[str, Any], vocab_size: int, optim: Mapping[str, Any] | None = None,
                 init_seed: int | None = None, run_config: Mapping[str, Any] | None = None,
                 early_exit: Mapping[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters({"model": plain_dict(model), "vocab_size": int(vocab_size),
                                   "optim": {**DEFAULT_OPTIM, **plain_dict(optim)}, "init_seed": init_seed,
                                   "run_config": plain_dict(run_config) if run_config is not None else None,
                                   "early_exit": plain_dict(early_exit) if early_exit else None})
        self.model: torch.nn.Module | None = None
        self.first_train_loss: float | None = None
        self._recent_train_losses: deque[torch.Tensor] = deque(maxlen=10)
        self.last_validated_step: int | None = None

    @property
    def model_name(self) -> str:
        return str(self.hparams["model"].get("name", "model"))

    @property
    def model_family(self) -> str:
        return str(self.hparams["model"].get("family", "dense"))

    def configure_model(self) -> None:
        if self.model is not None:  # called again by load_from_checkpoint, trainer.validate, ...
            return
        self.model = build_model(self.hparams["model"], self.hparams["vocab_size"], seed=self.hparams["init_seed"])
        early_exit = self.hparams.get("early_exit")
        if early_exit:
            self.configure_early_exit(**dict(early_exit))


    def _require_model(self) -> torch.nn.Module:
        if self.model is None:
            self.configure_model()
        assert self.model is not None
        return self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        return self._require_model()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        output = self(input_ids, attention_mask=attention_mask, use_cache=False)
        loss = next_token_loss(output.logits, input_ids, attention_mask)
        aux = getattr(output, "aux_loss", None)
        return loss, aux

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.early_exit_loss is not None or self.layer_dropout is not None:
            # out.loss holds the early-exit loss plus router_aux_loss_coef · aux_loss for MoE models
            out = self.early_exit_step(batch["input_ids"], batch.get("attention_mask"), micro_batch=batch_idx)
            loss, aux, total = out.final_loss, out.aux_loss, out.loss
            self.log("train/ee_loss", out.loss.detach(), on_step=True, on_epoch=False)
        else:
            loss, aux = self._losses(batch)
            total = loss
            if aux is not None:
                total = loss + float(getattr(self.model.config, "router_aux_loss_coef", 0.0)) * aux
        if aux is not None:
            self.log("train/aux_loss", aux.detach(), on_step=True, on_epoch=False)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)
        if self.first_train_loss is None:
            self.first_train_loss = float(loss.detach())
        self._recent_train_losses.append(loss.detach())
        return total

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._losses(batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].size(0))
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.trainer.global_step

    def recent_train_loss(self) -> float | None:
        """Mean training loss of the last (up to) 10 steps of this process."""
        if not self._recent_train_losses:
            return None
        return float(torch.stack(list(self._recent_train_losses)).float().mean())

    def configure_optimizers(self):
        settings = self.hparams["optim"]
        model = self._require_model()
        decay, no_decay = [], []
        for parameter in model.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(settings["weight_decay"])},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=float(settings["lr"]), betas=tuple(float(b) for b in settings["betas"]), eps=float(settings["eps"]))
        total_steps = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
        warmup, schedule = int(settings["warmup_steps"]), str(settings["scheduler"])
        min_ratio = float(settings["min_lr_ratio"])
        lr_lambda(0, max(total_steps, 1), warmup, schedule, min_ratio)  # validates the schedule name early
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, total_steps, warmup, schedule, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
