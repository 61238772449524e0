"""How much each map moves under Gaussian input noise: SSIM and Pearson correlation between
the clean map and the map of a noisy copy, per noise level."""

from __future__ import annotations

import torch

from ..config import BenchConfig
from ..data import Source
from ..registry import Experiment, UnitInputs, UnitResult, register_experiment
from .table2 import light_sources

__all__ = ["NOISE_LEVELS", "Noise"]

#: Gaussian input noise, in units of each image's value range
NOISE_LEVELS = (0.05, 0.1, 0.2)


@register_experiment
class Noise(Experiment):
    """Map similarity under input noise (maps as the attack compares them: |map| summed over
    channels, unit sum)."""

    name = "noise"
    title = "Robustness: noise"
    report_position = 61
    group = ("Robustness", "robustness")

    def sources(self, config: BenchConfig) -> list[Source]:
        return light_sources(config)

    def run(self, unit: UnitInputs) -> UnitResult:
        from ...metrics.similarity import normalise_map, pearson, ssim

        x = unit.x
        g = torch.Generator(device="cpu").manual_seed(unit.seed)
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).reshape(-1, *[1] * (x.dim() - 1))
        clean = normalise_map(unit.explain())
        rows = []
        for level in NOISE_LEVELS:
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
            noisy = normalise_map(unit.explain(x + level * span * noise))
            for name, values in (("ssim", ssim(clean, noisy)), ("pcc", pearson(clean, noisy))):
                rows += unit.rows(f"{name}_noise_{level:g}", values)
        return UnitResult(rows=rows)
