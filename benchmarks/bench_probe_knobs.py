"""The knobs that cut the probe's cost (issue 17 point 4): time against precision, measured in one process.

    python -m benchmarks.bench_probe_knobs                 # L=12, V=16k, d=128, 1,024 probe tokens, 5 repetitions
    python -m benchmarks.bench_probe_knobs --quick         # CI-sized smoke (seconds)

Variants, run alternated (order rotated every repetition; medians of the per-repetition times):

- ``full``        — every block read out in float32 (the default);
- ``layers``      — ``ProbeConfig(layers="every:4+last:3")`` (a subset of blocks; summaries defined on it);
- ``bf16``        — every block read out in bfloat16 (``dtype="bfloat16"``);
- ``quarter``     — a quarter of the probe tokens (``max_tokens``).

Times are wall and process CPU seconds (a shared machine: CPU seconds are the steadier of the two).

For each variant: the median time and its ratio to ``full``, and the headline figures with their standard errors
(``summary["stderr"]``) and their difference to ``full``. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.common import build_llama, machine_info, machine_markdown, median, median_ratio, probe_ids, \
    split_rows, time_alternated, write_json

FIGURES = ("oracle_skip_strict", "oracle_skip_lenient", "final_ce", "eas", "static_skip_5pct")
LAYER_METRICS = ("ce", "kl", "agree", "acc", "logit_corr", "max_prob", "entropy")


def layer_differences(record: dict, base: dict) -> dict:
    """Largest |difference| over the common blocks of each per-layer figure (e.g. bf16 against float32 readouts)."""
    rows = {row["layer"]: row for row in base["layers"]}
    out = {}
    for metric in LAYER_METRICS:
        diffs = [abs(row[metric] - rows[row["layer"]][metric]) for row in record["layers"]
                 if row.get(metric) is not None and rows.get(row["layer"], {}).get(metric) is not None]
        out[metric] = max(diffs) if diffs else None
    return out


def variants(layers_spec: str, tokens: int) -> dict:
    return {
        "full": {},
        "layers": {"layers": layers_spec},
        "bf16": {"dtype": "bfloat16"},
        "quarter": {"max_tokens": max(1, tokens // 4)},
    }


def _figure_cells(summary: dict, base: dict) -> list:
    cells = []
    for name in FIGURES:
        value, error = summary.get(name), summary.get("stderr", {}).get(name)
        if value is None:
            cells.append("–")
            continue
        text = f"{value:.4f}" + (f" ± {error:.4f}" if error is not None else "")
        if base is not summary and base.get(name) is not None:
            text += f" (Δ {value - base[name]:+.4f})"
        cells.append(text)
    return cells


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=65)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--spec", default="every:4+last:3")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.d_model, args.seq_len, args.tokens, args.reps = 4, 256, 32, 17, 64, 1
        args.spec = "every:2"

    import torch

    from ee_callbacks import run_probe
    from ee_callbacks.model_proof import prove_on_probe_set

    torch.manual_seed(0)
    model = build_llama(args.layers, args.vocab, args.d_model, args.seq_len)
    batches = split_rows(probe_ids(args.tokens, args.seq_len, args.vocab, seed=1), 8)
    configs = variants(args.spec, args.tokens)
    parts = prove_on_probe_set(model, batches)  # once, outside the timing (a callback proves at fit start)
    records: dict = {}

    def runner(name):
        def run():
            records[name] = run_probe(model, batches, config=configs[name], parts=parts).to_dict()
        return run

    cpu: dict = {}
    times = time_alternated({name: runner(name) for name in configs}, args.reps, label="knobs",
                            log=lambda line: print(line, file=sys.stderr), cpu_times=cpu)
    base = records["full"]["summary"]
    rows = []
    header = ("| variant | config | probe tokens | blocks read out | median wall s | × full | median CPU s | × full | "
              + " | ".join(FIGURES) + " |")
    lines = [machine_markdown(machine_info()), "",
             f"Model: random Llama, L = {args.layers}, V = {args.vocab}, d = {args.d_model}; "
             f"{args.reps} alternated repetitions.", "", header, "|" + " --- |" * (8 + len(FIGURES))]
    for name, config in configs.items():
        record = records[name]
        summary = record["summary"]
        probed = summary.get("layers_probed", [row["layer"] for row in record["layers"]])
        ratio, cpu_ratio = median_ratio(times[name], times["full"]), median_ratio(cpu[name], cpu["full"])
        row = {"variant": name, "config": config, "tokens": record["probe"]["tokens"], "blocks": len(probed),
               "median_s": median(times[name]), "ratio": ratio, "times": times[name],
               "median_cpu_s": median(cpu[name]), "cpu_ratio": cpu_ratio, "cpu_times": cpu[name],
               "figures": {f: summary.get(f) for f in FIGURES}, "stderr": summary.get("stderr", {})}
        rows.append(row)
        lines.append(f"| {name} | `{config or 'defaults'}` | {row['tokens']} | {row['blocks']} | "
                     f"{row['median_s']:.3f} | {ratio:.2f} | {row['median_cpu_s']:.3f} | {cpu_ratio:.2f} | " + " | ".join(_figure_cells(summary, base)) + " |")
    bf16 = layer_differences(records["bf16"], records["full"])
    rows[[r["variant"] for r in rows].index("bf16")]["layer_max_abs_diff"] = bf16
    lines += ["", "bf16 against float32 readouts, largest |Δ| over blocks of each per-layer figure:", "",
              "| " + " | ".join(LAYER_METRICS) + " |", "|" + " --- |" * len(LAYER_METRICS),
              "| " + " | ".join("–" if bf16[m] is None else f"{bf16[m]:.1e}" for m in LAYER_METRICS) + " |"]
    result = {"args": vars(args), "rows": rows, "markdown": "\n".join(lines)}
    print(result["markdown"])
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
