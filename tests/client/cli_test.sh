#!/usr/bin/env bash
# The medakv binary: synth -> compress works and reports what it did; bad
# files and bad flags give one "medakv: error:" line and a non-zero exit.
# Usage: cli_test.sh PATH_TO_MEDAKV
set -uo pipefail
medakv=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
pass=0
fail=0

ok() { echo "ok: $1"; pass=$((pass + 1)); }
bad() { echo "FAIL: $1"; fail=$((fail + 1)); }

# Runs medakv expecting failure; checks the exit code and that stderr is one
# error line containing $2.
expect_error() {
  local name=$1 fragment=$2
  shift 2
  "$medakv" "$@" >"$dir/out" 2>"$dir/err"
  local rc=$?
  local lines
  lines=$(wc -l <"$dir/err")
  if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && grep -q "^medakv: error: .*$fragment" "$dir/err"; then
    ok "$name"
  else
    bad "$name (rc=$rc, stderr: $(cat "$dir/err"))"
  fi
}

"$medakv" synth -o "$dir/in.safetensors" --layers 3 --tokens 300 --kv-heads 2 --q-heads 4 --head-dim 16 --q-tokens 8 \
  >/dev/null && ok "synth" || bad "synth"
out=$("$medakv" compress "$dir/in.safetensors" -o "$dir/out.safetensors" --rho 0.2 2>&1)
if [ $? -eq 0 ] && echo "$out" | grep -q "kept 180 of 900 tokens"; then ok "compress"; else bad "compress: $out"; fi
json=$("$medakv" compress "$dir/in.safetensors" -o "$dir/out2.safetensors" --rho 0.5 --merge pivotal --json)
if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["tokens_kept"]==450 and len(j["per_layer"])==3 and sum(l["budget"] for l in j["per_layer"])==450' <<<"$json"; then
  ok "compress --json"
else
  bad "compress --json: $json"
fi
for policy in full meda streaming_llm h2o snapkv pyramidkv look_m; do
  want=180
  [ "$policy" = full ] && want=900
  out=$("$medakv" compress "$dir/in.safetensors" -o "$dir/$policy.safetensors" --policy "$policy" --rho 0.2 2>&1)
  if [ $? -eq 0 ] && echo "$out" | grep -q "policy $policy: kept $want of 900"; then ok "policy $policy"; else bad "policy $policy: $out"; fi
done
expect_error "bad pool kernel" "pool_kernel must be odd" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --policy snapkv --pool-kernel 4
"$medakv" compress "$dir/in.safetensors" -o "$dir/x.safetensors" --exact-total=false --shared-selection --text-prior keep_all_text \
  --merge-threshold mean --entropy-heads mean_entropy --entropy-source causal >/dev/null && ok "every option" || bad "every option"

head -c 100 "$dir/in.safetensors" >"$dir/truncated.safetensors"
expect_error "truncated file" "truncated" compress "$dir/truncated.safetensors" -o "$dir/o.safetensors"
printf 'not a safetensors file at all' >"$dir/garbage.safetensors"
expect_error "garbage file" "garbage.safetensors" compress "$dir/garbage.safetensors" -o "$dir/o.safetensors"
expect_error "missing file" "nope.safetensors" compress "$dir/nope.safetensors" -o "$dir/o.safetensors"
expect_error "nhd on an hnd file" "layer" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --layout nhd --rho 0.3
expect_error "rho out of range" "rho must be in (0, 1]" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --rho 1.5
expect_error "unknown policy" "unknown policy 'snapkv2'" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --policy snapkv2
expect_error "unknown merge" "unknown merge" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --merge median
expect_error "output directory missing" "no_such_dir" compress "$dir/in.safetensors" -o "$dir/no_such_dir/o.safetensors"
expect_error "synth bad heads" "--q-heads" synth -o "$dir/s.safetensors" --kv-heads 2 --q-heads 3
if [ -e "$dir/o.safetensors" ]; then bad "no output after errors"; else ok "no output after errors"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
