"""ee-report: figures and report.html from synthetic probe records."""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ee_callbacks.report import build_report, main
from tests.record_factory import make_history, make_record, write_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FIGURES = {"heatmap_agree", "heatmap_kl", "heatmap_ce", "summary", "tradeoff", "cka", "layers_block_influence"}


def _image_sources(html_text: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html_text)


def test_single_run_report_from_cli(tmp_path):
    records = make_history([0, 250, 500, 750, 1000], n_layers=5)
    write_jsonl(tmp_path / "run" / "ee_probes.jsonl", records, torn_tail='{"schema": 1, "step": 12')
    out = tmp_path / "out"

    with pytest.warns(RuntimeWarning, match="does not parse"):
        assert main([str(tmp_path / "run"), "--out", str(out), "--quiet", "--dpi", "50"]) == 0

    html_text = (out / "report.html").read_text(encoding="utf-8")
    sources = _image_sources(html_text)
    assert len(sources) == len(RUN_FIGURES)
    assert {Path(source).stem for source in sources} == RUN_FIGURES
    for source in sources:
        assert not Path(source).is_absolute()
        data = (out / source).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
    assert "Probe set: default" in html_text and "tiny-llama · baseline" in html_text
    assert "Runs compared" not in html_text  # one run: nothing to compare


def test_heatmap_and_curves_hold_the_records_numbers(tmp_path):
    records = make_history([0, 300, 600, 900], n_layers=4, with_embedding=False)
    # Written out of order, with a re-probe of step 300 (a resumed run): the later line wins.
    redone = make_record(300, n_layers=4, with_embedding=False, seed=7)
    write_jsonl(tmp_path / "ee_probes.jsonl", [records[2], records[0], records[1], records[3], redone])
    expected = [records[0], redone, records[2], records[3]]

    report = build_report([tmp_path / "ee_probes.jsonl"], tmp_path / "out", progress=False, dpi=40)

    heat = report.find("heatmap_agree", run_label="tiny-llama · baseline")
    assert heat.data["steps"] == [0, 300, 600, 900]
    assert heat.data["layers"] == [1, 2, 3, 4]
    assert heat.data["values"].shape == (4, 4)
    for j, record in enumerate(expected):
        for i, entry in enumerate(record["layers"]):
            assert heat.data["values"][i, j] == entry["agree"]
    assert redone["layers"][0]["agree"] != records[1]["layers"][0]["agree"]  # the check above could tell them apart

    kl = report.find("heatmap_kl", run_label="tiny-llama · baseline")
    assert np.array_equal(kl.data["values"][:, -1], [entry["kl"] for entry in records[3]["layers"]])

    summary = report.find("summary", run_label="tiny-llama · baseline")
    assert np.array_equal(summary.data["series"]["eas"], [r["summary"]["eas"] for r in expected])
    assert np.array_equal(
        summary.data["series"]["skip_at_consistency_0.95/margin"],
        [r["summary"]["skip_at_consistency_0.95"]["margin"] for r in expected],
    )

    tradeoff = report.find("tradeoff", run_label="tiny-llama · baseline")
    assert tradeoff.data["steps"] == [0, 300, 900]  # first, middle, last
    curve = tradeoff.data["curves"][900]["entropy"]
    assert np.array_equal(curve["skip"], [p["skip"] for p in records[3]["curves"]["entropy"]])
    assert np.array_equal(curve["consistency"], [p["consistency"] for p in records[3]["curves"]["entropy"]])

    cka = report.find("cka", run_label="tiny-llama · baseline")
    assert cka.data["step"] == 900 and cka.data["layers"] == [1, 2, 3, 4]
    assert np.array_equal(cka.data["matrix"], np.array(records[3]["cka"]))

    influence = report.find("layers_block_influence", run_label="tiny-llama · baseline")
    layers, values = influence.data["series"][900]
    assert layers == [1, 2, 3, 4]
    assert np.array_equal(values, [entry["block_influence"] for entry in records[3]["layers"]])


def test_two_runs_are_overlaid_with_a_legend_naming_both(tmp_path):
    llama = make_history([0, 500, 1000], n_layers=6)
    mamba = make_history([0, 400, 800], n_layers=8, model_name="tiny-mamba", experiment="ssm", with_embedding=False)
    write_jsonl(tmp_path / "runs" / "a" / "ee_probes.jsonl", llama)
    write_jsonl(tmp_path / "runs" / "b" / "ee_probes.jsonl", mamba)
    out = tmp_path / "out"

    # One directory holding both runs: found recursively.
    report = build_report([tmp_path / "runs"], out, progress=False, dpi=40)

    labels = ["tiny-llama · baseline", "tiny-mamba · ssm"]
    assert [run.label for run in report.runs] == labels
    overlay = report.find("compare_summary")
    assert overlay.legend == labels
    steps, eas = overlay.data["series"]["eas"]["tiny-mamba · ssm"]
    assert steps == [0, 400, 800] and np.array_equal(eas, [r["summary"]["eas"] for r in mamba])

    layers_overlay = report.find("compare_layers_agree")
    assert layers_overlay.legend == ["tiny-llama · baseline (step 1000)", "tiny-mamba · ssm (step 800)"]
    assert layers_overlay.data["x_label"] == "relative depth ℓ/L"  # 6 vs 8 layers
    x, values, step = layers_overlay.data["series"]["tiny-mamba · ssm"]
    assert step == 800
    assert np.allclose(x, [layer / 8 for layer in range(1, 9)])
    assert np.array_equal(values, [entry["agree"] for entry in mamba[-1]["layers"]])

    html_text = report.html_path.read_text(encoding="utf-8")
    assert "Runs compared" in html_text
    assert all(label in html_text for label in labels)
    for source in _image_sources(html_text):
        assert (out / source).read_bytes()[:8] == PNG_SIGNATURE


def test_probe_sets_get_their_own_sections(tmp_path):
    records = make_history([0, 100], n_layers=3) + make_history([0, 100, 200], n_layers=3, set_name="held_out")
    write_jsonl(tmp_path / "ee_probes.jsonl", records)
    report = build_report([tmp_path], tmp_path / "out", progress=False, dpi=40)

    html_text = report.html_path.read_text(encoding="utf-8")
    assert html_text.index("Probe set: default") < html_text.index("Probe set: held_out")
    held_out = report.find("heatmap_agree", set_name="held_out", run_label="tiny-llama · baseline")
    assert held_out.data["steps"] == [0, 100, 200]
    assert held_out.data["values"][1, 2] == records[-1]["layers"][1]["agree"]
    assert report.find("heatmap_agree", run_label="tiny-llama · baseline").data["steps"] == [0, 100]
    assert held_out.path.parent.parent.name == "held_out"


def test_missing_and_null_fields_are_skipped(tmp_path):
    records = make_history([0, 10], n_layers=3)
    for record in records:
        del record["cka"], record["curves"]
        record["summary"] = {"eas": None}
    records[1]["layers"][2]["agree"] = None
    records[1]["layers"] = records[1]["layers"][1:]  # layer 0 missing at the second probe
    write_jsonl(tmp_path / "ee_probes.jsonl", records)

    report = build_report([tmp_path], tmp_path / "out", progress=False, dpi=40)

    names = {figure.name for figure in report.figures}
    assert names == {"heatmap_agree", "heatmap_kl", "heatmap_ce", "layers_block_influence"}
    values = report.find("heatmap_agree", run_label="tiny-llama · baseline").data["values"]
    assert math.isnan(values[0, 1]) and math.isnan(values[2, 1])
    assert values[1, 1] == records[1]["layers"][0]["agree"]


def test_embed_puts_pngs_inside_the_html(tmp_path):
    write_jsonl(tmp_path / "ee_probes.jsonl", make_history([0, 10], n_layers=2))
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--embed", "--quiet", "--dpi", "30"]) == 0
    sources = _image_sources((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert all(base64.b64decode(source.split(",", 1)[1])[:8] == PNG_SIGNATURE for source in sources)


def test_clear_errors_for_paths_without_records(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err

    (tmp_path / "empty_dir").mkdir()
    assert main([str(tmp_path / "empty_dir"), "--out", str(tmp_path / "out")]) == 2
    assert "no ee_probes.jsonl in this directory or below it" in capsys.readouterr().err

    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "ee_probes.jsonl").write_text("\n")
    assert main([str(tmp_path / "blank"), "--out", str(tmp_path / "out")]) == 2
    assert "no probe records" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.html").exists()


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "ee-report"
    assert script.exists(), "ee-report console script missing; reinstall the package (pip install -e .)"
    write_jsonl(tmp_path / "run" / "ee_probes.jsonl", make_history([0, 10], n_layers=2))
    done = subprocess.run(
        [str(script), str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dpi", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ee-report" in done.stderr  # the tqdm progress bar
    assert (tmp_path / "out" / "report.html").is_file()


def _seed_run(root, name, seed, early_exit, eas_by_step, agree_last):
    """A run directory as train.py writes it: config.yaml (own paths inside) and records with chosen EAS/agree."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"seed: {seed}\nmodel:\n  name: tiny-llama\nearly_exit: {early_exit}\n"
        f"paths:\n  output_dir: {run_dir}\ncallbacks:\n  ee_probe:\n    output_path: {run_dir}/ee_probes.jsonl\n")
    records = []
    for step, eas in eas_by_step.items():
        record = make_record(step, n_layers=3, with_embedding=False)
        record["summary"]["eas"] = eas
        for row in record["layers"]:
            row["agree"] = agree_last[row["layer"] - 1]
        records.append(record)
    write_jsonl(run_dir / "ee_probes.jsonl", records)
    return run_dir


def test_seeds_of_one_configuration_are_grouped_with_t_intervals(tmp_path):
    plain = [_seed_run(tmp_path, f"p{s}", s, "{}", {0: 0.40, 100: v}, [a, 0.5, 1.0])
             for s, v, a in ((1, 0.50, 0.1), (2, 0.56, 0.2), (3, 0.59, 0.6))]
    aware = [_seed_run(tmp_path, f"a{s}", s, "{weights: layerskip}", {0: 0.40, 100: v}, [0.3, 0.5, 1.0])
             for s, v in ((1, 0.60), (2, 0.62))]
    report = build_report(plain + aware, tmp_path / "out", progress=False, dpi=40)

    bands = report.find("compare_summary_seeds")
    series = bands.data["series"]["eas"]
    assert set(series) == {"tiny-llama · baseline (early_exit.weights=–)",
                           "tiny-llama · baseline (early_exit.weights=layerskip)"}
    steps, mean, half, n = series["tiny-llama · baseline (early_exit.weights=–)"]
    # seeds 0.50, 0.56, 0.59: mean 0.55, s = sqrt((.0025 + .0001 + .0016)/2) = sqrt(.0021), t(0.975, 2) = 4.3027
    assert steps == [0, 100] and n == 3
    assert mean[1] == pytest.approx(0.55) and half[1] == pytest.approx(4.3027 * math.sqrt(0.0021) / math.sqrt(3), rel=1e-4)
    assert mean[0] == pytest.approx(0.40) and half[0] == pytest.approx(0.0, abs=1e-12)
    steps, mean, half, n = series["tiny-llama · baseline (early_exit.weights=layerskip)"]
    # 0.60, 0.62: mean 0.61, s = 0.014142, t(0.975, 1) = 12.7062
    assert n == 2 and mean[1] == pytest.approx(0.61) and half[1] == pytest.approx(12.7062 * 0.014142 / math.sqrt(2),
                                                                                   rel=1e-4)
    layers = report.find("compare_layers_agree_seeds").data["series"]["tiny-llama · baseline (early_exit.weights=–)"]
    assert list(layers[0]) == [1, 2, 3] and layers[1][0] == pytest.approx(0.3)   # mean of .1, .2, .6
    assert layers[2][0] == pytest.approx(4.3027 * math.sqrt(0.07) / math.sqrt(3), rel=1e-4)  # s² = (.04+.01+.09)/2
    html_text = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Configurations over seeds" in html_text and "0.550 ± 0.114" in html_text

    # nothing to group: one run per configuration draws no seed figures
    single = build_report(plain[:1] + aware[:1], tmp_path / "out2", progress=False, dpi=40)
    assert not [f for f in single.figures if f.name.endswith("_seeds")]
