#!/usr/bin/env bash
# Starts medakv-server on this machine only: gRPC on 127.0.0.1:50051 and
# Prometheus /metrics on 127.0.0.1:9464, the CUDA backend when a device
# answers, else the CPU backend. Installs the dependencies (Debian 12) and
# builds first. Extra arguments go to the server after these defaults, so
# they win (e.g. --max_inflight=8 or --listen=127.0.0.1:6000; --help lists
# them all).
#
# Open it to other machines with MEDAKV_HOST=0.0.0.0 (both ports; or the
# address of one interface), or with --listen / --metrics_listen. Without
# authentication every client that reaches the gRPC port can read, overwrite
# and delete every cache, and the metrics port never has any: so on anything
# but loopback, give the server TLS and bearer tokens (SECURITY.md, "Running
# it safely"):
#   MEDAKV_HOST=0.0.0.0 scripts/serve.sh --tls_cert=server.pem --tls_key=server.key \
#     --auth_tokens_file=tokens
# and keep the metrics port to the monitoring network (a firewall, or
# --metrics_listen=127.0.0.1:9464). The script warns on stderr when the gRPC
# port is opened beyond loopback without both, and when the metrics port is.
#
# Environment:
#   MEDAKV_HOST        the address both ports listen on (default 127.0.0.1)
#   MEDAKV_BUILD_DIR   the build folder (default build/)
#   MEDAKV_SERVER_BIN  run this medakv-server binary: no install, no build
#   MEDAKV_SERVE_DRY_RUN=1  print the command (and the warnings) instead of
#                      running it (the tests use it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
host=${MEDAKV_HOST:-127.0.0.1}
case "$host" in
  *:*) bracketed="[$host]" ;;  # an IPv6 address
  *) bracketed=$host ;;
esac
args=("--listen=$bracketed:50051" "--metrics_listen=$bracketed:9464" "$@")

# The addresses and security flags in effect: the last of each wins, as in
# the server (flags may be given as --flag=value or --flag value, with - or --).
listen='' metrics='' tls_cert='' tokens=''
i=0
while [ $i -lt ${#args[@]} ]; do
  a=${args[$i]}
  name=${a#--}
  name=${name#-}
  value=
  case "$name" in
    *=*) value=${name#*=}; name=${name%%=*} ;;
    listen | metrics_listen | tls_cert | auth_tokens_file)
      i=$((i + 1))
      value=${args[$i]:-}
      ;;
  esac
  case "$name" in
    listen) listen=$value ;;
    metrics_listen) metrics=$value ;;
    tls_cert) tls_cert=$value ;;
    auth_tokens_file) tokens=$value ;;
  esac
  i=$((i + 1))
done

# Whether host:port (or a Unix socket) is reachable from this machine only.
local_only() {
  local h=${1%:*}
  case "$1" in
    unix:* | unix-abstract:*) return 0 ;;
  esac
  h=${h#[}
  h=${h%]}
  case "$h" in
    127.* | localhost | ::1) return 0 ;;
    *) return 1 ;;
  esac
}
warnings=()
if ! local_only "$listen" && { [ -z "$tls_cert" ] || [ -z "$tokens" ]; }; then
  warnings+=("gRPC listens on $listen, beyond this machine, with")
  [ -n "$tokens" ] || warnings+=("  no authentication (--auth_tokens_file): any client that reaches it can read, overwrite and delete every cache")
  [ -n "$tls_cert" ] || warnings+=("  no TLS (--tls_cert, --tls_key): caches and tokens cross the network in plaintext")
  warnings+=("see SECURITY.md (\"Running it safely\"); MEDAKV_HOST=127.0.0.1 (the default) keeps it to this machine")
fi
if [ -n "$metrics" ] && ! local_only "$metrics"; then
  warnings+=("/metrics listens on $metrics, beyond this machine, and has no authentication or TLS: keep it to the monitoring network")
fi
warn() {
  local w
  for w in "${warnings[@]}"; do echo "serve.sh: WARNING: $w" >&2; done
}

if [ -n "${MEDAKV_SERVER_BIN:-}" ]; then
  server=$MEDAKV_SERVER_BIN
else
  build=${MEDAKV_BUILD_DIR:-$root/build}
  server=$build/service/server/medakv-server
fi
if [ "${MEDAKV_SERVE_DRY_RUN:-}" = 1 ]; then
  warn
  printf '%q ' "$server" "${args[@]}"
  echo
  exit 0
fi
if [ -z "${MEDAKV_SERVER_BIN:-}" ]; then
  bash "$root/scripts/install-deps.sh"
  launcher=()
  if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  fi
  cmake -S "$root" -B "$build" -G Ninja "${launcher[@]}" >/dev/null
  cmake --build "$build" -j"$(nproc)" --target medakv-server medakv
fi
warn  # after the build's output, where it is seen
exec "$server" "${args[@]}"
