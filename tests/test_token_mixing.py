"""Dense layers over the tokens (MLP-Mixer, ResMLP, gMLP): the operation view follows where
each tensor's vectors lie (``engine/vector_axes.py``), SRD on token vectors shares a token-mixing
layer's output among its input vectors (docs/srd.md), ``method="srd"`` routes such models to
token vectors, and a call that would pair up entries of different vectors is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from coverage_archs import ARCHS, build
from srdxai.engine.optrace import OpTrace, RecordingRule
from srdxai.engine.vector_axes import VectorAxes
from srdxai.errors import UnsupportedOperationError
from srdxai.methods import get_method
from srdxai.methods.srd_tokens import token_structure

DT = torch.float64


class _Axes(RecordingRule):
    def __init__(self) -> None:
        self.axes = VectorAxes()
        self.seen: dict[str, int | None] = {}

    def on_call(self, call, inputs, output):
        self.axes.on_call(call, inputs, output)
        return output

    def on_move(self, func, args, kwargs, output):
        self.axes.on_move(func, args, kwargs, output)


class _Probe(nn.Module):
    """Moves of the kinds transformers and mixers make, each output recorded by name."""

    def __init__(self, record):
        super().__init__()
        self.record = record
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.dense = nn.Linear(8, 24)
        self.mix = nn.Linear(4, 4)

    def forward(self, x):
        r = self.record
        t = r("tokens", self.conv(x).flatten(2).transpose(1, 2))  # (N, 4, 8): vectors last
        r("transposed", t.transpose(1, 2))  # (N, 8, 4): vectors along 1
        r("mixed", self.mix(t.transpose(1, 2)))  # tokens mixed: the vectors stay along 1
        heads = r("heads", self.dense(t).reshape(2, 4, 3, 2, 4).permute(2, 0, 3, 1, 4))
        r("merged", heads[0].transpose(1, 2).reshape(2, 4, 8))  # heads merged: last again
        r("flat", t.flatten(1))  # merged, the vectors innermost: their parts along dim 1
        r("unknown", t.transpose(1, 2).flatten(1))  # the vectors outermost: unknown
        r("stacked", torch.stack([t, t], dim=0))
        r("chunk", t.chunk(2, dim=-1)[1])
        r("mean", t.mean(1))
        return t.mean(1).sum(1, keepdim=True)



def _same_srd_maps(model: nn.Module, twin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SRD's map of class 1 for ``model``, checked to equal ``twin``'s: the same network
    written another way must be explained the same."""
    ours = srdxai.explain(model, x, 1, "srd")
    torch.testing.assert_close(ours, srdxai.explain(twin, x, 1, "srd"), rtol=1e-10, atol=1e-12)
    return ours

def test_vector_axes_follow_moves_views_and_dense_layers():
    rule = _Axes()
    found: dict[str, torch.Tensor] = {}

    def record(name, t):
        found[name] = t
        return t

    x = torch.randn(2, 3, 4, 4)
    rule.axes.start(x)
    with torch.no_grad(), OpTrace(_Probe(record).eval(), x, rule) as trace:
        trace.forward()
        axes = {name: rule.axes.of(t) for name, t in found.items()}
        merged = {name for name, t in found.items() if rule.axes.merged(t)}
    assert axes == {"tokens": 2, "transposed": 1, "mixed": 1, "heads": 4, "merged": 2,
                    "flat": 1, "unknown": None, "stacked": 3, "chunk": 2, "mean": 1}
    assert merged == {"unknown"}  # the vectors merged with the tokens after them
    assert rule.axes.any_mixing


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in {
    "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mobilevit_xxs", "levit_128s",
    "convnext_atto", "torchvision:vit", "torchvision:swin", "torchvision:maxvit",
    "timm:mixer"}], ids=lambda a: a.name)
def test_only_dense_layers_over_tokens_count_as_token_mixing(arch):
    """The probe finds token mixing in the MLP-Mixer and nowhere else: a transformer's or
    ConvNeXt's dense layers read each vector's entries (a false find would make SRD share a
    dense layer's output among tokens)."""
    model = build(arch)
    x = torch.randn(1, 3, arch.size, arch.size)
    structure = token_structure(get_method("srd_tokens")(model), x)
    assert structure.mixing == (arch.name == "timm:mixer")


class _OneMix(nn.Module):
    """Pixels as tokens: (N, C, H, W) -> (N, C, T) -> a dense layer over T -> mean -> head."""

    def __init__(self, tokens=6, out=5, channels=3, classes=4, bias=True, form="linear"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(out, tokens, generator=g, dtype=DT))
        self.bias = nn.Parameter(torch.randn(out, generator=g, dtype=DT)) if bias else None
        self.head = nn.Linear(channels, classes).double()
        self.form = form

    def forward(self, x):
        t = x.flatten(2)  # (N, C, T): vectors along dim 1, tokens along the last
        if self.form == "linear":
            y = F.linear(t, self.weight, self.bias)
        elif self.form == "right":  # x @ W^T on the tokens
            y = t @ self.weight.T
        else:  # W @ x on channels-last tokens, transposed back
            y = (self.weight @ t.transpose(1, 2)).transpose(1, 2)
        return self.head(y.mean(-1))


def _by_hand(model: _OneMix, x: torch.Tensor, target: int) -> torch.Tensor:
    """The definition written out for one sample: the head and the token mean pass the logit
    to the mixed vectors y(t) by <y(t)/T, z> / ||z||^2; y(t) = sum_s W[t,s] x(s) + b[t] 1
    shares by <W[t,s] x(s) + beta, y(t)> / ||y(t)||^2, beta = b[t] 1 split by |W[t,s]| ||x(s)||."""
    w, b = model.weight.detach(), model.bias
    v = x.flatten(1).T  # (S, C): the pixels' vectors
    y = w @ v + (0 if b is None else b.detach()[:, None])  # (T, C)
    z = y.mean(0)
    logit = model.head(z)[target]
    r_y = (y / y.shape[0] @ z) / (z @ z) * logit  # (T,)
    pixels = torch.zeros(v.shape[0], dtype=DT)
    for t in range(y.shape[0]):
        norms = torch.stack([w[t, s].abs() * v[s].norm() for s in range(v.shape[0])])
        for s in range(v.shape[0]):
            part = w[t, s] * v[s]
            if b is not None:
                part = part + b.detach()[t] * norms[s] / norms.sum()
            pixels[s] += (part @ y[t]) / (y[t] @ y[t]) * r_y[t]
    return pixels.reshape(x.shape[1:])


@pytest.mark.parametrize("method", ["srd", "srd_tokens"])
def test_a_token_mixing_layer_by_hand(method):
    model = _OneMix().eval()
    x = torch.randn(2, 3, 2, 3, dtype=DT)
    ours = srdxai.explain(model, x, [1, 2], method)
    for i, target in enumerate([1, 2]):
        torch.testing.assert_close(ours[i], _by_hand(model, x[i], target), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("form", ["right", "left"])
def test_matrix_products_over_tokens_equal_the_dense_layer(form):
    """``x @ W^T`` on the tokens and ``W @ x`` on channels-last tokens are the same layer as
    ``F.linear`` over the tokens (without a bias, which the products do not have)."""
    x = torch.randn(2, 3, 2, 3, dtype=DT)
    dense = _OneMix(bias=False).eval()
    product = _OneMix(bias=False, form=form).eval()
    product.load_state_dict(dense.state_dict())
    _same_srd_maps(product, dense, x)


class _Transposed(nn.Module):
    """Token tensors transposed so that their vectors lie along dim 1, then a LayerNorm, a sum
    of two such tensors, or a sum of tensors whose vectors lie along different axes."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.embed = nn.Conv2d(3, 4, 2, stride=2).double()
        self.norm = nn.LayerNorm(4).double()
        self.mix = nn.Linear(4, 4).double()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, 4 tokens, 4 channels)
        m = self.mix(self.norm(t).transpose(1, 2))  # mixed: (N, channels, tokens)
        if self.kind == "layer_norm":  # normalises each channel across the tokens
            m = F.layer_norm(m, (4,))
        elif self.kind == "sum":  # a residual sum of two tensors whose vectors lie along dim 1
            m = m + self.mix(m)
        elif self.kind == "sum_as_tokens":  # the same sum with both operands as tokens
            return self.head((m.transpose(1, 2) + self.mix(m).transpose(1, 2)).mean(1))
        else:  # tokens plus channels: 4 x 4, so the shapes agree and the vectors do not
            m = m + t
        return self.head(m.transpose(1, 2).mean(1))


@pytest.mark.parametrize("kind", ["layer_norm", "mixed_sum"])
def test_calls_that_would_pair_up_entries_of_different_vectors_are_refused(kind):
    model = _Transposed(kind).eval()
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    with pytest.raises(UnsupportedOperationError, match="vectors lie along dim"):
        srdxai.explain(model, x, 0, "srd")


def test_a_sum_shares_by_the_vectors_along_the_axis_where_they_lie():
    """A sum of two (N, C, T) tensors equals the same sum written on (N, T, C) tokens (until
    December 2026 the operation view read the vectors along the last axis of any sum that
    was not made by convolutions: here the tokens, a map that conserved and was wrong)."""
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    layout = _Transposed("sum").eval()
    tokens = _Transposed("sum_as_tokens").eval()
    tokens.load_state_dict(layout.state_dict())
    ours = _same_srd_maps(layout, tokens, x)
    torch.testing.assert_close(ours.sum((1, 2)), layout(x)[:, 1], rtol=1e-10, atol=1e-12)


def test_srd_tokens_still_refuses_a_cnn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    with pytest.raises(UnsupportedOperationError, match="attention or token-mixing"):
        srdxai.explain(model, torch.randn(1, 3, 8, 8), 0, "srd_tokens")


class _ChannelAttention(nn.Module):
    """DaViT's channel attention in a residual block: ``(A @ q^T)^T`` (``form="left"``) or
    the same product written ``q @ A^T`` (``"right"``), where ``A = softmax(k^T v)`` mixes each
    token's channels; the token vectors stay the vectors of the residual sum after it."""

    def __init__(self, form):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 3)
        self.double().eval()

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, C)
        n, tokens, c = t.shape
        q, k, v = self.qkv(t).reshape(n, tokens, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = (k.transpose(-1, -2) @ v).softmax(-1)  # (N, heads, d, d)
        o = (a @ q.transpose(-1, -2)).transpose(-1, -2) if self.form == "left" else (
            q @ a.transpose(-1, -2))
        t = t + o.transpose(1, 2).reshape(n, tokens, c)
        return self.head(t.mean(1))


def test_channel_attention_keeps_the_token_vectors_for_the_sum_after_it():
    """The product over channels leaves each token a vector: the residual sum after it shares
    by token vectors, in both writings (the first version of the axis tracking read A @ q^T's
    output as channel rows and refused DaViT's sum)."""
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    left, right = _ChannelAttention("left"), _ChannelAttention("right")
    torch.testing.assert_close(left(x), right(x))
    ours = _same_srd_maps(left, right, x)
    torch.testing.assert_close(ours.sum((1, 2)), left(x)[:, 1], rtol=1e-10, atol=1e-12)


class _HeadsJoined(nn.Module):
    """Attention heads joined back into token vectors head-major (``transpose`` then
    ``reshape``: the usual order) or channel-major (NesT's ``permute(0, 2, 3, 1)`` to (C', H));
    ``proj`` reads the joined vectors (its weight's columns follow the order)."""

    def __init__(self, order):
        super().__init__()
        torch.manual_seed(0)
        self.order = order
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.qkv = nn.Linear(6, 18)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.double().eval()

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        n, tokens, c = t.shape
        q, k, v = self.qkv(t).reshape(n, tokens, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        o = (q @ k.transpose(-1, -2)).softmax(-1) @ v  # (N, heads, T, d)
        if self.order == "heads":
            joined = o.transpose(1, 2).reshape(n, tokens, c)
        else:
            joined = o.permute(0, 2, 3, 1).reshape(n, tokens, c)
        return self.head((t + self.proj(joined)).mean(1))


def test_heads_joined_in_either_order_are_token_vectors():
    """NesT joins its heads channel-major; the joined axis is still the token vectors' (the
    first version of the axis tracking took it for a flattened map and refused NesT)."""
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    heads, channels = _HeadsJoined("heads"), _HeadsJoined("channels")
    channels.load_state_dict(heads.state_dict())
    order = torch.arange(6).reshape(2, 3).T.flatten()  # channel-major position -> head-major
    with torch.no_grad():
        channels.proj.weight.copy_(heads.proj.weight[:, order])
    torch.testing.assert_close(channels(x), heads(x))
    _same_srd_maps(channels, heads, x)


class _ChannelsLastBranch(nn.Module):
    """EdgeNeXt's convolutional block inside a model with attention (so SRD runs on the
    operation view): a depthwise convolution, then a dense layer on the channels written
    channels-last (``permute``, ``Linear``, ``permute`` back) or as a 1x1 convolution, a
    residual sum with the block's input, then an attention over the positions."""

    def __init__(self, form):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.norm = nn.LayerNorm(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.dense = nn.Linear(6, 6)
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 3)
        self.double().eval()

    def forward(self, x):
        # the stem's LayerNorm over channels, written channels-last (as EdgeNeXt's): the
        # block's input is then not made by a convolution either
        m = self.norm(self.embed(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = self.dw(m)
        if self.form == "channels_last":
            h = self.dense(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:  # the same dense layer as a 1x1 convolution, and the sum in token layout
            h = F.conv2d(h, self.dense.weight[:, :, None, None], self.dense.bias)
            m = (m.flatten(2).transpose(1, 2) + h.flatten(2).transpose(1, 2)).transpose(
                1, 2).reshape(m.shape)
        if self.form == "channels_last":
            m = m + h  # vectors along dim 1: neither operand was made by a convolution
        t = m.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return self.head(t.mean(1))


def test_a_channels_last_branch_summed_into_a_map_shares_by_channel_vectors():
    """Until December 2026 a sum of maps not made by convolutions was shared along the last
    axis, the image's columns: EdgeNeXt's blocks got a map that summed to the logit and was
    48 % off (found by comparing every probed family's map before and after the change)."""
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    last, first = _ChannelsLastBranch("channels_last"), _ChannelsLastBranch("channels_first")
    torch.testing.assert_close(last(x), first(x))
    _same_srd_maps(last, first, x)
