#!/usr/bin/env bash
# The one CMake configure and build of medakv: scripts/test.sh (so CI) and the
# container image (deploy/docker/Dockerfile) call it. Configures with Ninja
# (ccache when found; the CUDA code too when nvcc is found) into
# $MEDAKV_BUILD_DIR (default build/) and builds with $MEDAKV_JOBS jobs
# (default nproc). Does not install dependencies: run scripts/install-deps.sh
# first.
#   scripts/build.sh [CONFIGURE_ARG...] [-- BUILD_ARG...]
# e.g. scripts/build.sh -DMEDAKV_BUILD_TESTS=OFF -- --target medakv-server medakv
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MEDAKV_BUILD_DIR:-$root/build}
jobs=${MEDAKV_JOBS:-$(nproc)}

configure_args=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  configure_args+=("$1")
  shift
done
if [ "$#" -gt 0 ]; then shift; fi  # the "--"

launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S "$root" -B "$build" -G Ninja "${launcher[@]}" "${configure_args[@]}"
cmake --build "$build" -j"$jobs" "$@"
