"""Probe time against its floor, against the straightforward baselines, and the probe's peak memory (issue #9).

    python -m benchmarks.bench_probe                     # the full grid: L ∈ {4,12,24} × V ∈ {256, 32k, 128k}
    python -m benchmarks.bench_probe --quick             # CI-sized smoke (seconds)
    python -m benchmarks.bench_probe --layers 12 --vocab 32768 --tokens 16384 --reps 5
    python -m benchmarks.bench_probe --no-time --memory  # only the memory table

Timing (targets 1 and 4): in one process, per grid cell, these run alternated (their order rotated every
repetition) and the median of several repetitions is reported, ratios taken per repetition:

- ``floor``  — forward with hooks + per layer one unembedding matmul and one log-softmax (``baselines.floor_pass``),
  strict form: its (chunk × V) outputs go to reused buffers; ``--natural-floor`` adds the form with fresh tensors;
- ``probe``  — ``run_probe`` with every default metric family on;
- ``naive``  — transformers ``output_hidden_states=True``, full log-softmax per layer, one pass per metric
  (agree, KL, entropy, CE; ``baselines.naive_lens``), checked to give ``run_probe``'s numbers;
- ``tlens``  — TransformerLens' logit lens, only if ``transformer_lens`` is importable.

Memory (target 3): every configuration runs in a fresh interpreter; the peak extra resident memory of one call is
the kernel's RSS high-water mark (``VmHWM``, reset just before the call through ``/proc/self/clear_refs``) minus the
RSS before it. It is reported in bytes and in units of ``chunk_tokens × V × 4 bytes``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time

import torch

from benchmarks import baselines
from benchmarks.common import (
    build_llama,
    fmt_bytes,
    machine_info,
    machine_markdown,
    measure_peak_extra,
    median,
    median_ratio,
    non_embedding_params,
    probe_ids,
    run_child,
    split_rows,
    time_alternated,
)

DEFAULT_LAYERS = (4, 12, 24)
DEFAULT_VOCABS = (256, 32768, 131072)
AGREE_TOL = 2e-4  # |naive − run_probe| per metric (float32 vs float32, different reduction order)


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _probe_fn(module_name: str):
    module = importlib.import_module(module_name)
    return module.run_probe, module.ProbeConfig


def _setup(L: int, V: int, d: int, T: int, tokens: int, chunk: int, seed: int = 0, device: str = "cpu",
           dtype: str = "float32"):
    from ee_callbacks import find_model_parts

    model = build_llama(L, V, d, T, seed=seed).to(device=device, dtype=getattr(torch, dtype))
    parts = find_model_parts(model)
    ids = probe_ids(tokens, T, V, seed=seed + 1).to(device)
    rows = max(1, chunk // T)  # run_probe's rows per forward
    return model, parts, ids, split_rows(ids, rows)


def _synced(fn, device: str):
    """fn, followed by a device synchronisation on accelerators (so wall time covers the queued kernels)."""
    if not str(device).startswith("cuda"):
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


# --------------------------------------------------------------------------------------------------------------------
# timing


def bench_cell(L: int, V: int, args, extra_probes: dict) -> dict:
    model, parts, ids, batches = _setup(L, V, args.d_model, args.seq_len, args.tokens, args.chunk_tokens,
                                        device=args.device, dtype=args.dtype)
    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    run_probe, ProbeConfig = _probe_fn("ee_callbacks.probe")
    rdtype = getattr(torch, args.dtype)
    cfg = ProbeConfig(chunk_tokens=args.chunk_tokens, dtype=args.dtype)
    records: dict = {}
    naive_out: dict = {}

    def probe(name="probe", fn=run_probe, config=cfg, data=batches):
        records[name] = fn(model, data, config=config, parts=parts)  # parts proven once, as a callback does

    methods = {
        "floor": lambda: baselines.floor_pass(model, parts, batches, rdtype, reuse_buffers=True),
        "probe": lambda: probe(),
    }
    if args.natural_floor:
        methods["floor_fresh"] = lambda: baselines.floor_pass(model, parts, batches, rdtype)
    for name, module_name in extra_probes.items():
        fn, Cfg = _probe_fn(module_name)
        methods[name] = (lambda n=name, f=fn, c=Cfg(chunk_tokens=args.chunk_tokens, dtype=args.dtype): probe(n, f, c))
    if not args.no_naive:
        methods["naive"] = lambda: naive_out.update(baselines.naive_lens(model, batches))
    tl_note = baselines.transformer_lens_available()
    tl_out: dict = {}
    if tl_note is None and not args.no_naive:
        try:
            tl_model = baselines.hooked_transformer(model)
            methods["tlens"] = lambda: tl_out.update(baselines.transformer_lens_lens(tl_model, batches))
        except Exception as error:  # noqa: BLE001
            tl_note = f"TransformerLens wrapper failed: {type(error).__name__}: {error}"

    methods = {name: _synced(fn, args.device) for name, fn in methods.items()}
    # warm-up on one short row (library initialisation, first-call allocations), not timed
    warm = [ids[:1, : min(ids.shape[1], 16)]]
    baselines.floor_pass(model, parts, warm, rdtype, reuse_buffers=True)
    baselines.floor_pass(model, parts, warm, rdtype)
    run_probe(model, warm, config=cfg, parts=parts)
    for name, module_name in extra_probes.items():
        fn, Cfg = _probe_fn(module_name)
        fn(model, warm, config=Cfg(chunk_tokens=args.chunk_tokens, dtype=args.dtype))
    if "naive" in methods:
        baselines.naive_lens(model, warm)

    cpu: dict = {}
    times = time_alternated(methods, args.reps, log=log, label=f"L={L} V={V}", cpu_times=cpu)
    row = {
        "L": L, "V": V, "d": args.d_model, "tokens": n_tokens, "chunk_tokens": args.chunk_tokens,
        "params_non_embedding": non_embedding_params(model),
        "readout_gflop": 2.0 * L * args.d_model * V * n_tokens / 1e9,
        "times": {k: v for k, v in times.items()},
        "median_s": {k: median(v) for k, v in times.items()},
        "probe_over_floor": median_ratio(times["probe"], times["floor"]),
        "cpu_times": cpu,
        "probe_over_floor_cpu": median_ratio(cpu["probe"], cpu["floor"]),
    }
    if "floor_fresh" in cpu:
        row["probe_over_floor_fresh_cpu"] = median_ratio(cpu["probe"], cpu["floor_fresh"])
        row["probe_over_floor_fresh"] = median_ratio(times["probe"], times["floor_fresh"])
    for name in extra_probes:
        row[f"{name}_over_floor"] = median_ratio(times[name], times["floor"])
        row[f"{name}_over_probe"] = median_ratio(times[name], times["probe"])
        row[f"{name}_over_probe_cpu"] = median_ratio(cpu[name], cpu["probe"])
        row[f"{name}_max_abs_diff"] = _record_diff(records["probe"], records[name])
    if "naive" in times:
        row["naive_over_floor"] = median_ratio(times["naive"], times["floor"])
        row["naive_over_floor_cpu"] = median_ratio(cpu["naive"], cpu["floor"])
        row["naive_speedup"] = median_ratio(times["naive"], times["probe"])
        row["naive_speedup_cpu"] = median_ratio(cpu["naive"], cpu["probe"])
        row["naive_max_abs_diff"] = baselines.max_abs_diff(naive_out, records["probe"])
        row["naive_agrees"] = all(v <= AGREE_TOL for v in row["naive_max_abs_diff"].values())
    if "tlens" in times:
        row["tlens_over_floor"] = median_ratio(times["tlens"], times["floor"])
        row["tlens_speedup"] = median_ratio(times["tlens"], times["probe"])
        row["tlens_max_abs_diff"] = baselines.max_abs_diff(tl_out, records["probe"])
    row["tlens_note"] = tl_note
    row["probe_timing"] = dict(records["probe"].timing)
    return row


def _record_diff(a, b) -> float:
    """Largest absolute difference between two records' per-layer lens metrics and summary scalars."""
    worst = 0.0
    for ra, rb in zip(a.layers, b.layers):
        for key, va in ra.items():
            vb = rb.get(key)
            if isinstance(va, float) and isinstance(vb, float):
                worst = max(worst, abs(va - vb))
    for key, va in a.summary.items():
        vb = b.summary.get(key)
        if isinstance(va, float) and isinstance(vb, float):
            worst = max(worst, abs(va - vb))
    return worst


# --------------------------------------------------------------------------------------------------------------------
# memory (fresh process per configuration)


def memory_child(payload: dict) -> dict:
    torch.set_num_threads(payload.get("threads") or torch.get_num_threads())
    L, V, d, T = payload["L"], payload["V"], payload["d"], payload["T"]
    tokens, chunk, method = payload["tokens"], payload["chunk_tokens"], payload["method"]
    device, dtype = payload.get("device", "cpu"), payload.get("dtype", "float32")
    model, parts, ids, batches = _setup(L, V, d, T, tokens, chunk, device=device, dtype=dtype)
    from ee_callbacks import ProbeConfig, run_probe

    cfg = ProbeConfig(chunk_tokens=chunk, dtype=dtype)
    if "=" in method:  # NAME=MODULE: another run_probe implementation
        other_run, other_cfg = _probe_fn(method.split("=", 1)[1])
        fn = lambda data: other_run(model, data, config=other_cfg(chunk_tokens=chunk, dtype=dtype), parts=parts)  # noqa: E731,E501
    elif method == "probe":
        fn = lambda data: run_probe(model, data, config=cfg, parts=parts)  # noqa: E731
    elif method == "floor":
        fn = lambda data: baselines.floor_pass(model, parts, data, getattr(torch, dtype), reuse_buffers=True)  # noqa: E731
    elif method == "floor_fresh":
        fn = lambda data: baselines.floor_pass(model, parts, data, getattr(torch, dtype))  # noqa: E731
    elif method == "naive":
        fn = lambda data: baselines.naive_lens(model, data)  # noqa: E731
    else:
        raise ValueError(method)
    fn([ids[:1, :16]])  # warm-up: libraries and first-call state, not measured
    t0 = time.perf_counter()
    if str(device).startswith("cuda"):  # accelerator memory: the caching allocator's high-water mark
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(batches)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out = {"before_bytes": before, "peak_bytes": peak, "extra_bytes": peak - before, "hwm_reset": True}
    else:
        out = measure_peak_extra(lambda: fn(batches))
    out["seconds"] = time.perf_counter() - t0
    rows = max(1, chunk // T)
    out["chunk_tokens_effective"] = rows * (T - 1)
    out["unit_bytes"] = chunk * V * 4
    out["hidden_chunk_bytes"] = (L + 1) * rows * T * d * 4
    out.update(payload)
    return out


def bench_memory(args) -> list:
    results = []
    for V in args.memory_vocabs:
        for tokens in args.memory_tokens:
            for method in args.memory_methods:
                payload = {"method": method, "L": args.memory_layers, "V": V, "d": args.d_model, "T": args.seq_len,
                           "tokens": tokens, "chunk_tokens": args.memory_chunk_tokens, "threads": args.threads,
                           "device": args.device, "dtype": args.dtype}
                log(f"memory: {payload}")
                res = run_child("benchmarks.bench_probe", payload)
                log(f"  extra {fmt_bytes(res['extra_bytes'])} = {res['extra_bytes'] / res['unit_bytes']:.2f} units "
                    f"({res['seconds']:.1f}s)")
                results.append(res)
    return results


# --------------------------------------------------------------------------------------------------------------------
# report


def _v(V: int) -> str:
    return f"{V // 1024}k" if V >= 1024 and V % 1024 == 0 else str(V)


def markdown(info: dict, args, rows: list, memory: list, extra_names: list) -> str:
    out = [f"Machine: {machine_markdown(info)}", ""]
    if rows:
        out.append(f"Timing: d_model={args.d_model}, seq_len={args.seq_len}, chunk_tokens={args.chunk_tokens}, "
                   f"torch threads {torch.get_num_threads()}, {args.reps} alternated repetitions; seconds are median "
                   "process CPU times (user + system), ratios medians of per-repetition ratios (CPU time, and wall "
                   "time where marked).")
        out.append("")
        head = ["L", "V", "tokens", "floor s", "probe s", "probe/floor (cpu)", "probe/floor (wall)"]
        has_fresh = any("probe_over_floor_fresh_cpu" in r for r in rows)
        if has_fresh:
            head += ["fresh-tensor floor s", "probe/fresh floor (cpu)"]
        for name in extra_names:
            head += [f"{name} s", f"{name}/probe"]
        has_naive = any("naive_over_floor" in r for r in rows)
        if has_naive:
            head += ["naive s", "naive/floor (cpu)", "speedup vs naive (cpu)", "(wall)", "naive = probe"]
        has_tl = any("tlens_over_floor" in r for r in rows)
        if has_tl:
            head += ["TL s", "TL/floor", "speedup vs TL"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            m = r["median_s"]
            mc = {k: median(v) for k, v in r["cpu_times"].items()}
            cells = [str(r["L"]), _v(r["V"]), str(r["tokens"]), f"{mc['floor']:.2f}", f"{mc['probe']:.2f}",
                     f"**{r['probe_over_floor_cpu']:.2f}**", f"{r['probe_over_floor']:.2f}"]
            if has_fresh:
                cells += ([f"{mc['floor_fresh']:.2f}", f"{r['probe_over_floor_fresh_cpu']:.2f}"]
                          if "floor_fresh" in mc else ["-", "-"])
            for name in extra_names:
                cells += [f"{mc[name]:.2f}", f"{r[f'{name}_over_probe_cpu']:.2f}"]
            if has_naive:
                if "naive" in m:
                    diff = max(r["naive_max_abs_diff"].values())
                    cells += [f"{mc['naive']:.2f}", f"{r['naive_over_floor_cpu']:.2f}",
                              f"**{r['naive_speedup_cpu']:.2f}×**", f"{r['naive_speedup']:.2f}×",
                              f"{'yes' if r['naive_agrees'] else 'NO'} (max Δ {diff:.1e})"]
                else:
                    cells += ["-"] * 5
            if has_tl:
                cells += ([f"{m['tlens']:.2f}", f"{r['tlens_over_floor']:.2f}", f"{r['tlens_speedup']:.2f}×"]
                          if "tlens" in m else ["-"] * 3)
            out.append("| " + " | ".join(cells) + " |")
        notes = {r.get("tlens_note") for r in rows if r.get("tlens_note")}
        for note in notes:
            out += ["", f"TransformerLens baseline not measured: {note}."]
        out.append("")
    if memory:
        out.append(f"Peak extra RSS of one call (fresh process, VmHWM − RSS before), L={memory[0]['L']}, "
                   f"d_model={memory[0]['d']}, chunk_tokens={memory[0]['chunk_tokens']}; unit = chunk_tokens × V × 4 B.")
        out.append("")
        out.append("| method | V | tokens | peak extra | units | hidden states of one chunk | seconds |")
        out.append("|---|---|---|---|---|---|---|")
        for r in memory:
            out.append(f"| {r['method'].split('=')[0]} | {_v(r['V'])} | {r['tokens']} | {fmt_bytes(r['extra_bytes'])} | "
                       f"**{r['extra_bytes'] / r['unit_bytes']:.2f}** | {fmt_bytes(r['hidden_chunk_bytes'])} | "
                       f"{r['seconds']:.1f} |")
        out.append("")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized smoke: tiny model, one cell, one repetition")
    p.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    p.add_argument("--vocab", type=int, nargs="+", default=list(DEFAULT_VOCABS))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096, help="scored probe tokens per cell (rounded up to whole rows)")
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (on accelerators read the wall-time ratios)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="model and readout dtype (ProbeConfig.dtype); statistics are float32 for half types")
    p.add_argument("--no-naive", action="store_true", help="skip the naive / TransformerLens baselines")
    p.add_argument("--natural-floor", action="store_true",
                   help="also time the floor as written naturally (fresh tensors per op; 'floor' reuses buffers)")
    p.add_argument("--no-time", action="store_true", help="skip the timing grid")
    p.add_argument("--memory", action="store_true", help="also run the memory table (fresh processes)")
    p.add_argument("--memory-layers", type=int, default=4)
    p.add_argument("--memory-vocabs", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--memory-tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--memory-chunk-tokens", type=int, default=1024)
    p.add_argument("--memory-methods", nargs="+", default=["probe", "floor", "naive"],
                   help="probe, floor (strict), floor_fresh, naive, or NAME=MODULE (another run_probe)")
    p.add_argument("--extra-probe", action="append", default=[], metavar="NAME=MODULE",
                   help="also time another run_probe implementation (e.g. orig=ee_orig.probe) and diff its record")
    p.add_argument("--json-out", default=None, help="write every measurement to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.d_model, args.seq_len = [2], [256], 32, 32
        args.tokens, args.chunk_tokens, args.reps = 128, 64, 1
        args.memory_layers, args.memory_vocabs, args.memory_tokens = 2, [256], [128]
        args.memory_chunk_tokens, args.memory_methods = 64, ["probe"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(memory_child(json.loads(args.child))))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    log(machine_markdown(info))
    extra = dict(item.split("=", 1) for item in args.extra_probe)
    rows = []
    if not args.no_time:
        for L in args.layers:
            for V in args.vocab:
                log(f"cell L={L} V={V} d={args.d_model} tokens≈{args.tokens}")
                rows.append(bench_cell(L, V, args, extra))
                r = rows[-1]
                if args.json_out:  # partial results survive an interrupted grid
                    with open(args.json_out, "w") as fh:
                        json.dump({"machine": info, "args": vars(args), "cells": rows}, fh, indent=1, default=str)
                log(f"  probe/floor {r['probe_over_floor_cpu']:.2f} cpu, {r['probe_over_floor']:.2f} wall"
                    + (f"  naive/probe {r['naive_speedup']:.2f}  naive agrees {r['naive_agrees']}"
                       if "naive_speedup" in r else ""))
    memory = bench_memory(args) if args.memory else []
    text = markdown(info, args, rows, memory, list(extra))
    print(text)
    result = {"machine": info, "args": vars(args), "cells": rows, "memory": memory, "markdown": text}
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
