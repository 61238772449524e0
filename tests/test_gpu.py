"""The GPU code path: every method and the metrics on a CUDA device, against the CPU.

Skipped where no CUDA device is present (this project's CI machine has none); run
``pytest tests/test_gpu.py`` on a machine with a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srdxai
from srdxai import metrics
from srdxai.methods import METHODS
from srdxai.models.zoo import small_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

FAST = {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4},
        "occlusion": {"window": 4, "stride": 4}}
VIT_ONLY = {"attention_rollout", "transformer_attribution", "srd_tokens"}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.gap(torch.relu(self.conv2(h))).flatten(1))


def _pair(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name in VIT_ONLY:
        return small_vit(num_classes=4, image_size=16).eval(), torch.randn(2, 3, 16, 16)
    return Small().eval(), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_on_cuda_matches_cpu(name):
    model, x = _pair(name)
    opts = FAST.get(name, {})
    cpu = srdxai.explain(model, x, [1, 2], name, **opts)
    gpu = srdxai.explain(model.cuda(), x.cuda(), torch.tensor([1, 2]).cuda(), name, **opts)
    assert gpu.device.type == "cuda"
    scale = float(cpu.abs().max()) or 1.0
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4 * scale)


def test_metrics_and_attack_on_cuda():
    model, x = _pair("saliency")
    model, x = model.cuda(), x.cuda()
    y = torch.tensor([1, 2], device="cuda")
    a = srdxai.explain(model, x, y, "saliency")
    fc = metrics.faithfulness_correlation(model, x, y, a, nr_runs=5, subset_size=16, seed=0)
    assert torch.isfinite(fc).all()
    lle = metrics.local_lipschitz_estimate(
        model, x, y, a, explain=lambda m, xx, yy: srdxai.explain(m, xx, yy, "saliency"),
        nr_samples=2, seed=0)
    assert torch.isfinite(lle).all()
    from srdxai.robustness import manipulate

    result = manipulate(model, x, "srd", target_image=x.roll(1, 0), iterations=2, lr=1e-2)
    assert result.adversarial.device.type == "cuda"
