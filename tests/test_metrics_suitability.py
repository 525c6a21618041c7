"""EAS, Jensen–Shannon similarity and the self-speculative speedup estimate against hand-computed numbers."""

import math

import pytest
import torch

from ee_callbacks.metrics.suitability import (
    acceptance_runs, best_speedup, eas, js_similarity, spec_cycle_costs, spec_speedup_estimate,
)


def test_eas_hand_computed():
    s = torch.tensor([1.0, 0.5, 0.25, 0.9])
    # L = 4, w = [3/4, 1/2, 1/4, 0]; α = 0.5: terms sqrt(0.75), sqrt(0.25), sqrt(1/16), 0
    expected = (math.sqrt(0.75) + 0.5 + 0.25 + 0.0) / 4
    assert eas(s, 4) == pytest.approx(expected)
    assert eas(s, 4, alpha=1.0) == pytest.approx((1.0 + 0.5 + 0.25 + 0.9) / 4)   # w^0 = 1
    assert eas(s, 4, alpha=0.0) == pytest.approx((0.75 + 0.5 + 0.25 + 0.0) / 4)  # S^0 = 1
    # α = 0.25 on S = 0.5, w = 0.5 gives 0.5 for that term
    assert eas(torch.tensor([0.5, 0.0]), 2, alpha=0.25) == pytest.approx(0.5 / 2)


def test_eas_zero_power_zero_is_one_and_clamping():
    # S_1 = 0 with α = 0: 0^0 := 1, so the term is w_1 = 1/2
    assert eas(torch.tensor([0.0, 0.3]), 2, alpha=0.0) == pytest.approx((0.5 + 0.0) / 2)
    # w_L = 0 with α = 1: 0^0 := 1, so the last term is S_L
    assert eas(torch.tensor([0.0, 0.3]), 2, alpha=1.0) == pytest.approx((0.0 + 0.3) / 2)
    # clamped to [0, 1]: 1.5 -> 1, -0.2 -> 0
    assert eas(torch.tensor([1.5, -0.2, 0.0]), 3, alpha=0.5) == pytest.approx(math.sqrt(2 / 3) / 3)


def test_eas_on_given_layers_and_validation():
    # layers [1, 3] of L = 4: terms sqrt(1 · 3/4) and sqrt(0.25 · 1/4)
    assert eas(torch.tensor([1.0, 0.25]), 4, layers=torch.tensor([1, 3])) == pytest.approx(
        (math.sqrt(0.75) + 0.25) / 2)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            eas(torch.ones(4), 4, alpha=bad)
    with pytest.raises(ValueError, match="rows"):
        eas(torch.ones(3), 4)
    assert math.isnan(eas(torch.tensor([float("nan"), 1.0]), 2))


def test_js_similarity_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]]))
    logq = torch.log(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8]]))
    sim = js_similarity(logp, logq)
    # row 0: m = [3/4, 1/4]; KL(p‖m) = ½ ln(4/3), KL(q‖m) = ln(4/3); JS = ¾ ln(4/3)
    assert float(sim[0]) == pytest.approx(1 - 0.75 * math.log(4 / 3) / math.log(2), rel=1e-6)
    assert float(sim[1]) == pytest.approx(0.0, abs=1e-6)      # disjoint supports: JS = ln 2
    assert float(sim[2]) == pytest.approx(1.0, abs=1e-6)      # identical
    assert torch.isfinite(sim).all()


def test_js_similarity_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(3 * torch.randn(6, 50, generator=gen), -1)
    logq = torch.log_softmax(3 * torch.randn(6, 50, generator=gen), -1)
    p, q = logp.double().exp(), logq.double().exp()
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(js_similarity(logp.half(), logq.half()).double(), 1 - js / math.log(2), atol=5e-3)
    assert torch.allclose(js_similarity(logp, logq).double(), 1 - js / math.log(2), atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        js_similarity(logp, logq[:, :10])


# (a, E, L, k) -> speedup, worked by hand: tokens (1 − a^k)/(1 − a) (k at a = 1), cost (k·E + L − E)/L
HAND_TABLE = [
    (0.5, 1, 4, 2, 1.5 / 1.25),              # tokens 1 + 0.5 = 1.5; cost (2 + 3)/4 = 1.25 -> 1.2
    (0.9, 2, 4, 4, 3.439 / 2.5),             # 1 + .9 + .81 + .729 = 3.439; (8 + 2)/4 = 2.5 -> 1.3756
    (1.0, 1, 4, 8, 8 / (11 / 4)),            # a = 1: 8 tokens; (8 + 3)/4 -> 32/11
    (0.8, 3, 12, 3, 2.44 / 1.5),             # 1 + .8 + .64 = 2.44; (9 + 9)/12 = 1.5 -> 1.62667
    (0.99, 3, 4, 1, 1.0 / 1.0),              # k = 1 emits one token per cycle at cost 1: never a gain
    (1.0, 31, 32, 1, 1.0),                   # E = L − 1, k = 1, even at a = 1: exactly 1
    (0.3, 2, 8, 5, (1 - 0.3 ** 5) / 0.7 / (18 / 8)),
]


@pytest.mark.parametrize("a, E, L, k, want", HAND_TABLE)
def test_spec_speedup_hand_table(a, E, L, k, want):
    est = spec_speedup_estimate(torch.tensor([a], dtype=torch.float64), torch.tensor([E]), L, draft_lengths=[k])
    assert est["speedup"] == pytest.approx(max(want, 1.0), rel=1e-12)
    if want > 1.0:
        assert (est["layer"], est["draft_len"], est["acceptance"]) == (E, k, pytest.approx(a))
        assert est["tokens_per_cycle"] == pytest.approx(want * (k * E + L - E) / L)
    else:
        assert est["layer"] is None and est["draft_len"] is None


def test_spec_speedup_picks_the_best_pair():
    # E = 1: a = .5 -> k = 1: 1/1 ; k = 2: 1.5/1.25 = 1.2 ; k = 3: 1.75/1.5 = 1.1667 ; E = 2, a = 0: 1/((2k+2)/4) < 1
    est = spec_speedup_estimate(torch.tensor([0.5, 0.0, 0.0, 1.0]), torch.arange(1, 5), 4, draft_lengths=[1, 2, 3])
    assert est["speedup"] == pytest.approx(1.2) and (est["layer"], est["draft_len"]) == (1, 2)


def test_spec_speedup_acceptance_one_is_exact():
    # a = 1 at E = 1 of L = 4: tokens k, cost (k+3)/4, increasing in k -> k = 8: 32/11
    est = spec_speedup_estimate(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.arange(1, 5), 4)
    assert est["speedup"] == pytest.approx(32 / 11)
    assert est["draft_len"] == 8 and est["tokens_per_cycle"] == pytest.approx(8.0)


def test_spec_speedup_excludes_final_layer_and_reports_no_gain():
    # only the final layer agrees; speculating with E = L is not speculation, so nothing beats 1.0
    est = spec_speedup_estimate(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.arange(1, 5), 4)
    assert est["speedup"] == 1.0 and est["layer"] is None and est["draft_len"] is None
    est = spec_speedup_estimate(torch.tensor([1.0]), torch.tensor([4]), 4)
    assert est["speedup"] == 1.0 and est["layer"] is None
    with pytest.raises(ValueError, match="positive integers"):
        spec_speedup_estimate(torch.ones(4), torch.arange(1, 5), 4, draft_lengths=[0])


def test_acceptance_runs_stop_at_rejections_and_sequence_ends():
    accept = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    sequence = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert acceptance_runs(accept, sequence).tolist() == [[2, 1, 0, 1, 2, 1, 0, 0, 1]]


def test_spec_cycles_simulated_along_sequences_by_hand():
    """E = 2 of L = 4, sequences [1 1 0 1] and [1 1 0 0 1] (1 = the draft's token is the final one).

    k = 1: 9 cycles of cost 1 -> 9. k = 2 (cost 1.5, or 1 for a 1-token tail): seq 0: emit 2 (1.5), 1 (1.5), tail 1
    (1) = 4; seq 1: 2 (1.5), 1 (1.5), 1 (1.5), tail 1 (1) = 5.5 -> 9.5. k = 3 (cost 2): seq 0: emit 3 (2), tail 1 (1)
    = 3; seq 1: 3 (2), then 2 left: drafts 2, rejected at once, emits 1 (1.5), tail 1 (1) = 4.5 -> 7.5.
    """
    accept = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    sequence = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    cost = spec_cycle_costs(accept, sequence, torch.tensor([2]), 4, [1, 2, 3])
    assert cost.tolist() == [[9.0, 9.5, 7.5]]
    best = best_speedup(torch.full_like(cost, 9.0), cost, torch.tensor([2]), torch.tensor([1, 2, 3]))
    assert best["speedup"] == pytest.approx(9 / 7.5) and best["draft_len"] == 3


def test_runs_never_beat_one_with_the_last_block_and_single_drafts():
    accept = torch.ones(1, 50, dtype=torch.bool)
    sequence = torch.arange(50) // 10
    cost = spec_cycle_costs(accept, sequence, torch.tensor([7]), 8, [1])
    assert cost.tolist() == [[50.0]]
