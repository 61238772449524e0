"""The public API type-checks (mypy, the modules listed under ``[tool.mypy]`` in
pyproject.toml), and the package says so to type checkers with ``py.typed``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[test]')")
def test_the_public_api_type_checks():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    for module in ("api.py", "models/user.py", "methods/__init__.py", "cli.py"):
        assert f"src/srdxai/{module}" in config["files"], module
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
