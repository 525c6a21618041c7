"""Read back what an offline W&B run really logged, from its ``run-<id>.wandb`` file.

wandb ≥ 0.2x writes offline runs through ``wandb-core`` and keeps no ``wandb-summary.json``; the only complete
record of the run is ``<save_dir>/wandb/offline-run-*/run-<id>.wandb``. That file is a LevelDB-style log:

* a 7-byte file header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16, little-endian), format version ``0`` (uint8);
* then 32 KiB blocks (the header counts towards the first block). Each chunk has a 7-byte header —
  checksum (uint32 LE), length (uint16 LE), type (uint8) — followed by ``length`` data bytes. The checksum is the
  IEEE CRC-32 (``zlib.crc32``) of the type byte followed by the data, which is what wandb's writer computes, even
  though its own comments call it "crc32c" after LevelDB;
* a message that fits is one FULL (1) chunk; a longer one is FIRST (2), MIDDLE (3)…, LAST (4) chunks across blocks;
* a chunk header never straddles a block: when fewer than 7 bytes are left in a block they are zero padding.

Each reassembled message is a ``wandb.proto.wandb_internal_pb2.Record`` protobuf. This reader decodes the history,
summary, config, files and artifact records; ``iter_records`` yields every record for anything else.
"""

from __future__ import annotations

import json
import struct
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
SUPPORTED_VERSIONS = (0,)
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024

CHUNK_ZERO, CHUNK_FULL, CHUNK_FIRST, CHUNK_MIDDLE, CHUNK_LAST = range(5)


class WandbFileError(ValueError):
    """The file is not a W&B run log this reader understands (wrong header, unknown version, corrupt chunk)."""


@dataclass
class OfflineRun:
    """What one offline run logged.

    ``history``: one dict per committed ``run.log`` row, in order, with values decoded from JSON; a value logged as a
    nested dict (media, tables) is a nested dict here (``row["ee/table"]["path"]``).
    ``summary`` and ``config``: the final state after every update and removal (``_wandb`` internals included).
    ``files``: absolute paths of the files the run declared that are present under ``files/``, in order declared.
    ``artifacts``: one dict per logged artifact (``name``, ``type``, ``digest``, ``aliases``, ``metadata``,
    ``entries`` — the paths inside the artifact).
    """

    run_dir: Path
    wandb_file: Path
    run_id: str | None = None
    project: str | None = None
    display_name: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    producer: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the run's exit record was read (the run finished and its file was flushed)."""
        return self.exit_code is not None

    @property
    def files_dir(self) -> Path:
        return self.run_dir / "files"

    def media_paths(self, value: dict[str, Any]) -> list[Path]:
        """Local files of a logged media value: one for an image or table (``path``), several for a list of images
        (``images/separated`` values keep ``filenames``)."""
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return [self.files_dir / value["path"]]
        if isinstance(value, dict) and isinstance(value.get("filenames"), list):
            return [self.files_dir / name for name in value["filenames"]]
        raise KeyError(f"not a logged media value (no 'path' or 'filenames'): {value!r}")

    def media_path(self, value: dict[str, Any]) -> Path:
        """The local file of a logged image or table value."""
        paths = self.media_paths(value)
        if len(paths) != 1:
            raise KeyError(f"the value holds {len(paths)} files; use media_paths")
        return paths[0]

    def load_table(self, value: dict[str, Any]) -> dict[str, Any]:
        """The JSON of a logged ``wandb.Table`` (``{"columns": [...], "data": [[...], ...]}``)."""
        return json.loads(self.media_path(value).read_text(encoding="utf-8"))

    def column(self, key: str) -> list[Any]:
        """Values of one history key over the rows that have it."""
        return [row[key] for row in self.history if key in row]


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield every ``Record`` protobuf of a ``.wandb`` file, in order.

    Raises :class:`WandbFileError` for a bad header, an unknown format version, a checksum mismatch or a broken
    FIRST/MIDDLE/LAST sequence. A record cut off at the end of the file (a run still writing, or killed) is dropped
    with a warning.
    """
    from wandb.proto import wandb_internal_pb2

    for payload in _iter_payloads(Path(path)):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception as error:  # protobuf's DecodeError; a checksum-valid chunk that is not a Record
            raise WandbFileError(f"{path}: a log entry is not a wandb Record protobuf ({error})") from error
        yield record


def _iter_payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    _check_header(path, data)
    position = FILE_HEADER.size
    pending: bytearray | None = None  # data of a FIRST…MIDDLE sequence not yet closed by LAST
    while position < len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            position += left_in_block  # zero padding at the end of a block
            continue
        if position + CHUNK_HEADER.size > len(data):
            _warn_torn(path, position)
            return
        checksum, length, chunk_type = CHUNK_HEADER.unpack_from(data, position)
        start = position + CHUNK_HEADER.size
        if chunk_type == CHUNK_ZERO and length == 0 and checksum == 0:
            # Preallocated or padded space: nothing more in this block.
            position += left_in_block
            continue
        if length > left_in_block - CHUNK_HEADER.size:
            raise WandbFileError(f"{path}: chunk at byte {position} claims {length} bytes, more than its block holds")
        if start + length > len(data):
            _warn_torn(path, position)
            return
        payload = data[start : start + length]
        if zlib.crc32(payload, zlib.crc32(bytes([chunk_type]))) != checksum:
            raise WandbFileError(f"{path}: checksum mismatch in the chunk at byte {position}; the file is corrupt")
        position = start + length
        if chunk_type == CHUNK_FULL:
            if pending is not None:
                raise WandbFileError(f"{path}: FULL chunk at byte {start - 7} inside an unfinished record")
            yield bytes(payload)
        elif chunk_type == CHUNK_FIRST:
            if pending is not None:
                raise WandbFileError(f"{path}: FIRST chunk at byte {start - 7} inside an unfinished record")
            pending = bytearray(payload)
        elif chunk_type in (CHUNK_MIDDLE, CHUNK_LAST):
            if pending is None:
                raise WandbFileError(f"{path}: continuation chunk at byte {start - 7} without a FIRST chunk")
            pending += payload
            if chunk_type == CHUNK_LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown chunk type {chunk_type} at byte {start - 7}")
    if pending is not None:
        _warn_torn(path, position)


def _check_header(path: Path, data: bytes) -> None:
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes is too short for a W&B run file (header is 7 bytes)")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise WandbFileError(
            f"{path}: not a W&B run log: header {data[:6]!r}, expected {FILE_IDENT!r} + magic 0x{FILE_MAGIC:04X}"
        )
    if version not in SUPPORTED_VERSIONS:
        raise WandbFileError(
            f"{path}: unknown .wandb format version {version}; this reader knows version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Read it with the wandb release that wrote it "
            "(`wandb sync` to upload it), or extend ee_callbacks.sinks.wandb_reader."
        )


def _warn_torn(path: Path, position: int) -> None:
    warnings.warn(f"{path}: the last record (from byte {position}) is incomplete and was skipped", RuntimeWarning)


def find_wandb_file(path: str | Path) -> Path:
    """The ``.wandb`` file of a run: the file itself, a run directory, or a save dir with exactly one offline run."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    direct = sorted(path.glob("run-*.wandb"))
    if len(direct) == 1:
        return direct[0]
    if len(direct) > 1:
        raise WandbFileError(f"{path}: several .wandb files ({', '.join(p.name for p in direct)}); pass one of them")
    candidates = sorted(
        {found for pattern in ("offline-run-*/run-*.wandb", "wandb/offline-run-*/run-*.wandb", "**/run-*.wandb")
         for found in path.glob(pattern)}
    )
    if not candidates:
        raise FileNotFoundError(f"{path}: no run-*.wandb file found (looked for wandb/offline-run-*/run-*.wandb)")
    if len(candidates) > 1:
        listing = "\n  ".join(str(candidate) for candidate in candidates)
        raise WandbFileError(f"{path}: found {len(candidates)} runs; pass one run directory:\n  {listing}")
    return candidates[0]


def read_offline_run(path: str | Path, wait_s: float = 0.0) -> OfflineRun:
    """Decode a run's ``.wandb`` file into an :class:`OfflineRun` (``path``: as for :func:`find_wandb_file`).

    ``wait_s``: poll up to this many seconds until the run's exit record is in the file. ``wandb.finish()`` can return
    before wandb-core has flushed the file (seen with wandb 0.31 on a busy machine: only the 7-byte header was there),
    so a reader right after ``finish`` should wait. On time-out the run is returned as far as it was written, with a
    warning; ``run.complete`` tells whether the exit record was seen.
    """
    wandb_file = find_wandb_file(path)
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        finished = time.monotonic() >= deadline
        with warnings.catch_warnings():
            if not finished:
                warnings.simplefilter("ignore", RuntimeWarning)  # a torn tail is expected while it is being written
            run = _decode(wandb_file)
        if run.complete or finished:
            break
        time.sleep(0.05)
    if wait_s > 0 and not run.complete:
        warnings.warn(
            f"{wandb_file}: no exit record after {wait_s:g} s; the run is still running or was killed. "
            "Returning what was written so far.",
            RuntimeWarning,
            stacklevel=2,
        )
    return run


def _decode(wandb_file: Path) -> OfflineRun:
    run = OfflineRun(run_dir=wandb_file.parent, wandb_file=wandb_file)
    declared: list[str] = []
    for record in iter_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "header":
            run.producer = record.header.version_info.producer or None
        elif kind == "run":
            run.run_id = record.run.run_id or None
            run.project = record.run.project or None
            run.display_name = record.run.display_name or None
            _apply_updates(run.config, record.run.config.update, record.run.config.remove)
            _apply_updates(run.summary, record.run.summary.update, record.run.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _history_value(item))
            run.history.append(row)
        elif kind == "summary":
            _apply_updates(run.summary, record.summary.update, record.summary.remove)
        elif kind == "config":
            _apply_updates(run.config, record.config.update, record.config.remove)
        elif kind == "files":
            declared.extend(item.path for item in record.files.files)
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "digest": artifact.digest,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                    "entries": [entry.path for entry in artifact.manifest.contents],
                }
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    seen: set[str] = set()
    for relative in declared:
        local = run.files_dir / relative
        if relative not in seen and local.is_file():
            seen.add(relative)
            run.files.append(local)
    return run


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _decode_json(text: str) -> Any:
    # wandb writes non-finite floats as bare NaN/Infinity, which json.loads accepts.
    return json.loads(text)


def _history_value(item: Any) -> Any:
    if item.value_json:
        return _decode_json(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return _decode_json(item.json)
    return getattr(item, kind)


def _apply_updates(target: dict[str, Any], updates: Any, removals: Any) -> None:
    for item in updates:
        _set_path(target, _item_path(item), _decode_json(item.value_json) if item.value_json else None)
    for item in removals:
        path = _item_path(item)
        node: Any = target
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    node = target
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value
