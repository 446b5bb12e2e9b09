#!/bin/sh
# bench/README.md, table 4: kvpress (SnapKVPress, ObservedAttentionPress) against
# medakv (SNAPKV, H2O; in process and through medakv-server) on the same
# synthetic caches, with the same number of threads. Prints a markdown table
# (also written to $OUT/table.md) and the details under it.
#
#   bench/peer/setup.sh          # once: bench/peer/.venv (torch CPU, kvpress)
#   bench/peer/run.sh            # the full table (T = 1024, 4096, 16384; 3 layers)
#   TOKENS="1024 2048" LAYERS=2 bench/peer/run.sh    # a smoke run
#
# Settings (environment): TOKENS, LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, Q_TOKENS,
# DTYPE (float32: kvpress's CPU path; float16 files are upcast for kvpress),
# RHO, THREADS, REPEATS, WARMUP, OUT, MEDAKV, SERVER, and EXTRA (more flags for
# peer_bench.py run). Caches already in $OUT are reused.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOKENS=${TOKENS:-"1024 4096 16384"}
# 3 layers: at T = 16384 in fp32, 4 layers' input plus result bound (516 + 514
# MiB) exceed the client's 1 GiB shared-memory pool and the "shared memory"
# row would fall back to the socket (the table says so when it happens).
LAYERS=${LAYERS:-3}
KV_HEADS=${KV_HEADS:-8}
Q_HEADS=${Q_HEADS:-32}
HEAD_DIM=${HEAD_DIM:-128}
Q_TOKENS=${Q_TOKENS:-64}
DTYPE=${DTYPE:-float32}
RHO=${RHO:-0.2}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-1}
OUT=${OUT:-$HERE/out}
MEDAKV=${MEDAKV:-$ROOT/build/client/cli/medakv}
SERVER=${SERVER:-$ROOT/build/service/server/medakv-server}
PY=$HERE/.venv/bin/python

[ -x "$PY" ] || { echo "run.sh: no $HERE/.venv: run bench/peer/setup.sh first" >&2; exit 1; }
# The binaries may be missing for a moment while build/ is rebuilt: wait up to 5 minutes.
for b in "$MEDAKV" "$SERVER"; do
  n=0
  while [ ! -x "$b" ]; do
    [ $n -ge 60 ] && { echo "run.sh: $b not found (build medakv first)" >&2; exit 1; }
    [ $n -eq 0 ] && echo "run.sh: waiting for $b" >&2
    n=$((n + 1)); sleep 5
  done
done

mkdir -p "$OUT"
export OMP_NUM_THREADS="$THREADS"
results=""
for T in $TOKENS; do
  cache="$OUT/cache_L${LAYERS}_T${T}_${DTYPE}.safetensors"
  [ -f "$cache" ] || "$MEDAKV" synth -o "$cache" --layers "$LAYERS" --kv-heads "$KV_HEADS" --q-heads "$Q_HEADS" \
      --tokens "$T" --head-dim "$HEAD_DIM" --q-tokens "$Q_TOKENS" --dtype "$DTYPE"
  result="$OUT/result_L${LAYERS}_T${T}_${DTYPE}.json"
  echo "run.sh: T=$T ($LAYERS layers, $THREADS threads, $REPEATS repeats)" >&2
  # shellcheck disable=SC2086
  "$PY" "$HERE/peer_bench.py" run "$cache" --rho "$RHO" --threads "$THREADS" --repeats "$REPEATS" \
      --warmup "$WARMUP" --medakv "$MEDAKV" --server-bin "$SERVER" --out-dir "$OUT" --json "$result" -q $EXTRA
  results="$results $result"
done
# shellcheck disable=SC2086
"$PY" "$HERE/peer_bench.py" table $results --details | tee "$OUT/table.md"
