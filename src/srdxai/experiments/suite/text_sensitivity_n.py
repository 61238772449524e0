"""Sensitivity-n, insertion and deletion on text (Ancona et al.'s second domain): tokens as
features on the shipped movie-review models (docs/text.md)."""

from __future__ import annotations

import torch

from ..config import BenchConfig
from ..data import Source
from ..registry import (
    UnitInputs,
    UnitResult,
    register_experiment,
)
from ..store import Curve
from .text_units import TextExperiment, token_documents, token_maps

__all__ = ["TextSensitivityN"]


@register_experiment
class TextSensitivityN(TextExperiment):
    """Sensitivity-n, insertion and deletion with tokens as features, on the movie-review
    test sentences."""

    name = "text_sensitivity_n"
    title = "Sensitivity-n on text (Ancona et al.'s second domain)"
    texts = 852  # the test split
    report_position = 31  # right after the images' Sensitivity-n
    metrics = ("sensitivity_n_mean", "auc_insertion", "auc_deletion")
    note = ("Movie-review test sentences (Pang & Lee's sentence polarity) and the shipped text "
            "models; a token is removed by setting its embedding to zero. Sensitivity-n: per "
            "text and n, the Pearson correlation over random subsets of n real tokens between "
            "the map's sum over the subset and the logit's drop; n at least the text's length "
            "is left out. Insertion / deletion: tokens added to zero embeddings / removed in "
            "the map's order, probability of the label, area over the fraction of tokens.")

    def sources(self, config: BenchConfig) -> list[Source]:
        models = ["rt-kim-cnn", "rt-lstm"] + ([] if config.quick else ["rt-minilm"])
        return [Source(m, "text-rt") for m in models]

    def run(self, unit: UnitInputs) -> UnitResult:
        from ...text.metrics import deletion_tokens, insertion_tokens, sensitivity_n_tokens

        maps, mask = token_maps(unit)
        out = UnitResult(documents=token_documents(unit, maps, mask))
        result = sensitivity_n_tokens(unit.model, unit.x, unit.y, maps, attention_mask=mask,
                                      nr_subsets=unit.config.fidelity_runs, seed=unit.seed)
        out.rows += unit.rows("sensitivity_n_mean", torch.nanmean(result.curve, dim=1))
        out.curves += unit.curves("sensitivity_n_tokens", result.n_grid.tolist(), result.curve)
        for name, fn in (("insertion", insertion_tokens), ("deletion", deletion_tokens)):
            curve = fn(unit.model, unit.x, unit.y, maps, attention_mask=mask)
            out.rows += unit.rows(f"auc_{name}", curve.auc)
            for sample, x, y in zip(unit.job.samples, curve.fractions.tolist(),
                                    curve.curve.tolist(), strict=True):
                kept = [(a, b) for a, b in zip(x, y, strict=True) if a == a]  # drop NaN padding
                out.curves.append(Curve(f"{name}_tokens", sample, [a for a, _ in kept],
                                        [b for _, b in kept]))
        return out
