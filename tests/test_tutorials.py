"""Every tutorial of the documentation runs: its ``python`` blocks in order, in one namespace,
in a fresh folder (and, for the pages in ``RUNS_SHELL``, its ``sh`` blocks with this
environment's ``srdxai`` first). Pages whose data is not installed skip and say why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from srdxai.data.fashion import fashion_mnist_root

TUTORIALS = Path(__file__).resolve().parent.parent / "docs" / "tutorials"
#: pages whose shell commands are meant to be run as they stand (elsewhere they show commands
#: for the reader's own files)
RUNS_SHELL = {"paper_tables.md"}
NEEDS_FASHION = {"compare_methods.md", "paper_tables.md"}
HAVE_FASHION = (fashion_mnist_root() / "t10k-images-idx3-ubyte.gz").is_file()


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_every_tutorial_is_tested():
    pages = sorted(p.name for p in TUTORIALS.glob("*.md"))
    assert pages == sorted(["own_model.md", "compare_methods.md", "erf.md", "paper_tables.md"])
    for page in pages:
        assert _blocks((TUTORIALS / page).read_text(), "python") or page in RUNS_SHELL, page


@pytest.mark.parametrize("page", sorted(p.name for p in TUTORIALS.glob("*.md")))
def test_the_tutorial_runs(page, tmp_path, monkeypatch):
    if page in NEEDS_FASHION and not HAVE_FASHION:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or "
                    "set SRDXAI_FASHION_MNIST)")
    text = (TUTORIALS / page).read_text()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if page in RUNS_SHELL:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                   f"{os.environ.get('PATH', '')}")
        for block in _blocks(text, "sh"):
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, (block, done.stderr[-3000:])
    code = "\n".join(_blocks(text, "python"))
    exec(compile(code, str(TUTORIALS / page), "exec"), {"__name__": "__tutorial__"})
