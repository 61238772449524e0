"""The files a user or a packager reads besides the code: the citation, the changelog and the
typing marker agree with the package's version and ship with it."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import yaml

import srdxai

ROOT = Path(__file__).resolve().parent.parent


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_version_is_one_number_everywhere():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert srdxai.__version__ == _project_version() == str(citation["version"])
    assert f"{_project_version()}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_the_citation_file_cites_the_methods_papers():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "type", "license"):
        assert citation.get(key), key
    titles = " ".join(ref["title"] for ref in citation["references"])
    for words in ("Sharing Ratio Decomposition", "Relative Absolute Magnitude",
                  "gradient-based attribution"):
        assert words in titles, words
    for ref in citation["references"]:
        assert ref["authors"] and ref["year"], ref["title"]


def test_the_package_is_marked_typed():
    assert resources.files("srdxai").joinpath("py.typed").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in data["package-data"]["srdxai"]


def _readme_table(first_cell: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"| {first_cell} |")
    return text[start:text.index("\n\n", start)]


def test_the_readmes_method_and_metric_tables_match_the_library():
    import re

    import srdxai.metrics
    import srdxai.robustness
    from srdxai.methods import METHODS

    listed = re.findall(r"`(\w+)`", _readme_table("family"))
    assert sorted(listed) == sorted(METHODS), "the README's method table is not METHODS"
    # one row per family, listing exactly the registered metrics of that family
    rows = _readme_table("metric family").splitlines()[2:]
    listed_by_family = {row.split("|")[1].strip(): sorted(re.findall(r"`(\w+)`", row))
                        for row in rows}
    registered: dict[str, list[str]] = {}
    for info in srdxai.metrics.by_family():
        registered.setdefault(info.family, []).append(info.name)
    assert listed_by_family == {f: sorted(names) for f, names in registered.items()}, (
        "the README's metric table is not the registry (srdxai metrics)")
    for names in listed_by_family.values():
        for name in names:
            assert hasattr(srdxai.metrics, name) or hasattr(srdxai.robustness, name), name
