"""Run EarlyExitProbe under a real multi-process strategy and compare with the single-process probe.

    python scripts/ddp_probe_check.py OUT_DIR [--strategy ddp|ddp_spawn|fsdp] [--devices 2] [--accelerator cpu]

Lightning re-launches this very command for ranks ≥ 1 with strategy=ddp, so it must be run as a script (never from
inside pytest's own process). Rank 0 writes OUT_DIR/ee_probes.jsonl; the script then recomputes the step-0 record in
one process on the same probe set and writes OUT_DIR/compare.json with the largest absolute difference.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from ee_callbacks import EarlyExitProbe, read_records, run_probe  # noqa: E402
from tests.helpers import TinyLM, loaders, pattern_tokens  # noqa: E402


def probe_set():
    # 5 sequences in batches of 2: 3 batches, which do not divide evenly across 2 ranks
    return pattern_tokens(5, 24, 64, 11)


def max_abs_diff(a, b, path=""):
    """Largest absolute difference between two JSON-like structures (None must match None)."""
    if isinstance(a, dict):
        keys = set(a) | set(b)
        return max([max_abs_diff(a.get(k), b.get(k), f"{path}.{k}") for k in keys] + [0.0])
    if isinstance(a, list):
        if len(a) != len(b):
            return float("inf")
        return max([max_abs_diff(x, y, path) for x, y in zip(a, b)] + [0.0])
    if isinstance(a, bool) or isinstance(b, bool):
        return 0.0 if a == b else float("inf")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def comparable(rec):
    keep = ("layers", "summary", "curves", "cka", "angular", "saturation_hist", "heads")
    out = {k: rec.get(k) for k in keep}
    out["tokens"] = rec["probe"]["tokens"]
    out["sequences"] = rec["probe"]["sequences"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--accelerator", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    train, val = loaders()
    probe = EarlyExitProbe(every_n_steps=2, probe_data=probe_set(), probe_set={"batch_size": 2},
                           output_path=out / "ee_probes.jsonl", print_table=False)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, max_steps=2, callbacks=[probe],
        logger=False, default_root_dir=str(out), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0,
    )
    trainer.fit(TinyLM(), train, val)
    if trainer.global_rank != 0:
        return
    records = read_records(out / "ee_probes.jsonl")
    module = TinyLM()
    module.configure_model()  # the same seeded weights as the step-0 model every rank probed
    batches = [{"input_ids": b} for b in probe_set().split(2)]
    single = run_probe(module.model, batches).to_dict()
    diff = max_abs_diff(comparable(records[0]), comparable(single))
    result = {"steps": [r["step"] for r in records], "max_abs_diff": diff, "world_size": trainer.world_size}
    (out / "compare.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
