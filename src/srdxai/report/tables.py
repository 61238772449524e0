"""Summary tables of a benchmark run's ``results.sqlite`` (schema: ``srdxai.experiments.store``).

Pure functions: they only read the database. A cell is the mean over samples with a 95 %
confidence interval: Wilson's score interval for metrics whose values are all 0 or 1 (the
pointing game, accuracy: shown as ``[low, high]``), Student's t half-width otherwise, none for
one sample; NULL (NaN) and infinite values are left out
and counted separately, so a metric that failed on some samples is visible rather than silently
averaged. The best method per (model, metric) is marked according to the metric's direction.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Literal, NamedTuple

from srdxai.errors import InvalidInputError
from srdxai.experiments.store import database_error, open_database
from srdxai.metrics.registry import row_direction

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "Cell",
    "CellStats",
    "CurveSet",
    "MetricTable",
    "RunInfo",
    "artifacts",
    "cell_stats",
    "identical_methods",
    "paired_differences",
    "wilson_interval",
    "curves",
    "direction",
    "experiments",
    "format_cell",
    "format_number",
    "metric_table",
    "run_info",
    "t_quantile",
]

#: Result rows that no registered metric writes (experiment-level measures) and whose larger
#: values are better; every metric's own rows take their direction from the metric registry
#: (``srdxai.metrics.registry``).
HIGHER_IS_BETTER = frozenset({
    "accuracy",
    # the manipulation attack, from the method's side: a robust map stays like the original
    "mse_to_target", "ssim_to_original", "pcc_to_original",
})
#: Experiment rows named per setting (``ssim_noise_0.1``: similarity to the clean map under
#: noise of level 0.1), higher is better.
HIGHER_IS_BETTER_PREFIXES = ("ssim_noise_", "pcc_noise_")
#: Experiment rows whose smaller values are better (marked best at the lowest mean).
LOWER_IS_BETTER = frozenset({"ssim_to_target", "pcc_to_target", "mse_to_original"})

# Beyond this many degrees of freedom the exact series (one term per two degrees of freedom)
# is replaced by Fisher's asymptotic expansion, whose error there is far below 1e-9.
_EXACT_DF_LIMIT = 1000


# --- statistics -------------------------------------------------------------------------------

def _t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer ``df`` >= 1.

    The closed forms of Abramowitz & Stegun 26.7.3 / 26.7.4: with theta = atan(t / sqrt(df)),
    odd df: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))),
    even df: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)).
    """
    theta = math.atan(t / math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    c2 = cos * cos
    total, term = 1.0, 1.0
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + sin * cos * total)
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return sin * total


@lru_cache(maxsize=4096)
def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t critical value: ``P(|T| <= q) = confidence`` for ``df`` degrees
    of freedom (``t_quantile(4) == 2.7764...``; it tends to 1.959964 as ``df`` grows).

    Exact (bisection on the closed-form CDF) up to 1000 degrees of freedom, Fisher's expansion
    beyond; both agree with published tables to at least 6 digits.
    """
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise InvalidInputError(f"degrees of freedom must be a positive integer, got {df!r}")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if df > _EXACT_DF_LIMIT:
        z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
        # Abramowitz & Stegun 26.7.5 (Cornish-Fisher expansion of t in powers of 1/df).
        g1 = (z**3 + z) / 4.0
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96.0
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384.0
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160.0
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    lo, hi = 0.0, 1.0
    while _t_two_sided_cdf(hi, df) < confidence:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # converged to adjacent floats
            break
        if _t_two_sided_cdf(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class CellStats(NamedTuple):
    """Mean, 95 % confidence half-width and number of finite values of one cell; for a 0/1
    metric also the Wilson interval ``(low, high)`` (asymmetric), which replaces the
    half-width when shown."""

    mean: float
    half_width: float
    n: int
    interval: tuple[float, float] | None = None


def _finite(values: Iterable[float | None]) -> tuple[list[float], int]:
    kept: list[float] = []
    missing = 0
    for v in values:
        if v is None or not math.isfinite(v):
            missing += 1
        else:
            kept.append(float(v))
    return kept, missing


def cell_stats(values: Iterable[float | None], confidence: float = 0.95) -> CellStats:
    """Mean and the ``confidence`` half-width ``t(n-1) * sd / sqrt(n)`` of ``values``.

    ``None``, NaN and infinite values are skipped (not counted in ``n``). With ``n == 1`` the
    half-width is NaN (no spread can be estimated); with ``n == 0`` the mean is NaN too.
    """
    kept, _ = _finite(values)
    n = len(kept)
    if n == 0:
        return CellStats(math.nan, math.nan, 0)
    mean = math.fsum(kept) / n
    if n == 1:
        return CellStats(mean, math.nan, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in kept) / (n - 1))
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    if all(v in (0.0, 1.0) for v in kept):  # hits and misses: a proportion
        return CellStats(mean, half, n, wilson_interval(sum(kept), n, confidence))
    return CellStats(mean, half, n)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``successes / n``: inside [0, 1] and not
    empty at 0 or n successes, where the t interval of 0/1 values would be (0 +- 0)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - spread), min(1.0, centre + spread)


def direction(metric: str) -> Literal["higher", "lower"] | None:
    """Which way the result row ``metric`` is better: the direction its metric declares in the
    registry, else the experiment's own (accuracy, the attack, input noise); None when neither
    declares one."""
    declared = row_direction(metric)
    if declared is not None:
        return declared
    if metric in HIGHER_IS_BETTER or metric.startswith(HIGHER_IS_BETTER_PREFIXES):
        return "higher"
    if metric in LOWER_IS_BETTER:
        return "lower"
    return None


def format_number(value: float) -> str:
    """Three decimals in the usual range (four below 0.001), scientific notation for values
    below 0.0001 or above 10000."""
    if value is None or math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0.0:
        return "0.000"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3f}"
    if 1e-4 <= abs(value) < 1e-3:  # one significant digit, still readable beside 0.012
        return f"{value:.4f}"
    return f"{value:.2e}"


# --- tables -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One (model, method, metric) summary."""

    mean: float
    half_width: float
    n: int
    missing: int = 0  # NULL / NaN / infinite values left out
    best: bool = False
    interval: tuple[float, float] | None = None  # Wilson's, for 0/1 metrics


def format_cell(cell: Cell | None, typical_n: int | None = None) -> str:
    """``mean ± half-width``; ``(n=k)`` is added when ``n`` differs from the table's usual one
    and always for ``n == 1`` (no interval); an empty cell is an em dash."""
    if cell is None or cell.n == 0:
        return "—" if cell is None or cell.missing == 0 else f"— ({cell.missing} NaN)"
    if cell.n == 1:
        return f"{format_number(cell.mean)} (n=1)"
    if cell.interval is not None:
        low, high = cell.interval
        text = f"{format_number(cell.mean)} [{format_number(low)}, {format_number(high)}]"
    else:
        text = f"{format_number(cell.mean)} ± {format_number(cell.half_width)}"
    if typical_n is not None and cell.n != typical_n:
        text += f" (n={cell.n})"
    return text


@dataclass
class MetricTable:
    """An experiment's cells keyed by (model, method, metric); orders are first appearance."""

    experiment: str
    models: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.cells

    @property
    def rows(self) -> list[tuple[str, str]]:
        """(model, method) pairs that have at least one cell, models then methods in order."""
        return [(model, method) for model in self.models for method in self.methods_for(model)]

    def cell(self, model: str, method: str, metric: str) -> Cell | None:
        return self.cells.get((model, method, metric))

    def methods_for(self, model: str, metrics: Sequence[str] | None = None) -> list[str]:
        wanted = self.metrics if metrics is None else metrics
        return [m for m in self.methods
                if any((model, m, k) in self.cells for k in wanted)]

    def metrics_for(self, model: str) -> list[str]:
        return [k for k in self.metrics
                if any((model, m, k) in self.cells for m in self.methods)]

    def typical_n(self, model: str | None = None) -> int | None:
        """The most common ``n`` of the (model's) non-empty cells, None if there are none."""
        counts: dict[int, int] = {}
        for (mod, _, _), c in self.cells.items():
            if c.n > 0 and (model is None or mod == model):
                counts[c.n] = counts.get(c.n, 0) + 1
        return max(counts, key=lambda k: (counts[k], k)) if counts else None


def _merged_hint(db_path: Path) -> str:
    run_dir = Path(db_path).parent
    return (f"srdxai leaves it untouched. If the run's results.rank*.sqlite files are intact, "
            f"rebuild it with `srdxai merge {run_dir}`; otherwise run `srdxai bench {run_dir}` "
            "(or a new run directory) to write one")


def _connect(db_path: Path, integrity: bool = False) -> sqlite3.Connection:
    """Open a results database read-only (a missing file is an error, never created) and check
    its tables (and, with ``integrity``, SQLite's quick_check); problems are one-line
    :class:`~srdxai.errors.RunDirectoryError` (an :class:`InvalidInputError`)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        hint = f"run `srdxai bench {db_path.parent}` first"
        if list(db_path.parent.glob("results.rank*.sqlite")):
            hint = (f"the run's per-rank databases are there but not merged: run "
                    f"`srdxai merge {db_path.parent}` (or resume `srdxai bench "
                    f"{db_path.parent}`)")
        raise InvalidInputError(f"no results database at {db_path}; {hint}.")
    return open_database(db_path, "ro", ("meta", "results", "curves", "artifacts"),
                         _merged_hint(db_path), integrity)


@contextmanager
def _reading(db_path: Path, integrity: bool = False) -> Iterator[sqlite3.Connection]:
    """A checked read-only connection; SQLite errors while reading (damage found by a query)
    become :class:`~srdxai.errors.RunDirectoryError`."""
    conn = _connect(db_path, integrity)
    try:
        yield conn
    except sqlite3.Error as exc:
        raise database_error(exc, Path(db_path), "read", _merged_hint(db_path)) from exc
    finally:
        conn.close()


def _query(db_path: Path, sql: str, params: Sequence[object] = ()) -> list[tuple]:
    with _reading(db_path) as conn:
        return conn.execute(sql, params).fetchall()


def _first_seen(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _mark_best(cells: dict[tuple[str, str, str], Cell]) -> dict[tuple[str, str, str], Cell]:
    """Mark, per (model, metric) with a direction, every method at the best mean (ties all).

    A lone method is not marked: "best" of one says nothing."""
    groups: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for key, c in cells.items():
        if direction(key[2]) is not None and c.n > 0:
            groups.setdefault((key[0], key[2]), []).append(key)
    out = dict(cells)
    for (_, metric), keys in groups.items():
        if len(keys) < 2:
            continue
        means = [cells[k].mean for k in keys]
        best = max(means) if direction(metric) == "higher" else min(means)
        for k in keys:
            if cells[k].mean == best:  # fsum means: equal samples give bit-equal means
                c = cells[k]
                out[k] = Cell(c.mean, c.half_width, c.n, c.missing, True, c.interval)
    return out


def metric_table(db_path: Path, experiment: str,
                 metrics: Sequence[str] | None = None) -> MetricTable:
    """The mean ± 95 % CI of every (model, method, metric) of ``experiment``, best marked.

    Models, methods and metrics are ordered by first appearance in the ``results`` table
    (rowid order, so the runner decides); ``metrics`` restricts the metrics and fixes their
    order. An experiment without rows gives an empty table; a missing or empty-schema database
    raises :class:`~srdxai.errors.InvalidInputError`.
    """
    rows = _query(db_path, "SELECT model, method, metric, value FROM results "
                           "WHERE experiment = ? ORDER BY rowid", (experiment,))
    if metrics is not None:
        wanted = set(metrics)
        rows = [r for r in rows if r[2] in wanted]
    values: dict[tuple[str, str, str], list[float | None]] = {}
    for model, method, metric, value in rows:
        values.setdefault((model, method, metric), []).append(value)
    cells = {}
    for key, vals in values.items():
        kept, missing = _finite(vals)
        stats = cell_stats(kept)
        cells[key] = Cell(stats.mean, stats.half_width, stats.n, missing,
                          interval=stats.interval)
    found = _first_seen(r[2] for r in rows)
    order = [m for m in metrics if m in found] if metrics is not None else found
    return MetricTable(experiment, _first_seen(r[0] for r in rows),
                       _first_seen(r[1] for r in rows), order, _mark_best(cells))


def identical_methods(db_path: Path, experiment: str) -> list[tuple[str, str, str]]:
    """``(model, method, earlier method)`` for every method whose value on every (metric,
    sample) of ``experiment`` equals an earlier method's on the same model: rows that are the
    same by construction (SRD-low seeded with Grad-CAM at its own layer is Grad-CAM), which the
    report says rather than letting them pass for two results."""
    rows = _query(db_path, "SELECT model, method, metric, sample, value FROM results "
                           "WHERE experiment = ? ORDER BY rowid", (experiment,))
    per: dict[tuple[str, str], dict[tuple[str, int], float | None]] = {}
    for model, method, metric, sample, value in rows:
        per.setdefault((model, method), {})[(metric, sample)] = value

    def equal(va: float | None, vb: float | None) -> bool:
        if va is None or vb is None:
            return va is None and vb is None
        if math.isnan(va) or math.isnan(vb):
            return math.isnan(va) and math.isnan(vb)
        return va == vb or abs(va - vb) <= 1e-9 * max(1.0, abs(va), abs(vb))

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(equal(v, b[k]) for k, v in a.items())

    out = []
    keys = list(per)
    for i, (model, method) in enumerate(keys):
        for other_model, other in keys[:i]:
            if other_model == model and per[(model, method)] and same(per[(model, method)],
                                                                     per[(model, other)]):
                out.append((model, method, other))
                break
    return out


def paired_differences(db_path: Path, experiment: str, metric: str, reference: str
                       ) -> dict[tuple[str, str], Cell]:
    """``reference - method`` on ``metric``, paired by sample, for every other method of every
    model that has ``reference``: ``{(model, method): Cell}`` with the mean difference and its
    95 % t interval over the samples where both are finite. Paired differences are what the
    same samples and the same perturbation draws allow: their interval is much narrower than
    the two cells' intervals side by side suggest."""
    rows = _query(db_path, "SELECT model, method, sample, value FROM results "
                           "WHERE experiment = ? AND metric = ? ORDER BY rowid",
                  (experiment, metric))
    per: dict[tuple[str, str], dict[int, float | None]] = {}
    for model, method, sample, value in rows:
        per.setdefault((model, method), {})[sample] = value
    out: dict[tuple[str, str], Cell] = {}
    for (model, method), values in per.items():
        ref = per.get((model, reference))
        if method == reference or ref is None:
            continue
        diffs: list[float | None] = []
        for sample, value in values.items():
            other = ref.get(sample)
            diffs.append(None if value is None or other is None else other - value)
        kept, missing = _finite(diffs)
        stats = cell_stats(kept)
        out[(model, method)] = Cell(stats.mean, stats.half_width, stats.n, missing)
    return out


# --- the rest of the database -----------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """What the report's header shows about a run."""

    path: Path
    config: dict | None  # None when the stored text is not JSON
    config_text: str
    config_hash: str
    code_version: str
    created: str
    n_results: int
    n_curves: int
    n_artifacts: int
    rows_per_experiment: dict[str, int]
    row_code_versions: list[str]  # distinct code versions of the result rows


def run_info(db_path: Path) -> RunInfo:
    """The run's metadata and row counts; an empty database is an error naming what to run.

    The only reader that runs SQLite's quick_check (the report starts here): a damaged file is
    refused once, up front, rather than found half-way through the report."""
    with _reading(db_path, integrity=True) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        n_results = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        n_curves = conn.execute("SELECT COUNT(*) FROM curves").fetchone()[0]
        n_artifacts = conn.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0]
        per_experiment = dict(conn.execute(
            "SELECT experiment, COUNT(*) FROM results GROUP BY experiment "
            "ORDER BY MIN(rowid)").fetchall())
        versions = [r[0] for r in conn.execute(
            "SELECT DISTINCT code_version FROM results ORDER BY code_version")]
    if n_results + n_curves + n_artifacts == 0:
        raise InvalidInputError(
            f"{db_path} holds no results yet; run (or resume) `srdxai bench "
            f"{Path(db_path).parent}` and then write the report.")
    text = meta.get("config", "")
    try:
        config = json.loads(text) if text else None
    except json.JSONDecodeError:
        config = None
    return RunInfo(Path(db_path), config if isinstance(config, dict) else None, text,
                   meta.get("config_hash", "?"), meta.get("code_version", "?"),
                   meta.get("created", "?"), n_results, n_curves, n_artifacts, per_experiment,
                   versions)


def experiments(db_path: Path) -> list[str]:
    """Experiments with result rows or curves, in order of first appearance (results first)."""
    with _reading(db_path) as conn:
        found = [r[0] for r in conn.execute(
            "SELECT experiment FROM results GROUP BY experiment ORDER BY MIN(rowid)")]
        found += [r[0] for r in conn.execute(
            "SELECT experiment FROM curves GROUP BY experiment ORDER BY MIN(rowid)")]
    return _first_seen(found)


@dataclass
class CurveSet:
    """The per-sample curves of one (model, method, curve name)."""

    model: str
    method: str
    curve: str
    xs: list[list[float]]
    ys: list[list[float]]


def curves(db_path: Path, experiment: str) -> list[CurveSet]:
    """Every curve of ``experiment`` grouped by (model, method, curve), first-appearance order."""
    groups: dict[tuple[str, str, str], CurveSet] = {}
    for model, method, curve, x, y in _query(
            db_path, "SELECT model, method, curve, x, y FROM curves WHERE experiment = ? "
                     "ORDER BY rowid", (experiment,)):
        key = (model, method, curve)
        if key not in groups:
            groups[key] = CurveSet(model, method, curve, [], [])
        try:
            xs, ys = json.loads(x), json.loads(y)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(
                f"{db_path}: curve {key} holds invalid JSON ({exc})") from exc
        groups[key].xs.append([math.nan if v is None else float(v) for v in xs])
        groups[key].ys.append([math.nan if v is None else float(v) for v in ys])
    return list(groups.values())


def artifacts(db_path: Path, kind: str = "png") -> list[tuple[str, bytes]]:
    """(name, data) of every artifact of ``kind``, in insertion order."""
    return [(name, bytes(data or b"")) for name, data in _query(
        db_path, "SELECT name, data FROM artifacts WHERE kind = ? ORDER BY rowid", (kind,))]
