"""ee_callbacks: measure, while a language model trains, how much of the network each token needs.

The probe core (``find_model_parts``, ``run_probe``, ``ProbeConfig``, ``ProbeRecord``, ``read_records``) is plain
PyTorch. The Lightning callbacks (``EarlyExitProbe``, ``ExitHeads``) are imported lazily so that the core can be used
without importing Lightning.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "find_model_parts": "ee_callbacks.model_parts",
    "find_language_model": "ee_callbacks.model_parts",
    "prove_model_parts": "ee_callbacks.model_parts",
    "ModelParts": "ee_callbacks.model_parts",
    "ModelPartsError": "ee_callbacks.model_parts",
    "capture_hidden_states": "ee_callbacks.capture",
    "run_probe": "ee_callbacks.probe",
    "ProbeConfig": "ee_callbacks.probe",
    "ProbeRecord": "ee_callbacks.records",
    "read_records": "ee_callbacks.records",
    "append_record": "ee_callbacks.records",
    "EarlyExitProbe": "ee_callbacks.callbacks.probe",
    "ExitHeads": "ee_callbacks.callbacks.exit_heads",
    "EarlyExitLoss": "ee_callbacks.exit_loss",
    "load_exit_heads": "ee_callbacks.readouts",
    "draw_probe_set": "ee_callbacks.probe_data",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ee_callbacks' has no attribute {name!r}")
