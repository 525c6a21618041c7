"""Logger builders used as Hydra ``_target_`` s.

``make_wandb_logger`` never blocks a first run on a new machine: with ``mode="auto"`` it runs W&B offline unless
credentials are configured (decided from environment variables and local files only: no network), and a W&B
initialisation failure becomes a warning (the builder returns ``None`` and the run continues without that logger).
"""

from __future__ import annotations

import configparser
import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WANDB_MODES = ("auto", "online", "offline", "disabled")


def _wandb_settings_files() -> list[Path]:
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".config", "wandb")
    return [Path(config_dir) / "settings", Path("wandb") / "settings"]


def _wandb_setting(key: str) -> str | None:
    """A value from W&B's system or workspace settings file (the workspace file wins), else ``None``."""
    value = None
    for path in _wandb_settings_files():
        if not path.is_file():
            continue
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        if parser.has_option("default", key):
            value = parser.get("default", key) or value
    return value


def _netrc_path() -> Path | None:
    if os.environ.get("NETRC"):
        return Path(os.path.expanduser(os.environ["NETRC"]))
    for name in (".netrc", "_netrc"):
        candidate = Path(os.path.expanduser("~")) / name
        if candidate.is_file():
            return candidate
    return None


def wandb_credentials_configured() -> bool:
    """Whether W&B has credentials on this machine, judged locally (no network): ``WANDB_API_KEY``,
    ``WANDB_IDENTITY_TOKEN_FILE``, an ``api_key`` in a W&B settings file, or a ``.netrc`` entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if _wandb_setting("api_key"):
        return True
    path = _netrc_path()
    if path is None or not path.is_file():
        return False
    base_url = os.environ.get("WANDB_BASE_URL") or _wandb_setting("base_url") or "https://api.wandb.ai"
    host = urlparse(base_url).hostname or base_url
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``online`` / ``offline`` / ``disabled``: ``WANDB_MODE`` wins, then an explicit ``mode``; ``auto`` is online only
    when credentials are configured."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in {"offline", "dryrun"}:
        return "offline"
    if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in {"1", "true"}:
        return "disabled"
    if mode != "auto":
        return mode
    if env_mode == "online":
        return "online"
    return "online" if wandb_credentials_configured() else "offline"


def make_wandb_logger(project: str = "ee_callbacks", name: str | None = None, save_dir: str | None = None,
                      mode: str = "auto", group: str | None = None, tags: list[str] | None = None,
                      entity: str | None = None, notes: str | None = None, job_type: str | None = None,
                      log_model: bool | str = False, init_timeout_s: float = 90.0, **kwargs: Any):
    """A Lightning ``WandbLogger`` whose run is started now (so failures surface here, not mid-training).

    Args:
        project, name, save_dir: as for ``WandbLogger`` (``save_dir`` should be the run directory).
        mode: ``auto`` (offline unless credentials are configured), ``online``, ``offline`` or ``disabled``.
            The ``WANDB_MODE`` environment variable overrides it.
        group, tags, entity, notes, job_type: as for ``wandb.init``; log_model: as for ``WandbLogger``.
        init_timeout_s: W&B's own limit for starting an online run.
        **kwargs: passed to ``WandbLogger`` / ``wandb.init`` (``id``, ``resume``, ``config``, ...; from a Hydra config:
            ``logger.wandb.extra``).

    Returns:
        The logger, or ``None`` (with a warning) when W&B could not start; the run then goes on without it.
    """
    resolved = resolve_wandb_mode(mode)
    if resolved == "disabled":
        return None
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        settings = kwargs.pop("settings", None) or wandb.Settings(init_timeout=float(init_timeout_s), silent=True)
        for key, value in (("group", group), ("tags", tags), ("entity", entity), ("notes", notes),
                           ("job_type", job_type)):
            if value is not None:
                kwargs[key] = list(value) if key == "tags" else value
        logger = WandbLogger(project=project, name=name, save_dir=save_dir, mode=resolved, settings=settings,
                             log_model=log_model, **kwargs)
        logger.experiment  # noqa: B018  (starts the run now; a dummy on non-zero ranks)
        return logger
    except Exception as error:  # noqa: BLE001  (any W&B failure must not stop training)
        warnings.warn(f"W&B could not start ({type(error).__name__}: {error}); continuing without the W&B logger",
                      stacklevel=2)
        return None
