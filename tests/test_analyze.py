"""ee-analyze over a train.py run's checkpoints, local HF directories, hub ids offline, broken checkpoints."""

import shutil
import subprocess
import sys

import pytest
import torch

from ee_callbacks import read_records
from ee_callbacks.analyze import main as analyze_main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from ee_callbacks.training.config import compose_config
    from ee_callbacks.training.train import train

    run_dir = tmp_path_factory.mktemp("smoke_run")
    train(compose_config(["experiment=smoke"], output_dir=str(run_dir)))
    return run_dir


def _close(a, b, keys=("agree", "kl", "ce", "logit_corr", "block_influence")):
    for ra, rb in zip(a["layers"], b["layers"]):
        for key in keys:
            if ra.get(key) is None:
                assert rb.get(key) is None
            else:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6), key


def test_run_directory_reproduces_the_callback_records(smoke_run, tmp_path):
    out = tmp_path / "analysis"
    assert analyze_main([str(smoke_run), "--out", str(out), "--no-progress"]) == 0
    ours = read_records(out / "ee_probes.jsonl")
    theirs = {r["step"]: r for r in read_records(smoke_run / "ee_probes.jsonl")}
    assert [r["step"] for r in ours] == [10, 20]
    for rec in ours:
        assert rec["source"] == "checkpoint" and rec["checkpoint"].endswith(f"step_{rec['step']:06d}.ckpt")
        ref = theirs[rec["step"]]
        assert rec["probe"]["tokens"] == ref["probe"]["tokens"]  # the same probe set as the callback
        _close(rec, ref)
        assert rec["summary"]["eas"] == pytest.approx(ref["summary"]["eas"], abs=1e-9)
    assert ours[1]["cka_drift"] is not None  # drift against the previous checkpoint of the series
    assert (out / "csv").exists()  # the CSV logger got the scalars


def test_interrupted_and_corrupted_series_analyses_each_good_checkpoint_once(smoke_run, tmp_path):
    series = tmp_path / "series"
    (series / "checkpoints").mkdir(parents=True)
    shutil.copy(smoke_run / "config.yaml", series / "config.yaml")
    for name in ("step_000010.ckpt", "step_000020.ckpt"):
        shutil.copy(smoke_run / "checkpoints" / name, series / "checkpoints" / name)
    (series / "checkpoints" / "step_000015.ckpt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    # "interrupted": only the first checkpoint was analysed
    analyze_main([str(series / "checkpoints" / "step_000010.ckpt"), "--out", str(out), "--no-progress"])
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        rc = analyze_main([str(series), "--out", str(out), "--no-progress"])
    assert rc == 1  # a failed checkpoint makes the exit status non-zero ...
    steps = [r["step"] for r in read_records(out / "ee_probes.jsonl")]
    assert steps == [10, 20]  # ... after each good checkpoint was analysed exactly once; the broken one skipped
    (series / "checkpoints" / "step_000015.ckpt").unlink()
    assert analyze_main([str(series), "--out", str(out), "--no-progress"]) == 0
    assert [r["step"] for r in read_records(out / "ee_probes.jsonl")] == [10, 20]


def test_failure_summary_names_each_failed_checkpoint(smoke_run, tmp_path, capsys):
    series = tmp_path / "series"
    (series / "checkpoints").mkdir(parents=True)
    shutil.copy(smoke_run / "config.yaml", series / "config.yaml")
    ckpt = torch.load(smoke_run / "checkpoints" / "step_000010.ckpt", map_location="cpu", weights_only=False)
    dropped = next(k for k in ckpt["state_dict"] if k.endswith("mlp.up_proj.weight"))
    del ckpt["state_dict"][dropped]  # a weight the model has but the file lacks: it would stay random
    torch.save(ckpt, series / "checkpoints" / "step_000010.ckpt")
    (series / "checkpoints" / "step_000020.ckpt").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning):
        rc = analyze_main([str(series), "--out", str(tmp_path / "out"), "--no-progress", "--logger", "none"])
    assert rc == 1
    err = capsys.readouterr().err
    summary = err[err.index("2 checkpoint(s) failed"):]
    assert "step_000010.ckpt: load: UninitialisedWeightsError" in summary and dropped[len("model."):] in summary
    assert "step_000020.ckpt: load:" in summary
    assert not (tmp_path / "out" / "ee_probes.jsonl").exists() or not read_records(tmp_path / "out" / "ee_probes.jsonl")


def test_weights_and_dtype_of_loaded_models(smoke_run, tmp_path):
    from ee_callbacks.analyze import LoadOptions, default_device_and_dtype, discover, parse_dtype

    assert default_device_and_dtype() == (("cuda", torch.bfloat16) if torch.cuda.is_available() and
                                          torch.cuda.is_bf16_supported() else default_device_and_dtype())
    if not torch.cuda.is_available():
        assert default_device_and_dtype() == ("cpu", torch.float32)
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="--dtype"):
        parse_dtype("int8")
    entry = discover([str(smoke_run)], options=LoadOptions(dtype=torch.bfloat16))[0]
    model, _ = entry.load()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # the bf16 weights are the checkpoint's weights, rounded
    reference, _ = discover([str(smoke_run)])[0].load()
    for (name, ours), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(ours, theirs.to(torch.bfloat16)), name
    # the CLI: --device/--dtype reach the probe; bf16 weights give nearly the float32 figures
    out32, out16 = tmp_path / "f32", tmp_path / "bf16"
    assert analyze_main([str(smoke_run), "--out", str(out32), "--no-progress", "--logger", "none",
                         "--device", "cpu", "--dtype", "float32"]) == 0
    assert analyze_main([str(smoke_run), "--out", str(out16), "--no-progress", "--logger", "none",
                         "--device", "cpu", "--dtype", "bfloat16"]) == 0
    f32, bf16 = read_records(out32 / "ee_probes.jsonl"), read_records(out16 / "ee_probes.jsonl")
    assert [r["step"] for r in bf16] == [10, 20]
    assert bf16[-1]["summary"]["final_ce"] == pytest.approx(f32[-1]["summary"]["final_ce"], abs=0.05)
    assert bf16[-1]["summary"]["final_ce"] != f32[-1]["summary"]["final_ce"]  # it really ran in bf16
    assert analyze_main([str(smoke_run), "--out", str(tmp_path / "x"), "--dtype", "int8"]) == 2


def _hf_dir(path, seed):
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ee_callbacks.analyze import default_probe_text

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([default_probe_text()[:200_000]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(path)
    fast.save_pretrained(path)


def test_local_hf_directories_with_steps_and_text_probe(tmp_path):
    for step in (100, 200):
        _hf_dir(tmp_path / "ckpts" / f"checkpoint-{step}", seed=step)
    text = tmp_path / "probe.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    rc = analyze_main([str(tmp_path / "ckpts"), "--out", str(out), "--probe-text", str(text), "--seq-len", "32",
                       "--probe-sequences", "4", "--no-progress", "--logger", "none"])
    assert rc == 0
    records = read_records(out / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [100, 200]
    assert records[0]["probe"]["tokens"] == records[1]["probe"]["tokens"] == 4 * 31


def _untied_hf_dir(path, trust_remote_code=False):
    """A tiny llama with its own (untied) unembedding; optionally declared as custom code (auto_map)."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    T.LlamaForCausalLM(config).save_pretrained(path)
    if trust_remote_code:
        (path / "modeling_tiny.py").write_text(
            "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
            "class TinyConfig(LlamaConfig):\n    model_type = 'tiny_remote'\n\n"
            "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
        import json

        cfg = json.loads((path / "config.json").read_text())
        cfg.update(model_type="tiny_remote", architectures=["TinyForCausalLM"],
                   auto_map={"AutoConfig": "modeling_tiny.TinyConfig",
                             "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
        (path / "config.json").write_text(json.dumps(cfg))


def test_hf_directory_missing_a_weight_fails_instead_of_probing_random_weights(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    good, bad = tmp_path / "models" / "checkpoint-1", tmp_path / "models" / "checkpoint-2"
    _untied_hf_dir(good)
    _untied_hf_dir(bad)
    weights = load_file(bad / "model.safetensors")
    del weights["lm_head.weight"]  # untied: without it the unembedding would be random
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "probe.txt"
    text.write_text("x" * 10)
    with pytest.warns(RuntimeWarning, match="uninitialised"):
        rc = analyze_main([str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--no-progress",
                           "--logger", "none", "--probe-text", str(text)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "checkpoint-2: load: UninitialisedWeightsError" in err and "lm_head.weight" in err
    # the good directory only failed for want of a tokenizer (it has none): loading itself succeeded
    assert "checkpoint-1: probe:" in err


def test_trust_remote_code_loads_a_model_with_its_own_code(tmp_path):
    from ee_callbacks.analyze import LoadOptions, _hf_load

    _untied_hf_dir(tmp_path / "remote", trust_remote_code=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        _hf_load(str(tmp_path / "remote"))
    model, _ = _hf_load(str(tmp_path / "remote"), options=LoadOptions(trust_remote_code=True))
    assert type(model).__name__ == "TinyForCausalLM"
    ids = torch.randint(0, 300, (1, 8))
    assert model(input_ids=ids).logits.shape == (1, 8, 300)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = analyze_main(["EleutherAI/pythia-70m", "--revisions", "step1000,step2000", "--out", str(tmp_path)])
    assert rc == 2
    assert "offline" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("ee-analyze") or str(next(iter([sys.prefix + "/bin/ee-analyze"])))
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--revisions" in proc.stdout


def test_speculate_records_a_measured_entry_beside_the_estimate(smoke_run, tmp_path):
    out = tmp_path / "spec"
    ckpt = smoke_run / "checkpoints" / "step_000020.ckpt"
    assert analyze_main([str(ckpt), "--out", str(out), "--no-progress", "--logger", "none", "--speculate",
                         "--spec-prompts", "2", "--spec-new-tokens", "6", "--spec-pairs", "2:2,7:1"]) == 0
    (rec,) = read_records(out / "ee_probes.jsonl")
    spec = rec["speculation"]
    L = rec["model"]["n_layers"]
    assert spec["supported"] and spec["prompts"] == 2 and spec["greedy"]["blocks_per_token"] == L
    assert [(r["exit_layer"], r["draft_len"]) for r in spec["runs"]] == [(2, 2), (7, 1)]
    agree = {row["layer"]: row["agree"] for row in rec["layers"]}
    for run in spec["runs"]:
        assert run["identical_to_greedy"] and run["tokens"] == 12
        assert run["agree_probe"] == pytest.approx(agree[run["exit_layer"]])
        assert run["speedup_blocks"] == pytest.approx(L / run["blocks_per_token"])
    assert spec["runs"][1]["speedup_est"] == pytest.approx(1.0)  # k = 1: one token per full pass, whatever E
