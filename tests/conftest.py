"""Shared test setup: no test reaches the network or prompts for W&B credentials."""

import os

# Other processes share this machine's few cores: OpenMP threads that spin while waiting slow every torch op by an
# order of magnitude under contention. Must be set before torch is imported (conftest runs first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
