#!/usr/bin/env bash
# The medakv binary: synth -> compress works and reports what it did; bad
# files and bad flags give one "medakv: error:" line and a non-zero exit.
# With a medakv-server: `health` and `compress --server` (the same file as
# the local compress).
# Usage: cli_test.sh PATH_TO_MEDAKV PATH_TO_MEDAKV_SERVER
set -uo pipefail
medakv=$1
server_bin=$2
dir=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null
    # Bounded: the server stops within its 1 s grace; then SIGKILL.
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
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

# ---- against a server ------------------------------------------------------------
# The tensors of two compressed files are equal byte for byte (names, dtypes,
# shapes, data) and so is their metadata, "backend" aside.
same_tensors() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys

def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    meta.pop("backend", None)
    data = raw[8 + n:]
    tensors = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}
    return tensors, meta

a, meta_a = load(sys.argv[1])
b, meta_b = load(sys.argv[2])
if not a or a != b:
    sys.exit("tensors differ: %s" % sorted(set(a) ^ set(b)) if set(a) != set(b) else "tensor data or shapes differ")
if meta_a != meta_b:
    sys.exit("metadata differs: %s vs %s" % (meta_a, meta_b))
PY
}

"$server_bin" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --backend=cpu --shutdown_grace=1s 2>"$dir/server.err" &
server_pid=$!
port=
for _ in $(seq 100); do  # at most 10 s
  port=$(sed -n 's/.*listening on port \([0-9][0-9]*\).*/\1/p' "$dir/server.err")
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$port" ]; then
  bad "medakv-server did not start: $(cat "$dir/server.err")"
else
  ok "medakv-server on port $port"
  addr=127.0.0.1:$port
  out=$("$medakv" health --server "$addr" 2>&1)
  if [ $? -eq 0 ] && [ "$out" = SERVING ]; then ok "health"; else bad "health: $out"; fi
  json=$("$medakv" health --server "$addr" --timeout 2 --json 2>&1)
  if python3 -c 'import json,sys; assert json.load(sys.stdin)["status"]=="SERVING"' <<<"$json"; then
    ok "health --json"
  else
    bad "health --json: $json"
  fi

  "$medakv" compress "$dir/in.safetensors" -o "$dir/local.safetensors" --rho 0.2 >/dev/null
  out=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote.safetensors" --rho 0.2 --server "$addr" --timeout 30 2>&1)
  if [ $? -eq 0 ] && echo "$out" | grep -q "policy meda: kept 180 of 900 tokens .* on server $addr (cpu)"; then
    ok "compress --server"
  else
    bad "compress --server: $out"
  fi
  if err=$(same_tensors "$dir/local.safetensors" "$dir/remote.safetensors" 2>&1); then
    ok "compress --server writes the local result"
  else
    bad "compress --server writes the local result: $err"
  fi
  # Another policy, a precomputed-statistics NHD cache, small request chunks.
  "$medakv" synth -o "$dir/pre.safetensors" --layers 2 --tokens 200 --kv-heads 2 --q-heads 4 --head-dim 16 \
    --q-tokens 8 --precomputed --layout nhd --dtype bfloat16 >/dev/null
  "$medakv" compress "$dir/pre.safetensors" -o "$dir/local2.safetensors" --layout nhd --policy snapkv --rho 0.3 >/dev/null
  json=$("$medakv" compress "$dir/pre.safetensors" -o "$dir/remote2.safetensors" --layout nhd --policy snapkv --rho 0.3 \
    --server "$addr" --chunk-bytes 1000 --json 2>&1)
  if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["tokens_kept"]==120 and j["backend"]=="cpu" and j["server"] and j["seconds"]["receive"]>=0' <<<"$json" &&
    same_tensors "$dir/local2.safetensors" "$dir/remote2.safetensors"; then
    ok "compress --server --json, snapkv, precomputed nhd, 1000-byte chunks"
  else
    bad "compress --server --json: $json"
  fi
  expect_error "bad pool kernel with --server" "pool_kernel must be odd" compress "$dir/in.safetensors" \
    -o "$dir/o.safetensors" --policy snapkv --pool-kernel 4 --server "$addr"
  # A 17.9 MB key in one chunk is over the server's 16 MiB --max_message_bytes.
  "$medakv" synth -o "$dir/long.safetensors" --layers 1 --kv-heads 1 --q-heads 1 --tokens 70000 --head-dim 128 \
    --q-tokens 4 --precomputed >/dev/null
  expect_error "chunk over the server's message limit" "server $addr: RESOURCE_EXHAUSTED: .*--chunk-bytes" \
    compress "$dir/long.safetensors" -o "$dir/o.safetensors" --policy full --server "$addr" --chunk-bytes 20000000
  expect_error "deadline" "server $addr: DEADLINE_EXCEEDED" compress "$dir/in.safetensors" -o "$dir/o.safetensors" \
    --server "$addr" --timeout 0.000001
fi
# Port 1 on loopback: nothing listens there.
expect_error "compress: server unreachable" "cannot reach server 127.0.0.1:1: UNAVAILABLE" \
  compress "$dir/in.safetensors" -o "$dir/o.safetensors" --server 127.0.0.1:1 --timeout 5
expect_error "health: server unreachable" "cannot reach server 127.0.0.1:1: UNAVAILABLE" health --server 127.0.0.1:1
expect_error "--timeout without --server" "--timeout needs --server" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --timeout 3
expect_error "bad --chunk-bytes" "--chunk-bytes must be > 0" compress "$dir/in.safetensors" -o "$dir/o.safetensors" \
  --server 127.0.0.1:1 --chunk-bytes 0

if [ -e "$dir/o.safetensors" ]; then bad "no output after errors"; else ok "no output after errors"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
