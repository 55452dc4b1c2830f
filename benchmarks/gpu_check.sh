#!/usr/bin/env bash
# All GPU work of the project in one call (about 8 minutes at most on an H100/H200):
#   1. card, driver, Python, torch, triton, nvcc versions and the commit;
#   2. build the CUDA extension for sm_90a only;
#   3. GPU tests: every Triton and CUDA kernel against the reference, CUDA graphs, the loop on the device;
#   4. op benchmarks (sd15, sdxl, large) and the SD1.5-shaped end-to-end run, against the card's measured
#      copy bandwidth and bf16 matmul rate and the baselines, in the same run;
#   5. compute-sanitizer memcheck and racecheck on one small call of each CUDA kernel;
#   6. logs and JSON under $OUT, a short summary printed last.
# Usage: GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh      (OUT defaults to ./gpu_check_out)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, whether or not pip installs it
PY="${PYTHON:-python3}"
T0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

stamp "versions"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  nvcc --version | tail -2
  echo "commit ${GIT_COMMIT:-unknown}"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

stamp "build (sm_90a)"
DIFFUSION_FAST_CUDA_ARCH=90a DIFFUSION_FAST_BUILD_CUDA=1 timeout "${BUILD_TIMEOUT:-200}" \
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
BUILD_RC=$?
if [ "$BUILD_RC" -ne 0 ]; then  # e.g. a pip without editable-install support: build in place instead
  DIFFUSION_FAST_CUDA_ARCH=90a DIFFUSION_FAST_BUILD_CUDA=1 timeout "${BUILD_TIMEOUT:-200}" \
    "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
  BUILD_RC=$?
fi
stamp "build rc=$BUILD_RC"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/build.log"
from diffusion_fast.ops import registry
for op in ("group_norm", "attention", "sampler_step"):
    print(op, {k: (v or "ok") for k, v in registry.status(op).items()})
EOF

stamp "host overhead per call"
timeout 90 "$PY" benchmarks/host_overhead.py > "$OUT/host_overhead.txt" 2>&1
echo "host_overhead rc=$?" >> "$OUT/host_overhead.txt"

stamp "GPU tests"
# One process per file: a kernel fault poisons its CUDA context, and must not fail every later file.
TEST_RC=0
: > "$OUT/gpu_tests.log"
for f in tests/test_sampler_step_triton.py tests/test_sampler_step_cuda.py tests/test_group_norm_triton.py \
         tests/test_group_norm_cuda.py tests/test_graph.py tests/test_gpu_loop.py tests/test_pipeline.py \
         tests/test_attention_cuda.py tests/test_attention_triton.py; do
  echo "=== $f" >> "$OUT/gpu_tests.log"
  timeout "${TEST_TIMEOUT:-60}" "$PY" -m pytest -q --no-header -rf -p no:cacheprovider -m "gpu" "$f" \
    >> "$OUT/gpu_tests.log" 2>&1
  rc=$?
  echo "=== $f rc=$rc" >> "$OUT/gpu_tests.log"
  [ "$rc" -ne 0 ] && TEST_RC=$rc
done
stamp "GPU tests rc=$TEST_RC"

stamp "benchmarks"
timeout "${BENCH_TIMEOUT:-230}" "$PY" -m diffusion_fast.bench all --device cuda --dtype bf16 \
  --sets sd15,sdxl,large --steps 25 --compile-budget 20 --no-progress --json "$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1
BENCH_RC=$?
stamp "benchmarks rc=$BENCH_RC"

stamp "compute-sanitizer"
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SAN_TIMEOUT:-45}" compute-sanitizer --tool "$tool" \
    --error-exitcode 1 "$PY" benchmarks/sanitize_cuda.py > "$OUT/$tool.log" 2>&1
  echo "$tool rc=$?" >> "$OUT/versions.txt"
done
stamp "done"

echo "=================================== summary ==================================="
grep -vE "^(memcheck|racecheck) rc" "$OUT/versions.txt"
echo "build rc=$BUILD_RC"; grep -E "^(group_norm|attention|sampler_step) " "$OUT/build.log"
echo "--- GPU tests (rc=$TEST_RC)"; grep -E "^=== .* rc=|(passed|failed|skipped|error).* in [0-9.]+s" "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -12; grep -E "^E .*(Sq=|NaN|mismatch|differ)" "$OUT/gpu_tests.log" | head -30
echo "--- host overhead"; head -12 "$OUT/host_overhead.txt"
echo "--- sanitizers"; grep -E "^(memcheck|racecheck) rc" "$OUT/versions.txt"; grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log
echo "--- benchmarks (rc=$BENCH_RC)"; tail -60 "$OUT/bench.log"
