#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in one device call of about 9.5 minutes:
#   1. the device-data tests on CUDA (the GPU-resident epoch equals the host path's),
#   2. tools/gpu/gpu_throughput.py on CIFAR-10 (loop vs ceiling per phase, prune breakdown, bf16 QAT agreement),
#   3. one chunk of the GPU study (tools/gpu/gpu_study.sh); the first chunk trains and measures the teacher of
#      configs/gpu_resnet18_cifar10.yaml on the full test split: that is the teacher-recipe check;
#      between that teacher and the sweep, tools/gpu/structured_gpu.py trains the CPU search's structured widths
#      and their uniform matches from it (STRUCTURED_S seconds, default 220; 0 skips it).
# Prepare locally first (bash tools/gpu/gpu_prepare.sh), then call the device tool with
#   command: bash tools/gpu/gpu_session.sh      carry: ["runs/gpu_carry"]      timeout_s: 600
# Results come back under $OUT (at most 8 files): session.log (with the throughput table), gpu_throughput.json,
# structured_gpu.json, gpu_teacher_gpu_cifar10_s0.json (first chunk only), gpu_cifar10_s0-results.json and the
# gpu_cifar10_s0.tar.zst.NN parts to put in runs/gpu_carry/state for the next chunk
# (STATE_FROM=<files_at> bash tools/gpu/gpu_prepare.sh).
# Later sessions that only continue the study: STUDY_ONLY=1 bash tools/gpu/gpu_session.sh (skips 1, 2 and the structured run).
# SESSION_S (default 565) is the whole script's budget, THROUGHPUT_S (150) the throughput step's; DATASET / SEED choose
# the study chunk; PY, THROUGHPUT_ARGS, STRUCTURED_ARGS and gpu_study.sh's SWEEP / RECIPE / EXTRA_SETS let the
# script be tried on a CPU with tiny settings.
set -uo pipefail
SESSION_S=${SESSION_S:-565}
DATASET=${DATASET:-cifar10}
SEED=${SEED:-0}
CARRY=runs/gpu_carry
OUT=${OUT:-runs/gpu_out}
T0=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
elapsed() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 PQD_CACHE=/tmp/pqd-cache OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
PY=${PY:-python3}
if ! $PY -c "import zstandard" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/zstandard-*.whl \
    || { echo "[session] no zstandard wheel under $CARRY: run tools/gpu/gpu_prepare.sh first"; exit 1; }
fi
if ! $PY -c "import torch_pruning" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/torch_pruning-*.whl \
    || echo "[session] no torch-pruning wheel under $CARRY (tools/gpu/gpu_prepare.sh): the structured run will fail"
fi
export PYTHONPATH=$PWD/src:/tmp/site
DATA=$CARRY/$DATASET-jpeg.tar.gz
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:---data-root $DATA --dataset $DATASET}
nvidia-smi -L || true
$PY -c "import torch; print('[session] torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
git log -1 --format='[session] commit %H %s' 2>/dev/null || true

echo "[session] decode the data once into \$PQD_CACHE ($(elapsed)s)"
timeout 150 $PY -c "
from pqd.config import DataConfig; from pqd.data import load_data
s = load_data(DataConfig(dataset='$DATASET', root='$DATA')); print('[session] data', s.name, len(s.train), len(s.test))
" || echo "[session] data decode failed"

if [ -z "${STUDY_ONLY:-}" ]; then
  echo "[session] device-data tests on CUDA ($(elapsed)s)"
  timeout 90 $PY -m pytest -q -x -p no:cacheprovider tests/data/test_device_data.py 2>&1 | tail -3

  echo "[session] throughput ($(elapsed)s)"
  timeout ${THROUGHPUT_S:-150} $PY tools/gpu/gpu_throughput.py $THROUGHPUT_ARGS --out-dir "$OUT" \
    || echo "[session] throughput stopped early (exit $?); $OUT/gpu_throughput.json holds the phases measured so far"
fi

# issue 12 at full scale, between the teacher and the sweep: the CPU search's widths trained from this teacher
# (tools/gpu/structured_gpu.py); a hard cap, and no variant started in its last STRUCTURED_TAIL_S seconds
if [ -z "${STUDY_ONLY:-}" ] && [ "$DATASET" = cifar10 ] && [ "${STRUCTURED_S:-220}" -gt 0 ]; then
  S_S=${STRUCTURED_S:-220}
  BEFORE_SWEEP="timeout $S_S $PY tools/gpu/structured_gpu.py --teacher \$TEACHER --data $DATA --time-limit $(( S_S - ${STRUCTURED_TAIL_S:-55} )) --out $OUT/structured_gpu.json ${STRUCTURED_ARGS:-}"
  export BEFORE_SWEEP
fi

echo "[session] study chunk ($(elapsed)s)"
DATASET=$DATASET SEED=$SEED DATA_ROOT=$DATA STATE_IN=$CARRY/state OUT=$OUT PY=$PY \
  BUDGET_S=$(( SESSION_S - $(elapsed) )) bash tools/gpu/gpu_study.sh
# at most 8 files come back from a device call: the markdown goes into the log (the JSON holds the same)
[ -f "$OUT/gpu_throughput.md" ] && { cat "$OUT/gpu_throughput.md"; rm -f "$OUT/gpu_throughput.md"; }
echo "[session] done in $(elapsed)s; files in $OUT:"; ls -la "$OUT"
