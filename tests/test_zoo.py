"""The model zoo (conf/model/*.yaml + ee_callbacks.training.zoo): every member builds and trains on CPU."""

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ee_callbacks.training.module import next_token_loss
from ee_callbacks.training.zoo import build_model, count_parameters, dropout_kwargs, model_config

MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = sorted(path.stem for path in MODEL_DIR.glob("*_tiny.yaml"))
COUNT_VOCAB = 2048  # the default BPE vocabulary; the YAML comments state counts at this size


def load(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(MODEL_DIR / f"{name}.yaml"), resolve=True)
    cfg.pop("defaults", None)
    return cfg


def test_the_zoo_has_every_family():
    assert set(TINY) >= {"llama_tiny", "gpt2_tiny", "gptneox_tiny", "qwen2_tiny", "mixtral_tiny", "olmoe_tiny",
                         "mamba2_tiny", "mamba_tiny"}
    families = {name: load(name)["family"] for name in TINY}
    assert {families["mixtral_tiny"], families["olmoe_tiny"]} == {"moe"}
    assert {families["mamba_tiny"], families["mamba2_tiny"]} == {"ssm"}
    assert families["llama_tiny"] == "dense"
    for name in TINY:
        assert load(name)["name"] == name


@pytest.mark.parametrize("name", TINY)
def test_member_trains_one_step_on_cpu(name):
    cfg = load(name)
    vocab = 256
    model = build_model(cfg, vocab, seed=0)
    assert model.config.vocab_size == vocab
    before = {key: value.detach().clone() for key, value in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    output = model(input_ids=input_ids, use_cache=False)
    assert output.logits.shape == (2, 16, vocab)
    loss = next_token_loss(output.logits, input_ids)
    # an untrained model predicts close to uniform: cross-entropy near ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(float(vocab))).item()) < 0.5
    if cfg["family"] == "moe":
        assert output.aux_loss is not None and torch.isfinite(output.aux_loss)
        loss = loss + cfg["config"]["router_aux_loss_coef"] * output.aux_loss
    loss.backward()
    optimizer.step()
    changed = [key for key, value in model.named_parameters() if not torch.equal(value, before[key])]
    assert len(changed) > 0.9 * len(before)
    with torch.no_grad():
        after = next_token_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)
    assert torch.isfinite(after) and after.item() < loss.item()  # one step on this batch lowers its loss


def test_parameter_counts_are_matched_and_documented():
    counts = {}
    for name in TINY:
        with torch.device("meta"):
            model = build_model(load(name), COUNT_VOCAB)
        counts[name] = count_parameters(model)
        text = (MODEL_DIR / f"{name}.yaml").read_text()
        stated = re.search(r"params: ([\d,]+) total", text)
        assert stated, f"{name}.yaml should state its measured parameter count"
        assert int(stated.group(1).replace(",", "")) == counts[name]["total"], name
    reference = counts["llama_tiny"]["total"]
    for name, count in counts.items():
        assert 0.85 < count["total"] / reference < 1.15, (name, count)
        assert count["embedding"] == 2 * COUNT_VOCAB * 128  # untied input and output embeddings everywhere
    # enough depth for interesting per-layer curves
    for name in TINY:
        config = model_config(load(name), COUNT_VOCAB)
        assert config.num_hidden_layers >= 6


def test_next_token_loss_matches_hugging_face_label_shift():
    model = build_model(load("llama_tiny"), 128, seed=1)
    input_ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    output = model(input_ids=input_ids, labels=input_ids)
    ours = next_token_loss(output.logits, input_ids)
    torch.testing.assert_close(ours, output.loss, rtol=1e-5, atol=1e-6)
    # padding (mask 0) is excluded: equals the loss over the unpadded prefix only
    mask = torch.ones_like(input_ids)
    mask[:, 8:] = 0
    masked = next_token_loss(output.logits, input_ids, mask)
    prefix = next_token_loss(output.logits[:, :8], input_ids[:, :8])
    torch.testing.assert_close(masked, prefix)


def test_dropout_maps_onto_each_family():
    assert dropout_kwargs("gpt2", 0.1) == {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    assert model_config({**load("llama_tiny"), "dropout": 0.1}, 64).attention_dropout == 0.1
    neox = model_config({**load("gptneox_tiny"), "dropout": 0.2}, 64)
    assert neox.hidden_dropout == 0.2 and neox.attention_dropout == 0.2
    # dropout really acts in train mode: two forward passes differ, and eval mode is deterministic
    model = build_model({**load("gpt2_tiny"), "dropout": 0.1}, 64, seed=0)
    input_ids = torch.randint(0, 64, (1, 8))
    model.train()
    assert not torch.equal(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    model.eval()
    assert torch.equal(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dropout_kwargs("mamba2", 0.1) == {}
    assert any("no dropout" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout_kwargs("llama", 1.5)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(load("qwen2_tiny"), 64, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(load("qwen2_tiny"), 64, seed=5)
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key


def test_pretrained_loads_a_local_directory(tmp_path):
    model = build_model(load("llama_tiny"), 64, seed=0)
    model.save_pretrained(tmp_path / "tiny")
    cfg = {"name": "mine", "family": "dense", "arch": "pretrained", "path": str(tmp_path / "tiny")}
    loaded = build_model(cfg)
    input_ids = torch.randint(0, 64, (1, 10))
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    # dropout reaches the modules of a loaded model too
    dropped = build_model({**cfg, "dropout": 0.25})
    assert dropped.config.attention_dropout == 0.25
    assert dropped.model.layers[0].self_attn.attention_dropout == 0.25
    with pytest.raises(ValueError, match="tokenizer has 100 tokens"):
        build_model(cfg, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model({**cfg, "path": str(tmp_path / "missing")})
    if importlib.util.find_spec("gguf") is None:
        with pytest.raises(ImportError, match="pip install gguf"):
            build_model({**cfg, "gguf_file": "model.gguf"})


def test_bad_model_configs_fail_clearly():
    with pytest.raises(ValueError, match="not a transformers model_type"):
        model_config({"name": "x", "arch": "llamma", "config": {}}, 64)
    with pytest.raises(ValueError, match="family must be one of"):
        build_model({**load("llama_tiny"), "family": "sparse"}, 64)
