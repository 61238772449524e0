"""Relevance on a zero pre-activation vector. A bias at a position that no input reaches is
split evenly over the paths into it (docs/srd.md); where such a path's vector is 0 and so is
its own pre-activation (an activation of a scaled activation, ``relu(0.8 * relu(x))``,
StarReLU's ``relu(x) ** 2``), that relevance cannot ride the backward signal, and until
December 2026 SRD lost it without an error (maps 0.023 off their logit of about 0.2 here,
with a 1x1 convolution after the zero vectors). It is now handed on the same way until it
reaches a vector that can carry it, so the map sums to the logit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.methods import srd

pytestmark = pytest.mark.usefixtures("float64_default")


class ScaledActivations(nn.Module):
    def __init__(self, scale: float, kernel: int):
        super().__init__()
        self.scale = scale
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, kernel, padding=kernel // 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.scale * h)  # zero wherever the first ReLU is zero in every channel
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


def _case(scale: float, kernel: int):
    torch.manual_seed(0)
    model = ScaledActivations(scale, kernel).eval()
    return model, torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("scale", [0.8, -0.8])
def test_the_map_sums_to_the_logit(scale, kernel):
    model, x = _case(scale, kernel)
    got = srdxai.SRD(model, seed="logit").attribute(x, [1, 2]).sum((1, 2))
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor([1, 2])]
    torch.testing.assert_close(got, logits, rtol=1e-10, atol=1e-13)


def test_the_case_has_stranded_relevance(monkeypatch):
    """Without the routing the same maps lose relevance (the test above can fail)."""
    monkeypatch.setattr(srd.SRDRule, "_route_stranded", lambda self, node, squares, r: None)
    model, x = _case(0.8, 1)
    got = srdxai.SRD(model, seed="logit").attribute(x, [1, 2]).sum((1, 2))
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor([1, 2])]
    assert float((got - logits).abs().max()) > 1e-3
