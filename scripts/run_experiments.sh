#!/usr/bin/env bash
# Reproduce docs/results.md: the three small-scale experiments, each one Hydra multirun over the configurations and
# SEEDS (a seed changes the initial weights and the training-batch order; the probe set is the same for all), then
# the measured self-speculation on the plain and LayerSkip-trained llama_tiny, the tables and the overlay reports.
#   bash scripts/run_experiments.sh [OUT=outputs/results]
# Environment: PYTHON (default .venv/bin/python), SEEDS (default 1,2,3), STEPS_<experiment> (training steps,
# shrunk from the recipes' 300 so that 3 seeds x 10 configurations fit a shared 2-core CPU: ee_aware 150,
# size_scan and arch_compare 100; docs/results.md says so), EXPERIMENTS (default "ee_aware size_scan arch_compare").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/results}
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-1,2,3}
STEPS_ee_aware=${STEPS_ee_aware:-150}
STEPS_size_scan=${STEPS_size_scan:-100}
STEPS_arch_compare=${STEPS_arch_compare:-100}
EXPERIMENTS=${EXPERIMENTS:-ee_aware size_scan arch_compare}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$OUT"
for exp in $EXPERIMENTS; do
  extra=()
  [ "$exp" = ee_aware ] && extra=(early_exit=none,layerskip)
  steps_var=STEPS_$exp
  steps=${!steps_var:-300}
  start=$(date +%s)
  # checkpoints every 50 steps so that the last step always has one (the measured self-speculation reads it)
  "$PY" train.py -m experiment=$exp seed=$SEEDS trainer.max_steps=$steps \
    callbacks.model_checkpoint.every_n_train_steps=50 hydra.sweep.dir=$OUT/$exp "${extra[@]}"
  echo "$exp: $(( $(date +%s) - start )) s (seeds $SEEDS, $steps steps)" | tee -a "$OUT/timings.txt"
  "$PY" -m ee_callbacks.report "$OUT"/$exp/[0-9]*/ --out "$OUT/$exp/report" --quiet || true
done
