#!/usr/bin/env bash
# libFuzzer runs of the fuzz targets in tests/fuzz. Usage:
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds build-fuzz/ with Debian's clang (clang-14, libFuzzer from
# libclang-rt-14-dev): the project's libraries with
# -fsanitize=fuzzer-no-link,address,undefined, the targets with
# -fsanitize=fuzzer; CPU backend only, no tests, no benchmarks, OpenMP off
# (one thread per input: results do not depend on it, and libgomp's threads
# would only blur the coverage signal). Clang builds against Debian's
# libstdc++-built gRPC, protobuf and Abseil as GCC does.
#
# Then runs every target (default: all four) for SECONDS (default 60) over a
# copy of its seed corpus tests/fuzz/corpus/<target>/ (the checked-in corpus
# is never written to), with -timeout=10 -rss_limit_mb=2048 -detect_leaks=1.
# Any crash, sanitizer report, leak, timeout or out-of-memory fails the run;
# the input that caused it is left in build-fuzz/fuzz-run/<target>/artifacts/
# and the log in build-fuzz/fuzz-run/<target>/log. A summary table gives each
# target's executions (stat::number_of_executed_units).
#
# MEDAKV_FUZZ_BUILD_DIR overrides the build directory; MEDAKV_FUZZ_ARGS adds
# libFuzzer flags to every run (e.g. "-jobs=1 -dict=..."); tests/fuzz/README.md
# says how to run one target longer and how to add to a corpus.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=${MEDAKV_JOBS:-$(nproc)}
build=${MEDAKV_FUZZ_BUILD_DIR:-$root/build-fuzz}
all_targets=(fuzz_header fuzz_assembler fuzz_safetensors fuzz_shm)

seconds=${1:-60}
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: $0 [SECONDS] [TARGET...]   (targets: ${all_targets[*]})" >&2
  exit 2
fi
targets=("$@")
[ "${#targets[@]}" -ne 0 ] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  if [ ! -d "$root/tests/fuzz/corpus/$t" ]; then
    echo "fuzz: unknown target '$t' (targets: ${all_targets[*]})" >&2
    exit 2
  fi
done

bash "$root/scripts/install-deps.sh"

# clang and libFuzzer's runtime (not in install-deps.sh's list yet).
if ! command -v clang++ >/dev/null 2>&1 || ! command -v clang >/dev/null 2>&1; then
  echo "fuzz: clang/clang++ not found (Debian packages: clang-14 libclang-rt-14-dev)" >&2
  exit 1
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
cat >"$probe/probe.cc" <<'EOF'
#include <fuzzer/FuzzedDataProvider.h>
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider p(data, size);
  (void)p.ConsumeBool();
  return 0;
}
EOF
if ! clang++ -fsanitize=fuzzer,address,undefined "$probe/probe.cc" -o "$probe/probe" >"$probe/log" 2>&1; then
  cat "$probe/log" >&2
  echo "fuzz: clang++ cannot link a libFuzzer target (Debian package: libclang-rt-14-dev)" >&2
  exit 1
fi

launcher=()
if command -v ccache >/dev/null 2>&1; then
  export CCACHE_DIR=${CCACHE_DIR:-/var/cache/medakv-ccache}
  mkdir -p "$CCACHE_DIR" 2>/dev/null || true
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
link_flags="-fsanitize=address,undefined"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja "${launcher[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMEDAKV_ENABLE_CUDA=OFF -DMEDAKV_BUILD_BENCH=OFF -DMEDAKV_BUILD_TESTS=OFF -DMEDAKV_BUILD_FUZZ=ON \
  -DMEDAKV_USE_OPENMP=OFF \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="$link_flags" -DCMAKE_SHARED_LINKER_FLAGS="$link_flags"
cmake --build "$build" -j"$jobs" --target "${targets[@]}"

# Sanitizer reports end the process (libFuzzer then saves the input); leaks
# are checked after every input that allocated more than it freed.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_init_order=1:check_initialization_order=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
read -r -a extra_args <<<"${MEDAKV_FUZZ_ARGS:-}"
pattern='ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error: '
pattern+='|SUMMARY: (Address|Leak|UndefinedBehavior)Sanitizer|==[0-9]+== ERROR'

rc=0
rows=()
for t in "${targets[@]}"; do
  run="$build/fuzz-run/$t"
  rm -rf "$run"
  mkdir -p "$run/corpus" "$run/artifacts"
  cp -R "$root/tests/fuzz/corpus/$t/." "$run/corpus/"
  seeds=$(find "$run/corpus" -type f | wc -l)
  echo "fuzz: $t: ${seconds} s over $seeds seed inputs"
  dict=()
  [ ! -f "$root/tests/fuzz/$t.dict" ] || dict=(-dict="$root/tests/fuzz/$t.dict")
  t_rc=0
  (cd "$run" && "$build/tests/fuzz/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -detect_leaks=1 -print_final_stats=1 -artifact_prefix="$run/artifacts/" "${dict[@]}" "${extra_args[@]}" \
    "$run/corpus") >"$run/log" 2>&1 || t_rc=$?
  if [ "$t_rc" -eq 0 ] && grep -Eq "$pattern" "$run/log"; then t_rc=1; fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$run/log" | tail -n 1)
  per_s=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$run/log" | tail -n 1)
  units=$(find "$run/corpus" -type f | wc -l)
  if [ "$t_rc" -eq 0 ]; then
    status=ok
  else
    status="FAILED (exit $t_rc)"
    rc=1
    echo "fuzz: $t FAILED; log: $run/log; inputs: $run/artifacts/" >&2
    grep -En -m 20 "$pattern" "$run/log" >&2 || tail -n 40 "$run/log" >&2
    ls -l "$run/artifacts" >&2 || true
  fi
  rows+=("$(printf '%-18s %-18s %12s %10s %8s -> %-8s' "$t" "$status" "${execs:-?}" "${per_s:-?}" "$seeds" "$units")")
done

echo
printf '%-18s %-18s %12s %10s %8s    %-8s\n' target status execs "execs/s" corpus "(after)"
for row in "${rows[@]}"; do echo "$row"; done
if [ "$rc" -ne 0 ]; then
  echo "fuzz: FAILED" >&2
else
  echo "fuzz: all ${#targets[@]} targets ran ${seconds} s without a finding"
fi
exit "$rc"
