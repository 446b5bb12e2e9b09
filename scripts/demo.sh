#!/usr/bin/env bash
# Builds medakv (CPU backend; CUDA code too when nvcc is found) and runs the
# compressor on a generated multimodal cache. Until the gRPC service lands
# (issue 5), this is the command that shows the project working.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MEDAKV_BUILD_DIR:-$root/build}
bash "$root/scripts/install-deps.sh"
launcher=()
if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache); fi
cmake -S "$root" -B "$build" -G Ninja "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)" --target medakv
out=${MEDAKV_DEMO_DIR:-$(mktemp -d)}
"$build/client/cli/medakv" synth -o "$out/cache.safetensors" --layers 8 --kv-heads 4 --q-heads 16 --tokens 2048 --head-dim 64 --q-tokens 64
"$build/client/cli/medakv" compress "$out/cache.safetensors" -o "$out/compressed.safetensors" --policy meda --rho 0.2 -v
echo "files in $out"
