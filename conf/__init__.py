# conf/ is installed as the package ee_callbacks.conf (pyproject.toml); Hydra's pkg:// search path needs this file.
