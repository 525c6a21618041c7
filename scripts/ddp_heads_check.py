"""Exit heads under DDP: after training, every rank holds bit-identical heads (their gradients are all-reduced).

    python scripts/ddp_heads_check.py OUT_DIR [--devices 2]

Run as a script (Lightning re-launches this command for rank 1). Each rank writes OUT_DIR/heads_rank<r>.pt with its
heads' state; the test compares them.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from ee_callbacks import ExitHeads  # noqa: E402
from tests.helpers import TinyLM, loaders  # noqa: E402


class SaveHeads(L.Callback):
    def __init__(self, heads, out):
        self.heads, self.out = heads, Path(out)

    def on_train_end(self, trainer, pl_module):
        state = self.heads.state_dict()
        torch.save({"heads": state["heads"], "head_steps": state["head_steps"]},
                   self.out / f"heads_rank{trainer.global_rank}.pt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = loaders()
    heads = ExitHeads(kinds=["tuned_lens", "confidence"], max_tokens=64, optim={"lr": 1e-2})
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp", max_steps=6,
                        callbacks=[heads, SaveHeads(heads, out)], logger=False, default_root_dir=str(out),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(TinyLM(), train, val)


if __name__ == "__main__":
    main()
