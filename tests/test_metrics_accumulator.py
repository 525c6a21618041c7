"""Accumulators declare their state; a MetricSuite reduces every state with one call and the same layout on every
rank; token-level families give the same sums chunk by chunk as in one piece."""

import torch

from ee_callbacks.metrics.accumulator import Accumulator, MetricSuite
from ee_callbacks.metrics.exits import ExitRuleStats
from ee_callbacks.metrics.saturation import SaturationStats
from ee_callbacks.metrics.suitability import SpecRunStats


class Mean(Accumulator):
    def __init__(self, width):
        super().__init__()
        self.add_state("total", torch.zeros(width))
        self.add_state("count", torch.zeros(()))

    def update(self, values):
        self._add("total", values.sum(0))
        self._add("count", torch.tensor(float(values.shape[0])))

    def compute(self):
        return (self.total / self.count).tolist()


def test_suite_reduces_all_states_in_one_call_and_splits_them_back():
    calls = []

    def all_reduce(flat):  # two ranks: this one and a copy holding [1, 2, 3 | 1 | 10 | 1]
        calls.append(flat.clone())
        return flat + torch.tensor([1.0, 2.0, 3.0, 1.0, 10.0, 1.0], dtype=torch.float64)

    suite = MetricSuite({"a": Mean(3), "b": Mean(1)})
    suite["a"].update(torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]))
    suite["b"].update(torch.tensor([[4.0]]))
    suite.reduce(all_reduce)
    assert len(calls) == 1 and calls[0].dtype == torch.float64 and calls[0].tolist() == [4, 4, 4, 2, 4, 1]
    assert suite.compute() == {"a": [5 / 3, 2.0, 7 / 3], "b": [7.0]}


def test_a_rank_that_saw_nothing_declares_the_same_layout():
    seen, unseen = MetricSuite({"a": Mean(3)}), MetricSuite({"a": Mean(3)})
    seen["a"].update(torch.ones(5, 3))
    shapes = [[tuple(v.shape) for v in s["a"].states().values()] for s in (seen, unseen)]
    assert shapes[0] == shapes[1]
    unseen["a"].update(torch.ones(1, 3))
    unseen["a"].reset()
    assert unseen["a"].count == 0 and unseen["a"].total.tolist() == [0, 0, 0]


def test_token_families_chunk_by_chunk_equal_one_piece():
    gen = torch.Generator().manual_seed(3)
    layers = torch.arange(1, 5)
    top1 = torch.randint(0, 3, (4, 40), generator=gen)
    top1[-1] = torch.randint(0, 3, (40,), generator=gen)
    sequence = torch.arange(40) // 7  # sequences of 7 tokens, split across chunks of 6
    labels = torch.randint(0, 3, (40,), generator=gen)
    exits = torch.stack([layers[torch.randint(0, 4, (40,), generator=gen)] for _ in range(2)])
    whole = [SaturationStats(layers, 4), ExitRuleStats(2), SpecRunStats([1, 2, 3], 4, [1, 2, 4])]
    parts = [SaturationStats(layers, 4), ExitRuleStats(2), SpecRunStats([1, 2, 3], 4, [1, 2, 4])]
    for family, chunks in ((whole, [slice(0, 40)]), (parts, [slice(s, s + 6) for s in range(0, 40, 6)])):
        for cols in chunks:
            family[0].update(top1[:, cols])
            family[1].update(exits[:, cols], top1[:, cols], labels[cols], layers)
            family[2].update(top1[:3, cols] == top1[-1, cols], sequence[cols])
        family[2].finish()
    for a, b in zip(whole, parts):
        for name, value in a.states().items():
            assert torch.equal(value, b.states()[name]), (type(a).__name__, name)
    assert float(whole[2].tokens) == 40
