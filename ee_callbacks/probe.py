"""The probe core: ``run_probe(model, batches, config=...) -> ProbeRecord``. Plain PyTorch, no Lightning.

Pipeline (DESIGN §2, §2b): prepare batches → forward each micro-batch with hooks capturing ``h_0..h_L`` → stream
token chunks → every readout (logit lens, trained exit heads) gives per-token statistics per layer → the metric
families of a :class:`~ee_callbacks.metrics.accumulator.MetricSuite` update from them → one all-reduce of the suite
→ ``compute`` → one :class:`~ee_callbacks.records.ProbeRecord` (built in :mod:`ee_callbacks.probe_record`).

Every state is a declared float64 sum, so with a ``reduce`` (an all-reduce of sums) each rank probes its share of the
batches and the record equals the single-process one. The metric names and formulas are listed once, in
:mod:`ee_callbacks.metrics.registry`.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .capture import HiddenStateCapture, model_forward
from .metrics.accumulator import Accumulator, MetricSuite
from .metrics.exits import ExitRuleStats, patience_exit_layers, threshold_exit_layers
from .metrics.readout_stats import ConfidenceStats, ReadoutStats
from .metrics.redundancy import HiddenSimilarity
from .metrics.saturation import SaturationStats
from .metrics.similarity import CKADrift, MinibatchCKA
from .metrics.suitability import SpecRunStats
from .model_parts import ModelParts, find_model_parts, prove_on_probe_set, unwrap_model
from .probe_config import (
    DEFAULT_THRESHOLDS, DTYPES, EAS_SIMILARITIES, METRIC_FAMILIES, ProbeConfig, cap_tokens,
    prepare_batches, resolve_layers, valid_positions,
)
from .probe_record import build_record
from .readout_kernels import LENS_STATS, FinalChunk, HeadReadout, LogitLensReadout, Workspace
from .records import ProbeRecord

__all__ = ["ProbeConfig", "run_probe", "prepare_batches", "METRIC_FAMILIES", "EAS_SIMILARITIES"]

RECORD_FIELDS = ("step", "epoch", "source", "checkpoint", "set_name", "data_name", "seed")
SCORE_RULES = ("max_prob", "margin", "entropy")


def run_probe(model: nn.Module, batches, *, config=None, parts: Optional[ModelParts] = None,
              readouts: Optional[dict] = None, previous=None,
              reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, shard: tuple = (0, 1),
              forward_module=None, readout_context: Optional[Callable] = None, **record_fields) -> ProbeRecord:
    """Probe every layer of ``model`` on ``batches`` and return one :class:`ProbeRecord`.

    Args:
        model: a causal LM (any ``nn.Module``; Hugging Face or one's own).
        batches: LongTensors (B, T) or dicts with ``input_ids`` and optionally ``attention_mask`` / ``labels``
            (labels aligned with the inputs as in Hugging Face; −100 ignored). Token t is scored on label t+1.
        config: :class:`ProbeConfig` or a mapping of its fields.
        parts: the model's parts; when None, found with :func:`find_model_parts` and proven on the first probe
            batch (:func:`~ee_callbacks.model_parts.prove_on_probe_set`: the readout of the last block must give
            the model's own logits back, else a ``ModelPartsError`` says what was tried and what to pass).
        readouts: trained exit heads, ``{kind: head}``; each has ``layers`` and ``logits(h, layer)`` (or
            ``confidence(h, layer)`` for a confidence classifier). They get the logit lens' per-layer metrics.
        previous: the ``state`` of the previous record of the same probe set (CKA drift reference).
        reduce: all-reduce (sum) of a float64 tensor across ranks; identity when None. Called once.
        shard: ``(rank, world_size)``: this process probes batches ``i`` with ``i % world_size == rank``.
        forward_module: what the forward passes call instead of ``model`` (under FSDP: the wrapped root).
        readout_context: a zero-argument callable returning a context manager inside which the unembedding and
            final norm hold full parameters (FSDP); entered around every readout, never around a forward.
        record_fields: ``step``, ``epoch``, ``source``, ``checkpoint``, ``set_name``, ``data_name``, ``seed``,
            copied into the record.

    Metric definitions: :mod:`ee_callbacks.metrics.registry` and the README's table.
    """
    started = time.perf_counter()
    unknown = sorted(set(record_fields) - set(RECORD_FIELDS))
    if unknown:
        raise TypeError(f"run_probe() got unexpected keyword arguments {unknown}; record fields: {list(RECORD_FIELDS)}")
    if parts is None:
        parts, batches = _proven_parts(unwrap_model(model), batches, forward_module, readout_context)
    probe = _Probe(model, parts, ProbeConfig.from_any(config), readouts, forward_module, readout_context)
    batches = cap_tokens(prepare_batches(batches, probe.input_vocab), probe.config.max_tokens)
    reference = previous.get("cka_grams", {}) if isinstance(previous, dict) else {}
    rank, world = int(shard[0]), int(shard[1])
    with _isolated(probe.model):
        for batch_index, batch in enumerate(batches):
            if batch_index % world == rank and bool(batch["valid"].any()):
                probe.probe_batch(batch_index, batch, reference)
    suite = probe.suite or probe.build_suite(first_layer=1, reference=reference)
    suite.reduce(reduce)
    counts = suite["counts"].compute()
    if counts["batches"] == 0 or counts["tokens"] + counts["nonfinite_tokens"] == 0:
        raise ValueError("the probe saw no token with a next-token label")
    if counts["nonfinite_tokens"]:
        warnings.warn(f"ee_callbacks: {counts['nonfinite_tokens']} probe tokens have non-finite final logits; "
                      "they are left out of every figure (record probe.nonfinite_tokens)", RuntimeWarning)
    with probe.readout_context():
        record = build_record(probe, suite, counts)
    record.step, record.epoch = int(record_fields.get("step", 0)), int(record_fields.get("epoch", 0))
    record.source, record.checkpoint = record_fields.get("source", "train"), record_fields.get("checkpoint")
    record.set = record_fields.get("set_name", "default")
    record.probe = {"tokens": counts["tokens"], "sequences": counts["sequences"], "seed": record_fields.get("seed"),
                    "data": record_fields.get("data_name", ""), "batches": len(batches),
                    "nonfinite_tokens": counts["nonfinite_tokens"]}
    record.timing = {"probe_s": time.perf_counter() - started, "forward_s": probe.forward_s}
    record.config = probe.config.to_dict()
    record.state = {"cka_grams": suite["cka_drift"].current if "cka_drift" in suite else {}}
    return record


class ProbeCounts(Accumulator):
    """What the probe saw: tokens, sequences, batches (and those without ``h_0``), tokens with non-finite logits."""

    NAMES = ("tokens", "sequences", "batches", "batches_without_h0", "nonfinite_tokens")

    def __init__(self):
        super().__init__()
        for name in self.NAMES:
            self.add_state(name, torch.zeros(()))

    def update(self, **counts) -> None:
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + float(value))

    def compute(self) -> dict:
        return {name: int(round(float(getattr(self, name)))) for name in self.NAMES}


class _Probe:
    """One probe's fixed setup (model, parts, readouts, dtypes) and its streaming updates of the metric suite."""

    def __init__(self, model, parts, config: ProbeConfig, readouts, forward_module, readout_context):
        self.config, self.model = config, unwrap_model(model)
        self.parts = parts if parts is not None else find_model_parts(self.model)
        self.forward_target = self.model if forward_module is None else forward_module
        self.readout_context = readout_context or contextlib.nullcontext
        self.full_weights_outside = readout_context is None
        self.n_layers, self.has_head = self.parts.n_layers, self.parts.has_lm_head
        self.probed = resolve_layers(config.layers, self.n_layers)  # 0..L unless ProbeConfig(layers=...)
        self.families = set(config.metrics)
        self.readout_dtype = DTYPES[config.dtype]
        self.want_js = config.eas_similarity == "js" and "eas" in self.families
        with self.readout_context():  # under FSDP the weights are shards outside it
            self.vocab, self.input_vocab = _vocab_sizes(self.model, self.parts, config.dtype)
            self.lens = LogitLensReadout(self.parts, self.readout_dtype, self.n_layers, config.chunk_tokens,
                                         self.want_js) if self.has_head else None
        self.heads = {kind: HeadReadout(head, self.readout_dtype) for kind, head in (readouts or {}).items()}
        affine = self.lens.affine if self.lens is not None else None
        self.keep_vocab = affine is None or not affine.dspace or bool(self.heads) or self.want_js
        self.need_tokens = bool(self.families & {"saturation", "exits", "spec"}) or bool(self.heads)
        self.log_vocab = math.log(self.vocab) if self.vocab and self.vocab > 1 else 1.0
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.workspace, self.suite, self.forward_s = Workspace(), None, 0.0
        if not self.has_head:
            warnings.warn("ee_callbacks: the model has no unembedding; only similarity metrics (block influence, "
                          "angular distance, hidden cosine, CKA) are computed", RuntimeWarning)

    # ---- the metric families, declared once (the layout does not depend on what a rank sees) ----------------------
    def build_suite(self, first_layer: int, reference: dict) -> MetricSuite:
        cfg, L = self.config, self.n_layers
        self.first_layer = first_layer
        probed = set(self.probed)
        self.lens_layers = [layer for layer in range(first_layer, L + 1) if layer in probed]
        self.exit_layers = [layer for layer in range(max(int(cfg.min_exit_layer), first_layer), L + 1)
                            if layer in probed]
        self.draft_layers = [layer for layer in range(max(int(cfg.min_exit_layer), 1), L) if layer in probed]
        suite = MetricSuite({"counts": ProbeCounts()})
        if self.families & {"redundancy", "eas"}:
            suite.add("hidden", HiddenSimilarity(L, cfg.angular_n, "redundancy" in self.families))
        if "cka" in self.families:
            suite.add("cka", MinibatchCKA(L + 1))
            suite.add("cka_drift", CKADrift(L + 1)).load_state_dict({"n_reps": L + 1, "previous": reference})
        if self.has_head:
            suite.add("lens", ReadoutStats(self.probed, LENS_STATS + (("js_sim",) if self.want_js else ()),
                                           squares=("acc", "ce")))
            self._add_token_families(suite)
        self.suite = suite
        return suite

    def _add_token_families(self, suite: MetricSuite) -> None:
        cfg, L = self.config, self.n_layers
        exit_layers = torch.tensor(self.exit_layers)
        if self.need_tokens:
            suite.add("saturation", SaturationStats(exit_layers, L))
        if "exits" in self.families:
            for rule in SCORE_RULES:
                if cfg.thresholds.get(rule):
                    suite.add(f"exit/{rule}", ExitRuleStats(len(cfg.thresholds[rule])))
            for k in cfg.patience:
                suite.add(f"exit/patience/{k}", ExitRuleStats(1))
        if "spec" in self.families:
            suite.add("spec_runs", SpecRunStats(self.draft_layers, L, cfg.spec_draft_lengths))
        for kind, head in self.heads.items():
            if head.kind == "confidence":
                suite.add(f"head/{kind}/confidence", ConfidenceStats([l for l in head.layers if l in self.exit_layers]))
            else:
                suite.add(f"head/{kind}", ReadoutStats(head.layers, LENS_STATS))
                suite.add(f"head/{kind}/saturation", SaturationStats(exit_layers, L))
            suite.add(f"head/{kind}/exit", ExitRuleStats(len(self.head_thresholds)))

    @property
    def head_thresholds(self) -> list:
        return list(self.config.thresholds.get("max_prob", list(DEFAULT_THRESHOLDS)))

    # ---- streaming ---------------------------------------------------------------------------------------------------
    def probe_batch(self, batch_index: int, batch: dict, reference: dict) -> None:
        """Forward one probe batch in micro-batches and feed its token chunks (and CKA features) to the suite."""
        ids_all, valid_all = batch["input_ids"], batch["valid"]
        rows_per_forward = max(1, self.config.chunk_tokens // ids_all.shape[1])
        use_cka = "cka" in self.families and batch_index < self.config.cka_max_batches
        cka_mask = _cka_selection(valid_all, self.config.cka_batch_tokens) if use_cka else None
        cka_features: list = []
        sequences_seen = int(valid_all.any(dim=1).sum())
        for row0 in range(0, ids_all.shape[0], rows_per_forward):
            rows = slice(row0, row0 + rows_per_forward)
            valid = valid_all[rows]
            if not bool(valid.any()):
                continue
            states, logits, targets = self._forward(batch, rows)
            if self.suite is None:
                self.build_suite(0 if states[0] is not None else 1, reference)
            selected = valid.reshape(-1).to(self.device)
            nonfinite = 0
            if logits is not None:  # a token with NaN/inf final logits (a diverged model) has no reference to
                # compare a layer with: left out of every figure and counted (an all-NaN argmax would "agree")
                finite = torch.isfinite(logits.reshape(-1, logits.shape[-1]).sum(dim=-1))
                nonfinite = int((selected & ~finite).sum())
                selected = selected & finite
            self.suite["counts"].update(batches=1, batches_without_h0=states[0] is None, sequences=sequences_seen,
                                        nonfinite_tokens=nonfinite)
            sequences_seen = 0
            if cka_mask is not None:
                chosen = cka_mask[rows].reshape(-1).to(self.device) & selected
                cka_features.append([s.reshape(-1, s.shape[-1])[chosen] if s is not None else None for s in states])
            flat_states = [s.reshape(-1, s.shape[-1])[selected] if s is not None else None for s in states]
            row_ids = row0 + torch.arange(valid.shape[0])[:, None].expand(valid.shape)
            sequences = ((batch_index << 32) + row_ids).reshape(-1)[selected.cpu()]
            self._update_tokens(flat_states, logits, targets.reshape(-1).to(self.device)[selected], selected,
                                sequences)
        if cka_features:
            self._update_cka(batch_index, cka_features)

    def _forward(self, batch: dict, rows: slice):
        ids, mask, labels = batch["input_ids"][rows], batch["attention_mask"], batch["labels"]
        mask = mask[rows] if mask is not None else None
        labels = labels[rows] if labels is not None else None
        _, targets = valid_positions(ids, mask, labels)
        started = time.perf_counter()
        with HiddenStateCapture(self.parts) as capture:
            logits = model_forward(self.forward_target, ids.to(self.device),
                                   mask.to(self.device) if mask is not None else None)
        capture.check()
        self.forward_s += time.perf_counter() - started
        if self.has_head and logits is None:
            raise ValueError(f"{type(self.model).__name__}.forward returned no logits; return a tensor, a tuple whose "
                             "first item is the logits, or an object with .logits")
        return capture.states, logits, targets

    def _update_tokens(self, flat_states, logits, targets, selected, sequences) -> None:
        n = int(selected.sum())
        if "hidden" in self.suite:
            self.suite["hidden"].update(flat_states)
        self.suite["counts"].update(tokens=n)
        if not self.has_head:
            return
        final_logits = self._final_logits(logits, selected, n)
        del logits
        with self.readout_context():
            if not self.full_weights_outside:  # the gathered weights live only inside the context
                self.lens.refresh()
            for start in range(0, n, self.config.chunk_tokens):
                end = min(n, start + self.config.chunk_tokens)
                chunk_logits = final_logits[start:end].to(self.readout_dtype)
                if chunk_logits.dtype != self.lens.stats_dtype:
                    chunk_logits = chunk_logits.float()
                if start == 0 and end == n:
                    final_logits = None  # the only chunk: its logits die with the final statistics
                final = FinalChunk(chunk_logits, targets[start:end], workspace=self.workspace, lens=self.lens.affine,
                                   keep_vocab=self.keep_vocab, want_js=self.want_js)
                del chunk_logits
                self._update_chunk([s[start:end] if s is not None else None for s in flat_states], final,
                                   sequences[start:end])

    def _final_logits(self, logits: torch.Tensor, selected: torch.Tensor, n: int) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        if n <= self.config.chunk_tokens and flat.dtype == self.readout_dtype and \
                self.readout_dtype in (torch.float32, torch.float64):
            # one chunk: gather the scored rows straight into a reusable buffer (no fresh chunk × V copy)
            buffer = self.workspace.get("final_z" if self.keep_vocab else "z", n, flat.shape[1], self.readout_dtype,
                                        flat.device)
            return torch.index_select(flat, 0, selected.nonzero().squeeze(1), out=buffer)
        return flat[selected]

    def _update_chunk(self, states: list, final: FinalChunk, sequences: torch.Tensor) -> None:
        """Every readout's per-token statistics per layer → the per-layer families; then the token-level ones."""
        L, n = self.n_layers, final.targets.shape[0]
        top1 = torch.zeros(L + 1, n, dtype=torch.long, device=final.targets.device)
        scores = {rule: torch.zeros(L + 1, n, dtype=torch.float32, device=top1.device) for rule in SCORE_RULES}
        for layer in self.lens_layers:  # unprobed blocks get no readout at all
            stats = final.stats if layer == L else self.lens.token_stats(states[layer], layer, final, self.workspace)
            self.suite["lens"].update(layer, stats)
            top1[layer] = stats["top1"]
            scores["max_prob"][layer] = stats["max_prob"].float()
            scores["margin"][layer] = stats["margin"].float()
            scores["entropy"][layer] = (stats["entropy"] / self.log_vocab).float()
        head_rows = {kind: self._head_rows(kind, head, states, final) for kind, head in self.heads.items()}
        if self.need_tokens:
            self._update_token_families(top1.cpu(), {k: v.cpu() for k, v in scores.items()},
                                        final.targets.cpu(), sequences, head_rows)

    def _head_rows(self, kind: str, head: HeadReadout, states: list, final: FinalChunk) -> dict:
        """Per head layer: (confidence, top-1 or None) per token; per-layer statistics go to the head's family."""
        rows = {}
        for layer in head.layers:
            if head.kind == "confidence":
                rows[layer] = (head.confidence(states[layer], layer).cpu(), None)
                continue
            stats = head.token_stats(states[layer], layer, final, self.workspace)
            self.suite[f"head/{kind}"].update(layer, stats)
            rows[layer] = (stats["max_prob"].float().cpu(), stats["top1"].cpu())
        return rows

    def _update_token_families(self, top1, scores, targets, sequences, head_rows) -> None:
        """Saturation, exit rules, self-speculation and the heads' exits over this chunk's tokens that are finite at
        every candidate layer (a token with a non-finite readout has no defined exit or saturation layer)."""
        cfg, L, layers = self.config, self.n_layers, torch.tensor(self.exit_layers)
        finite = torch.ones(top1.shape[1], dtype=torch.bool)
        for values in scores.values():
            finite &= torch.isfinite(values[self.exit_layers]).all(dim=0)
        top1, targets = top1[self.exit_layers][:, finite], targets[finite]
        scores = {rule: values[self.exit_layers][:, finite] for rule, values in scores.items()}
        self.suite["saturation"].update(top1)
        for rule in SCORE_RULES:
            if f"exit/{rule}" in self.suite:
                exits = threshold_exit_layers(scores[rule], torch.tensor(cfg.thresholds[rule], dtype=torch.float32),
                                              layers, higher_is_confident=rule != "entropy")
                self.suite[f"exit/{rule}"].update(exits, top1, targets, layers)
        for k in cfg.patience if "exits" in self.families else ():
            self.suite[f"exit/patience/{k}"].update(patience_exit_layers(top1, k, layers), top1, targets, layers)
        if "spec_runs" in self.suite:
            draft_rows = [self.exit_layers.index(layer) for layer in self.draft_layers]
            self.suite["spec_runs"].update(top1[draft_rows] == top1[-1], sequences[finite])
        for kind, rows in head_rows.items():
            self._update_head_exits(kind, {layer: (conf[finite], None if t is None else t[finite])
                                           for layer, (conf, t) in rows.items()}, top1, targets, layers)

    def _update_head_exits(self, kind: str, rows: dict, lens_top1, targets, layers) -> None:
        """A head's exit curve (its confidence; layers without a head never exit, the final layer always does) and
        oracle skip (its top-1, the logit lens' where it has no layer); a confidence head's calibration sums."""
        n = lens_top1.shape[1]
        confidence, top1 = torch.zeros(len(self.exit_layers), n), lens_top1.clone()
        for row, layer in enumerate(self.exit_layers):
            if layer in rows:
                confidence[row] = rows[layer][0]
                if rows[layer][1] is not None:
                    top1[row] = rows[layer][1]
        if n:
            confidence[-1] = 1.0
        exits = threshold_exit_layers(confidence, torch.tensor(self.head_thresholds, dtype=torch.float32), layers,
                                      higher_is_confident=True)
        self.suite[f"head/{kind}/exit"].update(exits, top1, targets, layers)
        if f"head/{kind}/saturation" in self.suite:
            self.suite[f"head/{kind}/saturation"].update(top1)
        else:
            calibration = self.suite[f"head/{kind}/confidence"]
            for row, layer in enumerate(self.exit_layers):
                if layer in calibration.row:
                    calibration.update(layer, confidence[row], lens_top1[row] == lens_top1[-1])

    def _update_cka(self, batch_index: int, cka_features: list) -> None:
        """Linear CKA of this batch's evenly spaced tokens (h_0 zero-filled where absent) and their drift."""
        features = [torch.cat([f[layer] for f in cka_features]) if cka_features[0][layer] is not None else None
                    for layer in range(self.n_layers + 1)]
        n_tokens = features[-1].shape[0]
        if n_tokens < 4:
            return
        stacked = torch.stack([f.double() if f is not None else features[-1].new_zeros(features[-1].shape,
                                                                                        dtype=torch.float64)
                               for f in features])
        ucentred = self.suite["cka"].update(stacked, return_ucentred=True)
        drift = self.suite["cka_drift"]
        previous = drift.reference.get(batch_index)
        if previous is not None and previous.shape != ucentred.shape:
            drift.reference.pop(batch_index)  # another model or probe set: no partner
        drift.update(ucentred, batch_index)


def _proven_parts(model: nn.Module, batches, forward_module, readout_context) -> tuple:
    """(the parts found by structure and proven on the first probe sequences, the batches as a list): a structural
    guess is only a guess (DESIGN §2a; OPT's final norm is registered before its layers, so the guess reads out
    without it). The batches are checked against the input vocabulary first, so that bad ids get their own error,
    not one from the forward; they come back prepared (an iterator is read once)."""
    guess = find_model_parts(model)
    if not guess.has_lm_head:
        return guess, batches
    with (readout_context or contextlib.nullcontext)():
        input_vocab = _vocab_sizes(model, guess, "float32")[1]
    batches = prepare_batches(batches, input_vocab)
    return prove_on_probe_set(model, batches, forward_module=forward_module, readout_context=readout_context), batches


def _vocab_sizes(model: nn.Module, parts: ModelParts, readout_dtype: str) -> tuple:
    """(output vocabulary, input vocabulary). Any readout dtype works: ``ModelParts.readout`` casts the weights."""
    vocab = None
    if parts.has_lm_head and hasattr(parts.unembed, "weight"):
        vocab = int(parts.unembed.weight.shape[0])
    elif parts.has_lm_head and getattr(getattr(model, "config", None), "vocab_size", None):
        vocab = int(model.config.vocab_size)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    input_vocab = int(embedding.weight.shape[0]) if embedding is not None and hasattr(embedding, "weight") else vocab
    return vocab, input_vocab


@contextlib.contextmanager
def _isolated(model: nn.Module):
    """Eval mode, no grad and autocast off for the probe; modes and RNG states restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        model.eval()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if device_type == "cuda" and not torch.cuda.is_available():
                    continue
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _cka_selection(valid: torch.Tensor, n_max: int) -> torch.Tensor:
    """Evenly spaced subset (at most n_max) of a batch's valid positions, as a (B, T) bool mask."""
    flat = valid.reshape(-1).nonzero().squeeze(1)
    chosen = torch.zeros_like(valid.reshape(-1))
    if flat.numel() > n_max:
        flat = flat[torch.linspace(0, flat.numel() - 1, n_max).round().long()]
    chosen[flat] = True
    return chosen.reshape(valid.shape)
