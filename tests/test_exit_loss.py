"""EarlyExitLoss (LayerSkip early-exit loss, curricula) and LayerDropout on real tiny models."""

import lightning as L
import pytest
import torch

from ee_callbacks import EarlyExitLoss, find_model_parts
from ee_callbacks.capture import HiddenStateCapture
from ee_callbacks.exit_loss import EarlyExitAwareLM, LayerDropout, next_token_ce
from tests.helpers import TinyLM, loaders, one_thread, pattern_tokens, tiny_gpt2, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _forward_with_states(model, ids):
    parts = find_model_parts(model)
    with HiddenStateCapture(parts, detach=False) as cap:
        out = model(input_ids=ids, labels=ids)
    return parts, cap.states, out


def test_zero_weights_give_exactly_the_plain_lm_loss():
    model = tiny_gpt2(dropout=0.0)
    ids = pattern_tokens(4, 16, 64, 2)
    parts, states, out = _forward_with_states(model, ids)
    loss_fn = EarlyExitLoss(model, weights=[0.0, 0.0, 0.0])
    got = loss_fn(states, ids, step=5, logits=out.logits)
    assert torch.equal(got.loss, next_token_ce(out.logits, ids))
    assert got.layer_losses == {} and got.coefficients == {4: 1.0}
    # Hugging Face's own shifted loss agrees up to rounding
    assert float(got.loss.detach()) == pytest.approx(float(out.loss.detach()), rel=1e-6)
    # passing the model's own loss instead of its logits: that loss comes back unchanged
    assert torch.equal(EarlyExitLoss(model, weights=[0, 0, 0])(states, ids, 0, final_loss=out.loss).loss, out.loss)


def test_layerskip_weights_combine_the_layer_losses_as_hand_computed():
    model = tiny_llama()
    ids = pattern_tokens(4, 16, 64, 2)
    parts, states, out = _forward_with_states(model, ids)
    loss_fn = EarlyExitLoss(model, weights="layerskip")
    # ẽ(ℓ) = ℓ(ℓ−1)/2 for ℓ = 1, 2, 3 → 0, 1, 3 ; ẽ(4) = 4·3/2 = 6 ; normalised by 1 + 3 + 6 = 10
    assert loss_fn.coefficients(0) == {2: 0.1, 3: 0.3, 4: 0.6}
    got = loss_fn(states, ids, step=0, logits=out.logits)
    ce = {l: next_token_ce(parts.readout(states[l]), ids) for l in (2, 3)}
    want = 0.1 * ce[2] + 0.3 * ce[3] + 0.6 * next_token_ce(out.logits, ids)
    assert float(got.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert float(got.layer_losses[3].detach()) == pytest.approx(float(ce[3].detach()), rel=1e-6)
    # on purpose, the early-exit loss trains the shared head and the lower blocks through the early readouts
    got.loss.backward()
    assert float(model.lm_head.weight.grad.abs().sum()) > 0
    unnormalised = EarlyExitLoss(model, weights="linear", scale=0.5, normalize=False)
    assert unnormalised.coefficients(0) == {1: 0.5, 2: 1.0, 3: 1.5, 4: 4.0}


def test_rotational_and_gradual_curricula_activate_the_hand_computed_layers():
    model = tiny_llama(layers=8, hidden=16)
    rot = EarlyExitLoss(model, weights="uniform", curriculum="rotational", rotation_period=3)
    # (ℓ − 1) mod 3 = t mod 3
    assert rot.active_layers(0) == [1, 4, 7]
    assert rot.active_layers(1) == [2, 5]
    assert rot.active_layers(2) == [3, 6]
    assert rot.active_layers(4) == [2, 5]
    assert rot.coefficients(1) == {2: 1 / 3, 5: 1 / 3, 8: 1 / 3}
    one = EarlyExitLoss(model, curriculum="rotational")  # R = L − 1 = 7: one early layer per step
    assert [one.active_layers(t) for t in (0, 6, 7, 9)] == [[1], [7], [1], [3]]
    grad = EarlyExitLoss(model, curriculum="gradual", total_steps=80)
    # ℓ is on once 8·t ≥ 80·(8 − ℓ), i.e. t ≥ 10·(8 − ℓ)
    assert grad.active_layers(0) == []
    assert grad.active_layers(9) == []
    assert grad.active_layers(10) == [7]
    assert grad.active_layers(35) == [5, 6, 7]
    assert grad.active_layers(70) == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="total_steps"):
        EarlyExitLoss(model, curriculum="gradual")
    with pytest.raises(ValueError, match="curriculum"):
        EarlyExitLoss(model, curriculum="random")
    with pytest.raises(ValueError, match="one weight per early block"):
        EarlyExitLoss(model, weights=[1.0, 2.0])


def test_layer_dropout_grows_with_depth_and_is_off_in_eval():
    model = tiny_llama(layers=4)
    ids = pattern_tokens(400, 6, 64, 4)
    drop = LayerDropout(model, p_max=0.8)
    rates = drop.rates()
    want = [0.0, 0.8 * (2 ** (1 / 3) - 1), 0.8 * (2 ** (2 / 3) - 1), 0.8]
    assert rates == pytest.approx(want, abs=1e-12)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    parts = find_model_parts(model)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with drop:
            assert torch.equal(model(input_ids=ids).logits, reference)  # eval mode: no block is skipped
    model.train()
    with torch.no_grad(), drop, HiddenStateCapture(parts) as cap:
        drop.set_step(3)
        model(input_ids=ids)
    # share of sequences whose block-ℓ output equals its input (skipped)
    skipped = [float((cap.states[l] == cap.states[l - 1]).all(dim=-1).all(dim=-1).double().mean())
               for l in (1, 2, 3, 4)]
    assert skipped[0] == 0.0
    for got, p in zip(skipped[1:], rates[1:]):
        assert abs(got - p) < 0.08, (skipped, rates)  # 400 sequences: 3 standard errors ≈ 0.075
    assert skipped[1] < skipped[2] < skipped[3]
    # the masks are keyed by step: the same step repeats them, another step draws new ones
    with torch.no_grad(), drop:
        drop.set_step(3)
        again = model(input_ids=ids).logits
        drop.set_step(4)
        other = model(input_ids=ids).logits
    with torch.no_grad(), drop:
        drop.set_step(3)
        assert torch.equal(model(input_ids=ids).logits, again)
    assert not torch.equal(again, other)
    assert all(len(b._forward_hooks) == 0 for b in parts.blocks)  # detached on exit


class EarlyExitTinyLM(EarlyExitAwareLM, TinyLM):
    def __init__(self, ee_kwargs, **kw):
        super().__init__(**kw)
        self.ee_kwargs = ee_kwargs

    def configure_model(self):
        if self.model is None:
            super().configure_model()
            if self.ee_kwargs is not None:
                self.configure_early_exit(**self.ee_kwargs)

    def training_step(self, batch, batch_idx):
        out = self.early_exit_step(batch[0])
        return out.loss


class PlainNextTokenLM(TinyLM):
    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return next_token_ce(self.model(input_ids=ids).logits, ids)


def _fit(module, steps=6):
    L.seed_everything(11, workers=True)
    train, _ = loaders()
    rec = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec.append(outputs["loss"].detach().clone())

    L.Trainer(max_steps=steps, callbacks=[Rec()], logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, deterministic=True, limit_val_batches=0).fit(module, train)
    return torch.stack(rec)


def test_early_exit_aware_module_trains_plain_with_zero_weights_and_differently_otherwise():
    plain = _fit(PlainNextTokenLM(kind="llama", dropout=0.0))
    zero = _fit(EarlyExitTinyLM({"weights": [0.0, 0.0, 0.0]}, kind="llama", dropout=0.0))
    assert torch.equal(plain, zero)
    aware = _fit(EarlyExitTinyLM({"weights": "layerskip", "scale": 1.0, "curriculum": "rotational",
                                  "layer_dropout": 0.2}, kind="llama", dropout=0.0))
    assert torch.isfinite(aware).all()
    assert not torch.equal(aware, plain)  # it changes training, on purpose


def test_moe_router_aux_loss_is_kept_under_the_early_exit_loss():
    """Under early_exit=layerskip a Mixture-of-Experts model still trains its router's load-balancing loss:
    loss = early-exit loss + router_aux_loss_coef · aux_loss, aux_loss as the model itself returns it."""
    import transformers

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=True, router_aux_loss_coef=0.5))

    class Holder(EarlyExitAwareLM):
        pass

    holder = Holder()
    holder.model = model
    holder.configure_early_exit(weights="layerskip", curriculum="none")
    ids = pattern_tokens(4, 16, 64, 2)
    out = holder.early_exit_step(ids, step=0)
    _, states, reference = _forward_with_states(model, ids)   # an independent forward of the same batch
    without_aux = holder.early_exit_loss(states, ids, 0, logits=reference.logits).loss
    assert out.aux_loss is not None and float(reference.aux_loss) > 0
    assert float(out.aux_loss) == pytest.approx(float(reference.aux_loss), rel=1e-6)
    assert float(out.loss) == pytest.approx(float(without_aux) + 0.5 * float(reference.aux_loss), rel=1e-6)
    # a dense model has no aux loss and its loss is unchanged
    dense = Holder()
    dense.model = tiny_llama()
    dense.configure_early_exit(weights="layerskip", curriculum="none")
    plain = dense.early_exit_step(ids, step=0)
    assert plain.aux_loss is None
    _, states, ref = _forward_with_states(dense.model, ids)
    assert float(plain.loss) == pytest.approx(float(dense.early_exit_loss(states, ids, 0, logits=ref.logits).loss))
