#!/usr/bin/env bash
# Runs check_deploy.py in a virtual environment with the pinned packages of
# requirements.txt (created on first use, recreated when the list changes).
#   run_check.sh VENV_DIR setup            create or refresh the environment
#   run_check.sh VENV_DIR run ARGS...      run check_deploy.py ARGS...
# Needs python3 with the venv module (Debian: python3-venv) and, for the
# first setup, PyPI; after that everything is offline.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=$1
action=$2
shift 2
requirements=$here/requirements.txt
stamp=$venv/.requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)

setup() {
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "run_check: $venv is up to date"
    return 0
  fi
  rm -rf "$venv"
  if ! python3 -m venv "$venv"; then
    echo "run_check: python3 -m venv failed: install python3-venv (Debian) and try again" >&2
    exit 1
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"
  echo "$want" > "$stamp"
  echo "run_check: installed $(grep -c '==' "$requirements") pinned packages into $venv"
}

case "$action" in
  setup) setup ;;
  run)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then setup; fi
    exec "$venv/bin/python" "$here/check_deploy.py" "$@"
    ;;
  *) echo "usage: $0 VENV_DIR setup|run [ARGS...]" >&2; exit 2 ;;
esac
