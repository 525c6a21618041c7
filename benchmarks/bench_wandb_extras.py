"""What the W&B extras cost next to the probe itself, and how many panels the W&B workspace shows (issue #13).

    python -m benchmarks.bench_wandb_extras                    # default settings: llama_tiny's shape, 9 probes
    python -m benchmarks.bench_wandb_extras --layers 8 32 --images
    python -m benchmarks.bench_wandb_extras --quick            # CI-sized smoke

For each depth L: a randomly initialised Llama (d_model 128, vocabulary 2048, as ``model=llama_tiny``) is probed
``--probes`` times on the default probe set (32 sequences × 128 tokens, batches of 8, default ``ProbeConfig``), each
``run_probe`` timed. The same records are then logged to fresh offline W&B runs, one per variant:

- ``scalars`` — what every Lightning logger gets (``run.log`` of the flattened scalars), no extras;
- ``extras``  — the default extras: ``define_metrics`` + the scalars + ``log_probe`` (charts, growing table);
- ``images``  — (``--images``) the same with ``wandb_images=True`` (matplotlib heatmaps, trade-off, CKA).

Measured per probe: wall time of the extras' calls in the training process (``define_metrics`` + ``log_probe``), and
per run the CPU time of W&B's own ``wandb-core`` process (it writes the tables and artifacts asynchronously, on the
same cores). Reported: medians over the probes, and the extras' cost as a fraction of the probe's median time.

Panels are counted on what W&B itself reads back from the ``extras`` run (``wandb leet inspect --json``): visible
``ee/`` scalar keys (one line chart each), custom charts (``_wandb.visualize.*``) and media keys (the probe table);
the charts' data tables sit in their own ``Custom Chart Tables`` section and are counted apart. For comparison the
``scalars`` run shows what the workspace would hold with nothing hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import build_llama, machine_info, machine_markdown, median, probe_ids, split_rows

VARIANTS = ("scalars", "extras", "images")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def wandb_core_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's ``wandb-core`` children (Linux /proc)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if name == "wandb-core" and int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def probe_records(layers: int, args) -> tuple[list, list]:
    """``args.probes`` records of one model (steps 0, 50, ...) and each probe's wall time."""
    import torch

    from ee_callbacks import ProbeConfig, find_model_parts, run_probe

    torch.manual_seed(0)
    model = build_llama(layers, args.vocab, args.d_model, args.seq_len)
    parts = find_model_parts(model)
    ids = probe_ids(args.sequences * (args.seq_len - 1), args.seq_len, args.vocab)
    batches = split_rows(ids, args.batch_size)
    config = ProbeConfig()
    run_probe(model, batches, config=config, parts=parts, step=0)  # warm-up
    records, seconds = [], []
    for index in range(args.probes):
        t0 = time.perf_counter()
        record = run_probe(model, batches, config=config, parts=parts, step=index * args.every)
        seconds.append(time.perf_counter() - t0)
        records.append(record.to_dict())
        log(f"  L={layers} probe {index + 1}/{args.probes}: {seconds[-1]:.3f}s")
    return records, seconds


def log_variant(variant: str, records: list, root: Path) -> dict:
    """Log the records to a fresh offline run the way ``EarlyExitProbe`` does; time the extras' calls."""
    import wandb

    from ee_callbacks.sinks.loggers import flatten_record_metrics
    from ee_callbacks.sinks.wandb_extras import WandbExtras

    extras = None if variant == "scalars" else WandbExtras(wandb_images=variant == "images")
    run_dir = root / variant
    run_dir.mkdir(parents=True)
    cpu0 = wandb_core_cpu_s()
    run = wandb.init(mode="offline", dir=run_dir, project="bench-wandb-extras", settings=wandb.Settings(silent=True))
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)  # what Lightning's WandbLogger does
    extras_s, scalars_s, history = [], [], []
    for record in records:
        history.append(record)
        scalars = flatten_record_metrics(record, "ee")
        t0 = time.perf_counter()
        if extras is not None:
            assert extras.define_metrics(run, scalars)
        t1 = time.perf_counter()
        run.log({**scalars, "trainer/global_step": record["step"]})
        t2 = time.perf_counter()
        if extras is not None:
            assert extras.log_probe(run, record, history)
        t3 = time.perf_counter()
        extras_s.append((t1 - t0) + (t3 - t2) if extras is not None else 0.0)
        scalars_s.append(t2 - t1)
    t0 = time.perf_counter()
    run.finish()
    finish_s = time.perf_counter() - t0
    return {"extras_s": extras_s, "scalars_s": scalars_s, "finish_s": finish_s,
            "core_cpu_s": wandb_core_cpu_s() - cpu0, "dir": str(run_dir)}


def count_panels(run_dir: str) -> dict:
    """Panels of the automatic workspace, from what ``wandb leet inspect`` reads back."""
    from tests.wandb_inspect import inspect_run

    run = inspect_run(run_dir)
    visible = run.visible_scalar_keys("ee/")
    charts = [key for key in run.charts if key.startswith("ee/")]
    media = [key for key in run.media_keys() if key.startswith("ee/")]
    chart_tables = [key for key in run.media_keys() if key.startswith("Custom Chart Tables/")]
    return {"visible_scalars": len(visible), "charts": len(charts), "media": len(media),
            "panels": len(visible) + len(charts) + len(media), "chart_tables": len(chart_tables),
            "all_ee_scalars": len(run.scalar_keys("ee/"))}


def bench_depth(layers: int, args, root: Path) -> dict:
    records, probe_s = probe_records(layers, args)
    variants = {}
    for variant in args.variants:
        variants[variant] = log_variant(variant, records, root / f"L{layers}")
        log(f"  L={layers} {variant}: extras median {median(variants[variant]['extras_s']) * 1e3:.1f} ms, "
            f"wandb-core cpu {variants[variant]['core_cpu_s']:.2f}s")
    panels = {variant: count_panels(variants[variant]["dir"]) for variant in ("scalars", "extras")
              if variant in variants}
    return {"layers": layers, "probe_s": probe_s, "variants": variants, "panels": panels}


def markdown(info: dict, args, rows: list) -> str:
    lines = [f"Machine: {machine_markdown(info)}", "",
             f"Probe: {args.sequences} × {args.seq_len} tokens, batches of {args.batch_size}, d_model {args.d_model}, "
             f"V = {args.vocab}, default `ProbeConfig`; {args.probes} probes per depth (history grows to "
             f"{args.probes}). Times are medians over the probes.", "",
             "| L | probe | variant | extras in-process | / probe | wandb-core CPU per probe | / probe |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        probe = median(row["probe_s"])
        base_core = row["variants"].get("scalars", {}).get("core_cpu_s", 0.0)
        for variant, result in row["variants"].items():
            extras = median(result["extras_s"])
            core = (result["core_cpu_s"] - base_core) / args.probes if variant != "scalars" else (
                result["core_cpu_s"] / args.probes)
            label = "(scalars themselves)" if variant == "scalars" else "extra over scalars"
            lines.append(f"| {row['layers']} | {probe * 1e3:.0f} ms | {variant} | {extras * 1e3:.1f} ms | "
                         f"{extras / probe:.1%} | {core * 1e3:.0f} ms {label} | {core / probe:.1%} |")
    lines += ["", "| L | visible `ee/` scalars | custom charts | media (probe table) | panels | chart data tables "
              "(own section) | panels with nothing hidden |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        extras = row["panels"].get("extras")
        plain = row["panels"].get("scalars")
        if extras is None:
            continue
        lines.append(f"| {row['layers']} | {extras['visible_scalars']} | {extras['charts']} | {extras['media']} | "
                     f"**{extras['panels']}** | {extras['chart_tables']} | "
                     f"{plain['all_ee_scalars'] if plain else '-'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized smoke: 3 layers, 2 probes, small probe set")
    p.add_argument("--layers", type=int, nargs="+", default=[8])
    p.add_argument("--probes", type=int, default=9, help="probes per depth (the default train.py run makes 9)")
    p.add_argument("--every", type=int, default=50, help="training steps between probes (the records' steps)")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--images", action="store_true", help="also measure wandb_images=True (matplotlib)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json-out", default=None, help="write every measurement to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.probes, args.sequences, args.seq_len, args.d_model, args.vocab = [3], 2, 4, 16, 32, 128
    args.variants = [v for v in VARIANTS if v != "images" or args.images]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_wandb_extras_") as tmp:
        rows = [bench_depth(layers, args, Path(tmp)) for layers in args.layers]
    result = {"machine": info, "rows": rows, "markdown": markdown(info, args, rows)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1, default=str))
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
