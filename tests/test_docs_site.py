"""The documentation site (MkDocs, API reference from the docstrings) builds with every warning
an error: a broken link, a page missing from the navigation or a docstring the reference cannot
render fails the test suite, so CI keeps the site whole."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                    or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs / mkdocstrings not installed (pip install -e '.[docs]')")
def test_the_documentation_site_builds_with_warnings_as_errors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "tutorials/own_model/index.html", "api/methods/index.html",
                 "benchmarks/index.html", "engine/index.html"):
        assert (site / page).is_file(), page
    # the API reference is generated from the docstrings
    assert "Sharing Ratio Decomposition" in (site / "api/methods/index.html").read_text()
