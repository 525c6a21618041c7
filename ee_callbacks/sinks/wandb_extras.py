"""Weights & Biases extras for the early-exit probe: per-layer tables, heatmaps, trade-off curves, CKA, artifacts.

The scalars (``ee/<metric>/layer_<ℓ>``, ``ee/summary/<name>``) go through every Lightning logger (DESIGN §5); this
module adds what only W&B can show. It never raises: W&B trouble must not stop training (see :class:`WandbExtras`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from ee_callbacks import plotting

log = logging.getLogger(__name__)

# Lightning's WandbLogger logs every row with this key and declares it the x axis of all charts
# (define_metric("*", step_metric="trainer/global_step")), so rows carrying it line up with Lightning's scalars.
LIGHTNING_STEP_KEY = "trainer/global_step"


class WandbExtras:
    """Logs early-exit probe results to a W&B run as tables, images, summary values and an artifact.

    Every method takes a Lightning ``WandbLogger`` (its ``.experiment`` is used) or a ``wandb`` run. The caller runs
    them on global rank zero only. Every method catches its own exceptions, warns once per kind of failure and
    returns ``False``; it returns ``True`` when the data was handed to W&B.

    Keys below are for ``prefix="ee"`` and the probe set ``"default"``; for another probe set the set name follows
    the prefix (``ee/<set>/table``, ``ee/<set>/final/eas``, ...).

    ``log_probe`` — one ``run.log`` row per probe, committed on its own, without ``step=`` (W&B's own step counter
    keeps counting rows; the probe's training step travels in ``trainer/global_step`` and in every caption):

    * ``ee/table`` — ``wandb.Table`` of this probe, one row per layer; columns ``step``, ``layer`` and every
      per-layer metric present (``agree, acc, ce, kl, entropy, max_prob, margin, logit_cos, logit_corr,
      hidden_cos_final, block_influence``, then any extra, sorted); null/non-finite values are empty cells.
    * ``ee/heatmap_agree`` — image: ``agree`` per layer × probe step over the history so far (redrawn each probe).
    * ``ee/heatmap_kl`` — image: ``kl`` (nats) per layer × probe step over the history so far.
    * ``ee/tradeoff`` — image: exit trade-off of this probe, skip vs consistency, one line per rule.
    * ``ee/cka`` — image: linear CKA between layers at this probe.
    * ``trainer/global_step`` — the probe's training step (Lightning's x axis; ``step_key``, None leaves it out).

    An entry whose data is missing from the record is left out of the row.

    ``log_final`` — into ``run.summary``: ``ee/final/step``, ``ee/final/<name>`` for every numeric summary value of
    the record (per-rule dicts flattened: ``ee/final/skip_at_consistency_0.99/max_prob``) and
    ``ee/final/agree/layer_<ℓ:02d>`` for its agreement per layer.

    ``log_config`` — the probe configuration into ``run.config["ee_probe"]``.

    ``log_artifact`` — the JSONL (``ee_probes.jsonl`` inside) and, when given, the exit-heads directory
    (``exit_heads/`` inside) as an artifact named ``ee-probes-<run id>`` of type ``ee-probes``.
    """

    ARTIFACT_TYPE = "ee-probes"

    def __init__(self, prefix: str = "ee", step_key: str | None = LIGHTNING_STEP_KEY, image_dpi: int = 90):
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty string without a trailing '/', got {prefix!r}")
        if step_key is not None and not isinstance(step_key, str):
            raise ValueError(f"step_key must be a string or None, got {step_key!r}")
        self.prefix = prefix
        self.step_key = step_key
        self.image_dpi = int(image_dpi)
        self._warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------------------------------------------------
    def key(self, name: str, set_name: str = "default") -> str:
        """The W&B key of one entry: ``<prefix>/<name>`` for the default set, else ``<prefix>/<set>/<name>``."""
        return f"{self.prefix}/{name}" if set_name in (None, "", "default") else f"{self.prefix}/{set_name}/{name}"

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

        Records of ``history`` from another probe set are ignored; ``record`` is added when it is not in it yet.
        """
        try:
            run = _resolve_run(logger_or_run)
            row = self.probe_row(record, history, set_name)
            if row:
                run.log(row)
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
        """The dict ``log_probe`` hands to ``run.log``."""
        import wandb

        step = record.get("step")
        caption = f"step {step}" + ("" if set_name in (None, "", "default") else f", probe set {set_name}")
        records = [past for past in history if _set_of(past) == _set_of({"set": set_name})]
        if not any(past is record for past in records):
            records.append(record)
        row: dict[str, Any] = {}

        table = self.layer_table(record)
        if table is not None:
            row[self.key("table", set_name)] = table
        plots = {
            "heatmap_agree": plotting.heatmap(records, "agree", title="agree with final layer"),
            "heatmap_kl": plotting.heatmap(records, "kl", title="KL(final ‖ layer), nats"),
            "tradeoff": plotting.tradeoff_curves(record),
            "cka": plotting.cka_heatmap(record),
        }
        for name, plot in plots.items():
            if plot is not None:
                row[self.key(name, set_name)] = wandb.Image(plot.to_pil(self.image_dpi), caption=caption)
                plot.close()
        if row and self.step_key and isinstance(step, int) and not isinstance(step, bool):
            row[self.step_key] = step
        return row

    def layer_table(self, record: Mapping[str, Any]):
        """``wandb.Table`` of one record's per-layer figures, or None when the record has no layers."""
        import wandb

        rows = plotting.layer_rows(record)
        if not rows:
            return None
        metrics = plotting.layer_metric_names([record])
        columns = ["step", "layer", *metrics]
        data = []
        for layer in sorted(rows):
            values = [_table_cell(rows[layer].get(metric)) for metric in metrics]
            data.append([record.get("step"), layer, *values])
        return wandb.Table(columns=columns, data=data)

    def log_final(self, logger_or_run: Any, record: Mapping[str, Any], set_name: str = "default") -> bool:
        """Write the last probe's summary figures into ``run.summary`` (keys in the class docstring)."""
        try:
            run = _resolve_run(logger_or_run)
            run.summary.update(self.final_values(record, set_name))
            return True
        except Exception as error:
            self._warn_once("log_final", error)
            return False

    def final_values(self, record: Mapping[str, Any], set_name: str = "default") -> dict[str, Any]:
        """The dict ``log_final`` puts into ``run.summary``."""
        base = self.key("final", set_name)
        values: dict[str, Any] = {}
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            values[f"{base}/step"] = step
        summary = record.get("summary")
        if isinstance(summary, Mapping):
            for name, value in plotting.flatten_numbers(summary):
                number = plotting.as_float(value)
                if not math.isnan(number):
                    values[f"{base}/{name}"] = value if isinstance(value, int) else number
        layers, agree = plotting.layer_profile(record, "agree")
        for layer, value in zip(layers, agree):
            if not math.isnan(value):
                values[f"{base}/agree/layer_{layer:02d}"] = float(value)
        return values

    def log_artifact(
        self, logger_or_run: Any, jsonl_path: str | Path, heads_dir: str | Path | None = None
    ) -> Any | None:
        """Log the JSONL (and the exit-heads directory) as an ``ee-probes`` artifact; returns it, or None on failure."""
        try:
            import wandb

            run = _resolve_run(logger_or_run)
            jsonl_path = Path(jsonl_path)
            if not jsonl_path.is_file():
                raise FileNotFoundError(f"probe records not found at {jsonl_path}")
            artifact = wandb.Artifact(
                name=f"{self.prefix}-probes-{run.id}",
                type=self.ARTIFACT_TYPE,
                description="Early-exit probe records (one JSON object per probe) and exit heads, from ee_callbacks.",
                metadata={"records": _count_lines(jsonl_path)},
            )
            artifact.add_file(str(jsonl_path), name="ee_probes.jsonl")
            if heads_dir is not None:
                heads_dir = Path(heads_dir)
                if not heads_dir.is_dir():
                    raise FileNotFoundError(f"exit-heads directory not found at {heads_dir}")
                artifact.add_dir(str(heads_dir), name="exit_heads")
            run.log_artifact(artifact)
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


def _resolve_run(logger_or_run: Any) -> Any:
    """A wandb run from a Lightning WandbLogger (``.experiment``) or a run."""
    if logger_or_run is None:
        raise ValueError("no W&B run: got None (pass a WandbLogger or a wandb run)")
    run = logger_or_run.experiment if hasattr(logger_or_run, "experiment") else logger_or_run
    if not callable(getattr(run, "log", None)):
        raise TypeError(f"expected a Lightning WandbLogger or a wandb run, got {type(logger_or_run).__name__}")
    return run


def _set_of(record: Mapping[str, Any]) -> str:
    name = record.get("set")
    return "default" if name in (None, "") else str(name)


def _table_cell(value: Any) -> float | None:
    number = plotting.as_float(value)
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


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())
