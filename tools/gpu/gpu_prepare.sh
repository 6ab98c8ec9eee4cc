#!/usr/bin/env bash
# Local preparation for tools/gpu/gpu_session.sh, on the machine that calls the device tool, from the
# repository root. Fills runs/gpu_carry/ (ignored by git; the device call names it in `carry`):
#   - the CIFAR JPEG archives (the device reaches nothing outside the working tree),
#   - a zstandard wheel for the device's Python 3.12 (pqd's compact format and the study state need it;
#     the device image lacks it; command as in the device README) and the torch-pruning wheel (structured runs),
#   - state/: the last study chunk's parts (NAME.tar.zst.NN), from the previous session's returned files.
#
#   STATE_FROM=<folder with the last chunk's gpu_*.tar.zst.NN> bash tools/gpu/gpu_prepare.sh
#
# DATA_DIR (default ../shared/data), DATASETS (default "cifar10"; the carried tree must stay under 64 MiB:
# one archive is 19.5 MB, the wheel 5.5 MB, the study state about 20 MB), PY (default python3).
set -euo pipefail
DATA_DIR=${DATA_DIR:-../shared/data}
DATASETS=${DATASETS:-cifar10}
PY=${PY:-python3}
CARRY=runs/gpu_carry
mkdir -p "$CARRY/state"
for d in $DATASETS; do cp -u "$DATA_DIR/$d-jpeg.tar.gz" "$CARRY/"; done
if ! ls "$CARRY"/zstandard-*.whl >/dev/null 2>&1; then
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY" zstandard==0.25.0
fi
if ! ls "$CARRY"/torch_pruning-*.whl >/dev/null 2>&1; then  # pure Python; tools/gpu/structured_gpu.py needs it
  $PY -m pip download --no-deps --only-binary=:all: -d "$CARRY" torch-pruning==1.6.1
fi
if [ -n "${STATE_FROM:-}" ]; then
  rm -f "$CARRY"/state/gpu_*.tar.zst.*
  cp "$STATE_FROM"/gpu_*.tar.zst.* "$CARRY/state/"
fi
du -sh "$CARRY"
echo "then, with the device tool: run(command='bash tools/gpu/gpu_session.sh', carry=['$CARRY'], timeout_s=600)"
