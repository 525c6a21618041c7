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
    assert rc == 0
    steps = [r["step"] for r in read_records(out / "ee_probes.jsonl")]
    assert steps == [10, 20]  # each good checkpoint exactly once; the broken one skipped, not fatal
    analyze_main([str(series), "--out", str(out), "--no-progress"])
    assert [r["step"] for r in read_records(out / "ee_probes.jsonl")] == [10, 20]


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
