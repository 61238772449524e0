"""The explanation-manipulation attack (Dombrowski et al., 2019) as SRD's robustness figure:
each image is optimised so that its map approaches another image's map while the output stays
put; the scores say how far the map moved and how well the output was kept."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidInputError
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

__all__ = ["ATTACK_METHODS", "ATTACK_SAMPLES", "ATTACK_SCHEDULE", "Attack"]

Tensor = torch.Tensor

#: the attack's rows: the methods of SRD's robustness figure, absLRP and Grad-CAM (the attack
#: sums |map| over channels: saliency's is Dombrowski et al.'s gradient map)
ATTACK_METHODS: list[MethodRow] = [
    ("Gradient", "saliency", {}),
    ("GradInput", "gradient_x_input", {}),
    ("GuidedBackprop", "guided_backprop", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("LRP-z+", "lrp_zplus", {}),
    ("SRD-input", "srd", {}),
    ("absLRP", "abslrp", {}),
    ("GradCAM", "gradcam", {}),
]
#: (iterations, Adam learning rate): the authors' 1500 steps of 2e-4, and a quick run that
#: takes 30x fewer, 30x larger steps (the same total step budget)
ATTACK_SCHEDULE = {False: (1500, 2e-4), True: (50, 6e-3)}
#: images attacked per model (each batch's targets are its own images, rotated by one)
ATTACK_SAMPLES = {False: 16, True: 2}
NOTE = (
    "Explanation-manipulation attack (Dombrowski et al. 2019): each image is optimised so that "
    "the method's map approaches another image's map while the softmax output stays put. "
    "Best (bold) = most robust method: its manipulated map least like the target "
    "(ssim/pcc_to_target low, mse_to_target high) and most like the original map. "
    "output_mse, prediction_kept and target_probability_change say how well the output was "
    "kept; linf and psnr how much the image changed (model-input units; PSNR in dB over each "
    "image's value range).")


@register_experiment
class Attack(Experiment):
    """The manipulation attack on each batch: each image's target map is the next image's."""

    name = "attack"
    title = "Robustness: attack"
    report_position = 60
    group = ("Robustness", "robustness")
    note = NOTE

    def sources(self, config: BenchConfig) -> list[Source]:
        return light_sources(config)

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        return list(ATTACK_METHODS)

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        # 1500 differentiable maps per image (full size)
        return min(config.sizes(source.dataset), ATTACK_SAMPLES[config.quick])

    def batch_size(self, config: BenchConfig) -> int:
        return max(2, config.batch_size)

    def run(self, unit: UnitInputs) -> UnitResult:
        from ...models import model_info
        from ...report.figures import save_attack_figure
        from ...robustness import manipulate

        x, job = unit.x, unit.job
        if x.shape[0] < 2:
            raise InvalidInputError("the attack experiment needs batches of at least 2 images "
                                    "(one's map is the other's target).")
        info = model_info(job.source.model)
        mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(info.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        iterations, lr = ATTACK_SCHEDULE[unit.config.quick]
        result = manipulate(unit.model, x, job.method, target_image=x.roll(1, 0),
                            iterations=iterations, lr=lr,
                            bounds=(-mean / std, (1 - mean) / std), **unit.options)
        rows = [row for name, values in result.scores.items()
                for row in unit.rows(name, values)]

        def picture(t: Tensor) -> np.ndarray:
            pixels = (t * std[0] + mean[0]).clamp(0, 1).mul(255).round()
            return pixels.permute(1, 2, 0).to(torch.uint8).cpu().numpy()

        title = (f"{job.source.model}, {job.unit.method}, sample {job.samples[0]}: PCC to "
                 f"target {float(result.scores['pcc_to_target'][0]):.2f}, to original "
                 f"{float(result.scores['pcc_to_original'][0]):.2f}")
        with tempfile.TemporaryDirectory() as tmp:
            path = save_attack_figure(
                Path(tmp) / "attack.png", picture(x[0]), result.original_map[0].cpu(),
                result.target_map[0].cpu(), picture(result.adversarial[0]),
                result.adversarial_map[0].cpu(), title)
            figure = path.read_bytes()
        name = f"{self.name}/{job.source.model}/{job.unit.method}/{job.samples[0]}"
        return UnitResult(rows=rows, artifacts={name: figure})
