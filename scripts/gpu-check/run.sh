#!/usr/bin/env bash
# The GPU check of a bundle made by scripts/gpu-check.sh: run on a bare Linux
# x86-64 machine with an NVIDIA driver and nothing else from this project.
#
#   run.sh [OUT]        (OUT: where the logs, XML and summary go; default OUT/ beside this file)
#
# 1. finds every library the bundle's programs load (bundle lib/ first);
# 2. prints the GPU (name, memory, driver), or says "no CUDA device" and
#    exits 0 when there is none;
# 3. runs every gpu test binary (gtest XML in OUT/);
# 4. runs medakv_gpu_bench on a 32k-token layer (OUT/gpu_bench.md);
# 5. starts medakv-server --backend=cuda on loopback and compresses a
#    synthetic cache with every policy through it (medakv compress --server)
#    and on the CPU backend (medakv compress), compared by the parity rule of
#    docs/cuda.md (parity.py): from queries, and bit for bit from
#    precomputed statistics;
# 6. writes OUT/summary.txt (tests passed/failed/skipped, bench ratios,
#    parity per policy), stops what it started, exits 1 on any failure.
set -uo pipefail
bundle=$(cd "$(dirname "$0")" && pwd)
out=${1:-$bundle/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export LD_LIBRARY_PATH=$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OMP_WAIT_POLICY=passive
bin=$bundle/bin
summary=$out/summary.txt
: >"$summary"
failures=0
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
}
trap cleanup EXIT

say() { echo "$*" | tee -a "$summary"; }
fail() {
  say "FAIL: $*"
  failures=$((failures + 1))
}

say "gpu-check: bundle of commit $(cat "$bundle/commit.txt" 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm)"

# 1. Libraries.
for program in "$bin"/*; do
  if ldd "$program" 2>&1 | grep -q 'not found'; then
    fail "$(basename "$program"): $(ldd "$program" 2>&1 | grep 'not found' | tr -s ' \t' ' ' | tr '\n' ';')"
  fi
done
if ! "$bin/medakv" --help >/dev/null 2>"$out/medakv-help.err"; then
  fail "medakv --help did not run: $(head -c 300 "$out/medakv-help.err")"
fi
if [ "$failures" -ne 0 ]; then
  say "gpu-check: the bundle does not load here ($failures problems)"
  exit 1
fi
say "libraries: every program loads ($(ls "$bundle/lib" | wc -l) bundled libraries)"

# 2. The device.
gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true)
fi
if [ -z "$gpus" ]; then
  say "no CUDA device (no GPU answers nvidia-smi); nothing to check"
  exit 0
fi
say "device: $gpus"

# 3. The gpu tests.
passed=0 failed=0 skipped=0
while read -r test; do
  [ -n "$test" ] || continue
  timeout 300 "$bin/$test" --gtest_output="xml:$out/$test.xml" >"$out/$test.log" 2>&1
  rc=$?
  if [ ! -f "$out/$test.xml" ]; then
    fail "$test exited $rc without its XML (log: $(tail -c 300 "$out/$test.log" | tr '\n' ' '))"
    continue
  fi
  head=$(grep -m1 '<testsuites' "$out/$test.xml")
  n=$(echo "$head" | sed -E 's/.* tests="([0-9]+)".*/\1/')
  f=$(echo "$head" | sed -E 's/.* failures="([0-9]+)".*/\1/')
  s=$(grep -c '<skipped' "$out/$test.xml" || true)
  passed=$((passed + n - f - s)) failed=$((failed + f)) skipped=$((skipped + s))
  say "test $test: $n tests, $f failed, $s skipped (exit $rc)"
  if [ "$rc" -ne 0 ] || [ "$f" -ne 0 ]; then
    fail "$test: $(grep -m3 -A2 '<failure' "$out/$test.xml" | head -c 600 | tr '\n' ' ')"
  fi
done <"$bundle/tests.txt"
say "tests: $passed passed, $failed failed, $skipped skipped"

# 4. The benchmark.
if timeout 240 "$bin/medakv_gpu_bench" --tokens=32768 >"$out/gpu_bench.md" 2>"$out/gpu_bench.err"; then
  say "bench (T=32768; the last column but one is the ratio to a device-to-device copy):"
  grep '^| ' "$out/gpu_bench.md" | tee -a "$summary"
else
  fail "medakv_gpu_bench: $(tail -c 300 "$out/gpu_bench.err")"
fi

# 5. Parity through the server.
"$bin/medakv-server" --backend=cuda --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --shutdown_grace=2s \
  >"$out/server.log" 2>&1 &
pids+=($!)
port=""
for _ in $(seq 1 300); do
  port=$(sed -nE 's/.*listening on port ([0-9]+).*/\1/p' "$out/server.log" | head -1)
  [ -n "$port" ] && break
  kill -0 "${pids[-1]}" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$port" ]; then
  fail "medakv-server --backend=cuda did not start: $(tail -c 400 "$out/server.log" | tr '\n' ' ')"
else
  say "server: $(grep -m1 'listening on port' "$out/server.log")"
  for kind in queries precomputed; do
    extra=()
    rule=()
    if [ "$kind" = precomputed ]; then
      extra=(--precomputed)
      rule=(--exact)
    fi
    cache=$out/cache-$kind.safetensors
    "$bin/medakv" synth -o "$cache" --layers 6 --kv-heads 4 --q-heads 16 --tokens 4093 --head-dim 128 \
      --q-tokens 64 --dtype bfloat16 "${extra[@]}" --seed 7 >/dev/null
    for policy in amber meda full streaming_llm h2o snapkv pyramidkv look_m; do
      cpu=$out/$kind-$policy.cpu.safetensors
      gpu=$out/$kind-$policy.cuda.safetensors
      if ! "$bin/medakv" compress "$cache" -o "$cpu" --policy "$policy" --rho 0.2 >"$out/$kind-$policy.cpu.log" 2>&1; then
        fail "$kind $policy on the CPU: $(tail -c 300 "$out/$kind-$policy.cpu.log")"
        continue
      fi
      if ! "$bin/medakv" compress "$cache" -o "$gpu" --policy "$policy" --rho 0.2 --server "127.0.0.1:$port" \
          >"$out/$kind-$policy.cuda.log" 2>&1; then
        fail "$kind $policy through the server: $(tail -c 300 "$out/$kind-$policy.cuda.log")"
        continue
      fi
      line=$(python3 "$bundle/parity.py" "$cpu" "$gpu" "${rule[@]}" 2>&1)
      rc=$?
      say "parity $kind $policy: ${line#parity: }"
      [ "$rc" -eq 0 ] || fail "parity $kind $policy"
    done
  done
fi

cleanup
pids=()
say "gpu-check: $failures failures"
[ "$failures" -eq 0 ]
