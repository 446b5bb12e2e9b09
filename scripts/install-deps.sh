#!/usr/bin/env bash
# Installs every build and test dependency of medakv on Debian 12.
# The one list of packages: .ci/run, the README and the container build call this script.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libabsl-dev
  libprotobuf-dev protobuf-compiler
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc
  prometheus-cpp-dev
  nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  # bench/ops_bench.cc compares the statistics and the merge with its sgemm.
  libopenblas-dev
  python3 python3-numpy python3-venv
  time
  # The security test makes its certificates with the openssl tool.
  openssl
  # Fuzzing (scripts/fuzz.sh): clang and libFuzzer's runtime.
  clang-14 libclang-rt-14-dev
  # The metrics end-to-end test: a real Prometheus and promtool.
  prometheus
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
