"""``EarlyExitProbe``: a Lightning callback that runs the probe core every N optimizer steps."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from lightning.pytorch import Callback, LightningModule, Trainer

from ..cadence import AdaptiveCadence, CostMeter, reaches_multiple
from ..distributed import param_count, probe_forward_target, probe_shard, readout_context_factory, wrapped_root
from ..model_parts import find_language_model, find_model_parts, prove_on_probe_set
from ..probe import ProbeConfig, prepare_batches, run_probe
from ..probe_data import ProbeSetSettings, draw_probe_set, preserved_rng
from ..providers import provider_artifacts, provider_readouts
from ..records import append_record, read_records
from ..sinks.loggers import flatten_record_metrics, format_record_table, log_to_loggers
from .probe_support import (  # default_records_path and _share_drift_reference are re-exported from here
    _cadence_args,
    _check_not_shared,
    _check_writable,
    default_records_path,
    _describe_source,
    _fold_probe_keywords,
    _logged_by_module,
    _looks_like_batch,
    _make_reduce,
    _make_wandb_extras,
    _monitor_notes,
    _prefix,
    _probe_at_args,
    _publish_callback_metrics,
    _run_info,
    _share_drift_reference,
    _wandb_args,
    _wandb_run,
)

__all__ = ["EarlyExitProbe", "default_records_path", "draw_probe_set", "preserved_rng", "find_language_model"]

log = logging.getLogger("ee_callbacks")


class EarlyExitProbe(Callback):
    r"""Probe every layer of the model being trained on a fixed probe set, every ``every_n_steps`` optimizer steps.

    At step 0 (train start), every N optimizer steps and at the end of fit, runs :func:`ee_callbacks.run_probe` on
    each probe set, appends one ProbeRecord per set to ``ee_probes.jsonl`` and logs scalars to every logger of the
    trainer with ``step=trainer.global_step``. Training is unaffected: the probe runs in eval mode under
    ``no_grad``, restores module modes and every RNG stream, and never calls ``LightningModule.log``.

    Logged keys (``<p>`` is ``ee`` for the default probe set and ``ee/<set>`` for a named one):

    - ``<p>/<metric>/layer_<ℓ:02d>`` for metric in agree, acc, ce, kl, entropy, max_prob, margin, logit_cos,
      logit_corr, hidden_cos_final, block_influence, saturation_frac, cka_drift;
    - ``<p>/summary/<name>`` for eas, oracle_skip_strict, oracle_skip_lenient, static_exit_layer,
      static_skip_5pct, spec_speedup_est, final_ce, final_acc, angular_min_<n>, cka_drift_mean, probe_s,
      and ``<p>/summary/skip_at_consistency_<c>/<rule>``;
    - ``<p>/heads/<kind>/<metric>/layer_<ℓ:02d>`` for trained exit heads (see ``ExitHeads``);
    - with an adaptive ``cadence``: ``ee/cadence/every_n_steps`` (the gap chosen after each probe),
      ``ee/cadence/expected_share`` (the probe's share of wall time at that gap), ``ee/cadence/probe_s`` and
      ``ee/cadence/step_s`` (the measured probe and training-step wall seconds it was decided from).

    Every key is also written into ``trainer.callback_metrics`` on every rank after each probe (not through
    ``LightningModule.log``), so ``ModelCheckpoint(monitor="ee/summary/eas", mode="max")`` and
    ``EarlyStopping(monitor=...)`` see the latest probe's values like any logged metric.

    Args:
        every_n_steps: probe every this many optimizer steps (> 0); with an adaptive ``cadence``, the densest. A batch
            that moves ``global_step`` past a multiple (manual optimization stepping two optimizers) probes once, at
            the step it reached.
        cadence: None (fixed cadence), or adaptive: a fraction of wall time (``max_overhead``, e.g. 0.02) or a mapping
            ``{"max_overhead": 0.02, "max_every_n_steps": 400}``. After each probe the gap to the next one is chosen
            so that probing (the probe and its sinks, as measured) takes at most this share of the run's wall time,
            given the training steps' measured wall time (:class:`~ee_callbacks.cadence.AdaptiveCadence`), never
            sparser than ``max_every_n_steps`` (None: unbounded); every decision is logged (``ee/cadence/*``) and
            kept in ``cadence_decisions``.
        probe_data: a LongTensor (N, T), one batch ``{"input_ids", "attention_mask", "labels"}``, a dataset, a
            DataLoader, or a dict ``{set name: one of those}`` for several named probe sets ("workloads"). Default:
            drawn from the validation dataloader (dict batches keep their mask and labels; see ``draw_probe_set``).
        probe_set: how each probe set is drawn, a :class:`~ee_callbacks.probe_data.ProbeSetSettings` or a mapping of
            some of its keys: ``sequences`` (per set, drawn once, seeded; 32), ``seq_len`` (cut sequences to this
            many tokens; None), ``seed`` (of the draw; 0), ``batch_size`` (sequences per forward batch; 8).
        config: :class:`~ee_callbacks.ProbeConfig` or a mapping of its fields.
        output_path: the JSONL file; default ``ee_probes.jsonl`` in the run's own directory (see
            :func:`default_records_path`: the W&B run directory, a TensorBoard/CSV logger's version directory,
            ``<default_root_dir>/ee_probes/<logger name>/<version>/`` for other loggers, ``default_root_dir``
            without logger), so two logged runs never share a file.
        probe_at: also probe at ``start`` (step 0) and/or ``end`` (after the last step); ``[]`` for neither.
        model_attr: dotted path of the language model inside the LightningModule (``""``: the module itself); by
            default found structurally (:func:`~ee_callbacks.model_parts.find_language_model`).
        blocks / final_norm / unembed: dotted paths (relative to the language model) overriding part discovery
            (``final_norm="a,b"``: several modules applied in order; ``""``: none). At fit start the parts are proven
            on one probe batch (the last block's output read through them must give the model's own logits); a
            readout that does not reproduce them stops the fit with a :class:`ModelPartsError` naming what was
            tried.
        print_table: print a compact layer × agree/kl/ce table at the end of fit.
        readouts: extra readouts ``{kind: readout}`` to evaluate, or a callable returning them (``ExitHeads``
            registers its heads here itself).
        wandb: the W&B extras: True/False, or ``{"extras": bool, "images": bool}``. ``extras`` (default on): with a
            WandbLogger attached, shape the W&B workspace (per-layer scalars hidden, summary modes), log interactive
            charts, the growing probe table and the JSONL artifact (see ``WandbExtras``). ``images`` (default off):
            also draw matplotlib heatmap/trade-off/CKA images for W&B at every probe (slow).
        **flat_keywords: the grouped settings may also be passed flat, as in earlier releases:
            ``probe_sequences``, ``seq_len``, ``seed``, ``batch_size``, ``data_name`` (into ``probe_set``),
            ``max_overhead``, ``max_every_n_steps`` (into ``cadence``), ``wandb_extras``, ``wandb_images`` (into
            ``wandb``), ``probe_at_start``, ``probe_at_end`` (into ``probe_at``); e.g.
            ``EarlyExitProbe(every_n_steps=50, max_overhead=0.02)``.
        run_info: ``{"name": ..., "experiment": ...}`` copied into each record's ``run`` (reports name runs by it).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        probe_data: Any = None,
        probe_set: Union[ProbeSetSettings, Mapping, None] = None,
        config: Union[ProbeConfig, Mapping, None] = None,
        output_path: Optional[Union[str, os.PathLike]] = None,
        probe_at: Sequence[str] = ("start", "end"),
        model_attr: Optional[str] = None,
        blocks: Optional[str] = None,
        final_norm: Optional[str] = None,
        unembed: Optional[str] = None,
        print_table: bool = True,
        readouts: Any = None,
        wandb: Union[bool, Mapping] = True,
        run_info: Optional[Mapping] = None,
        cadence: Union[float, Mapping, None] = None,
        **flat_keywords: Any,
    ):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if flat_keywords:
            probe_set, cadence, wandb, probe_at = _fold_probe_keywords(flat_keywords, probe_set, cadence, wandb, probe_at)
        settings = ProbeSetSettings.from_any(probe_set)
        max_overhead, max_every_n_steps = _cadence_args(cadence)
        self.wandb_extras, self.wandb_images = _wandb_args(wandb)
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.cadence = (AdaptiveCadence(every_n_steps, max_overhead, max_every_n_steps)
                        if max_overhead is not None else None)
        if self.cadence is None and max_every_n_steps is not None:
            raise ValueError("cadence.max_every_n_steps bounds the adaptive cadence: pass cadence.max_overhead too "
                             "(e.g. cadence={'max_overhead': 0.02, 'max_every_n_steps': 400})")
        self.probe_data = probe_data
        self.probe_sequences = settings.sequences
        self.seq_len = settings.seq_len
        self.config = ProbeConfig.from_any(config)
        self.output_path = Path(output_path) if output_path is not None else None
        self.seed = settings.seed
        self.batch_size = settings.batch_size
        self.probe_at_start, self.probe_at_end = _probe_at_args(probe_at)
        self.model_attr = model_attr
        self.part_paths = {"blocks": blocks, "final_norm": final_norm, "unembed": unembed}
        self.print_table = print_table
        self.extra_readouts = readouts
        self.data_name = settings.data_name
        self.run_info = dict(run_info or {})
        # state (saved in checkpoints)
        self.history: list = []  # compact per-probe summaries {set, step, summary, layers}
        self.last_probe_step: Optional[int] = None
        self._drift_state: dict = {}
        # runtime
        self._sets: dict = {}
        self._parts = None
        self._lm = None
        self._path: Optional[Path] = None
        self._extras = None
        self._extras_run = None  # the W&B run the extras' table and declarations belong to
        self._sink_failures: set = set()
        self._pending: list = []
        self.heads_dir: Optional[str] = None  # saved exit heads (from a readout provider) uploaded with the records
        self._appended = False  # this callback made the records file's last append (it ends in a newline)
        self._resumed = False
        self.last_records: dict = {}
        self.costs = CostMeter()  # wall/CPU seconds per piece: probe, records, loggers, wandb (see cost_summary)
        self._probe_ended: Optional[tuple] = None  # (perf_counter, global_step) when the last probe finished
        self._step_at_batch_start: Optional[int] = None

    # ------------------------------------------------------------------ identity / state
    @property
    def state_key(self) -> str:
        # what the probe measures, never where its records go: a run resumed into a new directory keeps its history
        names = sorted(map(str, self.probe_data)) if isinstance(self.probe_data, Mapping) \
            and not _looks_like_batch(self.probe_data) else None
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_sequences=self.probe_sequences,
                                        seq_len=self.seq_len, seed=self.seed, sets=names, data_name=self.data_name)

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "last_probe_step": self.last_probe_step,
            "drift_state": self._drift_state,
            "config": self.config.to_dict(),
            "cadence": self.cadence.state_dict() if self.cadence is not None else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # works before or after on_fit_start (DDP restores before, FSDP/DeepSpeed after)
        self.history = list(state_dict.get("history", []))
        self.last_probe_step = state_dict.get("last_probe_step")
        self._drift_state = dict(state_dict.get("drift_state", {}) or {})
        if self.cadence is not None and state_dict.get("cadence"):
            self.cadence.load_state_dict(state_dict["cadence"])
        self._resumed = True

    # ------------------------------------------------------------------ set-up
    def _resolve_sets(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        data = self.probe_data
        if data is None:
            data = self._validation_source(trainer, pl_module)
        named = data if isinstance(data, Mapping) and not _looks_like_batch(data) else {"default": data}
        sets = {}
        for name, source in named.items():
            batches = draw_probe_set(source, self.probe_sequences, self.seq_len, self.seed, self.batch_size)
            sets[str(name)] = batches
        return sets

    @staticmethod
    def _validation_source(trainer: Trainer, pl_module: LightningModule):
        # where trainer.fit(...) got its validation data: val_dataloaders=, a datamodule, or the module's hook
        source = None
        with contextlib.suppress(Exception):
            source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if source is not None and getattr(source, "instance", None) is not None:
            with contextlib.suppress(Exception):
                if source.is_defined():
                    loader = source.dataloader()
                    if loader is not None:
                        return loader[0] if isinstance(loader, (list, tuple)) else loader
        loaders = getattr(trainer, "val_dataloaders", None)
        if loaders:
            return loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        raise ValueError(
            "EarlyExitProbe found no validation dataloader to draw the probe set from: pass probe_data= (a LongTensor "
            "(N, T), a dataset or a dataloader), or give trainer.fit val_dataloaders or a datamodule with "
            "val_dataloader()"
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restarted = not self._resumed and self.last_probe_step is not None and \
            (trainer.global_step == 0 or trainer.global_step < self.last_probe_step)
        if restarted:
            self._forget_last_run()  # a new Trainer, its steps from 0: the last fit's probes are not this run's
        self._appended, previous = False, self._path  # the file may be another run's: read its tail once
        if self.output_path is not None:
            self._path = self.output_path
        elif trainer.is_global_zero:  # only global rank zero writes; the W&B run exists there only
            self._path = default_records_path(trainer)
        if trainer.is_global_zero:
            _check_writable(self._path)
            if restarted and previous == self._path:
                warnings.warn(f"EarlyExitProbe: this fit starts again at step {trainer.global_step} and appends to "
                              f"the last fit's {self._path}, which will hold two series over the same steps (readers "
                              "keep the later record of a step): give each fit its own output_path= or logger",
                              RuntimeWarning)
        self._lm = find_language_model(pl_module, self.model_attr)
        self._sets = self._resolve_sets(trainer, pl_module)
        _check_not_shared(trainer, self)
        # validate now (clear error at fit start, not at step 10,000)
        parts = find_model_parts(self._lm, **self.part_paths)
        full = readout_context_factory(trainer, pl_module, self._lm, parts)  # None unless FSDP
        with full() if full is not None else contextlib.nullcontext():
            emb = self._lm.get_input_embeddings() if hasattr(self._lm, "get_input_embeddings") else None
            vocab = int(emb.weight.shape[0]) if emb is not None and hasattr(emb, "weight") else None
        prepared = {}
        for name, batches in self._sets.items():
            try:
                prepared[name] = prepare_batches(batches, vocab)
            except (ValueError, TypeError) as err:
                raise ValueError(f"EarlyExitProbe probe set {name!r}: {err}") from None
        self._parts = self._prove(trainer, pl_module, prepared, parts)
        if self._parts.notes:
            for note in self._parts.notes:
                log.warning("EarlyExitProbe: %s", note)
        if self.wandb_extras and trainer.is_global_zero:
            run = _wandb_run(self._wandb_logger(trainer))
            if self._extras is None or run is None or self._extras_run is not run:  # one table and chart set per run
                self._extras, self._extras_run = _make_wandb_extras(trainer, self.wandb_images), run
            if self._extras is not None:
                self._safe(lambda: self._extras.log_config(self._wandb_logger(trainer), self._config_payload()), "wandb")

    def _forget_last_run(self) -> None:
        self.history, self.last_records, self._drift_state = [], {}, {}
        self.last_probe_step, self._probe_ended = None, None
        if self.cadence is not None:
            self.cadence.load_state_dict({})

    def _prove(self, trainer: Trainer, pl_module: LightningModule, prepared: dict, parts):
        """The parts, proven on the first rows of the first probe batch against the model's own logits."""
        if parts.unembed is None or not prepared:
            return parts
        target = probe_forward_target(trainer, pl_module, self._lm)
        return prove_on_probe_set(
            self._lm, next(iter(prepared.values())), **self.part_paths,
            forward_module=None if target is self._lm else target,
            readout_context=readout_context_factory(trainer, pl_module, self._lm, parts),
        )

    def _config_payload(self) -> dict:
        return {
            "every_n_steps": self.every_n_steps,
            "max_overhead": self.max_overhead,
            "probe_sequences": self.probe_sequences,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "sets": list(self._sets),
            **self.config.to_dict(),
        }

    # ------------------------------------------------------------------ triggers
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._resumed and trainer.is_global_zero:
            self._drop_records_after_resume()
        if trainer.is_global_zero:  # the validation cadence is known from here on
            for note in _monitor_notes(trainer, self.every_n_steps, self.probe_at_start, self.cadence is not None):
                warnings.warn(f"EarlyExitProbe: {note}", RuntimeWarning)
        if self.probe_at_start and trainer.global_step == 0 and self.last_probe_step is None:
            self._probe(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        self._step_at_batch_start = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or self.last_probe_step == step:
            return  # under gradient accumulation global_step only moves on optimizer steps: probe once per step
        # a batch may move global_step by more than one (manual optimization stepping two optimizers): probe when it
        # passed a multiple of every_n_steps, not only when it landed on one
        due = self.cadence.due(step) if self.cadence is not None else \
            reaches_multiple(self._step_at_batch_start, step, self.every_n_steps)
        if due:
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe_at_end and self.last_probe_step != trainer.global_step and self._sets:
            self._probe(trainer, pl_module)
        if trainer.is_global_zero and self._pending:
            self._write_pending_or_raise()
        # providers write their artifacts (e.g. saved exit heads) now, whatever the callbacks' order
        self.heads_dir = provider_artifacts(trainer.callbacks, trainer.is_global_zero, exclude=self) or self.heads_dir
        self._resumed = False  # a later fit of this callback starts from its own checkpoint or from scratch
        if trainer.is_global_zero:
            if self.print_table and self.last_records:
                for name, record in self.last_records.items():
                    print(format_record_table(record, title=f"ee_callbacks probe '{name}' at step {record['step']}"))
            self._log_wandb_artifact(trainer, "finished")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the fit is failing anyway: write the records still pending and let the records written so far reach W&B
        # (never raises: the original error wins)
        if trainer.is_global_zero:
            if self._pending:
                self._safe(self._write_pending_or_raise, "records")
            self._log_wandb_artifact(trainer, "failed")

    def _log_wandb_artifact(self, trainer: Trainer, status: str) -> None:
        if self._extras is not None and self._path is not None and self._path.exists():
            wl = self._wandb_logger(trainer)
            with self.costs.measure("wandb_final"):
                self._safe(lambda: self._extras.log_artifact(wl, str(self._path), self.heads_dir, status=status),
                           "wandb")

    def _write_pending_or_raise(self) -> None:
        try:
            while self._pending:
                append_record(self._path, self._pending[0])
                self._pending.pop(0)
        except OSError as err:
            raise OSError(
                f"EarlyExitProbe: {len(self._pending)} probe record(s) could not be written to {self._path} ({err}); "
                "they are in this callback's `last_records`/`history`"
            ) from err

    # ------------------------------------------------------------------ the probe
    def _readouts(self, trainer: Trainer) -> dict:
        extra = self.extra_readouts() if callable(self.extra_readouts) else (self.extra_readouts or {})
        return {**extra, **provider_readouts(trainer.callbacks, exclude=self)}

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._sets or self._parts is None:
            return
        step = int(trainer.global_step)
        started = time.perf_counter()
        with self.costs.measure("total"):
            self._probe_sets(trainer, pl_module, step)
        self.last_probe_step = step
        if self.cadence is not None:
            self._decide_cadence(trainer, step, started)
        self._probe_ended = (time.perf_counter(), step)

    def _decide_cadence(self, trainer: Trainer, step: int, started: float) -> None:
        """Space the next probe by this probe's measured cost (rank zero's clock, broadcast: ranks probe together)."""
        probe_s = time.perf_counter() - started
        train_s, train_steps = None, 0
        if self._probe_ended is not None:
            train_s, train_steps = started - self._probe_ended[0], step - self._probe_ended[1]
        decision = self.cadence.after_probe(step, probe_s, train_s, train_steps)
        with contextlib.suppress(Exception):
            next_step = trainer.strategy.broadcast(decision.next_step, src=0)
            self.cadence.next_step = int(next_step)
        if not trainer.is_global_zero:
            return
        metrics = {"ee/cadence/every_n_steps": float(decision.every_n_steps), "ee/cadence/probe_s": decision.probe_s}
        if decision.step_s is not None:
            metrics["ee/cadence/step_s"] = decision.step_s
            metrics["ee/cadence/expected_share"] = decision.expected_share
        for logger_name, err in log_to_loggers(trainer.loggers, metrics, step=step):
            self._warn_once(f"logger:{logger_name}", f"EarlyExitProbe: logging to {logger_name} failed ({err})")
        previous = self.cadence.decisions[-2].every_n_steps if len(self.cadence.decisions) > 1 else None
        if decision.every_n_steps != previous:
            log.info("EarlyExitProbe: next probe in %d steps (probe %.2fs, step %s; expected share %s, budget %.3f)",
                     decision.every_n_steps, decision.probe_s,
                     "unmeasured" if decision.step_s is None else f"{decision.step_s:.3f}s",
                     "-" if decision.expected_share is None else f"{decision.expected_share:.4f}",
                     self.cadence.max_overhead)

    @property
    def cadence_decisions(self) -> list:
        """Every adaptive-cadence decision so far, as dicts (empty with a fixed cadence)."""
        return [d.to_dict() for d in self.cadence.decisions] if self.cadence is not None else []

    def cost_summary(self) -> dict:
        """Instrumentation cost of this run so far: ``{piece: {wall_s, cpu_s, calls}}`` for ``total`` (everything a
        probe did on the training thread), ``probe`` (``run_probe``), ``records`` (JSONL appends), ``loggers``
        (Lightning loggers), ``wandb`` (W&B extras), ``wandb_final`` (end-of-fit W&B uploads)."""
        return self.costs.summary()

    def _probe_sets(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        rank, world = probe_shard(trainer, pl_module)  # (0, 1) under FSDP: every rank probes the whole set
        reduce = _make_reduce(trainer) if world > 1 else None
        target = probe_forward_target(trainer, pl_module, self._lm)
        full = readout_context_factory(trainer, pl_module, self._lm, self._parts)  # None unless FSDP
        readouts = self._readouts(trainer)
        with preserved_rng():
            for name, batches in self._sets.items():
                t0, cpu0 = time.perf_counter(), time.process_time()
                record = run_probe(
                    self._lm,
                    batches,
                    config=self.config,
                    parts=self._parts,
                    step=step,
                    epoch=int(trainer.current_epoch),
                    source="train",
                    set_name=name,
                    data_name=self.data_name or _describe_source(self.probe_data, name),
                    seed=self.seed,
                    readouts=readouts,
                    previous=self._drift_state.get(name),
                    reduce=reduce,
                    shard=(rank, world),
                    forward_module=None if target is self._lm else target,
                    readout_context=full,
                )
                self.costs.add("probe", time.perf_counter() - t0, time.process_time() - cpu0)
                if full is not None:
                    record.model["params"] = param_count(self._lm, wrapped_root(trainer, pl_module))
                if world > 1 and record.state.get("cka_grams") is not None:
                    record.state = {"cka_grams": _share_drift_reference(reduce, record.state["cka_grams"],
                                                                        self._parts.n_layers + 1, len(batches))}
                self._drift_state[name] = record.state
                record.run = {**_run_info(trainer), **self.run_info}
                if self.run_info.get("name"):  # the run's own model name (e.g. llama_tiny), not the HF model type
                    record.model["name"] = str(self.run_info["name"])
                data = record.to_dict()
                _publish_callback_metrics(trainer, flatten_record_metrics(data, _prefix(name)))
                if trainer.is_global_zero:
                    self._emit(trainer, name, data, time.perf_counter() - t0)

    def _write(self, record) -> dict:
        """Append a record (and any that failed before). A failure warns and keeps the record pending: training goes
        on, and ``on_train_end`` raises if records could still not be written, so none is lost silently."""
        data = record.to_dict() if hasattr(record, "to_dict") else record
        self._pending.append(data)
        try:
            while self._pending:
                # after our own successful append the file ends in a newline: no need to read its tail again
                append_record(self._path, self._pending[0], check_tail=not self._appended)
                self._appended = True
                self._pending.pop(0)
        except OSError as err:
            self._appended = False
            warnings.warn(
                f"EarlyExitProbe: could not write {self._path} ({err}); {len(self._pending)} record(s) kept in memory "
                "and retried at the next probe", RuntimeWarning,
            )
        return data

    def _emit(self, trainer: Trainer, name: str, record, seconds: float) -> None:
        with self.costs.measure("records"):
            data = self._write(record)
        self.last_records[name] = data
        self.history.append({"set": name, "step": data["step"], "summary": data["summary"], "layers": data["layers"]})
        metrics = flatten_record_metrics(data, _prefix(name))
        theirs = _logged_by_module(trainer)
        if theirs:
            self._warn_once("clash", f"EarlyExitProbe: the LightningModule logs {theirs} itself (self.log), inside "
                            "the probe's 'ee/' namespace: a key the probe logs too mixes both values in every logger "
                            "and a monitor sees whichever came last; rename yours (e.g. 'my_ee/...')")
        if self._extras is not None:  # hidden/visible and summary modes must be declared before the first log
            with self.costs.measure("wandb"):
                self._safe(lambda: self._extras.define_metrics(self._wandb_logger(trainer), metrics, name), "wandb")
        with self.costs.measure("loggers"):
            failures = log_to_loggers(trainer.loggers, metrics, step=int(trainer.global_step))
        for logger_name, err in failures:
            self._warn_once(f"logger:{logger_name}", f"EarlyExitProbe: logging to {logger_name} failed ({err}); "
                                                     "the other loggers and ee_probes.jsonl go on")
        if self._extras is not None:
            history = [h for h in self.history if h["set"] == name]
            with self.costs.measure("wandb"):
                self._safe(lambda: self._extras.log_probe(self._wandb_logger(trainer), data, history, name), "wandb")
        summary = data["summary"]
        eas = summary.get("eas")
        msg = (f"[ee_callbacks] probe '{name}' step {data['step']}: EAS {eas:.3f}" if eas is not None
               else f"[ee_callbacks] probe '{name}' step {data['step']}")
        if summary.get("oracle_skip_strict") is not None:
            msg += f", oracle skip {summary['oracle_skip_strict']:.3f}"
        msg += f" ({seconds:.2f}s)"
        bar = getattr(trainer, "progress_bar_callback", None)
        if bar is not None and hasattr(bar, "print") and getattr(bar, "is_enabled", False):
            try:  # above the training progress bar, without breaking it
                bar.print(msg)
                return
            except Exception:
                pass
        log.info(msg)

    def _drop_records_after_resume(self) -> None:
        """A run killed after its last checkpoint left records the resumed run will recompute: drop them, so the file
        continues with no duplicate and no gap (rewritten atomically)."""
        if self._path is None or not self._path.exists():
            return
        last = self.last_probe_step if self.last_probe_step is not None else -1
        records = read_records(self._path)
        keep = [r for r in records if not (r.get("source") == "train" and r.get("set") in self._sets
                                          and int(r.get("step", -1)) > last)]
        if len(keep) == len(records):
            return
        tmp = self._path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in keep:
                fh.write(json.dumps(rec, allow_nan=False, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)
        log.warning("EarlyExitProbe: resumed at probe step %s; dropped %d record(s) written after that checkpoint",
                    last, len(records) - len(keep))

    # ------------------------------------------------------------------ helpers
    def _wandb_logger(self, trainer: Trainer):
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                return lg
        return None

    def _safe(self, fn, kind: str) -> None:
        try:
            fn()
        except Exception as err:  # instrumentation never stops training
            self._warn_once(kind, f"EarlyExitProbe: {kind} sink failed ({type(err).__name__}: {err}); continuing")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._sink_failures:
            self._sink_failures.add(key)
            warnings.warn(message, RuntimeWarning)
