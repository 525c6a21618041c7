"""The JSONL source of truth: append, torn lines, non-finite values, schema guard."""

import json
import math
import os

import pytest

from ee_callbacks import ProbeRecord, append_record, read_records


def test_append_and_read_round_trip(tmp_path):
    path = tmp_path / "run" / "ee_probes.jsonl"
    for step in (0, 10, 20):
        append_record(path, ProbeRecord(step=step, summary={"eas": 0.1 * step}))
    records = read_records(path)
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[2]["summary"]["eas"] == pytest.approx(2.0)
    assert records[0]["schema"] == 1 and records[0]["set"] == "default"
    assert read_records(tmp_path / "run") == records  # a run directory works too


def test_non_finite_values_become_null_with_one_warning(tmp_path):
    path = tmp_path / "ee_probes.jsonl"
    rec = ProbeRecord(step=1, layers=[{"layer": 0, "kl": math.nan, "ce": math.inf}], summary={"eas": -math.inf})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        append_record(path, rec)
    line = path.read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    data = json.loads(line)
    assert data["layers"][0]["kl"] is None and data["summary"]["eas"] is None


def test_torn_last_line_is_dropped_and_next_record_starts_fresh(tmp_path):
    path = tmp_path / "ee_probes.jsonl"
    append_record(path, ProbeRecord(step=0))
    with open(path, "a") as fh:
        fh.write('{"schema": 1, "step": 5, "lay')  # killed mid-write
    with pytest.warns(RuntimeWarning, match="does not parse"):
        assert [r["step"] for r in read_records(path)] == [0]
    append_record(path, ProbeRecord(step=5))  # the resumed run appends on a fresh line
    with pytest.warns(RuntimeWarning):
        assert [r["step"] for r in read_records(path)] == [0, 5]


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "ee_probes.jsonl"
    path.write_text(json.dumps({"schema": 99, "step": 0}) + "\n")
    with pytest.raises(ValueError, match="schema 99"):
        read_records(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_file_is_an_error(tmp_path):
    path = tmp_path / "ee_probes.jsonl"
    path.write_text("")
    path.chmod(0o400)
    with pytest.raises(OSError):
        append_record(path, ProbeRecord(step=0))


def test_unwritable_location_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory is needed: fails for root too
    with pytest.raises(OSError):
        append_record(blocker / "ee_probes.jsonl", ProbeRecord(step=0))
