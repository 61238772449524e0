"""Damaged, foreign, empty or unwritable run directories: one-line errors, files left alone.

Covers ``ResultStore`` (what ``srdxai bench`` opens before any work), ``merge``, the report's
reading and writing, the command line's one-line messages, and the Markdown report's escaping
of everything it takes from a database.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from srdxai.cli import cli
from srdxai.errors import InvalidInputError, RunDirectoryError, SrdxaiError
from srdxai.experiments import store as store_module
from srdxai.experiments.store import (
    SCHEMA,
    ResultStore,
    Row,
    Unit,
    merge,
    merged_path,
    rank_path,
    sqlite_uri,
)
from srdxai.report.render import build_report


def _permissions_enforced() -> bool:
    """False for root (as a rule: it ignores file modes), True for other users; tried, not
    assumed from the user id, since root without CAP_DAC_OVERRIDE is held to them too."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            Path(folder, "probe").write_text("x")
        except PermissionError:
            return True
        finally:
            os.chmod(folder, 0o755)
        return False


needs_permissions = pytest.mark.skipif(not _permissions_enforced(),
                                       reason="file permissions do not bind this user (root)")
CONFIG = {"experiments": ["table2"], "quick": True}


def _open(path: Path, config_hash: str = "h1") -> ResultStore:
    return ResultStore(path, CONFIG, config_hash, "v1")


def _unit(k: int, method: str = "Saliency") -> Unit:
    return Unit("table2", "fmnist-vgg-relu", method, k)


def _write(store: ResultStore, k: int, method: str = "Saliency", rank: int = 0,
           artifact: bytes | None = None) -> None:
    store.write_unit(_unit(k, method), 0, rank, 0.1,
                     [Row("fidelity", 2 * k, 0.25), Row("fidelity", 2 * k + 1, 0.5)],
                     artifacts=None if artifact is None else {f"grid/{k}": artifact})


def _good(path: Path, units: int = 3) -> Path:
    with _open(path) as store:
        for k in range(units):
            _write(store, k)
    return path


def _units(path: Path) -> int:
    con = sqlite3.connect(sqlite_uri(path, "ro"), uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    finally:
        con.close()


def _leftovers(folder: Path) -> list[str]:
    """Temporary files srdxai may have left (it must not)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.endswith((".new", ".tmp", "-journal")))


def _one_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srdxai: error: "), result.stderr
    return lines[0]


# --- creating and resuming ------------------------------------------------------------------


def test_a_new_database_is_created_complete_and_resumed(tmp_path):
    path = rank_path(tmp_path / "run", 0)
    with _open(path) as store:
        _write(store, 0)
    assert _leftovers(path.parent) == []
    con = sqlite3.connect(path)
    meta = dict(con.execute("SELECT key, value FROM meta"))
    con.close()
    assert json.loads(meta["config"]) == CONFIG and meta["config_hash"] == "h1"
    with _open(path) as store:
        assert store.done(_unit(0)) and not store.done(_unit(1))


# --- what is at the path is not a usable database: refused, left byte for byte ---------------


def _refused(path: Path, match: str) -> RunDirectoryError:
    before = path.read_bytes()
    with pytest.raises(RunDirectoryError, match=match) as err:
        _open(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert path.read_bytes() == before  # never modified, replaced or deleted
    assert _leftovers(path.parent) == []
    return err.value


def test_an_empty_file_does_not_restart_the_run(tmp_path):
    path = rank_path(tmp_path, 0)
    path.write_bytes(b"")
    err = _refused(path, r"empty \(0 bytes\)")
    assert "start a new run directory" in str(err) and f"mv {path}" in str(err)
    assert isinstance(err, InvalidInputError) and isinstance(err, SrdxaiError)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = rank_path(tmp_path, 0)
    path.write_bytes(b"this is not an SQLite database, only text. " * 200)
    _refused(path, "not a readable SQLite results database")


def test_damaged_pages_fail_the_integrity_check_and_the_units_are_counted(tmp_path):
    path = _good(rank_path(tmp_path, 0))
    con = sqlite3.connect(path)
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    con.close()
    data = bytearray(path.read_bytes())
    start = (root - 1) * page_size  # the results table's page; the units table is intact
    data[start:start + page_size] = b"\xa5" * page_size
    path.write_bytes(bytes(data))
    err = _refused(path, "not a readable SQLite results database")
    assert "quick_check" in str(err) or "malformed" in str(err)
    assert "still lists 3 finished units" in str(err)


def test_a_database_without_configuration_is_refused(tmp_path):
    path = rank_path(tmp_path, 0)
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)  # what an older srdxai killed while creating it left behind
    con.close()
    _refused(path, "holds no run configuration .its units table still lists 0 finished units")


def test_foreign_or_reshaped_databases_are_refused_not_amended(tmp_path):
    path = rank_path(tmp_path, 0)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.commit()
    con.close()
    _refused(path, r"not a srdxai results database \(no meta, results, curves, units, artifacts")
    path.unlink()
    con = sqlite3.connect(path)
    con.executescript(SCHEMA.replace("rank INTEGER NOT NULL, seconds", "seconds"))
    con.close()
    _refused(path, r"it has units\(experiment, model, method, unit, seconds\) instead of")


def test_another_configuration_is_still_refused(tmp_path):
    path = _good(rank_path(tmp_path, 0), units=1)
    with pytest.raises(InvalidInputError, match="another configuration"):
        _open(path, config_hash="h2")


# --- unwritable: refused before any work ------------------------------------------------------


@needs_permissions
def test_a_read_only_run_directory_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    _good(rank_path(run_dir, 0), units=1)
    run_dir.chmod(0o555)
    try:
        with pytest.raises(RunDirectoryError, match=f"the directory {run_dir} is not writable"):
            _open(rank_path(run_dir, 0))
        with pytest.raises(RunDirectoryError, match="not writable"):
            _open(rank_path(run_dir, 1))  # a new rank's database cannot be created either
    finally:
        run_dir.chmod(0o755)
    assert not rank_path(run_dir, 1).exists()


@needs_permissions
def test_a_read_only_database_is_refused_before_any_work(tmp_path):
    path = _good(rank_path(tmp_path, 0), units=1)
    path.chmod(0o444)
    try:
        with pytest.raises(RunDirectoryError, match=r"it is read-only .*chmod u\+rw"):
            _open(path)
    finally:
        path.chmod(0o644)


def _deny_writing(monkeypatch, directory: Path) -> None:
    """``os.access`` answers for ``directory`` as for a non-root user without write access."""
    real_access = os.access

    def access(path, mode, **kwargs):
        if mode & os.W_OK and Path(path) == directory:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(store_module.os, "access", access)


def test_unwritable_directory_simulated(tmp_path, monkeypatch):
    """Root ignores permissions: os.access says what a non-root user would be told."""
    run_dir = tmp_path / "run"
    _good(rank_path(run_dir, 0), units=1)
    _deny_writing(monkeypatch, run_dir)
    with pytest.raises(RunDirectoryError, match=f"the directory {run_dir} is not writable"):
        _open(rank_path(run_dir, 0))
    result = CliRunner().invoke(cli, ["bench", str(run_dir), "--experiments", "table2",
                                      "--quick", "--quiet"])
    assert "is not writable" in _one_line(result)
    assert _units(rank_path(run_dir, 0)) == 1


def test_read_only_database_simulated_is_refused_at_open(tmp_path, monkeypatch):
    """SQLite's own read-only mode (enforced for root too) is caught by the write probe."""
    path = _good(rank_path(tmp_path, 0), units=1)
    before = path.read_bytes()
    real_connect = sqlite3.connect

    def read_only(database, *args, **kwargs):
        return real_connect(str(database).replace("mode=rw", "mode=ro"), *args, **kwargs)

    monkeypatch.setattr(store_module.sqlite3, "connect", read_only)
    with pytest.raises(RunDirectoryError, match="it is read-only"):
        _open(path)

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(store_module.sqlite3, "connect", refuse)
    with pytest.raises(RunDirectoryError, match=r"cannot open .* it is read-only"):
        _open(path)
    with pytest.raises(RunDirectoryError, match=r"cannot create .* it is read-only"):
        _open(rank_path(tmp_path, 1))
    assert path.read_bytes() == before and not rank_path(tmp_path, 1).exists()
    assert _leftovers(tmp_path) == []


def test_a_run_directory_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(RunDirectoryError, match="exists and is not a directory"):
        _open(rank_path(tmp_path / "run", 0))


# --- write failures during a unit -------------------------------------------------------------


def test_a_full_disk_rolls_the_unit_back_and_the_run_continues(tmp_path):
    path = rank_path(tmp_path, 0)
    store = _open(path)
    _write(store, 0)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's real SQLITE_FULL
    with pytest.raises(RunDirectoryError, match=r"record unit 1 .* the disk is full"):
        _write(store, 1, artifact=b"\x89PNG" + bytes(200_000))
    assert not store.done(_unit(1)) and _units(path) == 1
    store.db.execute(f"PRAGMA max_page_count = {pages * 1000}")  # space freed
    _write(store, 1, artifact=b"\x89PNG" + bytes(200_000))
    store.close()
    with _open(path) as again:  # passes the integrity check, both units recorded once
        assert again.done(_unit(0)) and again.done(_unit(1))
        assert again.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4


def test_a_database_made_read_only_mid_run_keeps_its_units(tmp_path):
    path = _good(rank_path(tmp_path, 0), units=1)
    store = _open(path)
    store.db.close()
    store.db = sqlite3.connect(sqlite_uri(path, "ro"), uri=True)  # root cannot bypass this
    with pytest.raises(RunDirectoryError, match=r"record unit 5 .* it is read-only"):
        _write(store, 5)
    store.close()
    assert _units(path) == 1 and not store.done(_unit(5))


# --- merge ------------------------------------------------------------------------------------


def test_merge_refuses_a_damaged_rank_and_keeps_the_merged_file(tmp_path):
    _good(rank_path(tmp_path, 0))
    with _open(rank_path(tmp_path, 1)) as store:
        _write(store, 7, rank=1)
    merged = merge(tmp_path)
    before = merged.read_bytes()
    rank_path(tmp_path, 1).write_bytes(b"")
    with pytest.raises(RunDirectoryError, match=r"results.rank1.sqlite is empty \(0 bytes\)"):
        merge(tmp_path)
    rank_path(tmp_path, 1).write_bytes(b"garbage " * 600)
    with pytest.raises(RunDirectoryError, match="rank1.sqlite is not a readable SQLite"):
        merge(tmp_path)
    assert merged.read_bytes() == before and _leftovers(tmp_path) == []
    result = CliRunner().invoke(cli, ["merge", str(tmp_path)])
    assert "results.rank1.sqlite is not a readable SQLite" in _one_line(result)


def test_merge_names_ranks_that_overlap(tmp_path):
    _good(rank_path(tmp_path, 0))
    with _open(rank_path(tmp_path, 1)) as store:
        _write(store, 0)  # as when a 1-process and a 2-process run share a directory
    with pytest.raises(RunDirectoryError, match="another rank file .* holds too"):
        merge(tmp_path)
    assert not merged_path(tmp_path).exists() and _leftovers(tmp_path) == []


def test_merge_into_an_unwritable_directory(tmp_path, monkeypatch):
    _good(rank_path(tmp_path, 0))
    _deny_writing(monkeypatch, tmp_path)
    with pytest.raises(RunDirectoryError, match="is not writable"):
        merge(tmp_path)
    assert not merged_path(tmp_path).exists()


# --- the report -------------------------------------------------------------------------------


def test_report_on_a_damaged_or_empty_merged_database(tmp_path):
    _good(rank_path(tmp_path, 0))
    merged = merge(tmp_path)
    merged.write_bytes(merged.read_bytes()[:100] + b"\x00" * 5000)  # header kept, pages lost
    before = merged.read_bytes()
    with pytest.raises(RunDirectoryError, match="not a readable SQLite") as err:
        build_report(tmp_path)
    assert f"srdxai merge {tmp_path}" in str(err.value)
    merged.write_bytes(b"")
    with pytest.raises(RunDirectoryError, match=r"empty \(0 bytes\)"):
        build_report(tmp_path)
    assert not (tmp_path / "report.md").exists()
    merged.write_bytes(before)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert "not a readable SQLite" in _one_line(result)


def test_report_with_wrong_columns(tmp_path):
    con = sqlite3.connect(merged_path(tmp_path))
    con.executescript(SCHEMA.replace("value REAL,", "score REAL,"))
    con.close()
    with pytest.raises(RunDirectoryError, match=r"it has results\(.*score.*\) instead of"):
        build_report(tmp_path)


def _merged_run(run_dir: Path) -> Path:
    _good(rank_path(run_dir, 0))
    return merge(run_dir)


@needs_permissions
def test_report_into_a_read_only_directory(tmp_path):
    _merged_run(tmp_path)
    tmp_path.chmod(0o555)
    try:
        result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    finally:
        tmp_path.chmod(0o755)
    line = _one_line(result)
    assert f"write report.html, report.md and figures/ into {tmp_path}" in line
    assert not (tmp_path / "report.md").exists()


def test_report_into_an_unwritable_directory_simulated(tmp_path, monkeypatch):
    _merged_run(tmp_path)
    build_report(tmp_path)
    old = (tmp_path / "report.md").read_bytes()
    _deny_writing(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert f"into {tmp_path}: the directory {tmp_path} is not writable" in _one_line(result)
    monkeypatch.undo()

    from srdxai.report import figures

    real_replace = figures.os.replace

    def denied(src, dst):
        if Path(dst).name == "report.md":
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(figures.os, "replace", denied)
    with pytest.raises(RunDirectoryError) as err:
        build_report(tmp_path)
    message = str(err.value)
    assert f"cannot write the report file {tmp_path / 'report.md'}: Permission denied" in message
    assert ".tmp" not in message  # names the report, not the temporary file
    assert (tmp_path / "report.md").read_bytes() == old and _leftovers(tmp_path) == []


def test_bench_refuses_a_damaged_run_directory_in_one_line(tmp_path):
    rank_path(tmp_path, 0).write_bytes(b"")
    result = CliRunner().invoke(cli, ["bench", str(tmp_path), "--experiments", "table2",
                                      "--quick", "--quiet"])
    line = _one_line(result)
    assert f"{rank_path(tmp_path, 0)} is empty (0 bytes)" in line
    assert rank_path(tmp_path, 0).read_bytes() == b"" and not merged_path(tmp_path).exists()


# --- Markdown escaping ------------------------------------------------------------------------

HOSTILE = {
    "experiment": "exp|x<script>alert(1)</script>",
    "model": "m_|*bold*\n# heading",
    "method": "a|b<script>*x*\nnext line",
    "metric": "[link](http://evil.example)`code`",
    "artifact": "grid/<img src=x onerror=alert(1)>|[x]: http://evil",
}


def _md_cells(line: str) -> int:
    """Cells of a Markdown table row, counting only unescaped pipes."""
    pipes, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        pipes += line[i] == "|"
        i += 1
    return pipes - 1


def _hostile_run(run_dir: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="PNG")
    con = sqlite3.connect(merged_path(run_dir))
    con.executescript(SCHEMA)
    config = {"quick": True, "note": "</code>```<script>alert(2)</script>&amp;"}
    con.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("config", json.dumps(config)), ("config_hash", "h<b>1"),
        ("code_version", "v`1`|"), ("created", "today\n## injected")])
    for experiment in (HOSTILE["experiment"], "table2"):
        for method in (HOSTILE["method"], "Saliency"):
            con.executemany(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, 0, 'h', 'v')",
                [(experiment, HOSTILE["model"], method, metric, s, v)
                 for metric in (HOSTILE["metric"], "fidelity")
                 for s, v in enumerate([0.1, None, 0.3])])
    con.execute("INSERT INTO artifacts VALUES (?, 'png', ?)", (HOSTILE["artifact"],
                                                               buf.getvalue()))
    con.commit()
    con.close()


def test_markdown_report_escapes_every_name_from_the_database(tmp_path):
    _hostile_run(tmp_path)
    html_path, md_path = build_report(tmp_path)
    md, page = md_path.read_text("utf-8"), html_path.read_text("utf-8")
    for raw in ("<script", "<img", "</code>", "\n# heading", "\n## injected", "*bold*", "*x*",
                "http://"):
        assert raw not in md, raw
    for line in md.splitlines():  # no link or link definition closes, but the figures'
        if line.startswith("!["):
            assert re.fullmatch(r"!\[(?:\\.|[^\\\[\]])*\]\(figures/[\w.-]+\)", line), line
        else:
            assert not re.search(r"(?<!\\)\][(:]", line), line
    lines = md.splitlines()
    tables = 0
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            tables += 1
            width = _md_cells(lines[i - 1])
            assert line.count("|") - 1 == width
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert _md_cells(lines[j]) == width, lines[j]
                j += 1
    assert tables >= 3
    # the names are still there, escaped: a pipe as \|, HTML as entities, newlines as spaces
    assert r"a\|b&lt;script&gt;\*x\* next line" in md
    assert r"m\_\|\*bold\*" in md
    # the configuration is equal JSON, without HTML or a fence closer in it
    block = md.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block)["note"] == "</code>```<script>alert(2)</script>&amp;"
    # every Markdown line that is not a table, heading, fence or figure is plain text
    assert all(not re.match(r"\s*(?:[-+*>]|\d+[.)])\s", line) for line in lines)
    # the HTML report escapes them too
    assert "<script" not in page and "<img src=x" not in page
    assert "a|b&lt;script&gt;*x*" in page
