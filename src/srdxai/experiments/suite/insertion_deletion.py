"""RISE's insertion and deletion curves (Petsiuk et al., BMVC 2018) and their areas."""

from __future__ import annotations

from ..config import BenchConfig
from ..data import Source
from ..registry import Experiment, UnitInputs, UnitResult, register_experiment
from .table2 import light_sources

__all__ = ["InsertionDeletion"]


@register_experiment
class InsertionDeletion(Experiment):
    """Insertion (from RISE's blur) and deletion (to zeros) of Table 2's methods."""

    name = "insertion_deletion"
    title = "Insertion / deletion"
    report_position = 40

    def sources(self, config: BenchConfig) -> list[Source]:
        return light_sources(config)

    def run(self, unit: UnitInputs) -> UnitResult:
        from ... import metrics

        maps = unit.explain()
        out = UnitResult()
        for name, fn in (("insertion", metrics.insertion), ("deletion", metrics.deletion)):
            result = fn(unit.model, unit.x, unit.y, maps)
            out.curves += unit.curves(name, result.fractions.tolist(), result.curve)
            out.rows += unit.rows(f"auc_{name}", result.auc)
        return out
