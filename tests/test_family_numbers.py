"""run_probe's numbers against an independent float64 reference on many architectures (tests/family_reference.py).

For each family (tied and untied heads, LayerNorm with bias and RMSNorm, parallel residuals, OPT's final norm plus
``project_out`` and its post-LN variant, Gemma's scaled embeddings and final soft-cap, Cohere's and Granite's logit
scales, MoE, state-space models, a hand-written nanoGPT) and a probe set with right and left padding and labels
holding −100: every per-layer lens figure, the hidden-state similarities, the saturation layers, the oracle and
static skips, EAS and the max_prob and patience exit curves. Tolerances: 1e-4 relative on CE/KL/entropy (float32 against float64), exact counts of agree/acc and
exact saturation layers except on tokens whose top-2 logits are a float32 rounding apart (none were, at these seeds).
"""

import numpy as np
import pytest

from ee_callbacks import run_probe
from tests import probe_reference as ref
from tests.family_reference import (
    FAMILIES, build, near_ties, probe_batches, reference_table, relative_error, static_exit_layer,
)

RELATIVE = ("ce", "kl", "entropy")  # 1e-4 relative; below 1e-2 nats 1e-6 absolute (float32 rounding of a few nats)
ABSOLUTE = ("max_prob", "margin", "logit_cos", "logit_corr")  # probabilities and cosines: 1e-5 absolute


def measure(name: str) -> dict:
    """The largest deviation of the probe's record from the reference, per figure, for one family."""
    model = build(name)
    batches = probe_batches(left_padding=FAMILIES[name].left_padding)
    table = reference_table(name, model, batches)
    record = run_probe(model, batches).to_dict()
    L, n = table.L, table.n
    assert record["probe"]["tokens"] == n and record["model"]["n_layers"] == L
    rows = {row["layer"]: row for row in record["layers"]}
    assert sorted(rows) == list(range(L + 1)), "a row per layer, h_0 included"
    out = {metric: 0.0 for metric in RELATIVE + ABSOLUTE + ("agree", "acc", "hidden", "saturation", "skip")}
    ties = {layer: near_ties(table, layer) for layer in range(L + 1)}
    for layer, row in rows.items():
        for metric in RELATIVE:
            out[metric] = max(out[metric], relative_error(row[metric], table.lens(metric, layer), floor=1e-2))
        for metric in ABSOLUTE:
            out[metric] = max(out[metric], abs(row[metric] - table.lens(metric, layer)))
        for metric, allowed in (("agree", ties[layer] | ties[L]), ("acc", ties[layer])):
            miscount = abs(round(row[metric] * n) - round(table.lens(metric, layer) * n))
            assert miscount <= len(allowed), (name, layer, metric, miscount)
            out[metric] = max(out[metric], miscount)
        out["hidden"] = max(out["hidden"], abs(row["hidden_cos_final"] - table.hidden_cos_final(layer)),
                            abs(row["block_influence"] - table.block_influence(layer)) if layer else 0.0)
        assert (row["block_influence"] is None) == (layer == 0)
    # saturation over the exit candidates 1..L (DESIGN §3), oracle and static skips
    layers = list(range(1, L + 1))
    top1 = {layer: [table.top1(t, layer) for t in range(n)] for layer in layers}
    strict, lenient = ref.strict_saturation(top1, layers), ref.lenient_saturation(top1, layers)
    tied_tokens = set().union(*(ties[layer] for layer in layers))
    hist = np.bincount(strict, minlength=L + 1).tolist()
    out["saturation"] = sum(abs(a - b) for a, b in zip(record["saturation_hist"], hist)) / 2
    assert out["saturation"] <= len(tied_tokens), (name, record["saturation_hist"], hist)
    summary = record["summary"]
    for key, sat in (("oracle_skip_strict", strict), ("oracle_skip_lenient", lenient)):
        out["skip"] = max(out["skip"], abs(summary[key] - (1 - np.mean(sat) / L)))
    acc = {layer: table.lens("acc", layer) for layer in layers}
    if not tied_tokens:
        assert summary["static_skip_5pct"] == pytest.approx(1 - static_exit_layer(acc, L) / L, abs=1e-12)
    assert summary["final_ce"] == pytest.approx(table.lens("ce", L), rel=1e-4)
    similarity = {layer: table.lens("logit_corr", layer) for layer in layers}
    assert summary["eas"] == pytest.approx(ref.eas(similarity, L, 0.5), abs=1e-5)
    if not tied_tokens:
        out["exits"] = _exit_curve_error(record["curves"], table, layers)
    return out


def _exit_curve_error(curves: dict, table, layers: list) -> float:
    """Largest |Δ| over the (skip, consistency, acc) points of the default max_prob rule and patience curves."""
    worst = 0.0
    for point in curves["max_prob"]:
        exits = ref.threshold_exits(table, lambda t, l: table.token_metric("max_prob", table.logits[t][l], t),
                                    lambda score, lam=point["threshold"]: score >= lam, layers[0])
        want = ref.exit_point(exits, [table.top1(t, e) for t, e in enumerate(exits)], table)
        worst = max(worst, *(abs(g - w) for g, w in zip((point["skip"], point["consistency"], point["acc"]), want)))
    for point in curves["patience"]:
        exits = ref.patience_exits(table, int(point["threshold"]), layers[0])
        want = ref.exit_point(exits, [table.top1(t, e) for t, e in enumerate(exits)], table)
        worst = max(worst, *(abs(g - w) for g, w in zip((point["skip"], point["consistency"], point["acc"]), want)))
    return worst


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_probe_equals_the_float64_reference(name):
    got = measure(name)
    for metric in RELATIVE:
        assert got[metric] <= 1e-4, (name, metric, got[metric])
    for metric in ABSOLUTE + ("hidden",):
        assert got[metric] <= 1e-5, (name, metric, got[metric])
    assert got["skip"] <= 1e-12 or got["saturation"] > 0, (name, got)
    assert got.get("exits", 0.0) <= 1e-12, (name, got["exits"])


def _saved_family(path, name: str, rows) -> None:
    """``save_pretrained`` of a family's tiny model and of a word-level tokenizer whose word ``w<i>`` is token i."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.family_reference import V

    build(name).save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(path)
    (path / "probe.txt").write_text(" ".join(f"w{int(i)}" for i in rows.reshape(-1)))


def test_ee_analyze_on_a_saved_opt_directory_equals_run_probe_and_the_reference(tmp_path):
    """OPT (final norm registered before its layers, then project_out) saved with save_pretrained: ee-analyze's record
    equals run_probe's on the same tokens, and both equal the float64 reference."""
    import torch
    import transformers

    from ee_callbacks import read_records
    from ee_callbacks.analyze import main as analyze_main

    rows = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(5))
    _saved_family(tmp_path / "opt", "opt", rows)
    # 4 rows of 16 tokens: the whole text is the probe set, in order, one batch of 4
    assert analyze_main([str(tmp_path / "opt"), "--out", str(tmp_path / "out"), "--probe-text",
                         str(tmp_path / "opt" / "probe.txt"), "--seq-len", "16", "--probe-sequences", "4",
                         "--batch-size", "4", "--no-progress", "--logger", "none"]) == 0
    (analysed,) = read_records(tmp_path / "out" / "ee_probes.jsonl")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "opt").eval()
    direct = run_probe(model, [rows]).to_dict()
    assert analysed["model"]["parts"]["final_norm"] == "model.decoder.final_layer_norm,model.decoder.project_out"
    assert analysed["probe"]["tokens"] == direct["probe"]["tokens"] == 4 * 15
    for got, want in zip(analysed["layers"], direct["layers"], strict=True):
        assert got == pytest.approx(want, abs=1e-6), got["layer"]
    for key in ("oracle_skip_strict", "oracle_skip_lenient", "static_skip_5pct", "eas", "final_ce"):
        assert analysed["summary"][key] == pytest.approx(direct["summary"][key], abs=1e-9), key
    table = reference_table("opt", model, [rows])
    for row in analysed["layers"]:
        for metric in RELATIVE:
            assert relative_error(row[metric], table.lens(metric, row["layer"]), floor=1e-2) <= 1e-4, row["layer"]


def test_a_model_returning_the_last_positions_logits_only_is_refused_clearly():
    """nanoGPT's own forward computes logits for the last position only when called without targets."""
    from ee_callbacks.model_parts import ModelPartsError
    from tests.family_reference import NanoGPT

    class LastPositionOnly(NanoGPT):
        def forward(self, idx, targets=None):
            logits, loss = super().forward(idx, targets)
            return (logits if targets is not None else logits[:, [-1], :]), loss

    with pytest.raises(ModelPartsError, match="logits for the last position only .* at every position"):
        run_probe(LastPositionOnly().eval(), probe_batches())
