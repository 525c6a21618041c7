"""``ee-report``: figures and one HTML page from the probe records of one or more runs.

Usage::

    ee-report RUN_DIR_OR_JSONL [MORE ...] --out DIR [--embed] [--dpi 100] [--quiet]

Each input is a run directory (searched for ``ee_probes.jsonl``, recursively when it is not at the top) or a JSONL
file; every JSONL found is one run (a file holding several, as ``ee-analyze A B --out DIR`` writes, is split by
``model.name · run.experiment``). The report has a section per probe set (the records' ``set`` field); in each:

* when several runs have that set, comparisons first: summary scalars over steps (one line per run) and ``agree``
  per layer at each run's last probe (one line per run), legends naming each run by ``model.name · run.experiment``
  (else its directory name);
* when several runs differ only in ``seed`` (their ``config.yaml``/``.hydra/config.yaml`` compared key by key, the
  run's own directory masked; ``--group-ignore`` names the keys to ignore, default ``seed``): every such group as its
  mean over seeds with a 95% Student-t interval — summary scalars over steps as bands, ``agree`` per layer with error
  bars — and a table of each group's last-probe summaries as mean ± half-width (n runs);
* then per run: heatmaps (layer × step) of ``agree``, ``kl`` and ``ce``; EAS, oracle and static skip and the per-rule
  skip at consistency over steps; exit trade-off curves at the first, middle and last probe; the CKA matrix of the
  last probe; block influence per layer.

A run whose records carry a measured ``speculation`` entry (``ee-analyze --speculate``) gets a table of it, the
estimate beside the measurement. Figures are PNG files under ``DIR/figures/``; ``DIR/report.html`` links them by relative path (``--embed`` puts them
inside the HTML as base64 instead, for a single file to mail around).
"""

from __future__ import annotations


import argparse
import base64
import datetime
import html
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ee_callbacks import plotting
from ee_callbacks.records import read_records

RECORDS_FILE = "ee_probes.jsonl"
DEFAULT_SET = "default"
HEATMAP_METRICS = ("agree", "kl", "ce")
_BLOCK_INFLUENCE_TITLE = "block influence BI_ℓ = 1 − cos(h_(ℓ−1), h_ℓ)"
_TABLE_SUMMARY_KEYS = ("eas", "oracle_skip_strict", "oracle_skip_lenient", "static_skip_5pct", "spec_speedup_est")


class ReportError(Exception):
    """A problem with the report's inputs (no such path, no records); the message says what to do."""


@dataclass
class RunRecords:
    """The records of one run (one JSONL file) and the label figures use for it."""

    label: str
    source: Path
    records: list[dict[str, Any]]

    def for_set(self, set_name: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record_set(record) == set_name]


@dataclass
class ReportFigure:
    """One figure of the report: where its PNG is and the data it drew (``plotting.Plot.data``)."""

    set_name: str
    run_label: str | None  # None for a comparison of several runs
    name: str
    title: str
    path: Path
    data: dict[str, Any]
    legend: list[str] = field(default_factory=list)


@dataclass
class Report:
    out_dir: Path
    html_path: Path
    runs: list[RunRecords]
    figures: list[ReportFigure]

    def find(self, name: str, set_name: str = DEFAULT_SET, run_label: str | None = None) -> ReportFigure:
        """The figure called ``name`` of one run (or the comparison when ``run_label`` is None) in one set."""
        for figure in self.figures:
            if figure.name == name and figure.set_name == set_name and figure.run_label == run_label:
                return figure
        raise KeyError(f"no figure {name!r} for run {run_label!r} in set {set_name!r}")


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (the project's one reader: a torn last line is dropped with a warning)."""
    try:
        return read_records(path)
    except (ValueError, OSError) as error:  # a newer schema, an unreadable file: say so instead of a traceback
        raise ReportError(str(error)) from error


def _split_by_run(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records of one file split by run label (``model.name · run.experiment``): ``ee-analyze A B --out DIR``
    writes both series into one file, and their steps must not be merged into one line."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        parts.setdefault(plotting.run_label(record, ""), []).append(record)
    return list(parts.values())


def record_set(record: dict[str, Any]) -> str:
    name = record.get("set")
    return DEFAULT_SET if name in (None, "") else str(name)


def find_record_files(paths: Iterable[str | Path]) -> list[Path]:
    """The JSONL files named by ``paths``: files as given, directories searched for ``ee_probes.jsonl``."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = [path / RECORDS_FILE] if (path / RECORDS_FILE).is_file() else sorted(path.rglob(RECORDS_FILE))
            if not candidates:
                raise ReportError(
                    f"{path}: no {RECORDS_FILE} in this directory or below it. Pass a run directory of a run with "
                    f"the EarlyExitProbe callback, or the JSONL file itself."
                )
        else:
            raise ReportError(f"{path}: no such file or directory")
        for candidate in candidates:
            if candidate.resolve() not in {known.resolve() for known in found}:
                found.append(candidate)
    return found


def load_runs(paths: Iterable[str | Path]) -> list[RunRecords]:
    """One :class:`RunRecords` per JSONL file found, each with a unique label."""
    paths = list(paths)
    if not paths:
        raise ReportError("no inputs: pass run directories or ee_probes.jsonl files")
    runs: list[RunRecords] = []
    for raw in paths:
        files = find_record_files([raw])
        loaded = [(path, _read_jsonl(path)) for path in files]
        if not any(records for _, records in loaded):
            listing = ", ".join(str(path) for path in files)
            raise ReportError(f"{raw}: no probe records in {listing} (empty, or no line is a JSON object)")
        for path, records in loaded:
            if not records:
                warnings.warn(f"{path}: no probe records; left out of the report", RuntimeWarning, stacklevel=2)
                continue
            if any(run.source.resolve() == path.resolve() for run in runs):
                continue
            fallback = path.parent.name if path.name == RECORDS_FILE else path.stem
            runs += [RunRecords(plotting.run_label(part[0], fallback or str(path)), path, part)
                     for part in _split_by_run(records)]
    _make_labels_unique(runs)
    return runs


def _make_labels_unique(runs: list[RunRecords]) -> None:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:  # same model and experiment (e.g. seeds): tell them apart by directory
            run.label = f"{run.label} [{run.source.parent.name}]"
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"


# ----------------------------------------------------------------------------------------------------------------
# Seed groups


def _flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(mapping, dict):
        return {prefix: mapping}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def run_config(run: RunRecords) -> dict[str, Any] | None:
    """The flattened Hydra config of a run (``config.yaml`` or ``.hydra/config.yaml`` beside its JSONL), with the
    run's own directory masked as ``<run>`` so that output paths compare equal across runs; None without one."""
    import yaml

    directory = run.source.parent
    for candidate in (directory / "config.yaml", directory / ".hydra" / "config.yaml"):
        if candidate.is_file():
            try:
                loaded = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            if isinstance(loaded, dict):
                own = sorted({str(directory), str(directory.resolve())}, key=len, reverse=True)  # longest first
                flat = _flatten(loaded)
                for key, value in flat.items():
                    if isinstance(value, str):
                        for path in own:
                            value = value.replace(path, "<run>")
                        flat[key] = value
                return flat
    return None


def group_runs(runs: Sequence[RunRecords], ignore: Iterable[str] = ("seed",)) -> dict[str, list[RunRecords]]:
    """Runs whose configurations are equal except for the ``ignore`` keys (dotted names), e.g. seeds of one
    configuration. Runs without a config file group by model name, experiment and probe configuration.
    Labels: the runs' common label, plus the config keys that tell groups of the same label apart."""
    import json

    ignore = set(ignore)
    keyed: dict[str, list[RunRecords]] = {}
    configs: dict[str, dict[str, Any]] = {}
    bases: dict[str, str] = {}
    for run in runs:
        config = run_config(run)
        if config is None:
            first = run.records[0]
            config = {"model.name": (first.get("model") or {}).get("name"),
                      "run.experiment": (first.get("run") or {}).get("experiment"),
                      "probe_config": json.dumps(first.get("config"), sort_keys=True, default=str)}
        config = {k: v for k, v in config.items() if k not in ignore}
        key = json.dumps(config, sort_keys=True, default=str)
        keyed.setdefault(key, []).append(run)
        configs[key] = config
        bases[key] = plotting.run_label(run.records[0], run.source.parent.name)
    labels: dict[str, str] = {}
    for key, base in bases.items():
        same = [other for other in keyed if bases[other] == base]
        label = base
        if len(same) > 1:
            # the differing keys, text values first, shortest names first; as few as tell these groups apart
            differing = sorted(
                (name for name in set().union(*(configs[o] for o in same))
                 if len({json.dumps(configs[o].get(name), default=str) for o in same}) > 1),
                key=lambda name: (not any(isinstance(configs[o].get(name), str) for o in same), len(name), name),
            )
            shown = differing[:1]
            while len(shown) < len(differing) and len(
                    {tuple(json.dumps(configs[o].get(n), default=str) for n in shown) for o in same}) < len(same):
                shown = differing[: len(shown) + 1]
            label += " (" + ", ".join(f"{name}={_short(configs[key].get(name))}" for name in shown) + ")"
        labels[key] = label
    return {labels[key]: members for key, members in keyed.items()}


def _short(value: Any) -> str:
    text = "–" if value is None else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


# ----------------------------------------------------------------------------------------------------------------
# Figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _run_figures(records: list[dict[str, Any]]) -> list[Callable[[], plotting.Plot | None]]:
    last = plotting.ordered_records(records)[-1]
    builders: list[Callable[[], plotting.Plot | None]] = [
        (lambda metric=metric: plotting.heatmap(records, metric)) for metric in HEATMAP_METRICS
    ]
    builders += [
        lambda: plotting.summary_over_steps(records),
        lambda: plotting.tradeoff_first_middle_last(records),
        lambda: plotting.cka_heatmap(last),
        lambda: plotting.layer_lines(records, "block_influence", title=_BLOCK_INFLUENCE_TITLE),
    ]
    return builders


def _comparison_figures(runs: dict[str, list[dict[str, Any]]]) -> list[Callable[[], plotting.Plot | None]]:
    return [lambda: plotting.overlay_summary(runs), lambda: plotting.overlay_layer_metric(runs, "agree")]


def _seed_group_figures(groups: dict[str, list[list[dict[str, Any]]]]) -> list[Callable[[], plotting.Plot | None]]:
    return [lambda: plotting.band_summary(groups), lambda: plotting.band_layer_metric(groups, "agree")]


def build_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    embed: bool = False,
    dpi: int = 100,
    progress: bool = True,
    group_ignore: Iterable[str] | None = ("seed",),
) -> Report:
    """Read the runs, draw every figure into ``out_dir/figures`` and write ``out_dir/report.html``.

    ``group_ignore``: config keys ignored when grouping runs into configurations over seeds (None: no grouping).
    """
    from tqdm.auto import tqdm

    runs = load_runs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # records without drawable data still get their table
    figures_dir = out_dir / "figures"
    sets = sorted({record_set(record) for run in runs for record in run.records}, key=lambda s: (s != DEFAULT_SET, s))
    groups = group_runs(runs, group_ignore) if group_ignore is not None else {}
    if not any(len(members) > 1 for members in groups.values()):
        groups = {}

    # (set, run label or None, file stem directory, builder); built first so the progress bar knows the total.
    tasks: list[tuple[str, str | None, Path, Callable[[], plotting.Plot | None]]] = []
    for set_name in sets:
        set_dir = figures_dir / _slug(set_name)
        in_set = {run.label: run.for_set(set_name) for run in runs if run.for_set(set_name)}
        if len(in_set) > 1:
            tasks += [(set_name, None, set_dir / "compare", build) for build in _comparison_figures(in_set)]
        in_groups = {label: [run.for_set(set_name) for run in members if run.for_set(set_name)]
                     for label, members in groups.items()}
        in_groups = {label: members for label, members in in_groups.items() if members}
        if in_groups:
            tasks += [(set_name, None, set_dir / "compare", build) for build in _seed_group_figures(in_groups)]
        for index, (label, records) in enumerate(in_set.items()):
            run_dir = set_dir / f"{index:02d}_{_slug(label)}"
            tasks += [(set_name, label, run_dir, build) for build in _run_figures(records)]

    figures: list[ReportFigure] = []
    for set_name, label, directory, build in tqdm(tasks, desc="ee-report", unit="fig", disable=not progress):
        plot = build()
        if plot is None:
            continue
        path = plot.save(directory / f"{plot.name}.png", dpi=dpi)
        figures.append(ReportFigure(set_name, label, plot.name, plot.title, path, plot.data, plot.legend_labels()))
        plot.close()

    html_path = out_dir / "report.html"
    html_path.write_text(_render_html(runs, sets, figures, out_dir, embed, groups), encoding="utf-8")
    return Report(out_dir, html_path, runs, figures)


# ----------------------------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #666; font-size: 0.85em; }
"""


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _run_table(runs: list[RunRecords], set_name: str) -> str:
    header = ["run", "model", "family", "layers", "params", "probes", "steps", *_TABLE_SUMMARY_KEYS, "EAS from", "file"]
    rows = []
    for run in runs:
        records = plotting.ordered_records(run.for_set(set_name))
        if not records:
            continue
        last = records[-1]
        model = last.get("model") if isinstance(last.get("model"), dict) else {}
        summary = last.get("summary") if isinstance(last.get("summary"), dict) else {}
        steps = [record.get("step") for record in records if isinstance(record.get("step"), int)]
        eas_from = (
            f"{summary.get('eas_similarity')}, α={_format(summary.get('eas_alpha'))}"
            if summary.get("eas_similarity") is not None
            else "–"
        )
        cells = [
            run.label,
            model.get("name"),
            model.get("family"),
            model.get("n_layers"),
            model.get("params"),
            len(records),
            f"{min(steps)}–{max(steps)}" if steps else None,
            *(summary.get(key) if not isinstance(summary.get(key), dict) else None for key in _TABLE_SUMMARY_KEYS),
            eas_from,
            str(run.source),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(_format(cell))}</td>" for cell in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in header) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table><p class='note'>Summary values are those of each run's last probe.</p>"


def _group_table(groups: dict[str, list[RunRecords]], set_name: str) -> str:
    """Each configuration's last-probe summaries over its runs: mean ± 95% t-interval half-width (n)."""
    from ee_callbacks.stats import mean_ci

    header = ["configuration", "runs", *_TABLE_SUMMARY_KEYS]
    rows = []
    for label, members in groups.items():
        lasts = [plotting.ordered_records(run.for_set(set_name))[-1] for run in members if run.for_set(set_name)]
        if not lasts:
            continue
        cells = [html.escape(label), str(len(lasts))]
        for key in _TABLE_SUMMARY_KEYS:
            mean, half, n = mean_ci((last.get("summary") or {}).get(key) for last in lasts)
            cells.append("–" if mean is None else f"{mean:.3f}" + ("" if half is None else f" ± {half:.3f}"))
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in header) + "</tr>"
    return (f"<table>{head}{''.join(rows)}</table><p class='note'>Configurations: runs whose configs differ only in "
            "the ignored keys (seed). Mean ± half-width of the 95% Student-t interval over runs, at the last probe.</p>")


_SPEC_COLUMNS = ("exit_layer", "draft_len", "agree_probe", "acceptance", "tokens_per_verification",
                 "blocks_per_token_est", "blocks_per_token", "block_positions_per_token", "speedup_est",
                 "speedup_blocks", "identical_to_greedy", "wall_s")


def _speculation_html(run: RunRecords, set_name: str) -> str:
    """The measured self-speculation of the run's last record that has one (ee-analyze --speculate)."""
    found = [r for r in plotting.ordered_records(run.for_set(set_name)) if isinstance(r.get("speculation"), dict)]
    if not found:
        return ""
    spec = found[-1]
    spec_step = spec.get("step")
    spec = spec["speculation"]
    if not spec.get("supported"):
        return f"<p class='note'>Self-speculation (step {spec_step}) not measured: {html.escape(str(spec.get('reason')))}</p>"
    greedy = spec.get("greedy") or {}
    rows = []
    for entry in spec.get("runs", []):
        if entry.get("error"):
            rows.append(f"<tr><td>{entry.get('exit_layer')}</td><td>{entry.get('draft_len')}</td>"
                        f"<td colspan='{len(_SPEC_COLUMNS) - 2}'>{html.escape(entry['error'])}</td></tr>")
            continue
        rows.append("<tr>" + "".join(f"<td>{html.escape(_format(entry.get(c)))}</td>" for c in _SPEC_COLUMNS) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in _SPEC_COLUMNS) + "</tr>"
    return (f"<h4>Self-speculation, measured (step {spec_step})</h4><table>{head}{''.join(rows)}</table>"
            f"<p class='note'>{spec.get('prompts')} prompts of {spec.get('prompt_tokens')} tokens, "
            f"{spec.get('max_new_tokens')} new tokens each; greedy: {_format(greedy.get('blocks_per_token'))} blocks "
            f"per token, {_format(greedy.get('wall_s'))} s. {html.escape(str(spec.get('method')))}. speedup_est is the "
            "DESIGN §3 estimate; speedup_blocks = L / blocks_per_token is measured (block calls, not wall time).</p>")


def _figure_html(figure: ReportFigure, out_dir: Path, embed: bool) -> str:
    if embed:
        source = "data:image/png;base64," + base64.b64encode(figure.path.read_bytes()).decode("ascii")
    else:
        source = figure.path.relative_to(out_dir).as_posix()
    title = html.escape(figure.title)
    return f'<figure><img src="{html.escape(source)}" alt="{title}"><figcaption>{title}</figcaption></figure>'


def _render_html(
    runs: list[RunRecords], sets: list[str], figures: list[ReportFigure], out_dir: Path, embed: bool,
    groups: dict[str, list[RunRecords]] | None = None,
) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Early-exit probe report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Early-exit probe report</h1>",
        f"<p class='note'>{len(runs)} run(s), generated {html.escape(now)} by ee-report.</p>",
    ]
    for set_name in sets:
        parts.append(f"<h2>Probe set: {html.escape(set_name)}</h2>")
        parts.append(_run_table(runs, set_name))
        if groups:
            parts.append("<h3>Configurations over seeds</h3>")
            parts.append(_group_table(groups, set_name))
        comparison = [f for f in figures if f.set_name == set_name and f.run_label is None]
        if comparison:
            parts.append("<h3>Runs compared</h3>")
            parts += [_figure_html(figure, out_dir, embed) for figure in comparison]
        for run in runs:
            own = [f for f in figures if f.set_name == set_name and f.run_label == run.label]
            if own:
                parts.append(f"<h3>{html.escape(run.label)}</h3>")
                parts.append(_speculation_html(run, set_name))
                parts += [_figure_html(figure, out_dir, embed) for figure in own]
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ee-report",
        description="Plot early-exit probe records (ee_probes.jsonl) of one or more runs into PNGs and report.html.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="run directory or ee_probes.jsonl file (several are compared)"
    )
    parser.add_argument("--out", default="ee_report", metavar="DIR", help="output directory (default: ./ee_report)")
    parser.add_argument("--embed", action="store_true", help="embed the images in report.html as base64")
    parser.add_argument("--dpi", type=int, default=100, help="PNG resolution (default: 100)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no final message")
    parser.add_argument("--group-ignore", default="seed", metavar="KEYS",
                        help="comma-separated config keys ignored when grouping runs over seeds (default: seed); "
                             "'' to draw no seed groups")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.dpi <= 0:
        print(f"ee-report: error: --dpi must be positive, got {args.dpi}", file=sys.stderr)
        return 2
    try:
        ignore = [key for key in args.group_ignore.split(",") if key] or None
        report = build_report(args.paths, args.out, embed=args.embed, dpi=args.dpi, progress=not args.quiet,
                              group_ignore=ignore)
    except ReportError as error:
        print(f"ee-report: error: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"ee-report: {len(report.figures)} figures, {len(report.runs)} run(s) → {report.html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
