"""Split attention in the PFV engine (SKNet's selective kernel, ResNeSt's split attention),
refused until December 2026: branches stacked along dim 1 (``torch.stack``) or one map viewed
as (N, branches, C, H, W), a softmax over the branches as a gate (one value per branch and
channel: a constant weight, docs/srd.md), and the sum over the branches. The map equals that
of the same block written branch by branch (each branch times its own gate, then added), and
sums to the logit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from same_maps import assert_same_maps, image_batch, written_pair

pytestmark = pytest.mark.usefixtures("float64_default")


class SplitAttention(nn.Module):
    """Two branches (3x3 and dilated 3x3 convolutions), their sum pooled into a softmax over
    the branches, each branch weighted by it, summed. ``form``: ``"stack"`` (SKNet),
    ``"view"`` (ResNeSt: one conv with both branches' channels, viewed), or
    ``"gate_first"`` (the product written ``attn * x``); ``written``: branch by branch."""

    def __init__(self, written: bool, form: str = "stack"):
        super().__init__()
        self.written, self.form = written, form
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.fc1, self.fc2 = nn.Conv2d(4, 3, 1), nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        p1, p2 = F.relu(self.b1(x)), F.relu(self.b2(x))
        n, c = p1.shape[:2]
        pooled = (p1 + p2).mean((2, 3), keepdim=True)
        attn = torch.softmax(self.fc2(F.relu(self.fc1(pooled))).view(n, 2, c, 1, 1), dim=1)
        if self.written:
            y = p1 * attn[:, 0] + p2 * attn[:, 1]
        else:
            if self.form == "view":
                paths = torch.cat([p1, p2], 1).view(n, 2, c, *p1.shape[2:])
            else:
                paths = torch.stack([p1, p2], dim=1)
            y = (attn * paths if self.form == "gate_first" else paths * attn).sum(dim=1)
        return self.head(F.relu(x + y).mean((2, 3)))


@pytest.mark.parametrize("form", ["stack", "view", "gate_first"])
def test_split_attention_equals_the_branches_written_out(form):
    a, b = written_pair(SplitAttention, form=form)
    x = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
        logits = a(x)[[0, 1], [1, 2]]
    got = assert_same_maps(a, b, x, "srd")
    torch.testing.assert_close(got.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
