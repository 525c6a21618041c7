"""Small real models and Lightning modules shared by the probe tests."""

import pytest
import torch
import transformers
import lightning as L
from torch.utils.data import DataLoader, TensorDataset


def tiny_llama(vocab=64, layers=4, hidden=32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=dropout, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(vocab=64, layers=4, hidden=32, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


class TinyLM(L.LightningModule):
    """A causal LM trained on random-but-structured token data; the model is built in configure_model()."""

    def __init__(self, kind="gpt2", vocab=64, layers=4, hidden=32, dropout=0.1, lr=3e-3, seed=0):
        super().__init__()
        self.save_hyperparameters()
        self.model = None

    def configure_model(self):
        if self.model is not None:
            return
        hp = self.hparams
        build = tiny_gpt2 if hp.kind == "gpt2" else tiny_llama
        self.model = build(vocab=hp.vocab, layers=hp.layers, hidden=hp.hidden, dropout=hp.dropout, seed=hp.seed)

    def training_step(self, batch, batch_idx):
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch["input_ids"]
        self.log("val/loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def pattern_tokens(n=64, T=24, vocab=64, seed=0):
    """Sequences with learnable structure: counting runs mod vocab from a random start, some noise."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(T)[None, :]) % vocab
    noise = torch.rand(n, T, generator=g) < 0.1
    ids[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return ids


def loaders(n=64, T=24, vocab=64, batch=8):
    train = DataLoader(TensorDataset(pattern_tokens(n, T, vocab, 0)), batch_size=batch, shuffle=True)
    val = DataLoader(TensorDataset(pattern_tokens(16, T, vocab, 1)), batch_size=batch)
    return train, val


class SlowSteps(L.Callback):
    """Sleep after each training step (lets a test kill a run at a chosen point); no other effect."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        time.sleep(self.seconds)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: tiny models run several times faster than on two shared cores.
    Use as ``pytestmark = pytest.mark.usefixtures("one_thread")`` after importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
