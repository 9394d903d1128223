#!/usr/bin/env bash
# The whole GPU check in one command, for a CUDA machine without network (torch, triton, timm, scipy and
# transformers preinstalled): build the extension, run every test on cuda, run compute-sanitizer on the CUDA
# solver, run every benchmark. Logs and results go to OUTDIR; the exit status is non-zero if any step failed.
#
#   bench/gpu_suite.sh OUTDIR                 # every stage
#   bench/gpu_suite.sh OUTDIR tests bench     # some stages (build always runs first; it is quick when done)
# Stages: tests, sanitizer, bench. Run them as separate commands where one command has a time limit, and split a
# stage further with PYTEST_ARGS (e.g. "tests/ops" then "tests --ignore=tests/ops") and BENCH_ARGS (e.g.
# "--only attention qkv_projection"), which replace the default selection; both are split at spaces (no quoting).
# Under a 10-minute limit per command, in this order (fix what fails before timing anything):
#   PYTEST_ARGS="tests/ops" bench/gpu_suite.sh "$OUT" tests
#   PYTEST_ARGS="tests --ignore=tests/ops" bench/gpu_suite.sh "$OUT" tests
#   bench/gpu_suite.sh "$OUT" sanitizer
#   BENCH_ARGS="--only linear_assignment box_ops" bench/gpu_suite.sh "$OUT" bench
#   BENCH_ARGS="--only attention qkv_projection train_step" bench/gpu_suite.sh "$OUT" bench
#   BENCH_ARGS="--only mask_loss upsample_add segmentation" bench/gpu_suite.sh "$OUT" bench
#   BENCH_ARGS="--only inference postprocess segmentation_data detr_family" bench/gpu_suite.sh "$OUT" bench
# then commit OUT's results/ under bench/results/ (the suite writes the device name and date into each file).
set -uo pipefail
OUT=$(mkdir -p "${1:?usage: bench/gpu_suite.sh OUTDIR [tests] [sanitizer] [bench]}" && cd "$1" && pwd)
shift
STAGES=${*:-tests sanitizer bench}
wants() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${DETR_FAST_GPU_VENV:-${TMPDIR:-/tmp}/detr_fast_gpu_venv}
failed=()

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record failure
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED rc=$? ($((SECONDS - start)) s): tail of $OUT/$name.log"
        tail -n 30 "$OUT/$name.log" | sed 's/^/   | /'
        failed+=("$name")
    fi
}

{ nvidia-smi; echo; git log -1 --oneline 2>/dev/null; git status --short 2>/dev/null; } >"$OUT/machine.txt" 2>&1

# The machine's packages plus this project, editable, built against the installed torch (no network needed).
[ -x "$VENV/bin/python" ] || step venv "$PYTHON" -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
step build "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
# Fails when the extension was built without its CUDA solver (no nvcc found): the tests would then measure the
# reference solver on CUDA tensors.
step import "$PY" -c "import torch; from detr_fast.dispatch import describe, EXTENSION_KERNELS; print(describe()); print(torch.__version__, torch.cuda.get_device_name()); assert 'cuda' in EXTENSION_KERNELS['linear_assignment'], 'the extension has no CUDA solver'"

if wants tests; then
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
    step tests env DETR_FAST_TEST_DEVICE=cuda "$PY" -m pytest -q -ra --durations=25 --junitxml="$OUT/tests.xml" \
        ${PYTEST_ARGS:-}
fi

if wants sanitizer; then
    if command -v compute-sanitizer >/dev/null; then
        # Without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees accesses past
        # the end of a buffer and initcheck sees reads of memory no kernel wrote.
        for tool in memcheck racecheck synccheck initcheck; do
            step "sanitizer-$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
                --error-exitcode 1 "$PY" tests/ops/sanitize_linear_assignment.py
        done
    else
        echo "== sanitizer: compute-sanitizer not found" | tee "$OUT/sanitizer.log"
        failed+=("sanitizer")
    fi
fi

if wants bench; then
    # A target that FAILs fails this step too (bench.log holds its line); the results are written either way.
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    step bench "$PY" bench/suite.py --device cuda --out "$OUT/results" ${BENCH_ARGS:-}
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
