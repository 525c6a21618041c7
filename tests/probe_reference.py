"""An independent float64 reference of the probe, one token at a time (numpy loops over transformers' own
hidden states and logits; never the probe's hooks, chunks, sums or metric helpers)."""

import math

import numpy as np
import torch


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


class TokenTable:
    """Per valid probe token: raw hidden states h_0..h_L, readout logits z_0..z_L (float64), the next-token label."""

    def __init__(self, model, batches, max_tokens=None):
        blocks = model.model.layers
        norm, head = model.model.norm, model.lm_head
        self.L = len(blocks)
        self.hidden, self.logits, self.labels = [], [], []
        for batch in batches:
            ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
            mask = None if isinstance(batch, torch.Tensor) else batch.get("attention_mask")
            store = {}
            handle = blocks[-1].register_forward_hook(lambda m, a, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
            with torch.no_grad():
                out = model(ids, attention_mask=mask, output_hidden_states=True)
                handle.remove()
                states = list(out.hidden_states[:-1]) + [store["h"]]
                zs = [head(norm(h)) for h in states[:-1]] + [out.logits]
            for b in range(ids.shape[0]):
                for t in range(ids.shape[1] - 1):
                    if mask is not None and not (mask[b, t] and mask[b, t + 1]):
                        continue
                    if max_tokens is not None and len(self.labels) >= max_tokens:
                        continue
                    self.hidden.append([s[b, t].double().numpy() for s in states])
                    self.logits.append([z[b, t].double().numpy() for z in zs])
                    self.labels.append(int(ids[b, t + 1]))
        self.n = len(self.labels)
        self.V = self.logits[0][0].shape[0]

    @classmethod
    def from_arrays(cls, hidden, logits, labels):
        """A table of tokens computed elsewhere: per token [h_0..h_L], [z_0..z_L] (float64 arrays) and its label."""
        table = cls.__new__(cls)
        table.hidden, table.logits, table.labels = list(hidden), list(logits), [int(y) for y in labels]
        table.L, table.n, table.V = len(table.logits[0]) - 1, len(table.labels), table.logits[0][0].shape[0]
        return table

    def top1(self, t, layer):
        return int(np.argmax(self.logits[t][layer]))

    def lens(self, metric, layer):
        """Mean over tokens of one per-layer logit-lens metric."""
        return float(np.mean([self.token_metric(metric, self.logits[t][layer], t) for t in range(self.n)]))

    def token_metric(self, metric, z, t):
        zL = self.logits[t][self.L]
        p, pL = _softmax(z), _softmax(zL)
        top = np.sort(p)[::-1]
        return {
            "agree": float(np.argmax(z) == np.argmax(zL)),
            "acc": float(np.argmax(z) == self.labels[t]),
            "ce": -math.log(p[self.labels[t]]),
            "kl": float(np.sum(pL * (np.log(pL) - np.log(p)))),
            "entropy": float(-np.sum(p * np.log(p))),
            "entropy_norm": float(-np.sum(p * np.log(p))) / math.log(self.V),
            "max_prob": float(top[0]),
            "margin": float(top[0] - top[1]),
            "logit_cos": _cos(z, zL),
            "logit_corr": float(np.corrcoef(z, zL)[0, 1]),
            "js": 1.0 - _js(p, pL) / math.log(2.0),
        }[metric]

    def hidden_cos_final(self, layer):
        return float(np.mean([_cos(self.hidden[t][layer], self.hidden[t][self.L]) for t in range(self.n)]))

    def block_influence(self, layer):
        """1 − cos(h_{ℓ−1}, h_ℓ) averaged over tokens (ShortGPT), ℓ ≥ 1."""
        return float(np.mean([1 - _cos(self.hidden[t][layer - 1], self.hidden[t][layer]) for t in range(self.n)]))

    def top2_gap(self, t, layer):
        """Largest minus second-largest readout logit: a near tie may flip the top-1 under float32 rounding."""
        top = np.sort(self.logits[t][layer])[::-1]
        return float(top[0] - top[1])


def _js(p, q):
    m = (p + q) / 2
    return 0.5 * float(np.sum(p * np.log(p / m))) + 0.5 * float(np.sum(q * np.log(q / m)))


def exit_point(exits, predictions, table):
    """(skip, consistency, acc) of per-token exit layers and the prediction made there."""
    final = [table.top1(t, table.L) for t in range(table.n)]
    return (1 - np.mean(exits) / table.L, float(np.mean([p == f for p, f in zip(predictions, final)])),
            float(np.mean([p == y for p, y in zip(predictions, table.labels)])))


def threshold_exits(table, score, fires, first_layer):
    """Exit layer per token: the first layer ≥ first_layer where ``fires(score(t, layer))``, else L."""
    return [next((l for l in range(first_layer, table.L + 1) if fires(score(t, l))), table.L) for t in range(table.n)]


def patience_exits(table, k, first_layer):
    exits = []
    for t in range(table.n):
        run, exit_layer = 0, table.L
        for layer in range(first_layer + 1, table.L + 1):
            run = run + 1 if table.top1(t, layer) == table.top1(t, layer - 1) else 0
            if run >= k:
                exit_layer = layer
                break
        exits.append(exit_layer)
    return exits


def strict_saturation(top1_rows, layers):
    """ℓ* per token from per-layer top-1 rows {layer: [top1 per token]} over ``layers`` (last = L)."""
    final = top1_rows[layers[-1]]
    out = []
    for t in range(len(final)):
        bad = [l for l in layers if top1_rows[l][t] != final[t]]
        out.append(layers[layers.index(max(bad)) + 1] if bad else layers[0])
    return out


def lenient_saturation(top1_rows, layers):
    """ℓ° per token: the first of ``layers`` whose top-1 equals the final layer's."""
    final = top1_rows[layers[-1]]
    return [next(l for l in layers if top1_rows[l][t] == final[t]) for t in range(len(final))]


def eas(similarity, L, alpha):
    """mean over ℓ = 1..L of clamp(S_ℓ, 0, 1)^α ((L − ℓ)/L)^(1−α); ``similarity`` indexed by layer 1..L."""
    return float(np.mean([min(max(similarity[l], 0.0), 1.0) ** alpha * ((L - l) / L) ** (1 - alpha)
                          for l in range(1, L + 1)]))


def hsic1(K, L):
    """Song et al.'s unbiased HSIC, written out term by term."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return float(np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3))
