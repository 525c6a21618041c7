"""Train a language model with the early-exit probes attached (the same app as the ``ee-train`` console script).

    python train.py                                        # llama_tiny on the fortunes corpus
    python train.py experiment=smoke                       # a complete recipe from conf/experiment/
    python train.py model=mamba2_tiny logger=csv trainer.max_steps=200
    python train.py -m model=llama_tiny,mixtral_tiny,mamba2_tiny   # a sweep
    python train.py -m hparams_search=eas_optuna experiment=ee_aware   # Optuna on a probe figure (final EAS)

The Hydra app is ``ee_callbacks.training.train.main``: it composes ``conf/`` (in a checkout; the installed wheel
carries the same files as ``pkg://ee_callbacks.conf``), runs ``train(cfg)`` and returns the configured objective
(``cfg.objective``, see ``objective_value``) to Hydra's sweeper.
"""

from ee_callbacks.training.train import main

if __name__ == "__main__":
    main()
