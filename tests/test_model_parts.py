"""Model-part discovery and hook capture on real transformers models of every family in the zoo, and beyond."""

import pytest
import torch
import transformers as T
from torch import nn

from ee_callbacks import find_model_parts
from ee_callbacks.capture import HiddenStateCapture, model_forward
from ee_callbacks.model_parts import ModelPartsError

V = 96


def _configs():
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3)
    attn = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    return {
        "llama": T.LlamaConfig(**common, **attn),
        "qwen2": T.Qwen2Config(**common, **attn),
        "mixtral": T.MixtralConfig(**common, **attn, num_local_experts=4, num_experts_per_tok=2),
        "olmoe": T.OlmoeConfig(**common, **attn, num_experts=4, num_experts_per_tok=2),
        "gemma2": T.Gemma2Config(**common, **attn, head_dim=8, final_logit_softcapping=5.0),
        "gptneox": T.GPTNeoXConfig(**common, num_attention_heads=4, intermediate_size=64),
        "gpt2": T.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0),
        "mamba2": T.Mamba2Config(**common, num_heads=4, head_dim=16, expand=2, n_groups=1, state_size=16),
        "mamba": T.MambaConfig(**common, state_size=8),
    }


EXPECTED = {
    "llama": ("model.layers", "model.norm", "lm_head"),
    "qwen2": ("model.layers", "model.norm", "lm_head"),
    "mixtral": ("model.layers", "model.norm", "lm_head"),
    "olmoe": ("model.layers", "model.norm", "lm_head"),
    "gemma2": ("model.layers", "model.norm", "lm_head"),
    "gptneox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),
    "gpt2": ("transformer.h", "transformer.ln_f", "lm_head"),
    "mamba2": ("backbone.layers", "backbone.norm_f", "lm_head"),
    "mamba": ("backbone.layers", "backbone.norm_f", "lm_head"),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = {}
    for name, cfg in _configs().items():
        model = T.AutoModelForCausalLM.from_config(cfg).eval()
        out[name] = model
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parts_are_found_structurally(models, name):
    parts = find_model_parts(models[name])
    assert (parts.blocks_path, parts.final_norm_path, parts.unembed_path) == EXPECTED[name]
    assert parts.n_layers == 3


@pytest.mark.parametrize("name", list(EXPECTED))
def test_readout_of_last_state_equals_model_logits(models, name):
    model = models[name]
    parts = find_model_parts(model)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), HiddenStateCapture(parts) as cap:
        logits = model_forward(model, ids)
    cap.check()
    assert len(cap.states) == 4 and all(s is not None for s in cap.states)
    diff = (parts.readout(cap.states[-1]) - logits).abs().max().item()
    assert diff < 1e-5, diff
    # the captured states equal transformers' own hidden_states where comparable
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == 4
    # h_0..h_{L-1}: raw in transformers too; Mamba's tuple has no embedding entry (it starts at h_1)
    shift = 1 if name.startswith("mamba") else 0
    for layer in range(3 - shift):
        assert torch.allclose(cap.states[layer + shift], hs[layer], atol=1e-6), (name, layer)
    # transformers' last entry is already normed: ours is raw, and the norm of ours is theirs
    assert torch.allclose(parts.normed(cap.states[-1]), hs[-1], atol=1e-5)
    assert not torch.allclose(cap.states[-1], hs[-1], atol=1e-3)


def test_gemma2_softcap_is_applied_to_every_readout(models):
    parts = find_model_parts(models["gemma2"])
    assert parts.logit_softcap == 5.0
    h = torch.randn(4, 32) * 50
    z = parts.readout(h)
    assert z.abs().max() <= 5.0 + 1e-6


def test_hooks_are_removed():
    model = T.AutoModelForCausalLM.from_config(_configs()["llama"])
    parts = find_model_parts(model)
    before = sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in parts.blocks)
    with HiddenStateCapture(parts):
        model_forward(model, torch.zeros(1, 3, dtype=torch.long))
    after = sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in parts.blocks)
    assert before == after == 0


class MyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class MyLM(nn.Module):
    """A user's own LM with unusual names and two lists of equal length (blocks and per-layer gates)."""

    def __init__(self, vocab=50, d=16, n=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.trunk = nn.ModuleList(MyBlock(d) for _ in range(n))
        self.gates = nn.ModuleList(MyBlock(d) for _ in range(n))  # same size: ambiguous for discovery
        self.post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids)
        for block in self.trunk:
            x = block(x)
        return self.proj(self.post(x))


def test_ambiguous_user_model_names_the_arguments():
    with pytest.raises(ModelPartsError) as err:
        find_model_parts(MyLM())
    msg = str(err.value)
    assert "trunk" in msg and "gates" in msg and "blocks=" in msg


def test_user_model_with_dotted_paths():
    model = MyLM()
    parts = find_model_parts(model, blocks="trunk", final_norm="post", unembed="proj")
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad(), HiddenStateCapture(parts) as cap:
        logits = model_forward(model, ids)
    assert torch.allclose(parts.readout(cap.states[-1]), logits, atol=1e-6)
    assert torch.allclose(cap.states[0], model.tok(ids))


def test_user_model_discovery_without_ambiguity():
    model = MyLM()
    del model.gates
    parts = find_model_parts(model)
    assert (parts.blocks_path, parts.final_norm_path, parts.unembed_path) == ("trunk", "post", "proj")


def test_wrong_path_lists_modules():
    with pytest.raises(ModelPartsError, match="does not name a submodule"):
        find_model_parts(MyLM(), blocks="layers")


def test_model_without_lists_says_what_to_pass():
    model = nn.Sequential(nn.Embedding(10, 4))  # the top-level Sequential has no name: nothing to find
    with pytest.raises(ModelPartsError, match="blocks="):
        find_model_parts(nn.Linear(3, 3))
