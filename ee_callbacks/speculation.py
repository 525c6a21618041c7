"""Self-speculative decoding, estimated and measured (DESIGN §3).

Two figures, kept apart:

- **Estimate** from a probe's per-layer agreement ``a_E = agree_E`` (teacher-forced on the probe set, i.i.d.
  acceptance). LayerSkip's scheme as DESIGN §3 states it: a cycle drafts ``k`` tokens with blocks ``1..E`` and
  verifies them with blocks ``E+1..L`` reusing the draft's early-layer states, so it emits
  ``T = (1 − a^k)/(1 − a) = Σ_{i<k} a^i`` tokens for ``C = (k·E + L − E)/L`` full passes; ``speedup_est = T / C``.
  With ``k = 1`` this is exactly 1.0 for every ``E``.
- **Measurement** with transformers' own self-speculation, ``generate(assistant_early_exit=E,
  num_assistant_tokens=k)``, against plain greedy decoding on prompts cut from the probe set. Forward hooks on the
  blocks count every block call, so ``blocks_per_token`` (block calls per generated token; greedy decoding: ``L``)
  is a hardware-independent cost; ``speedup_blocks = L / blocks_per_token``. CPU wall time is recorded beside it,
  never as the speedup.

transformers' implementation differs from DESIGN §3's scheme in one way that the measurement inherits: the
verification runs **all** ``L`` blocks over the last emitted token and the ``k`` drafts (the assistant keeps its own
cache; nothing of the draft is reused), and it keeps the full model's prediction after ``k`` accepted drafts. Its
cycle therefore costs ``k·E + L`` block calls and emits ``Σ_{i≤k} a^i`` tokens under i.i.d. acceptance;
``blocks_per_token_est`` is that prediction, the number to hold the measured ``blocks_per_token`` against.

transformers makes the draft by lowering ``config.num_hidden_layers`` of the base model for the draft's forward;
families whose forward ignores that value (GPT-2, GPT-NeoX, Mamba, ...) would silently draft with every block. This
module checks it with a hook count before measuring and records ``supported: false`` with the reason instead.

Plain PyTorch + transformers; no Lightning import.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .metrics.suitability import spec_speedup_table

__all__ = [
    "BlockCallCounter",
    "spec_estimates",
    "best_estimate",
    "spec_grid",
    "early_exit_support",
    "measure_speculation",
    "speculate",
    "prompts_from_batches",
]

METHOD = ("transformers generate(assistant_early_exit=E, num_assistant_tokens=k, constant schedule, no confidence "
          "stop) vs greedy; blocks counted with forward hooks; verification runs all L blocks")


# ------------------------------------------------------------------------------------------------------------ estimate


def _geometric_sum(a: float, n: int) -> float:
    """Σ_{i<n} a^i, exact at a = 1."""
    return float(sum(a ** i for i in range(n)))


def spec_estimates(agree: Mapping[int, float], n_layers: int, draft_lengths: Iterable[int] = range(1, 9)) -> list:
    """Every ``(E, k)`` estimate from per-layer agreement ``{E: agree_E}`` (layers ``1 ≤ E < L``; others ignored).

    Each row: ``exit_layer``, ``draft_len``, ``acceptance`` (= agree_E clamped to [0, 1]),
    ``speedup_est`` = Σ_{i<k} a^i / ((k·E + L − E)/L) (DESIGN §3), and what transformers' implementation (see the
    module docstring) should measure under i.i.d. acceptance: ``blocks_per_token_est`` = (k·E + L) / Σ_{i≤k} a^i,
    ``tokens_per_verification_est`` = Σ_{i≤k} a^i and ``acceptance_est`` = Σ_{i=1..k} a^i / k (accepted drafts per
    draft: drafts after the first rejection of a cycle are wasted).
    """
    L = int(n_layers)
    if L < 2:
        raise ValueError(f"self-speculation needs at least 2 blocks, got n_layers={n_layers}")
    ks = sorted({int(k) for k in draft_lengths})
    exits = sorted((int(E), a) for E, a in agree.items() if a is not None)
    layers = torch.tensor([E for E, _ in exits], dtype=torch.long)
    values = torch.tensor([float(a) for _, a in exits], dtype=torch.float64)
    # the DESIGN §3 estimate itself is the probe core's (one formula for the record and for this table)
    draft_layer, lengths, accept, tokens, cost = spec_speedup_table(values, layers, L, ks)
    rows = []
    for row, E in enumerate(draft_layer.long().tolist()):
        a = float(accept[row])
        for col, k in enumerate(lengths.tolist()):
            rows.append({
                "exit_layer": E,
                "draft_len": k,
                "acceptance": a,
                "speedup_est": float(tokens[row, col] / cost[row, col]),
                "blocks_per_token_est": (k * E + L) / _geometric_sum(a, k + 1),
                "tokens_per_verification_est": _geometric_sum(a, k + 1),
                "acceptance_est": (_geometric_sum(a, k + 1) - 1.0) / k,
            })
    return rows


def best_estimate(rows: Sequence[Mapping]) -> Optional[dict]:
    """The row with the largest ``speedup_est``. Ties (every ``k = 1`` row is exactly 1.0) go to the pair that
    transformers' implementation is predicted to run cheapest (smallest ``blocks_per_token_est``), then to the
    shorter draft and the shallower layer. None for no rows."""
    if not rows:
        return None
    return dict(max(rows, key=lambda r: (round(r["speedup_est"], 12), -r["blocks_per_token_est"], -r["draft_len"],
                                         -r["exit_layer"])))


def spec_grid(best_layer: int, best_k: int, n_layers: int, layer_step: Optional[int] = None,
              draft_lengths: Optional[Iterable[int]] = None) -> list:
    """A small grid around ``(E*, k*)``: E in {E* − s, E*, E* + s} ∩ [1, L − 1] (s = max(1, L // 8)) and
    k in {k* − 1, k*, k* + 1, 2k*} ∩ [1, ∞) unless ``draft_lengths`` is given. Sorted ``(E, k)`` pairs."""
    L = int(n_layers)
    step = max(1, L // 8) if layer_step is None else int(layer_step)
    layers = sorted({e for e in (best_layer - step, best_layer, best_layer + step) if 1 <= e < L})
    ks = sorted({int(k) for k in (draft_lengths or (best_k - 1, best_k, best_k + 1, 2 * best_k)) if int(k) >= 1})
    return [(e, k) for e in layers for k in ks]


# ------------------------------------------------------------------------------------------------------------ counting


class BlockCallCounter:
    """Counts forward calls of each block (and the positions each call processed) while the context is open.

    ``calls[i]`` — forward calls of block ``i + 1``; ``positions[i]`` — sum over those calls of the sequence length
    of the block's first tensor input (dimension 1 when it has ≥ 2 dimensions, else 1). Hooks are removed on exit.
    """

    def __init__(self, blocks: Sequence[nn.Module]):
        self.blocks = list(blocks)
        self.calls = [0] * len(self.blocks)
        self.positions = [0] * len(self.blocks)
        self._handles: list = []

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            self.calls[index] += 1
            first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            self.positions[index] += int(first.shape[1]) if first is not None and first.dim() >= 2 else 1
        return hook

    def __enter__(self) -> "BlockCallCounter":
        self._handles = [b.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def total(self) -> int:
        return sum(self.calls)


# ------------------------------------------------------------------------------------------------------------ measure


def _base_model(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def _blocks(model: nn.Module, blocks: Optional[Sequence[nn.Module]]) -> list:
    if blocks is not None:
        return list(blocks)
    from .model_parts import find_model_parts

    return list(find_model_parts(model).blocks)


@contextlib.contextmanager
def _num_hidden_layers(model: nn.Module, value: int):
    config = _base_model(model).config
    original = config.num_hidden_layers
    config.num_hidden_layers = value
    try:
        yield
    finally:
        config.num_hidden_layers = original


def early_exit_support(model: nn.Module, blocks: Optional[Sequence[nn.Module]] = None,
                       exit_layer: int = 1) -> tuple:
    """``(True, None)`` when transformers' early-exit assistant really stops at ``exit_layer`` for this model, else
    ``(False, reason)``. Checked by counting block calls of one forward with ``num_hidden_layers`` lowered."""
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        return False, f"{type(model).__name__} is not a transformers generation model (no .generate)"
    config = getattr(_base_model(model), "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return False, f"{type(model).__name__}'s config has no num_hidden_layers for assistant_early_exit to lower"
    blocks = _blocks(model, blocks)
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), _num_hidden_layers(model, exit_layer), BlockCallCounter(blocks) as counter:
            model(input_ids=ids, use_cache=False)
    except Exception as err:  # a family that cannot run with fewer layers
        return False, f"a forward with num_hidden_layers={exit_layer} failed ({type(err).__name__}: {err})"
    ran = sum(1 for c in counter.calls if c)
    if ran != exit_layer:
        return False, (f"{type(model).__name__}'s forward ignores config.num_hidden_layers (ran {ran} of {len(blocks)} "
                       f"blocks with it set to {exit_layer}): transformers' assistant_early_exit cannot draft early")
    return True, None


def _generation_config(model: nn.Module, max_new_tokens: int, **extra):
    from transformers import GenerationConfig

    pad = getattr(model.generation_config, "pad_token_id", None)
    return GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False,
                            pad_token_id=0 if pad is None else pad, **extra)


@contextlib.contextmanager
def _decoding_settings(model: nn.Module, k: Optional[int] = None):
    """No end-of-sequence stop (every prompt yields exactly ``max_new_tokens`` in both decodings), and for ``k``:
    transformers reads the assistant's draft length, schedule and confidence stop from the *assistant's* own
    generation_config (here: the model itself). Set on the model's generation_config for the call, restored after."""
    gc = model.generation_config
    values = {"eos_token_id": None}
    if k is not None:
        values.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                      assistant_confidence_threshold=0.0)
    saved = {name: getattr(gc, name, None) for name in values}
    for name, value in values.items():
        setattr(gc, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(gc, name, value)


def measure_speculation(model: nn.Module, prompts: Sequence[torch.Tensor], pairs: Iterable[tuple],
                        max_new_tokens: int = 32, blocks: Optional[Sequence[nn.Module]] = None) -> dict:
    """Greedy decoding vs transformers' self-speculation for each ``(E, k)`` in ``pairs`` on ``prompts``.

    ``prompts``: 1-D (or ``(1, T)``) LongTensors. Returns ``{"supported", "reason", "greedy": {...}, "runs": [...]}``;
    each run has ``exit_layer``, ``draft_len``, ``acceptance`` (accepted drafts / drafts, the usual draft acceptance
    rate; a draft after a rejection in its cycle counts as not accepted), ``tokens_per_verification``
    (tokens emitted per full-model call), ``blocks_per_token``, ``block_positions_per_token`` (block calls weighted by
    the positions each processed), ``speedup_blocks`` (L / blocks_per_token), ``identical_to_greedy`` (every prompt's
    tokens equal greedy's), ``mismatched_prompts``, ``tokens`` and ``wall_s``. Unsupported models return
    ``supported: False`` with the reason and no runs; a run that raises records its ``error``.
    """
    blocks = _blocks(model, blocks)
    L = len(blocks)
    pairs = [(int(e), int(k)) for e, k in pairs]
    for e, k in pairs:
        if not 1 <= e < L or k < 1:
            raise ValueError(f"(exit_layer, draft_len) pairs need 1 ≤ E < L = {L} and k ≥ 1, got {(e, k)}")
    prompts = [p.reshape(1, -1).long() for p in prompts]
    if not prompts:
        raise ValueError("measure_speculation needs at least one prompt")
    out: dict = {"supported": True, "reason": None, "n_layers": L, "prompts": len(prompts),
                 "prompt_tokens": int(prompts[0].shape[1]), "max_new_tokens": int(max_new_tokens), "method": METHOD}
    supported, reason = early_exit_support(model, blocks, pairs[0][0] if pairs else 1)
    if not supported:
        out.update(supported=False, reason=reason, greedy=None, runs=[])
        return out
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        greedy_tokens, counter, wall = [], BlockCallCounter(blocks), 0.0
        with torch.no_grad(), counter, _decoding_settings(model):
            for p in prompts:
                t0 = time.perf_counter()
                seq = model.generate(p.to(device), generation_config=_generation_config(model, max_new_tokens))
                wall += time.perf_counter() - t0
                greedy_tokens.append(seq[0, p.shape[1]:].cpu())
        n_tokens = sum(int(t.numel()) for t in greedy_tokens)
        out["greedy"] = {"blocks_per_token": counter.total / n_tokens,
                         "block_positions_per_token": sum(counter.positions) / n_tokens,
                         "tokens": n_tokens, "wall_s": wall}
        out["runs"] = [_measure_pair(model, blocks, prompts, greedy_tokens, e, k, max_new_tokens, device)
                       for e, k in pairs]
    finally:
        model.train(was_training)
    return out


def _measure_pair(model, blocks, prompts, greedy_tokens, exit_layer, k, max_new_tokens, device) -> dict:
    L = len(blocks)
    row: dict = {"exit_layer": exit_layer, "draft_len": k}
    counter, wall, tokens, mismatched = BlockCallCounter(blocks), 0.0, 0, 0
    try:
        with torch.no_grad(), counter, _decoding_settings(model, k):
            for p, reference in zip(prompts, greedy_tokens):
                config = _generation_config(model, max_new_tokens, assistant_early_exit=exit_layer,
                                            num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                            assistant_confidence_threshold=0.0)
                t0 = time.perf_counter()
                seq = model.generate(p.to(device), generation_config=config)
                wall += time.perf_counter() - t0
                new = seq[0, p.shape[1]:].cpu()
                tokens += int(new.numel())
                mismatched += int(not torch.equal(new, reference))
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"
        return row
    # block L runs only in the full model's calls; block 1 runs in those and in every draft call
    verifications = counter.calls[L - 1]
    drafts = counter.calls[0] - verifications
    accepted = tokens - verifications  # each verification emits its accepted drafts plus the full model's token
    row.update({
        "acceptance": accepted / drafts if drafts else None,
        "tokens_per_verification": tokens / verifications if verifications else None,
        "blocks_per_token": counter.total / tokens,
        "block_positions_per_token": sum(counter.positions) / tokens,
        "speedup_blocks": L * tokens / counter.total,
        "identical_to_greedy": mismatched == 0,
        "mismatched_prompts": mismatched,
        "verifications": verifications,
        "drafts": drafts,
        "tokens": tokens,
        "wall_s": wall,
    })
    return row


# ------------------------------------------------------------------------------------------------------------ driver


def prompts_from_batches(batches: Iterable, n_prompts: int = 8, prompt_tokens: int = 32) -> list:
    """The first ``prompt_tokens`` tokens of the first ``n_prompts`` probe rows (padding rows with a mask skipped)."""
    prompts = []
    for batch in batches:
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        for row in range(ids.shape[0]):
            if mask is not None and int(mask[row, :prompt_tokens].sum()) < prompt_tokens:
                continue
            prompts.append(ids[row, :prompt_tokens].clone())
            if len(prompts) == n_prompts:
                return prompts
    if not prompts:
        raise ValueError("no probe row holds a full prompt: lower prompt_tokens")
    return prompts


def speculate(model: nn.Module, record: Mapping, prompts: Sequence[torch.Tensor], *, max_new_tokens: int = 32,
              draft_lengths: Iterable[int] = range(1, 9), pairs: Optional[Iterable[tuple]] = None,
              blocks: Optional[Sequence[nn.Module]] = None) -> dict:
    """The record's ``speculation`` entry: the estimate from ``record['layers'][*]['agree']``, its best ``(E, k)``
    and a small grid around it (or explicit ``pairs``), each measured with :func:`measure_speculation`; every run
    carries its own estimate beside the measurement."""
    layers = record["layers"]
    L = int(record.get("model", {}).get("n_layers") or max(r["layer"] for r in layers))
    agree = {int(r["layer"]): r.get("agree") for r in layers}
    draft_lengths = sorted({int(k) for k in draft_lengths})
    best = best_estimate(spec_estimates(agree, L, draft_lengths))
    if pairs is None:
        pairs = spec_grid(best["exit_layer"], best["draft_len"], L) if best else []
    pairs = [(int(e), int(k)) for e, k in pairs]
    rows = spec_estimates(agree, L, set(draft_lengths) | {k for _, k in pairs})  # estimates for every measured pair
    result = measure_speculation(model, prompts, list(pairs), max_new_tokens=max_new_tokens, blocks=blocks)
    by_pair = {(r["exit_layer"], r["draft_len"]): r for r in rows}
    for run in result.get("runs", []):
        est = by_pair.get((run["exit_layer"], run["draft_len"])) or {}
        run["agree_probe"] = est.get("acceptance")
        run["speedup_est"] = est.get("speedup_est")
        for key in ("blocks_per_token_est", "tokens_per_verification_est", "acceptance_est"):
            run[key] = est.get(key)
    result["estimate_best"] = best
    return result
