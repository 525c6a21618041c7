"""Saturation layers and simulated exit rules against hand-computed references."""

import math

import pytest
import torch

from ee_callbacks.metrics.exits import (
    best_skip_at_consistency,
    exit_index,
    exit_outcome_sums,
    finalize_curve,
    merge_sums,
    patience_counters,
    patience_exit_layers,
    static_exit,
    threshold_exit_layers,
)
from ee_callbacks.metrics.saturation import (
    first_true_index,
    oracle_skip,
    saturation_histogram,
    saturation_layers,
)

# columns = tokens, rows = layers 1..4 (the last row is the final layer)
TOP1 = torch.tensor([
    # t0 t1 t2 t3 t4
    [5, 1, 7, 1, 9],
    [5, 2, 2, 2, 9],
    [5, 3, 7, 3, 1],
    [5, 3, 7, 4, 9],
]).long()
STRICT = [1, 3, 3, 4, 4]   # t2: matches at 1, diverges at 2, matches again from 3 -> strict 3; t4 strict 4
LENIENT = [1, 3, 1, 4, 1]  # t2 and t4: lenient 1


def test_first_true_index_handles_empty_slices():
    mask = torch.tensor([[False, True, False], [True, True, False], [False, True, False]])
    assert first_true_index(mask, dim=0).tolist() == [1, 0, 3]
    assert first_true_index(mask, dim=1).tolist() == [1, 0, 1]


def test_saturation_strict_and_lenient():
    strict, lenient = saturation_layers(TOP1, torch.arange(1, 5))
    assert strict.tolist() == STRICT
    assert lenient.tolist() == LENIENT
    assert strict.dtype == torch.long and lenient.dtype == torch.long


def test_saturation_reports_block_indices_not_rows():
    strict, lenient = saturation_layers(TOP1, torch.tensor([0, 2, 4, 6]))
    assert strict.tolist() == [0, 4, 4, 6, 6]
    assert lenient.tolist() == [0, 4, 0, 6, 0]


def test_saturation_histogram_and_oracle_skip():
    strict, lenient = saturation_layers(TOP1, torch.arange(1, 5))
    assert saturation_histogram(strict, 4).tolist() == [0, 1, 0, 2, 2]
    assert saturation_histogram(lenient, 4).tolist() == [0, 3, 0, 1, 1]
    assert oracle_skip(strict, 4) == pytest.approx(1 - 3.0 / 4)     # mean strict = 15/5 = 3
    assert oracle_skip(lenient, 4) == pytest.approx(1 - 2.0 / 4)    # mean lenient = 10/5 = 2
    assert math.isnan(oracle_skip(torch.empty(0, dtype=torch.long), 4))
    with pytest.raises(ValueError, match="0..4"):
        saturation_histogram(torch.tensor([5]), 4)


def test_saturation_rejects_bad_layers():
    with pytest.raises(ValueError, match="strictly increasing"):
        saturation_layers(TOP1, torch.tensor([1, 3, 2, 4]))
    with pytest.raises(ValueError, match="rows"):
        saturation_layers(TOP1, torch.arange(1, 4))


# --- threshold rules -------------------------------------------------------------------------------------------

LAYERS = torch.tensor([2, 4, 6])
SCORE = torch.tensor([
    [0.9, 0.25, 0.5, 0.125],
    [0.95, 0.625, 0.375, 0.25],
    [0.99, 0.75, 0.5, 0.375],
])


def test_threshold_exit_max_prob_style():
    exits = threshold_exit_layers(SCORE, torch.tensor([0.5, 0.8]), LAYERS)
    # λ=0.5: t0 fires at row 0; t1 at row 1; t2 ties exactly at row 0; t3 never -> L=6
    # λ=0.8: only t0 fires
    assert exits.tolist() == [[2, 4, 2, 6], [2, 6, 6, 6]]
    assert exits.dtype == torch.long


def test_threshold_exit_chunking_matches():
    thresholds = torch.linspace(0.0, 1.0, 11)
    score = torch.rand(5, 37, generator=torch.Generator().manual_seed(0))
    layers = torch.tensor([1, 3, 5, 7, 8])
    full = threshold_exit_layers(score, thresholds, layers)
    chunked = threshold_exit_layers(score, thresholds, layers, chunk_tokens=4)
    assert torch.equal(full, chunked)
    # reference: explicit first-fire search
    for m, lam in enumerate(thresholds.tolist()):
        for t in range(score.shape[1]):
            rows = [k for k in range(5) if score[k, t] >= lam]
            assert full[m, t] == (layers[rows[0]] if rows else 8)


def test_threshold_exit_entropy_direction():
    entropy = torch.tensor([
        [2.0, 0.5, 3.0],
        [1.0, 0.25, 3.0],
        [0.25, 0.25, 2.0],
    ])
    exits = threshold_exit_layers(entropy, torch.tensor([0.5, 1.0]), LAYERS, higher_is_confident=False)
    # λ=0.5: t0 at row 2; t1 ties at row 0; t2 never. λ=1.0: t0 ties at row 1
    assert exits.tolist() == [[6, 2, 6], [4, 2, 6]]
    wrong_direction = threshold_exit_layers(entropy, torch.tensor([0.5, 1.0]), LAYERS)
    assert not torch.equal(wrong_direction, exits)


def test_threshold_exit_nan_never_fires():
    score = torch.tensor([[float("nan")], [0.9], [0.1]])
    assert threshold_exit_layers(score, torch.tensor([0.5]), LAYERS).tolist() == [[4]]


# --- patience ------------------------------------------------------------------------------------------------------

PATIENCE_TOP1 = torch.tensor([
    # t0 t1 t2 t3
    [3, 1, 1, 4],
    [3, 2, 2, 5],
    [3, 2, 3, 5],
    [3, 3, 4, 5],
    [3, 3, 5, 6],
])


def test_patience_counters():
    counters = patience_counters(PATIENCE_TOP1)
    assert counters.T.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 2, 0]]


def test_patience_exit_layers():
    layers = torch.arange(1, 6)
    assert patience_exit_layers(PATIENCE_TOP1, 1, layers).tolist() == [2, 3, 5, 3]
    assert patience_exit_layers(PATIENCE_TOP1, 2, layers).tolist() == [3, 5, 5, 4]
    assert patience_exit_layers(PATIENCE_TOP1, 0, layers).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="non-negative integer"):
        patience_exit_layers(PATIENCE_TOP1, -1, layers)


# --- outcomes and curves --------------------------------------------------------------------------------------------

OUT_TOP1 = torch.tensor([
    [1, 2, 3, 4],
    [1, 5, 3, 6],
    [1, 5, 7, 6],
])
OUT_LABELS = torch.tensor([1, 5, 3, 0])
OUT_EXITS = torch.tensor([[2, 2, 2, 2], [2, 4, 6, 4]])


def test_exit_index_and_errors():
    assert exit_index(OUT_EXITS, LAYERS).tolist() == [[0, 0, 0, 0], [0, 1, 2, 1]]
    with pytest.raises(ValueError, match="entries of layers"):
        exit_index(torch.tensor([3]), LAYERS)


def test_exit_outcome_sums_and_curve():
    sums = exit_outcome_sums(OUT_EXITS, OUT_TOP1, OUT_LABELS, LAYERS)
    assert sums["exit_sum"].tolist() == [8.0, 16.0]
    assert sums["consistent_sum"].tolist() == [1.0, 4.0]
    assert sums["correct_sum"].tolist() == [2.0, 2.0]
    assert sums["count"].tolist() == [4.0, 4.0]
    assert all(v.dtype == torch.float64 for v in sums.values())
    curve = finalize_curve(sums, [0.5, 0.9], n_layers=6)
    assert curve[0] == pytest.approx({"threshold": 0.5, "skip": 1 - 8 / 24, "consistency": 0.25, "acc": 0.5})
    assert curve[1] == pytest.approx({"threshold": 0.9, "skip": 1 - 16 / 24, "consistency": 1.0, "acc": 0.5})


def test_exit_outcome_sums_merge_over_chunks_and_no_labels():
    whole = exit_outcome_sums(OUT_EXITS, OUT_TOP1, OUT_LABELS, LAYERS)
    merged = None
    for cols in (slice(0, 1), slice(1, 4)):
        merged = merge_sums(merged, exit_outcome_sums(OUT_EXITS[:, cols], OUT_TOP1[:, cols], OUT_LABELS[cols], LAYERS))
    assert all(torch.equal(whole[k], merged[k]) for k in whole)
    single = exit_outcome_sums(OUT_EXITS[1], OUT_TOP1, None, LAYERS)
    assert "correct_sum" not in single and single["exit_sum"].shape == ()
    (point,) = finalize_curve(single, 2, n_layers=6)
    assert point == pytest.approx({"threshold": 2.0, "skip": 1 - 16 / 24, "consistency": 1.0, "acc": None})


def test_best_skip_at_consistency():
    curve = [
        {"threshold": 0.1, "skip": 0.5, "consistency": 0.9, "acc": 0.3},
        {"threshold": 0.2, "skip": 0.3, "consistency": 0.96, "acc": 0.3},
        {"threshold": 0.3, "skip": 0.1, "consistency": 0.99, "acc": 0.3},
        {"threshold": 0.4, "skip": 0.7, "consistency": float("nan"), "acc": 0.3},
        {"threshold": 0.5, "skip": 0.0, "consistency": 1.0, "acc": 0.3},
    ]
    assert best_skip_at_consistency(curve, 0.99) == pytest.approx(0.1)
    assert best_skip_at_consistency(curve, 0.95) == pytest.approx(0.3)
    assert best_skip_at_consistency(curve, 0.5) == pytest.approx(0.5)
    assert best_skip_at_consistency(curve[:2], 0.99) == 0.0
    assert best_skip_at_consistency([], 0.99) is None  # no token measured (every probe token non-finite)


def test_static_exit():
    layers = torch.arange(1, 6)
    acc = torch.tensor([0.2, 0.5, 0.76, 0.79, 0.8], dtype=torch.float64)
    assert static_exit(acc, layers, 5) == pytest.approx((3, 1 - 3 / 5))   # 0.76 is exactly 95% of 0.8
    assert static_exit(acc.float(), layers, 5) == pytest.approx((3, 1 - 3 / 5))
    assert static_exit(acc, layers, 5, rel_tolerance=0.0) == pytest.approx((5, 0.0))
    assert static_exit(acc, layers, 5, rel_tolerance=0.5) == pytest.approx((2, 1 - 2 / 5))
    assert static_exit(torch.tensor([0.74, 0.9, 0.8]), torch.tensor([2, 4, 8]), 8) == pytest.approx((4, 0.5))
    assert static_exit(torch.zeros(5), layers, 5) == pytest.approx((1, 1 - 1 / 5))   # acc_L = 0: all qualify
    assert static_exit(torch.full((5,), float("nan")), layers, 5) == pytest.approx((5, 0.0))
