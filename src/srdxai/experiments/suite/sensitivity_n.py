"""Ancona et al.'s Sensitivity-n (ICLR 2018): for random subsets of n features, how well the
map's sum over the subset predicts the output change when the subset is removed; a curve
over n per method."""

from __future__ import annotations

import torch

from ..config import BenchConfig
from ..data import Source
from ..registry import (
    Experiment,
    MethodRow,
    UnitInputs,
    UnitResult,
    register_experiment,
)
from .table2 import light_sources

__all__ = ["SENSITIVITY_METHODS", "SensitivityN"]

#: Ancona et al.'s methods for Sensitivity-n (the occlusion window is set per dataset)
SENSITIVITY_METHODS: list[MethodRow] = [
    ("Saliency", "saliency", {}),
    ("GradInput", "gradient_x_input", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("epsilon-LRP", "epsilon_lrp", {}),
    ("DeepLIFT-Rescale", "deeplift_rescale", {}),
    ("Occlusion", "occlusion", {}),
    ("SRD-input", "srd", {}),
    ("absLRP", "abslrp", {}),
]


@register_experiment
class SensitivityN(Experiment):
    """Sensitivity-n curves (and their mean over n) of Ancona et al.'s methods."""

    name = "sensitivity_n"
    title = "Sensitivity-n"
    report_position = 30

    def sources(self, config: BenchConfig) -> list[Source]:
        return light_sources(config)

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        window = 4 if source.dataset == "fashion" else 16  # Occlusion-1 costs H*W passes
        return [(label, m, {"window": window, "stride": window} if m == "occlusion" else o)
                for label, m, o in SENSITIVITY_METHODS]

    def run(self, unit: UnitInputs) -> UnitResult:
        from ... import metrics

        result = metrics.sensitivity_n(unit.model, unit.x, unit.y, unit.explain(),
                                       nr_subsets=unit.config.fidelity_runs, seed=unit.seed)
        return UnitResult(rows=unit.rows("sensitivity_n_mean",
                                         torch.nanmean(result.curve, dim=1)),
                          curves=unit.curves("sensitivity_n", result.n_grid.tolist(),
                                             result.curve))
