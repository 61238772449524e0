"""absLRP on the engine equals the independent slow reference (``abslrp_oracle.py``, written
from the definition with loops over positions, without reading the engine)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srdxai
from abslrp_oracle import abslrp_reference
from srdxai.models import zoo


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm / LayerNorm statistics and affine parameters, signed biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(-1.0, 1.5, generator=g)
                mod.bias.uniform_(-0.3, 0.3, generator=g)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(-1.0, 1.5, generator=g)
                mod.bias.uniform_(-0.3, 0.3, generator=g)
            elif isinstance(mod, nn.Linear | nn.Conv2d) and mod.bias is not None:
                mod.bias.uniform_(-0.2, 0.2, generator=g)
    return m.double().eval()


def _sequential(act: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), act, nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, stride=2, padding=1, groups=1), nn.BatchNorm2d(6), act,
        nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(24, 7), act, nn.Linear(7, 4))


CASES = {
    "sequential-relu": (lambda: _sequential(nn.ReLU()), 16),
    "sequential-gelu": (lambda: _sequential(nn.GELU()), 16),
    "resnet-relu": (lambda: zoo.SmallResNet(num_classes=4, widths=(4, 6, 6)), 16),
    "resnet-silu": (lambda: zoo.SmallResNet(num_classes=4, activation="silu", widths=(4, 6, 6)),
                    16),
    "vgg-elu": (lambda: zoo.SmallVGG(num_classes=4, activation="elu", widths=(3, 4, 4, 5),
                                     input_size=16), 16),
    "vit-gelu": (lambda: zoo.small_vit(num_classes=4, image_size=16), 16),
    "vit-relu": (lambda: zoo.small_vit(num_classes=4, activation="relu", image_size=16), 16),
}


@pytest.mark.parametrize("contrastive", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_equals_the_slow_reference(case, contrastive):
    build, size = CASES[case]
    torch.manual_seed(0)
    model = _randomize(build(), seed=7)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 3, size, size, generator=g, dtype=torch.float64)
    target = [1, 2, 3]
    expected = abslrp_reference(model, x, target, contrastive=contrastive)
    got = srdxai.explain(model, x, target, "abslrp", contrastive=contrastive,
                         channel_reduce="none")
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
