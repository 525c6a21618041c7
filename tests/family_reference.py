"""Tiny models of many families and an independent float64 reference of their logit lens, written per family.

The reference never uses the probe's hooks, parts discovery, chunks or metric code. It runs a float64 copy of the
model with ``output_hidden_states=True``, takes ``h_0..h_L`` from that tuple (how depends on the family, see
below), reads each ``h_ℓ`` (ℓ < L) out through the family's own final norm and head composed by hand as its
modelling code does (``final``: norm and any projection; ``head``: unembedding, soft-cap, scale) and takes the
model's own logits at ℓ = L. The per-token figures are then those of :class:`tests.probe_reference.TokenTable`.

``output_hidden_states`` has L + 1 entries in every family here, but their meaning differs, and its last entry is
never the raw output of the last block:

- ``recorded`` (families whose outputs transformers records with hooks): ``(h_0, …, h_{L−1}, last_hidden_state)``,
  the last entry after the final norm (OPT: after ``project_out`` too, so it is not even d wide). The raw ``h_L`` is
  the last entry of a second forward with ``config.tie_last_hidden_states = False``, the recorder's own switch.
- ``loop`` (Falcon, Bloom: a hand-written loop appends each block's *input*, then ``ln_f(h_L)``): the raw ``h_L`` is
  the last entry of a second forward with ``ln_f`` replaced by the identity.
- ``mamba`` (Mamba, Mamba2: the loop appends each block's *output*, then ``norm_f(h_L)``): no embedding entry, entry
  k is ``h_{k+1}``; ``h_0`` is the embedding of the ids, computed directly.
- ``own`` (the nanoGPT-style module, no ``output_hidden_states``): its blocks are walked by hand.

Each derivation is checked where it is made: the default last entry must equal ``final(raw h_L)`` and
``head(final(raw h_L))`` the model's logits, so a wrong reading of the tuple fails here, not in the comparison.
RMSNorm-style norms of transformers compute in float32 even in a float64 model, so the reference is float64 except
for those norms' rounding (about 1e-7 relative).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.probe_reference import TokenTable

V, LAYERS, WIDTH = 96, 3, 32
LOGIT_SPREAD = 1.5  # std of a token's logits over the vocabulary: entropies of about 2 nats of ln 96 = 4.6


# ---------------------------------------------------------------------------------------------------------------------
# a nanoGPT-style model that is not a transformers model


class _Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's layout (``transformer.wte/wpe/h/ln_f``, tied ``lm_head``); ``forward(idx, targets)`` returns
    ``(logits, loss)`` with logits at every position."""

    def __init__(self, vocab=V, width=WIDTH, layers=LAYERS, heads=4, block_size=64):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, width), wpe=nn.Embedding(block_size, width), drop=nn.Dropout(0.0),
            h=nn.ModuleList([_Block(width, heads) for _ in range(layers)]), ln_f=nn.LayerNorm(width)))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def embed(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss


# ---------------------------------------------------------------------------------------------------------------------
# the families


@dataclass
class Family:
    build: Callable[[], nn.Module]
    final: Callable  # (model, h) -> what the unembedding reads
    head: Callable  # (model, x) -> logits
    states: str  # "recorded", "loop", "mamba" or "own" (see the module doc)
    final_module: str = ""  # "loop": the dotted path of the final norm
    # False: the probe set pads on the right only. Bloom's and Gemma-2's eager attention take the softmax in float32:
    # in the float64 reference the mask value finfo(float64).min becomes −inf there, a left-padded row's padding
    # queries see only −inf, and their NaN reaches the real tokens through 0·NaN (the float32 models are finite)
    left_padding: bool = True
    spread: str = "lm_head"  # the module scaled to spread the logits (a tied head's final norm: see build)


def _hf(model_class: str, config_class: str, **config):
    def build():
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


def _softcap(z, cap):
    return torch.tanh(z / cap) * cap


_DECODER = dict(vocab_size=V, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64)
_GQA = dict(_DECODER, num_key_value_heads=2)
_OPT = dict(vocab_size=V, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=64, word_embed_proj_dim=16)
_MAMBA = dict(vocab_size=V, hidden_size=WIDTH, num_hidden_layers=LAYERS, state_size=8, expand=2, conv_kernel=4)
_norm = lambda m, h: m.model.norm(h)  # noqa: E731
_lm_head = lambda m, x: m.lm_head(x)  # noqa: E731

FAMILIES = {
    "gpt2": Family(_hf("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=WIDTH, n_layer=LAYERS, n_head=4,
                       n_positions=64), lambda m, h: m.transformer.ln_f(h), _lm_head, "recorded",
                spread="transformer.ln_f"),
    "gpt_neox": Family(_hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **_DECODER, tie_word_embeddings=False),
                       lambda m, h: m.gpt_neox.final_layer_norm(h), _lm_head, "recorded"),
    "opt": Family(_hf("OPTForCausalLM", "OPTConfig", **_OPT),
                  lambda m, h: m.model.decoder.project_out(m.model.decoder.final_layer_norm(h)), _lm_head, "recorded",
                  spread="model.decoder.project_out"),
    "opt_square": Family(_hf("OPTForCausalLM", "OPTConfig", **{**_OPT, "word_embed_proj_dim": WIDTH}),  # no projection
                         lambda m, h: m.model.decoder.final_layer_norm(h), _lm_head, "recorded",
                         spread="model.decoder.final_layer_norm"),
    "opt_post_ln": Family(_hf("OPTForCausalLM", "OPTConfig", **_OPT, do_layer_norm_before=False),  # OPT-350m
                          lambda m, h: m.model.decoder.project_out(h), _lm_head, "recorded",
                          spread="model.decoder.project_out"),
    "gemma2": Family(_hf("Gemma2ForCausalLM", "Gemma2Config", **_GQA, head_dim=8, sliding_window=4),
                     _norm, lambda m, x: _softcap(m.lm_head(x), m.config.final_logit_softcapping), "recorded",
                     spread="model.norm", left_padding=False),
    "gemma3": Family(_hf("Gemma3ForCausalLM", "Gemma3TextConfig", **_GQA, head_dim=8, sliding_window=4,
                         final_logit_softcapping=5.0),
                     _norm, lambda m, x: _softcap(m.lm_head(x), m.config.final_logit_softcapping), "recorded",
                     spread="model.norm"),
    "phi": Family(_hf("PhiForCausalLM", "PhiConfig", **_DECODER), lambda m, h: m.model.final_layernorm(h), _lm_head,
                  "recorded"),
    "phi3": Family(_hf("Phi3ForCausalLM", "Phi3Config", **_DECODER, pad_token_id=0), _norm, _lm_head, "recorded"),
    "falcon": Family(_hf("FalconForCausalLM", "FalconConfig", vocab_size=V, hidden_size=WIDTH,
                         num_hidden_layers=LAYERS, num_attention_heads=4),
                     lambda m, h: m.transformer.ln_f(h), _lm_head, "loop", "transformer.ln_f", spread="transformer.ln_f"),
    # Bloom normalises its embedding (word_embeddings_layernorm): larger blocks make its layers differ
    "bloom": Family(_hf("BloomForCausalLM", "BloomConfig", vocab_size=V, hidden_size=WIDTH, n_layer=LAYERS, n_head=4,
                        initializer_range=0.3),
                    lambda m, h: m.transformer.ln_f(h), _lm_head, "loop", "transformer.ln_f", left_padding=False,
                    spread="transformer.ln_f"),
    "qwen2": Family(_hf("Qwen2ForCausalLM", "Qwen2Config", **_GQA), _norm, _lm_head, "recorded"),
    "qwen3": Family(_hf("Qwen3ForCausalLM", "Qwen3Config", **_GQA, head_dim=8), _norm, _lm_head, "recorded"),
    "mistral": Family(_hf("MistralForCausalLM", "MistralConfig", **_GQA), _norm, _lm_head, "recorded"),
    "mixtral": Family(_hf("MixtralForCausalLM", "MixtralConfig", **_GQA, num_local_experts=4, num_experts_per_tok=2),
                      _norm, _lm_head, "recorded"),
    "olmoe": Family(_hf("OlmoeForCausalLM", "OlmoeConfig", **_GQA, num_experts=4, num_experts_per_tok=2),
                    _norm, _lm_head, "recorded"),
    "mamba": Family(_hf("MambaForCausalLM", "MambaConfig", **_MAMBA), lambda m, h: m.backbone.norm_f(h), _lm_head,
                    "mamba", spread="backbone.norm_f"),
    "mamba2": Family(_hf("Mamba2ForCausalLM", "Mamba2Config", **_MAMBA, head_dim=16, num_heads=4, n_groups=1,
                         chunk_size=8), lambda m, h: m.backbone.norm_f(h), _lm_head, "mamba"),
    "cohere": Family(_hf("CohereForCausalLM", "CohereConfig", **_GQA, logit_scale=0.5), _norm,
                     lambda m, x: m.lm_head(x) * m.config.logit_scale, "recorded", spread="model.norm"),
    "granite": Family(_hf("GraniteForCausalLM", "GraniteConfig", **_GQA, logits_scaling=4.0, embedding_multiplier=3.0,
                          residual_multiplier=0.5), _norm, lambda m, x: m.lm_head(x) / m.config.logits_scaling,
                      "recorded"),
    "nanogpt": Family(NanoGPT, lambda m, h: m.transformer.ln_f(h), _lm_head, "own", spread="transformer.ln_f"),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The family's tiny model in float32 eval mode, made informative: its norms' weights and biases moved off
    their identity initialisation (so a missing or doubled norm changes the numbers) and its logits spread over a
    few nats (so top-1s, KL and saturation layers mean something) by scaling the untied unembedding, or for a tied
    one the final norm (scaling a tied unembedding scales the embedding too). A tied embedding is shrunk first: at
    initialisation it dominates the residual stream and every layer then predicts the input token."""
    torch.manual_seed(seed)
    model = FAMILIES[name].build().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for p in module.parameters(recurse=False):
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
        embedding = model.transformer.wte if name == "nanogpt" else model.get_input_embeddings()
        if model.lm_head.weight is embedding.weight:
            model.lm_head.weight.mul_(0.1)
        ids = torch.randint(3, V, (2, 8), generator=gen)
        for _ in range(3):  # settle the spread in a few steps (Gemma's norms scale by 1 + w, not w)
            factor = LOGIT_SPREAD / float(_logits(model(ids)).std(dim=-1).mean())
            for p in model.get_submodule(FAMILIES[name].spread).parameters(recurse=False):
                p.mul_(factor)
    return model


def _logits(out):
    return out[0] if isinstance(out, tuple) else out.logits


def probe_batches(seed: int = 0, left_padding: bool = True) -> list:
    """A plain (2, 10) batch, then a dict batch with right and left padding and labels holding −100."""
    gen = torch.Generator().manual_seed(seed)
    plain = torch.randint(3, V, (2, 10), generator=gen)
    ids = torch.randint(3, V, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :2] = 0 if left_padding else 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4] = labels[2, 6] = -100  # ignored labels inside real text
    return [plain, {"input_ids": ids, "attention_mask": mask, "labels": labels}]


# ---------------------------------------------------------------------------------------------------------------------
# the reference


@contextlib.contextmanager
def _replaced(model, path, replacement):
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    original = getattr(parent, name)
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, original)


def _hidden_states(model, ids, mask):
    out = model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return list(out.hidden_states), out.logits


def reference_states(name: str, model64, ids, mask):
    """(h_0..h_L raw, logits) of the float64 model on one batch, derived from ``output_hidden_states`` (module doc).
    The logits are the hand-written readout of the raw h_L, checked against the model's own (which Mamba returns in
    float32 whatever its dtype)."""
    family = FAMILIES[name]
    if family.states == "own":
        states = [model64.embed(ids)]
        for block in model64.transformer.h:
            states.append(block(states[-1]))
        return states, model64(ids)[0]
    entries, logits = _hidden_states(model64, ids, mask)
    L = int(getattr(model64.config, "num_hidden_layers", None) or model64.config.n_layer)
    assert len(entries) == L + 1, (name, len(entries), L)
    if family.states == "recorded":
        model64.config.tie_last_hidden_states = False
        try:
            states = _hidden_states(model64, ids, mask)[0]
        finally:
            del model64.config.tie_last_hidden_states
    elif family.states == "loop":
        with _replaced(model64, family.final_module, nn.Identity()):
            states = entries[:-1] + [_hidden_states(model64, ids, mask)[0][-1]]
    else:  # mamba
        states = [model64.backbone.embeddings(ids)] + entries[:-1]
    # the derivation, checked: the default last entry is the final path of the raw h_L, which gives the logits
    assert torch.allclose(entries[-1], family.final(model64, states[-1]), rtol=1e-6, atol=1e-9), name
    readout = family.head(model64, family.final(model64, states[-1]))
    tolerance = 1e-9 if logits.dtype == torch.float64 else 1e-5
    assert torch.allclose(readout, logits.double(), rtol=tolerance, atol=tolerance), (name, (readout - logits).abs().max())
    return states, readout


def reference_table(name: str, model, batches) -> TokenTable:
    """The per-token float64 table (h, z, label per scored token) of ``model`` (float32) on ``batches``."""
    family = FAMILIES[name]
    model64 = copy.deepcopy(model).double().eval()
    if hasattr(model64, "config"):
        model64.config._experts_implementation = "eager"  # MoE experts: grouped_mm has no float64 kernel
    hidden, logits, labels = [], [], []
    with torch.no_grad():
        for batch in batches:
            ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
            mask = None if isinstance(batch, torch.Tensor) else batch.get("attention_mask")
            targets = ids if isinstance(batch, torch.Tensor) or batch.get("labels") is None else batch["labels"]
            states, final_logits = reference_states(name, model64, ids, mask)
            zs = [family.head(model64, family.final(model64, h)) for h in states[:-1]] + [final_logits]
            for b in range(ids.shape[0]):
                for t in range(ids.shape[1] - 1):
                    real = mask is None or bool(mask[b, t] and mask[b, t + 1])
                    if not real or int(targets[b, t + 1]) == -100:
                        continue
                    hidden.append([h[b, t].numpy() for h in states])
                    logits.append([z[b, t].numpy() for z in zs])
                    labels.append(int(targets[b, t + 1]))
    table = TokenTable.from_arrays(hidden, logits, labels)
    assert all(np.isfinite(z).all() for row in table.logits for z in row), f"{name}: non-finite reference logits"
    return table


def near_ties(table: TokenTable, layer: int, relative: float = 1e-5) -> set:
    """Tokens whose top-1 at ``layer`` could flip under float32 rounding (top-2 gap below ``relative`` of the logit
    scale)."""
    return {t for t in range(table.n)
            if table.top2_gap(t, layer) < relative * (1.0 + float(np.abs(table.logits[t][layer]).max()))}


def static_exit_layer(acc_by_layer: dict, L: int, tolerance: float = 0.05) -> int:
    """DESIGN §3: the shallowest layer ≥ 1 whose accuracy is within ``tolerance`` (relative) of the final one's."""
    return next(layer for layer in range(1, L + 1) if acc_by_layer[layer] >= (1 - tolerance) * acc_by_layer[L] - 1e-12)


def relative_error(got: float, want: float, floor: float = 1e-3) -> float:
    return abs(got - want) / max(abs(want), floor) if math.isfinite(got) else math.inf
