#!/bin/sh
# Everything behind bench/FIDELITY.md, in order (bench/realmodel/README.md).
# Usage: bench/realmodel/run_all.sh [MEDAKV]   (default build/client/cli/medakv)
# Each step skips what it already did; the logs go to out/logs/.
set -e
cd "$(dirname "$0")"
MEDAKV=${1:-../../build/client/cli/medakv}
PY=.venv/bin/python
mkdir -p out/logs
nice -n 19 $PY dump.py --model smollm2 > out/logs/dump_smollm2.log 2>&1
nice -n 19 $PY evaluate.py --model smollm2 --medakv "$MEDAKV" --crosscheck > out/logs/eval_smollm2.log 2>&1 &
nice -n 19 $PY dump.py --model gemma3 > out/logs/dump_gemma3.log 2>&1
wait
nice -n 19 $PY evaluate.py --model gemma3 --medakv "$MEDAKV" --crosscheck > out/logs/eval_gemma3.log 2>&1
$PY report.py --models smollm2,gemma3
