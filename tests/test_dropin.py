"""Drop-in on a stranger's run: their LightningModule (the model under any attribute, or the module *is* the model),
their DataModule yielding dicts, bf16-mixed and gradient accumulation, no model hints. Training must be bit-identical
with and without the callbacks, the parts must be proven at fit start, and the records must be right."""

import math

import lightning as L
import pytest
import torch
import transformers as T
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ee_callbacks import EarlyExitProbe, ExitHeads, read_records
from ee_callbacks.model_parts import ModelPartsError, find_language_model, prove_model_parts

V, SEQ, LAYERS = 48, 16, 3


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def tiny_opt(seed=0):
    # OPT registers its final norm *before* its layers and projects out to a narrower embedding afterwards
    torch.manual_seed(seed)
    return T.OPTForCausalLM(T.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16, dropout=0.1))


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    return (start + torch.arange(SEQ)[None, :] * 3) % V


class DictData(Dataset):
    def __init__(self, n, seed):
        self.ids = tokens(n, seed)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long)}


class DictDataModule(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(DictData(32, 0), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(DictData(8, 1), batch_size=4)


class StrangerLM(L.LightningModule):
    """Keeps a Hugging Face causal LM under ``attr`` (dotted: one level deeper), has no forward of its own."""

    def __init__(self, attr="net", build=tiny_llama):
        super().__init__()
        lm = build()
        *outer, last = attr.split(".")
        holder = self
        for name in outer:
            setattr(holder, name, nn.Module())
            holder = getattr(holder, name)
        setattr(holder, last, lm)
        self.attr = attr

    def _language_model(self):
        return self.get_submodule(self.attr)

    def training_step(self, batch, batch_idx):
        out = self._language_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])
        return out.loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class SelfModel(L.LightningModule):
    """A module that *is* the model: embedding, blocks, final norm and head as its own attributes, with a forward."""

    def __init__(self, d=32):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(LAYERS))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, idx):
        x = self.drop(self.tok(idx))
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_out(x)) * 0.5  # a logit scale of its own, applied outside any module

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        logits = self(ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].detach().clone())


PROBE = tokens(6, 7)


def _fit(root, make, with_callbacks, steps=6, logger=False, extra=(), **trainer_kw):
    L.seed_everything(5, workers=True)
    module = make()
    losses = Losses()
    callbacks = [losses, *extra]
    if with_callbacks:
        callbacks += [EarlyExitProbe(every_n_steps=3, probe_data=PROBE, print_table=False, wandb=False),
                      ExitHeads(kinds=["tuned_lens"], max_tokens=32, log_every_n_steps=1)]
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=logger, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(extra),
                        limit_val_batches=0, deterministic=True, **trainer_kw)
    trainer.fit(module, datamodule=DictDataModule())
    return module, torch.stack(losses.values), trainer


def _hand_layer_stats(lm, readout, ids, layer):
    """agree and ce of layer ``layer``'s logit lens, computed by hand from HF's hidden states and the named parts."""
    lm.eval()
    with torch.no_grad():
        out = lm(input_ids=ids, output_hidden_states=True)
        final = out.logits[:, :-1].float()
        z = readout(out.hidden_states[layer])[:, :-1].float()
    y = ids[:, 1:]
    agree = (z.argmax(-1) == final.argmax(-1)).float().mean().item()
    ce = nn.functional.cross_entropy(z.reshape(-1, V), y.reshape(-1)).item()
    return agree, ce


def _check_identical_and_records(tmp_path, make, readout=None, **trainer_kw):
    ref_module, ref_losses, _ = _fit(tmp_path / "plain", make, False, **trainer_kw)
    module, losses, trainer = _fit(tmp_path / "probed", make, True, **trainer_kw)
    assert torch.equal(ref_losses, losses)
    ref_state, state = ref_module.state_dict(), module.state_dict()
    assert ref_state.keys() == state.keys() and all(torch.equal(ref_state[k], state[k]) for k in state)
    records = read_records(tmp_path / "probed" / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 3, 6]
    for record in records:
        last = record["layers"][-1]
        assert last["layer"] == LAYERS and last["agree"] == 1.0 and last["kl"] == pytest.approx(0.0, abs=1e-6)
        assert record["model"]["parts"]["proof"]["passed"] is True
        assert record["heads"]["tuned_lens"]  # the exit heads were found, trained and evaluated
    return module, records


@pytest.mark.parametrize("attr", ["net", "lm", "backbone", "transformer", "wrapper.model", "outer.inner.model"])
def test_hf_model_under_any_attribute(tmp_path, attr):
    module, records = _check_identical_and_records(tmp_path, lambda: StrangerLM(attr))
    lm = module.get_submodule(attr)
    assert find_language_model(module) is lm
    # layer 1 by hand: final norm then lm_head on HF's raw hidden state of block 1
    agree, ce = _hand_layer_stats(lm, lambda h: lm.lm_head(lm.model.norm(h)), PROBE, 1)
    row = records[-1]["layers"][1]
    assert row["agree"] == pytest.approx(agree, abs=1e-6) and row["ce"] == pytest.approx(ce, rel=1e-5)


def test_opt_final_norm_registered_before_its_layers(tmp_path):
    module, records = _check_identical_and_records(tmp_path, lambda: StrangerLM("model", tiny_opt))
    lm = module.model
    parts = records[-1]["model"]["parts"]
    assert parts["final_norm"] == "model.decoder.final_layer_norm,model.decoder.project_out"
    dec = lm.model.decoder
    agree, ce = _hand_layer_stats(lm, lambda h: lm.lm_head(dec.project_out(dec.final_layer_norm(h))), PROBE, 1)
    row = records[-1]["layers"][1]
    assert row["agree"] == pytest.approx(agree, abs=1e-6) and row["ce"] == pytest.approx(ce, rel=1e-5)


def test_module_that_is_the_model_with_its_own_logit_scale(tmp_path):
    module, records = _check_identical_and_records(tmp_path, SelfModel)
    parts = records[-1]["model"]["parts"]
    assert (parts["blocks"], parts["final_norm"], parts["unembed"]) == ("layers", "ln_out", "head")
    assert parts["logit_scale"] == pytest.approx(0.5, rel=1e-6)  # measured by the proof, not declared anywhere
    module.eval()
    with torch.no_grad():
        h = module.tok(PROBE)
        h1 = module.layers[0](h)
        z1, final = module.head(module.ln_out(h1)) * 0.5, module(PROBE)
    y = PROBE[:, 1:]
    ce = nn.functional.cross_entropy(z1[:, :-1].reshape(-1, V), y.reshape(-1)).item()
    agree = (z1[:, :-1].argmax(-1) == final[:, :-1].argmax(-1)).float().mean().item()
    row = records[-1]["layers"][1]
    assert row["agree"] == pytest.approx(agree, abs=1e-6) and row["ce"] == pytest.approx(ce, rel=1e-5)


def test_bf16_mixed_with_gradient_accumulation(tmp_path):
    _check_identical_and_records(tmp_path, lambda: StrangerLM("backbone"), precision="bf16-mixed",
                                 accumulate_grad_batches=2)


@pytest.mark.parametrize("wrong", ["", "model.embed_tokens,model.norm"])
def test_wrong_final_norm_is_rejected_at_fit_start(tmp_path, wrong):
    # (a block's own RMSNorm would not do: at initialisation every RMSNorm of llama is the same function)
    probe = EarlyExitProbe(every_n_steps=3, probe_data=PROBE, final_norm=wrong)
    trainer = L.Trainer(max_steps=2, callbacks=[probe], logger=False, default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    with pytest.raises(ModelPartsError, match="the given final_norm=/unembed= do not reproduce.*Tried final_norm="):
        trainer.fit(StrangerLM("net"), datamodule=DictDataModule())
    assert trainer.global_step == 0


def test_proof_tries_other_candidates_and_names_them_when_none_passes():
    lm = tiny_llama()
    ids = tokens(2, 3)
    assert prove_model_parts(lm, ids).final_norm_path == "model.norm"
    with pytest.raises(ModelPartsError, match="final_norm=''"):
        prove_model_parts(lm, ids, final_norm="")

    class Scrambled(nn.Module):  # its head permutes the hidden features: no candidate readout can reproduce it
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()

        def forward(self, input_ids):
            h = self.inner.model(input_ids=input_ids).last_hidden_state
            return self.inner.lm_head(h.flip(-1))

    with pytest.raises(ModelPartsError, match="no candidate readout.*Tried.*final_norm='inner.model.norm'.*unembed="):
        prove_model_parts(Scrambled(), ids)


def test_looped_model_is_refused_clearly():
    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 16)
            self.blocks = nn.ModuleList(Block(16) for _ in range(2))
            self.out = nn.Linear(16, V)

        def forward(self, input_ids):
            x = self.emb(input_ids)
            for _ in range(2):  # the same blocks run twice per forward
                for block in self.blocks:
                    x = block(x)
            return self.out(x)

    with pytest.raises(ModelPartsError, match="ran \\[2, 2\\] times in one forward"):
        prove_model_parts(Looped(), tokens(2, 0))


def test_language_model_discovery_prefers_the_smallest_and_the_trainable():
    class Pair(nn.Module):  # a policy and a frozen reference copy
        def __init__(self):
            super().__init__()
            self.policy, self.reference = tiny_llama(0), tiny_llama(1)
            self.reference.requires_grad_(False)

    pair = Pair()
    assert find_language_model(pair) is pair.policy
    pair.reference.requires_grad_(True)
    with pytest.raises(ModelPartsError, match="several language models: 'policy', 'reference'.*model_attr="):
        find_language_model(pair)
    assert find_language_model(pair, "reference") is pair.reference
    with pytest.raises(ModelPartsError, match="found no language model in Sequential.*model_attr="):
        find_language_model(nn.Sequential(nn.Linear(3, 3)))


def test_checkpoint_monitors_eas_and_keeps_the_best_step(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="ee/summary/eas", mode="max", save_top_k=1,
                           every_n_train_steps=3, filename="{step}", auto_insert_metric_name=False)
    # EarlyStopping (strict: a missing key raises) checks at each epoch end, steps 8 and 12: it sees steps 6 and 12
    stop = EarlyStopping(monitor="ee/summary/eas", mode="max", patience=100, check_on_train_epoch_end=True)
    _, _, trainer = _fit(tmp_path, lambda: StrangerLM("net"), True, steps=12, extra=[ckpt, stop])
    records = read_records(tmp_path / "ee_probes.jsonl")
    scored = {r["step"]: r["summary"]["eas"] for r in records if r["step"] > 0}
    assert sorted(scored) == [3, 6, 9, 12] and len(set(scored.values())) > 1  # EAS moved while training
    best = max(scored, key=scored.get)
    assert ckpt.best_model_score.item() == pytest.approx(scored[best], rel=1e-6)
    assert ckpt.best_model_path.endswith(f"{best}.ckpt")
    assert trainer.callback_metrics["ee/summary/eas"].item() == pytest.approx(scored[12], rel=1e-6)
    assert stop.best_score.item() == pytest.approx(max(scored[6], scored[12]), rel=1e-6)


def test_state_key_ignores_the_records_path_and_resume_into_a_new_directory_keeps_history(tmp_path):
    a = EarlyExitProbe(every_n_steps=3, output_path=tmp_path / "a.jsonl")
    b = EarlyExitProbe(every_n_steps=3, output_path=tmp_path / "elsewhere" / "b.jsonl")
    assert a.state_key == b.state_key
    assert a.state_key != EarlyExitProbe(every_n_steps=3, probe_data={"x": PROBE, "y": PROBE}).state_key

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1, filename="{step}")
    _fit(tmp_path, lambda: StrangerLM("net"), True, steps=3, extra=[ckpt],
         logger=CSVLogger(str(tmp_path), name="run", version="first"))
    L.seed_everything(5)
    probe = EarlyExitProbe(every_n_steps=3, probe_data=PROBE, print_table=False)
    trainer = L.Trainer(max_steps=6, callbacks=[probe], logger=CSVLogger(str(tmp_path), name="run", version="second"),
                        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(StrangerLM("net"), datamodule=DictDataModule(), ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    first = read_records(tmp_path / "run" / "first" / "ee_probes.jsonl")
    second = read_records(tmp_path / "run" / "second" / "ee_probes.jsonl")
    assert [r["step"] for r in first] == [0, 3] and [r["step"] for r in second] == [6]
    assert [h["step"] for h in probe.history] == [0, 3, 6]  # the history came along
    assert second[0]["cka_drift"] is not None and not any(  # and so did the drift reference
        v is None or math.isnan(v) for v in second[0]["cka_drift"])


def test_two_runs_from_one_directory_with_a_lone_wandb_logger_get_two_files(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.chdir(tmp_path)  # a WandbLogger's log_dir is the launch directory: the old shared-file trap
    for _ in range(2):
        probe = EarlyExitProbe(every_n_steps=3, probe_data=PROBE, print_table=False)
        logger = WandbLogger(project="dropin", offline=True)
        trainer = L.Trainer(max_steps=3, callbacks=[probe], logger=logger, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(StrangerLM("net"), datamodule=DictDataModule())
        run_dir = logger.experiment.dir
        logger.experiment.finish()
        assert str(probe._path).startswith(run_dir)
    files = sorted(tmp_path.glob("wandb/offline-run-*/files/ee_probes.jsonl"))
    assert len(files) == 2 and not (tmp_path / "ee_probes.jsonl").exists()
    for path in files:
        assert [r["step"] for r in read_records(path)] == [0, 3]


CLI_YAML = """\
seed_everything: 3
trainer:
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  default_root_dir: {root}
  callbacks:
    - class_path: ee_callbacks.EarlyExitProbe
      init_args:
        every_n_steps: 2
        probe_set:
          sequences: 4
        print_table: false
        config:
          metrics: [lens, saturation, eas]
          eas_alpha: 0.25
          chunk_tokens: 512
    - class_path: ee_callbacks.ExitHeads
      init_args:
        kinds: [tuned_lens]
        max_tokens: 32
model:
  class_path: tests.test_dropin.StrangerLM
  init_args:
    attr: backbone
data:
  class_path: tests.test_dropin.DictDataModule
"""


def test_lightning_cli_yaml_with_nested_probe_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "fit.yaml"
    config.write_text(CLI_YAML.format(root=tmp_path))
    cli = LightningCLI(args=["fit", "--config", str(config)], save_config_callback=None)
    probe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyExitProbe))
    assert probe.config.eas_alpha == 0.25 and list(probe.config.metrics) == ["lens", "saturation", "eas"]
    records = read_records(tmp_path / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[-1]["summary"]["eas_alpha"] == 0.25 and records[-1]["heads"]["tuned_lens"]
