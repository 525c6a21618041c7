"""Lightning used in ways our own app never does: manual optimization with two optimizers, no validation data, tuple
and left-padded batches, a model built in ``configure_model()`` with gradient checkpointing, a frozen teacher beside
the trained student, an LM with a classification head, ``bf16-true``, validate/test with the callbacks attached,
epoch-driven runs with ``accumulate_grad_batches=3``, a resume, and a logger the project does not know.

Each run must finish, train exactly as without the callbacks, and record the right figures: the last layer agrees with
itself, and layer 1's CE and agreement are recomputed by hand from ``output_hidden_states`` and the model's own final
norm and head on the probe tokens (padding and ignored labels left out). (``torch.compile`` works too but its compile
takes about a minute on this CPU, so it is left out of the suite.)"""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ee_callbacks import EarlyExitProbe, ExitHeads, read_records
from tests.test_dropin import LAYERS, SEQ, V, tiny_llama  # a 3-block llama (d = 32, V = 48), 16-token rows


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, V, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + torch.arange(SEQ)[None, :] * step) % V


PROBE = tokens(6, 7)


def padded(n, seed, pad=5):
    """Left-padded rows (every other row starts with ``pad`` pad tokens) whose first two real tokens are a prompt
    (labels −100), as a dict per row."""
    ids = tokens(n, seed)
    mask = torch.ones_like(ids)
    mask[::2, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    first = mask.argmax(dim=1)
    for row, start in enumerate(first.tolist()):
        labels[row, start: start + 2] = -100
    return ids, mask, labels


class DictRows(Dataset):
    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Stream(IterableDataset):
    """A token stream without ``__len__``."""

    def __iter__(self):
        for i in range(64):
            yield tokens(1, 100 + i)[0]


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(pl_module.last_loss.detach().clone())


class Base(L.LightningModule):
    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class HFLM(Base):
    """The language model under ``net``; batches are tensors, tuples ``(ids, labels, mask)`` or dicts."""

    def __init__(self):
        super().__init__()
        self.net = tiny_llama()

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                  "labels": batch.get("labels", batch["input_ids"])}
        elif isinstance(batch, (list, tuple)) and len(batch) == 3:
            kw = {"input_ids": batch[0], "labels": batch[1], "attention_mask": batch[2]}
        else:
            ids = batch[0] if isinstance(batch, (list, tuple)) else batch
            kw = {"input_ids": ids, "labels": ids}
        self.last_loss = self.net(**kw).loss
        return self.last_loss


class Evaluated(HFLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(input_ids=batch[0], labels=batch[0]).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.net(input_ids=batch[0], labels=batch[0]).loss)


class TwoOptimizers(HFLM):
    """Manual optimization: the blocks on AdamW, embeddings and head on SGD, both stepped every batch (Lightning then
    moves ``global_step`` by two per batch)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body, ends = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        body.zero_grad()
        ends.zero_grad()
        self.manual_backward(loss)
        body.step()
        ends.step()

    def configure_optimizers(self):
        named = list(self.net.named_parameters())
        ends = [p for n, p in named if "embed" in n or "lm_head" in n]
        body = [p for n, p in named if not ("embed" in n or "lm_head" in n)]
        return torch.optim.AdamW(body, lr=3e-3), torch.optim.SGD(ends, lr=1e-2, momentum=0.9)


class BuiltLate(HFLM):
    """The model is built in ``configure_model()``, with gradient checkpointing."""

    def __init__(self):
        Base.__init__(self)
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = tiny_llama()
            self.net.gradient_checkpointing_enable()


class TeacherStudent(Base):
    """Distillation: a frozen teacher and the trained student, both full causal LMs."""

    def __init__(self):
        super().__init__()
        self.teacher = tiny_llama(1).requires_grad_(False)
        self.student = tiny_llama(2)

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        with torch.no_grad():
            target = self.teacher(input_ids=ids).logits.log_softmax(-1)
        student = self.student(input_ids=ids).logits.log_softmax(-1)
        self.last_loss = nn.functional.kl_div(student, target, log_target=True, reduction="batchmean")
        return self.last_loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.student.parameters(), lr=3e-3)


class LMWithClassifier(Base):
    """An LM plus a classification head on its last hidden state, trained together."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()
        self.classifier = nn.Linear(32, 3)

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        out = self.lm(input_ids=ids, labels=ids, output_hidden_states=True)
        klass = self.classifier(out.hidden_states[-1][:, -1])
        self.last_loss = out.loss + nn.functional.cross_entropy(klass, ids[:, 0] % 3)
        return self.last_loss


class MemoryLogger(Logger):
    """A logger the project does not know: keeps what it is given."""

    def __init__(self, version):
        super().__init__()
        self._version = version
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return self._version

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def tensor_loader(n=24, seed=0, batch=4):
    return DataLoader(TensorDataset(tokens(n, seed)), batch_size=batch)


def probe_callbacks(every=2, probe_data=PROBE, **probe_kw):
    return [EarlyExitProbe(every_n_steps=every, probe_data=probe_data, print_table=False, wandb=False, **probe_kw),
            ExitHeads(kinds=["tuned_lens"], max_tokens=32, every_n_steps=1)]


def fit(root, module, train, val=None, callbacks=(), steps=4, logger=False, ckpt_path=None, **trainer_kw):
    L.seed_everything(3)
    losses = Losses()
    trainer_kw.setdefault("max_steps", steps)
    trainer = L.Trainer(callbacks=[losses, *callbacks], logger=logger, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        limit_val_batches=0, deterministic=True, **trainer_kw)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, (torch.stack(losses.values) if losses.values else None)


def assert_same_training(a, b, losses_a, losses_b):
    assert torch.equal(losses_a, losses_b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hand_layer(lm, batches, layer=1):
    """Layer ``layer``'s logit-lens CE and agreement with the final top-1 (the model's own logits), by hand: HF's
    hidden state of that layer through the model's final norm and head, over the positions whose next token is a
    real label."""
    lm.eval()
    # the probe reads out in float32 (ProbeConfig.dtype) whatever the model's dtype: float32 copies of norm and head
    norm, head = copy.deepcopy(lm.model.norm).float(), copy.deepcopy(lm.lm_head).float()
    ce, agree, n = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
            out = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            z = head(norm(out.hidden_states[layer].float()))[:, :-1]
            final = out.logits.float()[:, :-1]
            target = (labels if labels is not None else ids)[:, 1:]
            valid = target != -100
            if mask is not None:
                valid &= mask[:, 1:].bool() & mask[:, :-1].bool()
            ce += nn.functional.cross_entropy(z[valid], target[valid], reduction="sum").item()
            agree += (z.argmax(-1) == final.argmax(-1))[valid].float().sum().item()
            n += int(valid.sum())
    return ce / n, agree / n, n


def check_record(record, lm, batches, ce_rel=1e-5, agree_abs=1e-6):
    assert record["model"]["parts"]["proof"]["passed"] is True
    last = record["layers"][-1]
    assert last["layer"] == LAYERS and last["agree"] == 1.0
    ce, agree, n = hand_layer(lm, batches)
    assert record["probe"]["tokens"] == n
    row = record["layers"][1]
    assert row["ce"] == pytest.approx(ce, rel=ce_rel) and row["agree"] == pytest.approx(agree, abs=agree_abs)


def test_manual_optimization_with_two_optimizers_probes_on_every_multiple_and_resumes(tmp_path):
    # two optimizer steps per batch: global_step runs 2, 4, ..., 12 and never lands on 3 or 9 (epochs of 4 steps)
    plain = TwoOptimizers()
    _, ref = fit(tmp_path / "plain", plain, tensor_loader(8), steps=12)

    def callbacks():
        probe = EarlyExitProbe(every_n_steps=3, probe_data=PROBE, print_table=False, wandb=False)
        return probe, ExitHeads(kinds=["tuned_lens"], max_tokens=32, every_n_steps=3)

    module = TwoOptimizers()
    probe, heads = callbacks()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer, losses = fit(tmp_path / "probed", module, tensor_loader(8), callbacks=[probe, heads, ckpt], steps=12)
    assert trainer.global_step == 12
    assert_same_training(plain, module, ref, losses)
    records = read_records(tmp_path / "probed" / "ee_probes.jsonl")
    # one probe per multiple of 3 passed, recorded at the step it was taken
    assert [r["step"] for r in records] == [0, 4, 6, 10, 12]
    # and the heads train on the batches starting the blocks of 3 steps: those starting at steps 0, 4, 6 and 10
    assert heads.head_steps == 4 and records[-1]["heads"]["tuned_lens"]
    check_record(records[-1], module.net, [{"input_ids": PROBE}])

    # resumed at step 4 (an epoch end), the run continues as the uninterrupted one: probes, heads and figures
    resumed = TwoOptimizers()
    probe2, heads2 = callbacks()
    fit(tmp_path / "resumed", resumed, tensor_loader(8), callbacks=[probe2, heads2], steps=12,
        ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    again = read_records(tmp_path / "resumed" / "ee_probes.jsonl")
    assert [r["step"] for r in again] == [6, 10, 12] and heads2.head_steps == 4
    assert again[-1]["layers"] == records[-1]["layers"] and again[-1]["heads"] == records[-1]["heads"]


def test_no_validation_data_stops_at_fit_start_naming_probe_data_and_a_stream_can_be_the_probe_set(tmp_path):
    stream = DataLoader(Stream(), batch_size=4)
    module = HFLM()
    probe = EarlyExitProbe(every_n_steps=2, print_table=False, wandb=False)
    with pytest.raises(ValueError, match="no validation dataloader.*pass probe_data="):
        fit(tmp_path / "none", module, stream, callbacks=[probe])
    assert probe.history == [] and read_records(tmp_path / "none" / "ee_probes.jsonl") == []

    module = HFLM()
    probe = EarlyExitProbe(every_n_steps=2, probe_data=DataLoader(Stream(), batch_size=4), print_table=False,
                           wandb=False, probe_set={"sequences": 6})
    fit(tmp_path / "stream", module, stream, callbacks=[probe])
    records = read_records(tmp_path / "stream" / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4] and records[-1]["probe"]["sequences"] == 6
    drawn = [{"input_ids": b["input_ids"]} for b in probe._sets["default"]]
    assert torch.cat([b["input_ids"] for b in drawn]).shape == (6, SEQ)
    check_record(records[-1], module.net, drawn)


def test_left_padded_dict_batches_with_ignored_labels_score_only_real_labels(tmp_path):
    ids, mask, labels = padded(16, 0)
    val = DictRows(*padded(8, 1))
    train = DataLoader(DictRows(ids, mask, labels), batch_size=4)
    plain = HFLM()
    _, ref = fit(tmp_path / "plain", plain, train, DataLoader(val, batch_size=4))
    module = HFLM()
    probe, heads = probe_callbacks(probe_data=None, probe_set={"sequences": 8, "batch_size": 4})
    _, losses = fit(tmp_path / "probed", module, train, DataLoader(val, batch_size=4), callbacks=[probe, heads])
    assert_same_training(plain, module, ref, losses)
    records = read_records(tmp_path / "probed" / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    batches = [{"input_ids": val.ids[i:i + 4], "attention_mask": val.mask[i:i + 4], "labels": val.labels[i:i + 4]}
               for i in (0, 4)]
    check_record(records[-1], module.net, batches, ce_rel=1e-4)
    # 4 unpadded rows: 15 positions less the one whose next token is an ignored prompt label; 4 padded rows: 10 less 1
    assert records[-1]["probe"]["tokens"] == 4 * 14 + 4 * 9


def test_tuple_batches_train_and_a_tuple_with_a_mask_warns_that_it_is_not_read(tmp_path):
    ids, mask, labels = padded(16, 0)
    train = DataLoader(TensorDataset(ids, labels, mask), batch_size=4)
    module = HFLM()
    probe, heads = probe_callbacks(probe_data=None, probe_set={"sequences": 4})
    with pytest.warns(RuntimeWarning) as caught:
        fit(tmp_path, module, train, DataLoader(TensorDataset(*padded(8, 1)), batch_size=4), callbacks=[probe, heads])
    messages = [str(w.message) for w in caught]
    assert any("probe data yields tuples: only their first item is read" in m for m in messages)
    assert sum("ExitHeads: tuple batches name only their first item" in m for m in messages) == 1
    assert [r["step"] for r in read_records(tmp_path / "ee_probes.jsonl")] == [0, 2, 4]
    # (ids, ids) and nanoGPT's shifted (x, y) tuples mark nothing out: no warning, and their first item is the text
    import warnings

    for pair in [(ids, ids), (ids[:, :-1], ids[:, 1:])]:
        probe = EarlyExitProbe(every_n_steps=2, print_table=False, wandb=False, probe_set={"sequences": 4})
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            fit(tmp_path / f"pair{pair[0].shape[1]}", HFLM(), train, DataLoader(TensorDataset(*pair), batch_size=4),
                callbacks=[probe])
        drawn = probe._sets["default"][0]["input_ids"]
        assert drawn.shape == (4, pair[0].shape[1]) and all(any(torch.equal(r, s) for s in pair[0]) for r in drawn)


def test_model_built_in_configure_model_with_gradient_checkpointing(tmp_path):
    plain = BuiltLate()
    _, ref = fit(tmp_path / "plain", plain, tensor_loader())
    module = BuiltLate()
    probe, heads = probe_callbacks()
    _, losses = fit(tmp_path / "probed", module, tensor_loader(), callbacks=[probe, heads])
    assert module.net.is_gradient_checkpointing
    assert_same_training(plain, module, ref, losses)
    records = read_records(tmp_path / "probed" / "ee_probes.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4] and heads.head_steps == 4
    check_record(records[-1], module.net, [{"input_ids": PROBE}])


@pytest.mark.parametrize("make, attr", [(TeacherStudent, "student"), (LMWithClassifier, "lm")])
def test_the_trained_language_model_is_the_one_probed(tmp_path, make, attr):
    plain = make()
    _, ref = fit(tmp_path / "plain", plain, tensor_loader())
    module = make()
    probe, heads = probe_callbacks()
    _, losses = fit(tmp_path / "probed", module, tensor_loader(), callbacks=[probe, heads])
    assert_same_training(plain, module, ref, losses)
    lm = getattr(module, attr)
    assert probe._lm is lm and heads._lm is lm
    records = read_records(tmp_path / "probed" / "ee_probes.jsonl")
    assert records[-1]["model"]["params"] == sum(p.numel() for p in lm.parameters())
    check_record(records[-1], lm, [{"input_ids": PROBE}])


def test_bf16_true_weights(tmp_path):
    plain = HFLM()
    _, ref = fit(tmp_path / "plain", plain, tensor_loader(), precision="bf16-true")
    module = HFLM()
    probe, heads = probe_callbacks()
    _, losses = fit(tmp_path / "probed", module, tensor_loader(), callbacks=[probe, heads], precision="bf16-true")
    assert module.net.lm_head.weight.dtype == torch.bfloat16
    assert_same_training(plain, module, ref, losses)
    records = read_records(tmp_path / "probed" / "ee_probes.jsonl")
    assert records[-1]["model"]["parts"]["proof"]["tolerance"] > 1e-2  # the half-precision tolerance
    check_record(records[-1], module.net, [{"input_ids": PROBE}])


def test_validate_and_test_with_the_callbacks_attached_neither_probe_nor_change_results(tmp_path):
    val = tensor_loader(8, 1)
    results = []
    for with_callbacks in (False, True):
        module = Evaluated()
        callbacks = probe_callbacks() if with_callbacks else []
        trainer = L.Trainer(callbacks=callbacks, logger=False, default_root_dir=str(tmp_path / str(with_callbacks)),
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            max_steps=2)
        first = (trainer.validate(module, val, verbose=False), trainer.test(module, val, verbose=False))
        assert not (tmp_path / str(with_callbacks) / "ee_probes.jsonl").exists()
        trainer.fit(module, tensor_loader(), val)
        after = (trainer.validate(module, val, verbose=False), trainer.test(module, val, verbose=False))
        results.append((first, after))
        if with_callbacks:
            assert [r["step"] for r in read_records(tmp_path / "True" / "ee_probes.jsonl")] == [0, 2]
            assert callbacks[1]._handles == []  # the heads' hooks are gone after fit
    assert results[0] == results[1]


def test_epoch_driven_run_with_accumulate_grad_batches_3(tmp_path):
    # 5 batches an epoch, 3 per optimizer step: steps end after batches 3 and 5 of each epoch (4 steps in 2 epochs)
    kw = dict(max_steps=-1, max_epochs=2, accumulate_grad_batches=3)
    plain = HFLM()
    _, ref = fit(tmp_path / "plain", plain, tensor_loader(20), **kw)
    module = HFLM()
    probe, heads = probe_callbacks()
    trainer, losses = fit(tmp_path / "probed", module, tensor_loader(20), callbacks=[probe, heads], **kw)
    assert trainer.global_step == 4
    assert_same_training(plain, module, ref, losses)
    records = read_records(tmp_path / "probed" / "ee_probes.jsonl")
    assert [(r["step"], r["epoch"]) for r in records] == [(0, 0), (2, 0), (4, 1)]
    assert heads.head_steps == 4
    check_record(records[-1], module.net, [{"input_ids": PROBE}])


def test_unknown_logger_and_a_resume_with_ckpt_path(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1, filename="{step}")
    first = MemoryLogger("first")
    # epochs of 2 steps: the checkpoint at step 2 ends an epoch, so Lightning resumes the same batches
    fit(tmp_path, HFLM(), tensor_loader(8), callbacks=[*probe_callbacks(), ckpt], logger=first, steps=4)
    second = MemoryLogger("second")
    module = HFLM()
    probe, heads = probe_callbacks()
    fit(tmp_path, module, tensor_loader(8), callbacks=[probe, heads], logger=second, steps=6,
        ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    a = read_records(tmp_path / "ee_probes" / "memory" / "first" / "ee_probes.jsonl")
    b = read_records(tmp_path / "ee_probes" / "memory" / "second" / "ee_probes.jsonl")
    assert [r["step"] for r in a] == [0, 2, 4] and [r["step"] for r in b] == [4, 6]
    assert [h["step"] for h in probe.history] == [0, 2, 4, 6]
    # the resumed run recomputes step 4 exactly as the first run did
    same = lambda summary: {k: v for k, v in summary.items() if k != "probe_s"}  # noqa: E731
    assert a[-1]["layers"] == b[0]["layers"] and same(a[-1]["summary"]) == same(b[0]["summary"])
    for logger, records in ((first, a), (second, b)):
        logged = {step: m for step, m in logger.rows if "ee/agree/layer_03" in m}
        assert sorted(logged) == [r["step"] for r in records]
        for record in records:
            assert logged[record["step"]]["ee/ce/layer_01"] == pytest.approx(record["layers"][1]["ce"], rel=1e-6)
    check_record(b[-1], module.net, [{"input_ids": PROBE}])


def test_fast_dev_run_writes_its_records_where_a_run_without_logger_does(tmp_path):
    """fast_dev_run swaps the user's logger for Lightning's DummyLogger: the records go to the root directory (as
    without a logger), not to an 'ee_probes/DummyLogger/...' directory named after the stand-in."""
    from lightning.pytorch.loggers import CSVLogger

    probe = EarlyExitProbe(every_n_steps=1, probe_data=PROBE, print_table=False, wandb=False)
    trainer = L.Trainer(fast_dev_run=2, callbacks=[probe], logger=CSVLogger(str(tmp_path / "csv")),
                        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(HFLM(), tensor_loader(8))
    assert [r["step"] for r in read_records(tmp_path / "ee_probes.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "ee_probes").exists() and not (tmp_path / "csv").exists()
