#!/bin/sh
# Creates bench/peer/.venv: CPU torch, NVIDIA's kvpress and what peer_bench.py
# reads files with (safetensors, numpy). For this benchmark only: never used
# by the build, the tests or CI. Usage: bench/peer/setup.sh [PYTHON]
#
# torch comes from the CPU-only index first (no CUDA libraries, ~200 MiB).
# Where that index cannot be reached (the development machine reaches PyPI
# only), it falls back to torch from PyPI, which brings the CUDA libraries
# (~3 GiB more on disk) but runs on the CPU all the same: peer_bench.py never
# touches a GPU (it hides every device with CUDA_VISIBLE_DEVICES= and puts
# every tensor on the CPU). Either way the version is the one pinned in
# requirements.txt.
set -e
cd "$(dirname "$0")"
PY=${1:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check"
TORCH=$(sed -n 's/^torch==//p' requirements.txt)
if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup.sh: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already in .venv"
elif $PIP install --retries 1 --timeout 15 --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH"; then
  echo "setup.sh: torch $TORCH from the CPU-only index"
else
  echo "setup.sh: the CPU-only torch index is not reachable; torch $TORCH from PyPI (with CUDA libraries, run on the CPU)" >&2
  $PIP install "torch==$TORCH"
fi
$PIP install -r requirements.txt
.venv/bin/python - <<'EOF'
import importlib.metadata as md
import torch
print("setup.sh: ok: torch %s (CUDA build: %s), kvpress %s, transformers %s, safetensors %s, numpy %s" % (
    torch.__version__, torch.version.cuda, md.version("kvpress"), md.version("transformers"),
    md.version("safetensors"), md.version("numpy")))
EOF
