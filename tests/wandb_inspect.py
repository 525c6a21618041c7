"""What W&B itself reads from an offline run: ``wandb leet inspect --json`` (wandb ≥ 0.31), for the tests.

No ``.wandb`` parsing here: wandb's own tool decodes the transaction log into JSON lines (one per record:
``{"num", "type", <type>: {...}}``) and ``--summary --json`` into the run's final state. Nested config and media keys
come out dotted (``_wandb.visualize.<chart key>``, ``ee/table._type``).
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def wandb_file(path: str | Path) -> Path:
    """The one ``run-*.wandb`` file under ``path`` (a .wandb file, a run directory or a save_dir)."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("run-*.wandb"))
    found = [file for file in found if "latest-run" not in file.parts]
    if len(found) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {path}, found {[str(f) for f in found]}")
    return found[0]


def leet(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wandb leet inspect {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


@dataclass
class InspectedRun:
    """An offline run as ``wandb leet inspect`` shows it."""

    file: Path
    records: list[dict[str, Any]]
    state: dict[str, Any]  # the --summary --json object: state, exit_code, summary, config, ...
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        for record in self.records:
            kind = record.get("type")
            body = record.get(kind) or {}
            if kind == "history":
                self.history.append(body.get("item", {}))
            elif kind == "metric":
                self.metrics.append(body)
            elif kind in ("config", "run"):
                self.config.update((body.get("config") if kind == "run" else body).get("update") or {})
            elif kind == "artifact":
                metadata = body.get("metadata")
                self.artifacts.append({
                    "name": body.get("name"), "type": body.get("type"), "aliases": body.get("aliases", []),
                    "metadata": json.loads(metadata) if isinstance(metadata, str) else metadata,
                    "entries": sorted(entry["path"] for entry in body.get("manifest", {}).get("contents", [])),
                })

    @property
    def run_dir(self) -> Path:
        return self.file.parent

    @property
    def summary(self) -> dict[str, Any]:
        return self.state.get("summary", {})

    @property
    def charts(self) -> dict[str, dict[str, Any]]:
        """Custom charts (``_wandb.visualize.<key>``) by key: the interactive panels of the workspace."""
        head = "_wandb.visualize."
        return {key[len(head):]: value for key, value in self.config.items() if key.startswith(head)}

    def definition(self, key: str) -> dict[str, Any]:
        """The merged ``define_metric`` options of a key: its exact definitions win over globs (as in wandb).

        A ``.`` in a W&B metric name means nesting; a literal dot is written ``\\.``, matched here as a dot.
        """
        merged: dict[str, Any] = {}
        exact = [m for m in self.metrics if m.get("name", "").replace("\\.", ".") == key]  # '\.': a literal dot
        globs = [m for m in self.metrics if m.get("glob_name") and fnmatch.fnmatchcase(key, m["glob_name"])]
        for metric in globs + exact:
            for name, value in metric.items():
                if isinstance(value, dict) and isinstance(merged.get(name), dict):
                    merged[name] = {**merged[name], **value}
                else:
                    merged[name] = value
        return merged

    def hidden(self, key: str) -> bool:
        return bool(self.definition(key).get("options", {}).get("hidden"))

    def scalar_keys(self, prefix: str = "") -> set[str]:
        """History keys under ``prefix`` with a number value (media/table fields left out)."""
        keys = set()
        for row in self.history:
            for key, value in row.items():
                if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if not any(f"{media}." in key for media in self.media_keys()):
                        keys.add(key)
        return keys

    def media_keys(self) -> set[str]:
        """Keys logged as media (tables, images): their history rows carry ``<key>._type``."""
        return {key[: -len("._type")] for row in self.history for key in row if key.endswith("._type")}

    def visible_scalar_keys(self, prefix: str = "") -> set[str]:
        return {key for key in self.scalar_keys(prefix) if not self.hidden(key)}

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row or f"{key}._type" in row]

    def table_file(self, row: dict[str, Any], key: str) -> dict[str, Any]:
        """The JSON of the table file a history row logged under ``key`` (``columns``, ``data``)."""
        return json.loads((self.run_dir / "files" / row[f"{key}.path"]).read_text())

    def media_file(self, row: dict[str, Any], key: str) -> Path:
        return self.run_dir / "files" / row[f"{key}.path"]


def inspect_run(path: str | Path) -> InspectedRun:
    """Read a finished offline run back with ``wandb leet inspect --json`` (records) and ``--summary --json``."""
    file = wandb_file(path)
    records = [json.loads(line) for line in leet("--json", str(file)).splitlines() if line.strip()]
    state = json.loads(leet("--summary", "--json", str(file)))
    return InspectedRun(file=file, records=records, state=state)
