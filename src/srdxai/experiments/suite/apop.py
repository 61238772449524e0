"""SRD's APOP experiment: how much of the prediction the inactive neurons' pattern alone
recovers, from a zero, a noise and another image's baseline."""

from __future__ import annotations

from ..config import BenchConfig
from ..data import Source
from ..registry import (
    Experiment,
    MethodRow,
    UnitInputs,
    UnitResult,
    register_experiment,
)
from .activation import Activation
from .table2 import light_sources

__all__ = ["APOP"]


@register_experiment
class APOP(Experiment):
    """APOP per model (one row, method "-"), and the model's accuracy on the same samples."""

    name = "apop"
    title = "Robustness: apop"
    report_position = 62
    group = ("Robustness", "robustness")

    def sources(self, config: BenchConfig) -> list[Source]:
        found = Activation().sources(config)
        return found + [s for s in light_sources(config) if s not in found]

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        return [("-", "apop", {})]

    def run(self, unit: UnitInputs) -> UnitResult:
        from ...robustness import apop

        rows = []
        for baseline in ("zeros", "noise", "other"):
            if baseline == "other" and len(unit.job.samples) < 2:
                continue  # "other" takes another image of the batch as the baseline
            result = apop(unit.model, unit.x, unit.y, baseline, seed=unit.seed)
            if baseline == "zeros":
                rows += unit.rows("accuracy", result.correct)
            rows += unit.rows(f"apop_{baseline}", result.recovered)
        return UnitResult(rows=rows)
