"""Matplotlib figure builders shared by the W&B extras and ``ee-report``.

Every builder takes ProbeRecord dicts (DESIGN §4) and returns a :class:`Plot`: the figure plus the arrays it drew
(``plot.data``), so callers and tests can check the numbers behind a picture. Builders are tolerant: a missing or
null field is skipped (drawn as a gap), and a builder with nothing at all to draw returns ``None``.

Figures are made with :class:`matplotlib.figure.Figure` on the Agg canvas directly, never through ``pyplot``: no
global backend switch, no figure registry to leak, safe to call from a training process. Matplotlib (the ``report``
extra) is imported only when a figure is drawn: the record helpers work without it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the data helpers (W&B extras use them)
    from matplotlib.figure import Figure

from .plot_data import (  # the record helpers; re-exported, callers import them from here
    LAYER_METRICS,
    _step_of,
    as_float,
    cka_array,
    curve_arrays,
    flatten_numbers,
    layer_metric_names,
    layer_profile,
    layer_rows,
    layer_step_matrix,
    ordered_records,
    pick_probes,
    run_label,
    summary_series,
)

# Skip-ratio summaries share one [0, 1] panel; EAS and the speculative estimate get their own.
SKIP_SUMMARY_KEYS = ("oracle_skip_strict", "oracle_skip_lenient", "static_skip_5pct")
CONSISTENCY_TARGETS = ("0.99", "0.95")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_METRIC_CMAPS = {"agree": "viridis", "acc": "viridis", "kl": "magma", "ce": "magma", "entropy": "magma"}
_UNIT_RANGE = {"agree", "acc", "max_prob", "margin", "hidden_cos_final", "logit_corr", "logit_cos"}


@dataclass
class Plot:
    """A drawn figure and the data behind it.

    ``name`` is a file-name stem (``heatmap_agree``), ``data`` holds the arrays exactly as drawn (NaN where a value was
    missing). ``figure`` is released by :meth:`close` once the picture has been written.
    """

    name: str
    title: str
    figure: Figure | None
    data: dict[str, Any] = field(default_factory=dict)

    def png_bytes(self, dpi: int = 100) -> bytes:
        if self.figure is None:
            raise RuntimeError(f"plot {self.name!r} was closed; draw it again")
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()

    def save(self, path: str | Path, dpi: int = 100) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.png_bytes(dpi))
        return path

    def to_pil(self, dpi: int = 100):
        """The figure as a PIL image (what ``wandb.Image`` takes)."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.png_bytes(dpi)))
        image.load()
        return image

    def legend_labels(self) -> list[str]:
        """Texts of every legend in the figure (axes legends and figure legends)."""
        if self.figure is None:
            return list(self.data.get("legend", []))
        legends = [ax.get_legend() for ax in self.figure.axes] + list(self.figure.legends)
        return [text.get_text() for legend in legends if legend is not None for text in legend.get_texts()]

    def close(self) -> None:
        self.figure = None


# ----------------------------------------------------------------------------------------------------------------
# Data extraction


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("drawing figures needs matplotlib: pip install 'ee_callbacks[report]'") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _step_ticks(ax, steps: Sequence[int], axis: str = "x", max_ticks: int = 10) -> None:
    if not steps:
        return
    stride = max(1, math.ceil(len(steps) / max_ticks))
    positions = list(range(0, len(steps), stride))
    labels = [str(steps[index]) for index in positions]
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=45 if len(labels) > 5 else 0)
    else:
        ax.set_yticks(positions, labels)


def heatmap(records: Sequence[Mapping[str, Any]], metric: str, title: str | None = None) -> Plot | None:
    """Heatmap of one per-layer metric, layer (rows) × probe step (columns), over the given records.

    ``plot.data``: ``layers``, ``steps``, ``values`` (``values[i, j]`` = metric of ``layers[i]`` at ``steps[j]``).
    Columns are probes in step order, evenly spaced (probe steps need not be).
    """
    layers, steps, values = layer_step_matrix(records, metric)
    if values.size == 0 or not np.isfinite(values).any():
        return None
    figure = _new_figure(max(5.0, min(12.0, 3.0 + 0.25 * len(steps))), max(3.0, min(10.0, 1.5 + 0.25 * len(layers))))
    ax = figure.add_subplot()
    limits = {"vmin": 0.0, "vmax": 1.0} if metric in _UNIT_RANGE and np.nanmin(values) >= 0 else {}
    image = ax.imshow(
        np.ma.masked_invalid(values),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap=_colormap(_METRIC_CMAPS.get(metric, "viridis")),
        **limits,
    )
    figure.colorbar(image, ax=ax, label=metric)
    _step_ticks(ax, steps, "x")
    layer_stride = max(1, math.ceil(len(layers) / 16))
    ax.set_yticks(range(0, len(layers), layer_stride), [str(layer) for layer in layers[::layer_stride]])
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    title = title or f"{metric} per layer over training"
    ax.set_title(title)
    return Plot(f"heatmap_{metric}", title, figure, {"layers": layers, "steps": steps, "values": values})


def summary_over_steps(records: Sequence[Mapping[str, Any]], title: str | None = None) -> Plot | None:
    """Summary scalars over steps: skip ratios, EAS, the speculative estimate and the per-rule skip at consistency.

    ``plot.data``: ``steps`` and ``series`` ({name: values} for every line drawn, names as in :func:`summary_series`).
    """
    steps, columns = summary_series(records)
    panels = _summary_panels(columns)
    if not panels:
        return None
    figure = _new_figure(6.0 * min(len(panels), 3), 3.6 * math.ceil(len(panels) / 3))
    drawn: dict[str, np.ndarray] = {}
    for index, (panel_title, names) in enumerate(panels):
        ax = figure.add_subplot(math.ceil(len(panels) / 3), min(len(panels), 3), index + 1)
        for name in names:
            ax.plot(steps, columns[name], marker="o", markersize=3, label=name.rsplit("/", 1)[-1])
            drawn[name] = columns[name]
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1 or names[0].rsplit("/", 1)[-1] != panel_title:
            ax.legend(fontsize="small")
    title = title or "summary over training"
    figure.suptitle(title)
    return Plot("summary", title, figure, {"steps": steps, "series": drawn})


def _summary_panels(columns: Mapping[str, np.ndarray]) -> list[tuple[str, list[str]]]:
    def present(names: Iterable[str]) -> list[str]:
        return [name for name in names if name in columns and np.isfinite(columns[name]).any()]

    panels = []
    skips = present(SKIP_SUMMARY_KEYS)
    if skips:
        panels.append(("skip ratio", skips))
    for name in ("eas", "spec_speedup_est"):
        if present([name]):
            panels.append((name, [name]))
    for target in CONSISTENCY_TARGETS:
        rules = present(sorted(name for name in columns if name.startswith(f"skip_at_consistency_{target}/")))
        if rules:
            panels.append((f"skip at consistency ≥ {target}", rules))
    return panels


def _draw_curves(ax, record: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    curves = curve_arrays(record)
    for rule, arrays in curves.items():
        order = np.argsort(arrays["skip"], kind="stable")
        ax.plot(arrays["skip"][order], arrays["consistency"][order], marker="o", markersize=3, label=rule)
    for target in CONSISTENCY_TARGETS:
        ax.axhline(float(target), color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("skip (fraction of layers)")
    ax.set_ylabel("consistency with final layer")
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    return curves


def tradeoff_curves(record: Mapping[str, Any], title: str | None = None) -> Plot | None:
    """Exit trade-off of one probe: skip vs consistency, one line per rule (dotted lines at 0.99 and 0.95).

    ``plot.data``: ``step`` and ``curves`` ({rule: {"threshold", "skip", "consistency", "acc"}}).
    """
    if not curve_arrays(record):
        return None
    figure = _new_figure(6.0, 4.5)
    ax = figure.add_subplot()
    curves = _draw_curves(ax, record)
    title = title or f"exit trade-off at step {record.get('step')}"
    ax.set_title(title)
    return Plot("tradeoff", title, figure, {"step": _step_of(record), "curves": curves})


def tradeoff_first_middle_last(records: Sequence[Mapping[str, Any]], title: str | None = None) -> Plot | None:
    """Trade-off curves at the first, middle and last probe, side by side.

    ``plot.data``: ``steps`` and ``curves`` ({step: {rule: arrays}}).
    """
    picked = [record for record in pick_probes(records) if curve_arrays(record)]
    if not picked:
        return None
    figure = _new_figure(5.0 * len(picked), 4.2)
    drawn: dict[int | None, dict[str, dict[str, np.ndarray]]] = {}
    for index, record in enumerate(picked):
        ax = figure.add_subplot(1, len(picked), index + 1)
        drawn[_step_of(record)] = _draw_curves(ax, record)
        ax.set_title(f"step {record.get('step')}")
    title = title or "exit trade-off (first, middle, last probe)"
    figure.suptitle(title)
    return Plot("tradeoff", title, figure, {"steps": [_step_of(record) for record in picked], "curves": drawn})


def cka_heatmap(record: Mapping[str, Any], title: str | None = None) -> Plot | None:
    """Linear CKA between layers at one probe. ``plot.data``: ``layers`` (the ``cka_layers``), ``matrix``."""
    found = cka_array(record)
    if found is None:
        return None
    labels, matrix = found
    size = len(labels)
    figure = _new_figure(max(4.5, min(10.0, 2.0 + 0.3 * size)), max(4.0, min(9.0, 1.5 + 0.3 * size)))
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), origin="lower", vmin=0.0, vmax=1.0, cmap=_colormap("viridis"))
    figure.colorbar(image, ax=ax, label="linear CKA")
    stride = max(1, math.ceil(size / 16))
    ticks = list(range(0, size, stride))
    ax.set_xticks(ticks, [str(labels[index]) for index in ticks])
    ax.set_yticks(ticks, [str(labels[index]) for index in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    title = title or f"CKA between layers at step {record.get('step')}"
    ax.set_title(title)
    return Plot("cka", title, figure, {"step": _step_of(record), "layers": labels, "matrix": matrix})


def layer_lines(
    records: Sequence[Mapping[str, Any]], metric: str, title: str | None = None, name: str | None = None
) -> Plot | None:
    """One per-layer metric across layers at the first, middle and last probe, one line per probe.

    ``plot.data``: ``metric`` and ``series`` ({step: (layers, values)}).
    """
    series: dict[int | None, tuple[list[int], np.ndarray]] = {}
    for record in pick_probes(records):
        layers, values = layer_profile(record, metric)
        if np.isfinite(values).any():
            series[_step_of(record)] = (layers, values)
    if not series:
        return None
    figure = _new_figure(6.0, 4.0)
    ax = figure.add_subplot()
    for step, (layers, values) in series.items():
        ax.plot(layers, values, marker="o", markersize=3, label=f"step {step}")
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    title = title or f"{metric} per layer"
    ax.set_title(title)
    return Plot(name or f"layers_{metric}", title, figure, {"metric": metric, "series": series})


def overlay_summary(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str | None = None) -> Plot | None:
    """Compare runs: each summary scalar over steps in its own panel, one line per run, one shared legend.

    ``plot.data``: ``series`` ({name: {run label: (steps, values)}}) and ``legend`` (run labels, in order).
    """
    per_run = {label: summary_series(records) for label, records in runs.items()}
    names = [
        name
        for name in ("eas",) + SKIP_SUMMARY_KEYS + ("spec_speedup_est",)
        if any(name in columns and np.isfinite(columns[name]).any() for _, columns in per_run.values())
    ]
    if not names:
        return None
    columns_count = min(len(names), 3)
    rows_count = math.ceil(len(names) / columns_count)
    figure = _new_figure(5.0 * columns_count, 3.5 * rows_count + 0.6)
    series: dict[str, dict[str, tuple[list[int], np.ndarray]]] = {}
    handles: dict[str, Any] = {}
    colours = _run_colours(list(runs))
    for index, name in enumerate(names):
        ax = figure.add_subplot(rows_count, columns_count, index + 1)
        series[name] = {}
        for label, (steps, columns) in per_run.items():
            if name not in columns:
                continue
            (line,) = ax.plot(steps, columns[name], marker="o", markersize=3, color=colours[label], label=label)
            handles.setdefault(label, line)
            series[name][label] = (steps, columns[name])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend = [label for label in runs if label in handles]
    figure.legend([handles[label] for label in legend], legend, loc="outside lower center", ncols=min(len(legend), 3))
    title = title or "runs compared: summary over training"
    figure.suptitle(title)
    return Plot("compare_summary", title, figure, {"series": series, "legend": legend})


def overlay_layer_metric(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "agree", title: str | None = None
) -> Plot | None:
    """Compare runs: one per-layer metric at each run's last probe, one line per run.

    The x axis is the layer index when all runs have the same depth, else the relative depth ℓ/L (L = the largest
    layer index of the record) so that models of different depth line up.
    ``plot.data``: ``x_label``, ``series`` ({run label: (x, values, step)}) and ``legend``.
    """
    profiles: dict[str, tuple[list[int], np.ndarray, int | None]] = {}
    for label, records in runs.items():
        ordered = ordered_records(records)
        if not ordered:
            continue
        layers, values = layer_profile(ordered[-1], metric)
        if np.isfinite(values).any():
            profiles[label] = (layers, values, _step_of(ordered[-1]))
    if not profiles:
        return None
    relative = len({max(layers) for layers, _, _ in profiles.values()}) > 1
    x_label = "relative depth ℓ/L" if relative else "layer"
    figure = _new_figure(6.5, 4.5)
    ax = figure.add_subplot()
    colours = _run_colours(list(runs))
    series = {}
    for label, (layers, values, step) in profiles.items():
        x = np.array(layers, dtype=float) / max(layers) if relative else np.array(layers, dtype=float)
        ax.plot(x, values, marker="o", markersize=3, color=colours[label], label=f"{label} (step {step})")
        series[label] = (x, values, step)
    title = _finish_layer_axes(ax, x_label, metric, title or f"runs compared: {metric} per layer at the last probe")
    return Plot(
        f"compare_layers_{metric}",
        title,
        figure,
        {"x_label": x_label, "series": series, "legend": list(profiles)},
    )


def _group_steps_stats(members: Sequence[Sequence[Mapping[str, Any]]], name: str):
    """Mean and 95% t-interval half-width of summary ``name`` at each step the members share."""
    from ee_callbacks.stats import mean_ci

    per_member = []
    for records in members:
        steps, columns = summary_series(records)
        if name in columns:
            per_member.append(dict(zip(steps, columns[name])))
    if not per_member:
        return [], np.array([]), np.array([]), 0
    steps = sorted(set.intersection(*(set(m) for m in per_member)))
    stats = [mean_ci(m[step] for m in per_member) for step in steps]
    means = np.array([as_float(mean) for mean, _, _ in stats])
    halves = np.array([as_float(half) for _, half, _ in stats])
    return steps, means, halves, len(per_member)


def band_summary(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], title: str | None = None) -> Plot | None:
    """Compare configurations over seeds: each summary scalar over steps, the mean of a group's runs as a line and
    its 95% t-interval (mean ± t_{0.975, n−1}·s/√n) as a shaded band. ``groups``: {label: [records of each run]}.

    ``plot.data``: ``series`` ({name: {group label: (steps, mean, half_width, n_runs)}}) and ``legend``.
    """
    names = [
        name for name in ("eas",) + SKIP_SUMMARY_KEYS + ("spec_speedup_est",)
        if any(_group_steps_stats(members, name)[0] for members in groups.values())
    ]
    if not names:
        return None
    columns_count = min(len(names), 3)
    rows_count = math.ceil(len(names) / columns_count)
    figure = _new_figure(5.0 * columns_count, 3.5 * rows_count + 0.6)
    colours = _run_colours(list(groups))
    series: dict[str, dict[str, tuple]] = {}
    handles: dict[str, Any] = {}
    for index, name in enumerate(names):
        ax = figure.add_subplot(rows_count, columns_count, index + 1)
        series[name] = {}
        for label, members in groups.items():
            steps, means, halves, n = _group_steps_stats(members, name)
            if not steps:
                continue
            (line,) = ax.plot(steps, means, marker="o", markersize=3, color=colours[label], label=label)
            lower, upper = means - np.nan_to_num(halves), means + np.nan_to_num(halves)
            ax.fill_between(steps, lower, upper, color=colours[label], alpha=0.2, linewidth=0)
            handles.setdefault(label, line)
            series[name][label] = (steps, means, halves, n)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend = [label for label in groups if label in handles]
    figure.legend([handles[label] for label in legend], [f"{label} (n={len(groups[label])})" for label in legend],
                  loc="outside lower center", ncols=min(len(legend), 3))
    title = title or "configurations over seeds: mean and 95% t-interval"
    figure.suptitle(title)
    return Plot("compare_summary_seeds", title, figure, {"series": series, "legend": legend})


def band_layer_metric(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], metric: str = "agree",
                      title: str | None = None) -> Plot | None:
    """Compare configurations over seeds: a per-layer metric at each run's last probe, the group mean with 95%
    t-interval error bars (relative depth ℓ/L on x when depths differ).

    ``plot.data``: ``x_label``, ``series`` ({group label: (x, mean, half_width, n_runs)}) and ``legend``.
    """
    from ee_callbacks.stats import mean_ci

    profiles = {}
    for label, members in groups.items():
        per_member = []
        for records in members:
            ordered = ordered_records(records)
            if ordered:
                layers, values = layer_profile(ordered[-1], metric)
                per_member.append(dict(zip(layers, values)))
        if not per_member:
            continue
        layers = sorted(set.intersection(*(set(m) for m in per_member)))
        stats = [mean_ci(m[layer] for m in per_member) for layer in layers]
        means = np.array([as_float(mean) for mean, _, _ in stats])
        if layers and np.isfinite(means).any():
            profiles[label] = (layers, means, np.array([as_float(h) for _, h, _ in stats]), len(per_member))
    if not profiles:
        return None
    relative = len({max(layers) for layers, *_ in profiles.values()}) > 1
    x_label = "relative depth ℓ/L" if relative else "layer"
    figure = _new_figure(6.5, 4.5)
    ax = figure.add_subplot()
    colours = _run_colours(list(groups))
    series = {}
    for label, (layers, means, halves, n) in profiles.items():
        x = np.array(layers, dtype=float) / max(layers) if relative else np.array(layers, dtype=float)
        ax.errorbar(x, means, yerr=np.nan_to_num(halves), marker="o", markersize=3, capsize=3, color=colours[label],
                    label=f"{label} (n={n})")
        series[label] = (x, means, halves, n)
    title = _finish_layer_axes(ax, x_label, metric, title or
                               f"configurations over seeds: {metric} per layer at the last probe (95% t-interval)")
    return Plot(f"compare_layers_{metric}_seeds", title, figure,
                {"x_label": x_label, "series": series, "legend": list(profiles)})


def _finish_layer_axes(ax, x_label: str, metric: str, title: str) -> str:
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return title


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="lightgrey")  # missing values show grey, not as the lowest colour


def _run_colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: palette(index % palette.N) for index, label in enumerate(labels)}
