"""ExitHeads, tuned lens, exit heads and CALM confidence classifiers, in real Lightning training runs."""

import csv
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ee_callbacks import EarlyExitProbe, ExitHeads, find_model_parts
from ee_callbacks.capture import HiddenStateCapture
from ee_callbacks.readouts import (ExitHeadsMismatchError, HeadTargets, build_readout, head_fingerprint,
                                   load_exit_heads)
from tests.helpers import TinyLM, loaders, one_thread, pattern_tokens, tiny_gpt2, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_KINDS = ["tuned_lens", "linear", "mlp", "confidence"]
PROBE = pattern_tokens(16, 24, 64, 7)  # held-out sequences (training uses seed 0)


def _trainer(root, callbacks, max_steps, logger=False, **kw):
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=logger, default_root_dir=str(root),
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     deterministic=True, limit_val_batches=0, **kw)


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


# ------------------------------------------------------------------------------------------------ fresh heads


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_fresh_heads_read_out_exactly_the_logit_lens(build):
    model = build(dropout=0.0).eval()
    parts = find_model_parts(model)
    ids = pattern_tokens(4, 16, 64, 3)
    with torch.no_grad(), HiddenStateCapture(parts) as cap:
        model(input_ids=ids)
    for kind in ("tuned_lens", "mlp", "linear"):
        head = build_readout(kind, parts, None)
        assert head.layers == [1, 2, 3]
        with torch.no_grad():
            for layer in head.layers:
                h = cap.states[layer].reshape(-1, 32)
                diff = (head.logits(h, layer) - parts.readout(h)).abs().max()
                assert float(diff) == 0.0, (kind, layer)
    # objective="ce": a fresh lens' loss is the logit lens' next-token cross-entropy
    h2, labels = cap.states[2][:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1)
    ce_lens = build_readout("tuned_lens", parts, [2], objective="ce")
    with torch.no_grad():
        got = ce_lens.loss(h2, 2, HeadTargets(final_logp=torch.zeros(1), labels=labels))
        want = torch.nn.functional.cross_entropy(parts.readout(h2), labels)
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(want) > 1.0
    conf = build_readout("confidence", parts, [2])
    assert conf.kind == "confidence" and conf.layers == [2]
    assert torch.equal(conf.confidence(cap.states[2].reshape(-1, 32), 2), torch.full((64,), 0.5))


def test_head_training_sends_no_gradient_to_the_model():
    model = tiny_llama()
    parts = find_model_parts(model)
    ids = pattern_tokens(4, 16, 64, 3)
    with HiddenStateCapture(parts) as cap:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    tuned = build_readout("tuned_lens", parts, None)
    final_logp = torch.log_softmax(out.logits.detach().reshape(-1, 64), dim=-1)
    targets = HeadTargets(final_logp=final_logp)
    h = cap.states[2].reshape(-1, 32)
    assert not h.requires_grad  # captured detached: the model's graph never reaches the heads
    loss = tuned.loss(h, 2, targets)
    loss.backward()
    assert float(loss.detach()) > 0
    assert float(tuned.per_layer["2"].weight.grad.abs().sum()) > 0
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name]), name  # the shared norm/unembedding took no gradient


class GradChecker(L.Callback):
    """Placed after ExitHeads: the heads hold no gradient after the model's backward, and the heads' training
    (in ExitHeads.on_train_batch_end) leaves the model's gradients bit-identical."""

    def __init__(self, heads):
        self.heads = heads
        self.head_grads_after_backward = []
        self.model_grads_equal = []
        self.snapshot = None

    def on_after_backward(self, trainer, pl_module):
        self.head_grads_after_backward.append(any(p.grad is not None for p in self.heads.heads.parameters()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.snapshot = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        self.model_grads_equal.append(
            set(grads) == set(self.snapshot) and all(torch.equal(grads[n], self.snapshot[n]) for n in grads))


def test_no_gradient_flows_between_heads_and_model_in_training(tmp_path):
    train, _ = loaders()
    heads = ExitHeads(every_n_steps=1, kinds=ALL_KINDS, optim={"lr": 1e-2})
    checker = GradChecker(heads)
    trainer = _trainer(tmp_path, [heads, checker], max_steps=4)
    trainer.fit(TinyLM(kind="llama", dropout=0.0), train)
    assert heads.head_steps == 4
    assert checker.head_grads_after_backward == [False] * 4
    assert checker.model_grads_equal == [True] * 4
    assert all(float(p.detach().abs().sum()) > 0 for p in heads.heads["tuned_lens"].parameters())  # they trained


# ------------------------------------------------------------------------------------------------ invariance


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _fit_losses(root, with_heads, steps=24):
    L.seed_everything(123, workers=True)
    train, val = loaders()
    rec = LossRecorder()
    callbacks = [rec]
    if with_heads:
        callbacks += [ExitHeads(every_n_steps=1, kinds=ALL_KINDS, optim={"lr": 1e-2}, max_tokens=64),
                      EarlyExitProbe(every_n_steps=10, probe_data=PROBE, print_table=False)]
    module = TinyLM(dropout=0.1)
    _trainer(root, callbacks, steps).fit(module, train, val)
    return torch.stack(rec.losses), {k: v.clone() for k, v in module.state_dict().items()}, callbacks


def test_training_is_bit_identical_with_and_without_heads(tmp_path):
    losses_a, params_a, _ = _fit_losses(tmp_path / "a", with_heads=False)
    losses_b, params_b, callbacks = _fit_losses(tmp_path / "b", with_heads=True)
    assert losses_a.shape[0] == 24
    assert torch.equal(losses_a, losses_b)
    for key in params_a:
        assert torch.equal(params_a[key], params_b[key]), key
    heads = callbacks[1]
    assert heads.head_steps == 24
    # hooks are gone after fit: the model is left as it was found
    parts = heads._parts
    assert all(len(b._forward_hooks) == 0 for b in parts.blocks) and len(parts.unembed._forward_hooks) == 0


def test_gradient_accumulation_steps_heads_once_per_optimizer_step(tmp_path):
    train, _ = loaders(n=72)  # 9 batches: three full accumulation windows
    heads = ExitHeads(every_n_steps=1, kinds=["tuned_lens"], optim={"lr": 1e-2})
    seen = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, heads.head_steps))

    _trainer(tmp_path, [heads, Count()], max_steps=3, accumulate_grad_batches=3).fit(TinyLM(dropout=0.0), train)
    assert seen == [(0, 0), (0, 0), (1, 1), (1, 1), (1, 1), (2, 2), (2, 2), (2, 2), (3, 3)]


class PlainLM(torch.nn.Module):
    """A minimal non-Hugging-Face LM whose blocks can run under reentrant activation checkpointing."""

    def __init__(self, vocab=64, d=32, layers=4, checkpointing=False):
        super().__init__()
        self.checkpointing = checkpointing
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(
            _Residual(torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                          torch.nn.Linear(2 * d, d))) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            if self.checkpointing and self.training:  # the block (and its hooks) re-runs in backward
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
            else:
                x = block(x)
        return self.head(self.ln_f(x))


class _Residual(torch.nn.Module):
    """A block returns the hidden state itself (the residual inside it), as the probe's capture expects."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class PlainModule(L.LightningModule):
    def __init__(self, checkpointing):
        super().__init__()
        torch.manual_seed(3)
        self.model = PlainLM(checkpointing=checkpointing)

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        logits = self.model(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_activation_checkpointing_recomputation_is_ignored(tmp_path):
    def run(checkpointing, root):
        train = DataLoader(TensorDataset(pattern_tokens(24, 24, 64, 0)), batch_size=8)
        heads = ExitHeads(every_n_steps=1, kinds=["tuned_lens", "confidence"], optim={"lr": 1e-2}, max_tokens=64)
        module = PlainModule(checkpointing)
        calls = []
        module.model.blocks[1].register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
        _trainer(root, [heads], max_steps=3).fit(module, train)
        return heads, calls

    (plain, plain_calls), (ckpt, ckpt_calls) = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    # first call: the no-grad forward that proves the parts at fit start; then one per training step
    assert plain_calls == [False] + [True] * 3
    assert ckpt_calls == [False] + [False, True] * 3  # forward without grad, then the recomputation in backward
    assert ckpt.head_steps == 3
    for (name, a), b in zip(plain.heads.state_dict().items(), ckpt.heads.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------ what heads learn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """TinyLM (GPT-2, 4 blocks) trained 80 steps with all head kinds, probed at the end; heads saved at fit end."""
    root = tmp_path_factory.mktemp("trained")
    L.seed_everything(0)
    train, _ = loaders()
    heads = ExitHeads(every_n_steps=1, kinds=ALL_KINDS, optim={"lr": 1e-2}, max_tokens=128, log_every_n_steps=20, save_dir=root / "heads")
    probe = EarlyExitProbe(every_n_steps=1000, probe_data=PROBE, print_table=False, probe_at=["end"],
                           output_path=root / "ee_probes.jsonl")
    logger = CSVLogger(str(root), name="csv")
    module = TinyLM(dropout=0.0)
    # the probe first: at its on_train_end it asks the readout providers (ExitHeads) to write their heads
    trainer = _trainer(root, [probe, heads], max_steps=80, logger=logger)
    trainer.fit(module, train)
    return {"heads": heads, "probe": probe, "module": module, "record": probe.last_records["default"],
            "logger": logger, "root": root, "trainer": trainer}


def test_tuned_lens_beats_logit_lens_at_every_middle_layer(trained):
    record = trained["record"]
    L_ = record["model"]["n_layers"]
    lens_kl = {row["layer"]: row["kl"] for row in record["layers"]}
    for kind in ("tuned_lens", "linear", "mlp"):
        rows = record["heads"][kind]
        assert [r["layer"] for r in rows] == list(range(1, L_))
        for row in rows:
            assert row["kl"] < 0.5 * lens_kl[row["layer"]], (kind, row["layer"], row["kl"], lens_kl[row["layer"]])
    summary = record["summary"]
    for kind in ("tuned_lens", "linear", "mlp"):
        assert summary[f"head_{kind}_oracle_skip_strict"] >= summary["oracle_skip_strict"]
        assert summary[f"head_{kind}_eas"] > summary["eas"]
        assert f"head_{kind}" in record["curves"]
    assert "head_confidence" in record["curves"]


def test_confidence_classifier_beats_chance_on_held_out_tokens(trained):
    heads, module = trained["heads"], trained["module"]
    model = module.model.eval()
    parts = find_model_parts(model)
    conf = heads.probe_readouts()["confidence"]
    with torch.no_grad(), HiddenStateCapture(parts) as cap:
        logits = model(input_ids=PROBE).logits
    top_final = logits[:, :-1].reshape(-1, 64).argmax(-1)
    aucs = {}
    for layer in conf.layers:
        h = cap.states[layer][:, :-1].reshape(-1, 32)
        with torch.no_grad():
            agree = parts.readout(h).argmax(-1) == top_final
            score = conf.confidence(h, layer)
        if 10 <= int(agree.sum()) <= agree.numel() - 10:
            aucs[layer] = _auc(score, agree)
    assert aucs, "no layer has both outcomes on the probe set"
    assert all(a > 0.6 for a in aucs.values()), aucs
    # the probe's own view of it: confidence is higher on tokens whose lens top-1 already matches
    for row in trained["record"]["heads"]["confidence"]:
        if row["layer"] in aucs:
            assert row["mean_conf_when_agree"] > row["mean_conf"]


def test_training_losses_and_head_metrics_reach_the_logger(trained):
    with open(Path(trained["logger"].log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    losses = {kind: [(int(r["step"]), float(r[f"ee/heads_train/{kind}/loss"])) for r in rows
                     if r.get(f"ee/heads_train/{kind}/loss") not in ("", None)] for kind in ALL_KINDS}
    for kind, series in losses.items():
        assert [s for s, _ in series] == [20, 40, 60, 80], kind
    last = trained["record"]
    # the training KL of the tuned lens at step 80 is far below the logit lens' KL (mean over the middle layers)
    lens_kl = sum(row["kl"] for row in last["layers"][1:-1]) / (len(last["layers"]) - 2)
    assert 0 < losses["tuned_lens"][-1][1] < 0.25 * lens_kl
    probe_keys = {k for r in rows for k, v in r.items() if v not in ("", None)}
    assert "ee/heads/tuned_lens/kl/layer_01" in probe_keys
    assert "ee/heads/confidence/mean_conf/layer_02" in probe_keys
    row80 = next(r for r in rows if r.get("ee/heads/tuned_lens/kl/layer_02") not in ("", None))
    assert float(row80["ee/heads/tuned_lens/kl/layer_02"]) == pytest.approx(last["heads"]["tuned_lens"][1]["kl"])


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip_and_refusal_on_another_model(trained, tmp_path):
    heads, module, probe = trained["heads"], trained["module"], trained["probe"]
    saved = trained["root"] / "heads"
    assert probe.heads_dir == str(saved)  # saved at fit end, before the probe's on_train_end
    config = json.loads((saved / "config.json").read_text())
    assert config["fingerprint"]["combined"] == head_fingerprint(find_model_parts(module.model))["combined"]
    assert sorted(config["kinds"]) == sorted(ALL_KINDS) and config["trained"]["head_steps"] == 80
    loaded = load_exit_heads(saved, module.model)
    assert sorted(loaded) == sorted(ALL_KINDS)
    h = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    original = heads.probe_readouts()
    with torch.no_grad():
        for kind in ("tuned_lens", "linear", "mlp"):
            assert torch.equal(loaded[kind].logits(h, 2), original[kind].logits(h, 2)), kind
        assert torch.equal(loaded["confidence"].confidence(h, 3), original["confidence"].confidence(h, 3))
    for p in loaded["tuned_lens"].parameters():
        assert not p.requires_grad
    # the probe gives the same numbers with the loaded heads as with the live ones
    from ee_callbacks import run_probe

    rec = run_probe(module.model, [PROBE], readouts=loaded, config={"metrics": ["lens", "saturation", "exits"]})
    for got, want in zip(rec.heads["tuned_lens"], trained["record"]["heads"]["tuned_lens"]):
        assert got == pytest.approx(want, rel=1e-9), got["layer"]
    # same sizes, other weights: refused with a clear error; an explicit override still loads
    other = tiny_gpt2(dropout=0.0, seed=1)
    with pytest.raises(ExitHeadsMismatchError, match="different unembed"):
        load_exit_heads(saved, other)
    assert sorted(load_exit_heads(saved, other, check_fingerprint=False)) == sorted(ALL_KINDS)
    with pytest.raises(ExitHeadsMismatchError, match="vocab"):
        load_exit_heads(saved, tiny_gpt2(vocab=80, dropout=0.0))
    # an explicit save works too
    heads.save(tmp_path / "again")
    assert (tmp_path / "again" / "heads.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ resume


def _resume_loader():
    return DataLoader(TensorDataset(pattern_tokens(48, 24, 64, 0)), batch_size=8, shuffle=False)  # 6 steps/epoch


def _resume_heads():
    return ExitHeads(every_n_steps=1, kinds=ALL_KINDS, max_tokens=64,
                     optim={"lr": 1e-2, "schedule": "cosine", "warmup_steps": 2, "total_steps": 12, "min_lr_ratio": 0.1})


def _epoch_trainer(root, callbacks, epochs):
    # stop at epoch ends: Lightning resumes a plain DataLoader exactly only from an end-of-epoch checkpoint
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, default_root_dir=str(root),
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     deterministic=True, limit_val_batches=0)


def test_resume_gives_bit_identical_heads(tmp_path):
    L.seed_everything(1)
    full = _resume_heads()
    full_module = TinyLM(dropout=0.0)
    _epoch_trainer(tmp_path / "full", [full], 2).fit(full_module, _resume_loader())

    L.seed_everything(1)
    first = _resume_heads()
    t1 = _epoch_trainer(tmp_path / "part", [first], 1)
    t1.fit(TinyLM(dropout=0.0), _resume_loader())
    assert first.head_steps == 6
    ckpt = tmp_path / "part.ckpt"
    t1.save_checkpoint(ckpt)
    second = _resume_heads()
    resumed_module = TinyLM(dropout=0.0)
    _epoch_trainer(tmp_path / "part", [second], 2).fit(resumed_module, _resume_loader(), ckpt_path=str(ckpt))
    for key, value in full_module.state_dict().items():  # the model itself resumed exactly (Lightning's part)
        assert torch.equal(value, resumed_module.state_dict()[key]), key
    assert second.head_steps == full.head_steps == 12
    state_full, state_resumed = full.heads.state_dict(), second.heads.state_dict()
    assert state_full.keys() == state_resumed.keys()
    for key in state_full:
        assert torch.equal(state_full[key], state_resumed[key]), key
    assert second._scheduler.get_last_lr() == full._scheduler.get_last_lr()
    assert not torch.equal(state_full["tuned_lens.per_layer.1.weight"],
                           first.heads.state_dict()["tuned_lens.per_layer.1.weight"])  # steps 7..12 did something


def test_state_restores_before_and_after_the_heads_are_built():
    model = tiny_gpt2(dropout=0.0)
    source = ExitHeads(kinds=["tuned_lens", "mlp"], optim={"lr": 1e-2})
    source.build(model)
    with torch.no_grad():
        for p in source.heads.parameters():
            p.add_(0.01)
    source.head_steps = 7
    state = source.state_dict()

    before = ExitHeads(kinds=["tuned_lens", "mlp"], optim={"lr": 1e-2})
    before.load_state_dict(state)  # DDP/single device: restored before on_fit_start builds the heads
    assert before.heads is None and before.state_dict() == state  # a pending state survives a re-save
    before.build(model)
    after = ExitHeads(kinds=["tuned_lens", "mlp"], optim={"lr": 1e-2})
    after.build(model)
    after.load_state_dict(state)  # FSDP/DeepSpeed: restored after the heads exist
    for got in (before, after):
        assert got.head_steps == 7
        for key, value in source.heads.state_dict().items():
            assert torch.equal(got.heads.state_dict()[key], value), key
    wrong = ExitHeads(kinds=["tuned_lens"], optim={"lr": 1e-2})
    wrong.build(model)
    with pytest.raises(ValueError, match="kinds"):
        wrong.load_state_dict(state)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="kinds"):
        ExitHeads(kinds=["tuned_lens", "oracle"])
    with pytest.raises(ValueError, match="objective"):
        ExitHeads(objective="mse")
    with pytest.raises(ValueError, match="max_tokens"):
        ExitHeads(max_tokens=0)
    with pytest.raises(ValueError, match="schedule"):
        ExitHeads(optim={"schedule": "step"})
    with pytest.raises(ValueError, match="layers"):
        ExitHeads(layers=[4]).build(tiny_gpt2(dropout=0.0))
    with pytest.raises(ValueError, match="every_n_steps"):
        ExitHeads(every_n_steps=0)
    with pytest.raises(ValueError, match="stack_elements"):
        ExitHeads(stack_elements=0)
    allowed = "optimizer, lr, weight_decay, betas, schedule, warmup_steps, total_steps, min_lr_ratio, grad_clip"
    with pytest.raises(ValueError, match=re.escape(f"unknown optim key(s) ['learning_rate']; allowed: {allowed}")):
        ExitHeads(optim={"learning_rate": 1e-2})
    with pytest.raises(TypeError, match="optim must be a mapping of optimizer, lr"):
        ExitHeads(optim=1e-2)
    with pytest.raises(ValueError, match="optim.lr"):
        ExitHeads(optim={"lr": 0})


def test_optim_settings_group_the_heads_optimiser():
    from ee_callbacks.heads_optim import OptimSettings

    partial = ExitHeads(optim={"lr": 2e-2, "betas": [0.8, 0.9]}).optim  # the other keys keep their defaults
    assert partial == OptimSettings(lr=2e-2, betas=(0.8, 0.9)) and partial.optimizer == "adam"
    heads = ExitHeads(kinds=["tuned_lens"], optim=OptimSettings(optimizer="sgd", lr=0.5, weight_decay=0.1, grad_clip=2))
    heads.build(tiny_gpt2(dropout=0.0))
    opt = heads._optimizer
    assert isinstance(opt, torch.optim.SGD) and heads._scheduler is None and heads.optim.grad_clip == 2.0
    assert opt.defaults["lr"] == 0.5 and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    assert opt.defaults["weight_decay"] == 0.1


# ------------------------------------------------------------------------------------------------ cost knobs


def test_every_n_steps_trains_the_heads_on_those_steps_only(tmp_path):
    train, _ = loaders()
    heads = ExitHeads(kinds=["tuned_lens", "confidence"], optim={"lr": 1e-2}, every_n_steps=3, max_tokens=32,
                      log_every_n_steps=4)
    seen = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, heads.head_steps))

    logger = CSVLogger(str(tmp_path), name="csv")
    _trainer(tmp_path, [heads, Count()], max_steps=10, logger=logger).fit(TinyLM(dropout=0.0), train)
    # the heads step after the model's steps 0, 3, 6 and 9 (global_step is then 1, 4, 7, 10)
    assert seen == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2), (7, 3), (8, 3), (9, 3), (10, 4)]
    costs = heads.cost_summary()
    assert costs["capture"]["calls"] == 4 and costs["heads_train"]["calls"] == 8  # 4 × (accumulate + step)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        logged = [int(r["step"]) for r in csv.DictReader(fh) if r.get("ee/heads_train/tuned_lens/loss")]
    assert logged == [4, 10]  # the first head step at or past each multiple of log_every_n_steps (4, 8)


@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_stacked_layers_give_the_per_layer_losses_and_gradients(objective):
    """One stacked unembedding matmul per group of layers = Σ over layers of each layer's own loss (the formula
    a single head computes), gradients included; the confidence targets are the logit lens' agreement."""
    torch.manual_seed(0)
    model = tiny_llama(vocab=64, layers=4, hidden=32)
    ids = pattern_tokens(4, 12, 64, 1)
    parts = find_model_parts(model)
    with torch.no_grad(), HiddenStateCapture(parts) as cap:
        logits = model(input_ids=ids).logits
    rows = ids.numel()
    captures = {layer: cap.states[layer].reshape(rows, -1) for layer in range(1, 4)}
    final = logits.reshape(rows, -1)
    labels = torch.roll(ids, -1, 1).reshape(-1)

    def run(stack_elements):
        heads = ExitHeads(kinds=["tuned_lens", "mlp", "confidence"], objective=objective, stack_elements=stack_elements)
        heads.build(model)
        with torch.no_grad():  # move the zero-initialised translators off the logit lens
            for kind in ("tuned_lens", "mlp"):
                for p in heads.heads[kind].parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        heads._batch_info = (ids, torch.roll(ids, -1, 1), torch.ones_like(ids, dtype=torch.bool))
        heads._selection = torch.arange(rows)
        heads._accumulate(captures, final, heads._selection)
        grads = {n: p.grad.clone() for n, p in heads.heads.named_parameters()}
        return heads, grads

    stacked, grads = run(2**30)
    assert stacked._layer_groups([1, 2, 3], rows) == [[1, 2, 3]]
    one_by_one, grads_single = run(rows * 64)  # one layer per group
    assert one_by_one._layer_groups([1, 2, 3], rows) == [[1], [2], [3]]
    # the reference: each layer's loss through the head's own single-layer formula, backward, summed
    ref = stacked.heads
    for p in ref.parameters():
        p.grad = None
    targets = HeadTargets(final_logp=torch.log_softmax(final.float(), -1), labels=labels,
                          lens_agree={l: parts.readout(captures[l]).argmax(-1) == final.argmax(-1) for l in (1, 2, 3)})
    for kind in ("tuned_lens", "mlp", "confidence"):
        total = 0.0
        for layer in (1, 2, 3):
            loss = ref[kind].loss(captures[layer].float(), layer, targets)
            loss.backward()
            total += float(loss)
        assert float(stacked._loss_sums[kind]) == pytest.approx(total / 3, rel=1e-5), kind
        assert float(one_by_one._loss_sums[kind]) == pytest.approx(total / 3, rel=1e-5), kind
    for name, p in ref.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(grads_single[name], p.grad, rtol=1e-4, atol=1e-6), name
