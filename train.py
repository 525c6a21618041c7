"""Train a language model with the early-exit probes attached.

    python train.py                                        # llama_tiny on the fortunes corpus
    python train.py experiment=smoke                       # a complete recipe from conf/experiment/
    python train.py model=mamba2_tiny logger=csv trainer.max_steps=200
    python train.py -m model=llama_tiny,mixtral_tiny,mamba2_tiny   # a sweep
    python train.py -m hparams_search=eas_optuna experiment=ee_aware   # Optuna on a probe figure (final EAS)

The work is done by ``ee_callbacks.training.train.train(cfg)``; this file only hands it Hydra's config and returns
the configured objective (``cfg.objective``, see ``objective_value``) to Hydra's sweeper: ``val_loss`` by default, or
a probe figure (``objective.name=eas``, ``eas_at_loss_bound``, ...; docs/scaling.md "Optuna on a probe figure").
"""

import os

# On a CPU shared with other processes, OpenMP threads that spin while waiting make every step many times slower
# (measured 14x on 2 cores); passive waiting costs little when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ee_callbacks.training.config import register_configs  # noqa: E402

register_configs()
log = logging.getLogger("train")


def _check_objective(cfg: DictConfig) -> None:
    """Fail before training when the objective cannot be computed; warn when the sweeper optimises it the wrong way."""
    from ee_callbacks.training.train import OBJECTIVE_DIRECTIONS, objective_needs_probe, objective_spec

    objective = cfg.get("objective")
    name = objective_spec(objective)["name"]
    if objective_needs_probe(objective) and not (cfg.get("callbacks") or {}).get("ee_probe"):
        raise ValueError(f"objective {name!r} is a probe figure but the ee_probe callback is off; keep "
                         "callbacks.ee_probe or use objective.name=val_loss")
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = HydraConfig.get().sweeper.get("direction")
    except Exception:  # noqa: BLE001  (no Hydra runtime, or a sweeper without a direction)
        direction = None
    expected = OBJECTIVE_DIRECTIONS.get(name)
    if isinstance(direction, str) and expected and direction.lower() != expected:
        log.warning("objective %r is meant to be %sd but hydra.sweeper.direction=%s", name, expected, direction)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from ee_callbacks.training.train import objective_value, train

    _check_objective(cfg)
    summary = train(cfg)
    # the returned value is what hydra sweepers (e.g. Optuna) optimise: cfg.objective (default val_loss)
    value = objective_value(summary, cfg.get("objective"))
    log.info("objective %s = %s", OmegaConf.select(cfg, "objective.name", default=cfg.get("objective")), value)
    return value


if __name__ == "__main__":
    main()
