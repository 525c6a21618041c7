"""ee-analyze and ee-report pointed at checkpoints and records our own train.py never wrote: a stranger's
LightningModule checkpoints (model in ``self.net`` / ``self.model.backbone``, no or partial ``save_hyperparameters``),
directories with ``last.ckpt`` links and copies, ``save_pretrained`` directories (sharded, bf16), bare state-dict files,
probe data of one's own (text, jsonl, token ids, a tokenizer built with ``tokenizers``) and records of killed, tiny,
mixed and older runs. Every case ends in the numbers of ``run_probe`` on the same model and tokens, or in a clear
error whose advice, followed, works."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import transformers as T
from lightning.pytorch.callbacks import ModelCheckpoint

from ee_callbacks import read_records, run_probe
from ee_callbacks.analyze import main as analyze_main, text_probe_tokens
from ee_callbacks.probe_data import draw_probe_set
from ee_callbacks.report import main as report_main

from tests.record_factory import make_history, make_record, write_jsonl

SEQ, N_SEQ, BATCH = 16, 4, 2
PROBE_ARGS = ["--seq-len", str(SEQ), "--probe-sequences", str(N_SEQ), "--batch-size", str(BATCH),
              "--no-progress", "--logger", "none"]
TEXT = ("Early exits let a language model stop at a middle layer when the answer is already settled. "
        "A probe reads each layer through the final norm and the unembedding. ") * 30


# ------------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer of our own (``tokenizers`` package; as a directory and as a lone tokenizer.json), a tiny Llama
    config directory without a tokenizer, and a probe text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("assets")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    (root / "tok_file").mkdir()
    tok.save(str(root / "tok_file" / "tokenizer.json"))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(root / "tok_dir")
    config = T.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    config.save_pretrained(root / "config")
    (root / "probe.txt").write_text(TEXT)
    return {"root": root, "tokenizer": fast, "config": config}


class StrangerLM(L.LightningModule):
    """What every stranger's module below shares: a causal-LM loss and SGD; ``lm()`` is where its model sits."""

    def training_step(self, batch, _):
        return self.lm()(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class NetLM(StrangerLM):
    """The model in ``self.net``, no ``save_hyperparameters``."""

    def __init__(self, config):
        super().__init__()
        self.net = T.LlamaForCausalLM(config)

    def lm(self):
        return self.net


class BackboneLM(StrangerLM):
    """``self.model.backbone``, hyperparameters saved with the non-serialisable model and the config ignored."""

    def __init__(self, config, backbone=None, lr=0.5):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "config"])
        self.model = torch.nn.Module()
        self.model.backbone = backbone if backbone is not None else T.LlamaForCausalLM(config)

    def lm(self):
        return self.model.backbone


class ConfigLM(StrangerLM):
    """``save_hyperparameters()`` keeps the Hugging Face config; a second model of the same architecture
    (a teacher) makes the weights' place ambiguous when ``teacher`` is set."""

    def __init__(self, config, teacher=False):
        super().__init__()
        self.save_hyperparameters()
        self.student = T.LlamaForCausalLM(config)
        self.teacher = T.LlamaForCausalLM(config) if teacher else None

    def lm(self):
        return self.student


def _fit(module, directory, steps=3, precision="32-true", save_last="link"):
    torch.manual_seed(0)
    ids = torch.randint(0, module.lm().config.vocab_size, (12, SEQ))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, precision=precision, default_root_dir=str(directory),
                        callbacks=[ModelCheckpoint(dirpath=str(directory), every_n_train_steps=1, save_top_k=-1,
                                                   save_last=save_last)])
    trainer.fit(module, torch.utils.data.DataLoader(ids, batch_size=4))
    return directory


@pytest.fixture(scope="module")
def fits(assets):
    root, config = assets["root"], assets["config"]
    torch.manual_seed(1)
    return {
        "net": _fit(NetLM(config), root / "net", save_last="link"),
        "backbone": _fit(BackboneLM(config), root / "backbone", save_last=True),
        "hf_config": _fit(ConfigLM(config), root / "hf_config", steps=1, save_last=False),
        "teacher": _fit(ConfigLM(config, teacher=True), root / "teacher", steps=1, save_last=False),
        "bf16": _fit(NetLM(config), root / "bf16", steps=1, precision="bf16-true", save_last=False),
    }


# ------------------------------------------------------------------------------------------------------------ helpers


def _weights(ckpt_path, prefix):
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _model_from(state, config):
    model = T.LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model.float().eval()


def _text_batches(tokenizer, text=TEXT):
    return draw_probe_set(text_probe_tokens(text, tokenizer, SEQ, 4 * N_SEQ), N_SEQ, SEQ, 0, BATCH)


def _assert_same(record, reference):
    """The record's per-layer figures, summary and CKA equal ``run_probe``'s on the same model and tokens."""
    ref = reference.to_dict() if hasattr(reference, "to_dict") else reference
    assert record["probe"]["tokens"] == ref["probe"]["tokens"]
    assert [row["layer"] for row in record["layers"]] == [row["layer"] for row in ref["layers"]]
    for ours, theirs in zip(record["layers"], ref["layers"]):
        for key, value in theirs.items():
            if isinstance(value, float):
                assert ours[key] == pytest.approx(value, abs=1e-6), key
    for key in ("eas", "oracle_skip_strict", "final_ce"):
        assert record["summary"][key] == pytest.approx(ref["summary"][key], abs=1e-6), key
    for key in ("cka", "cka_drift"):
        if ref[key] is None:
            assert record[key] is None, key
        else:
            assert np.allclose(np.array(record[key], float), np.array(ref[key], float), atol=1e-6), key


def _own_text(assets):
    return ["--tokenizer", assets["root"] / "tok_dir", "--probe-text", assets["root"] / "probe.txt"]


def _analyze(sources, out, *extra):
    return analyze_main([*map(str, sources), "--out", str(out), *PROBE_ARGS, *map(str, extra)])


# ------------------------------------------------------------------------------------------------------------ ee-analyze


def test_stranger_checkpoint_needs_a_config_and_the_advice_works(assets, fits, tmp_path, capsys):
    ckpt = fits["net"] / "epoch=0-step=3.ckpt"
    root = assets["root"]
    assert _analyze([ckpt], tmp_path / "a") == 2  # no architecture in the file: stop at once, say what to pass
    err = capsys.readouterr().err
    assert "--model-config" in err and "config.json" in err and "hyper_parameters hold no model config" in err
    # following it: the config directory has no tokenizer, which the per-checkpoint error says next
    with pytest.warns(RuntimeWarning, match="--tokenizer"):
        assert _analyze([ckpt], tmp_path / "b", "--model-config", root / "config") == 1
    assert "pass --tokenizer" in capsys.readouterr().err
    # following that too: the record is run_probe's on the weights under self.net
    assert _analyze([ckpt], tmp_path / "c", "--model-config", root / "config", *_own_text(assets)) == 0
    [record] = read_records(tmp_path / "c" / "ee_probes.jsonl")
    model = _model_from(_weights(ckpt, "net."), assets["config"])
    assert record["step"] == 3 and record["checkpoint"] == str(ckpt.resolve())
    _assert_same(record, run_probe(model, _text_batches(assets["tokenizer"])))
    # --model-config as the config.json file itself, --tokenizer as a lone tokenizer.json, --model-attr explicit
    assert _analyze([ckpt], tmp_path / "d", "--model-config", root / "config" / "config.json",
                    "--tokenizer", root / "tok_file" / "tokenizer.json", "--probe-text", root / "probe.txt",
                    "--model-attr", "net") == 0
    _assert_same(read_records(tmp_path / "d" / "ee_probes.jsonl")[0], record)
    # a --model-config directory that holds the tokenizer too (a save_pretrained model directory) needs no --tokenizer
    shutil.copytree(root / "tok_dir", tmp_path / "with_tok")
    shutil.copy(root / "config" / "config.json", tmp_path / "with_tok")
    assert _analyze([ckpt], tmp_path / "g", "--model-config", tmp_path / "with_tok", "--probe-text",
                    root / "probe.txt") == 0
    _assert_same(read_records(tmp_path / "g" / "ee_probes.jsonl")[0], record)
    # a wrong --model-attr names the attributes there are
    with pytest.warns(RuntimeWarning):
        assert _analyze([ckpt], tmp_path / "e", "--model-config", root / "config", "--model-attr", "model") == 1
    err = capsys.readouterr().err
    assert "no weights under --model-attr 'model'" in err and "'net'" in err
    # the config of another model: the shapes say so, nothing is probed
    wider = T.LlamaConfig(**{**assets["config"].to_dict(), "hidden_size": 32, "intermediate_size": 64})
    wider.save_pretrained(tmp_path / "wider")
    with pytest.warns(RuntimeWarning):
        assert _analyze([ckpt], tmp_path / "f", "--model-config", tmp_path / "wider", *_own_text(assets)) == 1
    err = capsys.readouterr().err
    assert "size mismatch" in err and "is the model config this checkpoint's architecture?" in err
    assert not (tmp_path / "f" / "ee_probes.jsonl").exists()


def test_checkpoint_directory_in_step_order_without_last_duplicates_and_with_drift(assets, fits, tmp_path):
    directory = fits["net"]  # epoch=0-step={1,2,3}.ckpt and last.ckpt -> epoch=0-step=3.ckpt
    assert (directory / "last.ckpt").is_symlink()
    (directory / "best.ckpt").symlink_to(directory / "epoch=0-step=2.ckpt")  # another link to a seen step
    out = tmp_path / "out"
    assert _analyze([directory], out, "--model-config", assets["root"] / "config",
                    *_own_text(assets), "--report") == 0
    records = read_records(out / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    [row] = _table((out / "report.html").read_text()).values()  # --report: the table holds the last record's figures
    assert row["steps"] == "1–3" and row["eas"] == f"{records[-1]['summary']['eas']:.4g}"
    assert {"heatmap_agree.png", "summary.png"} <= {p.name for p in (out / "figures").rglob("*.png")}
    assert [Path(r["checkpoint"]).name for r in records] == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    batches, previous = _text_batches(assets["tokenizer"]), None
    for record in records:  # drift of each checkpoint against the one before it in step order
        model = _model_from(_weights(directory / f"epoch=0-step={record['step']}.ckpt", "net."), assets["config"])
        reference = run_probe(model, batches, previous=previous)
        previous = reference.state
        _assert_same(record, reference)
    assert records[0]["cka_drift"] is None and records[2]["cka_drift"] is not None
    (directory / "best.ckpt").unlink()


def test_backbone_attribute_ignored_hparams_and_a_last_copy(assets, fits, tmp_path):
    directory = fits["backbone"]  # save_last=True: last.ckpt is a copy of step 3
    assert (directory / "last.ckpt").is_file() and not (directory / "last.ckpt").is_symlink()
    assert torch.load(directory / "last.ckpt", weights_only=False)["hyper_parameters"] == {"lr": 0.5}
    out = tmp_path / "out"
    assert _analyze([directory], out, "--model-config", assets["root"] / "config",
                    *_own_text(assets)) == 0
    records = read_records(out / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    model = _model_from(_weights(directory / "epoch=0-step=1.ckpt", "model.backbone."), assets["config"])
    _assert_same(records[0], run_probe(model, _text_batches(assets["tokenizer"])))


def test_config_in_hparams_is_enough_and_two_models_need_model_attr(assets, fits, tmp_path, capsys):
    ckpt = fits["hf_config"] / "epoch=0-step=1.ckpt"
    out = tmp_path / "out"
    assert _analyze([ckpt], out, *_own_text(assets)) == 0  # no --model-config needed
    model = _model_from(_weights(ckpt, "student."), assets["config"])
    _assert_same(read_records(out / "ee_probes.jsonl")[0], run_probe(model, _text_batches(assets["tokenizer"])))
    two = fits["teacher"] / "epoch=0-step=1.ckpt"
    with pytest.warns(RuntimeWarning):
        assert _analyze([two], tmp_path / "two", *_own_text(assets)) == 1
    err = capsys.readouterr().err
    assert "several models" in err and "'student'" in err and "'teacher'" in err and "--model-attr" in err
    assert _analyze([two], tmp_path / "two", *_own_text(assets), "--model-attr", "teacher") == 0
    teacher = _model_from(_weights(two, "teacher."), assets["config"])
    _assert_same(read_records(tmp_path / "two" / "ee_probes.jsonl")[0],
                 run_probe(teacher, _text_batches(assets["tokenizer"])))


class SettingsLM(NetLM):
    """``save_hyperparameters()`` with an object of a class from the training script, which the analysing process
    cannot import."""

    def __init__(self, config, settings):
        super().__init__(config)
        self.save_hyperparameters(ignore=["config"])


def test_hparams_holding_an_unimportable_class_still_load(assets, tmp_path, monkeypatch):
    import dataclasses
    import types

    script = types.ModuleType("strangers_training_script")
    script.Settings = dataclasses.make_dataclass("Settings", [("warmup", int)])
    script.Settings.__module__ = script.__name__
    monkeypatch.setitem(sys.modules, script.__name__, script)
    _fit(SettingsLM(assets["config"], script.Settings(warmup=3)), tmp_path / "ckpts", steps=1, save_last=False)
    monkeypatch.delitem(sys.modules, script.__name__)  # another process: the script is not importable
    ckpt = tmp_path / "ckpts" / "epoch=0-step=1.ckpt"
    with pytest.raises(ModuleNotFoundError):
        torch.load(ckpt, weights_only=False)
    with pytest.warns(RuntimeWarning, match="stand-ins"):
        assert _analyze([ckpt], tmp_path / "out", "--model-config", assets["root"] / "config",
                        *_own_text(assets)) == 0
    with monkeypatch.context() as patch:  # the reference reads the file where the script is importable
        patch.setitem(sys.modules, script.__name__, script)
        model = _model_from(_weights(ckpt, "net."), assets["config"])
    _assert_same(read_records(tmp_path / "out" / "ee_probes.jsonl")[0],
                 run_probe(model, _text_batches(assets["tokenizer"])))


def test_bf16_trained_checkpoint(assets, fits, tmp_path):
    ckpt = fits["bf16"] / "epoch=0-step=1.ckpt"
    weights = _weights(ckpt, "net.")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert _analyze([ckpt], tmp_path / "out", "--model-config", assets["root"] / "config",
                    *_own_text(assets)) == 0
    record = read_records(tmp_path / "out" / "ee_probes.jsonl")[0]
    _assert_same(record, run_probe(_model_from(weights, assets["config"]), _text_batches(assets["tokenizer"])))


def test_save_pretrained_directories_and_bare_weight_files(assets, tmp_path, capsys):
    torch.manual_seed(3)
    model = T.LlamaForCausalLM(assets["config"]).eval()
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save({"model": model.state_dict(), "step": 7}, tmp_path / "bundle_step7.bin")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"} |
              {"lm_head.weight": model.lm_head.weight.detach().clone()}, tmp_path / "weights.safetensors")
    tok = [*_own_text(assets)]
    reference = run_probe(model, _text_batches(assets["tokenizer"]))
    bf16_model = T.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    for name in ("plain", "sharded", "bf16"):
        assert _analyze([tmp_path / name], tmp_path / f"out_{name}", *tok) == 0, name
        record = read_records(tmp_path / f"out_{name}" / "ee_probes.jsonl")[0]
        _assert_same(record, reference if name != "bf16" else run_probe(bf16_model, _text_batches(assets["tokenizer"])))
    assert _analyze([tmp_path / "weights.pt"], tmp_path / "bare") == 2  # no architecture: say what to pass
    assert "--model-config" in capsys.readouterr().err
    torch.save({f"net._orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "compiled.pth")
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}}, "iter_num": 5}, tmp_path / "fabric_5.ckpt")
    files = [tmp_path / n for n in ("weights.pt", "bundle_step7.bin", "weights.safetensors", "compiled.pth",
                                    "fabric_5.ckpt")]
    assert _analyze(files, tmp_path / "bare", "--model-config", assets["root"] / "config", *tok) == 0
    records = read_records(tmp_path / "bare" / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 7, 0, 0, 5]
    for record in records:
        _assert_same(record, reference)
    # a directory of weights files is one series, in step order, with drift between them
    (tmp_path / "series").mkdir()
    later = T.LlamaForCausalLM(assets["config"]).eval()
    torch.save(later.state_dict(), tmp_path / "series" / "step_20.pt")
    torch.save(model.state_dict(), tmp_path / "series" / "step_10.pt")
    assert _analyze([tmp_path / "series"], tmp_path / "series_out", "--model-config", assets["root"] / "config",
                    *tok) == 0
    first, second = read_records(tmp_path / "series_out" / "ee_probes.jsonl")
    assert (first["step"], second["step"]) == (10, 20)
    _assert_same(first, reference)
    _assert_same(second, run_probe(later, _text_batches(assets["tokenizer"]), previous=reference.state))


def test_probe_data_of_ones_own(assets, tmp_path, capsys):
    torch.manual_seed(4)
    model = T.LlamaForCausalLM(assets["config"]).eval()
    model.save_pretrained(tmp_path / "m")  # no tokenizer in it
    root = assets["root"]
    paragraphs = [TEXT[:900], TEXT[900:1800], TEXT[1800:]]
    with open(tmp_path / "probe.jsonl", "w") as fh:
        for paragraph in paragraphs:
            fh.write(json.dumps({"text": paragraph, "id": 1}) + "\n")
    assert _analyze([tmp_path / "m"], tmp_path / "jsonl", "--probe-text", tmp_path / "probe.jsonl",
                    "--tokenizer", root / "tok_file" / "tokenizer.json") == 0
    batches = _text_batches(assets["tokenizer"], "\n\n".join(paragraphs))
    _assert_same(read_records(tmp_path / "jsonl" / "ee_probes.jsonl")[0], run_probe(model, batches))
    # token ids: (N, T) rows in a .pt file, a 1-D stream in a .npy file
    ids = torch.randint(0, assets["config"].vocab_size, (10, SEQ + 3))
    torch.save(ids, tmp_path / "ids.pt")
    np.save(tmp_path / "ids.npy", ids[:, :SEQ].reshape(-1).numpy())
    for name in ("ids.pt", "ids.npy"):
        assert _analyze([tmp_path / "m"], tmp_path / f"out_{name}", "--probe-tokens", tmp_path / name) == 0
    rows = draw_probe_set(ids, N_SEQ, SEQ, 0, BATCH)
    stream = draw_probe_set(ids[:, :SEQ].reshape(-1)[: 10 * SEQ].reshape(10, SEQ), N_SEQ, SEQ, 0, BATCH)
    _assert_same(read_records(tmp_path / "out_ids.pt" / "ee_probes.jsonl")[0], run_probe(model, rows))
    _assert_same(read_records(tmp_path / "out_ids.npy" / "ee_probes.jsonl")[0], run_probe(model, stream))
    # what cannot be read fails at once (status 2) saying what is read
    (tmp_path / "data.parquet").write_bytes(b"PAR1\x00\x15\xff\xfe")
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    torch.save(ids.float(), tmp_path / "float.pt")
    (tmp_path / "ids.csv").write_text("1,2,3\n")
    cases = {("--probe-text", "data.parquet"): "not UTF-8 text", ("--probe-text", "bad.jsonl"): 'a "text" string',
             ("--probe-tokens", "float.pt"): "integer tensor", ("--probe-tokens", "ids.csv"): "unknown suffix '.csv'"}
    for (flag, name), message in cases.items():
        assert _analyze([tmp_path / "m"], tmp_path / "bad", flag, tmp_path / name) == 2, name
        err = capsys.readouterr().err
        assert message in err and "--probe-tokens reads token ids" in err, name
    assert _analyze([tmp_path / "m"], tmp_path / "bad", "--tokenizer", tmp_path / "nowhere") == 2
    assert "not a tokenizer directory" in capsys.readouterr().err
    # ids of another vocabulary: the checkpoint fails with what to do, not an index error inside the model
    torch.save(ids + 1000, tmp_path / "big.pt")
    with pytest.warns(RuntimeWarning, match="beyond the model's vocabulary"):
        assert _analyze([tmp_path / "m"], tmp_path / "big", "--probe-tokens", tmp_path / "big.pt") == 1


def test_console_script_says_what_to_pass(fits, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "ee_callbacks.analyze", str(fits["net"] / "epoch=0-step=1.ckpt"),
                           "--out", str(tmp_path / "x"), "--no-progress", "--logger", "none"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "pass --model-config DIR" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------------------ ee-report


def _table(html_text):
    """The first table of the report: {run label: {column: cell}}."""
    import re

    table = html_text[html_text.index("<table>"): html_text.index("</table>")]
    rows = [re.findall(r"<t[hd]>(.*?)</t[hd]>", row) for row in table.split("</tr>") if "<t" in row]
    return {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}


def _report(paths, out):
    rc = report_main([*map(str, paths), "--out", str(out), "--quiet"])
    html_text = (out / "report.html").read_text() if (out / "report.html").exists() else ""
    return rc, html_text


def test_report_on_two_runs_in_one_directory_and_two_series_in_one_file(tmp_path):
    write_jsonl(tmp_path / "logs" / "version_0" / "ee_probes.jsonl", make_history([0, 10], experiment="a"))
    write_jsonl(tmp_path / "logs" / "version_1" / "ee_probes.jsonl", make_history([0, 10, 20], experiment="b"))
    rc, page = _report([tmp_path / "logs"], tmp_path / "r1")
    assert rc == 0 and set(_table(page)) == {"tiny-llama · a", "tiny-llama · b"}
    # ee-analyze A B --out DIR writes both series into one file: they stay two runs, steps not merged
    a = make_history([10, 20], experiment="A", source="checkpoint")
    b = make_history([10, 20], experiment="B", source="checkpoint", seed=5)
    write_jsonl(tmp_path / "both" / "ee_probes.jsonl", a + b)
    rc, page = _report([tmp_path / "both"], tmp_path / "r2")
    table = _table(page)
    assert rc == 0 and set(table) == {"tiny-llama · A", "tiny-llama · B"}
    for label, records in (("tiny-llama · A", a), ("tiny-llama · B", b)):
        assert table[label]["probes"] == "2" and table[label]["eas"] == f"{records[-1]['summary']['eas']:.4g}"
    assert len(list((tmp_path / "r2" / "figures").rglob("heatmap_agree.png"))) == 2


def test_report_on_a_killed_run_one_probe_one_layer_and_an_older_version(tmp_path):
    cases = {
        "killed": make_history([0, 10, 20]),
        "one_probe": [make_record(5)],
        "one_layer": make_history([0, 10], n_layers=1),
        "one_block_no_embedding": [make_record(0, n_layers=1, with_embedding=False)],
    }
    for name, records in cases.items():
        write_jsonl(tmp_path / name / "ee_probes.jsonl", records,
                    torn_tail='{"schema": 1, "step": 30, "lay' if name == "killed" else None)
    # records written by the first release (commit d0cc870): run {} and without model.name's experiment
    old = Path(__file__).parent / "data" / "records_d0cc870.jsonl"
    shutil.copy(old, (tmp_path / "older").mkdir() or tmp_path / "older" / "ee_probes.jsonl")
    cases["older"] = read_records(old)
    for name, records in cases.items():
        out = tmp_path / f"r_{name}"
        if name == "killed":
            with pytest.warns(RuntimeWarning, match="torn write"):
                rc, page = _report([tmp_path / name], out)
        else:
            rc, page = _report([tmp_path / name], out)
        assert rc == 0, name
        [row] = _table(page).values()
        last = records[-1]
        assert row["probes"] == str(len(records)) and row["layers"] == str(last["model"]["n_layers"]), name
        for key in ("eas", "oracle_skip_strict", "static_skip_5pct"):
            assert row[key] == f"{last['summary'][key]:.4g}", (name, key)
        pngs = {p.name for p in (out / "figures").rglob("*.png")}
        assert {"heatmap_agree.png", "summary.png", "tradeoff.png", "cka.png"} <= pngs, name
        for png in (out / "figures").rglob("*.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_two_probe_callbacks_in_one_run(assets, tmp_path):
    from ee_callbacks import EarlyExitProbe

    ids = torch.randint(0, assets["config"].vocab_size, (16, SEQ))

    def fit(second_data):
        probes = [EarlyExitProbe(every_n_steps=2, probe_data=ids[:8]),
                  EarlyExitProbe(every_n_steps=3, probe_data=second_data)]
        trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, accelerator="cpu", default_root_dir=str(tmp_path / "run"),
                            callbacks=probes)
        trainer.fit(NetLM(assets["config"]), torch.utils.data.DataLoader(ids, batch_size=4))

    # both would write set 'default' to <root>/ee_probes.jsonl: records no reader could tell apart
    with pytest.raises(ValueError, match="name its probe sets"):
        fit(ids[8:])
    assert not (tmp_path / "run" / "ee_probes.jsonl").exists() or not read_records(tmp_path / "run")
    fit({"held_out": ids[8:]})  # following the advice: one file, two sets, each its own section of the report
    records = read_records(tmp_path / "run" / "ee_probes.jsonl")
    assert {(r["set"], r["step"]) for r in records} == {("default", 0), ("default", 2), ("default", 3),
                                                        ("held_out", 0), ("held_out", 3)}
    rc, page = _report([tmp_path / "run"], tmp_path / "report")
    assert rc == 0 and "Probe set: default" in page and "Probe set: held_out" in page
    held_out_last = max((r for r in records if r["set"] == "held_out"), key=lambda r: r["step"])
    section = page[page.index("Probe set: held_out"):]
    [row] = _table(section).values()
    assert row["eas"] == f"{held_out_last['summary']['eas']:.4g}" and row["probes"] == "2"


def test_report_says_what_is_wrong(tmp_path, capsys):
    write_jsonl(tmp_path / "newer" / "ee_probes.jsonl", [dict(make_record(0), schema=99)])
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "ee_probes.jsonl").write_bytes(b"\x00\x01PK\xff\xfe garbage")
    (tmp_path / "torn_only").mkdir()
    (tmp_path / "torn_only" / "ee_probes.jsonl").write_text('{"schema": 1, "st')
    expected = {"newer": "schema 99", "binary": "no probe records", "torn_only": "no probe records"}
    for name, message in expected.items():
        with pytest.warns(RuntimeWarning) if name != "newer" else _nothing():
            rc, _ = _report([tmp_path / name], tmp_path / f"r_{name}")
        assert rc == 2, name
        assert message in capsys.readouterr().err, name
    # records with nothing to draw still get their page (and its table) rather than a crash
    write_jsonl(tmp_path / "bare" / "ee_probes.jsonl", [{"schema": 1, "summary": {"eas": 0.25}}])
    rc, page = _report([tmp_path / "bare"], tmp_path / "r_bare")
    assert rc == 0 and list(_table(page).values())[0]["eas"] == "0.25"


def _nothing():
    import contextlib

    return contextlib.nullcontext()
