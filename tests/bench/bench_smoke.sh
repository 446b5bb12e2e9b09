#!/usr/bin/env bash
# Smoke run of the benchmark harnesses (CI runs no benchmark beyond
# this): each runs on a tiny shape and must print its table. No figure is
# checked; speed is measured by hand (bench/README.md).
# Usage: bench_smoke.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build="$1"
src="$2"
out="$(mktemp -d /tmp/medakv-bench-smoke.XXXXXX)"
trap 'rm -rf "$out"' EXIT
fail() { echo "bench_smoke: $*" >&2; exit 1; }

OMP_WAIT_POLICY=passive "$build/bench/medakv_ops_bench" --benchmark_min_time=0.01 \
  --benchmark_filter='DotTile|Gather/1024|MergeAverage/1024|AttentionStats/1024|Select/4096|Sgemm.*1024' \
  >"$out/ops.txt" 2>&1 || { cat "$out/ops.txt"; fail "medakv_ops_bench failed"; }
for name in BM_DotTile/ BM_DotTileScalar BM_Gather/1024 BM_MergeAverage/1024 BM_AttentionStats/1024 BM_Select/4096; do
  grep -q "$name" "$out/ops.txt" || { cat "$out/ops.txt"; fail "medakv_ops_bench printed no $name row"; }
done
if grep -q ERROR "$out/ops.txt"; then cat "$out/ops.txt"; fail "a benchmark reported an error"; fi
echo "ops_bench: ok ($(grep -c '^BM_' "$out/ops.txt") rows)"

"$build/bench/medakv_ingest_bench" --layers=1 --kv_heads=2 --tokens=512 --head_dim=64 --chunk_mib=1 \
  --repeats=1 >"$out/ingest.txt" 2>&1 || { cat "$out/ingest.txt"; fail "medakv_ingest_bench failed"; }
grep -q 'TCP copy' "$out/ingest.txt" || { cat "$out/ingest.txt"; fail "medakv_ingest_bench printed no TCP copy row"; }
echo "ingest_bench: ok"

bash "$src/bench/stages.sh" --build "$build" --tokens 256 --rhos 0.2 --layers 2 >"$out/stages.txt" 2>&1 \
  || { cat "$out/stages.txt"; fail "bench/stages.sh failed"; }
grep -q '^| 256 | 0.2 | 64 |' "$out/stages.txt" || { cat "$out/stages.txt"; fail "bench/stages.sh printed no row"; }
echo "stages.sh: ok"
