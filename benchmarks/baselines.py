"""What ``run_probe`` is measured against (issue #9).

- :func:`floor_pass` — the floor: one forward pass over the probe tokens with hidden states captured by hooks, plus per
  probed layer one unembedding matmul (readout ``U(N(h_ℓ))``, ``2·d·V`` FLOPs per token and layer) and one log-softmax
  over its logits, in the same dtype and the same token chunks as the probe. Nothing else: no statistic is reduced.
  Two forms: as written naturally (fresh tensors) and strict (buffers reused, ``reuse_buffers=True``).
- :func:`naive_lens` — the straightforward implementation a user would write: transformers'
  ``output_hidden_states=True``, the full ``log_softmax`` of every layer materialised, each metric in its own pass
  (agree, KL, entropy, cross-entropy). Its numbers must equal ``run_probe``'s.
- :func:`transformer_lens_lens` — TransformerLens's idiomatic logit lens (``run_with_cache`` +
  ``accumulated_resid`` + unembed), only when ``transformer_lens`` is importable (an optional extra, not installed
  by default).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ee_callbacks.capture import HiddenStateCapture, model_forward
from ee_callbacks.model_parts import ModelParts

NAIVE_METRICS = ("agree", "kl", "entropy", "ce")


def _scored(ids: torch.Tensor) -> tuple:
    """(selection mask over the flattened (B·T) positions, next-token targets of the selected positions)."""
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    sel = valid.reshape(-1)
    targets = torch.roll(ids, shifts=-1, dims=1).reshape(-1)[sel]
    return sel, targets


def _stats_dtype(z: torch.Tensor) -> torch.Tensor:
    """Half-precision readouts are reduced in float32, as ``run_probe`` does."""
    return z.float() if z.dtype in (torch.bfloat16, torch.float16) else z


@torch.no_grad()
def floor_pass(model, parts: ModelParts, batches: list, dtype: torch.dtype = torch.float32,
               reuse_buffers: bool = False) -> int:
    """The floor. ``batches`` are (rows, T) id tensors of one forward each (the probe's micro-batches).

    Per micro-batch: a forward with hooks (h_0..h_L), then for ℓ = 0..L−1 ``log_softmax(U(N(h_ℓ)))`` and the
    log-softmax of the model's own final logits (L+1 log-softmaxes, L readout matmuls: the forward already did the
    final one). The readouts run in ``dtype``; half-precision logits are upcast to float32 for the log-softmax, as
    ``run_probe`` does for its statistics. Returns the number of scored tokens.

    ``reuse_buffers=False`` is what one writes naturally (every matmul and log-softmax returns a fresh tensor);
    ``reuse_buffers=True`` is the strict floor: the scored logits, each readout and each log-softmax are written into
    buffers allocated once (``index_select``/``mm``/``_log_softmax`` with ``out=``), which on CPU saves the page
    faults of a fresh (chunk × V) tensor per operation (the probe reuses its buffers the same way).
    """
    n_tokens = 0
    bufs: dict = {}
    unembed = parts.unembed
    linear = (reuse_buffers and type(unembed) is torch.nn.Linear and parts.logit_softcap is None
              and unembed.weight.dtype == dtype)

    def buf(name, like_rows, V, dt, device):
        b = bufs.get(name)
        if b is None or b.shape[0] < like_rows or b.shape[1] != V or b.dtype != dt:
            b = bufs[name] = torch.empty(like_rows, V, dtype=dt, device=device)
        return b[:like_rows]

    def log_softmax(z):
        z = _stats_dtype(z)
        if not reuse_buffers:
            return torch.log_softmax(z, dim=-1)
        return torch.ops.aten._log_softmax.out(z, -1, False, out=buf("lsm", z.shape[0], z.shape[1], z.dtype, z.device))

    def readout(h):
        if not linear:
            return parts.readout(h)
        nh = parts.normed(h)
        out = buf("z", nh.shape[0], unembed.weight.shape[0], nh.dtype, nh.device)
        if unembed.bias is not None:
            z = torch.addmm(unembed.bias, nh, unembed.weight.t(), out=out)
        else:
            z = torch.mm(nh, unembed.weight.t(), out=out)
        return z.mul_(parts.logit_scale) if parts.logit_scale is not None else z

    for ids in batches:
        with HiddenStateCapture(parts) as cap:
            logits = model_forward(model, ids)
        sel, _ = _scored(ids)
        flat = logits.reshape(-1, logits.shape[-1])
        del logits
        if reuse_buffers:
            z_final = torch.index_select(flat, 0, sel.nonzero().squeeze(1),
                                         out=buf("final", int(sel.sum()), flat.shape[1], flat.dtype, flat.device))
        else:
            z_final = flat[sel]
        del flat
        log_softmax(z_final.to(dtype))
        del z_final
        for layer in range(parts.n_layers):
            h = cap.states[layer]
            if h is None:
                continue
            h = h.reshape(-1, h.shape[-1])[sel].to(dtype)
            log_softmax(readout(h))
        n_tokens += int(sel.sum())
    return n_tokens


@torch.no_grad()
def naive_lens(model, batches: list) -> dict:
    """The straightforward logit lens of a Hugging Face causal LM; returns {metric: [mean per layer 0..L]}.

    Per batch: ``model(ids, output_hidden_states=True)``; for every layer the full log-probabilities
    ``log_softmax(lm_head(norm(hidden_states[ℓ])))`` (``hidden_states[L]`` is already normed in transformers, so the
    last layer uses the model's logits), then each metric in its own pass over them.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    norm, head = base.norm, model.get_output_embeddings()
    sums: dict = {}
    count = 0
    for ids in batches:
        out = model(ids, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        L = len(hs) - 1
        y = ids[:, 1:]
        logp_final = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        top1_final = logp_final.argmax(dim=-1)
        for layer in range(L + 1):
            logits = out.logits if layer == L else head(norm(hs[layer]))
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            V = logp.shape[-1]
            metrics = {
                "agree": (logp.argmax(dim=-1) == top1_final).float().sum(),
                "kl": F.kl_div(logp, logp_final, log_target=True, reduction="sum"),
                "entropy": -(logp.exp() * logp).sum(),
                "ce": F.cross_entropy(logp.reshape(-1, V), y.reshape(-1), reduction="sum"),
            }
            for name, value in metrics.items():
                sums.setdefault(name, [0.0] * (L + 1))[layer] += float(value)
            del logp, logits
        count += y.numel()
        del out, logp_final
    return {name: [v / count for v in values] for name, values in sums.items()}


def transformer_lens_available() -> Optional[str]:
    """None when ``transformer_lens`` can be imported, else the reason it cannot."""
    try:
        import transformer_lens  # noqa: F401
    except Exception as error:  # noqa: BLE001  (ImportError or a broken install)
        return f"transformer_lens not importable ({type(error).__name__}: {error}); install it to add this baseline"
    return None


def hooked_transformer(hf_model):
    """The same Llama (same weights) as a TransformerLens ``HookedTransformer``; raises if this TL version cannot.

    Untested here: ``transformer_lens`` is not installed on the machine the tables in docs/performance.md come from.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    try:  # TL ≥ 2
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    except ImportError:  # older TL
        from transformer_lens.loading_from_pretrained import convert_llama_weights
    c = hf_model.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=c.hidden_size // c.num_attention_heads, gated_mlp=True,
        final_rms=True, eps=c.rms_norm_eps, rotary_base=getattr(c, "rope_theta", 10000.0), device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_llama_weights(hf_model, cfg), strict=False)
    return model.eval()


@torch.no_grad()
def transformer_lens_lens(tl_model, batches: list) -> dict:
    """TransformerLens' idiomatic logit lens: ``run_with_cache`` + ``accumulated_resid`` + ``unembed``."""
    sums: dict = {}
    count = 0
    for ids in batches:
        logits, cache = tl_model.run_with_cache(ids)
        resid = cache.accumulated_resid(apply_ln=True)  # (L+1, B, T, d) — TL's last entry is the final residual
        lens_logits = tl_model.unembed(resid)          # (L+1, B, T, V)
        logp = torch.log_softmax(lens_logits[:, :, :-1].float(), dim=-1)
        logp_final = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        y = ids[:, 1:]
        L1, V = logp.shape[0], logp.shape[-1]
        for layer in range(L1):
            lp = logp[layer] if layer < L1 - 1 else logp_final
            metrics = {
                "agree": (lp.argmax(-1) == logp_final.argmax(-1)).float().sum(),
                "kl": F.kl_div(lp, logp_final, log_target=True, reduction="sum"),
                "entropy": -(lp.exp() * lp).sum(),
                "ce": F.cross_entropy(lp.reshape(-1, V), y.reshape(-1), reduction="sum"),
            }
            for name, value in metrics.items():
                sums.setdefault(name, [0.0] * L1)[layer] += float(value)
        count += y.numel()
        del cache, resid, lens_logits, logp
    return {name: [v / count for v in values] for name, values in sums.items()}


def max_abs_diff(naive: dict, record) -> dict:
    """Largest |naive − run_probe| per metric over layers (``record`` a ProbeRecord); NaN if a value is missing."""
    rows = {row["layer"]: row for row in record.layers}
    first = min(rows)
    out = {}
    for name, values in naive.items():
        diffs = []
        for layer, value in enumerate(values):
            if layer < first:
                continue
            got = rows.get(layer, {}).get(name)
            diffs.append(abs(got - value) if got is not None else math.nan)
        out[name] = max(diffs) if diffs else math.nan
    return out
