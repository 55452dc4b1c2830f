#!/usr/bin/env bash
# Images/s of `diffusion-fast batch` on the digits model: 1 process, then 2 processes under torchrun, with the
# batch-invariant network calls (default) and without (--no-batch-invariant); checks that the 1- and 2-process
# folders are byte-identical. The printed images/s count the generation loop only (not start-up or model load).
# Usage: bash benchmarks/batch_images_per_second.sh [ITEMS=512] [STEPS=20] [BATCH=16]
# Set DEVICE=cuda to run one process per GPU (torchrun gives each rank cuda:LOCAL_RANK).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=1
PY="${PYTHON:-python3}"
ITEMS="${1:-512}" STEPS="${2:-20}" BATCH="${3:-16}" DEVICE="${DEVICE:-auto}"
NPROC="${NPROC:-2}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for i in $(seq 0 $((ITEMS - 1))); do echo "the digit $((i % 10))"; done > "$WORK/prompts.txt"
ARGS=(batch "$WORK/prompts.txt" --steps "$STEPS" --batch-size "$BATCH" --device "$DEVICE")

"$PY" -c "import os, torch; print('torch', torch.__version__, '| cpus', os.cpu_count(), '| load', os.getloadavg())"
echo "$ITEMS items, $STEPS steps, batch size $BATCH, device $DEVICE"
for mode in invariant plain; do
  extra=()
  [ "$mode" = plain ] && extra=(--no-batch-invariant)
  echo "1 process, $mode:   $("$PY" -m diffusion_fast "${ARGS[@]}" --out-dir "$WORK/one-$mode" "${extra[@]}")"
  echo "$NPROC processes, $mode: $("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
      -m diffusion_fast "${ARGS[@]}" --out-dir "$WORK/many-$mode" "${extra[@]}" 2>/dev/null)"
done
if diff -r -x manifest.jsonl "$WORK/one-invariant" "$WORK/many-invariant" > /dev/null; then
  echo "1 and $NPROC processes (batch-invariant): every image byte-identical"
else
  echo "1 and $NPROC processes (batch-invariant): IMAGES DIFFER"; exit 1
fi
