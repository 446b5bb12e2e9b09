"""The example worker runs against a real server and prints what it saved."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "inference_worker.py"


def test_inference_worker_example(server):
    done = subprocess.run([sys.executable, str(EXAMPLE), "--server", server.address, "--layers", "4",
                           "--image-tokens", "144", "--rho", "0.25"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"server {server.address}: SERVING, backend cpu" in out
    m = re.search(r"policy meda, rho 0.25: kept (\d+) of (\d+) tokens \(25.0%\), KV ([\d.]+) MiB -> ([\d.]+) MiB", out)
    assert m, out
    assert int(m.group(2)) == 4 * (40 + 144 + 100) and int(m.group(1)) == round(0.25 * int(m.group(2)))
    assert float(m.group(4)) < float(m.group(3))
    assert len(re.findall(r"^\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+\d+$", out, re.M)) == 4  # one row per layer


def test_inference_worker_reports_an_unreachable_server():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--server", "127.0.0.1:1", "--timeout", "5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot reach server 127.0.0.1:1: UNAVAILABLE" in done.stderr
