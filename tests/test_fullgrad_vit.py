"""FullGrad on a Vision Transformer against a hand-written forward pass (no tracer): the input
term plus, for every bias acting on the patch grid (the patch embedding, every dense layer on
tokens, every LayerNorm with its shift ``beta - mean * gamma / std`` per token),
``psi(|b * dS/d(output)|)`` on the patch grid, the class token dropped; psi is pytorch-grad-cam's
per-sample, per-channel min-max scaling; maps upsampled bilinearly and summed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import srdxai
from srdxai.errors import InvalidInputError
from srdxai.models.zoo import small_vit

EPS = 1e-7


def _scale(m):
    """Min-max per sample and channel over the positions: (N, C, h, w)."""
    low = m.amin((2, 3), keepdim=True)
    shifted = m - low
    return shifted / (shifted.amax((2, 3), keepdim=True) + EPS)


def _reference(model, x, target):
    outputs = []  # (value, bias broadcast like it) of every bias on the grid

    def keep(value, bias):
        value.retain_grad()
        outputs.append((value, bias))
        return value

    def ln(t, mod):
        mean = t.mean(-1, keepdim=True)
        std = (t.var(-1, keepdim=True, unbiased=False) + mod.eps).sqrt()
        y = (t - mean) / std * mod.weight + mod.bias
        return keep(y, mod.bias - mean / std * mod.weight)

    def linear(t, mod):
        return keep(F.linear(t, mod.weight, mod.bias), mod.bias)

    x = x.clone().requires_grad_(True)
    conv = model.patch_embed.proj
    grid = keep(F.conv2d(x, conv.weight, conv.bias, stride=conv.stride),
                conv.bias.reshape(1, -1, 1, 1))
    h = grid.flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(len(x), -1, -1), h], 1) + model.pos_embed
    for blk in model.blocks:
        a = blk.attn
        n, tok, d = h.shape
        qkv = linear(ln(h, blk.norm1), a.qkv).reshape(n, tok, 3, a.heads, d // a.heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        att = torch.softmax(q * a.scale @ k.transpose(-2, -1), -1)
        h = h + linear((att @ v).transpose(1, 2).reshape(n, tok, d), a.proj)
        h = h + linear(blk.mlp.act(linear(ln(h, blk.norm2), blk.mlp.fc1)), blk.mlp.fc2)
    logits = F.linear(ln(h, model.norm)[:, 0], model.head.weight, model.head.bias)
    logits[torch.arange(len(x)), target].sum().backward()
    size = x.shape[2:]
    cam = _scale((x.grad * x).abs()).sum(1)
    gh, gw = grid.shape[2:]
    for value, bias in outputs:
        m = (bias * value.grad).abs().detach()
        if m.dim() == 3:  # tokens: drop the class token, lay the patches on their grid
            m = m[:, 1:].reshape(len(x), gh, gw, -1).permute(0, 3, 1, 2)
        cam = cam + F.interpolate(_scale(m).sum(1, keepdim=True), size=size, mode="bilinear",
                                  align_corners=False)[:, 0]
    return cam.detach()


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_fullgrad_on_a_vit_equals_the_hand_written_definition(activation):
    torch.manual_seed(0)
    model = small_vit(num_classes=4, activation=activation, image_size=32).double().eval()
    with torch.no_grad():  # biases and LayerNorm parameters that matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([1, 3])
    expected = _reference(model, x, target)
    got = srdxai.explain(model, x, target, "fullgrad")
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


class _Folding(torch.nn.Module):
    """Patch tokens, then a dense layer on them, either on the tokens as they are or on
    windows of two tokens folded into the batch (after a cyclic shift, as Swin does): the same
    function with the same bias gradients, so FullGrad must give the same map."""

    def __init__(self, fold: bool, shift: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.vit = small_vit(num_classes=3, image_size=16)
        self.mix = torch.nn.Linear(64, 64)
        self.fold, self.shift = fold, shift

    def forward(self, x):
        tokens = self.vit.patch_embed(x)  # (N, 4, 64): a 2 x 2 grid
        if self.fold:
            shifted = torch.roll(tokens, self.shift, dims=1)
            windows = self.mix(shifted.reshape(-1, 2, 64))  # two tokens per "window"
            mixed = torch.roll(windows.reshape(tokens.shape), -self.shift, dims=1)
        else:
            mixed = self.mix(tokens)
        h = tokens + mixed
        att = torch.softmax(h @ h.transpose(1, 2), -1) @ h
        return self.vit.head(att.mean(1))


@pytest.mark.parametrize("shift", [0, 1])
def test_fullgrad_puts_biases_folded_into_the_batch_back_in_place(shift):
    """A bias on windows folded into the batch (Swin, MobileViT, LeViT) is placed where its
    tokens came from: the map equals that of the unfolded model, also after a cyclic shift."""
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plain = _Folding(fold=False).double().eval()
    folded = _Folding(fold=True, shift=shift).double().eval()
    folded.load_state_dict(plain.state_dict())
    torch.testing.assert_close(folded(x), plain(x))
    expected = srdxai.explain(plain, x, 0, "fullgrad")
    got = srdxai.explain(folded, x, 0, "fullgrad")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the shift matters: placing the windows' rows in folded order would differ
    assert shift == 0 or not torch.allclose(got, srdxai.explain(
        _Unrolled(folded).eval(), x, 0, "fullgrad"))


class _Unrolled(torch.nn.Module):
    """``folded`` with its windows put back without undoing the shift: a different model
    whose map must differ (so the test above can tell a shift that was undone)."""

    def __init__(self, folded: _Folding):
        super().__init__()
        self.inner = folded

    def forward(self, x):
        m = self.inner
        tokens = m.vit.patch_embed(x)
        shifted = torch.roll(tokens, m.shift, dims=1)
        mixed = m.mix(shifted.reshape(-1, 2, 64)).reshape(tokens.shape)
        h = tokens + mixed
        att = torch.softmax(h @ h.transpose(1, 2), -1) @ h
        return m.vit.head(att.mean(1))


def test_fullgrad_refuses_biases_whose_place_is_unknown():
    """A bias after a call the operation view has no kind for (a cumulative sum over the
    tokens) has no known place: a clear error, never a map that leaves it out or puts it
    elsewhere."""

    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = small_vit(num_classes=3, image_size=16)
            self.mix = torch.nn.Linear(64, 64)

        def forward(self, x):
            tokens = self.vit.patch_embed(x)
            h = tokens + self.mix(torch.cumsum(tokens, 1))
            att = torch.softmax(h @ h.transpose(1, 2), -1) @ h
            return self.vit.head(att.mean(1))

    with pytest.raises(InvalidInputError, match="known place in the image"):
        srdxai.explain(Unknown().eval(), torch.randn(2, 3, 16, 16), 0, "fullgrad")


class _ChannelAttention(torch.nn.Module):
    """Patch tokens, then XCiT's / DaViT's channel attention: ``attn = softmax(q^T k)`` over
    the channels, ``out = attn @ v^T`` (rows: channels, columns: tokens), then a dense layer
    with a bias on the tokens. ``transposed``: the same values as ``(v @ attn^T)``, whose rows
    are the tokens."""

    def __init__(self, transposed: bool):
        super().__init__()
        torch.manual_seed(0)
        self.transposed = transposed
        self.embed = torch.nn.Conv2d(3, 6, 2, stride=2)
        self.qkv = torch.nn.Linear(6, 18)
        self.proj = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, C)
        q, k, v = self.qkv(t).chunk(3, -1)
        attn = torch.softmax(q.transpose(1, 2) @ k, -1)  # (N, C, C)
        if self.transposed:
            mixed = v @ attn.transpose(1, 2)  # (N, T, C): rows are tokens
        else:
            mixed = (attn @ v.transpose(1, 2)).transpose(1, 2)  # rows are channels first
        t = t + self.proj(mixed)
        return self.head(t.mean(1))


def test_fullgrad_places_channel_attention_by_its_token_columns():
    """``a @ b`` whose rows share one place (channels) sits where ``b``'s columns (tokens) do:
    the map of the model writing the product with the tokens as rows."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    by_columns, by_rows = _ChannelAttention(False).eval(), _ChannelAttention(True).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_columns(x), by_rows(x), rtol=1e-5, atol=1e-6)
    expected = srdxai.explain(by_rows, x, [1, 2], "fullgrad")
    got = srdxai.explain(by_columns, x, [1, 2], "fullgrad")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
