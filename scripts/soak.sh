#!/usr/bin/env bash
# Soak test (not in CI; SECURITY.md, bench/README.md "Soak"): a medakv-server
# under `medakv bench` load from CONCURRENCY workers for DURATION seconds
# (half Compress, a quarter PutCache, a quarter GetCache), its resident set
# sampled every second. Passes when no request failed and the RSS does not
# grow after the warm-up (the first WARMUP seconds): the mean of the last
# tenth of the samples after it exceeds the mean of the first tenth by no more
# than the allowance (--max-growth-mib, 64 MiB by default).
#   scripts/soak.sh [--duration 600] [--concurrency 32] [--warmup 300] [--out DIR]
#                   [--max-growth-mib 64] [--build DIR] [--tokens] [--fixed-mmap-threshold]
#                   [--report-only] [--attacks]
# The warm-up covers the store filling up (seconds) and glibc's allocator
# reaching its steady size, which takes 3-5 minutes at these rates on a
# 2-core machine (measured: the RSS rises by 100-200 MiB to a plateau as
# malloc's dynamic mmap threshold rises and its per-thread arenas keep freed
# memory; bench/README.md "Soak"). --fixed-mmap-threshold runs the server
# with MALLOC_MMAP_THRESHOLD_=131072, so that freed big buffers go back to the
# kernel and the RSS follows live memory. --report-only analyses DIR again
# (for example with another --warmup) without running anything.
# --tokens runs the server with --auth_tokens_file and the clients with a token.
# --attacks also runs hostile clients beside the load for the whole duration
# (the attack loop of tests/client/hostile_test.cc: quadratic requests under a
# 1 s deadline, stalled uploads and downloads, queued headers announcing 2^24
# visual tokens, a PutCache header claiming 1 GiB), with the server at
# --idle_timeout=5s and --max_request_bytes=1GiB; it then also requires the
# RSS to stay under the README's bound (--max_inflight x 1.3 x
# --max_request_bytes + --host_cache_bytes + 64 queued headers of 1 MiB).
# Writes DIR/rss.csv (seconds, rss_kib), DIR/bench-*.json, DIR/server.log and
# DIR/summary.txt; prints the summary.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
duration=600 concurrency=32 warmup=300 out="" max_growth_mib=64 build="$root/build" tokens=0 report_only=0
fixed_mmap=0 attacks=0
while [ $# -gt 0 ]; do
  case $1 in
    --duration) duration=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --max-growth-mib) max_growth_mib=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --tokens) tokens=1; shift ;;
    --report-only) report_only=1; shift ;;
    --fixed-mmap-threshold) fixed_mmap=1; shift ;;
    --attacks) attacks=1; shift ;;
    *) echo "soak: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$concurrency" -lt 4 ] || [ "$warmup" -ge "$duration" ]; then
  echo "soak: need --concurrency >= 4 and --warmup < --duration" >&2
  exit 2
fi
report() {
python3 - "$out" "$warmup" "$max_growth_mib" "$bench_failed" "$concurrency" "$duration" "$bound_mib" <<'PY'
import csv, json, sys
from pathlib import Path
out, warmup, allowance, bench_failed, concurrency, duration, bound_mib = (
    Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
    int(sys.argv[7]))
rows = [(int(r["seconds"]), int(r["rss_kib"])) for r in csv.DictReader(open(out / "rss.csv"))]

reports = {}
for op in ("compress", "put", "get"):
    try:
        reports[op] = json.load(open(out / f"bench-{op}.json"))
    except (OSError, ValueError) as e:
        reports[op] = e
workers = {op: r["concurrency"] for op, r in reports.items() if isinstance(r, dict)}
if len(workers) == 3:
    concurrency = sum(workers.values())
    duration = int(reports["compress"]["duration_s"])
lines = [f"soak: {concurrency} workers for {duration} s ("
         + ", ".join(f"{op} {n}" for op, n in workers.items()) + f"), RSS sampled {len(rows)} times, "
         f"warm-up {warmup} s"]
# The samples under load after the warm-up (the sampler starts with the server,
# the load a moment later and it ends at `duration`).
after = [kib for s, kib in rows if warmup <= s < duration]
at_warmup = after[0] if after else 0
peak = max(after) if after else 0
final = rows[-1][1] if rows else 0
minutes = []
for m in range(0, rows[-1][0] // 60 + 1 if rows else 0):
    w = [kib for s, kib in rows if m * 60 <= s < (m + 1) * 60]
    if w:
        minutes.append(f"{sum(w) / len(w) / 1024:.0f}")
lines.append("  RSS mean per minute (MiB): " + " ".join(minutes))
ok = bench_failed == 0 and bool(after)
total_ok = total_failed = 0
for op in ("compress", "put", "get"):
    j = reports[op]
    if not isinstance(j, dict):
        lines.append(f"  {op}: no report ({j})")
        ok = False
        continue
    total_ok += j["requests_ok"]
    total_failed += j["requests_failed"]
    lines.append(f"  {op}: {j['requests_ok']} ok, {j['requests_failed']} failed {j['errors'] or ''}, "
                 f"{j['requests_per_s']:.1f} req/s, p50 {j['latency_ms']['p50']:.1f} ms, "
                 f"p99 {j['latency_ms']['p99']:.1f} ms")
w = max(5, len(after) // 10)
first = sum(after[:w]) / max(1, len(after[:w]))
last = sum(after[-w:]) / max(1, len(after[-w:]))
growth_mib = (last - first) / 1024
lines.append(f"  requests: {total_ok} ok, {total_failed} failed")
lines.append(f"  RSS: {rows[0][1] / 1024 if rows else 0:.1f} MiB at start, {at_warmup / 1024:.1f} MiB at {warmup} s; "
             f"after it: mean of the first {w} samples {first / 1024:.1f} MiB, of the last {w} {last / 1024:.1f} MiB "
             f"(growth {growth_mib:+.1f} MiB), peak {peak / 1024:.1f} MiB; {final / 1024:.1f} MiB at the end")
if total_failed:
    ok = False
if growth_mib > allowance:
    ok = False
    lines.append(f"  RSS grew {growth_mib:.1f} MiB after the warm-up, more than the {allowance:.0f} MiB allowed")
if not after:
    lines.append("  no RSS sample after the warm-up")
attacks = out / "attacks.log"
if attacks.exists():
    lines += ["  " + l for l in attacks.read_text().splitlines() if l.startswith(("attacks:", "  "))]
    overall_peak = max((kib for _, kib in rows), default=0) / 1024
    lines.append(f"  RSS peak over the whole run {overall_peak:.0f} MiB; the README's bound {bound_mib} MiB")
    if bound_mib and overall_peak > bound_mib:
        ok = False
lines.append("soak: PASSED" if ok else "soak: FAILED")
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"soak: files in {out}")
sys.exit(0 if ok else 1)
PY
}
if [ "$report_only" -eq 1 ]; then
  [ -n "$out" ] && [ -f "$out/rss.csv" ] || { echo "soak: --report-only needs --out DIR of an earlier run" >&2; exit 2; }
  bench_failed=0 bound_mib=0
  [ -f "$out/bench_failed" ] && bench_failed=$(cat "$out/bench_failed")
  [ -f "$out/bound_mib" ] && bound_mib=$(cat "$out/bound_mib")
  report
  exit $?
fi
server_bin=$build/service/server/medakv-server
medakv=$build/client/cli/medakv
for b in "$server_bin" "$medakv"; do
  [ -x "$b" ] || { echo "soak: $b not found (build first: scripts/build.sh)" >&2; exit 1; }
done
out=${out:-$(mktemp -d /tmp/medakv-soak-XXXXXX)}
mkdir -p "$out"

# The put workers overwrite 8 ids each and the get workers read one each:
# about 9 MiB x (8 x CONCURRENCY/4 + CONCURRENCY/4) stored, reached within the
# warm-up, so that the RSS after it measures leaks, not the store filling up.
# The store holds all of it (no eviction: a get would find its id evicted).
flags=(--listen=127.0.0.1:0 --metrics_listen= --backend=cpu --host_cache_bytes=$((2 << 30))
  --max_inflight=8 --queue_timeout=120s)
bound_mib=0
if [ "$attacks" -eq 1 ]; then
  attacker=$build/tests/client/medakv_hostile_test
  [ -x "$attacker" ] || { echo "soak: $attacker not found (build the tests first)" >&2; exit 1; }
  flags+=(--idle_timeout=5s --max_request_bytes=$((1 << 30)))
  bound_mib=$(( 8 * 1024 * 13 / 10 + 2048 + 64 ))
fi
if [ "$tokens" -eq 1 ]; then
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf '%s soak\n' "$token" >"$out/tokens"
  chmod 600 "$out/tokens"
  flags+=(--auth_tokens_file="$out/tokens")
  export MEDAKV_TOKEN=$token
fi
: >"$out/server.log"  # now, not in the background job: an old log's port must not be read
env_vars=(OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}")
[ "$fixed_mmap" -eq 1 ] && env_vars+=(MALLOC_MMAP_THRESHOLD_=131072)
env "${env_vars[@]}" "$server_bin" "${flags[@]}" 2>"$out/server.log" &
server_pid=$!
sampler_pid=
bench_pids=()
cleanup() {
  for p in "${bench_pids[@]}" $sampler_pid; do kill "$p" 2>/dev/null || true; done
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
trap cleanup EXIT
port=
for _ in $(seq 200); do
  port=$(sed -n 's/.*listening on port \([0-9][0-9]*\).*/\1/p' "$out/server.log")
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$port" ] || { echo "soak: the server did not start: $(cat "$out/server.log")" >&2; exit 1; }
server=127.0.0.1:$port

# RSS every second, from the server's start.
(
  t0=$(date +%s)
  echo "seconds,rss_kib" >"$out/rss.csv"
  while kill -0 "$server_pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status" 2>/dev/null || true)
    [ -n "$rss" ] && echo "$(( $(date +%s) - t0 )),$rss" >>"$out/rss.csv"
    sleep 1
  done
) &
sampler_pid=$!

shape=(--layers 8 --kv-heads 4 --q-heads 16 --tokens 1024 --head-dim 64 --q-tokens 16)
half=$((concurrency / 2)) quarter=$((concurrency / 4))
"$medakv" bench --server "$server" --op compress --concurrency "$half" --duration "$duration" "${shape[@]}" \
  --rho 0.2 --json >"$out/bench-compress.json" 2>"$out/bench-compress.err" &
bench_pids+=($!)
"$medakv" bench --server "$server" --op put --concurrency "$quarter" --duration "$duration" "${shape[@]}" \
  --json >"$out/bench-put.json" 2>"$out/bench-put.err" &
bench_pids+=($!)
"$medakv" bench --server "$server" --op get --concurrency $((concurrency - half - quarter)) --duration "$duration" \
  "${shape[@]}" --json >"$out/bench-get.json" 2>"$out/bench-get.err" &
bench_pids+=($!)
if [ "$attacks" -eq 1 ]; then
  MEDAKV_HOSTILE_ATTACK="$server,$duration" "$attacker" --gtest_filter=HostileTest.AttackLoop \
    >"$out/attacks.log" 2>&1 &
  bench_pids+=($!)
fi
bench_failed=0
for p in "${bench_pids[@]}"; do wait "$p" || bench_failed=1; done
bench_pids=()
sleep 2  # a last sample or two after the load
echo "$bench_failed" >"$out/bench_failed"
echo "$bound_mib" >"$out/bound_mib"
report

