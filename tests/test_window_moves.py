"""Calls that copy entries, which the operation view refused until December 2026: sliding
windows (``F.unfold`` with zero padding, ``Tensor.unfold``: HaloNet's and VOLO's
neighbourhoods, TNT's pixel patches), repeats (``repeat_interleave``: GCViT's global query;
``tile``) and gathers by index. Each only moves values, so a model calling it gets the map of
the same model building the tensor from slices, stacks and concatenations.

Also: an activation's output keeps telling for a gate after it is moved (ECA's
``x * sigmoid(y).view(N, C, 1, 1).expand_as(x)``, the signal first), where the operation view
had taken the signal for the gate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from same_maps import assert_same_maps, image_batch, written_pair
from srdxai.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("float64_default")

METHODS = ["abslrp", "attnlrp", "cp_lrp", "lrp_epsilon_plus", "srd_tokens", "gradient_x_input",
           "fullgrad"]
FORMS = ["F.unfold", "Tensor.unfold", "repeat_interleave", "tile", "gather"]


def _windows_written(x: torch.Tensor) -> torch.Tensor:
    """``F.unfold(x, 3, padding=1, stride=2)`` from zero padding, slices and a stack."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    taps = [padded[:, :, ky:ky + h:2, kx:kx + w:2] for ky in range(3) for kx in range(3)]
    return torch.stack(taps, 2).reshape(n, c * 9, -1)


class Windowed(nn.Module):
    """A conv, 3x3 windows at stride 2 embedded as tokens (TNT / VOLO style), one attention
    whose keys and values pass through the form under test, a pooled head."""

    def __init__(self, written: bool, form: str):
        super().__init__()
        self.written, self.form = written, form
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.embed = nn.Linear(36, 6)
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 3)

    def windows(self, x):
        if self.written or self.form not in ("F.unfold", "Tensor.unfold"):
            return _windows_written(x)
        if self.form == "F.unfold":
            return F.unfold(x, 3, padding=1, stride=2)
        n, c = x.shape[:2]
        cols = F.pad(x, (1, 1, 1, 1)).unfold(2, 3, 2).unfold(3, 3, 2)  # (N, C, 4, 4, 3, 3)
        return cols.permute(0, 1, 4, 5, 2, 3).reshape(n, c * 9, -1)

    def keys(self, t):
        """Keys and values from the tokens, copied by the form under test."""
        n, length, d = t.shape
        if self.form == "repeat_interleave":
            return (torch.stack([t, t], 2).reshape(n, 2 * length, d) if self.written
                    else t.repeat_interleave(2, dim=1))
        if self.form == "tile":
            return torch.cat([t, t], 1) if self.written else t.tile(1, 2, 1)
        if self.form == "gather":
            order = torch.arange(length - 1, -1, -1)
            if self.written:
                return t[:, order]
            return t.gather(1, order.view(1, -1, 1).expand(n, length, d))
        return t

    def forward(self, x):
        x = torch.relu(self.conv(x))
        t = self.embed(self.windows(x).transpose(1, 2))  # (N, 16, 6)
        q = self.qkv(t)[..., :6]
        kv = self.qkv(self.keys(t))
        t = t + F.scaled_dot_product_attention(q, kv[..., 6:12], kv[..., 12:])
        return self.head(t.mean(1))


@pytest.mark.parametrize("form", FORMS)
def test_the_written_models_agree(form):
    a, b = written_pair(Windowed, form=form)
    with torch.no_grad():
        torch.testing.assert_close(a(image_batch()), b(image_batch()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", FORMS)
def test_copies_move_values(form, method):
    a, b = written_pair(Windowed, form=form)
    if method == "fullgrad" and form in ("repeat_interleave", "tile"):
        # twice the tokens have no grid of the image's aspect ratio: both forms are refused
        for model in (a, b):
            with pytest.raises(InvalidInputError, match="no place in the image"):
                srdxai.explain(model, image_batch(), [1, 2], method)
        return
    assert_same_maps(a, b, image_batch(), method)


def test_unfold_padding_is_constant_and_has_no_place():
    """The constant mask and the position tags of ``F.unfold``'s padded entries: constant
    (what SRD on tokens needs to treat them as no source), and no place in the image (NaN)."""
    from srdxai.engine.catalogue import unfold_filled

    x = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask = unfold_filled((x, 3), {"padding": 1}, True)  # (1, 9, 4)
    # the centre tap is always inside; at position (0, 0) the taps above and left are padding
    assert not mask[0, 4].any()
    assert mask[0, :, 0].tolist() == [True, True, True, True, False, False, True, False, False]
    tags = unfold_filled((torch.arange(4.0).view(1, 1, 2, 2), 3, 1, 1), {}, float("nan"))
    assert torch.isnan(tags[0, 0, 0]) and tags[0, 4].tolist() == [0.0, 1.0, 2.0, 3.0]


class Eca(nn.Module):
    """A conv, timm's ECA gate (``x * sigmoid(conv1d(mean)).view(N, C, 1, 1).expand_as(x)``:
    the signal first, the gate moved), an attention over the positions, a pooled head.
    ``written``: the gate broadcast, unmoved (``x * g`` with ``g`` (N, C, 1, 1))."""

    def __init__(self, written: bool):
        super().__init__()
        self.written = written
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c, h, w = x.shape
        g = torch.sigmoid(self.eca(x.mean((2, 3)).view(n, 1, c))).view(n, c, 1, 1)
        x = x * g if self.written else x * g.expand_as(x)
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        return self.head(t.mean(1))


@pytest.mark.parametrize("method", ["srd_tokens", "abslrp", "lrp_epsilon_plus", "srd"])
def test_a_moved_sigmoid_stays_the_gate(method):
    a, b = written_pair(Eca)
    x = image_batch()
    if method == "srd":  # the PFV engine on the CNN part alone: the same rule
        a, b = (nn.Sequential(m.conv, _EcaOnly(m)) for m in (a, b))
    got = srdxai.explain(a, x, [1, 2], method)
    expected = srdxai.explain(b, x, [1, 2], method)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


class _EcaOnly(nn.Module):
    """The ECA block of :class:`Eca` after a ReLU, then global pooling: a CNN."""

    def __init__(self, model: Eca):
        super().__init__()
        self.model = model

    def forward(self, x):
        x = torch.relu(x)
        n, c = x.shape[:2]
        g = torch.sigmoid(self.model.eca(x.mean((2, 3)).view(n, 1, c))).view(n, c, 1, 1)
        x = x * g if self.model.written else x * g.expand_as(x)
        return self.model.head(x.mean((2, 3)))


class PaddedPatches(nn.Module):
    """``F.unfold`` with a 1x1 window and padding 1: the border tokens are padding alone, so
    after the embedding's bias they do not depend on the image (constant terms, as a token
    map zero-padded with ``F.pad`` is: Twins, DaViT). ``written``: ``F.pad`` first."""

    def __init__(self, written: bool):
        super().__init__()
        self.written = written
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        cols = (F.unfold(F.pad(x, (1, 1, 1, 1)), 1) if self.written
                else F.unfold(x, 1, padding=1))
        t = cols.transpose(1, 2)  # (N, 100, 4): 36 tokens of padding alone
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        return self.head(t.mean(1))


def test_tokens_of_unfold_padding_are_constant_terms():
    a, b = written_pair(PaddedPatches)
    x = image_batch()
    got = srdxai.explain(a, x, [1, 2], "srd_tokens")
    expected = srdxai.explain(b, x, [1, 2], "srd_tokens")
    with torch.no_grad():
        logits = a(x)[[0, 1], [1, 2]]
    torch.testing.assert_close(got.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


class Folded(nn.Module):
    """A 1x1 conv on a (N, 3, 1, W) image, its vectors copied into overlapping 1x2 windows
    (``F.unfold``) and summed back (``F.fold``: the inner positions get two copies), a mean
    and a dense head; plus an attention weighted by zero, which SRD on tokens asks for and
    which takes no share (its contribution to the sum is 0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        v = self.conv(x)
        y = F.fold(F.unfold(v, (1, 2)), tuple(v.shape[2:]), (1, 2))
        t = y.flatten(2).transpose(1, 2)
        attention = F.scaled_dot_product_attention(t, t, t).mean(1)
        return self.head(t.mean(1) + 0.0 * attention)


def test_srd_tokens_on_a_fold_by_hand():
    """SRD on tokens through ``F.fold`` against the definition written out: the column
    vectors that land on a position are its sources, ``mu = <c, y(p)> / ||y(p)||^2``."""
    torch.manual_seed(0)
    model = Folded().eval()
    x = torch.randn(1, 3, 1, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = 2
    got = srdxai.explain(model, x, target, "srd_tokens")[0, 0]  # (W,)
    with torch.no_grad():
        v = model.conv(x)[0, :, 0]  # (C, W): one vector per position
        width = v.shape[1]
        y = v.clone()
        y[:, 1:-1] *= 2  # each inner vector lands twice
        mean = y.mean(1)
        logit = model(x)[0, target]
        r_y = (y / width * mean[:, None]).sum(0) / mean.dot(mean) * logit  # the mean's shares
        expected = torch.zeros(width, dtype=torch.float64)
        for window in range(width - 1):
            for offset in (0, 1):
                p = window + offset  # the column (window, offset) copies v(p) and lands on p
                share = v[:, p].dot(y[:, p]) / y[:, p].dot(y[:, p])
                expected[p] += share * r_y[p]  # the copy's relevance goes back to v(p)
    torch.testing.assert_close(got.sum(), logit, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class MaxOver(nn.Module):
    """Tokens, one attention, a head reading ``t.max(1)`` (VOLO's token-label head), with the
    indices used too; ``written``: ``amax`` and ``argmax``."""

    def __init__(self, written: bool):
        super().__init__()
        self.written = written
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        if self.written:
            values, indices = t.amax(1), t.argmax(1)
        else:
            values, indices = t.max(1)
        assert indices.dtype == torch.int64
        return self.head(values)


@pytest.mark.parametrize("method", METHODS)
def test_max_over_a_dimension_is_amax(method):
    a, b = written_pair(MaxOver)
    assert_same_maps(a, b, image_batch(), method)
