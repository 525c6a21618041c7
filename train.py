"""Train a language model with the early-exit probes attached.

    python train.py                                        # llama_tiny on the fortunes corpus
    python train.py experiment=smoke                       # a complete recipe from conf/experiment/
    python train.py model=mamba2_tiny logger=csv trainer.max_steps=200
    python train.py -m model=llama_tiny,mixtral_tiny,mamba2_tiny   # a sweep

The work is done by ``ee_callbacks.training.train.train(cfg)``; this file only hands it Hydra's config.
"""

import os

# On a CPU shared with other processes, OpenMP threads that spin while waiting make every step many times slower
# (measured 14x on 2 cores); passive waiting costs little when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ee_callbacks.training.config import register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from ee_callbacks.training.train import train

    summary = train(cfg)
    # the returned value is what hydra sweepers (e.g. Optuna) optimise
    return summary["val_loss"]


if __name__ == "__main__":
    main()
