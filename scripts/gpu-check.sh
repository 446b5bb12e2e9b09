#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine (an NVIDIA driver,
# CUDA, CMake and Python, none of this project's Debian packages, no
# network).
#
#   scripts/gpu-check.sh bundle DIR     on a development machine (nvcc needed)
#   DIR/run.sh [OUT]                    on the GPU machine
#
# `bundle` configures and builds (Release, CUDA for sm_90 with the device code
# compressed for size, tests on) the
# `gpu`-labelled test binaries, medakv_gpu_bench, medakv-server and medakv in
# $MEDAKV_GPU_BUILD_DIR (default build-gpu/), strips them, and copies them into
# DIR/bin with every shared library they load that is not part of glibc or the
# NVIDIA driver (DIR/lib), the parity checker (DIR/parity.py) and DIR/run.sh
# (scripts/gpu-check/run.sh). It fails if the bundle is 48 MiB or more.
# run.sh is documented in itself; docs/cuda.md says how to run it and where
# its figures go.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
limit_bytes=$((48 << 20))

usage() {
  echo "usage: $0 bundle DIR" >&2
  exit 2
}
[ "$#" -eq 2 ] && [ "$1" = bundle ] || usage
dir=$2

if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "gpu-check: nvcc not found (CUDA toolkit): the bundle needs the CUDA build" >&2
  exit 1
fi
command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH

# The gpu-labelled tests, from the medakv_add_test calls of tests/ (one list, kept there).
mapfile -t tests < <(cat "$root"/tests/*/CMakeLists.txt | tr '\n' ' ' |
  grep -o 'medakv_add_test([^)]*)' | grep 'LABELS gpu' | sed -E 's/medakv_add_test\(([A-Za-z0-9_]+).*/\1/')
if [ "${#tests[@]}" -eq 0 ]; then
  echo "gpu-check: no gpu-labelled test found in tests/*/CMakeLists.txt" >&2
  exit 1
fi
programs=(medakv_gpu_bench medakv-server medakv)

build=${MEDAKV_GPU_BUILD_DIR:-$root/build-gpu}
MEDAKV_BUILD_DIR=$build bash "$root/scripts/build.sh" \
  -DCMAKE_BUILD_TYPE=Release -DMEDAKV_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=--compress-mode=size \
  -DMEDAKV_BUILD_TESTS=ON -DMEDAKV_BUILD_BENCH=ON -- --target "${tests[@]}" "${programs[@]}"

rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/lib"
for name in "${tests[@]}" "${programs[@]}"; do
  path=$(find "$build" -type f -name "$name" -perm -u+x -print -quit)
  if [ -z "$path" ]; then
    echo "gpu-check: $name was not built in $build" >&2
    exit 1
  fi
  strip --strip-unneeded -o "$dir/bin/$name" "$path"
done
printf '%s\n' "${tests[@]}" >"$dir/tests.txt"

# Shared libraries: everything ldd resolves except glibc's own and the driver's.
is_system() {
  case "$1" in
    linux-vdso.so.*|ld-linux*.so.*|libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libresolv.so.*|\
    libutil.so.*|libanl.so.*|libnsl.so.*|libmvec.so.*|libcuda.so.*|libnvidia-*) return 0 ;;
  esac
  return 1
}
for bin in "$dir"/bin/*; do
  while read -r name _ path _; do
    [ -n "${path:-}" ] && [ "${path#/}" != "$path" ] || continue
    is_system "$name" && continue
    [ -e "$dir/lib/$name" ] || cp -L "$path" "$dir/lib/$name"
  done < <(ldd "$bin" | grep '=>')
done
for lib in "$dir"/lib/*; do
  strip --strip-unneeded "$lib" 2>/dev/null || true
done
missing=$(for bin in "$dir"/bin/*; do LD_LIBRARY_PATH="$dir/lib" ldd "$bin"; done | grep 'not found' | sort -u || true)
if [ -n "$missing" ]; then
  echo "gpu-check: unresolved libraries:" >&2
  echo "$missing" >&2
  exit 1
fi

cp "$root/scripts/gpu-check/run.sh" "$dir/run.sh"
cp "$root/scripts/gpu-check/parity.py" "$dir/parity.py"
chmod +x "$dir/run.sh" "$dir/parity.py"
git -C "$root" rev-parse --short HEAD >"$dir/commit.txt" 2>/dev/null || echo unknown >"$dir/commit.txt"

size=$(du -sb "$dir" | cut -f1)
echo "gpu-check: bundle $dir: ${#tests[@]} gpu test binaries (${tests[*]}), ${programs[*]}," \
  "$(ls "$dir/lib" | wc -l) libraries, $((size >> 20)) MiB ($size bytes)"
if [ "$size" -ge "$limit_bytes" ]; then
  echo "gpu-check: the bundle is $size bytes, over the 48 MiB limit" >&2
  exit 1
fi
