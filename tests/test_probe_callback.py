"""EarlyExitProbe inside real Lightning training runs."""

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from ee_callbacks import EarlyExitProbe, read_records, run_probe
from ee_callbacks.callbacks.probe import draw_probe_set
from tests.helpers import TinyLM, loaders, pattern_tokens, tiny_gpt2


def _trainer(tmp_path, callbacks, max_steps=30, logger=False, **kw):
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger, default_root_dir=str(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        deterministic=True, limit_val_batches=0, **kw,
    )


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _fit(tmp_path, with_probe, steps=30):
    L.seed_everything(123, workers=True)
    train, val = loaders()
    rec = LossRecorder()
    callbacks = [rec]
    if with_probe:
        callbacks.append(EarlyExitProbe(every_n_steps=7, probe_data=pattern_tokens(8, 24, 64, 5), print_table=False))
    module = TinyLM(dropout=0.1)
    trainer = _trainer(tmp_path, callbacks, max_steps=steps)
    trainer.fit(module, train, val)
    return torch.stack(rec.losses), {k: v.clone() for k, v in module.state_dict().items()}


def test_training_is_bit_identical_with_and_without_probe(tmp_path):
    losses_a, params_a = _fit(tmp_path / "a", with_probe=False)
    losses_b, params_b = _fit(tmp_path / "b", with_probe=True)
    assert losses_a.shape[0] == 30
    assert torch.equal(losses_a, losses_b)
    for key in params_a:
        assert torch.equal(params_a[key], params_b[key]), key
    steps = [r["step"] for r in read_records(tmp_path / "b" / "ee_probes.jsonl")]
    assert steps == [0, 7, 14, 21, 28, 30]


def test_probe_leaves_modes_grads_rng_untouched():
    module = TinyLM(dropout=0.1)
    module.configure_model()
    model = module.model
    model.train()
    model.transformer.h[1].eval()  # a mixed mode pattern must survive
    ids = pattern_tokens(4, 16, 64, 0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.lm_head.weight.requires_grad_(False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(42)
    rng = torch.get_rng_state()
    run_probe(model, [ids])
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    assert torch.is_autocast_enabled("cpu") is False


def test_gradient_accumulation_probes_once_per_optimizer_step(tmp_path):
    train, val = loaders()
    probe = EarlyExitProbe(every_n_steps=2, probe_data=pattern_tokens(4, 24, 64, 5), print_table=False)
    trainer = _trainer(tmp_path, [probe], max_steps=5, accumulate_grad_batches=3)
    trainer.fit(TinyLM(), train, val)
    steps = [r["step"] for r in read_records(tmp_path / "ee_probes.jsonl")]
    assert steps == [0, 2, 4, 5]


def test_csv_logger_gets_every_scalar_with_explicit_step(tmp_path):
    train, val = loaders()
    probe = EarlyExitProbe(every_n_steps=4, probe_set={"sequences": 8}, print_table=False)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, [probe], max_steps=8, logger=logger)
    trainer.fit(TinyLM(), train, val)
    jsonl = Path(logger.log_dir) / "ee_probes.jsonl"  # the trainer's log_dir
    records = read_records(jsonl)
    assert [r["step"] for r in records] == [0, 4, 8]
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    by_step = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("ee/") and value not in ("", None):
                by_step.setdefault(int(row["step"]), {})[key] = float(value)
    assert sorted(by_step) == [0, 4, 8]
    last = records[-1]
    assert by_step[8]["ee/agree/layer_02"] == pytest.approx(last["layers"][2]["agree"])
    assert by_step[8]["ee/kl/layer_01"] == pytest.approx(last["layers"][1]["kl"])
    assert by_step[8]["ee/summary/eas"] == pytest.approx(last["summary"]["eas"])
    assert "ee/summary/skip_at_consistency_0.95/max_prob" in by_step[8]
    # the probe set is drawn from the validation loader: the same tokens at every probe
    assert len({r["probe"]["tokens"] for r in records}) == 1


def test_named_probe_sets_and_output_path(tmp_path):
    train, val = loaders()
    out = tmp_path / "elsewhere" / "probes.jsonl"
    sets = {"counting": pattern_tokens(4, 24, 64, 5), "noise": torch.randint(0, 64, (4, 24))}
    probe = EarlyExitProbe(every_n_steps=3, probe_data=sets, output_path=out, print_table=False)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, [probe], max_steps=3, logger=logger)
    trainer.fit(TinyLM(), train, val)
    records = read_records(out)
    assert sorted({r["set"] for r in records}) == ["counting", "noise"]
    assert len(records) == 4
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        header = next(csv.reader(fh))
    assert "ee/counting/agree/layer_01" in header and "ee/noise/summary/eas" in header


def test_state_survives_checkpoint_resume(tmp_path):
    train, val = loaders()
    probe = EarlyExitProbe(every_n_steps=3, probe_data=pattern_tokens(4, 24, 64, 5), print_table=False)
    trainer = L.Trainer(max_steps=6, callbacks=[probe], logger=False, default_root_dir=str(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(TinyLM(), train, val)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    probe2 = EarlyExitProbe(every_n_steps=3, probe_data=pattern_tokens(4, 24, 64, 5), print_table=False)
    trainer2 = L.Trainer(max_steps=9, callbacks=[probe2], logger=False, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer2.fit(TinyLM(), train, val, ckpt_path=str(ckpt))
    steps = [r["step"] for r in read_records(tmp_path / "ee_probes.jsonl")]
    assert steps == [0, 3, 6, 9]  # no duplicate probe at the resume step
    assert [h["step"] for h in probe2.history] == [0, 3, 6, 9]
    assert read_records(tmp_path / "ee_probes.jsonl")[-1]["cka_drift"] is not None


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="every_n_steps"):
        EarlyExitProbe(every_n_steps=0)
    with pytest.raises(ValueError, match="probe_set.sequences must be a positive integer"):
        EarlyExitProbe(every_n_steps=1, probe_set={"sequences": -1})
    with pytest.raises(ValueError, match=r"unknown probe_set key\(s\) \['probe_sequences'\]; allowed: sequences"):
        EarlyExitProbe(every_n_steps=1, probe_set={"probe_sequences": 4})
    with pytest.raises(ValueError, match="probe_at"):
        EarlyExitProbe(every_n_steps=1, probe_at=["begin"])
    with pytest.raises(ValueError, match="unknown wandb key"):
        EarlyExitProbe(every_n_steps=1, wandb={"charts": True})
    grouped = EarlyExitProbe(probe_set={"seq_len": 16, "batch_size": 2}, probe_at=["end"], wandb={"images": True})
    assert (grouped.probe_sequences, grouped.seq_len, grouped.seed, grouped.batch_size) == (32, 16, 0, 2)
    assert (grouped.probe_at_start, grouped.probe_at_end, grouped.wandb_extras, grouped.wandb_images) == \
        (False, True, True, True)
    with pytest.raises(ValueError, match="eas_alpha"):
        EarlyExitProbe(every_n_steps=1, config={"eas_alpha": -0.1})


def test_bad_probe_data_fails_at_fit_start(tmp_path):
    train, val = loaders()
    probe = EarlyExitProbe(every_n_steps=1000, probe_data=torch.full((2, 8), 500), print_table=False)
    trainer = _trainer(tmp_path, [probe], max_steps=2)
    with pytest.raises(ValueError, match="vocabulary"):
        trainer.fit(TinyLM(), train, val)


def test_draw_is_seeded_and_does_not_touch_global_rng():
    data = torch.arange(200).reshape(50, 4)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = draw_probe_set(data, 10, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = draw_probe_set(data, 10, seed=1)
    c = draw_probe_set(data, 10, seed=2)
    assert torch.equal(torch.cat([x["input_ids"] for x in a]), torch.cat([x["input_ids"] for x in b]))
    assert not torch.equal(torch.cat([x["input_ids"] for x in a]), torch.cat([x["input_ids"] for x in c]))


def test_draw_is_the_same_from_tensor_dataset_and_loader():
    from torch.utils.data import DataLoader, TensorDataset

    data = torch.arange(400).reshape(100, 4)
    dataset = [data[i] for i in range(100)]

    class MapStyle(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return {"input_ids": data[i]}

    a = draw_probe_set(data, 10, seed=3)
    b = draw_probe_set(MapStyle(), 10, seed=3)
    c = draw_probe_set(DataLoader(TensorDataset(data), batch_size=7), 10, seed=3)
    flat = [torch.cat([x["input_ids"] for x in d]) for d in (a, b, c)]
    assert torch.equal(flat[0], flat[1]) and torch.equal(flat[0], flat[2])
    assert len(set(flat[0][:, 0].tolist())) == 10 and flat[0][:, 0].max() < 160  # from the first 40 rows


def test_drawn_labels_are_aligned_as_hugging_face_aligns_them_whatever_the_data_hands_over():
    """Dict batches keep their labels: aligned labels (-100 where ignored) stay; labels that are the next tokens
    (nanoGPT's y under the key 'labels') are shifted back, so the probe scores the same tokens as from the ids."""
    ids = pattern_tokens(12, 10, 64, 3)
    aligned = ids.clone()
    aligned[:, :4] = -100  # an ignored prompt
    ahead = torch.roll(ids, -1, dims=1)  # y_t = x_{t+1}
    other = (ids * 7 + 1) % 64  # other targets of the same shape: taken as given

    def drawn(labels):
        rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]
        return draw_probe_set(rows, 6, seed=0)[0]

    pick = drawn(aligned)["input_ids"]
    rows = [int((ids == row).all(dim=1).nonzero()) for row in pick]
    assert torch.equal(drawn(aligned)["labels"], aligned[rows])
    shifted = drawn(ahead)["labels"]
    assert torch.equal(shifted[:, 0], torch.full((6,), -100)) and torch.equal(shifted[:, 1:], ids[rows][:, 1:])
    assert torch.equal(drawn(other)["labels"], other[rows])
    model = tiny_gpt2(vocab=64, layers=2, hidden=32, dropout=0.0, seed=0)
    plain = run_probe(model, [{"input_ids": pick}], config={"metrics": ["lens"]})
    with_ahead = run_probe(model, [drawn(ahead)], config={"metrics": ["lens"]})
    assert plain.probe["tokens"] == with_ahead.probe["tokens"] == 6 * 9
    assert [r["ce"] for r in plain.layers] == pytest.approx([r["ce"] for r in with_ahead.layers], rel=1e-6)


def test_tensorboard_logger_gets_every_scalar(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ee_callbacks.sinks.loggers import flatten_record_metrics

    train, val = loaders()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    probe = EarlyExitProbe(every_n_steps=4, probe_data=pattern_tokens(4, 24, 64, 5), print_table=False)
    trainer = _trainer(tmp_path, [probe], max_steps=4, logger=logger)
    trainer.fit(TinyLM(), train, val)
    records = read_records(Path(logger.log_dir) / "ee_probes.jsonl")
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = flatten_record_metrics(records[-1])
    assert set(expected) <= tags  # every scalar of the record reached TensorBoard
    last = {e.step: e.value for e in events.Scalars("ee/summary/eas")}
    assert sorted(last) == [0, 4]
    assert last[4] == pytest.approx(records[-1]["summary"]["eas"], rel=1e-6)
