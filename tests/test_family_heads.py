"""ExitHeads and EarlyExitProbe on many architectures (tests/family_reference.py), in real Lightning runs of a
stranger's LightningModule (model in ``self.net``, dict batches with padding and −100 labels, its own loss).

Per family: training is bit-identical with and without heads and probe; the heads learn (at the end their KL to the
final distribution is below 0.9 × that of the head as built — the logit lens for tuned lens and mlp, the initial
copies for linear — and the confidence classifiers' mean BCE is below ln 2 on layers whose target has a clear base
rate);
the heads of the default kinds and of linear and mlp are separate ExitHeads instances (own learning rates; the probe
evaluates all providers' heads); and the probe's evaluation of the saved heads (record ``heads`` rows, ``head_<kind>`` curves and summaries)
equals a float64 hand computation: ``h_ℓ`` from ``output_hidden_states`` (tests/family_reference.py), each head
applied as docs/exit_heads.md defines it, from ``config.json`` + ``heads.safetensors`` alone.
"""

import copy
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from ee_callbacks import EarlyExitProbe, ExitHeads, read_records, run_probe
from ee_callbacks.readouts import load_exit_heads
from tests import probe_reference as ref
from tests.family_reference import FAMILIES, V, build, reference_states
from tests.helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULT = ["tuned_lens", "confidence"]
# family -> head kinds: the defaults everywhere, linear and mlp spread over the families, all four on nanoGPT
CASES = {
    "gpt2": DEFAULT + ["linear"],
    "gpt_neox": DEFAULT + ["mlp"],
    "opt": DEFAULT + ["linear", "mlp"],
    "gemma2": DEFAULT + ["linear"],
    "mixtral": DEFAULT + ["linear"],
    "mamba2": DEFAULT + ["linear"],
    "falcon": DEFAULT + ["mlp"],
    "bloom": DEFAULT,
    "nanogpt": ["tuned_lens", "linear", "mlp", "confidence"],
}
STEPS, T = 24, 16
# learning rates: the model's (AdamW; the builders scale tied models' final norms ×~120, so larger rates move the
# heads' target faster than 24 steps can follow); the heads' per group: default kinds, linear (times the
# unembedding's std: Adam's step is absolute and a tied unembedding here is ~0.002), mlp
MODEL_LR, LRS = 1e-4, (1e-2, 1e-1, 1e-3)
LEARNED = 0.9  # a trained head's KL to the final distribution, at most this share of the fresh head's


# ---------------------------------------------------------------------------------------------------------------------
# a stranger's module and data


class Sequences(Dataset):
    """Counting runs mod V (learnable), dict items; every 4th sequence right-padded, its padding labelled −100."""

    def __init__(self, n, seed, left_padding=False):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(3, V, (n, 1), generator=g)
        self.ids = 3 + (start - 3 + torch.arange(T)[None, :]) % (V - 3)
        self.mask = torch.ones_like(self.ids)
        self.mask[::4, -3:] = 0
        if left_padding:
            self.mask[1::4, :2] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)
        self.labels[2::4, 5] = -100

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class StrangerLM(L.LightningModule):
    def __init__(self, name, lr=None):
        super().__init__()
        self.name, self.lr = name, lr or MODEL_LR
        self.net = build(name)
        if hasattr(self.net, "config") and hasattr(self.net.config, "output_router_logits"):
            self.net.config.output_router_logits = True  # MoE: the router's load-balancing loss joins the loss

    def training_step(self, batch, batch_idx):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.name == "nanogpt":
            logits, aux = self.net(ids, targets=torch.zeros_like(ids))[0], None
        else:
            out = self.net(input_ids=ids, attention_mask=mask, use_cache=False)
            logits, aux = out.logits, getattr(out, "aux_loss", None)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if aux is not None:
            loss = loss + self.net.config.router_aux_loss_coef * aux
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class Recorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _probe_batch(name):
    data = Sequences(6, seed=99, left_padding=FAMILIES[name].left_padding)
    return {"input_ids": data.ids, "attention_mask": data.mask, "labels": data.labels}


def _fit(name, root, kinds=None, steps=STEPS, ckpt=None, epochs=None, save=True, heads_kw=None, **trainer_kw):
    """Fit the stranger's module; with ``kinds`` also ExitHeads (saved to root/heads) and a probe at start and end."""
    L.seed_everything(7)
    module, recorder = StrangerLM(name), Recorder()
    callbacks, heads = [recorder], None
    if kinds is not None:
        probe = EarlyExitProbe(every_n_steps=10**6, probe_data=_probe_batch(name), print_table=False,
                               output_path=root / "ee_probes.jsonl")
        heads = [ExitHeads(kinds=group, every_n_steps=1, max_tokens=64,
                           optim={"lr": lr * (float(module.net.lm_head.weight.std()) if group == ["linear"] else 1)},
                           save_dir=root / f"heads{i}" if save else None, **(heads_kw or {}))
                 for i, (group, lr) in enumerate(kinds)]
        callbacks += [probe, *heads]
    stop = dict(max_epochs=epochs) if epochs else dict(max_steps=steps)
    logger = trainer_kw.pop("logger", False)
    trainer = L.Trainer(**stop, callbacks=callbacks, logger=logger, default_root_dir=str(root),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        deterministic=True, limit_val_batches=0, **trainer_kw)
    loader = DataLoader(Sequences(64, seed=0), batch_size=8, shuffle=epochs is None)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return module, recorder, heads, trainer


# ---------------------------------------------------------------------------------------------------------------------
# the hand computation


def _saved_heads(directory):
    config = json.loads((directory / "config.json").read_text())
    return config, {k: v.double() for k, v in load_file(str(directory / "heads.safetensors")).items()}


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _layer_norm(x, weight=None, bias=None, eps=1e-5):
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return x if weight is None else x * weight + bias


def _head_readout(name, model64, config, tensors, kind, layer, h):
    """docs/exit_heads.md's readout of one head on raw h (…, d), float64: logits, or the confidence."""
    family, p = FAMILIES[name], f"{kind}.per_layer.{layer}."
    if kind == "tuned_lens":  # T(U(N(h + A h + b)))
        return family.head(model64, family.final(model64, h + h @ tensors[p + "weight"].T + tensors[p + "bias"]))
    if kind == "mlp":  # T(U(N(h + W2 gelu(W1 LN(h) + c1) + c2)))
        x = _layer_norm(h, tensors[p + "0.weight"], tensors[p + "0.bias"])
        x = _gelu(x @ tensors[p + "1.weight"].T + tensors[p + "1.bias"]) @ tensors[p + "3.weight"].T
        return family.head(model64, family.final(model64, h + x + tensors[p + "3.bias"]))
    if kind == "confidence":  # σ(w · LN0(h) + c)
        return torch.sigmoid(_layer_norm(h) @ tensors[p + "weight"][0] + tensors[p + "bias"][0])
    # linear: T(U_ℓ(N_ℓ(h))): the model's own final path and head carrying the head's saved N_ℓ and U_ℓ
    own = copy.deepcopy(model64)
    paths = config["model"]["final_norm"].split(",") if config["model"]["final_norm"] else []
    with torch.no_grad():
        for i, path in enumerate(paths):
            prefix = f"{p}norm.{i}." if len(paths) > 1 else f"{p}norm."
            for key, param in own.get_submodule(path).named_parameters():
                param.copy_(tensors[prefix + key])
        head = own.get_submodule(config["model"]["unembed"])
        head.weight.copy_(tensors[p + "unembed.weight"])
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(tensors[p + "unembed.bias"])
    return family.head(own, family.final(own, h))


def hand_record(name, model, heads_dir, batch, initial=None):
    """Per kind the float64 reference of the probe's head figures on ``batch``: rows, exit curve, oracle skip, EAS."""
    config, tensors = _saved_heads(heads_dir)
    model64 = copy.deepcopy(model).double().eval()
    if hasattr(model64, "config"):
        model64.config._experts_implementation = "eager"
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        states, final = reference_states(name, model64, ids, mask)
        Ln = len(states) - 1
        lens = [FAMILIES[name].head(model64, FAMILIES[name].final(model64, h)) for h in states[:-1]] + [final]
        readouts = {kind: {layer: _head_readout(name, model64, config, tensors, kind, layer, states[layer])
                           for layer in spec["layers"]} for kind, spec in config["kinds"].items()}
        if initial is not None:  # a fresh linear head: the initial model's N and U (its copies) on today's h
            initial64 = copy.deepcopy(initial).double().eval()
            fresh = [FAMILIES[name].head(initial64, FAMILIES[name].final(initial64, h)) for h in states[:-1]]
    keep = [(b, t) for b in range(ids.shape[0]) for t in range(ids.shape[1] - 1)
            if mask[b, t] and mask[b, t + 1] and labels[b, t + 1] != -100]
    token_labels = [int(labels[b, t + 1]) for b, t in keep]
    lens_table = ref.TokenTable.from_arrays([[0]] * len(keep), [[z[b, t].numpy() for z in lens] for b, t in keep],
                                            token_labels)
    layers = list(range(1, Ln + 1))
    out = {}
    for kind, spec in config["kinds"].items():
        head_layers = spec["layers"]
        if kind == "confidence":
            rows, exits_scores = [], {}
            for layer in head_layers:
                conf = np.array([float(readouts[kind][layer][b, t]) for b, t in keep])
                agree = np.array([lens_table.top1(i, layer) == lens_table.top1(i, Ln) for i in range(len(keep))])
                rows.append({"layer": layer, "mean_conf": conf.mean(), "lens_agree": agree.mean(),
                             "mean_conf_when_agree": conf[agree].mean() if agree.any() else None,
                             "bce": float(np.mean(-np.log(np.where(agree, conf, 1 - conf))))})
                exits_scores[layer] = conf
            out[kind] = {"rows": rows, "table": lens_table, "scores": exits_scores}
            continue
        table = ref.TokenTable.from_arrays(
            [[0]] * len(keep),
            [[(readouts[kind][layer] if layer in head_layers else lens[layer])[b, t].numpy() for layer in range(Ln + 1)]
             for b, t in keep], token_labels)
        rows = [{"layer": layer, **{m: table.lens(m, layer) for m in ("agree", "acc", "ce", "kl", "max_prob",
                                                                       "logit_corr")}} for layer in head_layers]
        scores = {layer: np.array([table.token_metric("max_prob", table.logits[i][layer], i) for i in range(table.n)])
                  for layer in head_layers}
        top1 = {layer: [table.top1(i, layer) for i in range(table.n)] for layer in layers}
        strict = ref.strict_saturation(top1, layers)
        similarity = {layer: table.lens("logit_corr", layer) for layer in layers}
        out[kind] = {"rows": rows, "table": table, "scores": scores, "oracle_skip_strict": 1 - np.mean(strict) / Ln,
                     "eas": ref.eas(similarity, Ln, 0.5)}
        if initial is not None:  # the KL of the head as it was built, on the final model's states
            base = fresh if kind == "linear" else lens
            base_table = ref.TokenTable.from_arrays([[0]] * len(keep), [[base[layer][b, t].numpy() for layer in range(Ln)]
                                                                        + [final[b, t].numpy()] for b, t in keep],
                                                    token_labels)
            out[kind]["fresh_kl"] = {layer: base_table.lens("kl", layer) for layer in head_layers}
    return out


def _hand_curve(hand, thresholds):
    """The head's exit curve: exit at the first head layer whose confidence (max-prob or classifier) is ≥ λ, else L."""
    table, scores = hand["table"], hand["scores"]
    points = []
    for lam in thresholds:
        exits = ref.threshold_exits(table, lambda i, layer: scores[layer][i] if layer in scores else
                                    (1.0 if layer == table.L else -1.0), lambda s: s >= lam, 1)
        points.append(ref.exit_point(exits, [table.top1(i, e) for i, e in enumerate(exits)], table))
    return points


def compare(record, hand):
    """The largest deviation of the record's head figures from the hand computation, per kind (relative for
    ce/kl, absolute otherwise; agree/acc as token counts)."""
    worst = {}
    n = record["probe"]["tokens"]
    for kind, want in hand.items():
        got_rows = record["heads"][kind]
        assert [r["layer"] for r in got_rows] == [r["layer"] for r in want["rows"]], kind
        err = 0.0
        for got, exp in zip(got_rows, want["rows"]):
            for key, value in exp.items():
                if key in ("layer", "bce") or value is None:
                    continue
                if key in ("agree", "acc", "lens_agree"):
                    assert round(got[key] * n) == round(value * n), (kind, exp["layer"], key, got[key], value)
                elif key in ("ce", "kl"):
                    err = max(err, abs(got[key] - value) / max(abs(value), 1e-2))
                else:
                    err = max(err, abs(got[key] - value))
        curve = record["curves"][f"head_{kind}"]
        for point, exp in zip(curve, _hand_curve(want, [p["threshold"] for p in curve])):
            err = max(err, *(abs(g - w) for g, w in zip((point["skip"], point["consistency"], point["acc"]), exp)))
        if "oracle_skip_strict" in want:
            err = max(err, abs(record["summary"][f"head_{kind}_oracle_skip_strict"] - want["oracle_skip_strict"]),
                      abs(record["summary"][f"head_{kind}_eas"] - want["eas"]))
        worst[kind] = err
    return worst


def _records(root):
    return read_records(root / "ee_probes.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# the tests


def _groups(kinds):
    """ExitHeads instances: the default kinds, then linear and mlp each in its own (own learning rate)."""
    groups = [([k for k in kinds if k in DEFAULT], LRS[0])]
    groups += [([k], LRS[1 + ["linear", "mlp"].index(k)]) for k in kinds if k not in DEFAULT]
    return groups


def check_run(name, root, kinds, tolerance=1e-4, heads_kw=None, **trainer_kw):
    """Fit without and with heads (and probe); check identity, the hand computation and learning; return the figures
    of the report: the largest deviation per kind, the KL ratios per kind and layer, the confidence BCEs."""
    logger = trainer_kw.pop("logger", False)  # the run with heads only
    plain, plain_rec, _, _ = _fit(name, root / "plain", **trainer_kw)
    module, rec, heads, _ = _fit(name, root / "heads", kinds=_groups(kinds), heads_kw=heads_kw, logger=logger,
                                 **trainer_kw)
    # training is unchanged
    assert len(rec.losses) == len(plain_rec.losses) and torch.equal(torch.stack(plain_rec.losses),
                                                                    torch.stack(rec.losses)), name
    for key, value in plain.state_dict().items():
        assert torch.equal(value, module.state_dict()[key]), (name, key)
    assert all(h.head_steps == STEPS for h in heads)  # once per optimizer step
    start, end = _records(root / "heads")
    assert (start["step"], end["step"]) == (0, STEPS)
    # the probe's figures equal the hand computation on the saved heads
    hand = {}
    for i in range(len(heads)):
        hand.update(hand_record(name, module.net, root / "heads" / f"heads{i}", _probe_batch(name), build(name)))
    worst = compare(end, hand)
    # the saved heads loaded back onto the trained model (fingerprint checked) give run_probe the callback's figures
    loaded = {}
    for i in range(len(heads)):
        loaded.update(load_exit_heads(root / "heads" / f"heads{i}", module.net))
    again = run_probe(module.net.eval(), [_probe_batch(name)], readouts=loaded).to_dict()
    for kind, rows in end["heads"].items():
        for got, want in zip(again["heads"][kind], rows, strict=True):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (name, kind)
    # the heads learn: at step 0 a tuned lens / mlp is the logit lens; at the end every head's KL (on the final
    # model) is below LEARNED × that of the head as built (tuned lens, mlp: the logit lens; linear: its initial copies)
    lens_start = {row["layer"]: row["kl"] for row in start["layers"]}
    ratios = {kind: [round(last["kl"] / hand[kind]["fresh_kl"][last["layer"]], 3) for last in end["heads"][kind]]
              for kind in kinds if kind != "confidence"}
    bce = [round(row["bce"], 3) for row in hand["confidence"]["rows"]]
    print(f"\n{root.name} {name}: largest deviation from the float64 hand computation {worst}; "
          f"head KL / fresh head KL {ratios}; BCE {bce}")
    for kind in ratios:
        for first in start["heads"][kind]:
            assert first["kl"] == pytest.approx(lens_start[first["layer"]], rel=tolerance, abs=1e-6), (name, kind)
    for kind, err in worst.items():
        assert err <= tolerance, (name, kind, err)
    for kind, values in ratios.items():
        assert max(values) < LEARNED, (name, kind, values)
    # the classifiers beat their zero init (BCE ln 2) on the layers whose target has a clear base rate (a lens agreement
    # near ½ on a tiny random model leaves nothing to learn in 24 steps)
    clear = [row["bce"] for row in hand["confidence"]["rows"] if abs(row["lens_agree"] - 0.5) >= 0.1]
    assert clear and np.mean(clear) < math.log(2), (name, hand["confidence"]["rows"])
    return end, hand


@pytest.mark.parametrize("name", sorted(CASES))
def test_heads_on_a_family(name, tmp_path):
    check_run(name, tmp_path, CASES[name])


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(CASES)))
def test_head_figures_on_the_other_families(name, tmp_path):
    """The remaining families of tests/family_reference.py (Cohere's and Granite's logit scales, Gemma-3, Phi, Qwen,
    Mistral, OLMoE, Mamba, OPT without projection and post-LN), all four kinds: the probe's head figures equal the
    hand computation. (Identity and learning are the parametrised test's; at one learning rate for all, a tuned lens
    at lr 1e-2 overshoots on Granite, whose logits /4 leave KLs of 0.01 nats.)"""
    kinds = ["tuned_lens", "confidence", "linear", "mlp"]
    module, _, heads, _ = _fit(name, tmp_path, kinds=_groups(kinds))
    hand = {}
    for i in range(len(heads)):
        hand.update(hand_record(name, module.net, tmp_path / f"heads{i}", _probe_batch(name)))
    worst = compare(_records(tmp_path)[-1], hand)
    print(f"\n{name}: largest deviation from the float64 hand computation {worst}")
    assert sorted(worst) == sorted(kinds) and max(worst.values()) <= 1e-4, (name, worst)


@pytest.fixture
def deeper_neox(monkeypatch):
    """GPT-NeoX with 5 blocks, so that a stride of 2 heads blocks 2 and 4."""
    family = FAMILIES["gpt_neox"]
    import dataclasses

    from tests.family_reference import _DECODER, _hf

    monkeypatch.setitem(FAMILIES, "gpt_neox5", dataclasses.replace(family, build=_hf(
        "GPTNeoXForCausalLM", "GPTNeoXConfig", **{**_DECODER, "num_hidden_layers": 5}, tie_word_embeddings=False)))
    return "gpt_neox5"


def test_heads_on_every_second_block(deeper_neox, tmp_path):
    end, _ = check_run(deeper_neox, tmp_path, ["tuned_lens", "confidence", "mlp"], heads_kw={"layers": 2})
    assert {kind: [row["layer"] for row in rows] for kind, rows in end["heads"].items()} == \
        {"tuned_lens": [2, 4], "confidence": [2, 4], "mlp": [2, 4]}


def test_heads_with_gradient_accumulation(tmp_path):
    """Under accumulation the heads step once per optimizer step; the keys a CSV logger receives are the record's."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path / "csv"), name="run")
    end, hand = check_run("opt", tmp_path, ["tuned_lens", "confidence", "linear"], accumulate_grad_batches=2,
                          logger=logger)
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    logged = {key: float(row[key]) for row in rows if row["step"] == str(STEPS) for key in row if row[key] != ""}
    expected = {f"ee/heads/{kind}/{metric}/layer_{row['layer']:02d}": row[metric]
                for kind, rows_ in end["heads"].items() for row in rows_
                for metric in (("mean_conf", "lens_agree") if kind == "confidence" else ("ce", "agree", "acc", "kl"))}
    expected.update({f"ee/summary/head_{kind}_{name}": end["summary"][f"head_{kind}_{name}"]
                     for kind in ("tuned_lens", "linear") for name in ("oracle_skip_strict", "eas")})
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_heads_under_bf16_mixed(tmp_path):
    check_run("gpt_neox", tmp_path, ["tuned_lens", "confidence", "mlp"], precision="bf16-mixed")


def test_resumed_heads_equal_the_uninterrupted_run(tmp_path):
    """Mamba2 (no embedding entry in its hidden states), tuned lens + confidence and a linear head: one epoch,
    checkpoint, resume for two more (end-of-epoch: Lightning replays a plain DataLoader exactly only from there)
    gives the heads, their optimizer states and the probe's head figures of three uninterrupted epochs."""
    groups = _groups(["tuned_lens", "confidence", "linear"])
    full_module, _, full, _ = _fit("mamba2", tmp_path / "full", kinds=groups, epochs=3)
    _, _, first, trainer = _fit("mamba2", tmp_path / "part", kinds=groups, epochs=1)
    assert [h.head_steps for h in first] == [8, 8]
    trainer.save_checkpoint(tmp_path / "part.ckpt")
    module, _, resumed, _ = _fit("mamba2", tmp_path / "part", kinds=groups, epochs=3, ckpt=str(tmp_path / "part.ckpt"))
    for key, value in full_module.state_dict().items():
        assert torch.equal(value, module.state_dict()[key]), key
    for a, b in zip(full, resumed):
        assert a.head_steps == b.head_steps == 24
        for key, value in a.heads.state_dict().items():
            assert torch.equal(value, b.heads.state_dict()[key]), key
        opt_a, opt_b = a._optimizer.state_dict()["state"], b._optimizer.state_dict()["state"]
        assert opt_a.keys() == opt_b.keys() and opt_a
        for index in opt_a:
            for key, value in opt_a[index].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[index][key])), (index, key)
    want, got = _records(tmp_path / "full")[-1], _records(tmp_path / "part")[-1]
    assert got["step"] == want["step"] == 24
    assert got["heads"] == want["heads"] and got["curves"] == want["curves"]
    assert not torch.equal(first[0].heads.state_dict()["tuned_lens.per_layer.1.weight"],
                           full[0].heads.state_dict()["tuned_lens.per_layer.1.weight"])  # epochs 2-3 did something


def test_heads_built_by_hand_without_parts_read_the_blocks_width(one_thread):
    """``ExitHeads().build(model)`` with no parts proves them as fit start does: OPT's blocks are 32 wide, its
    unembedding reads 16 after ``project_out``; heads built on the unproven guess were 16 wide and failed on h_ℓ."""
    model = build("opt").eval()
    heads = ExitHeads(kinds=["tuned_lens", "linear", "mlp", "confidence"], layers=[1, 2]).build(model)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert hidden.shape[-1] == model.config.hidden_size == 2 * model.config.word_embed_proj_dim
    flat = hidden.reshape(-1, hidden.shape[-1])
    with torch.no_grad():
        for kind, head in heads.items():
            out = head.confidence(flat, 1) if kind == "confidence" else head.logits(flat, 1)
            assert out.shape[0] == flat.shape[0] and torch.isfinite(out).all(), kind
            if kind != "confidence":
                assert out.shape[-1] == model.config.vocab_size
    with pytest.raises(Exception, match="no_such"):  # a user's hint that names nothing is an error, not dropped
        ExitHeads(final_norm="no_such.module").build(build("opt"))
