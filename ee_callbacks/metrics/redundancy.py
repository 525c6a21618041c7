"""Layer redundancy from hidden states: cosine to the final layer, block influence (ShortGPT) and angular distance
(Gromov et al.), as streaming sums over tokens."""

from __future__ import annotations

import math

import torch

from ee_callbacks.metrics.accumulator import Accumulator
from ee_callbacks.metrics.readout_stats import finite_or_none

__all__ = ["HiddenSimilarity"]


class HiddenSimilarity(Accumulator):
    """Per layer ℓ (means over tokens): ``hidden_cos_final`` = cos(h_ℓ, h_L), ``block_influence`` = 1 − cos(h_{ℓ−1}, h_ℓ)
    and, per distance n, ``d(ℓ, ℓ+n)`` = arccos(cos(h_ℓ, h_{ℓ+n}))/π. Cosines as ``F.cosine_similarity`` (norms
    clamped at 1e-8). States are (L+1)-long per layer so every rank declares the same layout."""

    def __init__(self, n_layers: int, angular_n=(), angular: bool = True):
        super().__init__()
        self.n_layers = int(n_layers)
        self.angular_n = tuple(angular_n) if angular else ()
        self.add_state("cos_final", torch.zeros(self.n_layers + 1))
        self.add_state("influence", torch.zeros(self.n_layers + 1))
        self.add_state("angular", torch.zeros(len(self.angular_n), self.n_layers + 1))
        self.add_state("count", torch.zeros(()))

    def update(self, states: list) -> None:
        """Add the tokens of one chunk: ``states[ℓ]`` (n, d) for ℓ = 0..L (``states[0]`` may be None)."""
        L = self.n_layers
        hidden = [s.float() if s is not None else None for s in states]
        inverse_norm = [1.0 / torch.linalg.vector_norm(h, dim=-1).clamp_min(1e-8) if h is not None else None
                        for h in hidden]

        def cos(a: int, b: int) -> torch.Tensor:
            return torch.linalg.vecdot(hidden[a], hidden[b]) * inverse_norm[a] * inverse_norm[b]

        first = 0 if hidden[0] is not None else 1
        zero = hidden[L].new_zeros((), dtype=torch.float64)
        cos_final = [cos(layer, L).sum(dtype=torch.float64) if layer >= first else zero for layer in range(L + 1)]
        influence = [(1.0 - cos(layer - 1, layer)).sum(dtype=torch.float64) if layer > first else zero
                     for layer in range(L + 1)]
        angular = [[(torch.arccos(cos(start, start + dist).clamp(-1.0, 1.0)) / math.pi).sum(dtype=torch.float64)
                    if first <= start <= L - dist else zero for start in range(L + 1)] for dist in self.angular_n]
        # one copy to the host per chunk, not one per layer
        self._add("cos_final", torch.stack(cos_final))
        self._add("influence", torch.stack(influence))
        if angular:
            self._add("angular", torch.stack([torch.stack(row) for row in angular]))
        self.count += hidden[L].shape[0]

    def compute(self, first: int) -> dict:
        """``{"layers": {ℓ: {hidden_cos_final, block_influence}}, "angular": {n: [{start, end, d}]}}``."""
        n = float(self.count)
        if n == 0:
            return {"layers": {}, "angular": {}}
        layers = {
            layer: {"hidden_cos_final": finite_or_none(self.cos_final[layer] / n),
                    "block_influence": finite_or_none(self.influence[layer] / n) if layer > first else None}
            for layer in range(first, self.n_layers + 1)
        }
        angular = {
            dist: [{"start": start, "end": start + dist, "d": finite_or_none(self.angular[row, start] / n)}
                   for start in range(first, self.n_layers - dist + 1)]
            for row, dist in enumerate(self.angular_n)
        }
        return {"layers": layers, "angular": angular}
