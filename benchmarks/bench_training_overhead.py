"""Training wall time with the early-exit callbacks attached against without (issue #9, target 2: ≤ 1.03×).

    python -m benchmarks.bench_training_overhead                  # the default `python train.py` run, 3 × 3 runs
    python -m benchmarks.bench_training_overhead --reps 5 --threads 1
    python -m benchmarks.bench_training_overhead --quick          # CI-sized smoke (experiment=smoke, 4 steps)
    python -m benchmarks.bench_training_overhead -o logger=csv    # extra Hydra overrides for every variant
    python -m benchmarks.bench_training_overhead --variants base probe --variant 'probe/100:callbacks.ee_probe.every_n_steps=100'

Variants (the same composed config, callbacks differ):

- ``base``   — ``~callbacks.ee_probe``: the default run without the probe (checkpoints, logger and validation stay);
- ``probe``  — the default run (``EarlyExitProbe`` at its default cadence);
- ``probe+heads`` — ``callbacks=[default,exit_heads]``: the probe and online exit heads.

Each run is a fresh interpreter (``python -m benchmarks.bench_training_overhead --child``) calling
``ee_callbacks.training.train.train(cfg)``; the variants run alternated (order rotated every repetition) and the
medians of several repetitions are reported, with ratios taken per repetition. Measured per run: wall time of
``train(cfg)``, CPU time of the run's process tree (``RUSAGE_CHILDREN``), and the probe's own time from the records
(``timing.probe_s`` summed over ``ee_probes.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, machine_info, machine_markdown, median, median_ratio

VARIANTS = {
    "base": ["~callbacks.ee_probe"],
    "probe": [],
    "probe+heads": ["callbacks=[default,exit_heads]"],
}
QUICK_OVERRIDES = ["experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=4",
                   "callbacks.model_checkpoint.every_n_train_steps=4"]


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def child(payload: dict) -> dict:
    """One training run in this (fresh) process."""
    if payload.get("threads"):
        import torch

        torch.set_num_threads(int(payload["threads"]))
    from ee_callbacks.training.config import compose_config
    from ee_callbacks.training.train import train

    out_dir = Path(payload["output_dir"])
    cfg = compose_config(list(payload["overrides"]), output_dir=out_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    probe_s, probes = 0.0, 0
    records = out_dir / "ee_probes.jsonl"
    if records.exists():
        for line in records.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                probe_s += float((rec.get("timing") or {}).get("probe_s") or 0.0)
                probes += 1
    return {"wall_s": wall, "cpu_s": cpu, "probe_s": probe_s, "probes": probes,
            "global_step": summary.get("global_step"), "final_train_loss": summary.get("final_train_loss")}


def run_variant(name: str, overrides: list, args) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix="ee_bench_" + "".join(c if c.isalnum() else "_" for c in name) + "_"))
    payload = {"overrides": overrides, "output_dir": str(out_dir), "threads": args.threads}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("WANDB_SILENT", "true")
    if args.in_process:
        try:
            result = child(payload)
        finally:
            if not args.keep:
                shutil.rmtree(out_dir, ignore_errors=True)
        result["process_wall_s"] = result["wall_s"]
        result["tree_cpu_s"] = result["cpu_s"]
        return result
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_training_overhead", "--child", json.dumps(payload)],
                          cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=args.timeout)
    total_wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    result = json.loads(lines[-1])
    result["process_wall_s"] = total_wall
    result["tree_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def markdown(info: dict, args, runs: dict, overrides: list) -> str:
    names = list(runs)
    out = [f"Machine: {machine_markdown(info)}", "",
           f"`train(cfg)` with overrides {overrides or '(none: the default python train.py run)'}; "
           f"{args.reps} alternated repetitions per variant, medians; ratios are medians of per-repetition ratios "
           f"against `base`; torch threads {args.threads or 'default'}.", "",
           "| variant | probes | wall s | wall / base | CPU s (process tree) | CPU / base | probe_s (records) |",
           "|---|---|---|---|---|---|---|"]
    for name in names:
        r = runs[name]
        wall = [x["wall_s"] for x in r]
        cpu = [x["tree_cpu_s"] for x in r]
        base_wall = [x["wall_s"] for x in runs["base"]]
        base_cpu = [x["tree_cpu_s"] for x in runs["base"]]
        out.append(f"| {name} | {r[0]['probes']} | {median(wall):.1f} | **{median_ratio(wall, base_wall):.3f}** | "
                   f"{median(cpu):.1f} | **{median_ratio(cpu, base_cpu):.3f}** | "
                   f"{median([x['probe_s'] for x in r]):.2f} |")
    out.append("")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized smoke: experiment=smoke, 4 steps, one repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the training processes")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDE[;OVERRIDE...]",
                   help="an extra variant, e.g. 'probe/100:callbacks.ee_probe.every_n_steps=100'")
    p.add_argument("-o", "--override", action="append", default=[], help="extra Hydra override for every variant")
    p.add_argument("--timeout", type=float, default=7200.0)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process instead of fresh interpreters (smoke tests only)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
        args.override = QUICK_OVERRIDES + list(args.override)
    if "base" not in args.variants:
        args.variants = ["base"] + list(args.variants)
    args.extra_variants = {}
    for item in args.variant:
        name, _, overrides = item.partition(":")
        if not name or name in VARIANTS:
            raise SystemExit(f"--variant needs a new NAME:OVERRIDES, got {item!r}")
        args.extra_variants[name] = [o for o in overrides.split(";") if o]
    args.variants = list(args.variants) + list(args.extra_variants)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    info = machine_info()
    log(machine_markdown(info))
    runs: dict = {name: [] for name in args.variants}
    names = list(args.variants)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            variant = VARIANTS[name] if name in VARIANTS else args.extra_variants[name]
            res = run_variant(name, variant + list(args.override), args)
            runs[name].append(res)
            if args.json_out:  # partial results survive an interrupted run
                with open(args.json_out, "w") as fh:
                    json.dump({"machine": info, "args": vars(args), "runs": runs}, fh, indent=1, default=str)
            log(f"  rep {rep + 1}/{args.reps} {name}: {res['wall_s']:.1f}s wall, {res['tree_cpu_s']:.1f}s cpu, "
                f"{res['probes']} probes, {res['probe_s']:.2f}s probing")
    text = markdown(info, args, runs, list(args.override))
    print(text)
    result = {"machine": info, "args": vars(args), "runs": runs, "markdown": text}
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
