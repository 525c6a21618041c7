"""The probe at scale on a GPU: a ≥ 1 B-parameter bf16 Llama built from a config, V = 128k (issue #17, point 5).

    python -m benchmarks.bench_gpu                  # on a CUDA machine: about 5 minutes, prints the tables
    python -m benchmarks.bench_gpu --json-out gpu.json --steps 200 --every-n-steps 50
    python -m benchmarks.bench_gpu --quick          # CPU-tiny smoke of the same code paths (CI: tests/test_benchmarks_smoke.py)

The model is Llama-3.2-1B's shape (d = 2048, 16 blocks, MLP 8192, 32 heads of 64, 8 KV heads, V = 128 256, tied
embeddings: 1.24 B parameters), randomly initialised from ``transformers.LlamaConfig`` (nothing is downloaded), its
head scaled so the readout distributions are peaked as in a trained model. Three measurements, in one process:

1. **Probe against its floor** (``baselines.floor_pass``, strict form: forward with hooks, one bf16 readout matmul
   and one float32 log-softmax per layer, buffers reused), bf16 readouts (``ProbeConfig(dtype="bfloat16")``),
   alternated, synchronised wall seconds, medians of ``--reps``.
2. **bf16 readouts against float32**: the same probe on a float32 copy of the weights; the largest difference of
   each per-layer figure (agree, acc, ce, kl, logit_corr) and of the summaries (eas, oracle skip), so users see what
   bf16 readouts cost in precision.
3. **Training overhead**: a plain training loop (bf16 parameters, fused AdamW, next-token loss on random tokens,
   ``--batch`` × ``--seq-len`` tokens per step) for ``--steps`` steps with ``run_probe`` every ``--every-n-steps``
   steps against the same loop without it, alternated. The ratio is the probe's arithmetic only (no logger or
   file sinks: those are CPU work the callback keeps off the critical path, measured in
   ``bench_training_overhead``); the expected ratio ``probe_s / (every_n · step_s)`` is printed beside it.

On CPU (``--quick``) the same code runs on a tiny config (bf16 as well) so that the smoke test is fast; timings there
mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks import baselines
from benchmarks.common import (machine_info, machine_markdown, median, median_ratio, probe_ids, split_rows,
                               write_json)

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
FIGURES = ("agree", "acc", "ce", "kl", "logit_corr")
SUMMARIES = ("eas", "oracle_skip_strict", "oracle_skip_lenient")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def build_model(shape: dict, seq_len: int, device: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of ``shape``, built directly on ``device`` in ``dtype``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(max_position_embeddings=max(seq_len, 8), **shape)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(dtype)
    with torch.no_grad():  # peaked readout distributions, as in a trained model (tied: scales the embedding too)
        model.lm_head.weight.mul_(4.0)
    return model


def _sync(device: str):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def probe_vs_floor(model, batches, args, dtype_name: str) -> dict:
    from ee_callbacks import ProbeConfig, run_probe
    from ee_callbacks.model_proof import prove_on_probe_set

    parts = prove_on_probe_set(model, batches)  # once, as a callback does at fit start
    config = ProbeConfig(chunk_tokens=args.chunk_tokens, dtype=dtype_name)
    rdtype = getattr(torch, dtype_name)
    warm = [batches[0][:1, :16]]
    baselines.floor_pass(model, parts, warm, rdtype, reuse_buffers=True)
    run_probe(model, warm, config=config, parts=parts)
    times: dict = {"floor": [], "probe": []}
    record = None
    for rep in range(args.reps):
        order = ["floor", "probe"] if rep % 2 == 0 else ["probe", "floor"]
        for name in order:
            if name == "floor":
                times[name].append(timed(lambda: baselines.floor_pass(model, parts, batches, rdtype,
                                                                      reuse_buffers=True), args.device))
            else:
                box = {}
                times[name].append(timed(lambda: box.update(r=run_probe(model, batches, config=config, parts=parts)),
                                         args.device))
                record = box["r"]
            log(f"  probe/floor rep {rep + 1}/{args.reps} {name}: {times[name][-1]:.3f}s")
    return {"times": times, "floor_s": median(times["floor"]), "probe_s": median(times["probe"]),
            "probe_over_floor": median_ratio(times["probe"], times["floor"]), "record": record}


def precision_check(model, batches, args, record_bf16) -> dict:
    """Largest |bf16 − float32| of every per-layer figure and summary (float32 readouts on a float32 copy)."""
    from ee_callbacks import ProbeConfig, run_probe

    model32 = build_model(args.shape, args.seq_len, args.device, torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    record32 = run_probe(model32, batches, config=ProbeConfig(chunk_tokens=args.chunk_tokens, dtype="float32"))
    del model32
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()
    diffs = {}
    for figure in FIGURES:
        pairs = [(a.get(figure), b.get(figure)) for a, b in zip(record_bf16.layers, record32.layers)]
        diffs[figure] = max((abs(a - b) for a, b in pairs if a is not None and b is not None), default=None)
    for name in SUMMARIES:
        a, b = record_bf16.summary.get(name), record32.summary.get(name)
        diffs[name] = abs(a - b) if a is not None and b is not None else None
    return diffs


def training_overhead(model, probe_batches, args, dtype_name: str) -> dict:
    """Steps of a plain bf16 training loop with and without ``run_probe`` every N steps, alternated."""
    from ee_callbacks import ProbeConfig, run_probe

    from ee_callbacks.model_proof import prove_on_probe_set

    config = ProbeConfig(chunk_tokens=args.chunk_tokens, dtype=dtype_name)
    parts = prove_on_probe_set(model, probe_batches)  # once, as a callback does at fit start
    fused = str(args.device).startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused) if fused else \
        torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(args.device)

    def step():
        model.train()
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run(with_probe: bool) -> dict:
        step_s, probe_s = [], []
        _sync(args.device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            step_s.append(timed(step, args.device))
            if with_probe and (i + 1) % args.every_n_steps == 0:
                model.eval()
                probe_s.append(timed(lambda: run_probe(model, probe_batches, config=config, parts=parts),
                                     args.device))
        _sync(args.device)
        return {"wall_s": time.perf_counter() - t0, "step_s": median(step_s), "probe_s": median(probe_s)}

    step()  # warm-up: kernels, optimizer state
    model.eval()
    run_probe(model, [probe_batches[0][:1, :16]], config=config, parts=parts)
    runs: dict = {"train": [], "train+probe": []}
    for rep in range(args.reps):
        order = ["train", "train+probe"] if rep % 2 == 0 else ["train+probe", "train"]
        for name in order:
            runs[name].append(run(name == "train+probe"))
            log(f"  training rep {rep + 1}/{args.reps} {name}: {runs[name][-1]['wall_s']:.2f}s")
    ratio = median_ratio([r["wall_s"] for r in runs["train+probe"]], [r["wall_s"] for r in runs["train"]])
    step_s = median([r["step_s"] for r in runs["train"]])
    probe_s = median([r["probe_s"] for r in runs["train+probe"]])
    return {"runs": runs, "ratio": ratio, "step_s": step_s, "probe_s": probe_s,
            "expected_ratio": 1.0 + probe_s / (args.every_n_steps * step_s) if step_s > 0 else float("nan")}


def markdown(info: dict, args, n_params: int, n_tokens: int, pf: dict, diffs: dict, train: dict) -> str:
    shape = args.shape
    readout_gflop = 2.0 * shape["num_hidden_layers"] * shape["hidden_size"] * shape["vocab_size"] * n_tokens / 1e9
    out = [f"Machine: {machine_markdown(info)}", "",
           f"Model: Llama, d = {shape['hidden_size']}, L = {shape['num_hidden_layers']}, V = {shape['vocab_size']}, "
           f"{n_params / 1e9:.3f} B parameters, {args.dtype}; probe: {n_tokens} scored tokens "
           f"(readouts {readout_gflop:.0f} GFLOP), chunk_tokens = {args.chunk_tokens}; {args.reps} alternated "
           "repetitions, medians, synchronised wall seconds.", "",
           "| measurement | seconds | ratio |", "|---|---|---|",
           f"| floor (strict) | {pf['floor_s']:.3f} | 1 |",
           f"| probe, {args.dtype} readouts | {pf['probe_s']:.3f} | **{pf['probe_over_floor']:.2f}** × floor |",
           f"| training step ({args.batch} × {args.seq_len} tokens) | {train['step_s']:.3f} | |",
           f"| probe inside the training loop | {train['probe_s']:.3f} | "
           f"{train['probe_s'] / train['step_s']:.2f} training steps |",
           f"| training, probe every {args.every_n_steps} steps, against without ({args.steps} steps) | | "
           f"**{train['ratio']:.3f}** (expected {train['expected_ratio']:.3f}) |", "",
           f"bf16 against float32 readouts (largest |Δ| over layers): "
           + ", ".join(f"{k} {v:.2e}" if v is not None else f"{k} -" for k, v in diffs.items()), ""]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-tiny smoke of the same code paths")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=8192, help="scored probe tokens (rounded up to whole rows)")
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="training sequences per step")
    p.add_argument("--steps", type=int, default=100, help="training steps per timed run")
    p.add_argument("--every-n-steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.shape = dict(LLAMA_1B)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.shape, args.seq_len, args.tokens = dict(TINY), 32, 124
        args.chunk_tokens, args.batch, args.steps, args.every_n_steps, args.reps = 64, 2, 4, 2, 1
    elif not str(args.device).startswith("cuda"):
        log("bench_gpu: no CUDA device; a 1.24 B model on CPU takes hours. Use --quick for the CPU smoke.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = machine_info()
    log(machine_markdown(info))
    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, args.seq_len, args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    ids = probe_ids(args.tokens, args.seq_len, args.shape["vocab_size"], seed=2).to(args.device)
    batches = split_rows(ids, max(1, args.chunk_tokens // args.seq_len))
    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    log(f"model {n_params / 1e9:.3f} B parameters on {args.device} ({args.dtype}); probe {n_tokens} tokens")
    pf = probe_vs_floor(model, batches, args, args.dtype)
    diffs = precision_check(model, batches, args, pf.pop("record"))
    train = training_overhead(model, batches, args, args.dtype)
    text = markdown(info, args, n_params, n_tokens, pf, diffs, train)
    print(text)
    result = {"machine": info, "args": {k: v for k, v in vars(args).items()}, "params": n_params, "tokens": n_tokens,
              "probe_vs_floor": pf, "bf16_vs_float32": diffs, "training": train, "markdown": text}
    if str(args.device).startswith("cuda"):
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    if args.json_out:
        write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
