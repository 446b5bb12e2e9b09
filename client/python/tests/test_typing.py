"""The package's type hints hold: mypy --strict (pyproject.toml [tool.mypy]) finds nothing, and py.typed ships."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import medakv

PACKAGE = Path(__file__).resolve().parents[1]


def test_mypy_strict_on_the_package(tmp_path):
    pytest.importorskip("mypy")
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(PACKAGE / "pyproject.toml"),
                           "--cache-dir", str(tmp_path), str(PACKAGE / "src" / "medakv")],
                          capture_output=True, text=True, cwd=PACKAGE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_installed_package_is_typed():
    installed = Path(medakv.__file__).parent
    assert (installed / "py.typed").is_file()
    assert (installed / "v1" / "medakv_pb2.pyi").is_file()
