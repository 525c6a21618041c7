"""Shared helpers of the benchmarks: machine description, model builder, alternated timing, peak-RSS measurement."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["loadavg_at_start"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:  # pragma: no cover
        pass
    try:
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_markdown(info: dict) -> str:
    parts = [f"CPU: {info['cpu']} ({info['cores']} cores visible, torch threads {info['torch_threads']}, "
             f"ISA {info.get('cpu_capability')})", f"RAM: {info.get('ram_gib', '?')} GiB",
             f"torch {info['torch']}", f"transformers {info.get('transformers', '-')}", f"python {info['python']}"]
    if "gpu" in info:
        parts.append(f"GPU: {info['gpu']}")
    if "loadavg_at_start" in info:
        parts.append(f"load average at start: {info['loadavg_at_start']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# the model and the probe tokens


def build_llama(n_layers: int, vocab: int, d_model: int, seq_len: int, seed: int = 0):
    """A randomly initialised Llama (transformers) with Llama's proportions: MLP width ≈ 8/3·d, 64-dim heads."""
    import transformers

    torch.manual_seed(seed)
    heads = max(1, d_model // 64)
    inter = max(64, int(round(8 * d_model / 3 / 64)) * 64)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=inter, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(seq_len, 8),
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # random-init logits are nearly flat; scale the head so the distributions are peaked as in a trained model
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def probe_ids(n_tokens: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(rows, seq_len) token ids with rows·(seq_len − 1) ≥ n_tokens scored positions (at least one row)."""
    rows = max(1, -(-n_tokens // (seq_len - 1)))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq_len), generator=g)


def split_rows(ids: torch.Tensor, rows: int) -> list:
    return [ids[i : i + rows] for i in range(0, ids.shape[0], rows)]


def non_embedding_params(model) -> int:
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# --------------------------------------------------------------------------------------------------------------------
# timing


def time_alternated(methods: dict, reps: int, *, log: Callable[[str], None] = print, label: str = "",
                    cpu_times: dict | None = None) -> dict:
    """Run every method ``reps`` times, rotating their order each repetition; returns {name: [seconds, ...]}.

    Rotation puts each method at every position of the cycle, so slow drifts of a shared machine's load hit all
    methods alike; ratios are then taken per repetition (same cycle) before the median. ``cpu_times``, when given,
    receives the process CPU time (user + system, all threads) of every run.
    """
    names = list(methods)
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            methods[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            times[name].append(dt)
            cpu[name].append(dc)
            log(f"  {label} rep {rep + 1}/{reps} {name}: {dt:.2f}s wall, {dc:.2f}s cpu")
    if cpu_times is not None:
        cpu_times.update(cpu)
    return times


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def median_ratio(num: list, den: list) -> float:
    """Median over repetitions of the per-repetition ratio num[i] / den[i]."""
    return median([a / b for a, b in zip(num, den) if b > 0])


# --------------------------------------------------------------------------------------------------------------------
# memory: RSS high-water mark of a fresh process


def rss_bytes() -> int:
    """Current resident set size (VmRSS) of this process in bytes (0 where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (peak RSS since the last reset) in bytes; falls back to ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure_peak_extra(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once and return its peak extra resident memory over the RSS just before it (bytes)."""
    gc.collect()
    before = rss_bytes()
    resettable = reset_peak_rss()
    if not resettable:  # without a reset the high-water mark may predate fn; say so
        before = peak_rss_bytes()
    fn()
    peak = peak_rss_bytes()
    return {"before_bytes": before, "peak_bytes": peak, "extra_bytes": max(0, peak - before), "hwm_reset": resettable}


def run_child(module: str, payload: dict, timeout: float = 3600.0) -> dict:
    """Run ``python -m module --child JSON`` in a fresh interpreter and parse the last stdout line as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps(payload)],
        cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {module} {payload} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {module} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def write_json(path, data: dict) -> None:
    """Write a benchmark's measurements (``default=str`` for anything JSON does not know)."""
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
