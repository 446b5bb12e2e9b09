#!/usr/bin/env bash
# Starts medakv-server with its defaults: gRPC on 0.0.0.0:50051, the CUDA
# backend when a device answers, else the CPU backend. Installs the
# dependencies (Debian 12) and builds first. Extra arguments go to the server
# (e.g. --listen=127.0.0.1:6000 --max_inflight=8; --help lists them all).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MEDAKV_BUILD_DIR:-$root/build}
bash "$root/scripts/install-deps.sh"
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S "$root" -B "$build" -G Ninja "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)" --target medakv-server medakv
exec "$build/service/server/medakv-server" "$@"
