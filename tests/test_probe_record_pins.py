"""The probe's records on fixed seeds equal the records pinned before the core was redesigned (every field, ~1e-6).

Fields listed in ``CHANGED_ON_PURPOSE`` differ from the pinned records because a defect was fixed; each entry says
which and why. Everything else must stay equal.
"""

import json
import math

import pytest

from tests.probe_fixture_cases import FIXTURE, cases, probe_twice

SPEC_FIX = ("summary.spec_",)  # issue 15: no bonus token, cost (k·E + L − E)/L; new spec_speedup_est_runs
# issue 15: per-minibatch 1/(n(n−3)) weighting of CKA drift; changes drift only where minibatches differ in size
# (here: 33 and 13 tokens, or 16 and 7; 'default' draws equal minibatches of 8 tokens and keeps its pinned drift)
DRIFT_FIX = ("cka_drift", "summary.cka_drift_mean") + tuple(f"layers[{i}].cka_drift" for i in range(5))
PARTS_PROOF = ("model.parts.proof",)  # issue 12: the record says how the model's parts were proven
CHANGED_ON_PURPOSE: dict = {"*": SPEC_FIX + PARTS_PROOF, "agree": DRIFT_FIX, "heads_js": DRIFT_FIX, "float64_cos": DRIFT_FIX}


def _differences(got, want, path="") -> list:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(want) | set(got), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in got:
                out.append(f"{where}: missing")
            elif key not in want:
                out.append(f"{where}: new field")
            else:
                out += _differences(got[key], want[key], where)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _differences(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
            return []
        return [f"{path}: {got!r} != {want!r}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


# issue 15: exit heads get every per-layer metric of the logit lens (new fields only; the old ones stay equal)
HEAD_NEW_FIELDS = (".entropy: new field", ".margin: new field", ".logit_cos: new field")


# issue 17: ProbeConfig(layers=...) (None by default) and the standard errors of the summary's means (new fields only)
ISSUE17_NEW_FIELDS = ("config.layers: new field", "summary.stderr: new field")


def _allowed(case: str, difference: str) -> bool:
    path = difference.split(":")[0]
    if difference in ISSUE17_NEW_FIELDS:
        return True
    if path.startswith("heads.") and difference.endswith(HEAD_NEW_FIELDS):
        return True
    return any(path.startswith(prefix) for prefix in CHANGED_ON_PURPOSE.get(case, ()) + CHANGED_ON_PURPOSE.get("*", ()))


@pytest.mark.parametrize("case", sorted(cases()))
def test_record_equals_pinned_record(case):
    pinned = json.loads(FIXTURE.read_text())[case]
    model, batches, kwargs = cases()[case]
    records = probe_twice(model, batches, kwargs)
    for probe_index, (got, want) in enumerate(zip(records, pinned)):
        differences = [d for d in _differences(got, want) if not _allowed(case, d)]
        assert not differences, f"{case} probe {probe_index}: {differences[:20]}"


def test_the_comparison_can_fail():
    assert _differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.001]}) == ["a[1]: 2.0 != 2.001"]
    assert _differences({"a": 1}, {"a": 1, "b": None}) == ["b: missing"]
