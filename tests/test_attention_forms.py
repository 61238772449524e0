"""Attention written the ways timm's other families write it, found by running every method on
80 timm classifiers (random weights, float64):

* a **float ``attn_mask``** in ``F.scaled_dot_product_attention`` (BEiT's, MaxViT-rw's,
  CoAtNet's and TinyViT's relative position biases): added to the scores, so a model passing
  it gets the same map from every method as the same model writing the three steps out;
* ``F.linear(x, weight=w, bias=b)`` by keyword (BEiT's and EVA's qkv): absLRP crashed with an
  IndexError;
* **attention pooling** ``x @ softmax(...)`` with the weights second (a global-context block,
  GCNet / timm's ``GlobalContext``): SRD gave a map summing to 0.1 of the logit without an
  error, the weights taken for the vectors;
* a token map **zero-padded to whole windows** (Twins, DaViT at sizes that are not a multiple
  of the window): the padded tokens' values are the qkv bias alone, a constant term; SRD took
  them for input-dependent sources and lost their share (3-6 % of the logit);
* a squeeze-excitation written ``x.mean((2, 3), keepdim=True)`` inside a hybrid (MaxViT-rw,
  CoAtNet), refused by SRD on token vectors as "an average over the feature vector".
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import UnsupportedOperationError

pytestmark = pytest.mark.usefixtures("float64_default")

# rollout and transformer attribution read a class token's row: these models have none
OPERATION_VIEW = ["abslrp", "attnlrp", "cp_lrp", "lrp_epsilon_plus", "lrp_epsilon", "srd",
                  "srd_tokens", "gradient_x_input", "gradcam", "fullgrad"]


def _x(n: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return model.eval()


def _conserves(model: nn.Module, x: torch.Tensor, target=(1, 3)) -> tuple[torch.Tensor, ...]:
    srd = srdxai.SRD(model, seed="logit").attribute(x, list(target))
    with torch.no_grad():
        logits = model(x)[torch.arange(x.shape[0]), torch.tensor(target)]
    return srd.sum((1, 2)), logits


# -- a float attn_mask, and F.linear's weight by keyword ----------------------------------------
class BiasedAttention(nn.Module):
    """Patch tokens, one attention block with a learned relative position bias, a mean-pooled
    head. ``fused``: the bias goes to ``F.scaled_dot_product_attention`` as ``attn_mask`` and
    the qkv projection passes its weight by keyword (BEiT's code); otherwise the steps are
    written out with positional arguments."""

    def __init__(self, fused: bool, heads: int = 2, dim: int = 8, tokens: int = 16):
        super().__init__()
        self.fused, self.heads = fused, heads
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.zeros(heads, tokens, tokens))
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        n, length, dim = t.shape
        h = self.norm(t)
        if self.fused:
            qkv = F.linear(h, weight=self.qkv.weight, bias=self.qkv.bias)
        else:
            qkv = F.linear(h, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.unsqueeze(0))
        else:
            scores = (q * (1 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
            o = torch.softmax(scores + self.bias.unsqueeze(0), -1) @ v
        t = t + self.proj(o.transpose(1, 2).reshape(n, length, dim))
        return self.head(t.mean(1))


def _biased_pair() -> tuple[nn.Module, nn.Module]:
    fused = _randomise(BiasedAttention(fused=True))
    written = BiasedAttention(fused=False).eval()
    written.load_state_dict(fused.state_dict())
    return fused, written


def test_the_biased_models_agree():
    fused, written = _biased_pair()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), written(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", OPERATION_VIEW)
def test_a_float_attn_mask_is_added_to_the_scores(method):
    fused, written = _biased_pair()
    x = _x()
    a = srdxai.explain(fused, x, [1, 3], method)
    b = srdxai.explain(written, x, [1, 3], method)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * b.abs().max().item())


def test_srd_with_a_relative_position_bias_conserves():
    fused, _ = _biased_pair()
    got, logits = _conserves(fused, _x())
    torch.testing.assert_close(got, logits, rtol=1e-9, atol=1e-12)


class MaskedAttention(nn.Module):
    def __init__(self, mask: torch.Tensor | None = None, causal: bool = False):
        super().__init__()
        self.mask, self.causal = mask, causal
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        o = F.scaled_dot_product_attention(t, t, t, attn_mask=self.mask, is_causal=self.causal)
        return self.head(o.mean(1))


@pytest.mark.parametrize("method", ["abslrp", "srd", "attnlrp"])
@pytest.mark.parametrize("what, model", [
    ("boolean", lambda: MaskedAttention(torch.ones(4, 4, dtype=torch.bool).tril())),
    ("non-finite", lambda: MaskedAttention(torch.zeros(4, 4).fill_diagonal_(-math.inf))),
    ("causal", lambda: MaskedAttention(causal=True)),
])
def test_masks_that_remove_positions_are_refused(method, what, model):
    with pytest.raises(UnsupportedOperationError, match="boolean or non-finite|causal"):
        srdxai.explain(model().eval(), _x(), 1, method)


# -- attention pooling with the weights second (a global-context block) -------------------------
class GlobalContextNet(nn.Module):
    """A conv, a global-context block (timm's ``GlobalContext``, ``fuse_add``: attention
    pooling of the channel vectors, a small MLP, added back at every position) and a pooled
    head."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.attn = nn.Conv2d(channels, 1, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 3, 1), nn.ReLU(), nn.Conv2d(3, channels, 1))
        self.head = nn.Linear(channels, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c, h, w = x.shape
        weights = torch.softmax(self.attn(x).reshape(n, 1, h * w), -1).unsqueeze(3)
        context = (x.reshape(n, c, h * w).unsqueeze(1) @ weights).view(n, c, 1, 1)
        x = x + self.mlp(context)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_attention_pooling_conserves():
    got, logits = _conserves(_randomise(GlobalContextNet()), _x())
    torch.testing.assert_close(got, logits, rtol=1e-9, atol=1e-12)


def test_a_product_of_two_activations_is_refused_by_srd_on_tokens():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 4, stride=4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            a = torch.softmax(t @ t.transpose(1, 2), -1)  # attention, so SRD uses tokens
            t = a @ t
            return self.head((t @ t.transpose(1, 2) @ t).mean(1))

    with pytest.raises(UnsupportedOperationError,
                       match="neither of which is attention weights"):
        srdxai.explain(_randomise(Bilinear()), _x(), 1, "srd")


# -- a token map padded to whole windows -------------------------------------------------------
class PaddedWindows(nn.Module):
    """Patch tokens on a 3 x 3 grid, padded with zeros to 4 x 4 and attended within 2 x 2
    windows (Twins' locally-grouped attention), cropped back, and a pooled head."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        t = self.embed(x).permute(0, 2, 3, 1)  # (N, 3, 3, D)
        n, h, w, d = t.shape
        p = F.pad(t, (0, 0, 0, 1, 0, 1))  # (N, 4, 4, D): the padded tokens are zeros
        win = p.reshape(n, 2, 2, 2, 2, d).transpose(2, 3).reshape(n * 4, 4, d)
        q, k, v = self.qkv(win).reshape(n * 4, 4, 3, d).permute(2, 0, 1, 3).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.reshape(n, 2, 2, 2, 2, d).transpose(2, 3).reshape(n, 4, 4, d)[:, :h, :w]
        t = t + self.proj(o)
        return self.head(t.mean((1, 2)))


def test_padded_windows_conserve():
    got, logits = _conserves(_randomise(PaddedWindows()), _x(size=6))
    torch.testing.assert_close(got, logits, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["abslrp", "attnlrp", "lrp_epsilon_plus", "srd_tokens"])
def test_padded_windows_give_finite_maps(method):
    m = srdxai.explain(_randomise(PaddedWindows()), _x(size=6), 1, method)
    assert m.shape == (2, 6, 6) and torch.isfinite(m).all()


# -- squeeze-excitation written as a mean over positions in a hybrid ----------------------------
class HybridSE(nn.Module):
    """A conv stage with a squeeze-excitation gate (``mean``: ``x.mean((2, 3), keepdim=True)``
    as MaxViT-rw writes it, else adaptive average pooling), then tokens through attention."""

    def __init__(self, mean: bool, dim: int = 6):
        super().__init__()
        self.mean = mean
        self.conv = nn.Conv2d(3, dim, 2, stride=2)
        self.fc1, self.fc2 = nn.Conv2d(dim, 3, 1), nn.Conv2d(3, dim, 1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = F.silu(self.conv(x))
        pooled = x.mean((2, 3), keepdim=True) if self.mean else F.adaptive_avg_pool2d(x, 1)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        return self.head(t.mean(1))


def _one_srd_map(cls, option: str) -> nn.Module:
    """``cls`` with ``option`` True and False (the same parameters) get one SRD map; the
    first is returned."""
    first = _randomise(cls(**{option: True}))
    second = cls(**{option: False}).eval()
    second.load_state_dict(first.state_dict())
    x = _x()
    a = srdxai.explain(first, x, [1, 3], "srd")
    b = srdxai.explain(second, x, [1, 3], "srd")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return first


def test_a_mean_over_positions_of_a_map_is_a_token_mean():
    by_mean = _one_srd_map(HybridSE, "mean")
    x = _x()
    got, logits = _conserves(by_mean, x)
    torch.testing.assert_close(got, logits, rtol=1e-9, atol=1e-12)


class MapHead(nn.Module):
    """Patch tokens through attention, then a head pooling them: ``map``: the tokens
    permuted back into an (N, C, H, W) map and averaged over (2, 3) (PVT-v2's head), else the
    token mean."""

    def __init__(self, map: bool, dim: int = 6):
        super().__init__()
        self.map = map
        self.conv = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        n, _, h, w = self.conv(x).shape
        t = self.conv(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + F.scaled_dot_product_attention(q, k, v)
        if self.map:
            return self.head(t.reshape(n, h, w, -1).permute(0, 3, 1, 2).mean((2, 3)))
        return self.head(t.mean(1))


def test_a_mean_over_the_positions_of_a_permuted_map_is_a_token_mean():
    _one_srd_map(MapHead, "map")
