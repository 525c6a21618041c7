"""Turn a reduced :class:`~ee_callbacks.metrics.accumulator.MetricSuite` into a :class:`ProbeRecord` (DESIGN §4).

Plain PyTorch. Each part of the record has its own small function; ratios are taken only here, after the reduce.
"""

from __future__ import annotations

import torch

from .metrics import exits as exits_m
from .metrics import suitability as suit_m
from .metrics.readout_stats import finite_or_none
from .model_parts import model_summary
from .records import ProbeRecord

__all__ = ["build_record"]


def build_record(probe, suite, counts: dict) -> ProbeRecord:
    """The record of one probe from its reduced suite (``probe`` is the run's fixed setup, see ``run_probe``)."""
    cfg, L = probe.config, probe.n_layers
    first = 0 if counts["batches_without_h0"] == 0 else 1
    probed = set(probe.probed)
    exit_layers = [layer for layer in range(max(int(cfg.min_exit_layer), first), L + 1) if layer in probed]
    record = ProbeRecord(step=0)
    record.model = model_summary(probe.model, probe.parts)
    record.model["parts"] = probe.parts.describe()
    rows = _layer_rows(probe, suite, first)
    by_layer = {row["layer"]: row for row in rows}
    record.layers, summary = rows, {}
    stderr = summary["stderr"] = {}  # standard errors of the means over tokens (sums of squares in the suite)
    if probe.has_head:
        summary["final_ce"], summary["final_acc"] = by_layer[L].get("ce"), by_layer[L].get("acc")
        final = suite["lens"].stderr().get(L, {})
        stderr["final_ce"], stderr["final_acc"] = final.get("ce"), final.get("acc")
    if "hidden" in suite:
        record.angular = _angular(suite["hidden"].compute(first)["angular"], summary)
    n_finite = _saturation(record, suite, summary, probe)
    if "exits" in probe.families and probe.has_head:
        _exit_curves(record, suite, summary, probe, exit_layers, by_layer)
    if "eas" in probe.families and (probe.has_head or cfg.eas_similarity == "hidden_cos_final"):
        key = {"js": "js_sim"}.get(cfg.eas_similarity, cfg.eas_similarity)
        eas_layers = [layer for layer in range(1, L + 1) if layer in probed]
        summary["eas"] = _eas([by_layer[layer].get(key) for layer in eas_layers], L, cfg.eas_alpha, eas_layers)
        summary["eas_similarity"], summary["eas_alpha"] = cfg.eas_similarity, cfg.eas_alpha
    if "spec" in probe.families and probe.has_head:
        _spec(suite, summary, cfg, [layer for layer in exit_layers if layer < L], by_layer, n_finite)
    for kind in probe.heads:
        _head(record, suite, summary, probe, kind, by_layer, n_finite)
    if "cka" in suite:
        _cka(record, suite, summary, first, by_layer)
    if cfg.layers is not None:
        summary["layers_probed"] = sorted(probed & set(by_layer))
        summary["layers_note"] = (f"probed blocks {summary['layers_probed']} of 0..{L} (layers={cfg.layers!r}): "
                                  "per-layer rows, exits, saturation, static exit, EAS and speculation are defined on "
                                  "these blocks only; a token exits only at a probed block")
    record.summary = summary
    return record


def _layer_rows(probe, suite, first: int) -> list:
    """Per layer: the logit lens' means, the hidden-state similarities (None where not computed)."""
    cfg, L = probe.config, probe.n_layers
    lens = suite["lens"].compute() if "lens" in suite else {}
    hidden = suite["hidden"].compute(first)["layers"] if "hidden" in suite else {}
    rows = []
    for layer in (layer for layer in range(first, L + 1) if layer in set(probe.probed)):
        row = {"layer": layer}
        if probe.has_head and lens:
            row.update(lens.get(layer, {}))
            if cfg.eas_similarity == "js":
                row.setdefault("js_sim", None)
        similarity = hidden.get(layer, {})
        row["hidden_cos_final"] = similarity.get("hidden_cos_final")
        row["block_influence"] = similarity.get("block_influence")
        rows.append(row)
    return rows


def _angular(angular: dict, summary: dict) -> dict:
    for dist, values in angular.items():
        finite = [value for value in values if value["d"] is not None]
        if finite:
            best = min(finite, key=lambda value: value["d"])
            summary[f"angular_min_{dist}"], summary[f"angular_argmin_{dist}"] = best["d"], best["start"]
    return {str(dist): values for dist, values in angular.items()}


def _saturation(record, suite, summary: dict, probe) -> float:
    """Oracle skips, histograms and saturation_frac; returns the number of tokens finite at every layer."""
    result = suite["saturation"].compute() if "saturation" in suite else {}
    n = result.get("count", 0.0)
    if n > 0 and "saturation" in probe.families:
        for name in ("oracle_skip_strict", "oracle_skip_lenient", "saturation_mean_strict"):
            summary[name] = finite_or_none(result[name])
            summary["stderr"][name] = result["stderr"][name]
        record.saturation_hist, record.saturation_hist_lenient = result["hist_strict"], result["hist_lenient"]
        for row in record.layers:
            layer = row["layer"]
            row["saturation_frac"] = result["hist_strict"][layer] / n if layer < len(result["hist_strict"]) else None
    elif "saturation" in probe.families and probe.has_head:  # no finite token: the figures exist, as null
        summary.update(dict.fromkeys(("oracle_skip_strict", "oracle_skip_lenient", "saturation_mean_strict")))
    return n


def _exit_curves(record, suite, summary: dict, probe, exit_layers: list, by_layer: dict) -> None:
    """Trade-off curves per rule, the largest skip at each consistency level, and the static exit."""
    cfg, L = probe.config, probe.n_layers
    curves = {}
    for rule in ("max_prob", "margin", "entropy"):
        if f"exit/{rule}" in suite:
            curves[rule] = suite[f"exit/{rule}"].compute(cfg.thresholds[rule], L)
    patience = [point for k in cfg.patience for point in suite[f"exit/patience/{k}"].compute([float(k)], L)]
    if patience:
        curves["patience"] = patience
    for kind in probe.heads:
        curve = suite[f"head/{kind}/exit"].compute(probe.head_thresholds, L)
        if curve:
            curves[f"head_{kind}"] = curve
    record.curves = curves
    errors = {rule: suite[f"exit/{rule}"].stderr(L) for rule in ("max_prob", "margin", "entropy")
              if f"exit/{rule}" in suite and curves.get(rule)}
    for level in cfg.consistency_levels:
        best = {rule: exits_m.best_skip_at_consistency(curve, level) for rule, curve in curves.items()}
        summary[f"skip_at_consistency_{level:g}"] = best
        for rule in errors:
            summary["stderr"][f"skip_at_consistency_{level:g}/{rule}"] = _point_stderr(curves[rule], errors[rule],
                                                                                       best[rule], level)
    acc = torch.tensor([by_layer[layer]["acc"] if by_layer[layer].get("acc") is not None else float("nan")
                        for layer in exit_layers])
    if torch.isfinite(acc).all():
        layer, skip = exits_m.static_exit(acc, torch.tensor(exit_layers), L, cfg.static_tolerance)
        summary["static_exit_layer"] = int(layer)
        summary["stderr"]["static_exit_acc"] = suite["lens"].stderr().get(int(layer), {}).get("acc")
        summary[f"static_skip_{round(cfg.static_tolerance * 100):d}pct"] = finite_or_none(skip)
    else:
        summary["static_exit_layer"] = summary[f"static_skip_{round(cfg.static_tolerance * 100):d}pct"] = None


def _point_stderr(curve: list, errors: list, skip: float, level: float):
    """The standard error of the skip of the curve point that ``best_skip_at_consistency`` chose (None when no point
    qualified and the answer is the full model's skip 0)."""
    for point, error in zip(curve, errors):
        consistent = point["consistency"] is not None and point["consistency"] >= level - 1e-12
        if consistent and point["skip"] is not None and max(0.0, point["skip"]) == skip:
            return error["skip"]
    return None


def _eas(similarity: list, L: int, alpha: float, layers: list = None):
    """EAS over ``layers`` (default 1..L; a probed subset gives the mean over the probed blocks)."""
    if any(value is None for value in similarity):
        return None
    layers = None if layers is None else torch.tensor(layers)
    return finite_or_none(suit_m.eas(torch.tensor(similarity, dtype=torch.float64), L, alpha, layers))


def _spec(suite, summary: dict, cfg, draft_layers: list, by_layer: dict, n_finite: float) -> None:
    """The i.i.d. self-speculation estimate from agree_E, and the one simulated along the probe sequences."""
    agree = [by_layer[layer].get("agree") for layer in draft_layers]
    if not draft_layers or any(a is None for a in agree):
        return
    estimate = suit_m.spec_speedup_estimate(torch.tensor(agree, dtype=torch.float64), torch.tensor(draft_layers),
                                            max(by_layer), cfg.spec_draft_lengths)
    summary["spec_speedup_est"] = finite_or_none(estimate["speedup"])
    summary["spec_draft_layer"], summary["spec_draft_len"] = estimate["layer"], estimate["draft_len"]
    summary["spec_acceptance"] = finite_or_none(estimate["acceptance"])
    summary["spec_assumptions"] = suit_m.SPEC_ASSUMPTIONS
    if "spec_runs" in suite and n_finite > 0:
        runs = suite["spec_runs"].compute()
        summary["spec_speedup_est_runs"] = finite_or_none(runs["speedup"])
        summary["spec_runs_draft_layer"], summary["spec_runs_draft_len"] = runs["layer"], runs["draft_len"]
        summary["spec_runs_assumptions"] = suit_m.SPEC_RUNS_ASSUMPTIONS


def _head(record, suite, summary: dict, probe, kind: str, by_layer: dict, n_finite: float) -> None:
    """A head's per-layer rows, its EAS (its logit_corr where it has a layer) and oracle skip."""
    L = probe.n_layers
    if f"head/{kind}" in suite:
        stats = suite[f"head/{kind}"].compute()
    else:
        stats = suite[f"head/{kind}/confidence"].compute()
    rows = [{"layer": layer, **stats[layer]} for layer in probe.heads[kind].layers if layer in stats]
    record.heads[kind] = rows
    if rows and "eas" in probe.families:
        head_corr = {row["layer"]: row.get("logit_corr") for row in rows}
        layers = [layer for layer in range(1, L + 1) if layer in set(probe.probed)]
        similarity = [head_corr.get(layer, by_layer[layer].get("logit_corr")) for layer in layers]
        similarity[-1] = 1.0  # the final layer is the model itself
        if all(value is not None for value in similarity):
            summary[f"head_{kind}_eas"] = _eas(similarity, L, probe.config.eas_alpha, layers)
    if f"head/{kind}/saturation" in suite and n_finite > 0:
        result = suite[f"head/{kind}/saturation"].compute()
        summary[f"head_{kind}_oracle_skip_strict"] = finite_or_none(result["oracle_skip_strict"])


def _cka(record, suite, summary: dict, first: int, by_layer: dict) -> None:
    """The CKA matrix between captured layers and, with a reference, each layer's drift since the last probe."""
    if suite["cka"].n_minibatches == 0:
        return
    cka = suite["cka"].compute()[first:, first:]
    record.cka = [[finite_or_none(v) for v in row] for row in cka.tolist()]
    record.cka_layers = list(range(first, first + cka.shape[0]))
    drift = suite["cka_drift"]
    if drift.n_pairs == 0:
        return
    record.cka_drift = [finite_or_none(v) for v in drift.compute()[first:].tolist()]
    for layer, value in zip(record.cka_layers, record.cka_drift):
        if layer in by_layer:
            by_layer[layer]["cka_drift"] = value
    finite = [v for v in record.cka_drift if v is not None]
    summary["cka_drift_mean"] = sum(finite) / len(finite) if finite else None
