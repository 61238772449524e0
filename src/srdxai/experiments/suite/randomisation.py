"""The randomisation sanity checks (Adebayo et al., 2018; Sixt et al., 2020; Hedström et al.,
2023) for every method: cascading MPRT with its similarity curves and figure, the random-logit
test and efficient MPRT."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..config import BenchConfig
from ..data import Source, display_image
from ..registry import (
    Experiment,
    Job,
    MethodRow,
    UnitInputs,
    UnitResult,
    register_experiment,
)
from .table2 import TABLE2_METHODS, light_sources

__all__ = ["RANDOMISATION_METHODS", "RANDOMISATION_STEPS", "Randomisation"]

#: the rows: the gradient family (Guided Backprop is the method Adebayo et al. found to fail),
#: LRP-z+, SmoothGrad, Grad-CAM, SRD and absLRP
RANDOMISATION_METHODS = [m for m in TABLE2_METHODS if m[0] in (
    "Saliency", "GuidedBackprop", "GradInput", "IntegratedGradients", "LRP-z+",
    "SmoothGrad-abs", "GradCAM", "SRD-high", "SRD-input", "absLRP")]
#: at most this many cascading steps (groups of consecutive layers on deeper models)
RANDOMISATION_STEPS = 16
NOTE = (
    "Sanity checks (Adebayo et al. 2018; Sixt et al. 2020): a map that explains the model "
    "should change when the model's parameters are re-drawn and when another class is "
    "explained. mprt_*: similarity of the map of the fully randomised model (every layer "
    "re-drawn, from the output down, cascading) to the original map; the curves follow the "
    "similarity layer by layer. random_logit_ssim: SSIM between the maps of the target class "
    "and of a random other class. Lower is better everywhere: a method whose similarity stays "
    "high explains the input more than the model.")


@register_experiment
class Randomisation(Experiment):
    """Cascading MPRT (similarity after randomising the layers from the output down: the fully
    random model's per sample, the curve over the layers), the random-logit test and
    efficient MPRT; the first batch also gives the figure of one image's maps degrading."""

    name = "randomisation"
    title = "Randomisation (sanity checks)"
    report_position = 70
    note = NOTE

    def sources(self, config: BenchConfig) -> list[Source]:
        return light_sources(config)

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        return list(RANDOMISATION_METHODS)

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        # one explanation per randomised layer
        return min(super().sample_count(source, config), 8 if config.quick else 32)

    def run(self, unit: UnitInputs) -> UnitResult:
        from ... import metrics

        maps = unit.explain()
        method_fn = unit.explain_fn()
        result = metrics.model_parameter_randomisation(
            unit.model, unit.x, unit.y, maps, explain=method_fn, steps=RANDOMISATION_STEPS,
            seed=unit.seed, keep_maps=True)
        steps = list(range(1, len(result.layers) + 1))
        out = UnitResult()
        for measure, values in result.similarity.items():
            out.rows += unit.rows(f"mprt_{measure}", values[-1])
            out.curves += unit.curves(f"mprt_{measure}", steps, values.T)
        logit = metrics.random_logit(unit.model, unit.x, unit.y, maps, explain=method_fn,
                                     seed=unit.seed)
        out.rows += unit.rows("random_logit_ssim", logit)
        # efficient MPRT from the cascading run's last step, the fully randomised model: no
        # second copy of the model and no second explanation of it
        out.rows += unit.rows("emprt", result.entropy_rise())
        if unit.job.unit.unit == 0:
            name = f"{self.name}/{unit.job.source.model}/{unit.job.unit.method}"
            out.artifacts[name] = cascade_figure(unit.job, result)
        return out


def cascade_figure(job: Job, result: Any) -> bytes:
    """One image's map before and after each cascading randomisation step (at most 8 steps,
    evenly spaced, always the last), as PNG bytes."""
    from ...report.figures import save_method_grid

    total = len(result.layers)
    picked = sorted({round(i * (total - 1) / 7) for i in range(8)} if total > 8
                    else set(range(total)))
    panels = {"original": result.original[0].float().numpy()}
    for k in picked:
        panels[f"{k + 1}: {result.layers[k]}"] = result.maps[k][0].float().numpy()
    signed = {name: bool((panel < 0).any()) for name, panel in panels.items()}
    image, _ = display_image(job.source, job.samples[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = save_method_grid(Path(tmp) / "cascade.png", image, panels,
                                f"{job.source.model}, {job.unit.method}: cascading "
                                f"randomisation (layers from the output), sample "
                                f"{job.samples[0]}", signed=signed, columns=5, dpi=70)
        return path.read_bytes()
