#!/usr/bin/env bash
# The medakv binary: synth -> compress works and reports what it did; bad
# files and bad flags give one "medakv: error:" line and a non-zero exit.
# With medakv-servers: `health` and `compress --server` (the same file as
# the local compress, over shared memory and over the socket; a request that
# names no policy gets the server's `default` preset; $MEDAKV_SERVER and
# --local), no CANCELLED calls in the server's metrics after normal calls,
# `put`, `get`, `compress-cache`, `ls`, `delete`, `stats` and `bench` over
# two replicas, then with one of them down. `--version` of both binaries, and
# scripts/serve.sh's addresses and warnings.
# Usage: cli_test.sh PATH_TO_MEDAKV PATH_TO_MEDAKV_SERVER
# No pipefail: the checks are `echo "$out" | grep -q ...`, and grep -q stops
# reading at its first match, so echo may die of SIGPIPE on a busy machine;
# the pipeline's status must be grep's.
set -u
medakv=$1
server_bin=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
# The caller's servers and token must not turn local runs into remote ones.
unset MEDAKV_SERVER MEDAKV_TOKEN
dir=$(mktemp -d)
server_pid=
server2_pid=
server3_pid=
stop_server() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null
  # Bounded: the server stops within its 1 s grace; then SIGKILL.
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}
cleanup() {
  stop_server "$server_pid"
  stop_server "$server2_pid"
  stop_server "$server3_pid"
  # Sanitizer builds: a server's report goes to the test's output (where
  # scripts/sanitize.sh looks for reports).
  for log in "$dir"/server*.err; do
    [ -f "$log" ] && grep -Eq 'ERROR: (Address|Leak)Sanitizer|runtime error: ' "$log" && cat "$log"
  done
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
out=$("$medakv" compress "$dir/in.safetensors" -o "$dir/out.safetensors" 2>&1)
if [ $? -eq 0 ] && echo "$out" | grep -q "policy amber: kept 180 of 900 tokens"; then
  ok "compress: amber at rho 0.2 by default"
else
  bad "compress: $out"
fi
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

# --version: CMake's project version, the same in both binaries.
project_version=$(sed -n 's/^project(medakv VERSION \([0-9.]*\).*/\1/p' "$root/CMakeLists.txt")
cli_version=$("$medakv" --version 2>&1)
cli_rc=$?
server_version=$("$server_bin" --version 2>&1)
server_rc=$?
if [ $cli_rc -eq 0 ] && [ $server_rc -eq 0 ] && [ -n "$project_version" ] &&
  echo "$cli_version" | grep -Eq "^medakv $project_version( \(git [0-9a-f]+(-dirty)?\))?$" &&
  [ "$(echo "$server_version" | head -1)" = "medakv-server $project_version" ]; then
  ok "--version: $cli_version; $server_version"
else
  bad "--version (project $project_version): medakv rc=$cli_rc '$cli_version'; medakv-server rc=$server_rc '$server_version'"
fi
help=$("$medakv" compress --help 2>&1)
if echo "$help" | grep -q -- "--local" && echo "$help" | grep -q 'MEDAKV_SERVER' &&
  echo "$help" | grep -q 'amber (at rho 0.2' && echo "$help" | grep -q 'preset "default"' &&
  ! echo "$help" | grep -qi 'meda (default\|default.*: meda\b'; then
  ok "compress --help: the default policy, \$MEDAKV_SERVER and --local"
else
  bad "compress --help: $help"
fi
# An option after --server is not its address.
expect_error "--server followed by an option" "--server needs an address (host:port), got '--policy'" \
  compress "$dir/in.safetensors" -o "$dir/o.safetensors" --server --policy meda
expect_error "ls --server followed by an option" "--server needs an address (host:port), got '--json'" ls --server --json
expect_error "no server for ls" "no server: give --server" ls
expect_error "--local and --server" "--local and --server: give one of them" compress "$dir/in.safetensors" \
  -o "$dir/o.safetensors" --local --server 127.0.0.1:1

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
    meta.pop("preset", None)  # compress --preset names the server's preset
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

# Starts a server logging to $1; prints its port once it listens (empty if it
# does not within 10 s) and leaves its pid in $started_pid.
# tune on the checked-in real cache (and its future queries): a table, JSON and a presets file.
real=$(cd "$(dirname "$0")/../data" && pwd)/smollm2_short.safetensors
out=$("$medakv" tune "$real" --grid baselines --rhos 0.2,0.1 -o "$dir/tuned.txtpb" --default-rho 0.2 2>&1)
if [ $? -eq 0 ] && echo "$out" | grep -q "^best at rho 0.1: " && echo "$out" | grep -q "best baseline (" &&
  grep -q 'name: "tuned-r0.2"' "$dir/tuned.txtpb" && grep -q 'name: "default"' "$dir/tuned.txtpb"; then
  ok "tune: table and presets file"
else
  bad "tune: $out"
fi
json=$("$medakv" tune "$real" --grid baselines --rhos 0.2 --json 2>&1)
if python3 -c 'import json,sys; j=json.load(sys.stdin); assert len(j["runs"])==7 and j["best"][0]["rho"]==0.2 and j["samples"][0]["future"].endswith("smollm2_short.future.safetensors"), j' <<<"$json"; then
  tuned_best=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["best"][0]["candidate"].split()[0])' <<<"$json")
  ok "tune --json (best at 0.2: $tuned_best)"
else
  bad "tune --json: $json"
fi
expect_error "tune: unknown grid" "unknown grid" tune "$real" --grid huge
expect_error "tune: default rho not tuned" "--default-rho 0.3 is not one of the tuned rhos" tune "$real" --grid baselines \
  --rhos 0.2 -o "$dir/t.txtpb" --default-rho 0.3
"$medakv" synth -o "$dir/pre_tune.safetensors" --layers 2 --tokens 50 --q-tokens 8 --precomputed >/dev/null
expect_error "tune: precomputed cache" "tuning needs the queries" tune "$dir/pre_tune.safetensors"
cat >"$dir/presets.txtpb" <<'EOF'
preset { name: "soft" description: "meda, flatter budgets, no merge" policy { rho: 0.1 meda { tau: 5 select { merge: MERGE_MODE_NONE } } } }
EOF
cat "$dir/tuned.txtpb" >>"$dir/presets.txtpb"
start_server() {
  local log=$1 port=
  "$server_bin" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --backend=cpu --shutdown_grace=1s \
    --policy_presets="$dir/presets.txtpb" 2>"$log" &
  started_pid=$!
}
wait_port() {
  local log=$1 pid=$2 port=
  for _ in $(seq 100); do  # at most 10 s
    port=$(sed -n 's/.*listening on port \([0-9][0-9]*\).*/\1/p' "$log")
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$port"
}
start_server "$dir/server.err"
server_pid=$started_pid
start_server "$dir/server2.err"
server2_pid=$started_pid
port=$(wait_port "$dir/server.err" "$server_pid")
port2=$(wait_port "$dir/server2.err" "$server2_pid")
if [ -z "$port" ] || [ -z "$port2" ]; then
  bad "medakv-server did not start: $(cat "$dir/server.err" "$dir/server2.err")"
else
  ok "medakv-server on ports $port and $port2"
  addr=127.0.0.1:$port
  out=$("$medakv" health --server "$addr" 2>&1)
  if [ $? -eq 0 ] && [ "$out" = SERVING ]; then ok "health"; else bad "health: $out"; fi
  json=$("$medakv" health --server "$addr" --timeout 2 --json 2>&1)
  if python3 -c 'import json,sys; assert json.load(sys.stdin)["status"]=="SERVING"' <<<"$json"; then
    ok "health --json"
  else
    bad "health --json: $json"
  fi

  # Normal calls leave no CANCELLED call in the server's metrics: each CLI
  # call's shared-memory lease ends with OK (the client unregisters it).
  metrics_port=$(sed -n 's/.*metrics on port \([0-9][0-9]*\).*/\1/p' "$dir/server.err")
  "$medakv" compress "$dir/in.safetensors" -o "$dir/m1.safetensors" --server "$addr" >/dev/null 2>&1
  "$medakv" put "$dir/in.safetensors" --id metrics-1 --server "$addr" >/dev/null 2>&1
  "$medakv" get metrics-1 -o "$dir/m2.safetensors" --server "$addr" >/dev/null 2>&1
  "$medakv" delete metrics-1 --server "$addr" >/dev/null 2>&1
  if python3 - "$metrics_port" <<'PY'
import re, sys, time, urllib.request
def scrape():
    with urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=10) as r:
        return r.read().decode()
def value(text, name, labels):
    total = 0.0
    for m in re.finditer(r"^%s\{([^}]*)\} (\S+)$" % name, text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total
# The leases end when the CLI exits: wait until the server has seen them end.
deadline = time.time() + 10
while True:
    text = scrape()
    if value(text, "medakv_inflight_requests", {"method": "RegisterSharedMemory"}) == 0 or time.time() > deadline:
        break
    time.sleep(0.1)
cancelled = [l for l in text.splitlines() if l.startswith("medakv_requests_total{") and 'code="CANCELLED"' in l
             and not l.endswith(" 0")]
leases = value(text, "medakv_requests_total", {"method": "RegisterSharedMemory", "code": "OK"})
if cancelled or leases < 3:
    sys.exit("CANCELLED calls: %s; RegisterSharedMemory OK: %g (want >= 3)" % (cancelled, leases))
PY
  then
    ok "no CANCELLED calls in the server's metrics after compress, put and get over shared memory"
  else
    bad "CANCELLED calls in the server's metrics (metrics port '$metrics_port')"
  fi

  "$medakv" compress "$dir/in.safetensors" -o "$dir/local.safetensors" --rho 0.2 >/dev/null
  out=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote.safetensors" --policy amber --rho 0.2 --server "$addr" --timeout 30 2>&1)
  if [ $? -eq 0 ] && echo "$out" | grep -q "policy amber: kept 180 of 900 tokens .* on server $addr (cpu)"; then
    ok "compress --server"
  else
    bad "compress --server: $out"
  fi
  if err=$(same_tensors "$dir/local.safetensors" "$dir/remote.safetensors" 2>&1); then
    ok "compress --server writes the local result"
  else
    bad "compress --server writes the local result: $err"
  fi
  # On this host the tensors go through shared memory unless --no-shm.
  json=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_shm.safetensors" --policy amber --rho 0.2 \
    --server "$addr" --json)
  json_bytes=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_bytes.safetensors" --policy amber --rho 0.2 \
    --server "$addr" --no-shm --json)
  if python3 -c 'import json,sys; assert json.loads(sys.argv[1])["shared_memory"] is True and json.loads(sys.argv[2])["shared_memory"] is False' \
    "$json" "$json_bytes" && same_tensors "$dir/local.safetensors" "$dir/remote_shm.safetensors" &&
    same_tensors "$dir/local.safetensors" "$dir/remote_bytes.safetensors"; then
    ok "compress --server: shared memory by default, --no-shm, the same result"
  else
    bad "compress --server shared memory: $json $json_bytes"
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
  # A preset of the server: the same as its options given here; --rho replaces its rho.
  "$medakv" compress "$dir/in.safetensors" -o "$dir/local_soft.safetensors" --policy meda --tau 5 --merge none \
    --rho 0.1 >/dev/null
  json=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_soft.safetensors" --preset soft --server "$addr" --json 2>&1)
  if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["preset"]=="soft" and j["policy"]=="meda" and j["rho"]==0.1 and j["tokens_kept"]==90, j' <<<"$json" &&
    same_tensors "$dir/local_soft.safetensors" "$dir/remote_soft.safetensors" &&
    python3 -c 'import json,struct,sys; raw=open(sys.argv[1],"rb").read(); n=struct.unpack("<Q",raw[:8])[0]; m=json.loads(raw[8:8+n])["__metadata__"]; assert m["preset"]=="soft" and m["tau"]=="5" and m["merge"]=="none", m' "$dir/remote_soft.safetensors"; then
    ok "compress --preset: the server's preset, its options in the file"
  else
    bad "compress --preset: $json"
  fi
  out=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_soft5.safetensors" --preset soft --rho 0.5 --server "$addr" 2>&1)
  if [ $? -eq 0 ] && echo "$out" | grep -q "policy meda (preset soft): kept 450 of 900 tokens"; then
    ok "compress --preset --rho"
  else
    bad "compress --preset --rho: $out"
  fi
  json=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_tuned.safetensors" --preset tuned-r0.2 --server "$addr" --json 2>&1)
  if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["preset"]=="tuned-r0.2" and j["policy"]==sys.argv[1] and j["rho"]==0.2, j' "$tuned_best" <<<"$json"; then
    ok "compress --preset of a tune presets file"
  else
    bad "compress --preset of a tune presets file ($tuned_best): $json"
  fi
  # No policy named: the request reaches the server without one, and its
  # "default" preset (here the tune output's) runs; --rho replaces its rho.
  json=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_default.safetensors" --server "$addr" --json 2>&1)
  "$medakv" compress "$dir/in.safetensors" -o "$dir/remote_preset_default.safetensors" --preset default \
    --server "$addr" >/dev/null 2>&1
  if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["preset"]=="default" and j["policy"]==sys.argv[1] and j["rho"]==0.2, j' "$tuned_best" <<<"$json" &&
    same_tensors "$dir/remote_preset_default.safetensors" "$dir/remote_default.safetensors" &&
    python3 -c 'import json,struct,sys; raw=open(sys.argv[1],"rb").read(); n=struct.unpack("<Q",raw[:8])[0]; m=json.loads(raw[8:8+n])["__metadata__"]; assert m["preset"]=="default" and m["policy"]==sys.argv[2], m' "$dir/remote_default.safetensors" "$tuned_best"; then
    ok "compress --server without --policy: the server's default preset ($tuned_best)"
  else
    bad "compress --server without --policy: $json"
  fi
  out=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_default5.safetensors" --rho 0.5 --server "$addr" 2>&1)
  if [ $? -eq 0 ] && echo "$out" | grep -q "policy $tuned_best (preset default): kept 450 of 900 tokens"; then
    ok "compress --server --rho without --policy: the default preset at that rho"
  else
    bad "compress --server --rho without --policy: $out"
  fi
  # An option flag without --policy is amber's, as here.
  "$medakv" compress "$dir/in.safetensors" -o "$dir/local_sinks.safetensors" --sinks 2 >/dev/null
  json=$("$medakv" compress "$dir/in.safetensors" -o "$dir/remote_sinks.safetensors" --sinks 2 --server "$addr" --json 2>&1)
  if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["policy"]=="amber" and "preset" not in j, j' <<<"$json" &&
    same_tensors "$dir/local_sinks.safetensors" "$dir/remote_sinks.safetensors"; then
    ok "compress --server with an option flag and no --policy: amber"
  else
    bad "compress --server --sinks: $json"
  fi
  # $MEDAKV_SERVER: compress runs there as with --server; --local runs here.
  json=$(MEDAKV_SERVER="$addr" "$medakv" compress "$dir/in.safetensors" -o "$dir/env.safetensors" --policy amber --json 2>&1)
  json_local=$(MEDAKV_SERVER="$addr" "$medakv" compress "$dir/in.safetensors" -o "$dir/env_local.safetensors" --local --json 2>&1)
  if python3 -c 'import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); assert a["server"]==sys.argv[3] and a["backend"]=="cpu", a; assert "server" not in b and b["policy"]=="amber" and b["rho"]==0.2, b' "$json" "$json_local" "$addr" &&
    same_tensors "$dir/local.safetensors" "$dir/env.safetensors" && same_tensors "$dir/local.safetensors" "$dir/env_local.safetensors"; then
    ok "compress with \$MEDAKV_SERVER: on the server; --local: here"
  else
    bad "compress with \$MEDAKV_SERVER: $json / $json_local"
  fi
  expect_error "--local with a server flag" "--timeout needs --server (or \$MEDAKV_SERVER) (not with --local)" \
    compress "$dir/in.safetensors" -o "$dir/o.safetensors" --local --timeout 3
  expect_error "unknown preset" "no such preset (this server has: soft, tuned-r0.1, tuned-r0.2, default)" compress "$dir/in.safetensors" \
    -o "$dir/o.safetensors" --preset sharp --server "$addr"
  expect_error "preset with a policy option" "--tau cannot be combined with it" compress "$dir/in.safetensors" \
    -o "$dir/o.safetensors" --preset soft --tau 2 --server "$addr"
  expect_error "bad pool kernel with --server" "pool_kernel must be odd" compress "$dir/in.safetensors" \
    -o "$dir/o.safetensors" --policy snapkv --pool-kernel 4 --server "$addr"
  # A 17.9 MB key in one chunk is over the server's 16 MiB --max_message_bytes.
  "$medakv" synth -o "$dir/long.safetensors" --layers 1 --kv-heads 1 --q-heads 1 --tokens 70000 --head-dim 128 \
    --q-tokens 4 --precomputed >/dev/null
  expect_error "chunk over the server's message limit" "server $addr: RESOURCE_EXHAUSTED: .*--chunk-bytes" \
    compress "$dir/long.safetensors" -o "$dir/o.safetensors" --policy full --server "$addr" --chunk-bytes 20000000 --no-shm
  expect_error "deadline" "server $addr: DEADLINE_EXCEEDED" compress "$dir/long.safetensors" -o "$dir/o.safetensors" \
    --server "$addr" --timeout 0.001 --no-shm

  # ---- the store over two replicas ------------------------------------------------
  addr2=127.0.0.1:$port2
  both="$addr,$addr2"
  placed_ok=1
  for i in 1 2 3 4 5 6; do
    out=$("$medakv" put "$dir/in.safetensors" --id "cli-$i" --server "$both" --ttl 3600 2>&1) || placed_ok=0
    echo "$out" | grep -q "^put 'cli-$i' on server 127.0.0.1:[0-9]*: 3 layers x 300 tokens, .*shared memory), host tier" || placed_ok=0
    echo "$out" >>"$dir/puts"
  done
  # (Whether both replicas got one of the six depends on the ports: the
  # spread-* puts below make sure each replica holds an id.)
  if [ $placed_ok -eq 1 ]; then
    ok "put: six ids over two replicas"
  else
    bad "put: $(cat "$dir/puts")"
  fi
  # The order of --server does not move an id.
  json=$("$medakv" put "$dir/in.safetensors" --id cli-1 --server "$addr2" --server "$addr" --overwrite --no-shm --json)
  if python3 -c 'import json,sys; j=json.loads(sys.argv[1]); assert j["shared_memory"] is False and j["bytes_sent"] > 0; assert ("on server %s:" % j["server"]) in open(sys.argv[2]).read().split("cli-2")[0]' \
    "$json" "$dir/puts"; then
    ok "put --overwrite --json: the same replica whatever the order of --server"
  else
    bad "put --overwrite --json: $json"
  fi
  # --tier: this server has no device tier, so host and auto (any case) both land on the host tier.
  tiers_ok=1
  for tier in host AUTO; do
    json=$("$medakv" put "$dir/in.safetensors" --id cli-1 --server "$both" --overwrite --tier "$tier" --json) || tiers_ok=0
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); assert j["cache_id"]=="cli-1" and j["tier"]=="host", j' "$json" ||
      tiers_ok=0
  done
  if [ $tiers_ok -eq 1 ]; then ok "put --tier host, --tier AUTO: the host tier"; else bad "put --tier: $json"; fi
  expect_error "put: bad --tier" "--tier: expected auto, host or device, got 'bogus'" put "$dir/in.safetensors" \
    --id cli-1 --server "$both" --overwrite --tier bogus
  # Refused before the network: nothing listens on port 1.
  expect_error "put: empty --tier" "--tier: expected auto, host or device, got ''" put "$dir/in.safetensors" \
    --id cli-1 --server 127.0.0.1:1 --tier ""
  expect_error "put: the id exists" "ALREADY_EXISTS: cache 'cli-2' exists" put "$dir/in.safetensors" --id cli-2 --server "$both"
  expect_error "put: bad id" "byte 3 is outside" put "$dir/in.safetensors" --id "bad id" --server "$both"
  out=$("$medakv" ls --server "$both" --prefix cli-)
  if [ "$(echo "$out" | grep -c '^cli-')" -eq 6 ] && echo "$out" | head -1 | grep -q '^ID .*SERVER .*EXPIRES'; then
    ok "ls"
  else
    bad "ls: $out"
  fi
  json=$("$medakv" ls --server "$both" --prefix cli- --limit 4 --json)
  if python3 -c 'import json,sys; j=json.loads(sys.argv[1]); ids=[c["cache_id"] for c in j["caches"]]; assert ids==["cli-1","cli-2","cli-3","cli-4"], ids; assert not j["errors"] and j["caches"][0]["layers"]==3' "$json"; then
    ok "ls --limit --json"
  else
    bad "ls --json: $json"
  fi
  out=$("$medakv" get cli-3 -o "$dir/got.safetensors" --server "$both" 2>&1)
  if [ $? -eq 0 ] && echo "$out" | grep -q "got.safetensors: 'cli-3' from server .*: layers \[0, 3) of 3, 900 of 900 tokens kept" &&
    python3 - "$dir/got.safetensors" "$dir/in.safetensors" <<'PY'
import json, struct, sys
def load(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return header, raw[8 + n:]
got, got_data = load(sys.argv[1])
src, src_data = load(sys.argv[2])
assert got["__metadata__"]["cache_id"] == "cli-3"
for l in range(3):
    for t in ("key", "value"):
        a, b = got["layer.%d.%s" % (l, t)], src["layer.%d.%s" % (l, t)]
        assert a["shape"] == b["shape"] and a["dtype"] == b["dtype"]
        assert got_data[a["data_offsets"][0]:a["data_offsets"][1]] == src_data[b["data_offsets"][0]:b["data_offsets"][1]]
    assert got["layer.%d.positions" % l]["shape"] == [2, 300]
PY
  then
    ok "get: the stored keys and values"
  else
    bad "get: $out"
  fi
  json=$("$medakv" get cli-3 -o "$dir/part.safetensors" --server "$both" --layers 1:3 --no-shm --json)
  if python3 -c 'import json,sys; j=json.loads(sys.argv[1]); assert j["layer_begin"]==1 and j["layer_end"]==3 and j["shared_memory"] is False and j["tokens_kept"]==600' "$json" &&
    python3 -c 'import json,struct,sys; raw=open(sys.argv[1],"rb").read(); h=json.loads(raw[8:8+struct.unpack("<Q",raw[:8])[0]]); assert "layer.1.key" in h and "layer.2.key" in h and "layer.0.key" not in h' "$dir/part.safetensors"; then
    ok "get --layers --json"
  else
    bad "get --layers: $json"
  fi
  expect_error "get: unknown id" "NOT_FOUND" get cli-none -o "$dir/o.safetensors" --server "$both"
  expect_error "get: bad --layers" "--layers '3:1'" get cli-3 -o "$dir/o.safetensors" --server "$both" --layers 3:1
  # compress-cache: a stored cache compressed in place, then downloaded: the
  # local compress's tokens; without a policy, the replica's default preset.
  "$medakv" compress "$dir/in.safetensors" -o "$dir/local_meda3.safetensors" --policy meda --rho 0.3 >/dev/null
  "$medakv" put "$dir/in.safetensors" --id cc-1 --server "$both" >/dev/null
  json=$("$medakv" compress-cache cc-1 --policy meda --rho 0.3 --server "$both" --json 2>&1)
  "$medakv" get cc-1 -o "$dir/cc1.safetensors" --server "$both" >/dev/null 2>&1
  if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["cache_id"]=="cc-1" and j["compressed"] and j["policy"]=="meda" and j["rho"]==0.3 and j["tokens_in"]==900 and j["tokens_kept"]==270 and len(j["per_layer"])==3 and sum(l["budget"] for l in j["per_layer"])==270 and "preset" not in j, j' <<<"$json" &&
    python3 - "$dir/cc1.safetensors" "$dir/local_meda3.safetensors" <<'PY'
import json, struct, sys
def load(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    return header.pop("__metadata__"), {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
                                        for k, v in header.items()}
meta, got = load(sys.argv[1])
_, want = load(sys.argv[2])
assert meta["compressed"] == "true" and meta["policy"] == "meda", meta
for l in range(3):
    for t in ("key", "value", "positions"):
        name = "layer.%d.%s" % (l, t)
        assert got[name] == want[name], name
PY
  then
    ok "compress-cache --policy meda --rho 0.3 --json, then get: the local result"
  else
    bad "compress-cache: $json"
  fi
  expect_error "compress-cache twice" "FAILED_PRECONDITION: .*already compressed" compress-cache cc-1 --server "$both"
  expect_error "compress-cache: unknown id" "NOT_FOUND" compress-cache cc-none --server "$both"
  expect_error "compress-cache: bad id" "byte 3 is outside" compress-cache "bad id" --server "$both"
  expect_error "compress-cache: preset with a policy flag" "--tau cannot be combined with it" compress-cache cc-1 \
    --preset soft --tau 2 --server "$both"
  "$medakv" put "$dir/in.safetensors" --id cc-kv --keys-values-only --server "$both" >/dev/null
  expect_error "compress-cache of keys and values only" "FAILED_PRECONDITION" compress-cache cc-kv --server "$both"
  "$medakv" put "$dir/in.safetensors" --id cc-2 --server "$both" >/dev/null
  out=$("$medakv" compress-cache cc-2 --server "$both" -v 2>&1)
  if [ $? -eq 0 ] && echo "$out" | grep -q "^compressed 'cc-2' on server 127.0.0.1:[0-9]* (cpu): policy $tuned_best (preset default), rho 0.2: kept 180 of 900 tokens" &&
    [ "$(echo "$out" | grep -c '^ *[0-2]  ')" -eq 3 ]; then
    ok "compress-cache without --policy: the server's default preset; -v: per layer"
  else
    bad "compress-cache without --policy: $out"
  fi
  "$medakv" put "$dir/in.safetensors" --id cc-3 --server "$both" >/dev/null
  json=$(MEDAKV_SERVER="$both" "$medakv" compress-cache cc-3 --preset soft --json 2>&1)
  if python3 -c 'import json,sys; j=json.load(sys.stdin); assert j["preset"]=="soft" and j["policy"]=="meda" and j["rho"]==0.1 and j["tokens_kept"]==90, j' <<<"$json"; then
    ok "compress-cache --preset with \$MEDAKV_SERVER"
  else
    bad "compress-cache --preset: $json"
  fi
  "$medakv" delete cc-1 cc-2 cc-3 cc-kv --server "$both" >/dev/null

  json=$("$medakv" stats --server "$both" --json)
  if python3 -c 'import json,sys; j=json.loads(sys.argv[1]); assert len(j["replicas"])==2 and not j["errors"]; assert j["total"]["tiers"][0]["entries"]==6' "$json"; then
    ok "stats --json: two replicas, six entries"
  else
    bad "stats --json: $json"
  fi
  out=$("$medakv" stats --server "$both")
  if echo "$out" | grep -q "^total (2 of 2) .* host "; then ok "stats"; else bad "stats: $out"; fi
  out=$("$medakv" health --server "$both")
  if [ $? -eq 0 ] && [ "$(echo "$out" | grep -c ': SERVING$')" -eq 2 ]; then ok "health of two"; else bad "health of two: $out"; fi
  out=$("$medakv" delete cli-5 cli-6 --server "$both")
  if [ $? -eq 0 ] && [ "$(echo "$out" | grep -c "^deleted 'cli-[56]' from server")" -eq 2 ]; then ok "delete"; else bad "delete: $out"; fi
  expect_error "delete: gone" "NOT_FOUND" delete cli-5 --server "$both"
  out=$(MEDAKV_SERVER="$both" "$medakv" ls --prefix cli- --json)
  if python3 -c 'import json,sys; assert len(json.loads(sys.argv[1])["caches"])==4' "$out"; then
    ok "MEDAKV_SERVER"
  else
    bad "MEDAKV_SERVER: $out"
  fi

  # bench: a short run of each operation.
  for op in compress put get; do
    json=$("$medakv" bench --server "$both" --op $op --concurrency 2 --duration 0.5 --layers 2 --tokens 256 \
      --kv-heads 2 --q-heads 4 --head-dim 16 --q-tokens 8 --json 2>&1)
    if python3 -c 'import json,sys; j=json.loads(sys.argv[1]); assert j["requests_ok"]>0 and j["requests_failed"]==0 and j["requests_per_s"]>0; l=j["latency_ms"]; assert 0<l["p50"]<=l["p90"]<=l["p99"]<=l["max"]; assert j["requests_shared_memory"]==j["requests_ok"]; assert (j["up_mb_per_s"]>0) == (sys.argv[2]!="get") and (j["down_mb_per_s"]>0) == (sys.argv[2]!="put")' "$json" "$op"; then
      ok "bench --op $op --json"
    else
      bad "bench --op $op: $json"
    fi
  done
  out=$("$medakv" bench --server "$addr" --concurrency 1 --duration 0.3 --layers 1 --tokens 64 --kv-heads 1 \
    --q-heads 1 --head-dim 16 --q-tokens 4 --no-shm 2>&1)
  if echo "$out" | grep -q "^requests: [1-9][0-9]* ok, 0 failed" && echo "$out" | grep -q "^latency ms: p50 " &&
    echo "$out" | grep -q "shared memory: 0 of" && echo "$out" | grep -q "^errors: none"; then
    ok "bench"
  else
    bad "bench: $out"
  fi
  # The bench leaves nothing behind.
  json=$("$medakv" ls --server "$both" --prefix bench- --json)
  if python3 -c 'import json,sys; assert json.loads(sys.argv[1])["caches"]==[]' "$json"; then
    ok "bench cleans up"
  else
    bad "bench cleans up: $json"
  fi
  expect_error "bench: bad --op" "--op: expected compress, put or get" bench --server "$addr" --op nope --duration 0.1
  expect_error "bench: bad --concurrency" "--concurrency must be in" bench --server "$addr" --concurrency 0

  # An id on each replica for the checks below (placement depends on the ports).
  up_id=
  down_id=
  for i in $(seq 40); do
    out=$("$medakv" put "$dir/in.safetensors" --id "spread-$i" --server "$both" --no-shm 2>&1) || continue
    case "$out" in
      *"on server $addr:"*) [ -n "$up_id" ] || up_id=spread-$i ;;
      *"on server $addr2:"*) [ -n "$down_id" ] || down_id=spread-$i ;;
    esac
    [ -n "$up_id" ] && [ -n "$down_id" ] && break
  done
  if [ -n "$up_id" ] && [ -n "$down_id" ]; then
    ok "ids land on both replicas ($up_id on $addr, $down_id on $addr2)"
  else
    bad "ids land on both replicas: 40 puts found '$up_id' on $addr and '$down_id' on $addr2"
  fi

  # ---- one replica down ------------------------------------------------------------
  stop_server "$server2_pid"
  server2_pid=
  "$medakv" ls --server "$both" --prefix cli- >"$dir/out" 2>"$dir/err"
  rc=$?
  if [ $rc -ne 0 ] && grep -q "^medakv: error: cannot reach server $addr2: UNAVAILABLE" "$dir/err" &&
    ! grep -q "$addr2" "$dir/out" && [ "$(grep -c "$addr " "$dir/out")" -eq "$(grep -c "^put 'cli-[1-4]' on server $addr:" "$dir/puts")" ]; then
    ok "ls with a replica down: the live replica's caches and an error"
  else
    bad "ls with a replica down (rc=$rc): $(cat "$dir/out" "$dir/err")"
  fi
  if [ -z "$down_id" ]; then
    bad "no id landed on $addr2 in 40 puts"
  else
    expect_error "get from the down replica" "cannot reach server $addr2 (the replica of cache '$down_id'): UNAVAILABLE" \
      get "$down_id" -o "$dir/o.safetensors" --server "$both" --attempts 2
  fi
  if [ -n "$up_id" ] && "$medakv" get "$up_id" -o "$dir/up.safetensors" --server "$both" >/dev/null; then
    ok "get from the live replica"
  else
    bad "get from the live replica ($up_id)"
  fi
  "$medakv" health --server "$both" >"$dir/out" 2>"$dir/err"
  if [ $? -ne 0 ] && grep -q "^$addr: SERVING" "$dir/out" && grep -q "^$addr2: UNREACHABLE" "$dir/out"; then
    ok "health with a replica down"
  else
    bad "health with a replica down: $(cat "$dir/out" "$dir/err")"
  fi
  "$medakv" stats --server "$both" --json >"$dir/out" 2>/dev/null
  if [ $? -ne 0 ] && python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); assert len(j["replicas"])==1 and j["errors"][0]["code"]=="UNAVAILABLE"' "$dir/out"; then
    ok "stats with a replica down"
  else
    bad "stats with a replica down: $(cat "$dir/out")"
  fi
fi
# A server with TLS and bearer tokens (SECURITY.md): certificates made here.
if openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=cli-ca \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" >/dev/null 2>&1 &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" >/dev/null 2>&1 &&
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/tls.ext" &&
  openssl x509 -req -days 2 -in "$dir/tls.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -extfile "$dir/tls.ext" -out "$dir/tls.pem" >/dev/null 2>&1; then
  printf '# cli test\ncli-alice-token-0123456789 alice\ncli-bob-token-0123456789abc bob\n' >"$dir/tokens"
  printf 'cli-bob-token-0123456789abc\n' >"$dir/bob.token"
  "$server_bin" --listen=127.0.0.1:0 --metrics_listen= --backend=cpu --shutdown_grace=1s \
    --auth_tokens_file="$dir/tokens" --tls_cert="$dir/tls.pem" --tls_key="$dir/tls.key" 2>"$dir/server3.err" &
  server3_pid=$!
  port3=$(wait_port "$dir/server3.err" "$server3_pid")
  if [ -z "$port3" ]; then
    bad "secure medakv-server did not start: $(cat "$dir/server3.err")"
  else
    sec=127.0.0.1:$port3
    if grep -q "listening on port $port3 (TLS" "$dir/server3.err" && grep -q "2 bearer tokens" "$dir/server3.err"; then
      ok "secure server start-up lines"
    else
      bad "secure server start-up lines: $(cat "$dir/server3.err")"
    fi
    expect_error "no token" "UNAUTHENTICATED: no bearer token" put "$dir/in.safetensors" --id s1 --server "$sec" \
      --tls-ca "$dir/ca.pem" --no-shm
    expect_error "wrong token" "the bearer token is not valid" put "$dir/in.safetensors" --id s1 --server "$sec" \
      --tls-ca "$dir/ca.pem" --token not-a-token-0123456789
    expect_error "plaintext client" "UNAVAILABLE" get s1 -o "$dir/o.safetensors" --server "$sec" --token x --attempts 1
    if MEDAKV_TOKEN=cli-alice-token-0123456789 "$medakv" put "$dir/in.safetensors" --id s1 --server "$sec" \
        --tls-ca "$dir/ca.pem" >/dev/null 2>"$dir/err"; then
      ok "put with \$MEDAKV_TOKEN over TLS"
    else
      bad "put with \$MEDAKV_TOKEN over TLS: $(cat "$dir/err")"
    fi
    expect_error "another tenant's cache" "NOT_FOUND" get s1 -o "$dir/o.safetensors" --server "$sec" \
      --tls-ca "$dir/ca.pem" --token-file "$dir/bob.token"
    out=$(MEDAKV_TOKEN=cli-alice-token-0123456789 "$medakv" get s1 -o "$dir/s1.safetensors" --server "$sec" \
      --tls-ca "$dir/ca.pem" 2>&1)
    if [ $? -eq 0 ] && echo "$out" | grep -q "'s1' from server $sec: layers \[0, 3) of 3, 900 of 900 tokens kept"; then
      ok "the owner gets its cache back"
    else
      bad "the owner gets its cache back: $out"
    fi
    # compress over shared memory names the objects with the tenant's prefix.
    json=$("$medakv" compress "$dir/in.safetensors" -o "$dir/sec.safetensors" --rho 0.2 --server "$sec" \
      --tls-ca "$dir/ca.pem" --token-file "$dir/bob.token" --json 2>"$dir/err")
    if python3 -c 'import json,sys; assert json.loads(sys.argv[1])["shared_memory"] is True' "$json" &&
      same_tensors "$dir/local.safetensors" "$dir/sec.safetensors"; then
      ok "compress with a token over TLS and shared memory"
    else
      bad "compress with a token over TLS and shared memory: $json $(cat "$dir/err")"
    fi
  fi
  stop_server "$server3_pid"
else
  bad "openssl could not make the test certificates"
fi

# scripts/serve.sh: this machine only unless told otherwise, and a warning
# when opened without authentication and TLS (dry runs print the command).
serve=$root/scripts/serve.sh
out=$(MEDAKV_SERVE_DRY_RUN=1 MEDAKV_SERVER_BIN="$server_bin" bash "$serve" --max_inflight=2 2>"$dir/serve.err")
if [ $? -eq 0 ] && echo "$out" | grep -q -- "--listen=127.0.0.1:50051 --metrics_listen=127.0.0.1:9464 --max_inflight=2" &&
  [ ! -s "$dir/serve.err" ]; then
  ok "serve.sh: 127.0.0.1 by default, no warning"
else
  bad "serve.sh defaults: $out $(cat "$dir/serve.err")"
fi
out=$(MEDAKV_HOST=0.0.0.0 MEDAKV_SERVE_DRY_RUN=1 MEDAKV_SERVER_BIN="$server_bin" bash "$serve" 2>"$dir/serve.err")
if echo "$out" | grep -q -- "--listen=0.0.0.0:50051 --metrics_listen=0.0.0.0:9464" &&
  grep -q "WARNING: gRPC listens on 0.0.0.0:50051" "$dir/serve.err" && grep -q "no authentication" "$dir/serve.err" &&
  grep -q "no TLS" "$dir/serve.err" && grep -q "WARNING: /metrics listens on 0.0.0.0:9464" "$dir/serve.err"; then
  ok "serve.sh with MEDAKV_HOST=0.0.0.0: warnings"
else
  bad "serve.sh MEDAKV_HOST=0.0.0.0: $out $(cat "$dir/serve.err")"
fi
out=$(MEDAKV_HOST=0.0.0.0 MEDAKV_SERVE_DRY_RUN=1 MEDAKV_SERVER_BIN="$server_bin" bash "$serve" --tls_cert=s.pem \
  --tls_key=s.key --auth_tokens_file tokens --metrics_listen=127.0.0.1:9464 2>"$dir/serve.err")
if [ $? -eq 0 ] && [ ! -s "$dir/serve.err" ]; then
  ok "serve.sh: no warning with TLS, tokens and a local metrics port"
else
  bad "serve.sh with TLS and tokens: $out $(cat "$dir/serve.err")"
fi
out=$(MEDAKV_SERVE_DRY_RUN=1 MEDAKV_SERVER_BIN="$server_bin" bash "$serve" --listen 0.0.0.0:6000 \
  --auth_tokens_file=tokens 2>"$dir/serve.err")
if grep -q "WARNING: gRPC listens on 0.0.0.0:6000" "$dir/serve.err" && grep -q "no TLS" "$dir/serve.err" &&
  ! grep -q "no authentication" "$dir/serve.err" && ! grep -q "/metrics" "$dir/serve.err"; then
  ok "serve.sh --listen 0.0.0.0:6000 with tokens only: the TLS warning"
else
  bad "serve.sh --listen 0.0.0.0:6000: $out $(cat "$dir/serve.err")"
fi
MEDAKV_SERVER_BIN="$server_bin" bash "$serve" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --backend=cpu \
  --shutdown_grace=1s 2>"$dir/server4.err" &
server3_pid=$!
port4=$(wait_port "$dir/server4.err" "$server3_pid")
if [ -n "$port4" ] && [ "$("$medakv" health --server "127.0.0.1:$port4" 2>&1)" = SERVING ]; then
  ok "serve.sh starts the server"
else
  bad "serve.sh starts the server: $(cat "$dir/server4.err")"
fi
stop_server "$server3_pid"
server3_pid=

# Port 1 on loopback: nothing listens there.
expect_error "preset without --server" "--preset needs --server" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --preset soft
MEDAKV_SERVER=127.0.0.1:1 expect_error "compress: \$MEDAKV_SERVER unreachable" \
  "cannot reach server 127.0.0.1:1: UNAVAILABLE" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --timeout 5
expect_error "compress: server unreachable" "cannot reach server 127.0.0.1:1: UNAVAILABLE" \
  compress "$dir/in.safetensors" -o "$dir/o.safetensors" --server 127.0.0.1:1 --timeout 5
expect_error "health: server unreachable" "cannot reach server 127.0.0.1:1: UNAVAILABLE" health --server 127.0.0.1:1
expect_error "--timeout without --server" "--timeout needs --server" compress "$dir/in.safetensors" -o "$dir/o.safetensors" --timeout 3
expect_error "bad --chunk-bytes" "--chunk-bytes must be > 0" compress "$dir/in.safetensors" -o "$dir/o.safetensors" \
  --server 127.0.0.1:1 --chunk-bytes 0

if [ -e "$dir/o.safetensors" ]; then bad "no output after errors"; else ok "no output after errors"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
