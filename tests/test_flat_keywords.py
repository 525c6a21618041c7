"""The grouped callback arguments also accept the flat keywords of earlier releases (and of the issues' examples,
e.g. ``EarlyExitProbe(every_n_steps=..., max_overhead=0.02)``), with the same effect as the grouped form."""

import pytest

from ee_callbacks import EarlyExitProbe, ExitHeads


def _state(probe: EarlyExitProbe) -> dict:
    return {name: getattr(probe, name) for name in (
        "probe_sequences", "seq_len", "seed", "batch_size", "data_name", "max_overhead", "wandb_extras",
        "wandb_images", "probe_at_start", "probe_at_end")} | {
        "max_every": probe.cadence.max_every_n_steps if probe.cadence is not None else None}


def test_flat_probe_keywords_equal_the_grouped_form():
    flat = EarlyExitProbe(every_n_steps=5, probe_sequences=4, seq_len=16, seed=3, batch_size=2, data_name="mine",
                          max_overhead=0.02, max_every_n_steps=100, wandb_extras=False, wandb_images=True,
                          probe_at_start=False)
    grouped = EarlyExitProbe(every_n_steps=5, probe_set={"sequences": 4, "seq_len": 16, "seed": 3, "batch_size": 2,
                                                         "data_name": "mine"},
                             cadence={"max_overhead": 0.02, "max_every_n_steps": 100},
                             wandb={"extras": False, "images": True}, probe_at=["end"])
    assert _state(flat) == _state(grouped)
    assert _state(flat)["probe_sequences"] == 4 and _state(flat)["max_overhead"] == 0.02
    assert flat.probe_at_start is False and flat.probe_at_end is True and flat.max_overhead == 0.02
    # flat keywords add to a grouped argument given as well
    mixed = EarlyExitProbe(every_n_steps=5, probe_set={"sequences": 4}, seq_len=16, cadence=0.05, max_every_n_steps=7)
    assert (mixed.probe_sequences, mixed.seq_len, mixed.max_overhead, mixed.cadence.max_every_n_steps) == (4, 16, 0.05, 7)


def test_unknown_or_conflicting_flat_keywords_are_clear_errors():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['probe_seqs'\].*probe_sequences"):
        EarlyExitProbe(probe_seqs=4)
    with pytest.raises(ValueError, match=r"seed=1 and probe_set\['seed'\]=2 disagree"):
        EarlyExitProbe(probe_set={"seed": 2}, seed=1)
    with pytest.raises(TypeError, match=r"ExitHeads got unexpected keyword.*\['learning_rate'\].*lr"):
        ExitHeads(learning_rate=0.1)


def test_flat_optimiser_keywords_equal_the_grouped_form():
    flat = ExitHeads(lr=0.5, optimizer="sgd", weight_decay=0.1, schedule="cosine", warmup_steps=3)
    grouped = ExitHeads(optim={"lr": 0.5, "optimizer": "sgd", "weight_decay": 0.1, "schedule": "cosine",
                               "warmup_steps": 3})
    assert flat.optim == grouped.optim and flat.optim.lr == 0.5 and flat.optim.optimizer == "sgd"
    assert ExitHeads().optim.lr != 0.5  # the default differs, so the flat keyword did something
