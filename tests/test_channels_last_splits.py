"""Splits, concatenations and means of channels-last tensors in the PFV engine (MambaOut's
gated CNN block splits its channels with ``dim=-1`` and concatenates them back, its head
averages over ``(1, 2)``), refused until December 2026: each runs as the same call along the
matching axis of the canonical (N, C, H, W) layout, so a model written channels-last gets
the map of the same model written channels-first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai

pytestmark = pytest.mark.usefixtures("float64_default")


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


class GatedConv(nn.Module):
    """MambaOut's block: a dense layer, the channels split (``split``: three ways, gate,
    identity, conv, as MambaOut; ``chunk``: two halves, gate and conv), a depthwise conv on
    the conv part, ``fc2(act(g) * cat(i, c))``, a residual, a mean; ``last``: in
    channels-last layout as timm writes it (along ``-1``), else channels-first with 1x1
    convolutions."""

    def __init__(self, last: bool, split: str = "split"):
        super().__init__()
        self.last, self.split = last, split
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 12)
        conv = 4 if split == "split" else 6
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.fc2 = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3)

    def gated(self, h, dim, conv):
        if self.split == "split":
            g, i, c = torch.split(h, [6, 2, 4], dim=dim)
            return F.gelu(g) * torch.cat((i, conv(c)), dim=dim)
        g, c = h.chunk(2, dim)
        return F.gelu(g) * conv(c)

    def forward(self, x):
        x = F.relu(self.stem(x))
        if self.last:
            t = x.permute(0, 2, 3, 1)
            y = self.gated(self.fc1(t), -1, lambda c: self.conv(c.permute(0, 3, 1, 2))
                           .permute(0, 2, 3, 1))
            t = t + self.fc2(y)
            return self.head(t.mean((1, 2)))
        h = F.conv2d(x, self.fc1.weight[:, :, None, None], self.fc1.bias)
        y = self.gated(h, 1, self.conv)
        x = x + F.conv2d(y, self.fc2.weight[:, :, None, None], self.fc2.bias)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("split", ["split", "chunk"])
@pytest.mark.parametrize("method", ["srd", "lrp_epsilon", "gradcam"])
def test_channels_last_gated_block_equals_channels_first(split, method):
    """(The epsilon composite, one rule for every layer: the composites give the model's dense
    layers the dense rule and 1x1 convolutions the conv rule.)"""
    torch.manual_seed(0)
    last = GatedConv(True, split).eval()
    with torch.no_grad():
        for p in last.parameters():
            p.normal_(0, 0.4)
    first = GatedConv(False, split).eval()
    first.load_state_dict(last.state_dict())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(last(x), first(x), rtol=1e-12, atol=1e-12)
    got = srdxai.explain(last, x, [1, 2], method)
    expected = srdxai.explain(first, x, [1, 2], method)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())
    if method == "srd":
        with torch.no_grad():
            logits = last(x)[[0, 1], [1, 2]]
        torch.testing.assert_close(got.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
