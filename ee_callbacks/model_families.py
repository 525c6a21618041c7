"""Which causal-LM families of transformers the probe can read with no hints: build each tiny, find and prove its parts.

``check_family(model_type)`` builds the family's causal LM (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) from a generic
small config (the sizes below, passed only where the family's config takes them; composite configs get them in each
sub-config), runs :func:`ee_callbacks.model_parts.prove_model_parts` on random token ids and returns a
:class:`FamilyResult`: ``resolved`` (parts found and proven against the model's logits), ``refused`` (the model
builds and runs, but the probe cannot read it, with the reason: a looped model, a readout no candidate reproduces),
or ``unbuildable`` (no generic small config builds or runs it: it needs pixel/audio inputs, an encoder, a kernel
package, or sizes a generic config cannot guess). ``scripts/model_coverage.py`` writes the table in
``docs/model_coverage.md``; ``tests/test_model_families.py`` checks every family of the installed transformers.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .model_parts import ModelPartsError, find_language_model, prove_model_parts

__all__ = ["FamilyResult", "TINY_SIZES", "causal_lm_families", "check_family", "coverage", "tiny_config"]

VOCAB = 96
MAX_PARAMS = 3_000_000  # a family whose generic small config still builds more than this is left out (CI memory)

# generic small sizes under the names configs use for them; each is passed only where a config's __init__ takes it
TINY_SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "n_embd": 32, "d_model": 32, "embed_dim": 32, "dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "kv_channels": 8, "rotary_dim": 8,
    "intermediate_size": 64, "ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "n_inner": 64,
    "dim_ff": 64, "d_ff": 64, "ffn_hidden_size": 64,
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_seq_len": 64, "seq_length": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16,
    "mamba_n_groups": 1, "mamba_expand": 2, "n_groups": 1, "conv_kernel": 4, "expand": 2, "time_step_rank": 4,
    "sliding_window": 16, "attention_window_size": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "decoder_start_token_id": 1, "is_decoder": True,
}

# tried in turn when the sizes above do not build or run a family: let the config derive its head sizes itself
# (multi-head latent attention, partial rotary), then the same with wider heads
FALLBACKS = (
    {"head_dim": None, "kv_channels": None, "qk_rope_head_dim": None, "qk_nope_head_dim": None, "v_head_dim": None,
     "kv_lora_rank": None, "q_lora_rank": None, "num_key_value_heads": 4},
    {"hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "head_dim": 16, "kv_channels": 16,
     "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "num_key_value_heads": 4,
     "intermediate_size": 128, "moe_intermediate_size": 64},
)


@dataclass
class FamilyResult:
    model_type: str
    class_name: str
    status: str  # "resolved", "refused" or "unbuildable"
    why: str = ""
    parts: Optional[dict] = None
    seconds: float = 0.0


def coverage(results) -> tuple[int, int]:
    """(resolved, buildable) over :class:`FamilyResult` s: buildable = resolved + refused."""
    resolved = sum(r.status == "resolved" for r in results)
    return resolved, resolved + sum(r.status == "refused" for r in results)


def causal_lm_families() -> dict:
    """``{model_type: class name}`` of the installed transformers' causal-LM auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _init_params(cls) -> Optional[set]:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()) and len(params) <= 3:
        return None  # takes only **kwargs: no way to tell which sizes it knows
    return set(params)


def tiny_config(model_type: str, changes: Optional[dict] = None):
    """The family's config with :data:`TINY_SIZES` (updated by ``changes``; None drops a size) where it takes them,
    also inside its sub-configs."""
    from transformers import AutoConfig, CONFIG_MAPPING

    sizes = {k: v for k, v in {**TINY_SIZES, **(changes or {})}.items() if v is not None}
    cls = CONFIG_MAPPING[model_type]
    known = _init_params(cls)
    kwargs = {k: v for k, v in sizes.items() if known is not None and k in known}
    for key, sub_cls in (getattr(cls, "sub_configs", None) or {}).items():
        if known is not None and key in known and inspect.isclass(sub_cls):
            sub_known = _init_params(sub_cls)
            if sub_known is not None:
                kwargs[key] = {k: v for k, v in sizes.items() if k in sub_known}
    return AutoConfig.for_model(model_type, **kwargs)


def check_family(model_type: str, seq_len: int = 12, seed: int = 0) -> FamilyResult:
    """Build ``model_type`` tiny, find its language model and that model's parts with no hints (as the callbacks do
    on a LightningModule holding it) and prove them (see the module doc)."""
    name = causal_lm_families()[model_type]
    t0 = time.perf_counter()
    result = FamilyResult(model_type, name, "unbuildable")
    first_error = None
    for changes in ({},) + FALLBACKS:
        model, ids, error = _build_and_run(name, model_type, changes, seq_len, seed)
        if model is not None:
            break
        first_error = first_error or error
    if model is None:
        result.why = first_error
        result.seconds = time.perf_counter() - t0
        return result
    mask = torch.ones_like(ids)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = find_language_model(model)
            parts = prove_model_parts(lm, ids, mask)
        result.status, result.parts = "resolved", parts.describe()
        found = [] if lm is model else [f"language model: {type(lm).__name__} inside it"]
        result.why = "; ".join(found + parts.notes)
    except Exception as err:
        result.status = "refused"
        result.why = f"{type(err).__name__}: {_short(err, 400)}" if not isinstance(err, ModelPartsError) \
            else _short(err, 400)
    result.seconds = time.perf_counter() - t0
    return result


def _build_and_run(name: str, model_type: str, changes: dict, seq_len: int, seed: int):
    """(model, token ids, None) when the family builds from the sizes and runs on token ids, else (None, None, why)."""
    import transformers

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = tiny_config(model_type, changes)
            cls = getattr(transformers, name)
            wanted = getattr(cls, "config_class", None)
            if wanted is not None and not isinstance(config, wanted) and hasattr(config, "get_text_config"):
                config = config.get_text_config()  # a composite config whose causal LM takes the text part
            with torch.device("meta"):  # size it first: some configs keep large defaults (vision towers, vocab)
                n_params = sum(p.numel() for p in cls(config).parameters())
            if n_params > MAX_PARAMS:
                return None, None, f"a generic small config still builds {n_params / 1e6:.1f} M parameters (left out)"
            torch.manual_seed(seed)
            model = cls(config).eval()
    except Exception as err:  # a family a generic small config cannot build
        return None, None, f"does not build from a generic small config: {type(err).__name__}: {_short(err)}"
    vocab = _input_vocab(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, min(vocab, VOCAB)), (2, seq_len), generator=gen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                _plain_forward(model, ids, torch.ones_like(ids))
    except Exception as err:  # needs pixel values, audio, an encoder's output, a kernel package …
        return None, None, f"does not run on input_ids alone: {type(err).__name__}: {_short(err)}"
    return model, ids, None


def _plain_forward(model, ids, mask):
    from .capture import model_forward

    return model_forward(model, ids, mask)


def _input_vocab(model) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else VOCAB


def _short(err: BaseException, n: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= n else text[: n - 1] + "…"
