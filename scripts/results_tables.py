"""Markdown tables for docs/results.md from experiment directories (each job directory holds ee_probes.jsonl).

    python scripts/results_tables.py outputs/results/arch_compare [more dirs ...]
"""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ee_callbacks import read_records  # noqa: E402


def final_val_loss(job: Path):
    path = job / "csv" / "metrics.csv"
    if not path.exists():
        return None
    values = [float(row["val/loss"]) for row in csv.DictReader(open(path)) if row.get("val/loss")]
    return values[-1] if values else None


def fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def tables(exp_dir: Path) -> str:
    jobs = sorted((p for p in exp_dir.iterdir() if (p / "ee_probes.jsonl").exists()), key=lambda p: p.name)
    out = [f"### {exp_dir.name}", ""]
    out.append("| job | model | family | layers | params | val loss | EAS (first → last) | oracle skip strict | "
               "oracle skip lenient | static 5% skip | skip@0.95 max_prob | probe tokens |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    series = []
    for job in jobs:
        recs = [r for r in read_records(job / "ee_probes.jsonl") if r.get("set", "default") == "default"]
        first, last = recs[0], recs[-1]
        s0, s1 = first["summary"], last["summary"]
        name = (last.get("run") or {}).get("name") or last["model"]["name"]
        ee = ""
        cfg = job / "config.yaml"
        if cfg.exists() and "early_exit:" in cfg.read_text():
            text = cfg.read_text()
            ee = " (ee-aware)" if "curriculum" in text.split("early_exit:")[1][:400] else ""
        out.append(
            f"| {job.name} | {name}{ee} | {last['model']['family']} | {last['model']['n_layers']} | "
            f"{last['model']['params']:,} | {fmt(final_val_loss(job))} | {fmt(s0.get('eas'))} → {fmt(s1.get('eas'))} | "
            f"{fmt(s1.get('oracle_skip_strict'))} | {fmt(s1.get('oracle_skip_lenient'))} | "
            f"{fmt(s1.get('static_skip_5pct'))} | {fmt((s1.get('skip_at_consistency_0.95') or {}).get('max_prob'))} | "
            f"{last['probe']['tokens']} |")
        series.append((f"{name}{ee}", recs))
    out += ["", "EAS / oracle skip (strict) / static 5% skip over training steps:", ""]
    steps = sorted({r["step"] for _, recs in series for r in recs})
    out.append("| model | " + " | ".join(f"step {s}" for s in steps) + " |")
    out.append("|---|" + "---|" * len(steps))
    for name, recs in series:
        by = {r["step"]: r["summary"] for r in recs}
        cells = [f"{fmt(by[s].get('eas'), 2)} / {fmt(by[s].get('oracle_skip_strict'), 2)} / "
                 f"{fmt(by[s].get('static_skip_5pct'), 2)}" if s in by else "–" for s in steps]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(tables(Path(arg)))
