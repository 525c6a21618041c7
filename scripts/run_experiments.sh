#!/usr/bin/env bash
# Reproduce docs/results.md: the three small-scale experiments, each one Hydra multirun, then an overlay report.
#   bash scripts/run_experiments.sh [OUT=outputs/results]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/results}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} WANDB_MODE=${WANDB_MODE:-offline}
for exp in arch_compare size_scan ee_aware; do
  extra=()
  [ "$exp" = ee_aware ] && extra=(early_exit=none,layerskip)
  start=$(date +%s)
  .venv/bin/python train.py -m experiment=$exp hydra.sweep.dir=$OUT/$exp "${extra[@]}"
  echo "$exp: $(( $(date +%s) - start )) s" | tee -a $OUT/timings.txt
  .venv/bin/ee-report $OUT/$exp/[0-9]*/ --out $OUT/$exp/report --quiet || true
done
