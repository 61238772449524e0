"""Token localisation on the synthetic planted-evidence task, whose evidence tokens decide
the label (docs/text.md)."""

from __future__ import annotations

from ..config import BenchConfig
from ..data import PLANTED_MODEL, Source
from ..registry import (
    UnitInputs,
    UnitResult,
    register_experiment,
)
from .text_units import TextExperiment, token_documents, token_maps

__all__ = ["TextLocalisation"]


@register_experiment
class TextLocalisation(TextExperiment):
    """Token localisation on the planted-evidence task: how much relevance lands on the
    evidence tokens that decide the label."""

    name = "text_localisation"
    title = "Token localisation (planted evidence)"
    texts = 500  # the test split
    report_position = 32
    metrics = ("relevance_mass_accuracy", "relevance_rank_accuracy")
    note = ("A word CNN trained in the run on the synthetic planted-evidence task (filler words "
            "with planted words of the label's class; srdxai.data.text.make_planted_evidence), "
            "explained for the label on its test texts. Relevance mass accuracy: the map's sum "
            "over the evidence tokens over its sum over all tokens (signed, Quantus' "
            "convention); rank accuracy: the share of the k evidence tokens among the k "
            "highest-ranked tokens.")

    def sources(self, config: BenchConfig) -> list[Source]:
        return [Source(PLANTED_MODEL, "text-planted")]

    def run(self, unit: UnitInputs) -> UnitResult:
        from ...text.metrics import token_localisation

        maps, mask = token_maps(unit)
        scores = token_localisation(maps, unit.masks == 2, mask)
        return UnitResult(rows=unit.rows("relevance_mass_accuracy", scores.mass_accuracy)
                          + unit.rows("relevance_rank_accuracy", scores.rank_accuracy),
                          documents=token_documents(unit, maps, mask))
