"""The knobs that cut the probe's cost (issue 17 point 4), against the per-token float64 reference of
tests/probe_reference.py: a probed subset of layers (``ProbeConfig(layers=...)``) equals the full per-token table
restricted to that subset, the summary's standard errors equal numpy's ``std/sqrt(n)`` of the per-token values, and
bf16 readouts stay within their standard errors of float32."""

import math

import numpy as np
import pytest
import torch

from ee_callbacks import ProbeConfig, run_probe
from ee_callbacks.probe_config import resolve_layers
from ee_callbacks.readout_kernels import LogitLensReadout
from tests import probe_reference as ref
from tests.helpers import tiny_llama
from tests.probe_fixture_cases import V, _batches

SPEC, PROBED = "1+every:3+last:2", [1, 3, 5, 6]  # in a 6-block model
THRESHOLDS = [0.05, 0.1, 0.2, 0.5]


def _model():
    model = tiny_llama(vocab=V, layers=6, hidden=32, seed=5).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def table(model):
    return ref.TokenTable(model, _batches())


@pytest.fixture(scope="module")
def subset(model):
    config = {"layers": SPEC, "chunk_tokens": 11, "thresholds": {"max_prob": THRESHOLDS}, "patience": (1, 2),
              "consistency_levels": (0.85, 0.5)}
    return run_probe(model, _batches(), config=config).to_dict()


def _top1_rows(table, layers):
    return {l: [table.top1(t, l) for t in range(table.n)] for l in layers}


def test_layer_specs_resolve_and_bad_ones_say_what_to_write():
    assert resolve_layers(SPEC, 6) == PROBED
    assert resolve_layers("every:4+last:3", 30) == [4, 8, 12, 16, 20, 24, 28, 29, 30]
    assert resolve_layers([0, 2], 4) == [0, 2, 4]      # the final block is always probed
    assert resolve_layers(None, 3) == [0, 1, 2, 3]
    for bad in ("every:0", "every", "half", "last:x", [], [1.5], [-1], 3):
        with pytest.raises(ValueError, match=r"'every:k', 'last:m' and block indices, e.g. 'every:4\+last:3'"):
            ProbeConfig(layers=bad)
    with pytest.raises(ValueError, match=r"names block 9 but the model has blocks 0..6"):
        resolve_layers([9], 6)


def test_subset_rows_equal_the_full_table_restricted_to_the_subset(subset, table):
    assert [row["layer"] for row in subset["layers"]] == PROBED
    assert subset["summary"]["layers_probed"] == PROBED
    assert "a token exits only at a probed block" in subset["summary"]["layers_note"]
    for row in subset["layers"]:
        for metric in ("ce", "kl", "acc", "agree", "logit_corr", "max_prob"):
            assert row[metric] == pytest.approx(table.lens(metric, row["layer"]), abs=1e-5), (row["layer"], metric)


def test_subset_saturation_exits_and_eas_are_those_of_the_subset(subset, table):
    L, summary = table.L, subset["summary"]
    strict = ref.strict_saturation(_top1_rows(table, PROBED), PROBED)
    assert summary["oracle_skip_strict"] == pytest.approx(1 - np.mean(strict) / L, abs=1e-12)
    # a full probe would give a different (larger) oracle skip: the subset really is a subset
    full = ref.strict_saturation(_top1_rows(table, list(range(1, L + 1))), list(range(1, L + 1)))
    assert np.mean(full) != np.mean(strict)
    for point in subset["curves"]["max_prob"]:
        exits = [next((l for l in PROBED if table.token_metric("max_prob", table.logits[t][l], t) >= point["threshold"]),
                      L) for t in range(table.n)]
        assert set(exits) <= set(PROBED)
        skip, consistency, acc = ref.exit_point(exits, [table.top1(t, e) for t, e in enumerate(exits)], table)
        assert (point["skip"], point["consistency"], point["acc"]) == pytest.approx((skip, consistency, acc), abs=1e-9)
    for point in subset["curves"]["patience"]:  # counters run over consecutive probed blocks
        exits = []
        for t in range(table.n):
            run, exit_layer = 0, L
            for previous, layer in zip(PROBED, PROBED[1:]):
                run = run + 1 if table.top1(t, layer) == table.top1(t, previous) else 0
                if run >= point["threshold"]:
                    exit_layer = layer
                    break
            exits.append(exit_layer)
        skip, consistency, _ = ref.exit_point(exits, [table.top1(t, e) for t, e in enumerate(exits)], table)
        assert (point["skip"], point["consistency"]) == pytest.approx((skip, consistency), abs=1e-9)
    corr = {l: table.lens("logit_corr", l) for l in PROBED}
    want = np.mean([min(max(corr[l], 0), 1) ** 0.5 * ((L - l) / L) ** 0.5 for l in PROBED])
    assert summary["eas"] == pytest.approx(want, abs=1e-5)
    acc = {l: table.lens("acc", l) for l in PROBED}
    static = next(l for l in PROBED if acc[l] >= 0.95 * acc[L] - 1e-12)
    assert summary["static_exit_layer"] == static


def test_unprobed_blocks_get_no_readout(model, monkeypatch):
    seen = []
    original = LogitLensReadout.token_stats

    def counting(self, h, layer, *args, **kwargs):
        seen.append(layer)
        return original(self, h, layer, *args, **kwargs)

    monkeypatch.setattr(LogitLensReadout, "token_stats", counting)
    run_probe(model, _batches(), config={"layers": SPEC, "metrics": ("lens", "saturation")})
    assert sorted(set(seen)) == [1, 3, 5]  # the final block's statistics come with the model's own logits
    seen.clear()
    run_probe(model, _batches(), config={"metrics": ("lens", "saturation")})
    assert sorted(set(seen)) == [0, 1, 2, 3, 4, 5]


def _se(values):
    values = np.asarray(values, dtype=np.float64)
    return float(np.std(values) / math.sqrt(values.size))


def test_standard_errors_equal_numpy_std_over_sqrt_n(subset, table):
    L, stderr = table.L, subset["summary"]["stderr"]
    strict = ref.strict_saturation(_top1_rows(table, PROBED), PROBED)
    lenient = [next(l for l in PROBED if table.top1(t, l) == table.top1(t, L)) for t in range(table.n)]
    assert stderr["oracle_skip_strict"] == pytest.approx(_se([1 - s / L for s in strict]), rel=1e-9)
    assert stderr["oracle_skip_lenient"] == pytest.approx(_se([1 - s / L for s in lenient]), rel=1e-9)
    assert stderr["saturation_mean_strict"] == pytest.approx(_se(strict), rel=1e-9)
    ce = [table.token_metric("ce", table.logits[t][L], t) for t in range(table.n)]
    acc_final = [table.token_metric("acc", table.logits[t][L], t) for t in range(table.n)]
    assert stderr["final_ce"] == pytest.approx(_se(ce), rel=1e-5)
    assert stderr["final_acc"] == pytest.approx(_se(acc_final), rel=1e-9)
    static = subset["summary"]["static_exit_layer"]
    acc_static = [table.token_metric("acc", table.logits[t][static], t) for t in range(table.n)]
    assert stderr["static_exit_acc"] == pytest.approx(_se(acc_static), rel=1e-9)
    for level in (0.85, 0.5):
        best = subset["summary"][f"skip_at_consistency_{level:g}"]["max_prob"]
        point = next(p for p in subset["curves"]["max_prob"] if p["consistency"] >= level and p["skip"] == best)
        exits = [next((l for l in PROBED if table.token_metric("max_prob", table.logits[t][l], t) >= point["threshold"]),
                      L) for t in range(table.n)]
        want = _se([1 - e / L for e in exits])
        assert want > 0
        assert stderr[f"skip_at_consistency_{level:g}/max_prob"] == pytest.approx(want, rel=1e-9)


def test_bf16_readouts_stay_within_float32_standard_errors(model):
    config = {"thresholds": {"max_prob": THRESHOLDS}}
    wide = run_probe(model, _batches(), config={**config, "dtype": "float32"}).to_dict()
    narrow = run_probe(model, _batches(), config={**config, "dtype": "bfloat16"}).to_dict()
    assert narrow["config"]["dtype"] == "bfloat16"
    for got, want in zip(narrow["layers"], wide["layers"]):
        for metric in ("ce", "kl", "logit_corr", "max_prob"):
            assert got[metric] == pytest.approx(want[metric], abs=3e-2, rel=3e-2), (got["layer"], metric)
    for name in ("oracle_skip_strict", "oracle_skip_lenient", "final_acc"):
        error = wide["summary"]["stderr"][name]
        assert abs(narrow["summary"][name] - wide["summary"][name]) <= 2 * error, name
