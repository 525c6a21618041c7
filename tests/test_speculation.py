"""Self-speculation: the DESIGN §3 estimate against a hand-computed table, and the measured path (transformers'
assistant_early_exit vs greedy) on tiny real models, with block counts checked against the test's own hooks."""

import pytest
import torch

from ee_callbacks.speculation import (
    best_estimate, measure_speculation, prompts_from_batches, spec_estimates, spec_grid, speculate,
)
from tests.helpers import tiny_gpt2, tiny_llama


# ------------------------------------------------------------------------------------------------------------ estimate

# (a, E, k, L) -> speedup = Σ_{i<k} a^i / ((k·E + L − E)/L), worked by hand
ESTIMATE_TABLE = [
    (0.5, 1, 2, 4, 1.5 / 1.25),          # T = 1 + .5, C = (2 + 3)/4
    (0.9, 3, 1, 4, 1.0),                 # E = L − 1, k = 1: one token for one full pass
    (1.0, 29, 1, 30, 1.0),               # SmolLM2's old 1.50x case: now exactly 1.0
    (1.0, 1, 4, 4, 4 / 1.75),            # T = 4, C = (4 + 3)/4
    (0.0, 2, 3, 8, 1 / ((6 + 6) / 8)),   # nothing accepted: one token per cycle at C = 1.5
    (0.8, 2, 3, 8, (1 + 0.8 + 0.64) / 1.5),
]


@pytest.mark.parametrize("a,E,k,L,expected", ESTIMATE_TABLE)
def test_estimate_matches_hand_computed_table(a, E, k, L, expected):
    (row,) = spec_estimates({E: a}, L, [k])
    assert row["speedup_est"] == pytest.approx(expected, rel=1e-12)
    # transformers' implementation: k·E + L block calls for Σ_{i≤k} a^i tokens
    assert row["blocks_per_token_est"] == pytest.approx((k * E + L) / sum(a ** i for i in range(k + 1)), rel=1e-12)
    assert row["tokens_per_verification_est"] == pytest.approx(sum(a ** i for i in range(k + 1)), rel=1e-12)
    assert row["acceptance_est"] == pytest.approx(sum(a ** i for i in range(1, k + 1)) / k, rel=1e-12)


def test_estimate_never_beats_one_at_k1_and_ties_go_to_the_cheapest_transformers_run():
    rows = spec_estimates({1: 0.3, 2: 0.5, 3: 0.99}, 4, [1])
    assert all(r["speedup_est"] == pytest.approx(1.0) for r in rows)
    # (E + L)/(1 + a): E=1 5/1.3 = 3.85, E=2 6/1.5 = 4.0, E=3 7/1.99 = 3.52
    assert (best_estimate(rows)["exit_layer"], best_estimate(rows)["draft_len"]) == (3, 1)
    rows = spec_estimates({1: 0.3, 2: 0.9, 3: 0.99, 4: 1.0, 0: 1.0}, 4, [1, 2, 3])  # layers 0 and L are not drafts
    assert {r["exit_layer"] for r in rows} == {1, 2, 3}
    best = best_estimate(rows)
    # E=2, k=3: (1 + .9 + .81)/((6 + 2)/4) = 1.355 beats E=1 (≤ 1.39/1.25 = 1.112) and E=3 (≤ 2.97/3 ≈ 0.99)
    assert (best["exit_layer"], best["draft_len"]) == (2, 3)
    assert best["speedup_est"] == pytest.approx(2.71 / 2.0)


def test_grid_around_the_best_pair_stays_inside_the_model():
    assert spec_grid(1, 1, 4) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert spec_grid(15, 3, 30) == [(e, k) for e in (12, 15, 18) for k in (2, 3, 4, 6)]
    with pytest.raises(ValueError, match="at least 2 blocks"):
        spec_estimates({1: 0.5}, 1)


# ------------------------------------------------------------------------------------------------------------ measured


class HookCount:
    """The test's own count of block calls: forward (post) hooks, independent of the module's pre-hooks."""

    def __init__(self, layers):
        self.n = 0
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, *_):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


def _prompts(vocab=64, n=3, length=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def test_measured_speculation_is_identical_to_greedy_and_counts_every_block_call():
    model = tiny_llama(layers=4).eval()
    prompts = _prompts()
    own = HookCount(model.model.layers)
    result = measure_speculation(model, prompts, [(1, 1), (2, 3), (3, 2)], max_new_tokens=10)
    own.close()
    assert result["supported"] and result["reason"] is None
    greedy = result["greedy"]
    assert greedy["tokens"] == 30 and greedy["blocks_per_token"] == pytest.approx(4.0)  # L block calls per token
    total = greedy["blocks_per_token"] * greedy["tokens"]
    for run in result["runs"]:
        assert run["identical_to_greedy"] and run["mismatched_prompts"] == 0
        assert run["tokens"] == 30
        assert 0.0 <= run["acceptance"] <= 1.0
        E = run["exit_layer"]
        # every block call is a draft (E blocks) or a verification (L blocks)
        assert run["blocks_per_token"] * run["tokens"] == pytest.approx(run["drafts"] * E + run["verifications"] * 4)
        assert run["speedup_blocks"] == pytest.approx(4 / run["blocks_per_token"])
        assert run["tokens_per_verification"] == pytest.approx(30 / run["verifications"])
        total += run["blocks_per_token"] * run["tokens"]
    assert own.n == pytest.approx(total + 1)  # + the support check: one forward that stops after block E = 1
    assert model.config.num_hidden_layers == 4 and model.generation_config.assistant_confidence_threshold != 0.0


def test_a_perfect_draft_gives_the_hand_computed_counts():
    """Blocks 3..4 made identities (zero attention output and MLP output): the exit at E = 2 is the full model,
    every draft is accepted. With k = 3 and 8 new tokens: 2 cycles of 3 drafts + 1 verification, 4 tokens each;
    block calls 2·(3·2 + 4) = 20, acceptance 1, 4 tokens per verification, 2.5 blocks per token, speedup 4/2.5."""
    model = tiny_llama(layers=4).eval()
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    own = HookCount(model.model.layers)
    result = measure_speculation(model, _prompts(n=1), [(2, 3)], max_new_tokens=8)
    own.close()
    (run,) = result["runs"]
    assert run["identical_to_greedy"]
    assert (run["drafts"], run["verifications"], run["tokens"]) == (6, 2, 8)
    assert run["acceptance"] == 1.0 and run["tokens_per_verification"] == 4.0
    assert run["blocks_per_token"] == pytest.approx(20 / 8) and run["speedup_blocks"] == pytest.approx(1.6)
    assert own.n == 8 * 4 + 20 + 2  # greedy + speculation + the support check's 2 blocks


def test_family_without_early_exit_support_is_recorded_not_raised():
    result = measure_speculation(tiny_gpt2(dropout=0.0).eval(), _prompts(), [(2, 2)], max_new_tokens=4)
    assert result["supported"] is False and result["runs"] == []
    assert "ignores config.num_hidden_layers" in result["reason"]


def test_speculate_picks_the_estimates_best_pair_and_puts_estimates_beside_measurements():
    model = tiny_llama(layers=4).eval()
    record = {"model": {"n_layers": 4},
              "layers": [{"layer": 0, "agree": 0.1}, {"layer": 1, "agree": 0.2}, {"layer": 2, "agree": 0.9},
                         {"layer": 3, "agree": 0.95}, {"layer": 4, "agree": 1.0}]}
    batches = [{"input_ids": torch.arange(40).reshape(2, 20) % 64}]
    prompts = prompts_from_batches(batches, n_prompts=2, prompt_tokens=6)
    assert [p.tolist() for p in prompts] == [list(range(6)), list(range(20, 26))]
    result = speculate(model, record, prompts, max_new_tokens=6, draft_lengths=[1, 2, 3])
    best = result["estimate_best"]
    assert (best["exit_layer"], best["draft_len"]) == (2, 3)
    assert {(r["exit_layer"], r["draft_len"]) for r in result["runs"]} == set(spec_grid(2, 3, 4))
    for run in result["runs"]:
        assert run["identical_to_greedy"]
        assert run["agree_probe"] == {1: 0.2, 2: 0.9, 3: 0.95}[run["exit_layer"]]
        assert run["speedup_est"] == pytest.approx(spec_estimates({run["exit_layer"]: run["agree_probe"]}, 4,
                                                                  [run["draft_len"]])[0]["speedup_est"])
