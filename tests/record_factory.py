"""Realistic synthetic ProbeRecord dicts (DESIGN §4) for tests of the sinks and the report.

The numbers follow the shapes a real probe produces on a small decoder that is learning: agreement with the final
layer rises with depth and with training, KL to the final layer falls to 0 at the last layer, the block influence is
largest at the first and last blocks, CKA decays away from the diagonal. They are deterministic for a given seed.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

RULES = ("max_prob", "margin", "entropy", "patience_2")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make_record(
    step: int,
    n_layers: int = 6,
    *,
    epoch: int = 0,
    set_name: str = "default",
    model_name: str = "tiny-llama",
    family: str = "llama",
    experiment: str | None = "baseline",
    run_name: str = "run-a",
    with_embedding: bool = True,
    total_steps: int = 1000,
    seed: int = 0,
    source: str = "train",
) -> dict[str, Any]:
    """One probe record at ``step``. Layers are 0..L (``with_embedding``) or 1..L; the last layer is the model's own."""
    rng = random.Random(f"{seed}:{step}:{model_name}:{set_name}")
    progress = 1.0 - math.exp(-3.0 * step / max(total_steps, 1))  # 0 at init → ~0.95 at the end
    first = 0 if with_embedding else 1
    layer_ids = list(range(first, n_layers + 1))
    # Where along the depth the prediction "settles"; moves earlier as training goes on.
    settle = 0.85 - 0.35 * progress
    layers = []
    for layer in layer_ids:
        depth = layer / n_layers
        final = layer == n_layers
        agree = 1.0 if final else round(min(0.999, _sigmoid(9.0 * (depth - settle)) + rng.uniform(0, 0.01)), 6)
        final_acc = 0.05 + 0.35 * progress
        acc = round(final_acc if final else final_acc * (0.2 + 0.8 * agree), 6)
        kl = 0.0 if final else round((1.0 - agree) * (4.0 - 1.5 * progress) + rng.uniform(0, 0.05), 6)
        ce = round(-math.log(max(final_acc, 1e-3)) + 1.5 + kl, 6)
        entropy = round(max(0.1, 6.0 - 3.0 * depth * (0.5 + progress) + rng.uniform(-0.1, 0.1)), 6)
        max_prob = round(min(0.99, 0.05 + 0.6 * depth * (0.3 + progress)), 6)
        margin = round(max_prob * 0.6, 6)
        logit_corr = 1.0 if final else round(-0.1 + 1.05 * _sigmoid(7.0 * (depth - settle + 0.1)), 6)
        layers.append(
            {
                "layer": layer,
                "agree": agree,
                "acc": acc,
                "ce": ce,
                "kl": kl,
                "entropy": entropy,
                "max_prob": max_prob,
                "margin": margin,
                "logit_cos": 1.0 if final else round(logit_corr - 0.3, 6),
                "logit_corr": logit_corr,
                "hidden_cos_final": 1.0 if final else round(0.2 + 0.8 * depth**2, 6),
                # BI_ℓ = 1 − cos(h_{ℓ−1}, h_ℓ) has no value for the embedding output.
                "block_influence": None
                if layer == 0
                else round(0.05 + 0.4 * (depth - 0.5) ** 2 + rng.uniform(0, 0.02), 6),
            }
        )

    # EAS with the DESIGN §3 defaults: S_ℓ = clamp(logit_corr, 0, 1), w_ℓ = (L − ℓ)/L, α = 0.5.
    alpha = 0.5
    terms = [
        max(0.0, min(1.0, row["logit_corr"])) ** alpha * ((n_layers - row["layer"]) / n_layers) ** (1 - alpha)
        for row in layers
    ]
    eas = round(sum(terms) / len(terms), 6)

    curves = {}
    for index, rule in enumerate(RULES):
        points = []
        thresholds = [2, 3, 4] if rule.startswith("patience") else [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
        for position, threshold in enumerate(thresholds):
            strictness = (position + 1) / len(thresholds)
            skip = round(max(0.0, (1.0 - settle) * (1.0 - strictness) * (0.9 - 0.1 * index)), 6)
            consistency = round(min(1.0, 0.8 + 0.2 * strictness ** (0.5 + progress)), 6)
            points.append({"threshold": threshold, "skip": skip, "consistency": consistency, "acc": round(acc, 6)})
        curves[rule] = points

    def best_skip(target: float) -> dict[str, float]:
        return {
            rule: max([p["skip"] for p in points if p["consistency"] >= target], default=0.0)
            for rule, points in curves.items()
        }

    cka_layers = layer_ids
    cka = [
        [1.0 if a == b else round(math.exp(-abs(a - b) / (1.5 + 2.0 * progress)), 6) for b in cka_layers]
        for a in cka_layers
    ]
    strict = round(max(0.0, 1.0 - settle - 0.1), 6)
    return {
        "schema": 1,
        "step": step,
        "epoch": epoch,
        "source": source,
        "checkpoint": None if source == "train" else f"step={step}.ckpt",
        "set": set_name,
        "run": {"name": run_name, "experiment": experiment},
        "model": {
            "name": model_name,
            "family": family,
            "n_layers": n_layers,
            "d_model": 64,
            "vocab": 512,
            "params": 1_234_567,
        },
        "probe": {"tokens": 4096, "sequences": 16, "seed": 1234, "data": "synthetic"},
        "layers": layers,
        "summary": {
            "eas": eas,
            "eas_similarity": "logit_corr",
            "eas_alpha": alpha,
            "oracle_skip_strict": strict,
            "oracle_skip_lenient": round(min(1.0, strict + 0.08), 6),
            "static_exit_layer": max(first, round(settle * n_layers)),
            "static_skip_5pct": round(1.0 - max(first, round(settle * n_layers)) / n_layers, 6),
            "skip_at_consistency_0.99": best_skip(0.99),
            "skip_at_consistency_0.95": best_skip(0.95),
            "spec_speedup_est": round(1.0 + 0.6 * progress, 6),
        },
        "curves": curves,
        "cka": cka,
        "cka_layers": cka_layers,
        "cka_drift": None if step == 0 else [round(0.9 + 0.09 * progress, 6) for _ in cka_layers],
        "angular": {
            "1": [round(0.1 + 0.02 * i, 6) for i in range(len(layer_ids) - 1)],
            "2": [round(0.15 + 0.02 * i, 6) for i in range(len(layer_ids) - 2)],
        },
        "saturation_hist": [rng.randint(0, 500) for _ in layer_ids],
        "heads": {
            "linear": [
                {"layer": layer, "ce": round(3.0 - 0.2 * layer, 6), "agree": layers[i]["agree"], "acc": acc}
                for i, layer in enumerate(layer_ids[:-1])
            ]
        },
        "timing": {"probe_s": round(0.5 + rng.uniform(0, 0.1), 6)},
    }


def make_history(steps: Sequence[int], **kwargs: Any) -> list[dict[str, Any]]:
    """Records at each step (same run, same model)."""
    return [make_record(step, **kwargs) for step in steps]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]], torn_tail: str | None = None) -> Path:
    """Write records one per line (as the probe does); ``torn_tail`` appends a partial last line (a killed writer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        if torn_tail is not None:
            handle.write(torn_tail)
    return path
