#!/usr/bin/env bash
# Prints the Debian/Ubuntu packages that hold the shared libraries the given
# binaries load (ldd, then dpkg -S), one a line, sorted. The image's build
# stage runs it on medakv-server and medakv; the runtime stage installs what
# it prints, so the final image carries exactly the libraries the binaries
# need, whatever the distribution names them (libgrpc++1.51 on Debian 12,
# libgrpc++1.51t64 on Ubuntu 24.04). Fails when a library cannot be found or
# belongs to no package. libcuda.so.1 is skipped: the NVIDIA container
# toolkit mounts the driver's copy at run time.
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }

owner() {  # the package that holds a library path, or nothing
  local path=$1 p
  for p in "$path" "$(realpath -e "$path" 2>/dev/null || true)" "/usr$path" "${path#/usr}"; do
    [ -n "$p" ] || continue
    if out=$(dpkg -S "$p" 2>/dev/null); then
      echo "${out%%: *}" | tr ', ' '\n\n' | grep -v '^$' | head -n1
      return 0
    fi
  done
  return 1
}

packages=()
for bin in "$@"; do
  while read -r line; do
    case "$line" in
      linux-vdso.so*|*ld-linux*) continue ;;
      libcuda.so.1\ =\>\ not\ found*) continue ;;
      *"=> not found"*) echo "runtime-packages: $bin: ${line%% *} not found" >&2; exit 1 ;;
    esac
    path=$(sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p' <<<"$line")
    [ -n "$path" ] || continue
    if ! pkg=$(owner "$path"); then
      echo "runtime-packages: $bin: $path belongs to no package" >&2
      exit 1
    fi
    packages+=("$pkg")
  done < <(ldd "$bin")
done
printf '%s\n' "${packages[@]}" | sort -u
