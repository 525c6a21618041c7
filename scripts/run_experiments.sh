#!/usr/bin/env bash
# Reproduce docs/results.md: the three small-scale experiments, each one Hydra multirun over the configurations and
# SEEDS (a seed changes the initial weights and the training-batch order; the probe set is the same for all), then
# the measured self-speculation on the plain and LayerSkip-trained llama_tiny, the tables and the overlay reports.
#   bash scripts/run_experiments.sh [OUT=outputs/results]
# Environment: PYTHON (default .venv/bin/python), SEEDS (default 1,2,3), STEPS (default 150: shrunk from the
# recipes' 300 so that 3 seeds x 10 configurations fit a 2-core CPU in about 45 min; docs/results.md says so),
# EXPERIMENTS (default "arch_compare size_scan ee_aware").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/results}
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-1,2,3}
STEPS=${STEPS:-150}
EXPERIMENTS=${EXPERIMENTS:-arch_compare size_scan ee_aware}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$OUT"
for exp in $EXPERIMENTS; do
  extra=()
  [ "$exp" = ee_aware ] && extra=(early_exit=none,layerskip)
  start=$(date +%s)
  # checkpoints every 50 steps so that the last step always has one (the measured self-speculation reads it)
  "$PY" train.py -m experiment=$exp seed=$SEEDS trainer.max_steps=$STEPS \
    callbacks.model_checkpoint.every_n_train_steps=50 hydra.sweep.dir=$OUT/$exp "${extra[@]}"
  echo "$exp: $(( $(date +%s) - start )) s (seeds $SEEDS, $STEPS steps)" | tee -a "$OUT/timings.txt"
  "$PY" -m ee_callbacks.report "$OUT"/$exp/[0-9]*/ --out "$OUT/$exp/report" --quiet || true
done
