"""Position tags on the operation view (``engine/positions.py``): where each entry of a traced
tensor sits in the input image, through window partitions with cyclic shifts, strided
convolutions and pooling, and what they refuse to guess."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srdxai.engine.optrace import OpRule, OpTrace
from srdxai.engine.positions import UNKNOWN, PositionTags


def _traced(model, x):
    """Run ``model`` (logits out) on ``x`` under the operation view; the tags of every
    computing call's output, in order, as (kind, module name, tags)."""
    tags = PositionTags()
    seen = []

    class Rule(OpRule):
        unknown = "gradient"

        def on_call(self, call, inputs, output):
            tags.on_call(call, inputs, output)
            seen.append((call.kind, call.name, tags.of(output)))
            return output

        def on_move(self, func, args, kwargs, output):
            tags.on_move(func, args, kwargs, output)

    x = x.clone().requires_grad_(True)
    tags.start(x)
    with torch.enable_grad(), OpTrace(model, x, Rule()) as trace:
        trace.forward()
    return seen


def _of(seen, name):
    return next(t for kind, where, t in seen if where == name or kind == name)


def _windows(t, w):
    """(N, H, W, C) -> (N * windows, w * w, C), as Swin partitions."""
    n, h, wd, c = t.shape
    t = t.reshape(n, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(-1, w * w, c)


class _ShiftedWindows(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 2, stride=2)  # 8 x 8 image -> 4 x 4 grid
        self.inner = torch.nn.Linear(8, 8)

    def forward(self, x):
        t = self.embed(x).permute(0, 2, 3, 1)  # (N, 4, 4, 8)
        t = torch.roll(t, (-1, -1), dims=(1, 2))
        return self.inner(_windows(t, 2)).reshape(x.shape[0], -1)


def test_windows_after_a_cyclic_shift_keep_their_places():
    x = torch.randn(2, 3, 8, 8)
    sample, rows, cols = _of(_traced(_ShiftedWindows().eval(), x), "inner")
    # the same partition of the known grid: sample, and patch centres 2 i + 1 in pixels
    grid = torch.stack(torch.meshgrid(torch.arange(2.0), torch.arange(4.0) * 2 + 1,
                                      torch.arange(4.0) * 2 + 1, indexing="ij"), -1)
    expected = _windows(torch.roll(grid, (-1, -1), dims=(1, 2)), 2)  # (8, 4, 3)
    for c, got in enumerate((sample, rows, cols)):
        torch.testing.assert_close(got, expected[..., c:c + 1].expand_as(got))


def test_strided_convolutions_and_pooling_keep_one_place_per_position():
    """Stacked stride-2 convolutions and a max pooling with padding: every output position
    sits in its own cell of its grid (window centres; padding does not pull the border
    ones inwards)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, 1, 1), torch.nn.MaxPool2d(3, 2, 1),
                                torch.nn.Conv2d(4, 4, 3, 1, 1), torch.nn.Flatten()).eval()
    # the last convolution: an 8 x 8 grid of 4-pixel cells
    _, rows, cols = _of(_traced(model, torch.randn(1, 3, 32, 32)), "4")
    cells_y = (rows[0, 0] / 4).floor()
    cells_x = (cols[0, 0] / 4).floor()
    torch.testing.assert_close(cells_y, torch.arange(8.0)[:, None].expand(8, 8))
    torch.testing.assert_close(cells_x, torch.arange(8.0)[None, :].expand(8, 8))


def test_disagreeing_places_and_unknown_calls_are_unknown_not_guessed():
    class Model(torch.nn.Module):
        def forward(self, x):
            a = x.flatten(2)  # (N, C, 16)
            clash = a + torch.roll(a, 1, dims=2)  # two places per entry
            unknown = torch.cumsum(a, 2) * 2  # a call the view has no kind for
            return (clash + unknown).flatten(1)

    seen = _traced(Model(), torch.randn(1, 2, 4, 4))
    clash = seen[0][2]  # the first sum
    unknown = next(t for kind, _, t in seen if kind == "scale")
    assert bool((clash[1] == UNKNOWN).all())  # every entry clashes with a neighbour
    assert bool((unknown[1] == UNKNOWN).all())


def test_padding_and_joined_parameters_have_no_place():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token = torch.nn.Parameter(torch.zeros(1, 1, 3))

        def forward(self, x):
            t = F.pad(x, (1, 1)).flatten(2).transpose(1, 2)  # (N, 4 * 6, 3)
            return (torch.cat([self.token.expand(x.shape[0], -1, -1), t], 1) * 1.5).flatten(1)

    rows = _of(_traced(Model(), torch.randn(1, 3, 4, 4)), "scale")[1][0, :, 0]
    assert bool(rows[0].isnan())  # the joined parameter token
    padded = rows[1:].reshape(4, 6)
    assert bool(padded[:, [0, -1]].isnan().all()) and not bool(padded[:, 1:-1].isnan().any())
