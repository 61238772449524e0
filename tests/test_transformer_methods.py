"""Attention rollout and Chefer's transformer attribution against a hand-written ViT forward
pass (no tracer: the attention maps and their gradients come from explicit code), and
AttnLRP's attention relevance from the same hand-written pass with LXT's gradient tricks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import srdxai
from srdxai.errors import UnsupportedOperationError
from srdxai.models.zoo import small_vit


def _model():
    torch.manual_seed(0)
    m = small_vit(num_classes=4, image_size=16).double().eval()
    with torch.no_grad():  # sharper attention than the default init
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return m


T = 5  # small_vit at 16 x 16: 2 x 2 patches of 8 px and the class token


def _scale_grad(t, f):
    """Value ``t``, gradient multiplied by ``f``."""
    return t * f + (t * (1 - f)).detach()


def _forward(m, x, lrp=False):
    """The ViT's forward by hand; returns logits and the attention maps (retaining grads).
    ``lrp``: AttnLRP as gradient tricks (deviation of LayerNorm constant, identity rule on
    GELU, the uniform rule halving the gradient of both operands of each attention product;
    LXT moves the attention product's half below the softmax, which gives the input the same
    relevance but not the attention map)."""

    def ln(t, mod):
        mu = t.mean(-1, keepdim=True)
        sd = (t.var(-1, keepdim=True, unbiased=False) + mod.eps).sqrt()
        return (t - mu) / (sd.detach() if lrp else sd) * mod.weight + mod.bias

    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    h = torch.cat([m.cls_token.expand(len(x), -1, -1), t], 1) + m.pos_embed
    maps = []
    for blk in m.blocks:
        a = blk.attn
        n, tok, d = h.shape
        qkv = a.qkv(ln(h, blk.norm1)).reshape(n, tok, 3, a.heads, d // a.heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        if lrp:  # the uniform rule at q @ k^T
            q, k = _scale_grad(q, 0.5), _scale_grad(k, 0.5)
        att = torch.softmax(q @ k.transpose(-2, -1) * a.scale, -1)
        if att.requires_grad:
            att.retain_grad()
        maps.append(att)
        if lrp:  # and at attn @ v: the attention map's relevance is A * (half its gradient)
            att, v = _scale_grad(att, 0.5), _scale_grad(v, 0.5)
        h = h + a.proj((att @ v).transpose(1, 2).reshape(n, tok, d))
        z = blk.mlp.fc1(ln(h, blk.norm2))
        act = F.gelu(z)
        if lrp:
            act = z * (act / z).detach()
        h = h + blk.mlp.fc2(act)
    return m.head(ln(h, m.norm)[:, 0]), maps


def _to_image(rows):
    grid = rows[:, 1:].reshape(-1, 1, 2, 2)
    return F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]


def test_attention_rollout_equals_the_definition():
    m = _model()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        _, maps = _forward(m, x)
    r = torch.eye(T, dtype=torch.float64).expand(2, -1, -1)
    for a in maps:
        step = (a.mean(1) + torch.eye(T, dtype=torch.float64)) / 2
        r = (step / step.sum(-1, keepdim=True)) @ r
    expected = _to_image(r[:, 0])
    torch.testing.assert_close(srdxai.explain(m, x, 0, "attention_rollout"), expected)
    maxed = srdxai.explain(m, x, 0, "attention_rollout", head_fusion="max")
    assert not torch.allclose(maxed, expected)


@pytest.mark.parametrize("relevance", ["attention", "attnlrp"])
def test_transformer_attribution_equals_the_definition(relevance):
    m = _model()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    out, maps = _forward(m, x)
    out[torch.arange(2), target].sum().backward()
    grads = [a.grad for a in maps]
    if relevance == "attnlrp":
        out, lrp_maps = _forward(m, x, lrp=True)
        out[torch.arange(2), target].sum().backward()
        weights = [a.detach() * a.grad for a in lrp_maps]
    else:
        weights = [a.detach() for a in maps]
    r = torch.eye(T, dtype=torch.float64).expand(2, -1, -1)
    for w, g in zip(weights, grads, strict=True):
        r = r + (g * w).clamp(min=0).mean(1) @ r
    expected = _to_image(r[:, 0])
    ours = srdxai.explain(m, x, target, "transformer_attribution", relevance=relevance)
    torch.testing.assert_close(ours, expected)
    assert ours.std() > 0


def test_cnn_is_refused_clearly_and_options_are_checked():
    from small_models import build_model

    cnn = build_model("PlainNet")
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for name in ("attention_rollout", "transformer_attribution"):
        with pytest.raises(UnsupportedOperationError, match="Vision Transformers only"):
            srdxai.explain(cnn, x, 0, name)
    m = _model()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(srdxai.SrdxaiError, match="head_fusion"):
        srdxai.explain(m, x, 0, "attention_rollout", head_fusion="sum")
    with pytest.raises(srdxai.SrdxaiError, match="relevance"):
        srdxai.explain(m, x, 0, "transformer_attribution", relevance="lrp")
    with pytest.raises(srdxai.SrdxaiError, match="square patch grid"):
        srdxai.explain(m, x, 0, "attention_rollout", prefix_tokens=2)
