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
MEDAKV_BUILD_DIR=$build MEDAKV_JOBS=$jobs bash "$root/scripts/build.sh"
ctest --test-dir "$build" --output-on-failure --timeout 600 -j"$jobs" "$@"
