"""Comparisons of methods the paper tables share: the SRD rows against every other method
(paired by sample), competition ranks, and the marks of rows the paper does not have."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from srdxai.report import paper, tables
from srdxai.report.blocks import Table

__all__ = ["BEYOND", "SRD_REFERENCES", "beyond_marks", "competition_ranks", "is_variant",
           "paired_tables"]

#: the SRD rows the paired differences are taken against: SRD-high is the paper's best
#: fidelity row (.206 VGG16 / .142 ResNet50), SRD-input the pixel map of the headline method
SRD_REFERENCES = ("SRD-high", "SRD-input")
#: marks a row (or cell) the paper has no counterpart for
BEYOND = " §"


def is_variant(metric: str) -> bool:
    """Whether ``metric`` is a fidelity protocol variant (``fidelity[...]``)."""
    return metric.startswith("fidelity[")



def beyond_marks(methods: Sequence[str]) -> dict[str, str]:
    """:data:`BEYOND` for each method the paper's Table 2 has no counterpart for."""
    in_paper = {v for v in paper.PAPER_TO_SRDXAI.values() if v}
    return {m: BEYOND for m in methods if m not in in_paper and m != "-"}



def paired_tables(db: Path, experiment: str, metrics: Sequence[str], title: str,
                   columns: dict[str, str] | None = None) -> list[Table]:
    """``SRD row - method`` per metric, paired by sample: rows methods, columns models."""
    out = []
    for metric in metrics:
        for reference in SRD_REFERENCES:
            diffs = tables.paired_differences(db, experiment, metric, reference)
            if not diffs:
                continue
            models = list(dict.fromkeys(m for m, _ in diffs))
            methods = list(dict.fromkeys(meth for _, meth in diffs))
            rows = []
            for method in methods:
                row = [(method, False)]
                for model in models:
                    c = diffs.get((model, method))
                    text = tables.format_cell(c, None) if c else "—"
                    clear = bool(c and c.n > 1 and math.isfinite(c.half_width)
                                 and abs(c.mean) > c.half_width)
                    row.append((text + (" *" if clear else ""), False))
                rows.append(row)
            ns = sorted({c.n for c in diffs.values() if c.n})
            widths = [2 * c.half_width for c in diffs.values()
                      if c.n > 1 and math.isfinite(c.half_width)]
            notes = [f"Cells: mean of {reference} − method over the same samples and draws, "
                     "± the 95 % t half-width of the paired differences; positive: "
                     f"{reference} scores higher. * the interval excludes 0.",
                     f"n = {', '.join(map(str, ns))} pairs per cell; interval widths "
                     f"{tables.format_number(min(widths)) if widths else 'nan'} to "
                     f"{tables.format_number(max(widths)) if widths else 'nan'}."]
            header = ["method"] + [(columns or {}).get(m, m) for m in models]
            out.append(Table(f"{title}: {reference} − method, {metric} (paired)", header,
                             rows, notes))
    return out



def competition_ranks(means: dict[str, float]) -> dict[str, int]:
    """1 + the number of strictly better (higher) means: ties share a rank."""
    return {m: 1 + sum(other > v for other in means.values()) for m, v in means.items()}


