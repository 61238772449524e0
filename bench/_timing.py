"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def median_time(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    """One warm-up call, then the median wall time of ``rounds`` calls, and the last result."""
    result = fn()
    times = []
    for _ in range(rounds):
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
