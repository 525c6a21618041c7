"""Training time with the early-exit callbacks attached against without, and where the overhead goes (issue #17).

    python -m benchmarks.bench_training_overhead --reps 3 --threads 1          # every variant, alternated
    python -m benchmarks.bench_training_overhead --reps 4 --threads 1 --variants base probe --concurrent
                                                   # base and probe side by side, one CPU each (a shared machine)
    python -m benchmarks.bench_training_overhead --quick                       # CI-sized smoke (4 steps, 1 rep)
    python -m benchmarks.bench_training_overhead -o trainer.max_steps=200      # extra Hydra overrides for every variant
    python -m benchmarks.bench_training_overhead --variants base probe --variant 'probe/100:callbacks.ee_probe.every_n_steps=100'
    python -m benchmarks.bench_training_overhead --variants base --heads-grid --reps 1   # exit heads: quality vs cost

Variants (the same composed config, callbacks differ):

- ``base``   — ``~callbacks.ee_probe``: the default run without the probe (checkpoints, logger and validation stay);
- ``probe``  — the default run (``EarlyExitProbe`` at its default cadence, W&B extras as configured);
- ``probe-no-extras`` — the probe without W&B extras (tables and images): the probe's cost once W&B drawing is off
  the training thread;
- ``probe/adaptive`` — ``cadence=0.02``: the adaptive cadence (point 3);
- ``probe+heads`` — ``callbacks=[default,exit_heads]``: the probe and online exit heads at their defaults.
- ``--heads-grid`` adds ``heads/n<N>/t<T>`` variants (exit heads every N-th step on T sampled tokens).

One run, three answers (points 1-3 of the issue): every run reports the instrumentation's own meters
(``train(cfg)["instrumentation"]``: wall and process-CPU seconds of the probe's arithmetic, record writes, logger
writes, W&B extras and the exit heads' training), so each piece's share of the run's CPU time comes from the same
process that trained; the ratios against ``base`` come from separate, alternated processes.

Each run is a fresh interpreter (``python -m benchmarks.bench_training_overhead --child``) calling
``ee_callbacks.training.train.train(cfg)``; the variants run alternated (order rotated every repetition) and the
medians of several repetitions are reported with their spread (min-max), ratios taken per repetition. Measured per
run: wall time of ``train(cfg)``, CPU time of the run's process tree (``RUSAGE_CHILDREN``; the W&B service process
included), the instrumentation meters, and the exit heads' quality at the last probe (mean over layers of the tuned
lens' KL and agreement against the logit lens').

On a shared machine the load changes between alternated runs by more than the few per cent being measured (the CPU
seconds of identical work move with what the other hardware threads do). ``--concurrent`` runs a repetition's
variants at the same time instead, each pinned to its own CPU (pinning rotated every repetition), so every variant
of a repetition meets the same load; the CPU seconds of each run then come from ``wait4``.
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

from benchmarks.common import REPO_ROOT, machine_info, machine_markdown, median, write_json

VARIANTS = {
    "base": ["~callbacks.ee_probe"],
    "probe": [],
    "probe-no-extras": ["callbacks.ee_probe.wandb=false"],
    "probe/adaptive": ["callbacks.ee_probe.cadence=0.02"],
    "probe+heads": ["callbacks=[default,exit_heads]"],
}
DEFAULT_VARIANTS = ["base", "probe", "probe-no-extras", "probe/adaptive", "probe+heads"]
# exit heads: (every_n_steps, max_tokens); (1, 512) is the setting before issue #17
HEADS_GRID = [(1, 512), (1, 128), (2, 128), (4, 128)]


def heads_variant(every_n: int, tokens: int) -> list:
    return ["callbacks=[default,exit_heads]", f"callbacks.exit_heads.every_n_steps={every_n}",
            f"callbacks.exit_heads.max_tokens={tokens}"]
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
    probe_s, probes, last = 0.0, 0, None
    records = out_dir / "ee_probes.jsonl"
    if records.exists():
        for line in records.read_text().splitlines():
            if line.strip():
                last = json.loads(line)
                probe_s += float((last.get("timing") or {}).get("probe_s") or 0.0)
                probes += 1
    return {"wall_s": wall, "cpu_s": cpu, "probe_s": probe_s, "probes": probes,
            "global_step": summary.get("global_step"), "final_train_loss": summary.get("final_train_loss"),
            "instrumentation": summary.get("instrumentation") or {}, "heads_quality": heads_quality(last),
            "probe_steps": _probe_steps(records)}


def _probe_steps(records: Path) -> list:
    if not records.exists():
        return []
    return [json.loads(line)["step"] for line in records.read_text().splitlines() if line.strip()]


def heads_quality(record) -> dict:
    """Mean over headed layers of the tuned lens' KL(p_L ‖ p_lens) and agreement, and the logit lens' on the same
    layers, at the last probe (empty without tuned-lens heads)."""
    if not record or "tuned_lens" not in (record.get("heads") or {}):
        return {}
    rows = [r for r in record["heads"]["tuned_lens"] if r.get("kl") is not None]
    lens = {r["layer"]: r for r in record["layers"]}
    layers = [r["layer"] for r in rows]
    if not layers:
        return {}
    mean = lambda values: sum(values) / len(values)
    return {"step": record["step"], "tuned_kl": mean([r["kl"] for r in rows]),
            "tuned_agree": mean([r["agree"] for r in rows]),
            "lens_kl": mean([lens[l]["kl"] for l in layers]), "lens_agree": mean([lens[l]["agree"] for l in layers])}


def _child_setup(name: str, overrides: list, args):
    out_dir = Path(tempfile.mkdtemp(prefix="ee_bench_" + "".join(c if c.isalnum() else "_" for c in name) + "_"))
    payload = {"overrides": overrides, "output_dir": str(out_dir), "threads": args.threads}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("WANDB_SILENT", "true")
    command = [sys.executable, "-m", "benchmarks.bench_training_overhead", "--child", json.dumps(payload)]
    return out_dir, payload, env, command


def _child_result(name: str, stdout: str, stderr: str, returncode: int) -> dict:
    if returncode != 0:
        raise RuntimeError(f"variant {name} failed ({returncode}):\n{stderr[-4000:]}")
    lines = [l for l in stdout.strip().splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


def run_concurrently(named: list, args, rep: int) -> dict:
    """Run ``[(name, overrides), ...]`` at the same time, each pinned to its own CPU (the pinning rotates with
    ``rep``), so that every variant of a repetition meets the same machine load; CPU seconds per run come from
    ``wait4`` (the run's process and its reaped children, the W&B service included)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(named) > len(cpus):
        raise SystemExit(f"--concurrent runs one variant per CPU: {len(named)} variants, {len(cpus)} CPUs")
    started = {}
    for i, (name, overrides) in enumerate(named):
        out_dir, _, env, command = _child_setup(name, overrides, args)
        cpu = cpus[(i + rep) % len(cpus)]
        # output to files, not pipes: the child is reaped by wait4 below (Popen.wait would take its rusage away)
        stdout, stderr = (open(out_dir / f"child.{kind}", "w+") for kind in ("out", "err"))
        proc = subprocess.Popen(command, cwd=str(REPO_ROOT), env=env, stdout=stdout, stderr=stderr, text=True,
                                preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}))
        started[name] = (proc, out_dir, time.perf_counter(), cpu, stdout, stderr)
    results = {}
    for name, (proc, out_dir, t0, cpu, stdout, stderr) in started.items():
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        texts = []
        for handle in (stdout, stderr):
            handle.seek(0)
            texts.append(handle.read())
            handle.close()
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        result = _child_result(name, texts[0], texts[1], proc.returncode)
        result.update(process_wall_s=wall, tree_cpu_s=usage.ru_utime + usage.ru_stime, cpu=cpu)
        results[name] = result
    return results


def run_variant(name: str, overrides: list, args) -> dict:
    out_dir, payload, env, command = _child_setup(name, overrides, args)
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
    proc = subprocess.run(command, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=args.timeout)
    total_wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = _child_result(name, proc.stdout, proc.stderr, proc.returncode)
    result["process_wall_s"] = total_wall
    result["tree_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def spread(values: list, fmt: str = "{:.1f}") -> str:
    """``median (min-max)`` of a list of numbers."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


PROBE_PIECES = ("probe", "records", "loggers", "wandb", "wandb_final")
HEADS_PIECES = ("capture", "heads_train")


def piece_cpu(run: dict, owner: str, piece: str) -> float:
    return float(((run.get("instrumentation") or {}).get(owner) or {}).get(piece, {}).get("cpu_s", 0.0))


def markdown(info: dict, args, runs: dict, overrides: list) -> str:
    names = list(runs)
    base = runs.get("base") or [{"wall_s": float("nan"), "tree_cpu_s": float("nan")}] * args.reps
    out = [f"Machine: {machine_markdown(info)}", "",
           f"`train(cfg)` with overrides {overrides or '(none: the default python train.py run)'}; "
           f"{args.reps} " + ("concurrent repetitions (a repetition's variants run at once, one per CPU, pinned, "
                              "rotating)" if args.concurrent else "alternated repetitions") +
           " per variant, medians with (min-max) over repetitions; ratios are "
           f"per-repetition ratios against `base`; torch threads {args.threads or 'default'}; CPU = process-tree "
           "CPU seconds (user + system).", "",
           "| variant | probes | wall s | wall / base | CPU s | **CPU / base** |",
           "|---|---|---|---|---|---|"]
    for name in names:
        r = runs[name]
        wall, cpu = [x["wall_s"] for x in r], [x["tree_cpu_s"] for x in r]
        wall_ratio = [a / b["wall_s"] for a, b in zip(wall, base)]
        cpu_ratio = [a / b["tree_cpu_s"] for a, b in zip(cpu, base)]
        out.append(f"| {name} | {r[0]['probes']} | {spread(wall)} | {spread(wall_ratio, '{:.3f}')} | {spread(cpu)} | "
                   f"**{spread(cpu_ratio, '{:.3f}')}** |")
    out += ["", "Where the overhead goes, from the callbacks' own meters (process CPU seconds in the training process, "
            "medians; share = piece / the variant's own process CPU):", "",
            "| variant | " + " | ".join(PROBE_PIECES + HEADS_PIECES) + " | instrumentation share |",
            "|---|" + "---|" * (len(PROBE_PIECES) + len(HEADS_PIECES) + 1)]
    for name in names:
        r = runs[name]
        if not any(x.get("instrumentation") for x in r):
            continue
        cells, shares = [], []
        for x in r:
            total = sum(piece_cpu(x, "EarlyExitProbe", p) for p in PROBE_PIECES)
            total += sum(piece_cpu(x, "ExitHeads", p) for p in HEADS_PIECES)
            shares.append(total / x["cpu_s"] if x["cpu_s"] > 0 else float("nan"))
        for owner, pieces in (("EarlyExitProbe", PROBE_PIECES), ("ExitHeads", HEADS_PIECES)):
            for piece in pieces:
                values = [piece_cpu(x, owner, piece) for x in r]
                share = median([v / x["cpu_s"] for v, x in zip(values, r) if x["cpu_s"] > 0])
                cells.append(f"{median(values):.2f} ({100 * share:.1f} %)" if max(values) > 0 else "-")
        out.append(f"| {name} | " + " | ".join(cells) + f" | **{spread([100 * s for s in shares], '{:.1f}')} %** |")
    quality = [(name, runs[name]) for name in names if any(x.get("heads_quality") for x in runs[name])]
    if quality:
        out += ["", "Exit heads: cost against quality at the last probe (tuned lens vs logit lens, mean over the "
                "headed layers; cost = the heads' CPU share of their run):", "",
                "| variant | heads CPU share | tuned-lens KL | logit-lens KL | tuned-lens agree | logit-lens agree |",
                "|---|---|---|---|---|---|"]
        for name, r in quality:
            q = [x["heads_quality"] for x in r if x.get("heads_quality")]
            share = [sum(piece_cpu(x, "ExitHeads", p) for p in HEADS_PIECES) / x["cpu_s"] for x in r if x["cpu_s"]]
            out.append(f"| {name} | {spread([100 * v for v in share], '{:.1f}')} % | "
                       f"{spread([v['tuned_kl'] for v in q], '{:.4f}')} | {spread([v['lens_kl'] for v in q], '{:.4f}')} | "
                       f"{spread([v['tuned_agree'] for v in q], '{:.3f}')} | "
                       f"{spread([v['lens_agree'] for v in q], '{:.3f}')} |")
    adaptive = [x for name in names for x in runs[name] if name.startswith("probe/adaptive")]
    if adaptive:
        out += ["", "Adaptive cadence: probe steps per repetition: " +
                "; ".join(str(x.get("probe_steps")) for x in adaptive)]
    out.append("")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized smoke: experiment=smoke, 4 steps, one repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the training processes")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--heads-grid", action="store_true",
                   help=f"add exit-heads variants heads/n<N>/t<T> for (N, T) in {HEADS_GRID}")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDE[;OVERRIDE...]",
                   help="an extra variant, e.g. 'probe/100:callbacks.ee_probe.every_n_steps=100'")
    p.add_argument("-o", "--override", action="append", default=[], help="extra Hydra override for every variant")
    p.add_argument("--no-base", action="store_true",
                   help="skip the base variant (the meters' shares need no base; the ratio columns are then nan)")
    p.add_argument("--timeout", type=float, default=7200.0)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process instead of fresh interpreters (smoke tests only)")
    p.add_argument("--concurrent", action="store_true",
                   help="run each repetition's variants at the same time, one per CPU (pinned, rotating), so they "
                        "meet the same machine load: for a shared machine; needs a CPU per variant")
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
        args.override = QUICK_OVERRIDES + list(args.override)
    if "base" not in args.variants and not args.no_base:
        args.variants = ["base"] + list(args.variants)
    args.extra_variants = {}
    for item in args.variant:
        name, _, overrides = item.partition(":")
        if not name or name in VARIANTS:
            raise SystemExit(f"--variant needs a new NAME:OVERRIDES, got {item!r}")
        args.extra_variants[name] = [o for o in overrides.split(";") if o]
    if args.heads_grid:
        for every_n, tokens in HEADS_GRID:
            args.extra_variants[f"heads/n{every_n}/t{tokens}"] = heads_variant(every_n, tokens)
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
    overrides = {name: (VARIANTS[name] if name in VARIANTS else args.extra_variants[name]) + list(args.override)
                 for name in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        if args.concurrent:
            batch = run_concurrently([(name, overrides[name]) for name in names], args, rep)
        for name in order:
            res = batch[name] if args.concurrent else run_variant(name, overrides[name], args)
            runs[name].append(res)
            if args.json_out:  # partial results survive an interrupted run
                write_json(args.json_out, {"machine": info, "args": vars(args), "runs": runs})
            log(f"  rep {rep + 1}/{args.reps} {name}: {res['wall_s']:.1f}s wall, {res['tree_cpu_s']:.1f}s cpu, "
                f"{res['probes']} probes, {res['probe_s']:.2f}s probing, heads {res.get('heads_quality')}"
                + (f", CPU {res['cpu']}" if args.concurrent else ""))
    text = markdown(info, args, runs, list(args.override))
    print(text)
    result = {"machine": info, "args": vars(args), "runs": runs, "markdown": text}
    if args.json_out:
        write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
