"""The results database of a benchmark run: SQLite, one row per sample x method x metric.

A run directory holds one database per process (``results.rank<R>.sqlite``) and, once the
ranks are merged, ``results.sqlite``. Work is done in *units* (one experiment, model, method
and batch of samples); a unit's rows and its ``units`` entry are written in one transaction,
so a run killed at any moment loses at most the unit in progress and, started again, skips
every unit already recorded: nothing is lost and nothing is counted twice (the primary keys
refuse duplicates).

Schema (also read by ``srdxai.report``)::

    meta(key TEXT PRIMARY KEY, value TEXT)
        -- 'config' (JSON), 'config_hash', 'code_version', 'created' (ISO time)
    results(experiment, model, method, metric, sample INTEGER, value REAL (NULL = NaN),
            seed INTEGER, config_hash, code_version,
            PRIMARY KEY (experiment, model, method, metric, sample))
    curves(experiment, model, method, curve, sample INTEGER, x TEXT (JSON list),
           y TEXT (JSON list), PRIMARY KEY (experiment, model, method, curve, sample))
    units(experiment, model, method, unit INTEGER, rank INTEGER, seconds REAL,
          PRIMARY KEY (experiment, model, method, unit))
    artifacts(name TEXT PRIMARY KEY, kind TEXT, data BLOB)   -- e.g. PNG figures

A database is created under a temporary name, filled with the schema and the run's
configuration, and only then linked into place, so a srdxai database is never empty and always
names its configuration. A file at that path that is empty, lacks the schema or the
configuration, or fails SQLite's ``quick_check`` is therefore not ours or damaged: it is refused
with a :class:`~srdxai.errors.RunDirectoryError` that says what to do, and never modified,
replaced or deleted. So are a read-only file or directory (before any work is done), a locked
database and a full disk (the unit being written is rolled back; recorded units stay).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import quote

from ..errors import InvalidInputError, RunDirectoryError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS results (
    experiment TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL, metric TEXT NOT NULL,
    sample INTEGER NOT NULL, value REAL, seed INTEGER NOT NULL, config_hash TEXT NOT NULL,
    code_version TEXT NOT NULL,
    PRIMARY KEY (experiment, model, method, metric, sample));
CREATE TABLE IF NOT EXISTS curves (
    experiment TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL, curve TEXT NOT NULL,
    sample INTEGER NOT NULL, x TEXT NOT NULL, y TEXT NOT NULL,
    PRIMARY KEY (experiment, model, method, curve, sample));
CREATE TABLE IF NOT EXISTS units (
    experiment TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL, unit INTEGER NOT NULL,
    rank INTEGER NOT NULL, seconds REAL NOT NULL,
    PRIMARY KEY (experiment, model, method, unit));
CREATE TABLE IF NOT EXISTS artifacts (name TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB);
"""
TABLES = ("results", "curves", "units", "artifacts")


@dataclass(frozen=True)
class Unit:
    """One piece of work: an experiment's method on one model and one batch of samples."""

    experiment: str
    model: str
    method: str
    unit: int


@dataclass
class Row:
    metric: str
    sample: int
    value: float


@dataclass
class Curve:
    curve: str
    sample: int
    x: Sequence[float]
    y: Sequence[float]


def rank_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"results.rank{rank}.sqlite"


def merged_path(run_dir: Path) -> Path:
    return Path(run_dir) / "results.sqlite"


# --- opening and checking databases -------------------------------------------------------

@cache
def expected_columns() -> dict[str, tuple[str, ...]]:
    """Each table's column names in order, as :data:`SCHEMA` creates them."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(SCHEMA)
        return {t: tuple(r[1] for r in con.execute(f"PRAGMA table_info({t})"))
                for t in ("meta", *TABLES)}
    finally:
        con.close()


def sqlite_uri(path: Path, mode: str) -> str:
    """A ``file:`` URI for ``sqlite3.connect(..., uri=True)``; ``mode`` ro or rw (rw never
    creates the file)."""
    return f"file:{quote(Path(path).resolve().as_posix())}?mode={mode}"


def rank_hint(path: Path) -> str:
    """What to do about a damaged per-rank database (its units are recomputed only if asked)."""
    path = Path(path)
    return (f"srdxai leaves it untouched. Move it aside (`mv {path} {path}.damaged`) and run "
            f"`srdxai bench {path.parent}` again with the same options (and number of "
            "processes) to recompute the units it held, or start a new run directory")


def _problem(exc: sqlite3.Error) -> str:
    """Classify an SQLite error: full, readonly, locked, damaged, schema, cantopen, io, other."""
    name = (getattr(exc, "sqlite_errorname", None) or "").upper()
    text = str(exc).lower()
    if "FULL" in name or "is full" in text:
        return "full"
    if "READONLY" in name or "readonly" in text or "read-only" in text or "PERM" in name:
        return "readonly"
    if "BUSY" in name or "LOCKED" in name or "is locked" in text:
        return "locked"
    if ("CORRUPT" in name or "NOTADB" in name or "malformed" in text
            or "not a database" in text):
        return "damaged"
    if any(s in text for s in ("no such table", "no such column", "has no column",
                               "columns but")):
        return "schema"
    if "CANTOPEN" in name or "unable to open" in text:
        return "cantopen"
    if "IOERR" in name or "i/o error" in text:
        return "io"
    return "other"


def database_error(exc: sqlite3.Error, path: Path, doing: str, hint: str) -> RunDirectoryError:
    """A one-line :class:`RunDirectoryError` for an SQLite error while ``doing`` (e.g. "open",
    "write unit ... to") on ``path``; ``hint`` says what to do about a damaged file."""
    path = Path(path)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    kind = _problem(exc)
    if kind == "full":
        return RunDirectoryError(
            f"cannot {doing} {path}: the disk is full ({reason}); nothing was half-written. "
            "Free some space and run the same command again: what is recorded is kept.")
    if kind == "readonly":
        return RunDirectoryError(
            f"cannot {doing} {path}: it is read-only ({reason}). Make it and its directory "
            f"writable (`chmod u+w {path} {path.parent}`) and run again (what is recorded is "
            "kept), or use a new run directory.")
    if kind == "locked":
        return RunDirectoryError(
            f"cannot {doing} {path}: another process holds it locked ({reason}). Wait for the "
            f"other srdxai process using {path.parent} to finish (or stop it) and run again.")
    if kind == "damaged":
        return RunDirectoryError(
            f"{path} is not a readable SQLite results database ({reason}); {hint}.")
    if kind == "schema":
        return RunDirectoryError(
            f"{path} is not a srdxai results database ({reason}); {hint}.")
    if kind == "cantopen":
        return RunDirectoryError(
            f"cannot {doing} {path} ({reason}). Check that {path.parent} exists and that you "
            "may read and write it, or use a new run directory.")
    if kind == "io":
        return RunDirectoryError(
            f"cannot {doing} {path}: disk I/O error ({reason}). Check the disk, then run the "
            "same command again: what is recorded is kept.")
    return RunDirectoryError(f"cannot {doing} {path}: {reason}; {hint}.")


def check_writable(directory: Path, doing: str) -> None:
    """Refuse, before any work, a directory that this process may not create files in."""
    directory = Path(directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RunDirectoryError(
            f"cannot {doing}: the directory {directory} is not writable (read-only file system "
            f"or permissions). Make it writable (`chmod u+w {directory}`) or use another "
            "directory.")


def _count_units(db: sqlite3.Connection) -> str:
    """A note on how many finished units the table lists; empty if it cannot be read."""
    try:
        n = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    except sqlite3.Error:
        return ""
    return f" (its units table still lists {n} finished unit{'s' if n != 1 else ''})"


def check_database(db: sqlite3.Connection, path: Path, tables: Sequence[str], hint: str,
                   integrity: bool = True) -> None:
    """Refuse a database that fails SQLite's quick_check (when ``integrity``) or lacks one of
    ``tables`` with the columns of :data:`SCHEMA`. SQLite errors propagate."""
    if integrity:
        try:
            verdict = [str(r[0]) for r in db.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as exc:  # damage the check itself trips over
            if _problem(exc) != "damaged":
                raise
            verdict = [str(exc)]
        if verdict != ["ok"]:
            found = " ".join("; ".join(verdict).split())[:300]
            raise RunDirectoryError(
                f"{path} is not a readable SQLite results database: it is damaged (SQLite's "
                f"quick_check: {found}){_count_units(db)}; {hint}.")
    expected = expected_columns()
    missing, wrong = [], []
    for table in tables:
        columns = tuple(r[1] for r in db.execute(f"PRAGMA table_info({table})"))
        if not columns:
            missing.append(table)
        elif columns != expected[table]:
            wrong.append(f"{table}({', '.join(columns)}) instead of "
                         f"{table}({', '.join(expected[table])})")
    if missing:
        raise RunDirectoryError(
            f"{path} is not a srdxai results database (no {', '.join(missing)} table); {hint}.")
    if wrong:
        raise RunDirectoryError(
            f"{path} is not a srdxai results database (it has {'; '.join(wrong)}); {hint}.")


def open_database(path: Path, mode: str, tables: Sequence[str], hint: str,
                  integrity: bool = True) -> sqlite3.Connection:
    """Open an existing results database (``mode`` ro or rw; never created) and check it with
    :func:`check_database`; any problem is a :class:`RunDirectoryError`."""
    path = Path(path)
    if not path.is_file():
        raise RunDirectoryError(f"{path} is not a file; {hint}.")
    if path.stat().st_size == 0:
        # srdxai creates its databases complete (see the module doc): an empty file was
        # truncated or made by something else, and holds nothing to resume from.
        raise RunDirectoryError(
            f"{path} is empty (0 bytes), so it is not a readable SQLite results database "
            "(srdxai never leaves one empty: it was truncated, or made by another program, "
            "e.g. by opening the path with the sqlite3 shell before the run created it; if "
            f"so, delete it); {hint}.")
    try:
        db = sqlite3.connect(sqlite_uri(path, mode), uri=True)
    except sqlite3.Error as exc:
        raise database_error(exc, path, "open", hint) from exc
    try:
        check_database(db, path, tables, hint, integrity)
    except sqlite3.Error as exc:
        db.close()
        raise database_error(exc, path, "read", hint) from exc
    except BaseException:
        db.close()
        raise
    return db


def _create(path: Path, config: dict, config_hash: str, code_version: str) -> None:
    """Create ``path`` complete (schema and configuration) or not at all, never replacing a
    file that appeared meanwhile."""
    from datetime import UTC, datetime

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.new")
    try:
        con = sqlite3.connect(tmp)
        try:
            con.executescript(SCHEMA)
            with con:
                con.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("config", json.dumps(config, sort_keys=True)),
                    ("config_hash", config_hash), ("code_version", code_version),
                    ("created", datetime.now(UTC).isoformat(timespec="seconds"))])
        finally:
            con.close()
        try:
            os.link(tmp, path)  # fails if the name exists: nothing is overwritten
        except FileExistsError:
            pass  # another process created it: open that one (it is checked like any other)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                 errno.EMLINK, errno.ENOSYS) or path.exists():
                raise
            os.replace(tmp, path)  # no hard links on this file system
    except sqlite3.Error as exc:
        raise database_error(exc, path, "create", rank_hint(path)) from exc
    except OSError as exc:
        raise RunDirectoryError(
            f"cannot create {path}: {exc.strerror or exc}. Make {path.parent} writable, free "
            "some space, or use a new run directory.") from exc
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


class ResultStore:
    """One process's results database (a context manager).

    Opening it creates the database (complete, see the module doc) or checks the existing one:
    damaged, foreign, empty, read-only, locked or configured differently, it is refused with a
    :class:`~srdxai.errors.RunDirectoryError` before any work is done, and left as it is."""

    def __init__(self, path: Path, config: dict, config_hash: str, code_version: str):
        self.path = Path(path)
        self.config_hash, self.code_version = config_hash, code_version
        run_dir = self.path.parent
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise RunDirectoryError(f"the run directory {run_dir} exists and is not a "
                                    "directory; choose another path.") from exc
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot create the run directory {run_dir}: {exc.strerror or exc}. Choose a "
                "path you may write to.") from exc
        check_writable(run_dir, f"write the results into {run_dir}")
        if not os.path.lexists(self.path):
            _create(self.path, config, config_hash, code_version)
        elif self.path.is_file() and not os.access(self.path, os.R_OK | os.W_OK):
            raise RunDirectoryError(
                f"cannot resume from {self.path}: it is read-only (or unreadable) for you. Make "
                f"it readable and writable (`chmod u+rw {self.path}`), or start a new run "
                "directory.")
        hint = rank_hint(self.path)
        self.db = open_database(self.path, "rw", ("meta", *TABLES), hint)
        try:
            stored = dict(self.db.execute("SELECT key, value FROM meta"))
            if "config_hash" not in stored or "config" not in stored:
                raise RunDirectoryError(
                    f"{self.path} holds no run configuration{_count_units(self.db)}: srdxai "
                    f"writes it when it creates the file, so the file is damaged or not "
                    f"srdxai's; {hint}.")
            if stored["config_hash"] != config_hash:
                raise RunDirectoryError(
                    f"{self.path} holds a run with another configuration (hash "
                    f"{stored['config_hash']}, now {config_hash}); resume it with the same "
                    "options or use a new run directory.")
            # Write once and roll back, before any unit is computed: a read-only file or file
            # system, a directory where the journal cannot be made, or a lock held by another
            # process shows here. The file itself is not touched (rollback journal mode only
            # writes it at a commit).
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT INTO meta VALUES ('srdxai write probe', '')")
            finally:
                self.db.rollback()
            self._done = {Unit(*r) for r in self.db.execute(
                "SELECT experiment, model, method, unit FROM units")}
        except sqlite3.Error as exc:
            self.db.close()
            raise database_error(exc, self.path, "open", hint) from exc
        except BaseException:
            self.db.close()
            raise

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def done(self, unit: Unit) -> bool:
        return unit in self._done

    def write_unit(self, unit: Unit, seed: int, rank: int, seconds: float,
                   rows: Iterable[Row], curves: Iterable[Curve] = (),
                   artifacts: dict[str, bytes] | None = None,
                   maps: dict[str, bytes] | None = None,
                   documents: dict[str, bytes] | None = None) -> None:
        """Record a finished unit, all its rows, its figures (PNG), its saved maps (kind
        ``maps``, see ``srdxai.experiments.own``) and JSON documents (kind ``json``)
        atomically.

        A failure (disk full, file made read-only, damage found) rolls the whole unit back and
        raises :class:`~srdxai.errors.RunDirectoryError`; the unit stays to do."""
        e, m, meth = unit.experiment, unit.model, unit.method
        try:
            with self.db:
                self.db.executemany(
                    "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(e, m, meth, r.metric, int(r.sample),
                      None if r.value is None or math.isnan(r.value) else float(r.value),
                      int(seed), self.config_hash, self.code_version) for r in rows])
                self.db.executemany(
                    "INSERT INTO curves VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(e, m, meth, c.curve, int(c.sample), json.dumps([float(v) for v in c.x]),
                      json.dumps([float(v) for v in c.y])) for c in curves])
                self.db.executemany("INSERT OR REPLACE INTO artifacts VALUES (?, 'png', ?)",
                                    (artifacts or {}).items())
                self.db.executemany("INSERT OR REPLACE INTO artifacts VALUES (?, 'maps', ?)",
                                    (maps or {}).items())
                self.db.executemany("INSERT OR REPLACE INTO artifacts VALUES (?, 'json', ?)",
                                    (documents or {}).items())
                self.db.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)",
                                (e, m, meth, unit.unit, rank, float(seconds)))
        except sqlite3.Error as exc:
            raise database_error(exc, self.path,
                                 f"record unit {unit.unit} of {e}/{m}/{meth} in",
                                 rank_hint(self.path)) from exc
        self._done.add(unit)

    def put_artifact(self, name: str, kind: str, data: bytes) -> None:
        try:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)",
                                (name, kind, data))
        except sqlite3.Error as exc:
            raise database_error(exc, self.path, f"record artifact {name!r} in",
                                 rank_hint(self.path)) from exc


def merge(run_dir: Path) -> Path:
    """Combine every rank's database of ``run_dir`` into ``results.sqlite`` (replaced
    atomically); ranks must share one configuration. Returns the merged path.

    Every rank's database is checked as :class:`ResultStore` checks it and only read; a
    damaged one, rows two ranks both hold, an unwritable directory or a full disk are a
    :class:`~srdxai.errors.RunDirectoryError`, and ``results.sqlite`` is then left as it was."""
    run_dir = Path(run_dir)
    parts = sorted(run_dir.glob("results.rank*.sqlite"))
    if not parts:
        raise InvalidInputError(f"{run_dir} holds no results.rank*.sqlite files to merge.")
    final = merged_path(run_dir)
    check_writable(run_dir, f"write {final}")
    tmp = run_dir / "results.sqlite.tmp"
    writing = f"write {final} (through"
    again = f"run `srdxai merge {run_dir}` again"
    try:
        tmp.unlink(missing_ok=True)
        out = sqlite3.connect(tmp)
    except (OSError, sqlite3.Error) as exc:
        raise RunDirectoryError(f"cannot write {tmp}: {exc}. Make {run_dir} writable, or copy "
                                "the run directory somewhere writable and merge there.") from exc
    try:
        try:
            out.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise database_error(exc, tmp, f"{writing} a temporary file)", again) from exc
        meta: dict[str, str] | None = None
        for part in parts:
            hint = rank_hint(part)
            src = open_database(part, "rw", ("meta", *TABLES), hint)
            try:
                try:
                    part_meta = dict(src.execute("SELECT key, value FROM meta"))
                    rows = {table: src.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
                            for table in TABLES}
                except sqlite3.Error as exc:
                    raise database_error(exc, part, "read", hint) from exc
            finally:
                src.close()
            if "config_hash" not in part_meta:
                raise RunDirectoryError(f"{part} holds no run configuration; {hint}.")
            if meta is None:
                meta = part_meta
            elif part_meta["config_hash"] != meta.get("config_hash"):
                raise RunDirectoryError(
                    f"{part.name} was run with another configuration than {parts[0].name}; "
                    f"keep the rank files of one run in {run_dir} (move the others aside) and "
                    "merge again.")
            try:
                with out:
                    if part is parts[0]:
                        out.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                    for table, found in rows.items():
                        if found:
                            marks = ", ".join("?" * len(found[0]))
                            verb = "INSERT OR REPLACE" if table == "artifacts" else "INSERT"
                            out.executemany(f"{verb} INTO {table} VALUES ({marks})", found)
            except sqlite3.IntegrityError as exc:
                raise RunDirectoryError(
                    f"cannot merge {part.name}: it holds results that another rank file of "
                    f"{run_dir} holds too ({exc}), as when runs with different numbers of "
                    "processes share a directory. Keep the rank files of one run (move the "
                    "others aside) and merge again.") from exc
            except sqlite3.Error as exc:
                raise database_error(exc, tmp, f"{writing} a temporary file)", again) from exc
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    out.close()
    try:
        tmp.replace(final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunDirectoryError(f"cannot write {final}: {exc.strerror or exc}. Make {run_dir} "
                                "writable and merge again.") from exc
    return final
