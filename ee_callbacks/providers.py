"""The registry of readout providers: what the two Lightning callbacks share besides the probe core (and
``model_parts.find_language_model``). Plain Python, no Lightning import.

A readout provider is any callback with ``probe_readouts() -> {kind: readout}`` (readouts the probe evaluates beside
the logit lens) and, optionally, ``readout_artifacts(is_global_zero) -> directory or None`` (files to upload with the
probe records, written on demand). ``EarlyExitProbe`` finds providers among the trainer's callbacks; ``ExitHeads``
is one. Neither callback imports the other.
"""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["readout_providers", "provider_readouts", "provider_artifacts"]


def readout_providers(callbacks: Iterable, exclude=None) -> list:
    """The callbacks that offer readouts to the probe (``probe_readouts`` callable), in the trainer's order."""
    return [cb for cb in callbacks if cb is not exclude and callable(getattr(cb, "probe_readouts", None))]


def provider_readouts(callbacks: Iterable, exclude=None) -> dict:
    """Every provider's ``{kind: readout}``, merged in the trainer's order."""
    found: dict = {}
    for provider in readout_providers(callbacks, exclude):
        found.update(provider.probe_readouts())
    return found


def provider_artifacts(callbacks: Iterable, is_global_zero: bool, exclude=None) -> Optional[str]:
    """The first directory a provider writes for the probe's artifact (e.g. saved exit heads), or None."""
    for provider in readout_providers(callbacks, exclude):
        write = getattr(provider, "readout_artifacts", None)
        directory = write(is_global_zero) if callable(write) else None
        if directory is not None:
            return directory
    return None
