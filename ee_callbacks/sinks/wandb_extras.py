"""Weights & Biases extras for the early-exit probe: a workspace that stays readable at any depth.

The scalars (``ee/<metric>/layer_<ℓ>``, ``ee/summary/<name>``) go through every Lightning logger (DESIGN §5). On a
W&B run this module decides how they show and adds what only W&B can show:

* :meth:`WandbExtras.define_metrics` declares every scalar key once with ``run.define_metric``: the headline summary
  figures stay visible as ordinary line charts with summary modes for the runs table; every per-layer (and other)
  scalar stays in the history (API, CSV export) but is hidden from the workspace and left out of the run summary;
* :meth:`WandbExtras.log_probe` logs interactive custom charts (``wandb.plot.line_series`` / ``wandb.plot.line``,
  re-logged under stable keys at each probe) and one growing probe table (``log_mode="INCREMENTAL"``);
* :meth:`WandbExtras.log_artifact` logs ``ee_probes.jsonl`` as an artifact with aliases and metadata.

Nothing matplotlib is imported or drawn unless ``wandb_images=True``. Every method catches its own exceptions, warns
once per kind of failure and returns a falsy value: W&B trouble never stops training.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ee_callbacks.plotting import as_float, layer_metric_names, layer_rows, ordered_records

log = logging.getLogger(__name__)

# Lightning's WandbLogger logs every row with this key and declares it the x axis of all charts
# (define_metric("*", step_metric="trainer/global_step")), so rows carrying it line up with Lightning's scalars.
LIGHTNING_STEP_KEY = "trainer/global_step"

# The summary figures kept visible in the workspace, with their run-summary modes (runs-table columns).
SUMMARY_MODES = {
    "eas": "last,max",
    "oracle_skip_strict": "last,max",
    "oracle_skip_lenient": "last,max",
    "static_skip_5pct": "last,max",
    "spec_speedup_est": "last,max",
    "final_ce": "last,min",
    "final_acc": "last,max",
    "probe_s": "mean",
}
SKIP_AT_CONSISTENCY = "skip_at_consistency_"  # skip_at_consistency_<c>/<rule>: visible, "last,max"
SKIP_AT_CONSISTENCY_MODE = "last,max"

DEFAULT_LAYER_CHARTS = ("agree", "kl", "ce")
DEFAULT_PROFILE_METRICS = ("agree", "acc", "logit_corr", "hidden_cos_final")


class WandbExtras:
    """Shapes the early-exit probe's W&B workspace and logs what only W&B can show.

    Every method takes a Lightning ``WandbLogger`` (its ``.experiment`` is used) or a ``wandb`` run; the caller runs
    them on global rank zero only.

    Keys below are for ``prefix="ee"`` and the probe set ``"default"``; for another probe set the set name follows
    the prefix (``ee/<set>/table``, ``ee/<set>/charts/agree``, ...).

    ``define_metrics(run, keys)`` — call it with the scalar keys before they are first logged. Each key is declared
    once, with ``step_metric="trainer/global_step"``:

    * ``ee/summary/<name>`` for eas, oracle_skip_strict, oracle_skip_lenient, static_skip_5pct, spec_speedup_est,
      final_acc (summary ``last,max``), final_ce (``last,min``), probe_s (``mean``), and
      ``ee/summary/skip_at_consistency_<c>/<rule>`` (``last,max``): visible, one line chart each;
    * every other key (``ee/<metric>/layer_<ℓ>``, ``ee/heads/...``, the other summary scalars): ``hidden=True``,
      ``summary="none"`` — in the history, not on the workspace, not a runs-table column.

    ``log_probe`` — one ``run.log`` row per probe, without ``step=`` (Lightning owns W&B's step; the training step
    travels in ``trainer/global_step``):

    * ``ee/charts/<metric>`` for metric in ``layer_charts`` (default agree, kl, ce): ``wandb.plot.line_series``,
      x = probe step, one line per layer (``layer_ℓℓ``), over the history so far (at most ``max_chart_points``
      probes, evenly spaced, always the latest);
    * ``ee/charts/layer_profile``: ``wandb.plot.line`` of ``profile_metrics`` against the layer at this probe;
    * ``ee/charts/tradeoff``: ``wandb.plot.line``, skip (x) vs consistency (y), one line per exit rule, this probe;
    * ``ee/table``: the probe table, one row per layer and probe, columns ``step``, ``layer`` and the per-layer
      metrics of the first record; one incremental ``wandb.Table`` that grows (``log_mode="INCREMENTAL"``);
    * with ``wandb_images=True`` only, matplotlib images ``ee/heatmap_agree``, ``ee/heatmap_kl`` (layer × step over
      the history), ``ee/tradeoff`` and ``ee/cka``;
    * ``trainer/global_step`` — the probe's training step (``step_key``; None leaves it out).

    The charts' data tables are logged by W&B under ``Custom Chart Tables/<chart key>_table`` (their own section).
    A ``WandbLogger(prefix="exp")`` writes every key but ``trainer/global_step`` as ``exp-<key>``: the keys declared
    and logged here get the same prefix, so declarations and charts sit with the logger's scalars.
    An entry whose data is missing from the record is left out of the row.

    ``log_config`` — the probe configuration into ``run.config["ee_probe"]``.

    ``log_artifact`` — ``ee_probes.jsonl`` (and the exit-heads directory as ``exit_heads/``) as an artifact named
    ``ee-probes-<run id>`` of type ``ee-probes``, aliases ``latest`` and ``step-<last probe step>``, metadata
    ``status``, ``records``, ``steps``, ``sets``, ``model``, ``probe``.
    """

    ARTIFACT_TYPE = "ee-probes"

    def __init__(
        self,
        prefix: str = "ee",
        step_key: str | None = LIGHTNING_STEP_KEY,
        layer_charts: Sequence[str] = DEFAULT_LAYER_CHARTS,
        profile_metrics: Sequence[str] = DEFAULT_PROFILE_METRICS,
        max_chart_points: int = 100,
        wandb_images: bool = False,
        image_dpi: int = 90,
    ):
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty string without a trailing '/', got {prefix!r}")
        if step_key is not None and not isinstance(step_key, str):
            raise ValueError(f"step_key must be a string or None, got {step_key!r}")
        for name, value in (("layer_charts", layer_charts), ("profile_metrics", profile_metrics)):
            if isinstance(value, str) or not all(isinstance(item, str) and item for item in value):
                raise ValueError(
                    f"{name} must be a list of per-layer metric names (e.g. ['agree', 'kl']), got {value!r}"
                )
        if isinstance(max_chart_points, bool) or not isinstance(max_chart_points, int) or max_chart_points < 2:
            raise ValueError(f"max_chart_points must be an integer ≥ 2, got {max_chart_points!r}")
        self.prefix = prefix
        self.step_key = step_key
        self.layer_charts = tuple(layer_charts)
        self.profile_metrics = tuple(profile_metrics)
        self.max_chart_points = max_chart_points
        self.wandb_images = bool(wandb_images)
        self.image_dpi = int(image_dpi)
        self._warned: set[tuple[str, str]] = set()
        self._declared: set[str] = set()
        self._tables: dict[str, Any] = {}  # set name -> (incremental wandb.Table, its metric columns)

    # ------------------------------------------------------------------------------------------------------------
    def key(self, name: str, set_name: str = "default") -> str:
        """The W&B key of one entry: ``<prefix>/<name>`` for the default set, else ``<prefix>/<set>/<name>``."""
        return f"{self.prefix}/{name}" if set_name in (None, "", "default") else f"{self.prefix}/{set_name}/{name}"

    def metric_definition(self, key: str, set_name: str = "default") -> dict[str, Any]:
        """The ``define_metric`` keyword arguments of one scalar key (see the class docstring)."""
        definition: dict[str, Any] = {}
        if self.step_key:
            definition["step_metric"] = self.step_key
        summary_prefix = self.key("summary", set_name) + "/"
        name = key[len(summary_prefix):] if key.startswith(summary_prefix) else None
        if name is not None and name in SUMMARY_MODES:
            definition["summary"] = SUMMARY_MODES[name]
        elif name is not None and name.startswith(SKIP_AT_CONSISTENCY) and "/" in name:
            definition["summary"] = SKIP_AT_CONSISTENCY_MODE
        else:
            definition.update(hidden=True, summary="none")
        return definition

    def define_metrics(self, logger_or_run: Any, keys: Iterable[str], set_name: str = "default") -> bool:
        """Declare the scalar keys not declared yet (hidden or visible, summary mode); call before logging them."""
        try:
            run = _resolve_run(logger_or_run)
            prefix = logger_prefix(logger_or_run)  # the keys as the logger writes them: WandbLogger(prefix=...)
            if self.step_key and self.step_key not in self._declared:
                run.define_metric(self.step_key)
                self._declared.add(self.step_key)
            for key in keys:
                if prefix + key not in self._declared and key != self.step_key:
                    # a '.' in a W&B metric name means nesting unless escaped (skip_at_consistency_0.99/...)
                    run.define_metric((prefix + key).replace(".", "\\."), **self.metric_definition(key, set_name))
                    self._declared.add(prefix + key)
            return True
        except Exception as error:
            self._warn_once("define_metrics", error)
            return False

    def log_config(self, logger_or_run: Any, probe_config: Any) -> bool:
        """Put the probe configuration (dict, dataclass or OmegaConf node) into ``run.config["ee_probe"]``."""
        try:
            run = _resolve_run(logger_or_run)
            run.config.update({"ee_probe": _plain_config(probe_config)}, allow_val_change=True)
            return True
        except Exception as error:
            self._warn_once("log_config", error)
            return False

    def log_probe(
        self,
        logger_or_run: Any,
        record: Mapping[str, Any],
        history: Sequence[Mapping[str, Any]] = (),
        set_name: str = "default",
    ) -> bool:
        """Log one probe (see the class docstring for the keys). ``history``: earlier records of this run.

        Records of ``history`` from another probe set are ignored; ``record`` replaces any of the same step.
        """
        try:
            run = _resolve_run(logger_or_run)
            row = self.probe_row(record, history, set_name)
            prefix = logger_prefix(logger_or_run)  # beside the logger's own keys, as its log_table would put them
            if row:
                run.log({key if key == self.step_key else prefix + key: value for key, value in row.items()})
            return True
        except Exception as error:
            self._warn_once("log_probe", error)
            return False

    def probe_row(
        self,
        record: Mapping[str, Any],
        history: Sequence[Mapping[str, Any]] = (),
        set_name: str = "default",
    ) -> dict[str, Any]:
        """The dict ``log_probe`` hands to ``run.log`` (the probe table grows by this record's rows)."""
        step = record.get("step")
        # by step, one record per step: the callback's history already holds a compact copy of this record
        same_set = [past for past in history if _set_of(past) == _set_of({"set": set_name})]
        records = ordered_records([*same_set, record])
        row: dict[str, Any] = {}
        table = self._grow_table(record, set_name)
        if table is not None:
            row[self.key("table", set_name)] = table
        charts = {f"charts/{metric}": self.layer_chart(records, metric, set_name) for metric in self.layer_charts}
        charts["charts/layer_profile"] = self.profile_chart(record, set_name)
        charts["charts/tradeoff"] = self.tradeoff_chart(record, set_name)
        for name, chart in charts.items():
            if chart is not None:
                row[self.key(name, set_name)] = chart
        if self.wandb_images:
            row.update(self._images(record, records, set_name))
        if row and self.step_key and isinstance(step, int) and not isinstance(step, bool):
            row[self.step_key] = step
        return row

    # ------------------------------------------------------------------------------------------------------------
    # the pieces of a probe row
    def layer_table(self, record: Mapping[str, Any], metrics: Sequence[str] | None = None):
        """A fresh (immutable) ``wandb.Table`` of one record's per-layer figures, or None when it has no layers."""
        import wandb

        rows = self.table_rows(record, metrics)
        if not rows:
            return None
        return wandb.Table(columns=["step", "layer", *(metrics or layer_metric_names([record]))], data=rows)

    @staticmethod
    def table_rows(record: Mapping[str, Any], metrics: Sequence[str] | None = None) -> list[list[Any]]:
        """``[step, layer, *metrics]`` per layer of the record (non-finite values: None)."""
        rows = layer_rows(record)
        metrics = list(metrics) if metrics is not None else layer_metric_names([record])
        return [[record.get("step"), layer, *(_cell(rows[layer].get(metric)) for metric in metrics)]
                for layer in sorted(rows)]

    def _grow_table(self, record: Mapping[str, Any], set_name: str):
        import wandb

        if not layer_rows(record):
            return None
        if set_name not in self._tables:
            metrics = layer_metric_names([record])
            if _supports_incremental_tables():
                table = wandb.Table(columns=["step", "layer", *metrics], log_mode="INCREMENTAL")
            else:  # an older wandb: a new table per probe
                table = None
            self._tables[set_name] = (table, metrics)
        table, metrics = self._tables[set_name]
        if table is None:
            return self.layer_table(record, metrics)
        for values in self.table_rows(record, metrics):
            table.add_data(*values)
        return table

    def layer_chart(self, records: Sequence[Mapping[str, Any]], metric: str, set_name: str = "default"):
        """``wandb.plot.line_series``: ``metric`` over probe steps, one line per layer; None without data."""
        import wandb

        points = _spread([record for record in records if isinstance(record.get("step"), int)], self.max_chart_points)
        per_record = [layer_rows(record) for record in points]
        layers = sorted({layer for rows in per_record for layer, entry in rows.items() if metric in entry})
        if not points or not layers:
            return None
        data = [[record["step"], f"layer_{layer:02d}", _cell(rows[layer].get(metric)) if layer in rows else None]
                for layer in layers for record, rows in zip(points, per_record)]
        suffix = "" if set_name in (None, "", "default") else f" ({set_name})"
        # what wandb.plot.line_series draws (its Vega spec and columns), from a table built in bulk
        return wandb.plot_table(
            "wandb/lineseries/v0", _bulk_table(["step", "lineKey", "lineVal"], data),
            {"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"},
            {"title": f"{metric} per layer{suffix}", "xname": self.step_key or "step"}, split_table=True,
        )

    def profile_chart(self, record: Mapping[str, Any], set_name: str = "default"):
        """``wandb.plot.line``: ``profile_metrics`` (one line each) against the layer, at this probe."""
        import wandb

        rows = layer_rows(record)
        cells = [[layer, metric, _cell(rows[layer].get(metric))] for metric in self.profile_metrics
                 for layer in sorted(rows)]
        data = [cell for cell in cells if cell[2] is not None]
        if not data:
            return None
        table = _bulk_table(["layer", "metric", "value"], data)
        suffix = "" if set_name in (None, "", "default") else f", {set_name}"
        return wandb.plot.line(table, "layer", "value", stroke="metric",
                               title=f"layer profile (step {record.get('step')}{suffix})", split_table=True)

    def tradeoff_chart(self, record: Mapping[str, Any], set_name: str = "default"):
        """``wandb.plot.line``: skip vs consistency per exit rule (one point per threshold), at this probe."""
        import wandb

        data = []
        for rule, points in (record.get("curves") or {}).items():
            for point in points or []:
                if not isinstance(point, Mapping):
                    continue
                skip, consistency = _cell(point.get("skip")), _cell(point.get("consistency"))
                if skip is not None and consistency is not None:
                    data.append([str(rule), _cell(point.get("threshold")), skip, consistency, _cell(point.get("acc"))])
        if not data:
            return None
        table = _bulk_table(["rule", "threshold", "skip", "consistency", "acc"], data)
        suffix = "" if set_name in (None, "", "default") else f", {set_name}"
        return wandb.plot.line(table, "skip", "consistency", stroke="rule",
                               title=f"exit trade-off: skip vs consistency (step {record.get('step')}{suffix})",
                               split_table=True)

    def _images(self, record, records, set_name) -> dict[str, Any]:
        """The matplotlib pictures of ``wandb_images=True`` (drawn only then: they cost more than the probe)."""
        import wandb

        from ee_callbacks import plotting

        step = record.get("step")
        caption = f"step {step}" + ("" if set_name in (None, "", "default") else f", probe set {set_name}")
        plots = {
            "heatmap_agree": plotting.heatmap(records, "agree", title="agree with final layer"),
            "heatmap_kl": plotting.heatmap(records, "kl", title="KL(final ‖ layer), nats"),
            "tradeoff": plotting.tradeoff_curves(record),
            "cka": plotting.cka_heatmap(record),
        }
        images = {}
        for name, plot in plots.items():
            if plot is not None:
                images[self.key(name, set_name)] = wandb.Image(plot.to_pil(self.image_dpi), caption=caption)
                plot.close()
        return images

    # ------------------------------------------------------------------------------------------------------------
    def log_artifact(
        self,
        logger_or_run: Any,
        jsonl_path: str | Path,
        heads_dir: str | Path | None = None,
        status: str = "finished",
    ) -> Any | None:
        """Log the JSONL (and the exit-heads directory) as an ``ee-probes`` artifact; returns it, or None on failure.

        ``status`` (``finished``, ``failed``) goes into the metadata; the aliases are ``latest`` and
        ``step-<last probe step>``.
        """
        try:
            import wandb

            run = _resolve_run(logger_or_run)
            jsonl_path = Path(jsonl_path)
            if not jsonl_path.is_file():
                raise FileNotFoundError(f"probe records not found at {jsonl_path}")
            metadata = artifact_metadata(jsonl_path, status)
            artifact = wandb.Artifact(
                name=f"{self.prefix}-probes-{run.id}",
                type=self.ARTIFACT_TYPE,
                description="Early-exit probe records (one JSON object per probe) and exit heads, from ee_callbacks.",
                metadata=metadata,
            )
            artifact.add_file(str(jsonl_path), name="ee_probes.jsonl")
            if heads_dir is not None:
                heads_dir = Path(heads_dir)
                if not heads_dir.is_dir():
                    raise FileNotFoundError(f"exit-heads directory not found at {heads_dir}")
                artifact.add_dir(str(heads_dir), name="exit_heads")
            aliases = ["latest"]
            if metadata["steps"]:
                aliases.append(f"step-{metadata['steps'][-1]}")
            run.log_artifact(artifact, aliases=aliases)
            return artifact
        except Exception as error:
            self._warn_once("log_artifact", error)
            return None

    # ------------------------------------------------------------------------------------------------------------
    def _warn_once(self, method: str, error: Exception) -> None:
        kind = (method, type(error).__name__)
        if kind in self._warned:
            log.debug("W&B extras: %s failed again: %r", method, error)
            return
        self._warned.add(kind)
        warnings.warn(
            f"ee_callbacks W&B extras: {method} failed ({type(error).__name__}: {error}); training goes on. "
            "Further failures of this kind are not reported.",
            RuntimeWarning,
            stacklevel=3,
        )


def artifact_metadata(jsonl_path: str | Path, status: str = "finished") -> dict[str, Any]:
    """What the ``ee-probes`` artifact says about its records: status, count, probe steps, sets, model, probe set."""
    from ee_callbacks.records import read_records

    with warnings.catch_warnings():  # a torn last line of a crashed run is expected here
        warnings.simplefilter("ignore")
        records = read_records(jsonl_path)
    steps = sorted({record["step"] for record in records if isinstance(record.get("step"), int)})
    last = records[-1] if records else {}
    probes = {}
    for record in records:
        if isinstance(record.get("probe"), Mapping):
            probes[_set_of(record)] = dict(record["probe"])
    return {
        "status": status,
        "records": len(records),
        "steps": steps,
        "sets": sorted({_set_of(record) for record in records}),
        "model": dict(last.get("model") or {}),
        "probe": probes,
        "schema": last.get("schema"),
    }


def _resolve_run(logger_or_run: Any) -> Any:
    """A wandb run from a Lightning WandbLogger (``.experiment``) or a run."""
    if logger_or_run is None:
        raise ValueError("no W&B run: got None (pass a WandbLogger or a wandb run)")
    run = logger_or_run.experiment if hasattr(logger_or_run, "experiment") else logger_or_run
    if not callable(getattr(run, "log", None)):
        raise TypeError(f"expected a Lightning WandbLogger or a wandb run, got {type(logger_or_run).__name__}")
    return run


def logger_prefix(logger_or_run: Any) -> str:
    """What a Lightning logger puts before every key it logs: ``"exp-"`` for ``WandbLogger(prefix="exp")``, else
    ``""`` (a bare wandb run has none). Lightning adds it in ``log_metrics`` (``trainer/global_step`` excepted)."""
    prefix = getattr(logger_or_run, "_prefix", None) if hasattr(logger_or_run, "experiment") else None
    if not isinstance(prefix, str) or not prefix:
        return ""
    return prefix + str(getattr(logger_or_run, "LOGGER_JOIN_CHAR", "-"))


def _bulk_table(columns: list[str], rows: list[list[Any]]):
    """A ``wandb.Table`` of many rows without wandb's per-row type check (≈ 50 µs a row, 3 300 rows per chart at
    32 layers × 100 probes): column types come from the first row without nulls, every column may hold null."""
    import wandb

    seed = next((row for row in rows if all(value is not None for value in row)), rows[0])
    table = wandb.Table(columns=columns, data=[seed])
    table.data = [list(row) for row in rows]
    return table


def _supports_incremental_tables() -> bool:
    import wandb

    return "log_mode" in inspect.signature(wandb.Table.__init__).parameters


def _spread(records: Sequence[Mapping[str, Any]], limit: int) -> list[Mapping[str, Any]]:
    """At most ``limit`` records, evenly spaced over the list, first and last always kept."""
    if len(records) <= limit:
        return list(records)
    last = len(records) - 1
    picks = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [records[i] for i in picks]


def _set_of(record: Mapping[str, Any]) -> str:
    name = record.get("set")
    return "default" if name in (None, "") else str(name)


def _cell(value: Any) -> float | None:
    number = as_float(value)
    return None if math.isnan(number) else number


def _plain_config(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, (DictConfig, ListConfig)):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # omegaconf is a dependency, but the extras should not need it
        pass
    if isinstance(config, Mapping):
        return {str(key): _plain_config(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [_plain_config(value) for value in config]
    if isinstance(config, Path):
        return str(config)
    return config
