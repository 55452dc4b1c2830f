#!/usr/bin/env bash
# All GPU work of the project in one call, inside a fixed wall-clock budget (default 540 s on an H100/H200):
#
#   phase       what                                                      cap s  reserve s  typical s (H200, estimate)
#   versions    card, driver, clocks, CPU, Python/torch/triton/nvcc, commit    -        -        5
#   wheels      diffusers (+ importlib_metadata) from .whl/ into a site       60        -        5
#   build       the CUDA extension for sm_90a only                           150      390       60
#   verify      `diffusion-fast verify`: kernel x dtype x layout vs float64   60      330       40
#   e2e_sd15    diffusers SD1.5 512^2, CFG, 25 steps, every variant,         180      230      150
#               3 rounds (compiled variants in E2E_SD15_COMPILE_MODE, each
#               capped at E2E_SD15_COMPILE_CAP s; the float32 pipeline as
#               tolerance yardstick)
#   e2e_sdxl    diffusers SDXL 1024^2, CFG, 25 steps, 3 rounds (compile       90      190       45
#               cap E2E_SDXL_COMPILE_CAP, 0 = compiled variants not run)
#   e2e_flux    E2E_EXTRA_MODELS (default flux): diffusers' Flux               60      160       35
#               transformer, random bf16 weights, 1024^2 (4096 image + 512
#               text tokens, 24 heads of 128, rotary), guidance embedding,
#               28 steps, 3 rounds, E2E_FLUX_BLOCKS double,single blocks
#               (default 3,6 of the published 19,38); compile cap 0: the
#               compiled variants are recorded as not run
#   ops         op benchmarks sd15, sdxl, dit (Flux / SD3 joint attention),  105      130       70
#               large, in that order: every backend + auto + baselines,
#               host-issued and graph-replay GPU time, peaks of this card
#               (a run short of time drops the last shapes of large)
#   profile     one SD1.5 UNet forward (diffusers', ours) in a CUDA graph     45      100       25
#               under torch.profiler: GPU time per kernel and per category
#   tests       `pytest -m gpu` (kernels, loop, graphs, the diffusers         120       40       55
#               integration in bf16 and its graph replay), three processes
#               at a time
#   sanitizer   compute-sanitizer memcheck + racecheck on sanitize_cuda.py  2x45       10       40
#   summary     merge the JSON, print the short table LAST                      -        -        5
#                                                                                 typical total ~535 of 540
#
# Each phase gets min(its cap, what is left of the budget minus its reserve for the phases after it); a phase
# with under 10 s left is skipped and says so. Every extra model in E2E_EXTRA_MODELS (flux, sd3; empty: none)
# gets the e2e_flux slot's cap in turn; more than the default needs a larger GPU_CHECK_BUDGET. torch.compile of a full UNet in the recipe's max-autotune mode takes
# many minutes, more than this budget holds: the default plan compiles in "default" mode and every result file
# records the mode that ran (params.compile_mode, compile_mode_requested, attempts) — set
# E2E_SD15_COMPILE_MODE=max-autotune-no-cudagraphs and a larger GPU_CHECK_BUDGET for the full recipe.
#
# Exit status 0 when every phase that ran succeeded. Output under $OUT (at most 8 files come back from a device
# machine): bench.json (every suite, merged),
# verify.json, versions.txt, summary.txt and logs.tar.gz (every log and per-part JSON).
#
# Usage, from a committed tree:
#   bash benchmarks/fetch_wheels.sh                      # here, once: the wheels into .whl/ (ignored by git)
#   GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh        # on the GPU machine (carry .whl)
#   bash benchmarks/gpu_check.sh --smoke                 # CPU smoke run: every phase on tiny shapes (CI)
# Without a GPU the script runs the smoke plan by itself.
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
WORK="$OUT/work"
rm -rf "$WORK"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, whether or not pip installs it
PY="${PYTHON:-python3}"
T0=$(date +%s)
GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2> /dev/null || true)}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
MODE=gpu
if [ "${1:-}" = "--smoke" ] || ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  MODE=smoke
fi
if [ "$MODE" = smoke ]; then
  BUDGET="${GPU_CHECK_BUDGET:-300}"
  DEV=cpu
else
  DEV=cuda
fi
PHASES="$WORK/phases.txt"
: > "$PHASES"

elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[gpu_check +$(elapsed)s] $*"; }
# cap PLANNED RESERVE -> seconds this phase may take (0: skip), leaving RESERVE seconds for the later phases
# (the reserves are the GPU plan's; the smoke plan's phases are short, and only the budget bounds them).
cap() {
  local reserve=$2
  [ "$MODE" = smoke ] && reserve=0
  local left=$(( BUDGET - $(elapsed) - reserve ))
  local t=$(( $1 < left ? $1 : left ))
  [ "$t" -lt 10 ] && t=0
  echo "$t"
}
# phase NAME RC START [NOTE]
phase() { echo "$1 rc=$2 $(( $(date +%s) - $3 ))s ${4:-}" >> "$PHASES"; }

finish() {
  # Keep what comes back small: the merged results, verify, versions, the summary and one archive of the rest.
  cp -f "$WORK/versions.txt" "$OUT/versions.txt" 2> /dev/null
  [ -f "$WORK/verify.json" ] && cp -f "$WORK/verify.json" "$OUT/verify.json"
  [ -f "$WORK/bench.json" ] && cp -f "$WORK/bench.json" "$OUT/bench.json"
  tar czf "$OUT/logs.tar.gz" -C "$OUT" work 2> /dev/null && rm -rf "$WORK"
}
trap finish EXIT

# ------------------------------------------------------------------------------------------------ versions
stamp "versions ($MODE mode, budget ${BUDGET}s)"
S=$(date +%s)
{
  echo "mode $MODE"
  echo "commit ${GIT_COMMIT:-unknown (pass GIT_COMMIT=<sha>: this copy of the tree has no .git)}"
  if [ "$MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,pstate --format=csv
    nvcc --version 2> /dev/null | tail -2
  fi
  grep -m1 "model name" /proc/cpuinfo 2> /dev/null; echo "logical cpus $(nproc 2> /dev/null)"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} > "$WORK/versions.txt" 2>&1
cat "$WORK/versions.txt"
export GIT_COMMIT="${GIT_COMMIT:-}"
phase versions 0 "$S"

# ------------------------------------------------------------------------------------------------ wheels
stamp "wheels"
S=$(date +%s)
WHEEL_NOTE=""
HAVE=$("$PY" -c "import diffusers; print(diffusers.__version__)" 2> /dev/null)
if [ -n "$HAVE" ]; then
  WHEEL_NOTE="diffusers already importable: $HAVE"
elif ls .whl/*.whl > /dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/gpu_check_site"
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl > "$WORK/wheels.log" 2>&1
  export PYTHONPATH="$PYTHONPATH:$SITE"
  WHEEL_NOTE="installed $(ls .whl | tr '\n' ' ')"
else
  WHEEL_NOTE="no diffusers and no .whl/ (run benchmarks/fetch_wheels.sh and carry .whl): e2e records why"
fi
echo "$WHEEL_NOTE"
[ -n "$HAVE" ] || "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" >> "$WORK/versions.txt" 2>&1
[ -n "$HAVE" ] && echo "diffusers $HAVE" >> "$WORK/versions.txt"
phase wheels 0 "$S" "$WHEEL_NOTE"

# ------------------------------------------------------------------------------------------------ build
S=$(date +%s)
if [ "$MODE" = gpu ] && [ "$(cap 150 390)" -eq 0 ]; then
  phase build skipped "$S" "out of time"
elif [ "$MODE" = gpu ]; then
  T=$(cap 150 390)
  stamp "build (sm_90a, cap ${T}s)"
  DIFFUSION_FAST_CUDA_ARCH=90a DIFFUSION_FAST_BUILD_CUDA=1 timeout "$T" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1
  RC=$?
  if [ "$RC" -ne 0 ]; then  # e.g. a pip without editable-install support: build in place instead
    DIFFUSION_FAST_CUDA_ARCH=90a DIFFUSION_FAST_BUILD_CUDA=1 timeout "$(cap 150 390)" \
      "$PY" setup.py build_ext --inplace >> "$WORK/build.log" 2>&1
    RC=$?
  fi
  phase build "$RC" "$S"
else
  phase build 0 "$S" "smoke: not built (the installed package is used)"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$WORK/build.log"
from diffusion_fast.ops import registry
for op in ("group_norm", "attention", "sampler_step"):
    print(op, {k: (v or "ok") for k, v in registry.status(op).items()})
EOF

# ------------------------------------------------------------------------------------------------ verify
S=$(date +%s)
T=$(cap 60 330)
stamp "verify (cap ${T}s)"
if [ "$T" -gt 0 ]; then
  timeout "$T" "$PY" -m diffusion_fast.verify --device "$DEV" --time-limit $(( T * 80 / 100 )) \
    --json "$WORK/verify.json" > "$WORK/verify.log" 2>&1
  phase verify $? "$S"
else
  phase verify skipped "$S" "out of time"
fi

# ------------------------------------------------------------------------------------------------ e2e
# e2e_part NAME MODEL CAP RESERVE EXTRA_ARGS...
e2e_part() {
  local name=$1 model=$2 planned=$3 reserve=$4
  shift 4
  local s t
  s=$(date +%s)
  t=$(cap "$planned" "$reserve")
  stamp "$name: $model (cap ${t}s)"
  if [ "$t" -gt 0 ]; then
    # --time-limit lets the run end itself and write what it measured; timeout is the backstop.
    timeout "$t" "$PY" -m diffusion_fast.bench e2e --device "$DEV" --model "$model" --no-progress --quick-peaks \
      --time-limit $(( t * 85 / 100 )) --json "$WORK/$name.json" "$@" > "$WORK/$name.log" 2>&1
    phase "$name" $? "$s" "$*"
  else
    phase "$name" skipped "$s" "out of time"
  fi
}
# extra_args MODEL -> the e2e arguments of an extra (transformer) model
extra_args() {
  case "$1" in
    flux) echo "--steps ${E2E_FLUX_STEPS:-28} --blocks ${E2E_FLUX_BLOCKS:-3,6}" ;;
    sd3) echo "--steps ${E2E_SD3_STEPS:-28} --blocks ${E2E_SD3_BLOCKS:-8}" ;;
  esac
}
if [ "$MODE" = gpu ]; then
  e2e_part e2e_sd15 sd15 180 230 --dtype bf16 --steps 25 --repeats 3 --fp32-reference \
    --compile-mode "${E2E_SD15_COMPILE_MODE:-default}" --compile-cap "${E2E_SD15_COMPILE_CAP:-100}" \
    --graph-methods "${E2E_SD15_GRAPH_METHODS:-cuda_graph}"
  e2e_part e2e_sdxl sdxl 90 190 --dtype bf16 --steps 25 --repeats 3 \
    --compile-mode "${E2E_SDXL_COMPILE_MODE:-default}" --compile-cap "${E2E_SDXL_COMPILE_CAP:-0}" \
    --graph-methods cuda_graph
  for m in ${E2E_EXTRA_MODELS-flux}; do
    # shellcheck disable=SC2046
    e2e_part "e2e_$m" "$m" 60 160 --dtype bf16 --repeats 3 --compile-cap 0 --graph-methods cuda_graph \
      $(extra_args "$m")
  done
else
  e2e_part e2e_sd15 sd15-tiny 60 60 --threads 1 --steps 4 --repeats 2 --compile-cap 0
  e2e_part e2e_sdxl sdxl-tiny 60 40 --threads 1 --steps 4 --repeats 2 --compile-cap 0
  # The transformer path (meta-device build, shared weights, the ours_* variants recorded as not applying).
  e2e_part e2e_flux flux-tiny 60 20 --threads 1 --steps 4 --repeats 2 --compile-cap 0
fi

# ------------------------------------------------------------------------------------------------ ops
S=$(date +%s)
T=$(cap 105 130)
stamp "ops (cap ${T}s)"
if [ "$T" -gt 0 ]; then
  if [ "$MODE" = gpu ]; then
    timeout "$T" "$PY" -m diffusion_fast.bench ops --device cuda --dtype bf16 --sets sd15,sdxl,dit,large \
      --budget-ms 30 --compile-budget 15 --time-limit $(( T * 80 / 100 )) --no-progress \
      --json "$WORK/ops.json" > "$WORK/ops.log" 2>&1
  else
    timeout "$T" "$PY" -m diffusion_fast.bench ops --device cpu --threads 1 --quick-peaks --budget-ms 5 \
      --no-progress --json "$WORK/ops.json" > "$WORK/ops.log" 2>&1
  fi
  phase ops $? "$S"
else
  phase ops skipped "$S" "out of time"
fi

# ------------------------------------------------------------------------------------------------ profile
S=$(date +%s)
T=$(cap 45 100)
stamp "profile (cap ${T}s)"
if [ "$T" -gt 0 ]; then
  REPLAYS=5
  [ "$MODE" = smoke ] && REPLAYS=1
  timeout "$T" "$PY" benchmarks/profile_step.py --replays "$REPLAYS" --json "$WORK/profile.json" \
    > "$WORK/profile.log" 2>&1
  phase profile $? "$S"
else
  phase profile skipped "$S" "out of time"
fi

# ------------------------------------------------------------------------------------------------ tests
S=$(date +%s)
T=$(cap 120 40)
stamp "GPU tests (cap ${T}s)"
# One pytest process per item: a file, or NAME=file,file,... for files that share a process (fewer start-ups).
TEST_FILES="tests/test_attention_cuda.py tests/test_attention_triton.py tests/test_attention_sdpa.py
  tests/test_group_norm_cuda.py tests/test_group_norm_triton.py tests/test_sampler_step_cuda.py
  tests/test_sampler_step_triton.py tests/test_graph.py tests/test_gpu_loop.py tests/test_pipeline.py
  diffusers=tests/test_diffusers_optimize.py,tests/test_diffusers_dit.py,tests/test_diffusers_fused.py,tests/test_diffusers_scheduler.py
  sampling=tests/test_sample_model_kwargs.py,tests/test_sample_generators.py,tests/test_noise.py,tests/test_sampler_step_slots.py"
ALL_TEST_FILES=$(echo $TEST_FILES | tr ' ' '\n' | sed 's/^[a-z_]*=//' | tr ',' ' ')
mkdir -p "$WORK/tests"
if [ "$T" -gt 0 ] && [ "$MODE" = smoke ]; then
  # Nothing marked gpu runs on a CPU: the smoke run only checks that every file and its gpu tests collect.
  # shellcheck disable=SC2086
  timeout "$T" "$PY" -m pytest -q --no-header -p no:cacheprovider -m gpu --collect-only $ALL_TEST_FILES \
    > "$WORK/tests/collect.log" 2>&1
  RC=$?
  echo "=== collect-only rc=$RC" >> "$WORK/tests/collect.log"
  cat "$WORK/tests/collect.log" > "$WORK/gpu_tests.log"
  phase tests "$RC" "$S" "collect only"
elif [ "$T" -gt 0 ]; then
  # One process per file (a kernel fault poisons its CUDA context and must not fail every later file), three
  # at a time.
  PYTEST_ARGS="-q --no-header -rf -p no:cacheprovider -m gpu"
  export PYTEST_ARGS PY WORK
  echo $TEST_FILES | tr ' ' '\n' | timeout "$T" xargs -P 3 -I{} sh -c \
    'f={}; case $f in *=*) name=${f%%=*}; files=$(echo "${f#*=}" | tr , " ");; *) name=$(basename $f .py); files=$f;;
     esac; log="$WORK/tests/$name.log"; timeout 100 "$PY" -m pytest $PYTEST_ARGS $files > "$log" 2>&1;
     echo "=== $name rc=$?" >> "$log"'
  TEST_RC=0
  for f in "$WORK"/tests/*.log; do
    cat "$f" >> "$WORK/gpu_tests.log"
    grep -qE "^=== .* rc=(0|5)$" "$f" || TEST_RC=1  # 5: nothing selected
  done
  phase tests "$TEST_RC" "$S"
else
  phase tests skipped "$S" "out of time"
fi

# ------------------------------------------------------------------------------------------------ sanitizer
S=$(date +%s)
if [ "$MODE" = gpu ] && command -v compute-sanitizer > /dev/null 2>&1; then
  SAN_RC=0
  for tool in memcheck racecheck; do
    T=$(cap 45 10)
    stamp "compute-sanitizer $tool (cap ${T}s)"
    if [ "$T" -gt 0 ]; then
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$T" compute-sanitizer --tool "$tool" --error-exitcode 1 \
        "$PY" benchmarks/sanitize_cuda.py > "$WORK/$tool.log" 2>&1
      rc=$?
    else
      rc=skipped
    fi
    echo "$tool rc=$rc" >> "$WORK/sanitizer.txt"
    [ "$rc" != 0 ] && SAN_RC=1
  done
  phase sanitizer "$SAN_RC" "$S"
else
  phase sanitizer skipped "$S" "no GPU or no compute-sanitizer"
fi

# ------------------------------------------------------------------------------------------------ summary
S=$(date +%s)
# ops first: the merged document keeps the first part's peaks, and the op suite measures them in full.
# Then the e2e parts in the order they ran (sd15, sdxl, the extra models).
PARTS=$(for f in "$WORK"/ops.json "$WORK"/e2e_sd15.json "$WORK"/e2e_sdxl.json "$WORK"/e2e_*.json; do
  [ -f "$f" ] && echo "$f"; done | awk '!seen[$0]++' | tr '\n' ' ')
if [ -n "$PARTS" ]; then
  # shellcheck disable=SC2086
  timeout 30 "$PY" -m diffusion_fast.bench merge $PARTS --json "$WORK/bench.json" > "$WORK/merge.log" 2>&1
  phase merge $? "$S"
fi
{
  echo "=================================== summary ($MODE, $(elapsed)s of ${BUDGET}s) ==================================="
  grep -vE "^(mode|logical)" "$WORK/versions.txt" | head -12
  echo "$WHEEL_NOTE"
  grep -E "^(group_norm|attention|sampler_step) " "$WORK/build.log"
  echo "--- phases (rc, seconds)"; cat "$PHASES"
  echo "--- GPU tests"; grep -hE "^=== .* rc=|(passed|failed|skipped|error|deselected|collected).* in [0-9.]+s" \
    "$WORK/gpu_tests.log" 2> /dev/null | head -24
  grep -hE "^(FAILED|ERROR)" "$WORK/gpu_tests.log" 2> /dev/null | head -10
  echo "--- sanitizers"; cat "$WORK/sanitizer.txt" 2> /dev/null
  grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$WORK"/memcheck.log "$WORK"/racecheck.log 2> /dev/null
  echo "--- verify"; grep -E "^(FAIL|ok|error|cpu|cuda)" "$WORK/verify.log" 2> /dev/null | head -12
  echo "--- one UNet forward in a CUDA graph, by kernel category"
  grep -E "^[a-z_]+: .* ms per forward|^  [a-z_]+ +[0-9.]+ ms" "$WORK/profile.log" 2> /dev/null | head -16
  if [ -f "$WORK/bench.json" ]; then
    echo "--- benchmarks"; "$PY" -m diffusion_fast.bench show "$WORK/bench.json" 2>&1 | tail -90
  else
    echo "--- benchmarks: no results file; the last lines of each log:"
    for f in "$WORK"/e2e_*.log "$WORK"/ops.log; do [ -f "$f" ] && { echo "$f"; tail -5 "$f"; }; done
  fi
} > "$WORK/summary.txt" 2>&1
cp -f "$WORK/summary.txt" "$OUT/summary.txt"
cat "$WORK/summary.txt"
# Exit 1 when a phase failed (and, in the smoke run, when one ran out of time): CI runs the smoke plan.
if grep -vqE " rc=(0|skipped) " "$PHASES" || { [ "$MODE" = smoke ] && grep -q "out of time" "$PHASES"; }; then
  exit 1
fi
