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
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError

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


class ResultStore:
    """One process's results database (a context manager)."""

    def __init__(self, path: Path, config: dict, config_hash: str, code_version: str):
        self.path = Path(path)
        self.config_hash, self.code_version = config_hash, code_version
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(SCHEMA)
        stored = dict(self.db.execute("SELECT key, value FROM meta"))
        if stored.get("config_hash") not in (None, config_hash):
            self.db.close()
            raise InvalidInputError(
                f"{self.path} holds a run with another configuration (hash "
                f"{stored['config_hash']}, now {config_hash}); resume it with the same options "
                "or use a new run directory.")
        if not stored:
            from datetime import UTC, datetime

            with self.db:
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("config", json.dumps(config, sort_keys=True)),
                    ("config_hash", config_hash), ("code_version", code_version),
                    ("created", datetime.now(UTC).isoformat(timespec="seconds"))])
        self._done = {Unit(*r) for r in self.db.execute(
            "SELECT experiment, model, method, unit FROM units")}

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
                   artifacts: dict[str, bytes] | None = None) -> None:
        """Record a finished unit, all its rows and its figures (PNG) atomically."""
        e, m, meth = unit.experiment, unit.model, unit.method
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
            self.db.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?)",
                            (e, m, meth, unit.unit, rank, float(seconds)))
        self._done.add(unit)

    def put_artifact(self, name: str, kind: str, data: bytes) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)",
                            (name, kind, data))


def merge(run_dir: Path) -> Path:
    """Combine every rank's database of ``run_dir`` into ``results.sqlite`` (replaced
    atomically); ranks must share one configuration. Returns the merged path."""
    run_dir = Path(run_dir)
    parts = sorted(run_dir.glob("results.rank*.sqlite"))
    if not parts:
        raise InvalidInputError(f"{run_dir} holds no results.rank*.sqlite files to merge.")
    tmp = run_dir / "results.sqlite.tmp"
    tmp.unlink(missing_ok=True)
    out = sqlite3.connect(tmp)
    try:
        out.executescript(SCHEMA)
        meta: dict[str, str] | None = None
        for part in parts:
            src = sqlite3.connect(part)
            try:
                part_meta = dict(src.execute("SELECT key, value FROM meta"))
                if meta is None:
                    meta = part_meta
                    with out:
                        out.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                elif part_meta.get("config_hash") != meta.get("config_hash"):
                    raise InvalidInputError(
                        f"{part.name} was run with another configuration than {parts[0].name}")
                with out:
                    for table in TABLES:
                        rows = src.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
                        if rows:
                            marks = ", ".join("?" * len(rows[0]))
                            verb = "INSERT OR REPLACE" if table == "artifacts" else "INSERT"
                            out.executemany(f"{verb} INTO {table} VALUES ({marks})", rows)
            finally:
                src.close()
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    out.close()
    final = merged_path(run_dir)
    tmp.replace(final)
    return final
