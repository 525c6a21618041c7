#!/usr/bin/env bash
# The min-versions job: install the declared minimum version of every core and `train` dependency (each `>=X` lower
# bound of pyproject.toml pinned to `==X`) into a second environment, .venv-min, and run a smoke subset there:
# ee-train (a short fit with the probe, exit heads and the W&B logger, offline) and ee-analyze on its run directory.
# torch is the CPU build: its floor is the wheel on this machine's disk (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EE_MIN_VENV:-.venv-min}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pins="$VENV/min-pins.txt"
"$VENV/bin/python" - "$pins" <<'PYEOF'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = []
for requirement in project["dependencies"] + project["optional-dependencies"]["train"]:
    found = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9][^,;\s]*)", requirement.strip())
    if not found:
        sys.exit(f"min-versions: cannot pin {requirement!r}: write lower bounds as name>=X")
    pins.append(f"{found[1]}=={found[2]}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("min-versions pins:", " ".join(pins))
PYEOF
# torch first, alone, so pip takes the CPU wheel (find-links) and never a multi-GB CUDA build
"$VENV/bin/pip" install -q --no-compile -c "$pins" "$(grep '^torch==' "$pins")"
"$VENV/bin/pip" install -q --no-compile -c "$pins" -e ".[train]"
"$VENV/bin/pip" list 2>/dev/null | grep -iE "^(torch|lightning|transformers|wandb|numpy|safetensors|pyyaml|tqdm|hydra-core|omegaconf|tokenizers) "

export WANDB_MODE=offline HF_HUB_OFFLINE=1 WANDB_SILENT=true WANDB_ERROR_REPORTING=false TOKENIZERS_PARALLELISM=false \
  OMP_WAIT_POLICY=PASSIVE
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && "$OLDPWD/$VENV/bin/ee-train" experiment=smoke 'callbacks=[default,exit_heads]' logger=wandb \
  trainer.max_steps=10 hydra.run.dir="$work/run")
"$VENV/bin/ee-analyze" "$work/run" --out "$work/analysis" --no-progress --logger none
"$VENV/bin/python" - "$work" <<'PYEOF'
import sys
from pathlib import Path

from ee_callbacks import read_records

work = Path(sys.argv[1])
trained = read_records(work / "run" / "ee_probes.jsonl")
analysed = read_records(work / "analysis" / "ee_probes.jsonl")
assert [r["step"] for r in trained] == [0, 10], [r["step"] for r in trained]
assert trained[-1]["heads"], "the exit heads were not evaluated"
assert [r["step"] for r in analysed] == [10], [r["step"] for r in analysed]
assert abs(analysed[0]["summary"]["eas"] - trained[-1]["summary"]["eas"]) < 1e-6
assert list((work / "run" / "wandb").glob("offline-run-*")), "no offline W&B run"
print("min-versions smoke: ok (EAS at step 10: %.4f)" % trained[-1]["summary"]["eas"])
PYEOF
