"""Markdown tables for docs/results.md from experiment directories (each job directory holds ee_probes.jsonl).

    python scripts/results_tables.py outputs/results/arch_compare [more dirs ...]
    python scripts/results_tables.py --speculation outputs/spec/smollm2 [more ee-analyze --speculate outputs ...]

Jobs are grouped into configurations by their config.yaml with `seed` ignored (ee_callbacks.report.group_runs, the
same grouping ee-report draws bands from). Every figure is the mean over a configuration's seeds ± the half-width of
the 95% Student-t interval (n seeds in the table). The last table of each experiment holds the paper's direction next
to ours: the difference of two sides with its 95% Welch interval; "resolved" when that interval excludes 0.
"""

import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ee_callbacks import read_records  # noqa: E402
from ee_callbacks.plotting import ordered_records  # noqa: E402
from ee_callbacks.report import group_runs, load_runs, run_config  # noqa: E402
from ee_callbacks.speculation import spec_estimates  # noqa: E402
from ee_callbacks.stats import mean_ci, t_quantile_975  # noqa: E402

FIGURES = (("val_loss", "val loss"), ("eas", "EAS"), ("oracle_skip_strict", "oracle skip strict"),
           ("oracle_skip_lenient", "oracle skip lenient"), ("static_skip_5pct", "static 5% skip"),
           ("skip@0.95/max_prob", "skip@0.95 max_prob"))


def final_val_loss(job: Path):
    path = job / "csv" / "metrics.csv"
    if not path.exists():
        return None
    values = [float(row["val/loss"]) for row in csv.DictReader(open(path)) if row.get("val/loss")]
    return values[-1] if values else None


def last_figures(run) -> dict:
    last = ordered_records(run.for_set("default"))[-1]
    summary = last["summary"]
    return {"val_loss": final_val_loss(run.source.parent), "eas": summary.get("eas"),
            "oracle_skip_strict": summary.get("oracle_skip_strict"),
            "oracle_skip_lenient": summary.get("oracle_skip_lenient"),
            "static_skip_5pct": summary.get("static_skip_5pct"),
            "skip@0.95/max_prob": (summary.get("skip_at_consistency_0.95") or {}).get("max_prob")}


def fmt_ci(values, digits=3) -> str:
    mean, half, n = mean_ci(values)
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def welch(a, b):
    """Difference of means a − b and the half-width of its 95% Welch interval (None with < 2 values a side)."""
    a = [x for x in a if x is not None]
    b = [x for x in b if x is not None]
    if len(a) < 2 or len(b) < 2:
        return None, None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return ma - mb, t_quantile_975(max(1, math.floor(df))) * se


def groups_of(exp_dir: Path):
    jobs = sorted((p for p in exp_dir.iterdir() if (p / "ee_probes.jsonl").exists()), key=lambda p: int(p.name)
                  if p.name.isdigit() else 0)
    runs = load_runs(jobs)
    return group_runs(runs, ignore=("seed",))


def config_rows(groups) -> list:
    out = ["| configuration | family | layers | params | seeds | " + " | ".join(n for _, n in FIGURES) + " |",
           "|---|---|---|---|---|" + "---|" * len(FIGURES)]
    for label, members in groups.items():
        model = members[0].records[-1]["model"]
        figures = [last_figures(run) for run in members]
        cells = [fmt_ci([f[key] for f in figures]) for key, _ in FIGURES]
        out.append(f"| {label} | {model['family']} | {model['n_layers']} | {model['params']:,} | {len(members)} | "
                   + " | ".join(cells) + " |")
    return out


def step_rows(groups) -> list:
    steps = sorted({r["step"] for members in groups.values() for run in members for r in run.for_set("default")})
    out = ["| configuration | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for label, members in groups.items():
        cells = []
        for step in steps:
            at = [r["summary"] for run in members for r in run.for_set("default") if r["step"] == step]
            cells.append(f"{fmt_ci([s.get('eas') for s in at], 2)} / {fmt_ci([s.get('oracle_skip_strict') for s in at], 2)}"
                         if at else "–")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def agree_rows(groups) -> list:
    """agree per layer at the last probe (mean ± 95% t-interval over seeds), layers as columns."""
    lasts = {label: [ordered_records(run.for_set("default"))[-1] for run in members] for label, members in groups.items()}
    depth = max(row["layer"] for recs in lasts.values() for rec in recs for row in rec["layers"])
    out = ["| configuration | " + " | ".join(f"ℓ={layer}" for layer in range(1, depth)) + " |",
           "|---|" + "---|" * (depth - 1)]
    for label, recs in lasts.items():
        by_layer = [{row["layer"]: row.get("agree") for row in rec["layers"]} for rec in recs]
        out.append(f"| {label} | " + " | ".join(fmt_ci([b.get(layer) for b in by_layer], 2)
                                               if any(layer in b for b in by_layer) else "–"
                                               for layer in range(1, depth)) + " |")
    return out


def sides(exp: str, groups) -> list:
    """(paper's direction, name of the higher side, its runs, name of the lower side, its runs) for the experiment."""
    def runs_where(pred):
        return [run for members in groups.values() for run in members if pred(run)]

    family = lambda run: run.records[-1]["model"]["family"]  # noqa: E731
    if exp == "arch_compare":
        return [("dense > MoE", "dense", runs_where(lambda r: family(r) == "dense"), "moe",
                 runs_where(lambda r: family(r) == "moe")),
                ("MoE > SSM", "moe", runs_where(lambda r: family(r) == "moe"), "ssm",
                 runs_where(lambda r: family(r) == "ssm")),
                ("dense > SSM", "dense", runs_where(lambda r: family(r) == "dense"), "ssm",
                 runs_where(lambda r: family(r) == "ssm"))]
    if exp == "size_scan":
        by_layers = sorted({run.records[-1]["model"]["n_layers"] for members in groups.values() for run in members})
        name = {n: next(run.records[-1]["model"]["name"] for m in groups.values() for run in m
                        if run.records[-1]["model"]["n_layers"] == n) for n in by_layers}
        layers = lambda run: run.records[-1]["model"]["n_layers"]  # noqa: E731
        return [("larger > smaller", name[hi], runs_where(lambda r, n=hi: layers(r) == n), name[lo],
                 runs_where(lambda r, n=lo: layers(r) == n)) for lo, hi in zip(by_layers, by_layers[1:])]
    if exp == "ee_aware":
        aware = lambda run: (run_config(run) or {}).get("early_exit.weights") is not None  # noqa: E731
        return [("ee-aware > plain", "layerskip", runs_where(aware), "plain", runs_where(lambda r: not aware(r)))]
    return []


def direction_rows(exp: str, groups) -> list:
    out = ["| paper's direction | ours: higher − lower side | figure | difference (95% Welch interval) | resolved? |",
           "|---|---|---|---|---|"]
    for direction, hi_name, hi, lo_name, lo in sides(exp, groups):
        for key, name in FIGURES[1:5]:
            diff, half = welch([last_figures(r)[key] for r in hi], [last_figures(r)[key] for r in lo])
            if diff is None:
                continue
            resolved = abs(diff) > half
            verdict = ("yes, paper's direction" if diff > 0 else "yes, opposite") if resolved else "no"
            out.append(f"| {direction} | {hi_name} (n={len(hi)}) − {lo_name} (n={len(lo)}) | {name} | "
                       f"{diff:+.3f} ± {half:.3f} | {verdict} |")
    return out


def tables(exp_dir: Path) -> str:
    groups = groups_of(exp_dir)
    exp = exp_dir.name
    out = [f"### {exp}", "", "Last probe; mean over seeds ± 95% t-interval half-width:", ""]
    out += config_rows(groups)
    out += ["", "EAS / oracle skip (strict) at every probe, mean ± 95% t-interval over seeds:", ""]
    out += step_rows(groups)
    depths = {members[0].records[-1]["model"]["n_layers"] for members in groups.values()}
    if len(depths) == 1:  # one depth: layers line up
        out += ["", "agree (top-1 equals the final top-1) per layer at the last probe, mean ± 95% t-interval over "
                "seeds:", ""]
        out += agree_rows(groups)
    out += ["", "The paper's direction next to ours (last probe; families pool their models' seeds):", ""]
    out += direction_rows(exp, groups)
    return "\n".join(out) + "\n"


def speculation_table(out_dir: Path) -> str:
    """Estimate vs measurement for each (E, k) of the last record with a ``speculation`` entry."""
    rec = [r for r in read_records(out_dir / "ee_probes.jsonl") if r.get("speculation")][-1]
    spec, L = rec["speculation"], rec["model"]["n_layers"]
    name = f"{rec['model'].get('name') or 'model'} — {out_dir.name}"
    if not spec.get("supported"):
        return f"{name}: not measured — {spec.get('reason')}\n"
    greedy = spec["greedy"]
    out = [f"**{name}** (L = {L}; {spec['prompts']} prompts × {spec['prompt_tokens']} tokens, {spec['max_new_tokens']} "
           f"new tokens each; greedy: {greedy['blocks_per_token']:.0f} block calls and "
           f"{greedy['block_positions_per_token']:.1f} block-positions per token, {greedy['wall_s']:.1f} s)", "",
           "| E | k | agree_E (probe) | DESIGN §3 speedup_est | acceptance est → measured | tokens/verification "
           "est → measured | block calls/token est → measured | speedup in block calls | block-positions/token | "
           "identical to greedy | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    agree = {row["layer"]: row.get("agree") for row in rec["layers"]}
    for run in spec["runs"]:
        E, k = run["exit_layer"], run["draft_len"]
        if run.get("error"):
            out.append(f"| {E} | {k} | error: {run['error']} |" + " |" * 8)
            continue
        (est,) = spec_estimates({E: agree[E]}, L, [k])
        out.append(
            f"| {E} | {k} | {est['acceptance']:.3f} | {est['speedup_est']:.3f} | {est['acceptance_est']:.3f} → "
            f"{run['acceptance']:.3f} | {est['tokens_per_verification_est']:.2f} → {run['tokens_per_verification']:.2f} | "
            f"{est['blocks_per_token_est']:.2f} → {run['blocks_per_token']:.2f} | {run['speedup_blocks']:.3f}× | "
            f"{run['block_positions_per_token']:.1f} | {'yes' if run['identical_to_greedy'] else 'NO'} | "
            f"{run['wall_s']:.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--speculation":
        for arg in args[1:]:
            print(speculation_table(Path(arg)))
    else:
        for arg in args:
            print(tables(Path(arg)))
