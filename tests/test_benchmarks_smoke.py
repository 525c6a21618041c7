"""The hand-run benchmarks (benchmarks/, docs/performance.md) still run in their tiniest modes, and the baselines
they compare against compute the same numbers as run_probe. No timing is asserted: these are not timed tests."""

import math

import pytest
import torch

from benchmarks import baselines, bench_gpu, bench_probe, bench_training_overhead


def test_bench_probe_quick_runs_and_the_naive_baseline_agrees():
    result = bench_probe.main(["--quick"])
    (cell,) = result["cells"]
    # the straightforward implementation (output_hidden_states, full log_softmax, one pass per metric) and
    # run_probe give the same agree / KL / entropy / CE per layer
    assert set(cell["naive_max_abs_diff"]) == set(baselines.NAIVE_METRICS)
    assert cell["naive_agrees"], cell["naive_max_abs_diff"]
    for name in ("floor", "probe", "naive"):
        assert len(cell["times"][name]) == 1 and cell["times"][name][0] > 0
    assert math.isfinite(cell["probe_over_floor"]) and math.isfinite(cell["naive_speedup"])
    if baselines.transformer_lens_available() is not None:  # the optional baseline says why it was skipped
        assert "transformer_lens" in cell["tlens_note"] and "TransformerLens baseline not measured" in result["markdown"]
    assert "| L | V |" in result["markdown"] and "Machine:" in result["markdown"]


def test_floor_and_naive_on_a_small_model_match_run_probe():
    from ee_callbacks import ProbeConfig, find_model_parts, run_probe

    model = bench_probe.build_llama(3, 300, 32, 16, seed=1)
    parts = find_model_parts(model)
    ids = bench_probe.probe_ids(90, 16, 300, seed=2)
    batches = bench_probe.split_rows(ids, 2)
    assert baselines.floor_pass(model, parts, batches) == ids.shape[0] * (ids.shape[1] - 1)
    record = run_probe(model, batches, config=ProbeConfig(chunk_tokens=32))
    diffs = baselines.max_abs_diff(baselines.naive_lens(model, batches), record)
    assert max(diffs.values()) < bench_probe.AGREE_TOL, diffs


def test_bench_probe_memory_child_in_a_fresh_process():
    result = bench_probe.main(["--quick", "--no-time", "--memory"])
    (row,) = result["memory"]
    assert row["method"] == "probe" and row["extra_bytes"] >= 0 and row["unit_bytes"] == 64 * 256 * 4
    assert "peak extra" in result["markdown"]


def test_bench_training_overhead_quick_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("EE_CACHE_DIR", str(tmp_path / "cache"))
    result = bench_training_overhead.main(["--quick", "--in-process", "--variants", "base", "probe+heads",
                                           "probe/adaptive", "--variant", "probe/2:callbacks.ee_probe.every_n_steps=2"])
    runs = result["runs"]
    # every piece of the instrumentation is metered in the run that trained
    probe_costs = runs["probe+heads"][0]["instrumentation"]["EarlyExitProbe"]
    assert probe_costs["probe"]["calls"] == runs["probe+heads"][0]["probes"] and probe_costs["probe"]["cpu_s"] > 0
    assert probe_costs["records"]["calls"] == runs["probe+heads"][0]["probes"]
    assert runs["probe+heads"][0]["instrumentation"]["ExitHeads"]["heads_train"]["calls"] >= 1
    assert set(runs["probe+heads"][0]["heads_quality"]) >= {"tuned_kl", "lens_kl", "tuned_agree", "lens_agree"}
    assert runs["probe/adaptive"][0]["probe_steps"][0] == 0
    assert "Where the overhead goes" in result["markdown"] and "Exit heads: cost against quality" in result["markdown"]
    assert runs["base"][0]["probes"] == 0
    assert runs["probe+heads"][0]["probes"] >= 1 and runs["probe+heads"][0]["probe_s"] > 0
    assert runs["probe/2"][0]["probes"] > runs["probe+heads"][0]["probes"]  # an extra variant with its overrides
    assert runs["base"][0]["global_step"] == runs["probe+heads"][0]["global_step"] == 4
    assert "wall / base" in result["markdown"]


def test_bench_gpu_quick_runs_the_same_code_on_a_tiny_cpu_model():
    result = bench_gpu.main(["--quick"])
    assert result["args"]["dtype"] == "bfloat16" and result["tokens"] == 124
    assert result["probe_vs_floor"]["probe_s"] > 0 and math.isfinite(result["probe_vs_floor"]["probe_over_floor"])
    diffs = result["bf16_vs_float32"]
    assert set(diffs) == set(bench_gpu.FIGURES) | set(bench_gpu.SUMMARIES)
    # bf16 readouts against float32 ones on the same weights: close, but not the same computation
    assert 0 < diffs["kl"] < 0.05 and diffs["agree"] <= 0.1
    train = result["training"]
    assert len(train["runs"]["train+probe"]) == 1 and train["step_s"] > 0 and math.isfinite(train["ratio"])
    assert "| floor (strict) |" in result["markdown"]


def test_bench_probe_knobs_quick_runs_every_variant():
    from benchmarks import bench_probe_knobs

    result = bench_probe_knobs.main(["--quick"])
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"full", "layers", "bf16", "quarter"}
    assert rows["layers"]["blocks"] < rows["full"]["blocks"] and rows["quarter"]["tokens"] < rows["full"]["tokens"]
    assert rows["full"]["stderr"]["oracle_skip_strict"] > 0
    assert "| variant | config |" in result["markdown"]


def test_bench_training_overhead_concurrent_runs_pin_each_variant_to_its_own_cpu(tmp_path, monkeypatch):
    """--concurrent: the variants of a repetition run at once, one per CPU, each run's CPU seconds from wait4."""
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    monkeypatch.setenv("EE_CACHE_DIR", str(tmp_path / "cache"))
    result = bench_training_overhead.main(["--quick", "--concurrent", "--threads", "1", "--variants", "base", "probe"])
    base, probe = result["runs"]["base"][0], result["runs"]["probe"][0]
    assert base["cpu"] != probe["cpu"] and (base["probes"], probe["probes"]) == (0, 2)
    for run in (base, probe):  # the process's own CPU time is part of what wait4 reports for its tree
        assert run["tree_cpu_s"] >= run["cpu_s"] > 0
    assert "concurrent repetitions" in result["markdown"]
