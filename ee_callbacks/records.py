"""The ProbeRecord (DESIGN §4) and its JSONL reader/writer — the source of truth of every figure.

One JSON object per probe, one per line. Non-finite numbers are written as ``null`` (with one warning per field
path), never as a crash. A torn last line (a run killed while writing) is detected by :func:`read_records`, dropped
with a warning, and :func:`append_record` starts the next record on a fresh line.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["SCHEMA_VERSION", "ProbeRecord", "append_record", "read_records", "sanitize"]

SCHEMA_VERSION = 1
_warned_paths: set = set()


def sanitize(obj: Any, path: str = "", bad: Optional[list] = None) -> Any:
    """Return a JSON-safe copy: tensors/numpy become lists or floats, non-finite floats become None."""
    if bad is None:
        bad = []
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        bad.append(path)
        return None
    if isinstance(obj, dict):
        return {str(k): sanitize(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v, f"{path}[]", bad) for v in obj]
    return str(obj)


@dataclass
class ProbeRecord:
    """One probe's results (DESIGN §4). ``to_dict()`` gives the JSON object written to ``ee_probes.jsonl``.

    ``state`` carries what the next probe needs (the CKA drift reference) and is never serialised.
    """

    step: int
    epoch: int = 0
    source: str = "train"
    checkpoint: Optional[str] = None
    set: str = "default"
    model: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    cka: Optional[list] = None
    cka_layers: Optional[list] = None
    cka_drift: Optional[list] = None
    angular: dict = field(default_factory=dict)
    saturation_hist: Optional[list] = None
    saturation_hist_lenient: Optional[list] = None
    heads: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    state: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = {
            "schema": SCHEMA_VERSION,
            "step": int(self.step),
            "epoch": int(self.epoch),
            "source": self.source,
            "checkpoint": self.checkpoint,
            "set": self.set,
            "run": self.run,
            "model": self.model,
            "probe": self.probe,
            "layers": self.layers,
            "summary": self.summary,
            "curves": self.curves,
            "cka": self.cka,
            "cka_layers": self.cka_layers,
            "cka_drift": self.cka_drift,
            "angular": self.angular,
            "saturation_hist": self.saturation_hist,
            "saturation_hist_lenient": self.saturation_hist_lenient,
            "heads": self.heads,
            "timing": self.timing,
            "config": self.config,
        }
        out.update(self.extra)
        bad: list = []
        clean = sanitize(out, bad=bad)
        new = sorted(set(bad) - _warned_paths)
        if new:
            _warned_paths.update(new)
            warnings.warn(f"ee_callbacks: non-finite values recorded as null at {new[:8]}", RuntimeWarning)
        return clean

    def layer_values(self, metric: str) -> list:
        return [row.get(metric) for row in self.layers]


def _as_dict(record: Union[ProbeRecord, dict]) -> dict:
    return record.to_dict() if isinstance(record, ProbeRecord) else sanitize(record)


def append_record(path: Union[str, os.PathLike], record: Union[ProbeRecord, dict], check_tail: bool = True) -> dict:
    """Append one record as a JSON line, flushed and fsynced. Returns the dict written.

    If the file ends in a torn line (no trailing newline), the new record starts on a fresh line so that it is never
    glued to the fragment. A writer that made the last append itself knows the file ends in a newline and passes
    ``check_tail=False`` (no read of the file at all). Raises OSError when the file cannot be written: a lost record
    must be seen.
    """
    data = _as_dict(record)
    line = json.dumps(data, allow_nan=False, separators=(",", ":"))
    path = Path(path)
    prefix = ""
    if check_tail:
        path.parent.mkdir(parents=True, exist_ok=True)
    if check_tail and path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                prefix = "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(prefix + line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return data


def read_records(path: Union[str, os.PathLike], *, set_name: Optional[str] = None) -> list:
    """Read every record of an ``ee_probes.jsonl`` file (or of the one inside a run directory).

    Lines that do not parse (a torn line from a killed run) are dropped with a warning. Records of an unknown newer
    schema raise ValueError. ``set_name`` keeps only the records of one probe set.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("ee_probes.jsonl"))
        if not found:
            raise FileNotFoundError(f"no ee_probes.jsonl under {path}")
        path = found[0]
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:  # bytes that are not UTF-8 fail their line only
        lines = fh.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: dropped a line that does not parse (torn write?)", RuntimeWarning)
            continue
        if not isinstance(rec, dict):
            warnings.warn(f"{path}:{number}: dropped a line that is not a JSON object", RuntimeWarning)
            continue
        schema = rec.get("schema", 1)
        if isinstance(schema, int) and schema > SCHEMA_VERSION:
            raise ValueError(
                f"{path}:{number} has schema {schema}; this ee_callbacks reads schema ≤ {SCHEMA_VERSION}: upgrade ee_callbacks to read it"
            )
        rec.setdefault("set", "default")
        if set_name is None or rec.get("set") == set_name:
            records.append(rec)
    return records
