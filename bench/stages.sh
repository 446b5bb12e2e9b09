#!/usr/bin/env bash
# End to end per stage (bench/README.md, table 2): a medakv-server on loopback
# compresses synthetic caches of a 32-layer, 8-kv-head, head_dim-128 fp16
# model at several lengths T and ratios rho, and this prints the server's own
# stage timings (receive, statistics, allocate, select + merge, send) as a
# markdown table, with the client's round trip, and the receive rate beside a
# memcpy of the request's bytes measured in the same run (the yardstick of
# the data stages; ops_bench gives the compute stages' sgemm yardstick).
#
#   bench/stages.sh                          # T = 1k 4k 16k, rho 0.1 0.2 0.5, 64 query rows
#   bench/stages.sh --tokens "32768" --layers 8
#   bench/stages.sh --q-rows all --tokens "1024 4096"
#
# Options: --tokens "LIST", --rhos "LIST", --layers N (32), --q-rows N|all (64),
# --policy NAME (meda), --no-shm (send bytes over gRPC instead of the
# shared-memory data plane, which the client uses by default while the input
# and the result's bound fit its 1 GiB pool: the "data plane" column says
# which each run used), --build DIR (build), --server BIN, --cli BIN
# (default: the build's), --json FILE (append one JSON object per run),
# --keep (keep the synthetic files in the work directory).
# The machine should be otherwise idle; figures go to bench/README.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tokens_list="1024 4096 16384"
rhos="0.1 0.2 0.5"
layers=32
q_rows=64
policy=meda
shm=()
build="$root/build"
server_bin=""
cli_bin=""
json_out=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) tokens_list="$2"; shift 2 ;;
    --rhos) rhos="$2"; shift 2 ;;
    --layers) layers="$2"; shift 2 ;;
    --q-rows) q_rows="$2"; shift 2 ;;
    --policy) policy="$2"; shift 2 ;;
    --no-shm) shm=(--no-shm); shift ;;
    --build) build="$2"; shift 2 ;;
    --server) server_bin="$2"; shift 2 ;;
    --cli) cli_bin="$2"; shift 2 ;;
    --json) json_out="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "stages.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
server_bin="${server_bin:-$build/service/server/medakv-server}"
cli_bin="${cli_bin:-$build/client/cli/medakv}"
for b in "$server_bin" "$cli_bin"; do
  [ -x "$b" ] || { echo "stages.sh: $b not found: build first (scripts/build.sh)" >&2; exit 1; }
done

# Debian's python3 has numpy (scripts/install-deps.sh); a pyenv one may not.
py=python3
if ! python3 -c 'import numpy' 2>/dev/null; then py=/usr/bin/python3; fi

work="$(mktemp -d /tmp/medakv-stages.XXXXXX)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ "$keep" -eq 0 ]; then rm -rf "$work"; else echo "stages.sh: files kept in $work" >&2; fi
}
trap cleanup EXIT

# The server, on a free port it picks itself (it logs "listening on port N").
"$server_bin" --listen=127.0.0.1:0 --metrics_listen= --max_request_bytes=$((64 << 30)) \
  --host_cache_bytes=$((1 << 30)) >"$work/server.log" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's/.*listening on port \([0-9][0-9]*\).*/\1/p' "$work/server.log")
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$port" ] || { echo "stages.sh: the server did not start:" >&2; cat "$work/server.log" >&2; exit 1; }
addr="127.0.0.1:$port"

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
echo "server: $server_bin ($addr), policy $policy, $layers layers x 8 kv heads (32 query heads) x head_dim 128, fp16${shm:+, --no-shm}"
echo
echo "| T | rho | query rows | KV in (MiB) | data plane | receive | statistics | allocate | select + merge | send | server total | round trip | receive GB/s | memcpy GB/s |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for t in $tokens_list; do
  rows="$q_rows"
  [ "$rows" = "all" ] && rows="$t"
  input="$work/cache_T$t.safetensors"
  "$cli_bin" synth -o "$input" --layers "$layers" --kv-heads 8 --q-heads 32 --tokens "$t" --head-dim 128 \
    --q-tokens "$rows" --dtype float16 >/dev/null
  for rho in $rhos; do
    out="$work/out.safetensors"
    summary="$("$cli_bin" compress "$input" -o "$out" --server "$addr" --policy "$policy" --rho "$rho" --json \
      --no-progress "${shm[@]}")"
    rm -f "$out"
    T="$t" RHO="$rho" ROWS="$rows" SUMMARY="$summary" JSON_OUT="$json_out" "$py" - <<'EOF'
import json, os, time
import numpy as np
s = json.loads(os.environ["SUMMARY"])
sec = s["seconds"]
kv = s["kv_bytes_in"]
# The yardstick: a memcpy of the request's KV bytes into memory already
# touched, same machine, same moment (best of 3).
src = np.ones(kv, dtype=np.uint8)
dst = np.empty_like(src)
np.copyto(dst, src)
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
del src, dst
def f(x):
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.1f} ms"
gbs = lambda seconds: kv / seconds / 1e9 if seconds > 0 else float("inf")
plane = "shared memory" if s.get("shared_memory") else "socket"
print(f"| {os.environ['T']} | {os.environ['RHO']} | {os.environ['ROWS']} | {kv / 2**20:.0f} | {plane} | {f(sec['receive'])} | "
      f"{f(sec['statistics'])} | {f(sec['allocate'])} | {f(sec['select_merge'])} | {f(sec['send'])} | "
      f"{f(sec['total'])} | {f(sec['round_trip'])} | {gbs(sec['receive']):.1f} | {gbs(best):.1f} |", flush=True)
if os.environ.get("JSON_OUT"):
    s.update(tokens=int(os.environ["T"]), query_rows=int(os.environ["ROWS"]), memcpy_seconds=best)
    with open(os.environ["JSON_OUT"], "a") as fh:
        fh.write(json.dumps(s) + "\n")
EOF
  done
  [ "$keep" -eq 1 ] || rm -f "$input"
done
