#!/usr/bin/env bash
# Sanitizer builds and test runs. Usage:
#   scripts/sanitize.sh asan|tsan [ctest args...]
#
# asan: AddressSanitizer + LeakSanitizer + UndefinedBehaviorSanitizer (GCC),
#   every unit and integration test (kernels, service, client, the CLI
#   script), CPU backend only, in build-asan/.
# tsan: ThreadSanitizer (GCC) on the tests whose threads meet in project code
#   without gRPC in between: the cache store's (its concurrent test among
#   them), the admission logic's (AdmissionTest: slots, FIFO queue, the
#   bounded wait's timer thread) and the tokens' reload under lookups
#   (AuthenticatorTest), in build-tsan/. Two things make it
#   meaningful with Debian's uninstrumented libraries:
#   * OpenMP is off (-DMEDAKV_USE_OPENMP=OFF; the CPU ops run serially):
#     libgomp's barriers are invisible to TSan and every parallel loop would
#     be a false report.
#   * Abseil's synchronization is made visible: scripts/tsan_absl_mutex.cc is
#     preloaded into the tests and annotates every absl::Mutex lock, unlock,
#     wait and condition evaluation, and absl::Status's shared reference
#     count (Debian's Abseil is not built with TSan; without it every access
#     under an absl::Mutex is reported as a race: 100+ reports in the store's
#     concurrent test, none with it; with it, removing the lock from
#     CacheStore::Get is reported at once).
#   scripts/tsan.supp suppresses races inside Abseil's own deadlock detector.
#
#   Why not the server's tests (medakv_server_test, SixteenClientsAtOnce):
#   Debian's gRPC is not built with TSan, and the callback API hands a
#   reactor from one gRPC thread to the next (OnReadDone, then the next
#   OnReadDone on another thread) through gRPC core's lock-free queues, which
#   TSan cannot see. Every reactor's state is then reported as racing with
#   itself (measured: 474 reports, all 17 server tests fail, e.g.
#   CacheAssembler::Add in two consecutive OnReadDone calls), and those
#   reports have project frames on both sides, so no suppression can remove
#   them without removing every real report too. A meaningful TSan run of the
#   server needs gRPC (and Abseil) built from source with -fsanitize=thread.
#
# MEDAKV_SANITIZE_BUILD_DIR overrides the build directory.
# Any report fails the run: the sanitizers make the test process fail, and the
# output of every test, passed ones included, is searched for reports
# afterwards (a report from a child process that a test expected to fail
# would otherwise go unnoticed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=${MEDAKV_JOBS:-$(nproc)}

mode=${1:-}
shift || true
build=${MEDAKV_SANITIZE_BUILD_DIR:-$root/build-$mode}
extra=()
ctest_args=()
case "$mode" in
  asan)
    flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
    # With the benchmarks off, "all" is what the tests need: every test and
    # the medakv binary that tests/client/cli_test.sh runs.
    targets=(all)
    ;;
  tsan)
    flags="-fsanitize=thread"
    extra=(-DMEDAKV_USE_OPENMP=OFF)
    # Only these binaries are built, and only these suites run (the server
    # tests in medakv_server_limits_test do not: see "Why not" above). A new
    # concurrency test without gRPC in between goes here: target and suite.
    targets=(medakv_cache_store_test medakv_server_limits_test medakv_security_test medakv_idle_test)
    ctest_args=(-R '^(CacheIdTest|CacheStoreTest|AdmissionTest|AuthenticatorTest|TenantStoreTest|IdleWatchdogTest)\.')
    ;;
  *)
    echo "usage: $0 asan|tsan [ctest args...]" >&2
    exit 2
    ;;
esac

bash "$root/scripts/install-deps.sh"

launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
if [ "$mode" = tsan ]; then
  # The absl::Mutex annotations, preloaded into every test process (and only
  # those: CMake runs test commands and the gtest discovery through the
  # "emulator"). Not instrumented itself; __tsan_acquire/__tsan_release come
  # from the test's TSan runtime.
  mkdir -p "$build"
  shim="$build/libtsan_absl_mutex.so"
  c++ -std=c++20 -O2 -g -fPIC -shared -Wall -Wextra \
    "$root/scripts/tsan_absl_mutex.cc" -o "$shim.tmp"
  mv "$shim.tmp" "$shim"
  extra+=("-DCMAKE_CROSSCOMPILING_EMULATOR=env;LD_PRELOAD=$shim")
fi
cmake -S "$root" -B "$build" -G Ninja "${launcher[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMEDAKV_ENABLE_CUDA=OFF -DMEDAKV_BUILD_BENCH=OFF -DMEDAKV_BUILD_TESTS=ON \
  -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="$flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="$flags" \
  "${extra[@]}"
cmake --build "$build" -j"$jobs" --target "${targets[@]}"

# Sanitizer options: stop at the first ASan/UBSan report (use of a returned
# stack frame included: callbacks that outlive their caller); leaks checked at
# exit; TSan reports every race and then fails the process (exit code 66).
# The suppression files list reports inside third-party libraries only.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1:strict_init_order=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
if [ -f "$root/scripts/lsan.supp" ]; then
  export LSAN_OPTIONS="suppressions=$root/scripts/lsan.supp:print_suppressions=0"
fi
export TSAN_OPTIONS="halt_on_error=0:second_deadlock_stack=1:history_size=4:suppressions=$root/scripts/tsan.supp:print_suppressions=0"

rc=0
ctest --test-dir "$build" --output-on-failure --timeout 900 -j"$jobs" \
  --test-output-size-passed 4000000 --test-output-size-failed 4000000 \
  "${ctest_args[@]}" "$@" || rc=$?

# Reports in the output of tests that passed.
log="$build/Testing/Temporary/LastTest.log"
pattern='ERROR: (AddressSanitizer|LeakSanitizer)|runtime error: |WARNING: ThreadSanitizer|SUMMARY: (Address|Leak|Thread|UndefinedBehavior)Sanitizer'
if [ -f "$log" ] && grep -Eq "$pattern" "$log"; then
  echo "sanitize: $mode: sanitizer reports in the test output ($log):" >&2
  grep -En -m 50 "$pattern" "$log" >&2 || true
  [ "$rc" -ne 0 ] || rc=1
fi
if [ "$rc" -ne 0 ]; then
  echo "sanitize: $mode: FAILED" >&2
else
  echo "sanitize: $mode: no reports"
fi
exit "$rc"
