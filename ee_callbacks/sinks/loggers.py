"""Fan-out of a ProbeRecord's scalars to every Lightning logger, and a compact console table."""

from __future__ import annotations

import math
from typing import Iterable, Optional

from ..metrics import registry

__all__ = ["LAYER_METRICS", "flatten_record_metrics", "log_to_loggers", "format_record_table"]

LAYER_METRICS = registry.names("layer")
HEAD_METRICS = registry.names("head")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_record_metrics(record: dict, prefix: str = "ee") -> dict:
    """Scalar metrics of one record, keyed ``<prefix>/<metric>/layer_<ℓ:02d>`` and ``<prefix>/summary/<name>``.

    Nested summary dicts (``skip_at_consistency_0.99: {rule: v}``) become ``<prefix>/summary/<name>/<rule>``.
    Strings and nulls are left out; curves, CKA matrices and histograms are not scalars (W&B extras draw them).
    """
    out: dict = {}
    for row in record.get("layers", []):
        layer = row.get("layer")
        for metric in LAYER_METRICS:
            value = row.get(metric)
            if _finite(value):
                out[registry.layer_key(prefix, metric, layer)] = float(value)
    for name, value in (record.get("summary") or {}).items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if _finite(v):
                    out[registry.summary_key(prefix, f"{name}/{sub}")] = float(v)
        elif _finite(value):
            out[registry.summary_key(prefix, name)] = float(value)
    probe_s = (record.get("timing") or {}).get("probe_s")
    if _finite(probe_s):
        out[registry.summary_key(prefix, "probe_s")] = float(probe_s)
    for kind, rows in (record.get("heads") or {}).items():
        for row in rows:
            layer = row.get("layer")
            for metric in HEAD_METRICS:
                value = row.get(metric)
                if _finite(value):
                    out[registry.head_key(prefix, kind, metric, layer)] = float(value)
    return out


def log_to_loggers(loggers: Iterable, metrics: dict, step: int) -> list:
    """``log_metrics(metrics, step=step)`` on every logger; returns ``[(logger name, error)]`` for those that failed.

    One failing logger never stops the others.
    """
    failures = []
    for logger in loggers:
        try:
            logger.log_metrics(dict(metrics), step=step)
        except Exception as err:  # instrumentation must not stop training
            failures.append((type(logger).__name__, f"{type(err).__name__}: {err}"))
    return failures


def format_record_table(record: dict, title: Optional[str] = None, metrics=("agree", "kl", "ce")) -> str:
    """A compact text table: one line per layer with ``metrics``, then the headline summary scalars."""
    lines = []
    if title:
        lines.append(title)
    header = "layer " + " ".join(f"{m:>9s}" for m in metrics)
    lines.append(header)
    lines.append("-" * len(header))
    for row in record.get("layers", []):
        cells = []
        for m in metrics:
            v = row.get(m)
            cells.append(f"{v:9.4f}" if _finite(v) else f"{'-':>9s}")
        lines.append(f"{row.get('layer'):>5} " + " ".join(cells))
    summary = record.get("summary") or {}
    keys = ("eas", "oracle_skip_strict", "oracle_skip_lenient", "static_exit_layer", "static_skip_5pct",
            "spec_speedup_est", "final_ce", "final_acc")
    parts = [f"{k}={summary[k]:.4f}" if _finite(summary.get(k)) else f"{k}=-" for k in keys if k in summary]
    for level_key in [k for k in summary if k.startswith("skip_at_consistency_")]:
        rules = summary[level_key]
        if isinstance(rules, dict):
            inner = ", ".join(f"{r}={v:.3f}" for r, v in rules.items() if _finite(v))
            parts.append(f"{level_key}: {inner}")
    lines.append("summary: " + "; ".join(parts))
    return "\n".join(lines)
