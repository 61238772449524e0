"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: a call whose warm-up takes longer than this many seconds is timed once after it: a call of
#: minutes averages the machine's noise over itself, and a median of three such calls (peers'
#: Score-CAM and Quantus' metrics at 224 px: 3-4 min each) made ``make bench`` last 2 h or more
LONG_CALL_S = 60.0


def timed_rounds(warm_up_seconds: float, rounds: int) -> int:
    """How many timed calls follow a warm-up that took ``warm_up_seconds``: ``rounds``, or one
    for a long call (:data:`LONG_CALL_S`)."""
    return min(rounds, 1) if warm_up_seconds > LONG_CALL_S else rounds


def median_time(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    """One warm-up call, then the median wall time of ``rounds`` calls (one for a call longer
    than :data:`LONG_CALL_S`), and the last result."""
    t0 = time.perf_counter()
    result = fn()
    times = []
    for _ in range(timed_rounds(time.perf_counter() - t0, rounds)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


@dataclass
class Row:
    """One comparison of the benchmark table: our median time against a reference's (a peer
    library's call, or one plain ``torch.autograd.grad``), and how far the two outputs differ."""

    comparison: str
    model: str
    ours: float
    reference: float
    reference_name: str
    target: float | None  # the ratio ours / reference must not exceed this (None: reported)
    max_difference: float | None = None  # relative to the reference's largest value

    @property
    def ratio(self) -> float:
        return self.ours / self.reference

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


HEADER = ("comparison", "model", "srdxai [s]", "reference [s]", "reference", "ratio",
          "target", "met", "max diff")


def cells(row: Row) -> list[str]:
    diff = "-" if row.max_difference is None else f"{row.max_difference:.1e}"
    target = "-" if row.target is None else f"<= {row.target:.2f}x"
    met = "-" if row.met is None else "yes" if row.met else "NO"
    return [row.comparison, row.model, f"{row.ours:.3f}", f"{row.reference:.3f}",
            row.reference_name, f"{row.ratio:.2f}x", target, met, diff]


def text_table(rows: list[Row]) -> str:
    table = [list(HEADER)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                     for line in table)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |",
             "|" + "|".join("---" if i < 2 or i == 4 else "---:" for i in range(len(HEADER)))
             + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)
