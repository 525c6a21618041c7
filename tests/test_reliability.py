"""Faults and odd inputs: the probe records what it can, warns, and training goes on."""

import gc
import os
import warnings

import lightning as L
import pytest
import torch
import transformers as T
from lightning.pytorch.loggers import CSVLogger, Logger

from ee_callbacks import EarlyExitProbe, find_model_parts, read_records, run_probe
from tests.helpers import TinyLM, loaders, pattern_tokens, tiny_llama


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_nan_at_one_layer_gives_nulls_and_a_warning():
    """NaN from block 2 on: no token has a finite reference, so every figure is null (never a crash, and never the
    "perfect agreement" of all-NaN logits whose argmax is 0 everywhere) and the record counts the tokens."""
    model = tiny_llama(vocab=40, layers=4).eval()
    handle = model.model.layers[2].register_forward_hook(lambda m, a, o: o * float("nan"))
    ids = torch.randint(0, 40, (2, 10))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        rec = run_probe(model, [ids]).to_dict()
    handle.remove()
    assert (rec["probe"]["tokens"], rec["probe"]["nonfinite_tokens"]) == (0, 18)
    layers = {r["layer"]: r for r in rec["layers"]}
    assert layers[3]["kl"] is None and layers[4]["ce"] is None and layers[4]["agree"] is None
    assert all(value is None for row in rec["layers"] for key, value in row.items() if key != "layer")
    assert rec["summary"]["eas"] is None and rec["summary"]["final_ce"] is None
    assert rec["summary"]["skip_at_consistency_0.99"] == {"max_prob": None, "margin": None, "entropy": None}


def test_training_goes_on_when_the_model_emits_nan(tmp_path):
    train, val = loaders()

    class NaNOnce(TinyLM):
        def configure_model(self):
            super().configure_model()
            # poison only the probe's eval-mode forward: training (train mode) stays finite
            self.model.transformer.h[1].register_forward_hook(lambda m, a, o: o * float("nan") if not m.training
                                                              else o)

    probe = EarlyExitProbe(every_n_steps=2, probe_data=pattern_tokens(4, 24, 64, 5), print_table=False)
    trainer = L.Trainer(max_steps=4, callbacks=[probe], logger=False, default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(NaNOnce(), train, val)
    assert trainer.global_step == 4
    records = read_records(tmp_path / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[-1]["layers"][-1]["ce"] is None


def test_encoder_without_lm_head_gives_similarity_metrics_only():
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64)).eval()
    parts = find_model_parts(model)
    assert parts.unembed is None and parts.final_norm is None and parts.blocks_path == "encoder.layer"
    with pytest.warns(RuntimeWarning, match="no unembedding"):
        rec = run_probe(model, [torch.randint(0, 50, (2, 8))], parts=parts).to_dict()
    assert rec["layers"][2]["block_influence"] is not None and rec["cka"] is not None
    assert "agree" not in rec["layers"][2] and "eas" not in rec["summary"]


def test_tied_embeddings_and_vocab_larger_than_tokenizer():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True)).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 60, (2, 12))  # the "tokenizer" uses only 60 of 500 rows
    rec = run_probe(model, [ids]).to_dict()
    assert rec["model"]["vocab"] == 500 and rec["layers"][-1]["agree"] == 1.0


def test_logit_scaling_is_applied():
    torch.manual_seed(0)
    cfg = T.CohereConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25)
    model = T.CohereForCausalLM(cfg).eval()
    parts = find_model_parts(model)
    assert parts.logit_scale == 0.25
    rec = run_probe(model, [torch.randint(0, 60, (2, 9))], parts=parts).to_dict()
    assert rec["layers"][-1]["kl"] == 0.0
    # the readout of h_L equals the model's logits (scaling included)
    from ee_callbacks.capture import HiddenStateCapture, model_forward

    ids = torch.randint(0, 60, (1, 5))
    with torch.no_grad(), HiddenStateCapture(parts) as cap:
        logits = model_forward(model, ids)
    assert torch.allclose(parts.readout(cap.states[-1]), logits, atol=1e-5)


class BrokenLogger(Logger):
    """A logger whose every call fails, as a network logger does when its service is down."""

    @property
    def name(self):
        return "broken"

    @property
    def version(self):
        return "0"

    def log_metrics(self, metrics, step=None):
        raise ConnectionError("service unreachable")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_failing_logger_warns_once_and_the_others_go_on(tmp_path):
    train, val = loaders()
    csv = CSVLogger(str(tmp_path), name="csv")
    probe = EarlyExitProbe(every_n_steps=2, probe_data=pattern_tokens(4, 24, 64, 5), print_table=False,
                           output_path=tmp_path / "ee_probes.jsonl")
    trainer = L.Trainer(max_steps=4, callbacks=[probe], logger=[csv, BrokenLogger()], default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, log_every_n_steps=1)
    module = TinyLM()
    module.log = lambda *a, **k: None  # the broken logger would also fail Lightning's own logging
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    ours = [w for w in caught if "BrokenLogger" in str(w.message)]
    assert len(ours) == 1  # once, not at every probe
    assert [r["step"] for r in read_records(tmp_path / "ee_probes.jsonl")] == [0, 2, 4]
    assert "ee/agree/layer_01" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()


def test_unwritable_output_path_fails_at_fit_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    train, val = loaders()
    probe = EarlyExitProbe(every_n_steps=2, probe_data=pattern_tokens(4, 24, 64, 5),
                           output_path=blocker / "ee_probes.jsonl")
    trainer = L.Trainer(max_steps=2, callbacks=[probe], logger=False, default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(OSError, match="output_path"):
        trainer.fit(TinyLM(), train, val)


def test_write_failure_mid_run_keeps_records_and_raises_at_the_end(tmp_path):
    train, val = loaders()
    out = tmp_path / "probes" / "ee_probes.jsonl"

    class BreakDir(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # the directory disappears and a file takes its place
                out.unlink()
                out.parent.rmdir()
                out.parent.write_text("not a directory")

    trainer, probe = _trainer_writing_records_to(out, BreakDir(), max_steps=4, root=tmp_path)
    with pytest.warns(RuntimeWarning, match="could not write"):
        with pytest.raises(OSError, match="could not be written"):
            trainer.fit(TinyLM(), train, val)
    assert trainer.global_step == 4  # training finished before the error was raised
    assert [h["step"] for h in probe.history] == [0, 2, 4]


def test_many_probes_keep_memory_flat_and_remove_hooks():
    model = tiny_llama(vocab=64, layers=4, hidden=32).eval()
    parts = find_model_parts(model)
    ids = pattern_tokens(4, 24, 64, 0)
    state = None
    for i in range(20):  # warm-up: allocator pools, lazy imports
        state = run_probe(model, [ids], parts=parts, previous=state).state
    gc.collect()
    before = _rss_mb()
    for i in range(500):
        state = run_probe(model, [ids], parts=parts, previous=state, step=i).state
        if i % 100 == 0:
            assert all(len(b._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in parts.blocks)
    gc.collect()
    growth = _rss_mb() - before
    assert growth < 50, f"resident memory grew by {growth:.1f} MB over 500 probes"
    assert all(len(b._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in parts.blocks)


def test_one_nan_token_leaves_token_level_metrics_on_the_others():
    model = tiny_llama(vocab=40, layers=4).eval()

    def poison(module, args, output):
        output = output.clone()
        output[0, -2] = float("nan")  # the last scored position of row 0: no later position attends to it
        return output

    handle = model.model.layers[2].register_forward_hook(poison)
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = run_probe(model, [ids]).to_dict()
        with torch.no_grad():  # masked attention spreads the NaN over its row (0 x NaN = NaN): row 1 stays finite
            finite_tokens = int(torch.isfinite(model(ids).logits[:, :-1]).all(-1).sum())
    handle.remove()
    clean = run_probe(model, [ids]).to_dict()
    assert 0 < finite_tokens == rec["probe"]["tokens"] < clean["probe"]["tokens"]
    assert rec["probe"]["nonfinite_tokens"] == clean["probe"]["tokens"] - finite_tokens
    assert rec["layers"][3]["kl"] is not None  # a layer mean over the finite tokens only
    assert rec["summary"]["oracle_skip_strict"] is not None
    assert sum(rec["saturation_hist"]) == finite_tokens  # every finite token, and only those
    assert sum(clean["saturation_hist"]) == clean["probe"]["tokens"]


def test_records_pending_when_the_fit_raises_are_written_by_on_exception(tmp_path):
    train, val = loaders()
    out = tmp_path / "probes" / "ee_probes.jsonl"

    class BreakThenFail(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # the step-2 record cannot be written and stays pending
                out.unlink()
                out.parent.rmdir()
                out.parent.write_text("not a directory")
            if trainer.global_step == 3:  # the directory is back, then the fit fails
                out.parent.unlink()
                out.parent.mkdir()
                raise RuntimeError("the user's training step failed")

    trainer, probe = _trainer_writing_records_to(out, BreakThenFail(), max_steps=6, root=tmp_path)
    with pytest.warns(RuntimeWarning, match="could not write"):
        with pytest.raises(RuntimeError, match="the user's training step failed"):
            trainer.fit(TinyLM(), train, val)
    assert [r["step"] for r in read_records(out)] == [2]


def _trainer_writing_records_to(out, breaker, max_steps, root):
    """A plain trainer with a probe every 2 steps writing to ``out`` and a callback that breaks the records path."""
    probe = EarlyExitProbe(every_n_steps=2, probe_data=pattern_tokens(4, 24, 64, 5), output_path=out,
                           print_table=False)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[breaker, probe], logger=False, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    return trainer, probe
