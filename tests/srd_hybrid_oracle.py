"""Slow, independent reference ("oracle") of SRD (Sharing Ratio Decomposition) with every
computing operation as its own layer, for a tiny CNN-transformer hybrid defined here
(:class:`TinyHybrid`: a conv stem, a MobileNet-style inverted-residual block in (N, C, H, W)
layout, optionally with a squeeze-excitation gate (``se=True``, MobileNetV3 / MBConv placement),
optionally followed by an ECA gate (``eca=True``, timm's ``EcaModule``) and / or a global-context
block (``gc=True``, GCNet / timm's ``GlobalContext`` with ``fuse_add=True, fuse_scale=False``),
optionally a 3 x 3 / stride 2 max pooling of the map (``max_pool=True``, NesT / HaloNet-stem
style), then tokens, optionally pooled in pairs by an elementwise max (``token_max=True``,
Hiera's mask-unit pooling), through one pre-norm transformer block and a token-mean head).

Written from the definition only: nothing under ``srdxai/engine`` or ``srdxai/methods`` was read.
The transformer part reuses the token oracle (``tests/srd_token_oracle.py``: its sharing rule
:func:`~srd_token_oracle.shares` and its per-token block forward / backward), which is written
from the same definition and self-checked on its own. Everything else (convolutions, BatchNorm,
activations, the NCHW residual sum, the gates, the global-context block, the max poolings, the
relabelling to tokens) is recomputed here per sample in float64 from the parameters with explicit
Python loops over positions, kernel offsets, channels and sources; only sums over one vector's
own channels are vector expressions (torch's ``max_pool2d`` is asked only which index wins an
exact tie). Slow; use 16 x 16
inputs.

Definition
----------
A pointwise feature vector (PFV) is, in an (N, C, H, W) map, the channel vector at a position;
in tokens (N, T, D) a token's vector; inside attention one head's vector; at the input one
pixel's RGB vector. Relevance is one number per PFV. For an operation's output vector ``y(t)``
built from sources ``s``::

    y(t)      = sum_s c_{s->t} + bias
    mu_{s->t} = <c_{s->t} + beta_{s->t}, y(t)> / ||y(t)||^2        (0 when y(t) = 0)
    R(s)      = sum_t mu_{s->t} R(t)

with the bias split among the sources of ``y(t)`` in proportion to ``||c_{s->t}||`` (evenly
among the real input positions if all those norms are 0). Per operation:

* convolution (any stride, padding, dilation, groups): the sources of ``y(t)`` are the input
  vectors at the window positions inside the image, ``c_{p->t} = W_o x(p)`` with ``W_o`` the
  (block-diagonal by group) weight at p's offset; zero padding is no source and gets no bias;
* BatchNorm (eval), activations, LayerNorm, Linear on the channel/feature axis: one source,
  ``R`` passes unchanged (nothing where the output vector is 0);
* residual ``y = a + b`` in (N, C, H, W): per position on channel vectors,
  ``mu_a = <a(p), y(p)> / ||y(p)||^2``;
* gate ``y = g * s`` with both factors input-dependent and ``g`` broadcast against ``s`` (the
  squeeze-excitation gate ``g = sigmoid(fc2(act(fc1(avgpool(s)))))``, one value per channel,
  (C, 1, 1) against the (C, H, W) signal): ``g`` is a constant weight fixed to its forward value
  per sample, so ``y(p) = g ⊙ s(p)`` has the single source ``s(p)`` with contribution ``y(p)``
  itself, ``mu = 1`` and ``R(s(p)) = R(y(p))`` (passed unchanged also where ``y(p) = 0``, as for
  the other one-source operations); the gate's own branch (pool, 1x1 convs, activation, sigmoid)
  is a source of nothing and receives no relevance;
* global-context block (``gc=True``), on the (C, H, W) map ``x``: attention logits
  ``a(p) = conv_attn(x)(p)`` (1x1, C -> 1), weights ``w = softmax_p(a)``, the context
  ``context = sum_p w(p) x(p)``, ``m = conv2(relu(LN(conv1(context))))`` ((C,) at one position),
  and ``y(p) = x(p) + m`` at every position p:

  - attention pooling: the softmax weights ``w(p)`` are constant weights (not PFVs, they receive
    no relevance, nor does ``conv_attn``); the sources of ``context`` are the channel vectors
    ``x(p)`` at every position, ``c_p = w(p) x(p)``, no bias: ``mu_p = <c_p, context> /
    ||context||^2`` (0 when ``context = 0``), ``R(x(p)) += mu_p R(context)``;
  - conv1, LayerNorm (over the channel vector), ReLU, conv2 on the one context vector: one
    source each, ``R`` passes unchanged;
  - broadcast add ``y(p) = x(p) + m``: at each position two sources, ``x(p)`` and ``m`` (the one
    vector ``m`` is a source of every position's output): ``mu_x(p) = <x(p), y(p)> /
    ||y(p)||^2``, ``mu_m(p) = <m, y(p)> / ||y(p)||^2``; ``R(x(p)) += mu_x(p) R(y(p))`` and
    ``R(m) = sum_p mu_m(p) R(y(p))``;
  - ``x(p)`` receives from both uses (the add, and the pooling through ``m``), summed;
* ECA gate (``eca=True``), on the (C, H, W) map ``x``: ``g = sigmoid(conv1d(mean_p x(p)))``
  (one value per channel), ``y = x * g.expand_as(x)`` (the signal first, the gate second):
  the gate rule above, ``g`` a constant weight fixed to its forward value per sample, so
  ``y(p) = x(p) ⊙ g`` has the single source ``x(p)``, ``mu = 1`` and ``R(x(p)) = R(y(p))``;
  the gate's branch (the mean, the Conv1d along the channels, the sigmoid) gets no relevance;
* max pooling (``max_pool=True``, ``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)``):
  channel c of the output vector ``y(t)`` comes from the input position ``p`` that won the max
  of channel c over t's window (the padding is -inf and never wins), so the sources of ``y(t)``
  are the positions that won at least one channel, ``c_{p->t}`` is ``y(t)`` restricted to the
  channels p won (zero elsewhere), no bias::

      mu_{p->t} = sum_{c won by p} y_c(t)^2 / ||y(t)||^2        (0 when y(t) = 0)
      R(x(p))   = sum_t mu_{p->t} R(y(t))                        (over the windows holding p)

* token max pooling (``token_max=True``, ``t.view(N, 2, T // 2, D).amax(dim=1)`` on the tokens
  (N, T, D)): the output token ``y(j)`` has two sources, the tokens ``x(j)`` and ``x(j + T/2)``;
  as for the max pooling, ``c_{s->j}`` is ``y(j)`` restricted to the entries s won and
  ``mu_{s->j} = sum_{d won by s} y_d(j)^2 / ||y(j)||^2``; an entry where the two are exactly
  equal is owned half and half (its ``y_d(j)^2 / 2`` to each), as torch's ``amax`` splits the
  gradient evenly between equal values;
* ``flatten(2).transpose(1, 2)``: token ``t = i * W + j`` *is* the channel vector at (i, j);
* transformer block, final LayerNorm: as in the token oracle (all tokens image-dependent);
* token mean ``y = sum_t x(t) / T``: ``c_t = x(t) / T``;
* head Linear: one source (the pooled vector), which receives ``R = logit[target]``.

So every "cut" through the network carries exactly the target logit and the pixel map sums to it.

Resolved choices (stated so an implementation can align): a convolution and the BatchNorm after
it are two layers, so a convolution's ratios use its own output (before BN) and its own bias
(not the CNN engine's fused conv+BN entry op of docs/srd.md); all four convolutions of
:class:`TinyHybrid` have a bias (``bias=True``), the 1x1 ones pass ``R`` unchanged anyway (one
source each); the residual is ``branch + shortcut`` with the shortcut the block input (the stem
activation's output), so the stem activation's output receives the shortcut's share plus what
comes back through the branch. With ``se=True`` the gate sits after the depthwise
convolution's BN + activation and before the projecting 1x1 convolution; its inner activation is
the model's activation (as torchvision's EfficientNet passes SiLU), the gate is a sigmoid, and the
product is ``scale * x`` (torchvision's ``SqueezeExcitation``, written out here, not imported).
With ``gc=True`` the global-context block takes the inverted-residual block's output (the NCHW
residual sum) and its output is relabelled to tokens; its MLP has ``C // 2`` hidden channels,
1x1 convolutions with biases, a LayerNorm over the channels with affine gain and shift and
``eps = 1e-6`` (timm's ``LayerNorm2d``: permute to channels-last, ``layer_norm``, permute back)
and a ReLU whatever the model's activation (timm's default); ``conv_attn`` has a bias (it cancels
in the softmax). The one-source steps of its MLP are treated as elsewhere in this file: the 1x1
convolutions by the sharing rule with their bias (``mu = 1`` unless the output vector is 0),
the LayerNorm and the ReLU pass ``R`` unchanged (also a zero vector). A zero ``y(p)`` or zero
``context`` passes nothing (counted in ``lost``), as the residual rule does.
With ``eca=True`` the ECA gate takes the inverted-residual block's output (the NCHW residual
sum) and, with ``gc=True`` too, the global-context block takes the gate's output (ECA first,
then GC); its Conv1d (1 -> 1 channel, kernel 3, padding 1, no bias) runs along the channel axis
of the (N, 1, C) channel means (a cross-correlation with zero padding, as torch's ``conv1d``);
``y`` at a position where ``x(p)`` is 0 passes ``R`` unchanged (one source, as the SE gate).
With ``max_pool=True`` the pooling is the last operation on the map (after the ECA gate and the
GC block), so 16 x 16 inputs give 4 x 4 = 16 tokens; with ``token_max=True`` the pooling follows
the relabelling (8 tokens with ``max_pool``, else 32). Ties: the max pooling's winner of an
exact tie is the index torch's ``max_pool2d(..., return_indices=True)`` reports (whose gradient
goes there alone); the token max pooling splits a tie's entry evenly (torch's ``amax``). With
random weights and biases neither ties nor ``y(t) = 0`` occur in practice; a pooled output
vector ``y(t) = 0`` (all its winners 0) would pass nothing, and that relevance would be lost
(counted in ``lost``), as the sharing rule says.

Public API
----------
:func:`srd_hybrid_oracle` (the (N, H, W) map), :func:`srd_hybrid_oracle_trace` (per sample:
logits, forward intermediates, relevance at every cut), :func:`oracle_logits`, the building
blocks :func:`conv_shares` / :func:`conv_relevance` / :func:`residual_relevance` /
:func:`se_gate` / :func:`gate_relevance`, and for the global-context block
:func:`gc_attention_weights` / :func:`attention_pool_shares` / :func:`attention_pool_relevance` /
:func:`broadcast_add_relevance` / :func:`global_context_relevance` (for hand checks), the model
:class:`TinyHybrid` (with :class:`InvertedResidual`, :class:`SqueezeExcitation`,
:class:`GlobalContext` and :class:`LayerNorm2d`) with :func:`tiny_hybrid` /
:func:`tiny_hybrid_input`; for the new blocks :class:`EcaModule`, :func:`eca_gate` /
:func:`eca_relevance`, :func:`max_pool_shares` / :func:`max_pool_relevance` and
:func:`token_max_shares` / :func:`token_max_relevance`.
``misread=`` (one of :data:`MISREADINGS`) computes the map under a plausible misreading of the
definition; it exists only for the sensitivity self-check. ``misread=`` one of
:data:`GC_MUTATIONS` computes it under a deliberately wrong global-context rule that does not
conserve the logit; it exists only for the mutation self-check; so do ``misread=`` one of
:data:`MAX_MUTATIONS` (wrong max-pooling rules, for both poolings) and of :data:`ECA_MUTATIONS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import srd_token_oracle as tok
from srdxai.models.zoo import Block, make_activation

__all__ = [
    "ECA_MUTATIONS",
    "GC_MUTATIONS",
    "MAX_MUTATIONS",
    "MISREADINGS",
    "EcaModule",
    "GlobalContext",
    "InvertedResidual",
    "LayerNorm2d",
    "SqueezeExcitation",
    "TinyHybrid",
    "attention_pool_relevance",
    "attention_pool_shares",
    "broadcast_add_relevance",
    "conv_relevance",
    "conv_shares",
    "eca_gate",
    "eca_relevance",
    "gate_relevance",
    "gc_attention_weights",
    "global_context_relevance",
    "max_pool_relevance",
    "max_pool_shares",
    "oracle_logits",
    "randomize_batchnorm",
    "residual_relevance",
    "se_gate",
    "srd_hybrid_oracle",
    "srd_hybrid_oracle_trace",
    "tiny_hybrid",
    "tiny_hybrid_input",
    "token_max_relevance",
    "token_max_shares",
]

DT = torch.float64
Pos = tuple[int, int]

#: Misreadings of the definition the sensitivity self-check computes (never the definition):
#: ``conv_bias_even``: a convolution's bias split evenly over its window's real sources instead
#: of by contribution norms; ``residual_last_axis``: the NCHW residual's ratios taken on vectors
#: along the last axis (W, as if the map were (N, T, D) tokens), averaged over channels;
#: ``fuse_bn``: a convolution and its BatchNorm as one operation (contributions, bias and
#: output measured after the BN).
MISREADINGS = ("conv_bias_even", "residual_last_axis", "fuse_bn")

#: Deliberately wrong global-context rules (never the definition), for the mutation self-check;
#: neither conserves the logit: ``gc_weights_relevance``: the softmax weights are treated as
#: sources of the context too, each ``c_p = w(p) x(p)`` shared half and half between ``x(p)``
#: and ``w(p)``, and the weights' half stays with them (the attention branch has no way back to
#: the pixels); ``gc_drop_m``: the broadcast add gives ``m`` no share (``R(m) = 0``), only the
#: ``x(p)`` shares are passed.
GC_MUTATIONS = ("gc_weights_relevance", "gc_drop_m")

#: Deliberately wrong max-pooling rules (never the definition), for the mutation self-check;
#: each acts on the map max pooling and on the token max pooling alike: ``max_abs``: each
#: channel (entry) routed to the source of largest ``|x|`` in the window (the first in window
#: order on a tie), whose contribution is that source's own value, so the contributions no
#: longer add up to ``y(t)`` and the logit is not conserved; ``max_even``: ``R(y(t))`` split
#: evenly over the sources that won an entry (conserves; a hand example tells it apart).
MAX_MUTATIONS = ("max_abs", "max_even")

#: Deliberately wrong ECA rule (never the definition), for the mutation self-check:
#: ``eca_gate_half``: the product ``x ⊙ gate`` shared half and half between ``x(p)`` and the
#: gate, and the gate's half stays with it (does not conserve the logit).
ECA_MUTATIONS = ("eca_gate_half",)


# --------------------------------------------------------------------------- the model


class SqueezeExcitation(nn.Module):
    """torchvision's ``ops.SqueezeExcitation`` written out (not imported): ``scale =
    sigmoid(fc2(act(fc1(adaptive_avg_pool2d(x, 1)))))`` with 1x1 convolutions that have a bias,
    then ``scale * x`` ((N, C, 1, 1) broadcast against (N, C, H, W))."""

    def __init__(self, channels: int, squeeze: int, activation: str):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = make_activation(activation)
        self.scale_activation = nn.Sigmoid()

    def _scale(self, x: Tensor) -> Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x: Tensor) -> Tensor:
        scale = self._scale(x)
        return scale * x


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> act -> 3x3 depthwise -> BN -> act [-> squeeze-excitation gate] ->
    1x1 project -> BN, ``+ x``. ``se=True`` adds the gate (``hidden // 4`` squeeze channels)."""

    def __init__(self, dim: int, hidden: int, activation: str, *, se: bool = False):
        super().__init__()
        self.expand = nn.Conv2d(dim, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = make_activation(activation)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = make_activation(activation)
        self.se = SqueezeExcitation(hidden, hidden // 4, activation) if se else None
        self.project = nn.Conv2d(hidden, dim, 1)
        self.bn3 = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.expand(x)))
        out = self.act2(self.bn2(self.dw(out)))
        if self.se is not None:
            out = self.se(out)
        out = self.bn3(self.project(out))
        return out + x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel vector of an (N, C, H, W) map (timm's ``LayerNorm2d``, written
    out): permute to channels-last, ``layer_norm`` over C, permute back."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalContext(nn.Module):
    """GCNet's global-context block (timm's ``GlobalContext`` with ``fuse_add=True,
    fuse_scale=False``, written out, not imported): softmax attention pooling over the positions
    (``conv_attn``: 1x1, C -> 1, with bias), then ``m = conv2(relu(LayerNorm2d(conv1(context))))``
    (1x1 convs C -> ``hidden`` -> C with biases, ``hidden = C // 2`` by default), ``y = x + m``
    ((N, C, 1, 1) broadcast against (N, C, H, W))."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = channels // 2 if hidden is None else hidden
        self.conv_attn = nn.Conv2d(channels, 1, 1, bias=True)
        self.conv1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.norm = LayerNorm2d(hidden, eps=1e-6)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        attn = self.conv_attn(x)
        attn = F.softmax(attn.reshape(n, 1, h * w), dim=-1).unsqueeze(3)  # (N, 1, HW, 1)
        context = (x.reshape(n, c, h * w).unsqueeze(1) @ attn).view(n, c, 1, 1)
        m = self.conv2(self.act(self.norm(self.conv1(context))))
        return x + m


class EcaModule(nn.Module):
    """timm's ``EcaModule`` (efficient channel attention) written out, not imported: the channel
    means ``x.mean((2, 3))`` as a 1-channel sequence of length C, ``conv`` (Conv1d 1 -> 1,
    kernel 3, padding 1, no bias) along the channels, a sigmoid, and ``x * gate.expand_as(x)``
    (the signal first, the (N, C, 1, 1) gate expanded second)."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2,
                              bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y)
        y = self.gate(y).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class TinyHybrid(nn.Module):
    """Conv stem (stride 2) + BN + act, an inverted-residual block, tokens, ``depth`` pre-norm
    transformer blocks (zoo's :class:`~srdxai.models.zoo.Block`), LayerNorm, token mean,
    Linear. Input (N, 3, 16, 16) -> 64 tokens of width 8 -> (N, 5). ``se=True``: the
    inverted-residual block has a squeeze-excitation gate (16 channels, 4 squeeze channels).
    ``eca=True``: an :class:`EcaModule` gate on the inverted-residual block's output.
    ``gc=True``: a :class:`GlobalContext` block (8 channels, 4 hidden) follows (after the ECA
    gate when both are asked for), before the relabelling to tokens. ``max_pool=True``:
    ``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)`` on the map just before the
    relabelling (8 x 8 -> 4 x 4: 16 tokens). ``token_max=True``: Hiera-style mask-unit pooling
    right after the relabelling, ``t.view(N, 2, T // 2, D).amax(dim=1)`` (tokens i and
    i + T/2 pooled entry by entry: T/2 tokens)."""

    def __init__(self, activation: str = "silu", *, depth: int = 1, dim: int = 8,
                 heads: int = 2, num_classes: int = 5, se: bool = False, gc: bool = False,
                 max_pool: bool = False, token_max: bool = False, eca: bool = False):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, dim, 3, stride=2, padding=1, bias=True)
        self.stem_bn = nn.BatchNorm2d(dim)
        self.stem_act = make_activation(activation)
        self.ir = InvertedResidual(dim, 2 * dim, activation, se=se)
        self.eca = EcaModule() if eca else None
        self.gc = GlobalContext(dim) if gc else None
        self.max_pool = max_pool
        self.token_max = token_max
        self.blocks = nn.Sequential(*(Block(dim, heads, 2.0, activation, 1e-6)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ir(self.stem_act(self.stem_bn(self.stem_conv(x))))
        if self.eca is not None:
            x = self.eca(x)
        if self.gc is not None:
            x = self.gc(x)
        if self.max_pool:
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = x.flatten(2).transpose(1, 2)  # (N, H*W, C)
        if self.token_max:
            n, t, d = x.shape
            x = x.view(n, 2, t // 2, d).amax(dim=1)  # (N, T/2, C)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial eval statistics: running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


def tiny_hybrid(activation: str = "silu", seed: int = 0, *, depth: int = 1, se: bool = False,
                gc: bool = False, max_pool: bool = False, token_max: bool = False,
                eca: bool = False, dtype: torch.dtype = DT) -> TinyHybrid:
    """A :class:`TinyHybrid` with every parameter at a scale where it matters, eval mode.

    Weights ~ N(0, 1/fan_in); biases (conv, linear, BN shift, LayerNorm shift, the gate's and
    the global-context block's 1x1 convs) ~ N(0, 0.5); LayerNorm gains (also the global-context
    block's) ~ U(0.5, 1.5); BatchNorm gains of magnitude U(0.5, 1.5), a quarter of them negative;
    BatchNorm running statistics by :func:`randomize_batchnorm`.
    ``se=True`` adds the squeeze-excitation gate, ``gc=True`` the global-context block,
    ``eca=True`` the ECA gate (its Conv1d weight (1, 1, 3) ~ N(0, 1/3)) (the parameters after
    any of these then differ from the model without it of the same seed); ``max_pool`` and
    ``token_max`` have no parameters.
    """
    torch.manual_seed(seed)
    model = TinyHybrid(activation, depth=depth, se=se, gc=gc, max_pool=max_pool,
                       token_max=token_max, eca=eca)
    g = torch.Generator().manual_seed(seed + 2000)
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif leaf == "weight" and owner in bn_names:
                p.uniform_(0.5, 1.5, generator=g)
                flip = torch.rand(p.shape, generator=g, dtype=p.dtype) < 0.25
                p[flip] = -p[flip]
            elif leaf == "weight":  # LayerNorm gains
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, 0.5, generator=g)
    randomize_batchnorm(model, g)
    return model.to(dtype).eval()


def tiny_hybrid_input(seed: int = 0, n: int = 2, dtype: torch.dtype = DT) -> Tensor:
    return torch.randn(n, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- per-vector forward


def _d(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def _act(mod: nn.Module, v: Tensor) -> Tensor:
    """The activation by its formula (never the module's own forward)."""
    if isinstance(mod, nn.ReLU):
        return torch.where(v > 0, v, torch.zeros_like(v))
    if isinstance(mod, nn.LeakyReLU):
        return torch.where(v > 0, v, v * mod.negative_slope)
    if isinstance(mod, nn.ELU):
        return torch.where(v > 0, v, mod.alpha * torch.expm1(v))
    if isinstance(mod, nn.SiLU):
        return v / (1.0 + torch.exp(-v))
    if isinstance(mod, nn.GELU):
        assert mod.approximate == "none"
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if isinstance(mod, nn.Tanh):
        return torch.tanh(v)
    raise TypeError(f"no formula for {type(mod).__name__}")


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm as ``scale * v + shift`` per channel."""
    assert not bn.training and bn.track_running_stats
    scale = _d(bn.weight) / torch.sqrt(_d(bn.running_var) + bn.eps)
    return scale, _d(bn.bias) - scale * _d(bn.running_mean)


def _map(f, m: Tensor) -> Tensor:
    """Apply a vector function to the channel vector at every position of a (C, H, W) map."""
    rows = []
    for i in range(m.shape[1]):
        rows.append(torch.stack([f(m[:, i, j]) for j in range(m.shape[2])], -1))
    return torch.stack(rows, -2)


def _bn_map(bn: nn.BatchNorm2d, m: Tensor) -> Tensor:
    scale, shift = _bn_affine(bn)
    return _map(lambda v: scale * v + shift, m)


def _act_map(mod: nn.Module, m: Tensor) -> Tensor:
    return _map(lambda v: _act(mod, v), m)


# --------------------------------------------------------------------------- convolution


def _pair(v) -> Pos:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _offset_matrices(conv: nn.Conv2d) -> dict[Pos, Tensor]:
    """``W_o`` per kernel offset as a full (C_out, C_in) matrix, block-diagonal by group."""
    w = _d(conv.weight)
    groups = conv.groups
    c_out, cin_g = w.shape[0], w.shape[1]
    cout_g = c_out // groups
    mats = {}
    for ki in range(w.shape[2]):
        for kj in range(w.shape[3]):
            m = torch.zeros(c_out, cin_g * groups, dtype=DT)
            for g in range(groups):
                m[g * cout_g:(g + 1) * cout_g, g * cin_g:(g + 1) * cin_g] = \
                    w[g * cout_g:(g + 1) * cout_g, :, ki, kj]
            mats[(ki, kj)] = m
    return mats


@dataclass
class _ConvRec:
    bias: Tensor                               # (C_out,), zeros without a bias
    y: Tensor                                  # (C_out, H_out, W_out)
    src: list[list[list[tuple[Pos, Tensor]]]]  # src[i][j]: (input position, c_{p->t})
    in_hw: Pos


def _conv_forward(conv: nn.Conv2d, x: Tensor) -> _ConvRec:
    """The convolution of one sample (C_in, H, W), source by source."""
    assert conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    ph, pw = _pair(conv.padding)
    dh, dw = _pair(conv.dilation)
    _, h, w = x.shape
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    mats = _offset_matrices(conv)
    bias = _d(conv.bias) if conv.bias is not None else torch.zeros(conv.out_channels, dtype=DT)
    y = torch.zeros(conv.out_channels, h_out, w_out, dtype=DT)
    src = []
    for i in range(h_out):
        row = []
        for j in range(w_out):
            sources = []
            out = bias.clone()
            for ki in range(kh):
                r = i * sh - ph + ki * dh
                if not 0 <= r < h:
                    continue  # zero padding: no source
                for kj in range(kw):
                    c = j * sw - pw + kj * dw
                    if not 0 <= c < w:
                        continue
                    contrib = mats[(ki, kj)] @ x[:, r, c]
                    sources.append(((r, c), contrib))
                    out = out + contrib
            y[:, i, j] = out
            row.append(sources)
        src.append(row)
    return _ConvRec(bias, y, src, (h, w))


def _even_shares(y: Tensor, contributions: list[Tensor], bias: Tensor) -> list[float]:
    """Misreading ``conv_bias_even``: the bias split evenly over the sources."""
    yy = float((y * y).sum())
    if yy == 0.0 or not contributions:
        return [0.0] * len(contributions)
    beta = bias / len(contributions)
    return [float(((c + beta) * y).sum()) / yy for c in contributions]


def _conv_mu(rec: _ConvRec, i: int, j: int, *, even: bool = False,
             bn: nn.BatchNorm2d | None = None) -> list[float]:
    """Sharing ratios of output (i, j) over ``rec.src[i][j]``; ``bn`` fuses a BatchNorm into the
    operation (misreading ``fuse_bn``), ``even`` splits the bias evenly (``conv_bias_even``)."""
    cs = [c for _, c in rec.src[i][j]]
    y, bias = rec.y[:, i, j], rec.bias
    if bn is not None:
        scale, shift = _bn_affine(bn)
        cs = [scale * c for c in cs]
        y, bias = scale * y + shift, scale * bias + shift
    if even:
        return _even_shares(y, cs, bias)
    return tok.shares(y, cs, [True] * len(cs), bias)


def _conv_backward(rec: _ConvRec, r_out: Tensor, stats: tok.Stats, *, even: bool = False,
                   bn: nn.BatchNorm2d | None = None) -> Tensor:
    r_in = torch.zeros(rec.in_hw, dtype=DT)
    for i in range(r_out.shape[0]):
        for j in range(r_out.shape[1]):
            mu = _conv_mu(rec, i, j, even=even, bn=bn)
            for (p, _), r in zip(rec.src[i][j], tok.pass_relevance(mu, float(r_out[i, j]), stats),
                                 strict=True):
                r_in[p] += r
    return r_in


def conv_shares(conv: nn.Conv2d, x: Tensor, i: int, j: int, *, even: bool = False
                ) -> list[tuple[Pos, float]]:
    """``(input position, mu)`` of the sources of output position (i, j) of ``conv`` on one
    sample ``x`` (C_in, H, W), in window order (row-major offsets); padding is never listed."""
    rec = _conv_forward(conv, _d(x))
    mu = _conv_mu(rec, i, j, even=even)
    return [(p, m) for (p, _), m in zip(rec.src[i][j], mu, strict=True)]


def conv_relevance(conv: nn.Conv2d, x: Tensor, r_out: Tensor, *, even: bool = False
                   ) -> Tensor:
    """Relevance (H, W) of the input vectors of ``conv`` on one sample ``x`` (C_in, H, W) given
    the relevance ``r_out`` (H_out, W_out) of its output vectors."""
    rec = _conv_forward(conv, _d(x))
    return _conv_backward(rec, _d(r_out), tok.Stats(), even=even)


# --------------------------------------------------------------------------- residual sum


def residual_relevance(a: Tensor, b: Tensor, r_out: Tensor, *, last_axis: bool = False,
                       stats: tok.Stats | None = None) -> tuple[Tensor, Tensor]:
    """``(R_a, R_b)`` (H, W) of ``y = a + b`` ((C, H, W) maps of one sample), per position on
    channel vectors. ``last_axis`` is the misreading ``residual_last_axis``: ratios on the
    vectors ``a[c, h, :]`` (along W), averaged over the channels, for every position of row h."""
    stats = tok.Stats() if stats is None else stats
    a, b, r_out = _d(a), _d(b), _d(r_out)
    y = a + b
    c_n, h_n, w_n = y.shape
    r_a = torch.zeros(h_n, w_n, dtype=DT)
    r_b = torch.zeros(h_n, w_n, dtype=DT)
    if last_axis:
        mu_rows = []
        for h in range(h_n):
            acc = [0.0, 0.0]
            for c in range(c_n):
                m = tok.shares(y[c, h, :], [a[c, h, :], b[c, h, :]], [True, True])
                acc = [acc[0] + m[0] / c_n, acc[1] + m[1] / c_n]
            mu_rows.append(acc)
    for h in range(h_n):
        for w in range(w_n):
            if last_axis:
                mu = mu_rows[h]
            else:
                mu = tok.shares(y[:, h, w], [a[:, h, w], b[:, h, w]], [True, True])
            r_a[h, w], r_b[h, w] = tok.pass_relevance(mu, float(r_out[h, w]), stats)
    return r_a, r_b


def _one_source(y: Tensor, r: Tensor, stats: tok.Stats) -> Tensor:
    """BN / activation on a (C, H, W) map: one source per output vector, ``mu = 1``, so ``R``
    passes unchanged, also where ``y(p)`` is the zero vector (a ReLU that is off over all
    channels): the whole of ``y(p)`` is that source's, as in the token oracle's one-source
    calls and the CNN engine's transparent activations (``docs/srd.md``)."""
    out = torch.zeros_like(r)
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            out[i, j] = tok.pass_relevance([1.0], float(r[i, j]), stats)[0]
    return out


# ------------------------------------------------------------------ gate (squeeze-excitation)


@dataclass
class _GateRec:
    pooled: Tensor  # (C,) mean of the signal's channel vectors over the positions
    fc1: Tensor     # (squeeze,)
    act: Tensor     # (squeeze,)
    fc2: Tensor     # (C,)
    gate: Tensor    # (C,) sigmoid(fc2): the gate value per channel
    y: Tensor       # (C, H, W) gate ⊙ signal


def _se_forward(se: SqueezeExcitation, s: Tensor) -> _GateRec:
    """The squeeze-excitation gate of one sample's signal ``s`` (C, H, W), from the parameters."""
    assert isinstance(se, SqueezeExcitation), type(se).__name__
    assert _pair(se.avgpool.output_size) == (1, 1)
    assert isinstance(se.scale_activation, nn.Sigmoid)
    for fc in (se.fc1, se.fc2):
        assert _pair(fc.kernel_size) == (1, 1) and fc.groups == 1 and fc.bias is not None
    c_n, h, w = s.shape
    pooled = torch.zeros(c_n, dtype=DT)
    for i in range(h):
        for j in range(w):
            pooled = pooled + s[:, i, j]
    pooled = pooled / (h * w)
    fc1 = _d(se.fc1.weight)[:, :, 0, 0] @ pooled + _d(se.fc1.bias)
    act = _act(se.activation, fc1)
    fc2 = _d(se.fc2.weight)[:, :, 0, 0] @ act + _d(se.fc2.bias)
    gate = 1.0 / (1.0 + torch.exp(-fc2))
    y = _map(lambda v: gate * v, s)
    return _GateRec(pooled, fc1, act, fc2, gate, y)


def se_gate(se: SqueezeExcitation, s: Tensor) -> Tensor:
    """The gate value (C,) of ``se`` on one sample's signal ``s`` (C, H, W)."""
    return _se_forward(se, _d(s)).gate


def _gate_backward(s: Tensor, gate: Tensor, y: Tensor, r_out: Tensor, stats: tok.Stats
                   ) -> tuple[Tensor, float]:
    """``(R(s), R(gate))`` for ``y = gate ⊙ s``: the gate is a constant weight, so each output
    vector ``y(p)`` has one source, ``s(p)``, whose contribution is ``gate ⊙ s(p)`` (all of
    ``y(p)``, no bias); the gate is no source of any ``y(p)``, so it collects nothing."""
    r_s = torch.zeros_like(r_out)
    r_gate = 0.0  # sum over the sources that are the gate: there are none
    for i in range(r_out.shape[0]):
        for j in range(r_out.shape[1]):
            contrib = gate * s[:, i, j]
            yp = y[:, i, j]
            if bool((yp != 0).any()):
                mu = tok.shares(yp, [contrib], [True])
            else:  # a zero vector with one source: R passes unchanged (see _one_source)
                mu = [1.0]
            r_s[i, j] = tok.pass_relevance(mu, float(r_out[i, j]), stats)[0]
    return r_s, r_gate


def gate_relevance(s: Tensor, gate: Tensor, r_out: Tensor) -> Tensor:
    """Relevance (H, W) of the signal vectors of ``y = gate[:, None, None] * s`` on one sample
    (``s`` (C, H, W), ``gate`` (C,)) given the relevance ``r_out`` (H, W) of ``y``'s vectors."""
    s, gate = _d(s), _d(gate)
    y = _map(lambda v: gate * v, s)
    return _gate_backward(s, gate, y, _d(r_out), tok.Stats())[0]


# ------------------------------------------------------------------ global-context block


@dataclass
class _GCRec:
    x: Tensor        # (C, H, W) the block input
    logits: Tensor   # (H, W) conv_attn output
    weights: Tensor  # (H, W) softmax over the positions
    context: Tensor  # (C,) sum_p w(p) x(p)
    conv1: Tensor    # (hidden,)
    norm: Tensor     # (hidden,)
    act: Tensor      # (hidden,)
    m: Tensor        # (C,) conv2 output, added at every position
    y: Tensor        # (C, H, W) x + m


def _softmax_positions(logits: Tensor) -> Tensor:
    """Softmax over all positions of an (H, W) map, position by position."""
    h, w = logits.shape
    top = float(logits[0, 0])
    for i in range(h):
        for j in range(w):
            top = max(top, float(logits[i, j]))
    e = torch.zeros(h, w, dtype=DT)
    total = 0.0
    for i in range(h):
        for j in range(w):
            e[i, j] = math.exp(float(logits[i, j]) - top)
            total += float(e[i, j])
    return e / total


def _attention_logits(gc: GlobalContext, x: Tensor) -> Tensor:
    wa, ba = _d(gc.conv_attn.weight)[0, :, 0, 0], float(_d(gc.conv_attn.bias)[0])
    _, h, w = x.shape
    logits = torch.zeros(h, w, dtype=DT)
    for i in range(h):
        for j in range(w):
            logits[i, j] = float((wa * x[:, i, j]).sum()) + ba
    return logits


def _pool(x: Tensor, weights: Tensor) -> Tensor:
    """``sum_p w(p) x(p)`` over the positions of one sample's (C, H, W) map."""
    context = torch.zeros(x.shape[0], dtype=DT)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            context = context + weights[i, j] * x[:, i, j]
    return context


def _gc_forward(gc: GlobalContext, x: Tensor) -> _GCRec:
    """The global-context block of one sample's map ``x`` (C, H, W), from the parameters."""
    assert isinstance(gc, GlobalContext), type(gc).__name__
    assert isinstance(gc.norm, LayerNorm2d) and isinstance(gc.act, nn.ReLU)
    for conv in (gc.conv_attn, gc.conv1, gc.conv2):
        assert _pair(conv.kernel_size) == (1, 1) and conv.groups == 1 and conv.bias is not None
    assert gc.conv_attn.out_channels == 1
    logits = _attention_logits(gc, x)
    weights = _softmax_positions(logits)
    context = _pool(x, weights)
    conv1 = _d(gc.conv1.weight)[:, :, 0, 0] @ context + _d(gc.conv1.bias)
    norm = tok.layer_norm(gc.norm, conv1)
    act = _act(gc.act, norm)
    m = _d(gc.conv2.weight)[:, :, 0, 0] @ act + _d(gc.conv2.bias)
    y = _map(lambda v: v + m, x)
    return _GCRec(x, logits, weights, context, conv1, norm, act, m, y)


def gc_attention_weights(gc: GlobalContext, x: Tensor) -> Tensor:
    """The softmax weights (H, W) of ``gc``'s attention pooling on one sample ``x`` (C, H, W)."""
    return _softmax_positions(_attention_logits(gc, _d(x)))


def _pool_shares(x: Tensor, weights: Tensor, context: Tensor) -> Tensor:
    """``mu_p = <w(p) x(p), context> / ||context||^2`` (H, W): the sources of the context are the
    vectors ``x(p)`` with contribution ``w(p) x(p)``, no bias; the weights are constants."""
    h, w = weights.shape
    contributions = [weights[i, j] * x[:, i, j] for i in range(h) for j in range(w)]
    mu = tok.shares(context, contributions, [True] * len(contributions))
    return torch.tensor(mu, dtype=DT).view(h, w)


def _pool_backward(x: Tensor, weights: Tensor, context: Tensor, r_context: float,
                   stats: tok.Stats, *, weights_relevance: bool = False
                   ) -> tuple[Tensor, Tensor]:
    """``(R(x), R(w))`` (H, W) of the attention pooling given ``R(context)``; ``R(w)`` is 0 under
    the definition, ``weights_relevance`` is the mutation ``gc_weights_relevance`` (each share
    split half and half between ``x(p)`` and ``w(p)``)."""
    mu = _pool_shares(x, weights, context)
    h, w = weights.shape
    passed = tok.pass_relevance([float(mu[i, j]) for i in range(h) for j in range(w)],
                                r_context, stats)
    r_x = torch.zeros(h, w, dtype=DT)
    r_w = torch.zeros(h, w, dtype=DT)
    for k, r in enumerate(passed):
        if weights_relevance:
            r_x[k // w, k % w] = r / 2
            r_w[k // w, k % w] = r / 2
        else:
            r_x[k // w, k % w] = r
    return r_x, r_w


def attention_pool_shares(x: Tensor, weights: Tensor) -> Tensor:
    """``mu_p`` (H, W) of the vectors ``x(p)`` of one sample's map ``x`` (C, H, W) in the context
    ``sum_p weights(p) x(p)`` (``weights`` (H, W) constants)."""
    x, weights = _d(x), _d(weights)
    return _pool_shares(x, weights, _pool(x, weights))


def attention_pool_relevance(x: Tensor, weights: Tensor, r_context: float, *,
                             weights_relevance: bool = False) -> tuple[Tensor, Tensor]:
    """``(R(x), R(weights))`` (H, W) of the attention pooling ``context = sum_p weights(p) x(p)``
    of one sample given ``R(context)``; ``R(weights)`` is 0 unless ``weights_relevance`` (the
    mutation ``gc_weights_relevance``)."""
    x, weights = _d(x), _d(weights)
    return _pool_backward(x, weights, _pool(x, weights), float(r_context), tok.Stats(),
                          weights_relevance=weights_relevance)


def _add_backward(x: Tensor, m: Tensor, y: Tensor, r_out: Tensor, stats: tok.Stats, *,
                  drop_m: bool = False) -> tuple[Tensor, float]:
    """``(R(x), R(m))`` of ``y(p) = x(p) + m``: two sources per position, ``m`` one vector that
    collects its shares from every position; ``drop_m`` is the mutation ``gc_drop_m``."""
    h, w = r_out.shape
    r_x = torch.zeros(h, w, dtype=DT)
    r_m = 0.0
    for i in range(h):
        for j in range(w):
            mu = tok.shares(y[:, i, j], [x[:, i, j], m], [True, True])
            r_x[i, j], r_mp = tok.pass_relevance(mu, float(r_out[i, j]), stats)
            if not drop_m:
                r_m += r_mp
    return r_x, r_m


def broadcast_add_relevance(x: Tensor, m: Tensor, r_out: Tensor, *, drop_m: bool = False
                            ) -> tuple[Tensor, float]:
    """``(R(x) (H, W), R(m))`` of ``y(p) = x(p) + m`` on one sample (``x`` (C, H, W), ``m`` (C,))
    given the relevance ``r_out`` (H, W) of ``y``'s vectors; ``drop_m``: the mutation
    ``gc_drop_m`` (``R(m) = 0``)."""
    x, m = _d(x), _d(m)
    y = _map(lambda v: v + m, x)
    return _add_backward(x, m, y, _d(r_out), tok.Stats(), drop_m=drop_m)


def _gc_backward(gc: GlobalContext, rec: _GCRec, r_out: Tensor, stats: tok.Stats,
                 mutation: str | None = None) -> dict:
    """Relevance through the block: the add, ``m``'s MLP back to the context, the pooling; the
    input's relevance ``x`` is the sum of its shares at the add and at the pooling."""
    r_add_x, r_m = _add_backward(rec.x, rec.m, rec.y, r_out, stats,
                                 drop_m=mutation == "gc_drop_m")
    # conv2 (one source: act), ReLU, LayerNorm, conv1 (one source: context)
    w2, b2 = _d(gc.conv2.weight)[:, :, 0, 0], _d(gc.conv2.bias)
    r = tok.pass_relevance(tok.shares(rec.m, [w2 @ rec.act], [True], b2), r_m, stats)[0]
    r = tok.pass_relevance([1.0], r, stats)[0]  # ReLU
    r = tok.pass_relevance([1.0], r, stats)[0]  # LayerNorm
    w1, b1 = _d(gc.conv1.weight)[:, :, 0, 0], _d(gc.conv1.bias)
    r_context = tok.pass_relevance(tok.shares(rec.conv1, [w1 @ rec.context], [True], b1), r,
                                   stats)[0]
    r_pool_x, r_w = _pool_backward(rec.x, rec.weights, rec.context, r_context, stats,
                                   weights_relevance=mutation == "gc_weights_relevance")
    return {"x": r_add_x + r_pool_x, "add_x": r_add_x, "m": r_m, "context": r_context,
            "pool_x": r_pool_x, "weights": r_w}


def global_context_relevance(gc: GlobalContext, x: Tensor, r_out: Tensor, *,
                             mutation: str | None = None) -> Tensor:
    """Relevance (H, W) of the input vectors of ``gc`` on one sample ``x`` (C, H, W) given the
    relevance ``r_out`` (H, W) of its output vectors (``mutation``: one of
    :data:`GC_MUTATIONS`)."""
    if mutation is not None and mutation not in GC_MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r}")
    rec = _gc_forward(gc, _d(x))
    return _gc_backward(gc, rec, _d(r_out), tok.Stats(), mutation)["x"]


# ------------------------------------------------------------------ ECA gate


@dataclass
class _EcaRec:
    pooled: Tensor  # (C,) mean of the input's channel vectors over the positions
    conv: Tensor    # (C,) the Conv1d along the channel axis
    gate: Tensor    # (C,) sigmoid(conv): the gate value per channel
    y: Tensor       # (C, H, W) x ⊙ gate


def _eca_forward(eca: EcaModule, x: Tensor) -> _EcaRec:
    """The ECA gate of one sample's map ``x`` (C, H, W), from the parameters: the channel means,
    the cross-correlation ``conv[c] = sum_k w[k] mean[c - pad + k]`` over the channels (zero
    padding), the sigmoid, and ``y(p) = x(p) ⊙ gate``."""
    assert isinstance(eca, EcaModule), type(eca).__name__
    assert isinstance(eca.gate, nn.Sigmoid)
    conv = eca.conv
    assert conv.in_channels == conv.out_channels == 1 and conv.groups == 1
    assert conv.bias is None and conv.padding_mode == "zeros"
    assert tuple(conv.stride) == (1,) and tuple(conv.dilation) == (1,)
    w = _d(conv.weight)[0, 0]
    k_n, pad = w.shape[0], int(conv.padding[0])
    c_n, h, wd = x.shape
    assert c_n + 2 * pad - k_n + 1 == c_n, "the Conv1d must keep the channel count"
    pooled = torch.zeros(c_n, dtype=DT)
    for i in range(h):
        for j in range(wd):
            pooled = pooled + x[:, i, j]
    pooled = pooled / (h * wd)
    z = torch.zeros(c_n, dtype=DT)
    for c in range(c_n):
        acc = 0.0
        for k in range(k_n):
            src = c - pad + k
            if 0 <= src < c_n:
                acc += float(w[k]) * float(pooled[src])
        z[c] = acc
    gate = 1.0 / (1.0 + torch.exp(-z))
    y = _map(lambda v: v * gate, x)
    return _EcaRec(pooled, z, gate, y)


def eca_gate(eca: EcaModule, x: Tensor) -> Tensor:
    """The gate value (C,) of ``eca`` on one sample's map ``x`` (C, H, W)."""
    return _eca_forward(eca, _d(x)).gate


def _eca_backward(x: Tensor, rec: _EcaRec, r_out: Tensor, stats: tok.Stats, *,
                  gate_half: bool = False) -> tuple[Tensor, float]:
    """``(R(x), R(gate))`` of ``y = x ⊙ gate``: the gate rule of the squeeze-excitation gate
    (one source ``x(p)`` per output vector, ``mu = 1``); ``gate_half`` is the mutation
    ``eca_gate_half`` (half of every ``R(y(p))`` is left on the gate, which has no way on)."""
    r_x, r_gate = _gate_backward(x, rec.gate, rec.y, r_out, stats)
    if gate_half:
        r_gate = float(r_x.sum()) / 2
        r_x = r_x / 2
    return r_x, r_gate


def eca_relevance(eca: EcaModule, x: Tensor, r_out: Tensor, *, mutation: str | None = None
                  ) -> Tensor:
    """Relevance (H, W) of the input vectors of ``eca`` on one sample ``x`` (C, H, W) given the
    relevance ``r_out`` (H, W) of its output vectors (``mutation``: ``"eca_gate_half"``)."""
    if mutation not in (None, *ECA_MUTATIONS):
        raise ValueError(f"unknown mutation {mutation!r}")
    x = _d(x)
    return _eca_backward(x, _eca_forward(eca, x), _d(r_out), tok.Stats(),
                         gate_half=mutation == "eca_gate_half")[0]


# ------------------------------------------------------------------ max pooling (map, tokens)


@dataclass
class _MaxPoolRec:
    x: Tensor                     # (C, H, W) the input
    y: Tensor                     # (C, H_out, W_out)
    win: list[list[list[Pos]]]    # win[i][j][c]: the input position that won channel c at (i, j)
    window: list[list[list[Pos]]]  # window[i][j]: the real input positions of the window


def _max_pool_forward(x: Tensor, kernel: int = 3, stride: int = 2, padding: int = 1
                      ) -> _MaxPoolRec:
    """``F.max_pool2d(x, kernel, stride, padding)`` of one sample (C, H, W), channel by channel
    over the real window positions (the implicit padding is -inf: it never wins). An exact tie
    is broken as torch's ``return_indices=True`` reports (only then is torch asked)."""
    c_n, h, w = x.shape
    h_out = (h + 2 * padding - kernel) // stride + 1
    w_out = (w + 2 * padding - kernel) // stride + 1
    torch_idx = None
    y = torch.zeros(c_n, h_out, w_out, dtype=DT)
    win, window = [], []
    for i in range(h_out):
        row_win, row_window = [], []
        for j in range(w_out):
            real = [(i * stride - padding + ki, j * stride - padding + kj)
                    for ki in range(kernel) for kj in range(kernel)]
            real = [(r, c) for r, c in real if 0 <= r < h and 0 <= c < w]
            assert real, "a window without a real position"
            winners = []
            for ch in range(c_n):
                best, tied = None, []
                for r, c in real:
                    v = float(x[ch, r, c])
                    if best is None or v > best:
                        best, tied = v, [(r, c)]
                    elif v == best:
                        tied.append((r, c))
                if len(tied) > 1:
                    if torch_idx is None:
                        torch_idx = F.max_pool2d(x[None], kernel, stride, padding,
                                                 return_indices=True)[1][0]
                    flat = int(torch_idx[ch, i, j])
                    winner = (flat // w, flat % w)
                    assert winner in tied, (winner, tied)
                else:
                    winner = tied[0]
                y[ch, i, j] = best
                winners.append(winner)
            row_win.append(winners)
            row_window.append(real)
        win.append(row_win)
        window.append(row_window)
    return _MaxPoolRec(x, y, win, window)


def _max_pool_mu(rec: _MaxPoolRec, i: int, j: int, mutation: str | None = None
                 ) -> list[tuple[Pos, float]]:
    """``(input position, mu)`` of the sources of output (i, j): the positions that won at least
    one channel, in window order; ``c_p`` is ``y(i, j)`` on the channels p won, 0 elsewhere.
    ``max_abs``: the mutation routing each channel to the largest ``|x|`` (contribution that
    ``x`` value); ``max_even``: ``y``'s relevance split evenly over the winning positions."""
    y = rec.y[:, i, j]
    c_n = y.shape[0]
    if mutation == "max_abs":
        winners, vals = [], torch.zeros(c_n, dtype=DT)
        for ch in range(c_n):
            best, arg = -1.0, None
            for r, c in rec.window[i][j]:
                if abs(float(rec.x[ch, r, c])) > best:
                    best, arg = abs(float(rec.x[ch, r, c])), (r, c)
            winners.append(arg)
            vals[ch] = rec.x[ch, arg[0], arg[1]]
    else:
        winners, vals = rec.win[i][j], y
    sources = [p for p in rec.window[i][j] if p in winners]
    contributions = []
    for p in sources:
        cp = torch.zeros(c_n, dtype=DT)
        for ch in range(c_n):
            if winners[ch] == p:
                cp[ch] = vals[ch]
        contributions.append(cp)
    if mutation == "max_even":
        mu = [1.0 / len(sources)] * len(sources) if bool((y != 0).any()) else [0.0] * len(sources)
    else:
        mu = tok.shares(y, contributions, [True] * len(sources), check=mutation is None)
    return list(zip(sources, mu, strict=True))


def _max_pool_backward(rec: _MaxPoolRec, r_out: Tensor, stats: tok.Stats,
                       mutation: str | None = None) -> Tensor:
    r_in = torch.zeros(rec.x.shape[1:], dtype=DT)
    for i in range(r_out.shape[0]):
        for j in range(r_out.shape[1]):
            pm = _max_pool_mu(rec, i, j, mutation)
            passed = tok.pass_relevance([m for _, m in pm], float(r_out[i, j]), stats)
            for (p, _), r in zip(pm, passed, strict=True):
                r_in[p] += r
    return r_in


def max_pool_shares(x: Tensor, i: int, j: int, *, mutation: str | None = None
                    ) -> list[tuple[Pos, float]]:
    """``(input position, mu)`` of the sources of output (i, j) of ``F.max_pool2d(x, 3, 2, 1)``
    on one sample ``x`` (C, H, W): the positions that won a channel, in window order
    (``mutation``: one of :data:`MAX_MUTATIONS`)."""
    if mutation not in (None, *MAX_MUTATIONS):
        raise ValueError(f"unknown mutation {mutation!r}")
    return _max_pool_mu(_max_pool_forward(_d(x)), i, j, mutation)


def max_pool_relevance(x: Tensor, r_out: Tensor, *, mutation: str | None = None) -> Tensor:
    """Relevance (H, W) of the input vectors of ``F.max_pool2d(x, 3, 2, 1)`` on one sample
    ``x`` (C, H, W) given the relevance ``r_out`` (H_out, W_out) of its output vectors
    (``mutation``: one of :data:`MAX_MUTATIONS`)."""
    if mutation not in (None, *MAX_MUTATIONS):
        raise ValueError(f"unknown mutation {mutation!r}")
    return _max_pool_backward(_max_pool_forward(_d(x)), _d(r_out), tok.Stats(), mutation)


@dataclass
class _TokenMaxRec:
    x: list[Tensor]  # the T input tokens
    y: list[Tensor]  # the T/2 output tokens, y(j) = max(x(j), x(j + T/2)) entry by entry
    own: list[tuple[Tensor, Tensor]]  # per j: the weights (D,) of x(j), x(j + T/2) in y(j)


def _token_max_forward(tokens: list[Tensor]) -> _TokenMaxRec:
    """``t.view(2, T // 2, D).amax(0)`` of one sample's tokens, entry by entry: entry d of
    ``y(j)`` is owned by the larger of ``x_d(j)``, ``x_d(j + T/2)`` (weight 1), half and half
    (weights 1/2) on an exact tie."""
    n_tok = len(tokens)
    assert n_tok % 2 == 0, "token_max needs an even token count"
    half = n_tok // 2
    ys, own = [], []
    for j in range(half):
        a, b = tokens[j], tokens[j + half]
        d_n = a.shape[0]
        y = torch.zeros(d_n, dtype=DT)
        wa = torch.zeros(d_n, dtype=DT)
        wb = torch.zeros(d_n, dtype=DT)
        for d in range(d_n):
            va, vb = float(a[d]), float(b[d])
            if va > vb:
                y[d], wa[d] = va, 1.0
            elif vb > va:
                y[d], wb[d] = vb, 1.0
            else:
                y[d], wa[d], wb[d] = va, 0.5, 0.5
        ys.append(y)
        own.append((wa, wb))
    return _TokenMaxRec(list(tokens), ys, own)


def _token_max_mu(rec: _TokenMaxRec, j: int, mutation: str | None = None) -> list[float]:
    """``[mu_{j->j}, mu_{j+T/2->j}]``: contributions ``w_s ⊙ y(j)`` (``w_s`` the entries s owns,
    1/2 on a tie). ``max_abs``: each entry routed to the source of larger ``|x|`` (the first on
    a tie), contribution that source's value; ``max_even``: evenly over the owning sources."""
    y = rec.y[j]
    half = len(rec.y)
    a, b = rec.x[j], rec.x[j + half]
    if mutation == "max_abs":
        take_a = torch.tensor([abs(float(a[d])) >= abs(float(b[d])) for d in range(y.shape[0])])
        ca = torch.where(take_a, a, torch.zeros_like(a))
        cb = torch.where(take_a, torch.zeros_like(b), b)
        return tok.shares(y, [ca, cb], [True, True], check=False)
    wa, wb = rec.own[j]
    if mutation == "max_even":
        owners = [bool(wa.any()), bool(wb.any())]
        if not bool((y != 0).any()):
            return [0.0, 0.0]
        return [1.0 / sum(owners) if o else 0.0 for o in owners]
    return tok.shares(y, [wa * y, wb * y], [True, True])


def _token_max_backward(rec: _TokenMaxRec, r_out: list[float], stats: tok.Stats,
                        mutation: str | None = None) -> list[float]:
    half = len(rec.y)
    r_in = [0.0] * (2 * half)
    for j in range(half):
        r_a, r_b = tok.pass_relevance(_token_max_mu(rec, j, mutation), r_out[j], stats)
        r_in[j] += r_a
        r_in[j + half] += r_b
    return r_in


def token_max_shares(tokens: Tensor, *, mutation: str | None = None) -> list[list[float]]:
    """``[mu_{j->j}, mu_{j+T/2->j}]`` for each output token j of the token max pooling of one
    sample's tokens (T, D) (``mutation``: one of :data:`MAX_MUTATIONS`)."""
    if mutation not in (None, *MAX_MUTATIONS):
        raise ValueError(f"unknown mutation {mutation!r}")
    rec = _token_max_forward(list(_d(tokens)))
    return [_token_max_mu(rec, j, mutation) for j in range(len(rec.y))]


def token_max_relevance(tokens: Tensor, r_out: Tensor, *, mutation: str | None = None
                        ) -> Tensor:
    """Relevance (T,) of the input tokens of the token max pooling of one sample's tokens
    (T, D) given the relevance ``r_out`` (T/2,) of its output tokens (``mutation``: one of
    :data:`MAX_MUTATIONS`)."""
    if mutation not in (None, *MAX_MUTATIONS):
        raise ValueError(f"unknown mutation {mutation!r}")
    rec = _token_max_forward(list(_d(tokens)))
    r = _token_max_backward(rec, [float(v) for v in _d(r_out)], tok.Stats(), mutation)
    return torch.tensor(r, dtype=DT)


# --------------------------------------------------------------------------- forward (per sample)


@dataclass
class _Forward:
    x: Tensor
    stem: _ConvRec
    stem_bn: Tensor
    stem_act: Tensor      # the inverted-residual block's input (its shortcut)
    expand: _ConvRec
    bn1: Tensor
    act1: Tensor
    dw: _ConvRec
    bn2: Tensor
    act2: Tensor
    se: _GateRec | None   # the squeeze-excitation gate (its output is the project conv's input)
    project: _ConvRec
    bn3: Tensor           # the branch
    ir_out: Tensor        # branch + shortcut
    eca: _EcaRec | None   # the ECA gate on ir_out
    gc: _GCRec | None     # the global-context block on the ECA output (else ir_out)
    pool: _MaxPoolRec | None  # the max pooling of the map before the relabelling
    tokens_map: Tensor    # (C, H, W) the map relabelled to tokens
    tokens: list[Tensor]  # token t = tokens_map[:, t // W, t % W]
    tmax: _TokenMaxRec | None  # the token max pooling (its output is the transformer input)
    blocks: list
    block_out: list[Tensor]
    normed: list[Tensor]
    pooled: Tensor
    logits: Tensor


def _forward_sample(model: TinyHybrid, x: Tensor) -> _Forward:
    assert isinstance(model, TinyHybrid), type(model).__name__
    stem = _conv_forward(model.stem_conv, x)
    stem_bn = _bn_map(model.stem_bn, stem.y)
    stem_act = _act_map(model.stem_act, stem_bn)
    ir = model.ir
    expand = _conv_forward(ir.expand, stem_act)
    bn1 = _bn_map(ir.bn1, expand.y)
    act1 = _act_map(ir.act1, bn1)
    dw = _conv_forward(ir.dw, act1)
    bn2 = _bn_map(ir.bn2, dw.y)
    act2 = _act_map(ir.act2, bn2)
    se = _se_forward(ir.se, act2) if ir.se is not None else None
    project = _conv_forward(ir.project, act2 if se is None else se.y)
    bn3 = _bn_map(ir.bn3, project.y)
    ir_out = bn3 + stem_act
    nchw = ir_out
    eca = _eca_forward(model.eca, nchw) if model.eca is not None else None
    nchw = nchw if eca is None else eca.y
    gc = _gc_forward(model.gc, nchw) if model.gc is not None else None
    nchw = nchw if gc is None else gc.y
    pool = _max_pool_forward(nchw, 3, 2, 1) if model.max_pool else None
    nchw = nchw if pool is None else pool.y
    _, h, w = nchw.shape
    tokens = [nchw[:, i, j].clone() for i in range(h) for j in range(w)]
    tmax = _token_max_forward(tokens) if model.token_max else None
    recs = []
    cur = tokens if tmax is None else tmax.y
    dep = [True] * len(cur)
    for blk in model.blocks:
        rec, cur, dep = tok.block_forward(blk, cur, dep)
        recs.append(rec)
    normed = [tok.layer_norm(model.norm, v) for v in cur]
    pooled = torch.zeros_like(normed[0])
    for v in normed:
        pooled = pooled + v / len(normed)
    logits = tok.linear(model.head, pooled)
    return _Forward(x, stem, stem_bn, stem_act, expand, bn1, act1, dw, bn2, act2, se, project,
                    bn3, ir_out, eca, gc, pool, nchw, tokens, tmax, recs, cur, normed, pooled,
                    logits)


# --------------------------------------------------------------------------- relevance


def _backward(model: TinyHybrid, fw: _Forward, target: int, misread: str | None) -> dict:
    if misread is not None and misread not in (MISREADINGS + GC_MUTATIONS + MAX_MUTATIONS
                                               + ECA_MUTATIONS):
        raise ValueError(f"unknown misreading {misread!r}")
    if misread in GC_MUTATIONS and fw.gc is None:
        raise ValueError(f"{misread!r} needs the global-context block (gc=True)")
    if misread in MAX_MUTATIONS and fw.pool is None and fw.tmax is None:
        raise ValueError(f"{misread!r} needs a max pooling (max_pool=True or token_max=True)")
    if misread in ECA_MUTATIONS and fw.eca is None:
        raise ValueError(f"{misread!r} needs the ECA gate (eca=True)")
    max_mut = misread if misread in MAX_MUTATIONS else None
    stats = tok.Stats()
    even = misread == "conv_bias_even"
    fuse = misread == "fuse_bn"
    ir = model.ir
    logit = float(fw.logits[target])

    # head Linear: one source, the pooled vector, gets the target logit; then the token mean
    n_tok = len(fw.normed)
    r = tok.pass_relevance(tok.shares(fw.pooled, [v / n_tok for v in fw.normed], [True] * n_tok),
                  logit, stats)
    # final LayerNorm: one source per token
    r = [r_t if bool((fw.normed[t] != 0).any()) else 0.0 for t, r_t in enumerate(r)]
    tokens_out = list(r)
    for rec in reversed(fw.blocks):
        r = tok.block_backward(rec, r, stats)
    tokens_in = list(r)
    tmax_in = None
    if fw.tmax is not None:
        r = _token_max_backward(fw.tmax, r, stats, max_mut)
        tmax_in = list(r)

    # tokens are the channel vectors of the NCHW map (the pooled map, else the GC output, else
    # the ECA output, else the sum), row-major
    _, h, w = fw.tokens_map.shape
    r_map = torch.zeros(h, w, dtype=DT)
    for t, r_t in enumerate(r):
        r_map[t // w, t % w] = r_t
    r_pool_in = (r_map if fw.pool is None
                 else _max_pool_backward(fw.pool, r_map, stats, max_mut))
    r_gc = None
    if fw.gc is not None:
        r_gc = _gc_backward(model.gc, fw.gc, r_pool_in, stats,
                            misread if misread in GC_MUTATIONS else None)
        r_eca_out = r_gc["x"]
    else:
        r_eca_out = r_pool_in
    r_eca_gate = None
    if fw.eca is not None:
        r_sum, r_eca_gate = _eca_backward(fw.ir_out, fw.eca, r_eca_out, stats,
                                          gate_half=misread == "eca_gate_half")
    else:
        r_sum = r_eca_out
    r_branch, r_short = residual_relevance(fw.bn3, fw.stem_act, r_sum,
                                           last_axis=misread == "residual_last_axis",
                                           stats=stats)
    # bn3 (one source), project (1x1: one source), [the gate: one source], act2, bn2
    r = _one_source(fw.bn3, r_branch, stats)
    r = _conv_backward(fw.project, r, stats, even=even, bn=ir.bn3 if fuse else None)
    gate_out = gate_signal = r_gate = None
    if fw.se is not None:
        gate_out = r
        r, r_gate = _gate_backward(fw.act2, fw.se.gate, fw.se.y, r, stats)
        gate_signal = r
    r = _one_source(fw.act2, r, stats)
    r_dw_out = _one_source(fw.bn2, r, stats)
    r_dw_in = _conv_backward(fw.dw, r_dw_out, stats, even=even, bn=ir.bn2 if fuse else None)
    r = _one_source(fw.act1, r_dw_in, stats)
    r = _one_source(fw.bn1, r, stats)
    r = _conv_backward(fw.expand, r, stats, even=even, bn=ir.bn1 if fuse else None)
    r_ir_in = r + r_short
    r = _one_source(fw.stem_act, r_ir_in, stats)
    r_stem_out = _one_source(fw.stem_bn, r, stats)
    pixel = _conv_backward(fw.stem, r_stem_out, stats, even=even,
                           bn=model.stem_bn if fuse else None)
    res = {"tokens_out": tokens_out, "tokens_in": tokens_in, "sum": r_sum,
           "branch": r_branch, "shortcut": r_short, "dw_out": r_dw_out, "dw_in": r_dw_in,
           "ir_in": r_ir_in, "stem_out": r_stem_out, "pixel": pixel, "lost": stats.lost}
    if tmax_in is not None:
        res.update(tmax_in=tmax_in)
    if fw.pool is not None:
        res.update(pool_out=r_map, pool_in=r_pool_in)
    if fw.eca is not None:
        res.update(eca_out=r_eca_out, eca_gate=r_eca_gate)
    if r_gc is not None:
        res.update(gc_out=r_pool_in, gc_add_x=r_gc["add_x"], gc_m=r_gc["m"],
                   gc_context=r_gc["context"], gc_pool_x=r_gc["pool_x"])
        if misread == "gc_weights_relevance":
            res["gc_weights"] = r_gc["weights"]
    if fw.se is not None:
        # the gate branch's PFVs (one vector each: pooled, fc1, act, fc2, gate) get only what
        # the gate collected as a source, which is nothing
        res.update(gate_out=gate_out, gate_signal=gate_signal,
                   gate_branch={k: r_gate for k in ("pooled", "fc1", "act", "fc2", "gate")})
    return res


def srd_hybrid_oracle_trace(model: TinyHybrid, x: Tensor, target: int, *,
                            misread: str | None = None) -> list[dict]:
    """Per sample: ``logits``; ``forward`` (``stem`` conv output, ``ir`` block output (C, H, W),
    ``tokens`` transformer output (T, D)); the relevance at every cut (``tokens_out`` at the
    final LayerNorm input, ``tokens_in`` at the transformer input, ``sum`` (H, W) at the NCHW
    residual sum, its ``branch`` and ``shortcut`` shares, ``dw_out`` / ``dw_in`` at the depthwise
    convolution's output / input, ``ir_in`` at the block input, ``stem_out`` at the stem conv
    output), the (H, W) ``pixel`` map, and ``lost`` (relevance that reached a zero vector).
    With the squeeze-excitation gate also ``gate_out`` / ``gate_signal`` (H, W) at the gated
    product (the project conv's input) and at its signal (the depthwise activation's output),
    ``gate_branch`` (the relevance of the gate branch's vectors: ``pooled``, ``fc1``, ``act``,
    ``fc2``, ``gate``), and in ``forward`` the ``gate`` value (C,) and the gated map ``se``.
    With the global-context block ``sum`` is the relevance of the block's input and also
    ``gc_out`` (H, W) at its output (the tokens' map), ``gc_add_x`` (H, W) the input's shares at
    the broadcast add, ``gc_m`` = R(m), ``gc_context`` = R(context), ``gc_pool_x`` (H, W) the
    input's shares at the attention pooling (``sum = gc_add_x + gc_pool_x``; under the mutation
    ``gc_weights_relevance`` also ``gc_weights`` (H, W)), and in ``forward`` the block output
    ``gc`` (C, H, W), its softmax weights ``gc_attn`` (H, W), ``gc_context`` (C,) and
    ``gc_m`` (C,). With the ECA gate also ``eca_out`` (H, W) at its output (``sum`` at its input,
    the residual sum) and ``eca_gate`` (the relevance of the gate: 0 but under
    ``eca_gate_half``), and in ``forward`` the gated map ``eca`` (C, H, W), ``eca_mean``,
    ``eca_conv`` and the gate value ``eca_gate`` (C,). With the max pooling also ``pool_out``
    (H_out, W_out) at its output (the tokens' map) and ``pool_in`` (H, W) at its input, and in
    ``forward`` the pooled map ``pool`` (C, H_out, W_out) and ``pool_winners`` (``[i][j][c]``:
    the input position that won channel c at output (i, j)). With the token max pooling
    ``tokens_in`` is the relevance of its output (the transformer input, T/2 tokens) and
    ``tmax_in`` that of its input (T tokens), and in ``forward`` ``tokens_pre`` (T, D) and
    ``tmax`` (T/2, D)."""
    x = x.detach().to(DT)
    out = []
    for n in range(x.shape[0]):
        fw = _forward_sample(model, x[n])
        res = _backward(model, fw, target, misread)
        res["logits"] = fw.logits
        res["forward"] = {"stem": fw.stem.y, "ir": fw.ir_out,
                          "tokens": torch.stack(fw.block_out)}
        if fw.se is not None:
            res["forward"].update(gate=fw.se.gate, se=fw.se.y)
        if fw.gc is not None:
            res["forward"].update(gc=fw.gc.y, gc_attn=fw.gc.weights, gc_context=fw.gc.context,
                                  gc_m=fw.gc.m)
        if fw.eca is not None:
            res["forward"].update(eca=fw.eca.y, eca_mean=fw.eca.pooled, eca_conv=fw.eca.conv,
                                  eca_gate=fw.eca.gate)
        if fw.pool is not None:
            res["forward"].update(pool=fw.pool.y, pool_winners=fw.pool.win)
        if fw.tmax is not None:
            res["forward"].update(tokens_pre=torch.stack(fw.tokens),
                                  tmax=torch.stack(fw.tmax.y))
        out.append(res)
    return out


def srd_hybrid_oracle(model: TinyHybrid, x: Tensor, target: int, *,
                      misread: str | None = None) -> Tensor:
    """SRD pixel map (N, H, W), float64, of ``target``'s logit for each sample of ``x``."""
    return torch.stack([s["pixel"]
                        for s in srd_hybrid_oracle_trace(model, x, target, misread=misread)])


def oracle_logits(model: TinyHybrid, x: Tensor) -> Tensor:
    """The oracle's own float64 forward, (N, classes)."""
    x = x.detach().to(DT)
    return torch.stack([_forward_sample(model, x[n]).logits for n in range(x.shape[0])])
