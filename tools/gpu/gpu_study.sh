#!/usr/bin/env bash
# One chunk (about BUDGET_S seconds, default 540) of the chunked GPU study: restore the last chunk's
# state, train the study's teacher if there is none yet, run the sweep until the time is up (pqd
# sweep skips finished runs; one cut off restarts next chunk), then pack the state for the next one.
#
#   DATASET=cifar10 SEED=0 DATA_ROOT=../shared/data/cifar10-jpeg.tar.gz BUDGET_S=540 bash tools/gpu/gpu_study.sh
#
# Inputs (environment): DATASET (cifar10 | cifar100), SEED, BUDGET_S, DATA_ROOT (default
# runs/gpu_carry/$DATASET-jpeg.tar.gz), STATE_IN (folder with the last chunk's NAME.tar.zst.NN parts,
# default runs/gpu_carry/state), OUT (where this chunk's parts, results and teacher record go;
# default runs/gpu_out), STUDY_ROOT (default /tmp/pqd_gpu_study: a fixed absolute path, because the
# sweep records absolute teacher paths), PY (default python3), SWEEP / RECIPE (sweep file and teacher
# recipe; default configs/sweeps/gpu_$DATASET.yaml and configs/gpu_resnet18_$DATASET.yaml),
# EXTRA_SETS (more --set KEY=VALUE words for both, e.g. in tests), BEFORE_SWEEP (a shell command run once the
# teacher exists, before the sweep, with TEACHER set to its weights; it must keep to its own time limit).
# Run from the repository root with PYTHONPATH=src. Needs zstandard (pqd's dependency).
set -uo pipefail
DATASET=${DATASET:-cifar10}
SEED=${SEED:-0}
BUDGET_S=${BUDGET_S:-540}
DATA_ROOT=${DATA_ROOT:-runs/gpu_carry/${DATASET}-jpeg.tar.gz}
STATE_IN=${STATE_IN:-runs/gpu_carry/state}
OUT=${OUT:-runs/gpu_out}
STUDY_ROOT=${STUDY_ROOT:-/tmp/pqd_gpu_study}
PY=${PY:-python3}
SWEEP=${SWEEP:-configs/sweeps/gpu_${DATASET}.yaml}
RECIPE=${RECIPE:-configs/gpu_resnet18_${DATASET}.yaml}
EXTRA_SETS=${EXTRA_SETS:-}
PACK_RESERVE_S=${PACK_RESERVE_S:-30}
NAME=gpu_${DATASET}_s${SEED}
STUDY=$STUDY_ROOT/$NAME
T0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - T0) - PACK_RESERVE_S )); }
sets=(--set "data.root=$DATA_ROOT" --set "seed=$SEED")
for kv in $EXTRA_SETS; do sets+=(--set "$kv"); done
mkdir -p "$OUT"
echo "[gpu_study] $NAME: budget ${BUDGET_S}s, sweep $SWEEP, data $DATA_ROOT"

$PY tools/gpu/gpu_study_state.py unpack --root "$STUDY_ROOT" --name "$NAME" --parts "$STATE_IN" || exit 1

QAT_OK=1
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # the quantize stage must train on the GPU (main at 12249db prepared the QAT model on the CPU and trained it there)
  $PY - <<'PYEOF' || { QAT_OK=0; echo "[gpu_study] QAT would train on the CPU: merge the QAT device fix first; teacher only, no sweep"; }
import torch, warnings
warnings.filterwarnings("ignore")
from pqd.config import TrainConfig
from pqd.stages.quantize import QuantizeConfig
from pqd.data import Dataset, Splits
from pqd.models.registry import create_model
from pqd.compress.student import Student
from pqd.stages.quantize import quantize
ds = Dataset(torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8), torch.arange(64) % 4, tuple("abcd"))
data = Splits(name="t", train=ds, val=None, test=ds, mean=(0.5,) * 3, std=(0.25,) * 3, hflip=True)
s = quantize(Student(create_model("resnet18", num_classes=4, width=0.125).cuda()), QuantizeConfig(), data=data, epochs=1,
             train_config=TrainConfig(batch_size=32, progress=False))
dev = next(s.model.parameters()).device
print("[gpu_study] QAT student after quantize is on", dev)
raise SystemExit(0 if dev.type == "cuda" else 1)
PYEOF
fi

if [ ! -f "$STUDY/teacher.safetensors" ] && ! ls "$STUDY"/sweep/runs/teacher-*/metrics.json >/dev/null 2>&1; then
  echo "[gpu_study] training the teacher ($RECIPE), $(left)s left"
  timeout --signal=TERM "$(left)" $PY tools/gpu/gpu_teacher.py "$RECIPE" "${sets[@]}" \
    --json "$OUT/gpu_teacher_${NAME}.json" --save "$STUDY/teacher.safetensors" || echo "[gpu_study] teacher step failed or ran out of time"
fi

if [ -n "${BEFORE_SWEEP:-}" ] && [ -f "$STUDY/teacher.safetensors" ]; then
  # e.g. tools/gpu/gpu_session.sh's structured run: a command that needs the study's teacher ($TEACHER)
  echo "[gpu_study] before the sweep: $BEFORE_SWEEP, $(left)s left"
  TEACHER=$STUDY/teacher.safetensors bash -c "$BEFORE_SWEEP" || echo "[gpu_study] the before-sweep command failed (exit $?)"
fi

if [ "$QAT_OK" = 1 ] && [ "$(left)" -gt 20 ] && { [ -f "$STUDY/teacher.safetensors" ] || ls "$STUDY"/sweep/runs/teacher-*/metrics.json >/dev/null 2>&1; }; then
  echo "[gpu_study] sweep, $(left)s left"
  timeout --signal=TERM "$(left)" $PY -m pqd.cli sweep "$SWEEP" --out "$STUDY/sweep" "${sets[@]}" \
    --set "teacher.weights=$STUDY/teacher.safetensors" --quiet
  echo "[gpu_study] sweep exit $? (124: stopped at the chunk's time limit)"
fi

$PY tools/gpu/gpu_study_state.py pack --root "$STUDY_ROOT" --name "$NAME" --out "$OUT"
echo "[gpu_study] done in $(( $(date +%s) - T0 ))s"
