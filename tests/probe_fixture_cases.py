"""Fixed-seed probe cases whose records are pinned in ``tests/data/probe_records.json``.

``python -m tests.probe_fixture_cases`` rewrites the fixture from the current code (only do that on purpose, and say
which fields changed and why in ``tests/test_probe_record_pins.py``).
"""

import json
from pathlib import Path

import torch

from ee_callbacks import run_probe
from ee_callbacks.model_parts import find_model_parts
from ee_callbacks.readouts import HEAD_KINDS, SharedHead, build_readout
from tests.helpers import tiny_gpt2, tiny_llama

FIXTURE = Path(__file__).parent / "data" / "probe_records.json"
V, LAYERS = 40, 4


def _llama(seed=3, double=False):
    model = tiny_llama(vocab=V, layers=LAYERS, hidden=32, seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.double() if double else model


def _batches():
    g = torch.Generator().manual_seed(7)
    first = torch.randint(0, V, (3, 12), generator=g)
    second = torch.randint(0, V, (2, 9), generator=g)
    mask = torch.ones_like(second)
    mask[1, 6:] = 0
    return [first, {"input_ids": second, "attention_mask": mask}]


def _heads(model):
    parts = find_model_parts(model)
    torch.manual_seed(11)
    heads = {}
    for kind in HEAD_KINDS:
        head = build_readout(kind, parts, [1, 2, 3] if kind != "linear" else [2])
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.05 * torch.randn_like(p))
        heads[kind] = head.bind(SharedHead(parts)).eval()
    return heads


def cases():
    """name -> (model, batches, run_probe keyword arguments); each case is probed twice: the second probe sees a
    perturbed copy of the model with the first record's state (CKA drift)."""
    batches = _batches()
    llama = _llama()
    return {
        "default": (llama, batches, {"config": {"chunk_tokens": 7, "cka_batch_tokens": 8}}),
        "heads_js": (llama, batches, {
            "config": {"eas_similarity": "js", "min_exit_layer": 2, "max_tokens": 40, "patience": (1, 2, 3),
                       "thresholds": {"max_prob": [0.2, 0.5, 0.8], "margin": [0.1, 0.4], "entropy": [0.3, 0.6]},
                       "chunk_tokens": 16, "cka_batch_tokens": 16},
            "readouts": _heads(llama)}),
        "gpt2_hidden": (tiny_gpt2(vocab=V, layers=3, hidden=32, dropout=0.0, seed=5).eval(), batches, {
            "config": {"eas_similarity": "hidden_cos_final", "angular_n": (1, 3),
                       "metrics": ("lens", "saturation", "exits", "eas", "redundancy"), "eas_alpha": 0.3}}),
        "float64_cos": (_llama(seed=4, double=True), batches, {
            "config": {"dtype": "float64", "eas_similarity": "logit_cos", "static_tolerance": 0.1}}),
        "agree": (llama, batches, {"config": {"eas_similarity": "agree", "consistency_levels": (0.9,)}}),
    }


def perturbed(model, seed=21):
    import copy

    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return other


def probe_twice(model, batches, kwargs):
    first = run_probe(model, batches, step=0, **kwargs)
    second = run_probe(perturbed(model), batches, step=1, previous=first.state, **kwargs)
    return [_stable(first.to_dict()), _stable(second.to_dict())]


def _stable(record: dict) -> dict:
    record = dict(record)
    record.pop("timing", None)
    return json.loads(json.dumps(record))


def main():
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    out = {name: probe_twice(*case) for name, case in cases().items()}
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
