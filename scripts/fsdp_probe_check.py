"""Run EarlyExitProbe under Lightning's FSDP strategy and compare with the single-process probe.

    python scripts/fsdp_probe_check.py OUT_DIR [--accelerator cpu|gpu] [--devices 2] [--wrap blocks|root] [--tol 1e-5]

What it checks (rank 0 writes OUT_DIR/compare.json; the script exits non-zero when a check fails):

1. the helpers of ``ee_callbacks.distributed`` on the sharded model, on every rank (``helpers``): the language
   model's weights are shards outside ``readout_context``; inside it the unembedding, final norm and input embedding
   are the full tensors while transformer blocks wrapped in their own FSDP units stay sharded; the forward through
   ``probe_forward_target`` gives the single-process logits; ``param_count`` gives the unsharded count;
2. ``fit`` 1 (2 steps, probe at steps 0 and 2, then ``trainer.save_checkpoint``; sharded on CPU, full on GPU): the
   records at step 0 and 2 equal ``run_probe`` in one process on the same weights (step 0: the seeded initial model;
   step 2: the trained weights, gathered with ``summon_full_params`` at train end) to ``--tol``;
3. ``fit`` 2 resumes from that checkpoint with a fresh callback to step 4: Lightning's FSDP strategy restores
   callback state *after* ``on_fit_start`` (``restore_checkpoint_after_setup``); the callback's history, last probe
   step and CKA-drift reference come back (the step-4 record has ``cka_drift``), ``ee_probes.jsonl`` holds steps
   0, 2, 4 once each.

Like ``scripts/ddp_probe_check.py`` it must run as a script: Lightning's FSDP strategy re-launches this command for
ranks >= 1 (never from inside pytest's own process).

On CPU (``--accelerator cpu``, gloo; what ``tests/test_fsdp.py`` runs): stock Lightning 2.6 refuses FSDP without a
GPU (``Trainer`` raises "The strategy `fsdp` requires a GPU accelerator"), and torch's FSDP1 needs
``device_id=torch.device("cpu")`` to accept a CPU module; ``CPUFSDPStrategy`` below is a test shim that does both and
nothing else (the sharding, all-gathers and state-dict code are torch's and Lightning's own). On a GPU machine
(``--accelerator gpu``, nccl) the stock ``FSDPStrategy`` is used; run it whenever one is available.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block  # noqa: E402

from ee_callbacks import EarlyExitProbe, read_records, run_probe  # noqa: E402
from ee_callbacks.capture import model_forward  # noqa: E402
from ee_callbacks.distributed import (  # noqa: E402
    is_sharded,
    param_count,
    probe_forward_target,
    probe_shard,
    readout_context_factory,
    wrapped_root,
)
from tests.helpers import TinyLM, loaders  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_probe_check import comparable, max_abs_diff, probe_set  # noqa: E402


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU (tests only): wraps with ``device_id=cpu``; Lightning's own check
    (``type(strategy) is FSDPStrategy``) lets a subclass through."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; the parent would warn that it is ignored
        return super()._setup_model(model)


class RecordingProbe(EarlyExitProbe):
    """EarlyExitProbe that notes the order of ``on_fit_start`` and ``load_state_dict``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def on_fit_start(self, trainer, pl_module):
        self.events.append("on_fit_start")
        super().on_fit_start(trainer, pl_module)

    def load_state_dict(self, state_dict):
        self.events.append("load_state_dict")
        super().load_state_dict(state_dict)


class HelperCheck(L.Callback):
    """At train start (before any step: the weights are the seeded initial ones) check the helpers on every rank."""

    def __init__(self, reference):
        self.reference = reference
        self.result = {}

    def on_train_start(self, trainer, pl_module):
        ref = self.reference
        lm = pl_module.model
        root = wrapped_root(trainer, pl_module)
        ids = probe_set()[:2].to(pl_module.device)
        out = {"rank": trainer.global_rank, "sharded": is_sharded(trainer, pl_module),
               "probe_shard": list(probe_shard(trainer, pl_module))}
        out["lm_head_shape_outside"] = list(lm.lm_head.weight.shape)
        target = probe_forward_target(trainer, pl_module, lm)
        out["forward_target"] = type(target).__name__
        modes = [(m, m.training) for m in lm.modules()]
        lm.eval()
        with torch.no_grad():
            logits = model_forward(target, ids)
        for module, mode in modes:
            module.training = mode
        out["logits_max_abs_diff"] = float((logits.float().cpu() - ref["logits"]).abs().max())
        full = readout_context_factory(trainer, pl_module, lm)
        with torch.no_grad(), full():
            out["lm_head_shape_inside"] = list(lm.lm_head.weight.shape)
            out["unembed_max_abs_diff"] = float((lm.lm_head.weight.cpu() - ref["lm_head"]).abs().max())
            out["final_norm_max_abs_diff"] = float((lm.transformer.ln_f.weight.cpu() - ref["ln_f"]).abs().max())
            out["block_weight_shape_inside"] = list(lm.transformer.h[0].attn.c_attn.weight.shape)
        out["lm_head_shape_after"] = list(lm.lm_head.weight.shape)
        out["param_count"] = param_count(lm, root)
        out["param_count_expected"] = ref["params"]
        self.result = out

    def on_train_end(self, trainer, pl_module):
        # the trained weights in full (every rank takes part in the all-gather; rank 0 keeps them): the reference
        # for the single-process probe of the last step
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = wrapped_root(trainer, pl_module)
        with torch.no_grad(), FullyShardedDataParallel.summon_full_params(root, writeback=False):
            weights = {name.replace("_fsdp_wrapped_module.", ""): p.detach().cpu().clone()
                       for name, p in pl_module.model.named_parameters()}
        self.weights = weights if trainer.is_global_zero else None


def worst_path(a, b, path=""):
    """(largest absolute difference, where) between two JSON-like structures."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = [worst_path(a.get(k), b.get(k), f"{path}.{k}") for k in set(a) | set(b)]
        return max(found + [(0.0, path)], key=lambda item: item[0])
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        found = [worst_path(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
        return max(found + [(0.0, path)], key=lambda item: item[0])
    return max_abs_diff(a, b), f"{path} ({a!r:.60} vs {b!r:.60})"


def reference_record(weights=None, device="cpu", previous=None):
    """The single-process record on the probe set (and its state, the CKA-drift reference of the next probe)."""
    module = TinyLM()
    module.configure_model()
    with torch.no_grad():
        for name, value in (weights or {}).items():
            module.model.get_parameter(name).copy_(value)
    module.to(device)
    batches = [{"input_ids": b} for b in probe_set().split(2)]
    record = run_probe(module.model, batches, previous=previous)
    return record.to_dict(), record.state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--wrap", choices=["blocks", "root"], default="blocks",
                    help="blocks: every GPT2Block its own FSDP unit (the usual LLM policy); root: one unit")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    initial = TinyLM()
    initial.configure_model()
    initial.eval()
    with torch.no_grad():
        reference = {
            "logits": initial.model(probe_set()[:2]).logits.float(),
            "lm_head": initial.model.lm_head.weight.detach().clone(),
            "ln_f": initial.model.transformer.ln_f.weight.detach().clone(),
            "params": sum(p.numel() for p in initial.model.parameters()),
        }
    device = "cuda" if args.accelerator in ("gpu", "cuda") else "cpu"

    def make_strategy():
        policy = {GPT2Block} if args.wrap == "blocks" else None
        kwargs = {"auto_wrap_policy": policy} if policy else {}
        if device == "cpu":
            # "full" checkpoints gather with offload_to_cpu=True, which segfaults on CPU modules (torch 2.13)
            return CPUFSDPStrategy(process_group_backend="gloo", state_dict_type="sharded", **kwargs)
        return FSDPStrategy(**kwargs)

    def make_probe():
        return RecordingProbe(every_n_steps=2, probe_data=probe_set(), probe_set={"batch_size": 2},
                              output_path=out / "ee_probes.jsonl", print_table=False)

    def make_trainer(max_steps, callbacks):
        return L.Trainer(
            accelerator=args.accelerator, devices=args.devices, strategy=make_strategy(), max_steps=max_steps,
            callbacks=callbacks, logger=False, default_root_dir=str(out), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        )

    # ---- fit 1: helpers at train start, probes at steps 0 and 2, then a checkpoint (sharded on CPU, full on GPU)
    train, val = loaders()
    helper = HelperCheck(reference)
    probe = make_probe()
    trainer = make_trainer(2, [helper, probe])
    trainer.fit(TinyLM(), train, val)
    ckpt = out / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    (out / f"helpers_rank{trainer.global_rank}.json").write_text(json.dumps(helper.result))

    # ---- fit 2: resume with a fresh callback
    train, val = loaders()
    resumed = make_probe()
    trainer2 = make_trainer(4, [resumed])
    trainer2.fit(TinyLM(), train, val, ckpt_path=str(ckpt))
    if trainer2.global_rank != 0:
        return

    failures = []
    records = read_records(out / "ee_probes.jsonl")
    steps = [r["step"] for r in records]
    by_step = {r["step"]: r for r in records}
    single0, state0 = reference_record(device=device)
    single2, _ = reference_record(helper.weights, device, previous=state0)  # cka_drift against step 0, as in training
    worst = {"step0": worst_path(comparable(by_step[0]), comparable(single0)),
             "step2": worst_path(comparable(by_step[2]), comparable(single2))}
    diffs = {name: diff for name, (diff, _) in worst.items()}
    helpers = [json.loads((out / f"helpers_rank{r}.json").read_text()) for r in range(trainer2.world_size)]
    result = {
        "world_size": trainer2.world_size,
        "strategy": type(trainer2.strategy).__name__,
        "wrap": args.wrap,
        "restore_after_setup": bool(trainer2.strategy.restore_checkpoint_after_setup),
        "events_fit2": resumed.events,
        "steps": steps,
        "history_steps": [h["step"] for h in resumed.history],
        "last_probe_step": resumed.last_probe_step,
        "cka_drift_at_4": by_step.get(4, {}).get("cka_drift"),
        "max_abs_diff": diffs,
        "worst_at": {name: where for name, (_, where) in worst.items()},
        "model_params_in_record": by_step[0]["model"].get("params"),
        "helpers": helpers,
    }
    if result["world_size"] != args.devices:
        failures.append("world size")
    if steps != [0, 2, 4]:
        failures.append(f"records at steps {steps}, expected [0, 2, 4] once each")
    if result["history_steps"] != [0, 2, 4] or result["last_probe_step"] != 4:
        failures.append("callback history / last probe step not restored")
    if resumed.events[:2] != ["on_fit_start", "load_state_dict"]:
        failures.append(f"expected state restored after on_fit_start under FSDP, saw {resumed.events}")
    if not result["cka_drift_at_4"] or any(v is None for v in result["cka_drift_at_4"]):
        failures.append("no CKA drift at step 4: the drift reference was not restored")
    for name, diff in diffs.items():
        if not diff < args.tol:
            failures.append(f"{name} record differs from the single-process one by {diff}")
    if result["model_params_in_record"] != reference["params"]:
        failures.append(f"record model.params {result['model_params_in_record']} != {reference['params']}")
    for h in helpers:
        r = h["rank"]
        if not h["sharded"] or h["probe_shard"] != [0, 1]:
            failures.append(f"rank {r}: not detected as sharded")
        if h["lm_head_shape_outside"] == list(reference["lm_head"].shape):
            failures.append(f"rank {r}: lm_head is not sharded outside readout_context (nothing was tested)")
        if h["lm_head_shape_inside"] != list(reference["lm_head"].shape) or h["unembed_max_abs_diff"] > 0:
            failures.append(f"rank {r}: readout_context did not gather the unembedding")
        if h["final_norm_max_abs_diff"] > 0:
            failures.append(f"rank {r}: readout_context did not gather the final norm")
        if h["lm_head_shape_after"] != h["lm_head_shape_outside"]:
            failures.append(f"rank {r}: parameters not resharded after readout_context")
        if args.wrap == "blocks" and h["block_weight_shape_inside"] == [32, 96]:
            failures.append(f"rank {r}: readout_context gathered a block it did not need")
        if not h["logits_max_abs_diff"] < args.tol:
            failures.append(f"rank {r}: forward through probe_forward_target differs by {h['logits_max_abs_diff']}")
        if h["param_count"] != h["param_count_expected"]:
            failures.append(f"rank {r}: param_count {h['param_count']} != {h['param_count_expected']}")
    result["failures"] = failures
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
