"""GroupNorm on the operation view (absLRP, AttnLRP, the LRP composites on the transformer
rules, SRD on tokens), which refused it until December 2026 (PoolFormer, MobileViTV2).

The view runs ``F.group_norm`` as one LayerNorm per group over the group's channels and
positions, the affine parameters expanded over the positions: the same function, so every
rule treats a GroupNorm as a LayerNorm. With one group that is a LayerNorm over (C, H, W),
which a model may call itself; both must give the same map. SRD on tokens keeps a vector per
position (the statistics are constants: one source, ``mu = 1``), so its map equals that of
the model with the statistics frozen to their values as constants.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from same_maps import assert_same_maps, image_batch
from srdxai.errors import UnsupportedOperationError

pytestmark = pytest.mark.usefixtures("float64_default")

METHODS = ["abslrp", "attnlrp", "cp_lrp", "lrp_epsilon_plus", "lrp_epsilon", "srd_tokens",
           "gradient_x_input", "gradcam"]


class Normed(nn.Module):
    """A conv, a GroupNorm written three ways, an attention over the positions, a pooled
    head. ``form``: ``"module"`` (``nn.GroupNorm``), ``"layer_norm"`` (one group only:
    ``F.layer_norm`` over (C, H, W) with the affine parameters expanded), ``"frozen"`` (the
    statistics of ``frozen_for`` as constants: a scale and a shift per sample and channel)."""

    def __init__(self, groups: int, form: str = "module"):
        super().__init__()
        self.form, self.frozen_for = form, None
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(groups, 4)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def normalise(self, x):
        gn = self.gn
        if self.form == "module":
            return gn(x)
        n, c, h, w = x.shape
        if self.form == "layer_norm":
            assert gn.num_groups == 1
            return F.layer_norm(x, (c, h, w), gn.weight[:, None, None].expand(c, h, w),
                                gn.bias[:, None, None].expand(c, h, w), gn.eps)
        with torch.no_grad():  # the statistics, constants of the frozen model
            flat = self.frozen_for.reshape(n, gn.num_groups, -1)
            mean = flat.mean(-1).repeat_interleave(c // gn.num_groups, 1)
            std = (flat.var(-1, unbiased=False) + gn.eps).sqrt().repeat_interleave(
                c // gn.num_groups, 1)
            scale = (gn.weight / std)[..., None, None]
            shift = (gn.bias - mean * gn.weight / std)[..., None, None]
        return x * scale + shift

    def features(self, x):
        return torch.relu(self.conv(x))

    def forward(self, x):
        x = self.normalise(self.features(x))
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        return self.head(t.mean(1))


def _models(groups: int, *forms: str) -> list[Normed]:
    torch.manual_seed(0)
    first = Normed(groups).eval()
    with torch.no_grad():
        for p in first.parameters():
            p.normal_(0, 0.4)
    models = [first]
    for form in forms:
        other = Normed(groups, form).eval()
        other.load_state_dict(first.state_dict())
        models.append(other)
    return models


@pytest.mark.parametrize("method", METHODS)
def test_one_group_is_a_layer_norm_over_the_map(method):
    a, b = _models(1, "layer_norm")
    with torch.no_grad():
        torch.testing.assert_close(a(image_batch()), b(image_batch()), rtol=1e-12, atol=1e-12)
    assert_same_maps(a, b, image_batch(), method)


@pytest.mark.parametrize("method", METHODS)
def test_several_groups_give_finite_maps(method):
    (model,) = _models(2)
    got = srdxai.explain(model, image_batch(), [1, 2], method)
    assert got.shape[0] == 2 and torch.isfinite(got).all() and bool(got.abs().sum() > 0)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_srd_tokens_keeps_a_vector_per_position(groups):
    """The map of the model with the statistics frozen to constants, and the logit."""
    a, frozen = _models(groups, "frozen")
    x = image_batch()
    with torch.no_grad():
        frozen.frozen_for = a.features(x)
        torch.testing.assert_close(a(x), frozen(x), rtol=1e-12, atol=1e-12)
        logits = a(x)[[0, 1], [1, 2]]
    got = srdxai.explain(a, x, [1, 2], "srd_tokens")
    expected = srdxai.explain(frozen, x, [1, 2], "srd_tokens")
    torch.testing.assert_close(got.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


def test_fullgrad_refuses_a_group_norm_with_attention():
    (model,) = _models(2)
    with pytest.raises(UnsupportedOperationError, match="GroupNorm .*'gn'"):
        srdxai.explain(model, image_batch(), [1, 2], "fullgrad")


def test_a_layer_norm_over_a_map_of_unknown_layout_is_refused_by_srd_tokens():
    """A LayerNorm over (C, H, W) of a tensor the view cannot tell for a map (it was
    permuted): SRD on tokens cannot tell its vectors, so it refuses instead of mixing the
    positions."""

    class Permuted(Normed):
        def normalise(self, x):
            x = x.permute(0, 1, 3, 2)
            return F.layer_norm(x, x.shape[1:]).permute(0, 1, 3, 2)

    torch.manual_seed(0)
    with pytest.raises(UnsupportedOperationError, match="LayerNorm over 3 dimensions"):
        srdxai.explain(Permuted(1).eval(), image_batch(), [1, 2], "srd_tokens")
