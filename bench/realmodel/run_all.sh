#!/bin/sh
# Everything behind bench/FIDELITY.md, in order (bench/realmodel/README.md).
# Usage: bench/realmodel/run_all.sh [MEDAKV]   (default build/client/cli/medakv)
# Each step skips what it already did; logs go to out/logs/. About 2 hours on
# the 2-core development machine.
set -e
cd "$(dirname "$0")"
MEDAKV=$(realpath "${1:-../../build/client/cli/medakv}")
PY=.venv/bin/python
mkdir -p out/logs
nice -n 19 $PY dump.py --model smollm2 > out/logs/dump_smollm2.log 2>&1
nice -n 19 $PY dump.py --model gemma3 > out/logs/dump_gemma3.log 2>&1
nice -n 19 $PY evaluate.py --model smollm2 --medakv "$MEDAKV" --crosscheck > out/logs/eval_smollm2.log 2>&1
nice -n 19 $PY evaluate.py --model gemma3 --medakv "$MEDAKV" --crosscheck > out/logs/eval_gemma3.log 2>&1
# MEDA variants on SmolLM2's seven prompts up to 2061 tokens.
P=bsd-summary-256,cc0-rewrite-512,apache-qa-1k,services-table-1k,artistic-summary-1536,mpl-qa-2k,dpkg-log-2k
for v in "meda_merge_none:--merge none" "meda_merge_none_tau5:--merge none --tau 5" \
         "meda_merge_none_tau5_no_prior:--merge none --tau 5 --text-prior none"; do
  nice -n 19 $PY evaluate.py --model smollm2 --medakv "$MEDAKV" --prompts $P --policies meda \
      --tag "${v%%:*}" --extra "${v#*:}" > "out/logs/ablate_${v%%:*}.log" 2>&1
done
$PY report.py --models smollm2,gemma3
