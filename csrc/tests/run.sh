#!/usr/bin/env bash
# Builds and runs the C unit tests of the kernels: every csrc/tests/test_*.c is linked with every
# kernel source (csrc/*.c; the Python glue lives in csrc/glue/).
#   csrc/tests/run.sh            optimised build
#   csrc/tests/run.sh sanitize   AddressSanitizer + UndefinedBehaviorSanitizer
# BLAS flags come from MOEI2_TEST_CFLAGS/MOEI2_TEST_LIBS, else from the scipy-openblas32 wheel of
# the active Python, else from pkg-config.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
csrc="$(dirname "$here")"
mode="${1:-normal}"
out="$here/bin/$mode"
mkdir -p "$out"

if [[ -n "${MOEI2_TEST_LIBS:-}" ]]; then
    blas_cflags="${MOEI2_TEST_CFLAGS:-}"
    blas_libs="$MOEI2_TEST_LIBS"
elif python3 -c "import scipy_openblas32" 2>/dev/null; then
    inc="$(python3 -c 'import scipy_openblas32 as s; print(s.get_include_dir())')"
    lib="$(python3 -c 'import scipy_openblas32 as s; print(s.get_lib_dir())')"
    name="$(python3 -c 'import scipy_openblas32 as s; print(s.get_library())')"
    blas_cflags="-I$inc -DBLAS_SYMBOL_PREFIX=scipy_"
    blas_libs="-L$lib -l$name -Wl,-rpath,$lib"
else
    blas_cflags="$(pkg-config --cflags openblas lapacke)"
    blas_libs="$(pkg-config --libs openblas lapacke)"
fi

cflags="-std=c11 -Wall -Wextra -Werror -Wno-unused-parameter -Wno-unused-function -I$csrc $blas_cflags"
case "$mode" in
    normal) cflags="$cflags -O2 -g" ;;
    sanitize) cflags="$cflags -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" ;;
    *) echo "unknown mode $mode (normal|sanitize)" >&2; exit 2 ;;
esac

kernels=()
for f in "$csrc"/*.c; do
    kernels+=("$f")
done

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
failed=0; total=0
for t in "$here"/test_*.c; do
    name="$(basename "$t" .c)"
    # shellcheck disable=SC2086
    gcc $cflags -o "$out/$name" "$t" "${kernels[@]}" $blas_libs -lm -lpthread
    total=$((total + 1))
    if ! "$out/$name"; then
        echo "FAILED: $name ($mode)" >&2
        failed=$((failed + 1))
    fi
done
echo "C unit tests ($mode): $((total - failed)) passed, $failed failed"
[[ $failed -eq 0 ]]
