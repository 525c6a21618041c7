"""Record helpers behind the figures: ProbeRecord dicts (DESIGN §4) turned into ordered lists and numpy arrays.
They need no matplotlib (the W&B extras use them without it); :mod:`ee_callbacks.plotting` re-exports them."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .metrics import registry

# Per-layer metrics in the order tables and reports show them (DESIGN §3); unknown extra metrics follow, sorted.
LAYER_METRICS = registry.REPORT_LAYER_PANELS


def as_float(value: Any) -> float:
    """A finite float, or NaN for null, non-numeric and non-finite values."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _step_of(record: Mapping[str, Any]) -> int | None:
    step = record.get("step")
    if isinstance(step, bool):
        return None
    if isinstance(step, (int, float)) and math.isfinite(step):
        return int(step)
    return None


def ordered_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records sorted by step; for a repeated step the one written last wins (a resumed run re-probes a step).

    Records without a usable step keep their place after all stepped ones.
    """
    by_step: dict[int, Mapping[str, Any]] = {}
    unstepped: list[Mapping[str, Any]] = []
    for record in records:
        if not isinstance(record, Mapping):
            continue
        step = _step_of(record)
        if step is None:
            unstepped.append(record)
        else:
            by_step[step] = record
    return [by_step[step] for step in sorted(by_step)] + unstepped


def layer_rows(record: Mapping[str, Any]) -> dict[int, Mapping[str, Any]]:
    """The record's per-layer entries keyed by layer index (entries without an integer layer are skipped)."""
    rows: dict[int, Mapping[str, Any]] = {}
    for entry in record.get("layers") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("layer"), int) and not isinstance(entry["layer"], bool):
            rows[entry["layer"]] = entry
    return rows


def layer_metric_names(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Per-layer metric names present in the records: the known ones in DESIGN order, then extras sorted."""
    present: set[str] = set()
    for record in records:
        for entry in layer_rows(record).values():
            present.update(key for key in entry if key != "layer")
    known = [name for name in LAYER_METRICS if name in present]
    return known + sorted(present.difference(LAYER_METRICS))


def layer_step_matrix(records: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[int], list[int], np.ndarray]:
    """``(layers, steps, values)`` with ``values[i, j]`` = ``metric`` of layer ``layers[i]`` at probe ``steps[j]``.

    Layers are the union over all records (a record without a layer gets NaN there); records are ordered by
    :func:`ordered_records`; records without a step are left out.
    """
    records = [record for record in ordered_records(records) if _step_of(record) is not None]
    per_record = [layer_rows(record) for record in records]
    layers = sorted({layer for rows in per_record for layer in rows})
    steps = [_step_of(record) for record in records]
    values = np.full((len(layers), len(records)), np.nan)
    for j, rows in enumerate(per_record):
        for i, layer in enumerate(layers):
            if layer in rows:
                values[i, j] = as_float(rows[layer].get(metric))
    return layers, steps, values


def layer_profile(record: Mapping[str, Any], metric: str) -> tuple[list[int], np.ndarray]:
    """``(layers, values)`` of one metric across the layers of one record."""
    rows = layer_rows(record)
    layers = sorted(rows)
    return layers, np.array([as_float(rows[layer].get(metric)) for layer in layers], dtype=float)


def summary_series(records: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Scalar summaries over steps: ``(steps, {name: values})``.

    Flat numbers keep their name (``eas``); per-rule dicts are flattened as ``<name>/<rule>``
    (``skip_at_consistency_0.99/max_prob``). A name missing in a record is NaN there.
    """
    records = [record for record in ordered_records(records) if _step_of(record) is not None]
    steps = [_step_of(record) for record in records]
    columns: dict[str, np.ndarray] = {}
    for j, record in enumerate(records):
        summary = record.get("summary") or {}
        if not isinstance(summary, Mapping):
            continue
        for name, value in flatten_numbers(summary):
            if name not in columns:
                columns[name] = np.full(len(records), np.nan)
            columns[name][j] = as_float(value)
    return steps, columns


def flatten_numbers(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(name, value)`` for every number or null in a nested mapping, nested names joined with ``/``."""
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(flatten_numbers(value, f"{name}/"))
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            items.append((name, value))
    return items


def pick_probes(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The first, middle and last probe (fewer when there are fewer records)."""
    records = ordered_records(records)
    if not records:
        return []
    indices = sorted({0, (len(records) - 1) // 2, len(records) - 1})
    return [records[index] for index in indices]


def curve_arrays(record: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Exit trade-off curves of one record: ``{rule: {"threshold", "skip", "consistency", "acc"}}`` arrays."""
    curves = record.get("curves") or {}
    result: dict[str, dict[str, np.ndarray]] = {}
    if not isinstance(curves, Mapping):
        return result
    for rule, points in curves.items():
        if not isinstance(points, list):
            continue
        points = [point for point in points if isinstance(point, Mapping)]
        arrays = {
            column: np.array([as_float(point.get(column)) for point in points], dtype=float)
            for column in ("threshold", "skip", "consistency", "acc")
        }
        if np.isfinite(arrays["skip"]).any() and np.isfinite(arrays["consistency"]).any():
            result[str(rule)] = arrays
    return result


def cka_array(record: Mapping[str, Any]) -> tuple[list[Any], np.ndarray] | None:
    """``(layer labels, K×K matrix)`` of a record's CKA, or None when absent or not square."""
    matrix = record.get("cka")
    if not isinstance(matrix, list) or not matrix or not all(isinstance(row, list) for row in matrix):
        return None
    size = len(matrix)
    if any(len(row) != size for row in matrix):
        return None
    values = np.array([[as_float(value) for value in row] for row in matrix], dtype=float)
    if not np.isfinite(values).any():
        return None
    labels = record.get("cka_layers")
    if not isinstance(labels, list) or len(labels) != size:
        labels = list(range(size))
    return labels, values


def run_label(record: Mapping[str, Any], fallback: str) -> str:
    """``model.name`` and ``run.experiment`` of a record (``"<model> · <experiment>"``), else ``fallback``."""
    model = record.get("model") if isinstance(record.get("model"), Mapping) else {}
    run = record.get("run") if isinstance(record.get("run"), Mapping) else {}
    parts = [str(part) for part in (model.get("name"), run.get("experiment")) if part not in (None, "")]
    return " · ".join(parts) if parts else fallback


# ----------------------------------------------------------------------------------------------------------------
# Figure builders
