#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in one device call of about 9.5 minutes:
#   1. the device-data tests on CUDA (the GPU-resident epoch equals the host path's),
#   2. benchmarks/gpu_throughput.py on CIFAR-10 (loop vs ceiling per phase, prune breakdown, bf16 QAT agreement),
#   3. one chunk of the GPU study (benchmarks/gpu_study.sh); the first chunk trains and measures the teacher of
#      configs/gpu_resnet18_cifar10.yaml on the full test split: that is the teacher-recipe check.
# Prepare locally first (bash benchmarks/gpu_prepare.sh), then call the device tool with
#   command: bash benchmarks/gpu_session.sh      carry: ["runs/gpu_carry"]      timeout_s: 600
# Results come back under $OUT (at most 8 files): session.log, gpu_throughput.{json,md},
# gpu_teacher_gpu_cifar10_s0.json (first chunk only), gpu_cifar10_s0-results.json and the
# gpu_cifar10_s0.tar.zst.NN parts to put in runs/gpu_carry/state for the next chunk
# (STATE_FROM=<files_at> bash benchmarks/gpu_prepare.sh).
# Later sessions that only continue the study: STUDY_ONLY=1 bash benchmarks/gpu_session.sh (skips 1 and 2).
# SESSION_S (default 560) is the whole script's budget; DATASET / SEED choose the study chunk; PY, THROUGHPUT_ARGS
# and gpu_study.sh's SWEEP / RECIPE / EXTRA_SETS let the script be tried on a CPU with tiny settings.
set -uo pipefail
SESSION_S=${SESSION_S:-560}
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
    || { echo "[session] no zstandard wheel under $CARRY: run benchmarks/gpu_prepare.sh first"; exit 1; }
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
  timeout 240 $PY benchmarks/gpu_throughput.py $THROUGHPUT_ARGS --out-dir "$OUT" \
    || echo "[session] throughput stopped early (exit $?); $OUT/gpu_throughput.json holds the phases measured so far"
fi

echo "[session] study chunk ($(elapsed)s)"
DATASET=$DATASET SEED=$SEED DATA_ROOT=$DATA STATE_IN=$CARRY/state OUT=$OUT PY=$PY \
  BUDGET_S=$(( SESSION_S - $(elapsed) )) bash benchmarks/gpu_study.sh
echo "[session] done in $(elapsed)s; files in $OUT:"; ls -la "$OUT"
