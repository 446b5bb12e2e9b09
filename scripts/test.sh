#!/usr/bin/env bash
# The test command: installs the dependencies (Debian 12), configures and
# builds everything (the CUDA code too when nvcc is found), runs every test.
# Tests labelled `gpu` skip cleanly on machines without a CUDA device.
# Extra arguments go to ctest (e.g. -L gpu, -R budget).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MEDAKV_BUILD_DIR:-$root/build}
jobs=${MEDAKV_JOBS:-$(nproc)}

bash "$root/scripts/install-deps.sh"

launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S "$root" -B "$build" -G Ninja "${launcher[@]}"
cmake --build "$build" -j"$jobs"
ctest --test-dir "$build" --output-on-failure --timeout 600 -j"$jobs" "$@"
