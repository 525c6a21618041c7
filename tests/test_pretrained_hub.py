"""model=hf_pretrained takes a hub id with revision= (online); offline it fails at once with a clear message."""

import os

import pytest
import transformers as T

from ee_callbacks.training.config import compose_config
from ee_callbacks.training.tokenizers import build_tokenizer
from ee_callbacks.training.zoo import build_model, resolve_pretrained_source

HUB_ID = "HuggingFaceTB/SmolLM2-135M"


def test_hub_id_and_revision_compose_into_model_and_tokenizer(tmp_path):
    cfg = compose_config(["model=hf_pretrained", f"model.path={HUB_ID}", "model.revision=step-1000", "tokenizer=hf"],
                         output_dir=str(tmp_path))
    assert (cfg.model.path, cfg.model.revision) == (HUB_ID, "step-1000")
    assert (cfg.tokenizer.path, cfg.tokenizer.revision) == (HUB_ID, "step-1000")  # the tokenizer follows the model


def test_offline_hub_id_fails_at_once_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"name": "x", "family": "dense", "arch": "pretrained", "path": HUB_ID, "revision": "step-1000"}
    with pytest.raises(RuntimeError, match="hub is offline.*--revision step-1000.*local directory"):
        build_model(cfg)
    with pytest.raises(RuntimeError, match="tokenizer.path='HuggingFaceTB/SmolLM2-135M'.*hub is offline"):
        build_tokenizer({"kind": "hf", "path": HUB_ID, "revision": "step-1000"})


def test_online_hub_id_passes_the_revision_and_local_directories_refuse_one(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_pretrained_source(HUB_ID, "v1.0") == (HUB_ID, {"revision": "v1.0"})
    assert resolve_pretrained_source(HUB_ID, None) == (HUB_ID, {})
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(tmp_path / "local")
    assert resolve_pretrained_source(str(tmp_path / "local"), None) == (str(tmp_path / "local"), {})
    with pytest.raises(ValueError, match="local directory; revision='v1.0' applies to hub ids only"):
        resolve_pretrained_source(str(tmp_path / "local"), "v1.0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained_source(str(tmp_path / "a" / "b" / "missing"), None)
    assert os.environ.get("HF_HUB_OFFLINE") is None
