#!/usr/bin/env bash
# Line coverage of the arithmetic shared by the CPU backend and the CUDA
# kernels (kernels/ops/*_math.h, kernels/common/dtype.h and tensor.h) by the
# CPU tests: builds the kernel tests with gcov instrumentation in
# build-coverage/, runs them, and prints gcov's per-file summary.
#   scripts/coverage.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MEDAKV_COVERAGE_BUILD_DIR:-$root/build-coverage}
jobs=${MEDAKV_JOBS:-$(nproc)}
bash "$root/scripts/install-deps.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DMEDAKV_ENABLE_CUDA=OFF \
  -DMEDAKV_BUILD_BENCH=OFF -DMEDAKV_USE_OPENMP=OFF \
  -DCMAKE_CXX_FLAGS="--coverage -O0" -DCMAKE_EXE_LINKER_FLAGS="--coverage" >/dev/null
tests=(medakv_dtype_test medakv_shared_math_test medakv_attention_stats_test medakv_budget_test
       medakv_select_test medakv_merge_test medakv_reduce_scores_test)
cmake --build "$build" -j"$jobs" --target "${tests[@]}"
find "$build" -name '*.gcda' -delete
for t in "${tests[@]}"; do "$build/tests/kernels/$t" >/dev/null; done
# gcov over every object of the CPU kernels and the tests, keeping the
# shared headers' lines; a line counts as covered when any object ran it.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
i=0
while IFS= read -r -d '' gcda; do
  i=$((i + 1))
  mkdir -p "$tmp/$i"
  (cd "$tmp/$i" && gcov -p -o "$(dirname "$gcda")" "$gcda" >/dev/null 2>&1 || true)
done < <(find "$build/kernels" "$build/tests/kernels" -name '*.gcda' -print0)
python3 - "$tmp" "$root" <<'PY'
import collections, os, sys
tmp, root = sys.argv[1], sys.argv[2]
wanted = ("kernels#ops#", "kernels#common#dtype.h", "kernels#common#tensor.h")
lines = collections.defaultdict(dict)  # file -> line -> covered
paths = [os.path.join(d, n) for d, _, files in os.walk(tmp) for n in files]
for path in paths:
    name = os.path.basename(path)
    if not name.endswith(".gcov") or not any(w in name for w in wanted):
        continue
    src = None
    for row in open(path, errors="replace"):
        parts = row.split(":", 2)
        if len(parts) < 3:
            continue
        count, num = parts[0].strip(), parts[1].strip()
        if num == "0" and parts[2].startswith("Source:"):
            src = os.path.relpath(parts[2][len("Source:"):].strip(), root)
            continue
        if src is None or count == "-":
            continue
        n = int(num)
        hit = not count.startswith("#") and not count.startswith("=")
        lines[src][n] = lines[src].get(n, False) or hit
total = covered = 0
print(f"{'file':45} {'lines':>6} {'covered':>8}")
for f in sorted(lines):
    if not (f.startswith("kernels/ops/") and f.endswith("_math.h")) and f not in ("kernels/common/dtype.h", "kernels/common/tensor.h"):
        continue
    n, c = len(lines[f]), sum(lines[f].values())
    total += n; covered += c
    missed = sorted(k for k, v in lines[f].items() if not v)
    print(f"{f:45} {n:6} {100.0 * c / max(n, 1):7.1f}%" + (f"  missed lines {missed}" if missed else ""))
print(f"{'total':45} {total:6} {100.0 * covered / max(total, 1):7.1f}%")
PY
