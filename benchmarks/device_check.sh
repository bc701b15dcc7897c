#!/usr/bin/env bash
# The device check, unattended, on a machine with one CUDA GPU and no network (at most 8 minutes):
#
#   1. installs the scipy-openblas32 wheel carried in wheels/ (no index, no network) into a
#      scratch site directory and builds the C extension in place;
#   2. runs the tests marked `gpu`;
#   3. benchmarks/device_check.py: the same choices on cuda and cpu for a narrow streamed
#      checkpoint; a 4-layer Qwen1.5-MoE-A2.7B-width checkpoint compressed on cuda at 32,768
#      calibration tokens (per-layer stage times, peak device memory, peak RSS); the 24-layer,
#      262,144-token projection. One JSON file and one markdown row under benchmarks/results/.
#
# Usage: benchmarks/device_check.sh [--dry-run]
#   --dry-run: the whole script on the CPU with tiny sizes (torch kernels, narrow widths), in
#              under 2 minutes: proves the script before it meets a GPU.
# Environment: MOEI2_WHEELS (folder holding scipy_openblas32-*.whl; default: wheels/ in the
#              checkout, then ../wheels), PYTHON (default: python3), MOEI2_CHECK_OUT (default:
#              benchmarks/results).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "device_check.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done
OUT="${MOEI2_CHECK_OUT:-$ROOT/benchmarks/results}"
STARTED=$(date +%s)
stamp() { echo "[device_check $(( $(date +%s) - STARTED ))s] $*"; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# The dry run proves the script, not speed: torch's OpenMP workers on one thread do not spin
# against the C pool on a small shared CPU machine.
if [ "$DRY_RUN" = 1 ]; then export OMP_NUM_THREADS=1; fi

# ---- 1. OpenBLAS from the carried wheel, then the extension ----
WHEEL=""
for dir in "${MOEI2_WHEELS:-}" "$ROOT/wheels" "$ROOT/../wheels"; do
  [ -n "$dir" ] || continue
  found=$(ls "$dir"/scipy_openblas32-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$found" ]; then WHEEL="$found"; break; fi
done
# The dry run installs the carried wheel even where one is installed: it proves the offline install.
if [ "$DRY_RUN" = 1 ] || ! "$PYTHON" -c "import scipy_openblas32" 2>/dev/null; then
  if [ -z "$WHEEL" ]; then
    echo "device_check.sh: no scipy_openblas32-*.whl in \$MOEI2_WHEELS, wheels/ or ../wheels, and none installed;" \
         "fetch it where there is network: pip download --only-binary=:all: --no-deps scipy-openblas32 -d wheels/" >&2
    exit 2
  fi
  SITE="$ROOT/build/device-check-site"
  stamp "installing $(basename "$WHEEL") into $SITE (no index, no network)"
  rm -rf "$SITE"
  if "$PYTHON" -m pip --version > /dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEEL"
  else  # a wheel is a zip archive laid out as site-packages
    "$PYTHON" -m zipfile -e "$WHEEL" "$SITE"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# Built unless an extension newer than every C source is already in place (a rerun, or the dry run
# of a built checkout); a fresh checkout on the GPU machine has none.
BUILT=$(ls moei2/_core*.so 2>/dev/null | head -n 1 || true)
if [ -n "$BUILT" ] && [ -z "$(find csrc setup.py -newer "$BUILT" -type f 2>/dev/null | head -n 1)" ]; then
  stamp "the C extension is up to date ($BUILT)"
else
  stamp "building the C extension"
  mkdir -p build
  MOEI2_BLAS=wheel "$PYTHON" setup.py -q build_ext --inplace -j "$(nproc)" > build/device-check-build.log 2>&1 \
    || { tail -n 30 build/device-check-build.log >&2; exit 1; }
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import moei2._core, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# ---- 2. the gpu tests ----
if [ "$DRY_RUN" = 1 ]; then
  stamp "dry run: collecting the gpu tests (they are skipped without CUDA)"
  "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs | tail -n 3
else
  stamp "running the gpu tests"
  # A failure is recorded in the JSON, not fatal: the measurements still run.
  set +e
  timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rfs 2>&1 | tail -n 25
  export MOEI2_GPU_TESTS_RC="${PIPESTATUS[0]}"
  set -e
  stamp "gpu tests: exit status $MOEI2_GPU_TESTS_RC"
fi

# ---- 3. same choices, the 4-layer run, the projection ----
mkdir -p "$OUT"
if [ "$DRY_RUN" = 1 ]; then
  stamp "dry run of benchmarks/device_check.py"
  "$PYTHON" benchmarks/device_check.py --dry-run --quiet --json "$OUT/device_check_dry_run.json" \
    --markdown "$OUT/device_check_dry_run.md"
else
  stamp "benchmarks/device_check.py on cuda"
  "$PYTHON" benchmarks/device_check.py --device cuda --dtype bfloat16 --layers 4 --tokens 32768 \
    --json "$OUT/device_check.json" --markdown "$OUT/device_check.md"
fi
stamp "done"
