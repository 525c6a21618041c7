"""run_probe against the per-token float64 reference of tests/probe_reference.py, for the figures that the lens
reference of test_probe_metrics.py leaves out: margin/entropy/patience exit curves (entropy/ln V), saturation_frac,
cka_drift, every exit-head metric, every eas_similarity option, max_tokens, min_exit_layer and dtype."""

import copy
import math

import numpy as np
import pytest
import torch

from ee_callbacks import ProbeConfig, run_probe
from tests import probe_reference as ref
from tests.probe_fixture_cases import _batches, _heads, _llama, perturbed

MIN_EXIT, MAX_TOKENS = 2, 40


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture(scope="module")
def table(model):
    return ref.TokenTable(model, _batches(), max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def heads(model):
    return _heads(model)


@pytest.fixture(scope="module")
def record(model, heads):
    config = {"min_exit_layer": MIN_EXIT, "max_tokens": MAX_TOKENS, "patience": (1, 2, 3), "chunk_tokens": 9,
              "thresholds": {"max_prob": [0.2, 0.5, 0.8], "margin": [0.05, 0.2, 0.5], "entropy": [0.2, 0.4, 0.7]}}
    return run_probe(model, _batches(), config=config, readouts=heads).to_dict()


def test_max_tokens_keeps_the_first_tokens_in_batch_order(record, table):
    assert record["probe"]["tokens"] == table.n == MAX_TOKENS
    for layer in range(table.L + 1):
        assert record["layers"][layer]["ce"] == pytest.approx(table.lens("ce", layer), abs=2e-5)


@pytest.mark.parametrize("rule, score, higher", [
    ("max_prob", "max_prob", True), ("margin", "margin", True), ("entropy", "entropy_norm", False)])
def test_confidence_rule_curves_with_min_exit_layer(record, table, rule, score, higher):
    for point in record["curves"][rule]:
        lam = point["threshold"]
        fires = (lambda s: s >= lam) if higher else (lambda s: s <= lam)
        exits = ref.threshold_exits(table, lambda t, l: table.token_metric(score, table.logits[t][l], t), fires,
                                    MIN_EXIT)
        preds = [table.top1(t, e) for t, e in enumerate(exits)]
        skip, consistency, acc = ref.exit_point(exits, preds, table)
        assert (point["skip"], point["consistency"], point["acc"]) == pytest.approx((skip, consistency, acc), abs=1e-9)


def test_patience_curve_with_min_exit_layer(record, table):
    assert [p["threshold"] for p in record["curves"]["patience"]] == [1.0, 2.0, 3.0]
    for point in record["curves"]["patience"]:
        exits = ref.patience_exits(table, int(point["threshold"]), MIN_EXIT)
        preds = [table.top1(t, e) for t, e in enumerate(exits)]
        skip, consistency, acc = ref.exit_point(exits, preds, table)
        assert (point["skip"], point["consistency"], point["acc"]) == pytest.approx((skip, consistency, acc), abs=1e-9)


def test_saturation_frac_and_oracle_skip_with_min_exit_layer(record, table):
    layers = list(range(MIN_EXIT, table.L + 1))
    rows = {l: [table.top1(t, l) for t in range(table.n)] for l in layers}
    strict = ref.strict_saturation(rows, layers)
    assert record["summary"]["oracle_skip_strict"] == pytest.approx(1 - np.mean(strict) / table.L, abs=1e-12)
    for row in record["layers"]:
        want = sum(s == row["layer"] for s in strict) / table.n
        assert row["saturation_frac"] == pytest.approx(want, abs=1e-12), row["layer"]


def _head_rows(table, head, layer):
    """Per-token (top1, max_prob, metrics) of a logit head at one layer."""
    h = torch.tensor(np.stack([table.hidden[t][layer] for t in range(table.n)]), dtype=torch.float32)
    with torch.no_grad():
        return head.logits(h, layer).double().numpy()


@pytest.mark.parametrize("kind", ["tuned_lens", "linear", "mlp"])
def test_logit_head_metrics(record, table, heads, kind):
    head = heads[kind]
    rows = {r["layer"]: r for r in record["heads"][kind]}
    assert sorted(rows) == head.layers
    head_top1, head_conf = {}, {}
    for layer in head.layers:
        z = _head_rows(table, head, layer)
        for metric in ("agree", "acc", "ce", "kl", "max_prob", "logit_corr"):
            want = np.mean([table.token_metric(metric, z[t], t) for t in range(table.n)])
            assert rows[layer][metric] == pytest.approx(want, abs=2e-5), (kind, layer, metric)
        head_top1[layer] = list(np.argmax(z, axis=1))
        head_conf[layer] = [table.token_metric("max_prob", z[t], t) for t in range(table.n)]
    layers = list(range(MIN_EXIT, table.L + 1))
    # exit curve: the head's max_prob where it has a layer (0 elsewhere: never fires), the final layer always exits;
    # the prediction is the head's top-1 where it has a layer, the logit lens' elsewhere
    top1 = {l: head_top1.get(l, [table.top1(t, l) for t in range(table.n)]) for l in layers}
    for point in record["curves"][f"head_{kind}"]:
        lam = point["threshold"]
        exits = [next(l for l in layers if l == table.L or (l in head_conf and head_conf[l][t] >= lam))
                 for t in range(table.n)]
        preds = [top1[e][t] for t, e in enumerate(exits)]
        assert (point["skip"], point["consistency"], point["acc"]) == pytest.approx(
            ref.exit_point(exits, preds, table), abs=1e-9)
    strict = ref.strict_saturation(top1, layers)
    assert record["summary"][f"head_{kind}_oracle_skip_strict"] == pytest.approx(1 - np.mean(strict) / table.L)
    similarity = {l: rows[l]["logit_corr"] if l in rows else table.lens("logit_corr", l) for l in range(1, table.L + 1)}
    similarity[table.L] = 1.0
    assert record["summary"][f"head_{kind}_eas"] == pytest.approx(ref.eas(similarity, table.L, 0.5), abs=2e-5)


def test_confidence_head_metrics(record, table, heads):
    head = heads["confidence"]
    rows = {r["layer"]: r for r in record["heads"]["confidence"]}
    layers = list(range(MIN_EXIT, table.L + 1))
    assert sorted(rows) == [l for l in head.layers if l >= MIN_EXIT]
    conf = {}
    for layer in head.layers:
        h = torch.tensor(np.stack([table.hidden[t][layer] for t in range(table.n)]), dtype=torch.float32)
        with torch.no_grad():
            conf[layer] = head.confidence(h, layer).double().numpy()
    for layer, row in rows.items():
        agree = np.array([table.top1(t, layer) == table.top1(t, table.L) for t in range(table.n)], dtype=float)
        assert row["mean_conf"] == pytest.approx(conf[layer].mean(), abs=1e-6)
        assert row["lens_agree"] == pytest.approx(agree.mean(), abs=1e-12)
        assert row["mean_conf_when_agree"] == pytest.approx((conf[layer] * agree).sum() / agree.sum(), abs=1e-6)
    for point in record["curves"]["head_confidence"]:
        lam = point["threshold"]
        exits = [next(l for l in layers if l == table.L or (l in conf and conf[l][t] >= lam)) for t in range(table.n)]
        preds = [table.top1(t, e) for t, e in enumerate(exits)]
        assert (point["skip"], point["consistency"], point["acc"]) == pytest.approx(
            ref.exit_point(exits, preds, table), abs=1e-9)


@pytest.mark.parametrize("similarity", ["logit_corr", "logit_cos", "agree", "js", "hidden_cos_final"])
def test_every_eas_similarity(model, similarity):
    table = ref.TokenTable(model, _batches())
    got = run_probe(model, _batches(), config={"eas_similarity": similarity, "eas_alpha": 0.7}).to_dict()
    if similarity == "hidden_cos_final":
        values = {l: table.hidden_cos_final(l) for l in range(1, table.L + 1)}
    else:
        values = {l: table.lens(similarity, l) for l in range(1, table.L + 1)}
    assert got["summary"]["eas"] == pytest.approx(ref.eas(values, table.L, 0.7), abs=2e-5)
    assert got["summary"]["eas_similarity"] == similarity and got["summary"]["eas_alpha"] == 0.7


def test_cka_drift_weights_each_minibatch_by_its_size(model):
    """Drift over two minibatches of different sizes (33 and 13 tokens): Σ_b HSIC_1 / sqrt(Σ_b HSIC_1 · Σ_b HSIC_1)."""
    later = perturbed(model)
    config = {"cka_batch_tokens": 1000}
    first = run_probe(model, _batches(), config=config)
    second = run_probe(later, _batches(), config=config, previous=first.state).to_dict()
    before, after = ref.TokenTable(model, _batches()), ref.TokenTable(later, _batches())
    sizes = [33, 13]
    assert before.n == sum(sizes)
    for layer in range(before.L + 1):
        sums = np.zeros(3)
        start = 0
        for size in sizes:
            x = np.stack([before.hidden[t][layer] for t in range(start, start + size)])
            y = np.stack([after.hidden[t][layer] for t in range(start, start + size)])
            K, L = x @ x.T, y @ y.T
            sums += [ref.hsic1(K, L), ref.hsic1(K, K), ref.hsic1(L, L)]
            start += size
        assert second["cka_drift"][layer] == pytest.approx(sums[0] / math.sqrt(sums[1] * sums[2]), abs=1e-5), layer


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-9), ("bfloat16", 3e-2), ("float16", 5e-3)])
def test_readout_dtype(dtype, tolerance):
    model = _llama(seed=4, double=True)
    table = ref.TokenTable(model, _batches())
    got = run_probe(model, _batches(), config={"dtype": dtype}).to_dict()
    assert got["config"]["dtype"] == dtype
    for layer in range(table.L + 1):
        for metric in ("ce", "kl", "logit_corr", "max_prob"):
            want = table.lens(metric, layer)
            assert got["layers"][layer][metric] == pytest.approx(want, abs=tolerance, rel=tolerance), (layer, metric)


def test_a_readout_dtype_wider_than_the_model_reads_out_through_cast_weights():
    # a float32 model read out in float64 (weights cast per readout, the model untouched) equals its float32 readout
    model = _llama()
    wide = run_probe(model, _batches(), config={"dtype": "float64"}).to_dict()
    narrow = run_probe(model, _batches(), config={"dtype": "float32"}).to_dict()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert wide["config"]["dtype"] == "float64"
    for got, want in zip(wide["layers"], narrow["layers"]):
        for metric in ("ce", "kl", "agree", "logit_corr"):
            assert got[metric] == pytest.approx(want[metric], abs=1e-4), (got["layer"], metric)


@pytest.mark.parametrize("kwargs, match", [
    ({"spec_draft_lengths": [0]}, r"spec_draft_lengths must be integers ≥ 1"),
    ({"spec_draft_lengths": []}, r"spec_draft_lengths must be integers ≥ 1"),
    ({"cka_max_batches": -1}, r"cka_max_batches must be an integer ≥ 1 \(leave 'cka' out of metrics"),
    ({"cka_max_batches": 0}, r"cka_max_batches must be an integer ≥ 1"),
    ({"dtype": "float8"}, r"dtype must be one of \['float32', 'float64', 'bfloat16', 'float16'\]"),
])
def test_config_values_that_cannot_work_are_rejected_with_the_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbeConfig(**kwargs)


def test_exit_heads_drop_non_finite_tokens_like_the_logit_lens(model, heads):
    """A token whose final logits are NaN is left out of every token-level figure of the lens and of each head."""
    batches = _batches()

    def poison(module, args, output):
        output.logits[0, 4] = float("nan")

    handle = model.register_forward_hook(poison)
    try:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            bad = run_probe(model, batches[:1], readouts=heads).to_dict()
    finally:
        handle.remove()
    assert bad["probe"]["nonfinite_tokens"] == 1
    # the same figures from the probe set without that token: mask it out as padding-free "ignored" label
    labels = batches[0].clone()
    labels[0, 5] = -100
    clean = run_probe(model, [{"input_ids": batches[0], "labels": labels}], readouts=heads).to_dict()
    for key in ["oracle_skip_strict", "oracle_skip_lenient"] + [f"head_{k}_oracle_skip_strict" for k in heads
                                                                if k != "confidence"]:
        assert bad["summary"][key] == pytest.approx(clean["summary"][key], abs=1e-12), key
    for rule, curve in clean["curves"].items():
        for got, want in zip(bad["curves"][rule], curve):
            assert got == pytest.approx(want, abs=1e-12), rule
    # ... and out of every per-layer figure: an all-NaN readout's argmax (0) must not count as agreeing
    assert bad["probe"]["tokens"] == clean["probe"]["tokens"]
    for got, want in zip(bad["layers"], clean["layers"]):
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (want["layer"], key)


def test_a_diverged_model_is_reported_as_such_not_as_perfect_early_exit(model):
    """Every final logit NaN: no figure can be computed, so none is (an all-NaN argmax is 0 at every layer and used
    to count as agreeing), and the record says how many tokens were non-finite."""
    def poison(module, args, output):
        output.logits.fill_(float("nan"))

    handle = model.register_forward_hook(poison)
    try:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            rec = run_probe(model, _batches()[:1]).to_dict()
    finally:
        handle.remove()
    assert rec["probe"]["tokens"] == 0 and rec["probe"]["nonfinite_tokens"] > 0
    assert [row["agree"] for row in rec["layers"] if "agree" in row] == [None] * len(rec["layers"])
    assert rec["summary"]["oracle_skip_strict"] is None and rec["summary"]["eas"] is None
