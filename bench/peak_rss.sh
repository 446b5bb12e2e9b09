#!/usr/bin/env bash
# Peak server memory per Compress request (bench/README.md, "Memory per
# request"): for each case a fresh medakv-server (CPU backend) gets exactly
# one `medakv compress --server` of a synthetic cache, and the growth of its
# memory during the call is reported as a multiple of the request's tensor
# bytes (keys, values and queries). The target is at most 2x for a
# store-less Compress.
# Two measures: the peak of RssAnon (the server's private memory, sampled
# every 10 ms) minus its value before the call, and the growth of VmHWM (the
# kernel's exact peak of the whole resident set, which with shared memory
# also counts the client's pages that the server touches in the region).
#   bench/peak_rss.sh [--build DIR] [--out DIR] [CASE...]
# A CASE is POLICY:TOKENS:DATA_PLANE, e.g. meda:1024:socket or snapkv:8192:shm;
# the cache is 32 layers, 8 kv heads, 32 query heads x 64 rows, head_dim 128,
# fp16 (the shape of bench/README.md's end-to-end tables), rho 0.2.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build out=""
cases=()
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) cases+=("$1"); shift ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || cases=(meda:1024:socket meda:1024:shm snapkv:1024:socket meda:4096:socket meda:4096:shm
                                 snapkv:4096:socket snapkv:8192:socket snapkv:8192:shm)
server_bin=$build/service/server/medakv-server
medakv=$build/client/cli/medakv
for b in "$server_bin" "$medakv"; do
  [ -x "$b" ] || { echo "peak_rss: $b not found (build first: scripts/build.sh)" >&2; exit 1; }
done
out=${out:-$(mktemp -d /tmp/medakv-peak-rss-XXXXXX)}
mkdir -p "$out"

kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$2/status"; }

printf '| policy | tokens | data plane | request MiB | private peak growth MiB | x request | VmHWM growth MiB | x request | result MiB | seconds |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for c in "${cases[@]}"; do
  IFS=: read -r policy tokens plane <<<"$c"
  input=$out/cache-$tokens.safetensors
  if [ ! -f "$input" ]; then
    "$medakv" synth -o "$input" --layers 32 --kv-heads 8 --q-heads 32 --tokens "$tokens" --head-dim 128 \
      --q-tokens 64 >/dev/null
  fi
  # keys + values + queries, fp16
  request=$(( 32 * (2 * 8 * tokens * 128 + 32 * 64 * 128) * 2 ))
  log=$out/server-$c.log
  : >"$log"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$server_bin" --listen=127.0.0.1:0 --metrics_listen= --backend=cpu \
    --max_request_bytes=$((16 << 30)) --host_cache_bytes=$((1 << 30)) 2>"$log" &
  pid=$!
  port=
  for _ in $(seq 200); do
    port=$(sed -n 's/.*listening on port \([0-9][0-9]*\).*/\1/p' "$log")
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "peak_rss: the server did not start: $(cat "$log")" >&2; kill "$pid"; exit 1; }
  # A tiny call first, so that the baseline includes gRPC's and the pool's threads.
  "$medakv" health --server "127.0.0.1:$port" >/dev/null
  before=$(kib VmHWM "$pid")
  anon_before=$(kib RssAnon "$pid")
  (
    peak=0
    while kill -0 "$pid" 2>/dev/null && [ ! -e "$out/stop" ]; do
      a=$(kib RssAnon "$pid" 2>/dev/null || echo 0)
      [ -n "$a" ] && [ "$a" -gt "$peak" ] && peak=$a
      echo "$peak" >"$out/anon-peak"
      sleep 0.01
    done
  ) &
  sampler=$!
  flags=()
  [ "$plane" = socket ] && flags+=(--no-shm)
  t0=$(date +%s%N)
  "$medakv" compress "$input" -o "$out/result.safetensors" --server "127.0.0.1:$port" --policy "$policy" --rho 0.2 \
    "${flags[@]}" >"$out/compress-$c.txt"
  t1=$(date +%s%N)
  after=$(kib VmHWM "$pid")
  touch "$out/stop"
  wait "$sampler"
  rm -f "$out/stop"
  anon_peak=$(cat "$out/anon-peak")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  result=$(stat -c %s "$out/result.safetensors")
  awk -v p="$policy" -v t="$tokens" -v d="$plane" -v r="$request" -v b="$before" -v a="$after" -v o="$result" \
    -v ab="$anon_before" -v ap="$anon_peak" -v t0="$t0" -v t1="$t1" 'BEGIN {
      g = (a - b) * 1024; pa = (ap - ab) * 1024
      printf "| %s | %d | %s | %.0f | %.0f | %.2f | %.0f | %.2f | %.0f | %.1f |\n", p, t, d, r / 1048576,
             pa / 1048576, pa / r, g / 1048576, g / r, o / 1048576, (t1 - t0) / 1e9
    }'
done
