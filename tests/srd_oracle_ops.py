"""Slow reference implementation ("oracle") of SRD for operations beyond plain CNNs.

Covers channel / spatial concatenation, channel / spatial slices and chunks, channel
permutations (ShuffleNet's channel shuffle, one path per position), gating products
(squeeze-excitation, same-shape sigmoid gates, CBAM-style broadcast gates, a written-out SiLU),
adaptive average pooling with overlapping/variable windows, ``F.interpolate`` (nearest,
nearest-exact, bilinear with and without ``align_corners``), and GroupNorm / LayerNorm with
statistics fixed to their forward values (channels-first ``LayerNorm2d`` and ConvNeXt's
channels-last ``permute -> LayerNorm -> Linear -> act -> Linear -> layer scale -> permute``, a
LayerNorm in the head), on the small float64 test models defined here. Written from docs/srd.md
only (sections "Objects", "Operations beyond plain CNNs", "Bias shares", "Sharing ratio and
relevance", "Seeds"), independently of ``srdxai.engine``.

How it works (everything explicit, float64, no autograd, no modified gradient):

* For each model class a builder recomputes the forward pass op by op and records the PFV layers
  (the model input ``"input"``, the output of every activation module, named by the module's
  qualified name, and, with ``sum_layers=True`` (the default), the output of every residual sum
  ``a + b`` of two input-dependent tensors, see "Sum layers" below) and, for every PFV layer but
  the input, its affine block: a small DAG of linear
  *nodes* (conv with optionally fused BN, standalone BN, sum, concatenation, slice, channel
  permutation (its permutation from the op's definition, checked against the model's own
  view / transpose / view on an index tensor), gate product
  with the gate fixed to its forward value, global mean, adaptive avg-pool, interpolation,
  GroupNorm / LayerNorm with fixed statistics, dense layer on the channel axis = 1x1 conv,
  per-channel constant scale) whose leaves are PFV layers and whose root is the activation's
  pre-activation ``z``. Tensors are kept channels-first; permutes are layout changes only.
* Every node lists, for an output position ``u``, its *components* ``(input index, offset,
  input position)`` and pushes a vector living at such an input position through its linear part
  (``apply``). A path is a chain of components from a leaf position ``p`` to the block output
  position ``q``; its contribution ``c_π(q)`` is ``v(p)`` pushed along the chain.
* A node with a bias is an entry op: its bias ``b(r)`` at its output position ``r`` is split over
  all path prefixes that reach ``r`` (from every leaf, through every input of a multi-input node)
  in proportion to ``||c_π(r)||`` measured at the entry op's output, evenly when all those norms
  are 0. Shares are carried along with their path through the later nodes' linear parts. A norm's
  bias ``β − γ ⊙ µ/σ`` differs per sample (GroupNorm) or per sample and position (LayerNorm over
  channels); its paths' norms are measured after the scale ``γ/σ``.
* Per block output position: assert ``Σ_π (c_π(q) + b_π(q)) == z(q)``, then
  ``µ_π = <c_π(q) + b_π(q), z(q)> / ||z(q)||²`` (0 where z(q) = 0) and ``R(p) += µ_π R(q)``.
  Activations are transparent. Gate factors are constants, so a gate's own branch (its sigmoid
  PFV layer and everything only feeding it) receives no relevance.
* Logit seed: the last PFV layer's position q gets ``(w_c · v(q) + b_c) / n`` (GAP + Linear head,
  head bias split evenly). With a LayerNorm between GAP and Linear (fixed statistics per sample),
  ``w_c`` is the per-sample ``W diag(γ/σ)`` row and ``b_c`` includes ``W (β − γ µ/σ)``, also split
  evenly (a head bias).

Sum layers (``sum_layers=True``, the default; ``False`` gives the earlier definition): the output
of every sum ``a + b`` of two input-dependent tensors is a PFV layer whose activation is the
identity (its z is the sum, v = z). Its affine block is the sum node with its two inputs'
sub-DAGs (leaves: the nearest PFV layers upstream); its relevance is shared like any other block's.
Name: ``"<qualified name of the module whose forward did the sum>:sum"`` (``"sum"`` for the
top-level model's own forward), with ``@0``, ``@1`` ... appended in forward order to all of them
when one forward does several sums. The graph build checks names and values against the model's
own forward: a ``TorchFunctionMode`` records every addition of two tensors that depend on the
input (the input requires grad, the parameters are frozen) together with the innermost module
whose forward is running (module pre/post hooks keep the stack). Where a sum feeds an activation
directly (ResNet's ``act(x + f(x))``) the extra layer changes nothing: relevance projected on z(q)
and then again on the same z(q) is the same (µ = 1).

Without sum layers the head input of a model whose residual stream has no activation (StreamNet)
is not a PFV layer. Then the head is one more affine block, from the PFV layers upstream to the
target logit (one position, one channel; seeded with R = logit, so µ_π = (c_π + b_π) / logit and
R(p) = Σ_π (c_π + b_π)): GAP is a mean node, the target's (per-sample) head row a linear node whose
bias (fc bias, head LayerNorm shift) is a head bias, split evenly over all its paths (docs/srd.md,
"Head block"). On StreamNet every earlier entry op of that block also lies in some activation's
block or has a single path, so its split stays the usual one by norm. ``ops_logit_seed`` and
``contrastive`` (both need a seed map on the last PFV layer) are refused there.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

try:  # works both when tests/ is a package and when it is only on sys.path
    from . import small_models as sm  # type: ignore[no-redef]
    from .srd_oracle import ConvEntryOp, contrast_seed, per_sample_targets  # type: ignore
except ImportError:  # pragma: no cover - depends on how pytest imports the tests
    import small_models as sm  # type: ignore[no-redef]
    from srd_oracle import ConvEntryOp, contrast_seed, per_sample_targets  # type: ignore

Pos = tuple[int, int]
Target = int | Sequence[int] | torch.Tensor

_Z_RTOL = 1e-9
_Z_ATOL = 1e-10


# ==============================================================================================
# Models
# ==============================================================================================


def _act(act: str) -> nn.Module:
    if act == "sigmoid":
        # a sigmoid signal activation would make "the factor produced by a sigmoid" ambiguous in
        # the same-shape gates of GateNet; keep sigmoids for gates only
        raise ValueError("the ops models use sigmoid only for gates; choose another activation")
    return sm.make_act(act)


class CatNet(nn.Module):
    """conv1(3->6, 3x3, bias)+bn1 -> act1;
    branch a: conv_a(6->4, 3x3, bias) -> act_a; branch b: conv_b(6->3, 1x1, bias)+bn_b -> act_b;
    cat([act_a, act_b, act1], 1) (13 ch) -> conv2(13->6, 3x3, stride 2, bias)+bn2 -> act2;
    dense: cat([act2, conv_d(act2)], 1) (6+4 ch; conv_d 3x3, bias) -> bn_d -> act_d;
    conv3(10->8, 1x1, bias) -> act3 -> GAP -> fc(8 -> num_classes)."""

    def __init__(self, act: str = "relu", num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = _act(act)
        self.conv_a = nn.Conv2d(6, 4, 3, padding=1, bias=True)
        self.act_a = _act(act)
        self.conv_b = nn.Conv2d(6, 3, 1, bias=True)
        self.bn_b = nn.BatchNorm2d(3)
        self.act_b = _act(act)
        self.conv2 = nn.Conv2d(13, 6, 3, stride=2, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = _act(act)
        self.conv_d = nn.Conv2d(6, 4, 3, padding=1, bias=True)
        self.bn_d = nn.BatchNorm2d(10)
        self.act_d = _act(act)
        self.conv3 = nn.Conv2d(10, 8, 1, bias=True)
        self.act3 = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        a = self.act_a(self.conv_a(h))
        b = self.act_b(self.bn_b(self.conv_b(h)))
        h2 = self.act2(self.bn2(self.conv2(torch.cat([a, b, h], 1))))
        d = self.act_d(self.bn_d(torch.cat([h2, self.conv_d(h2)], 1)))
        y = self.act3(self.conv3(d))
        return self.fc(torch.flatten(self.pool(y), 1))


class SliceNet(nn.Module):
    """conv1(3->8, 3x3, bias)+bn1 -> act1; act1[:, :5] -> conv2(5->6, 3x3, bias) -> act2;
    a, b = act2.chunk(2, 1); conv3a(a)(3->6, 3x3, bias) + bn3b(conv3b(b))(3->6, 1x1, bias) -> act3;
    act3[:, :, 1:, :-1] -> conv_g(6->4, 3x3, bias)+bn_g -> act_g (GhostNet primary);
    conv_h(4->4, 3x3, depthwise, bias)+bn_h on act_g -> act_h (GhostNet cheap op);
    cat([act_g, act_h], 1)[:, :6] -> [:, :, ::2] -> (spatial_cat: cat([y[..., 3:], y[..., :3]], 3))
    -> conv5(6->8, 3x3, bias) -> act5 -> GAP -> fc."""

    def __init__(self, act: str = "relu", num_classes: int = 4, spatial_cat: bool = True) -> None:
        super().__init__()
        self.spatial_cat = spatial_cat
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, bias=True)
        self.act2 = _act(act)
        self.conv3a = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.conv3b = nn.Conv2d(3, 6, 1, bias=True)
        self.bn3b = nn.BatchNorm2d(6)
        self.act3 = _act(act)
        self.conv_g = nn.Conv2d(6, 4, 3, padding=1, bias=True)
        self.bn_g = nn.BatchNorm2d(4)
        self.act_g = _act(act)
        self.conv_h = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True)
        self.bn_h = nn.BatchNorm2d(4)
        self.act_h = _act(act)
        self.conv5 = nn.Conv2d(6, 8, 3, padding=1, bias=True)
        self.act5 = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.act1(self.bn1(self.conv1(x)))
        h2 = self.act2(self.conv2(h1[:, :5]))
        a, b = h2.chunk(2, dim=1)
        h3 = self.act3(self.conv3a(a) + self.bn3b(self.conv3b(b)))
        s = h3[:, :, 1:, :-1]
        g = self.act_g(self.bn_g(self.conv_g(s)))
        c = self.act_h(self.bn_h(self.conv_h(g)))
        y = torch.cat([g, c], 1)[:, :6]
        y = y[:, :, ::2]
        if self.spatial_cat:
            y = torch.cat([y[..., 3:], y[..., :3]], dim=3)
        h5 = self.act5(self.conv5(y))
        return self.fc(torch.flatten(self.pool(h5), 1))


class GateNet(nn.Module):
    """conv1(3->6, 3x3, bias)+bn1 -> act1;
    squeeze-excitation: se_sig(se_fc2(se_act(se_fc1(act1.mean((2, 3), keepdim=True))))), (N,6,1,1);
    act1 * se-gate -> conv2(6->6, 3x3, bias)+bn2 -> act2;
    same-shape gate: t = act2 * sp_sig(sp_conv(act2)) (sp_conv 6->6, 3x3, bias);
    z3 = conv3(t) (6->6, 3x3, bias); written-out SiLU y = z3 * silu_sig(z3);
    conv4(y)(6->8, 3x3, bias)+bn4 -> act4;
    CBAM-style broadcast spatial gate: cb_sig(cb_conv(act4)) (8->1, 3x3, bias) * act4
    -> conv5(8->8, 3x3, bias) -> act5 -> GAP -> fc.
    Gate PFV layers (sigmoid outputs): se_sig, sp_sig, silu_sig, cb_sig; se_act feeds only a
    gate."""

    def __init__(self, act: str = "relu", num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = _act(act)
        self.se_fc1 = nn.Conv2d(6, 3, 1, bias=True)
        self.se_act = _act(act)
        self.se_fc2 = nn.Conv2d(3, 6, 1, bias=True)
        self.se_sig = nn.Sigmoid()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = _act(act)
        self.sp_conv = nn.Conv2d(6, 6, 3, padding=1, bias=True)
        self.sp_sig = nn.Sigmoid()
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=True)
        self.silu_sig = nn.Sigmoid()
        self.conv4 = nn.Conv2d(6, 8, 3, padding=1, bias=True)
        self.bn4 = nn.BatchNorm2d(8)
        self.act4 = _act(act)
        self.cb_conv = nn.Conv2d(8, 1, 3, padding=1, bias=True)
        self.cb_sig = nn.Sigmoid()
        self.conv5 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.act5 = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.act1(self.bn1(self.conv1(x)))
        gate = self.se_sig(self.se_fc2(self.se_act(self.se_fc1(h1.mean((2, 3), keepdim=True)))))
        h2 = self.act2(self.bn2(self.conv2(h1 * gate)))
        t = h2 * self.sp_sig(self.sp_conv(h2))
        z3 = self.conv3(t)
        y = z3 * self.silu_sig(z3)
        h4 = self.act4(self.bn4(self.conv4(y)))
        h5 = self.act5(self.conv5(self.cb_sig(self.cb_conv(h4)) * h4))
        return self.fc(torch.flatten(self.pool(h5), 1))


class AdaptivePoolNet(nn.Module):
    """conv1(3->6, 3x3, bias)+bn1 -> act1 (H x W, e.g. 8x10);
    F.adaptive_avg_pool2d(., (5, 4)) -> conv2(6->6, 3x3, bias)+bn2 -> act2 (5x4);
    F.adaptive_avg_pool2d(., (3, 7)) (5->3 overlapping, 4->7 overlapping/variable)
    -> conv3(6->8, 3x3, bias) -> act3 -> GAP -> fc."""

    def __init__(self, act: str = "relu", num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = _act(act)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1, bias=True)
        self.act3 = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.act1(self.bn1(self.conv1(x)))
        h2 = self.act2(self.bn2(self.conv2(F.adaptive_avg_pool2d(h1, (5, 4)))))
        h3 = self.act3(self.conv3(F.adaptive_avg_pool2d(h2, (3, 7))))
        return self.fc(torch.flatten(self.pool(h3), 1))


class UpsampleNet(nn.Module):
    """conv1(3->6, 3x3, bias)+bn1 -> act1 (H x W, even, e.g. 8x10);
    conv2(6->6, 3x3, stride 2, no bias)+bn2 -> act2 (H/2 x W/2);
    F.interpolate(act2, scale_factor=2, nearest) -> conv3(6->6, 3x3, bias), + act1 (skip) -> act3;
    F.interpolate(act3, size=(5, 7), bilinear, align_corners=True) -> conv4(3x3, bias)+bn4 -> act4;
    F.interpolate(act4, size=(7, 9), bilinear, align_corners=False) -> conv5(6->8, 3x3, bias)
    -> act5 -> GAP -> fc."""

    def __init__(self, act: str = "relu", num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = _act(act)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=True)
        self.act3 = _act(act)
        self.conv4 = nn.Conv2d(6, 6, 3, padding=1, bias=True)
        self.bn4 = nn.BatchNorm2d(6)
        self.act4 = _act(act)
        self.conv5 = nn.Conv2d(6, 8, 3, padding=1, bias=True)
        self.act5 = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.act1(self.bn1(self.conv1(x)))
        h2 = self.act2(self.bn2(self.conv2(h1)))
        up = F.interpolate(h2, scale_factor=2, mode="nearest")
        h3 = self.act3(self.conv3(up) + h1)
        u4 = F.interpolate(h3, size=(5, 7), mode="bilinear", align_corners=True)
        h4 = self.act4(self.bn4(self.conv4(u4)))
        u5 = F.interpolate(h4, size=(7, 9), mode="bilinear", align_corners=False)
        h5 = self.act5(self.conv5(u5))
        return self.fc(torch.flatten(self.pool(h5), 1))


class TinyCatGateNet(nn.Module):
    """Toy for hand-checked values (1 input channel): t = x * sig(gconv(x)) (gconv 1x1, bias;
    same-shape gate from a sigmoid); cat([x, t], 1) -> conv (2 -> 1, kernel (1, 2), no padding,
    bias) -> act -> GAP -> Linear(1, 1). The conv bias is split over the paths from both
    concatenated inputs; ``sig`` gets no relevance."""

    def __init__(self, act: str = "relu", num_classes: int = 1) -> None:
        super().__init__()
        self.gconv = nn.Conv2d(1, 1, 1, bias=True)
        self.sig = nn.Sigmoid()
        self.conv = nn.Conv2d(2, 1, (1, 2), bias=True)
        self.act = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x * self.sig(self.gconv(x))
        y = self.act(self.conv(torch.cat([x, t], 1)))
        return self.fc(torch.flatten(self.pool(y), 1))


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm over the channel dimension at every position (ConvNeXt's
    ``LayerNorm2d``): permute to channels-last, ``F.layer_norm`` over (C,), permute back."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (self.num_channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class NormNet(nn.Module):
    """conv1(3->6, 3x3, bias) -> gn1 (GroupNorm, 2 groups, affine) -> act1;
    conv2(6->8, 3x3, bias) -> ln2 (LayerNorm2d over channels, affine) -> act2 -> GAP -> fc.
    Neither conv is fused with its norm: the conv bias and the norm shift are two entry ops."""

    def __init__(self, act: str = "relu", num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.gn1 = nn.GroupNorm(2, 6, affine=True)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=True)
        self.ln2 = LayerNorm2d(8)
        self.act2 = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.gn1(self.conv1(x)))
        h = self.act2(self.ln2(self.conv2(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


class ConvNeXtLike(nn.Module):
    """stem(3->8, kernel 2, stride 2, bias) -> stem_norm (LayerNorm2d); no activation, so the
    stem output is not a PFV layer. One ConvNeXt block on it, h:
    t = dwconv(h) (7x7, padding 3, groups 8, bias); t.permute(0, 2, 3, 1) -> norm (nn.LayerNorm(8))
    -> pwconv1 (Linear 8->16) -> act (``block_act``, GELU by default; a PFV layer) -> pwconv2
    (Linear 16->8) -> * gamma (layer scale, (8,)) -> permute(0, 3, 1, 2); h + t -> act_out
    (``act``) -> GAP -> head_norm (nn.LayerNorm(8) on the pooled (N, 8)) -> fc (Linear 8->K).
    PFV layers: input, act, act_out."""

    def __init__(self, act: str = "relu", num_classes: int = 4, block_act: str = "gelu") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2, bias=True)
        self.stem_norm = LayerNorm2d(8)
        self.dwconv = nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=True)
        self.norm = nn.LayerNorm(8, eps=1e-6)
        self.pwconv1 = nn.Linear(8, 16)
        self.act = _act(block_act)
        self.pwconv2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(0.8 * torch.randn(8))
        self.act_out = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_norm(self.stem(x))
        shortcut = h
        t = self.dwconv(h)
        t = t.permute(0, 2, 3, 1)
        t = self.norm(t)
        t = self.pwconv1(t)
        t = self.act(t)
        t = self.pwconv2(t)
        t = t * self.gamma
        t = t.permute(0, 3, 1, 2)
        h = shortcut + t
        y = self.act_out(h)
        return self.fc(self.head_norm(torch.flatten(self.pool(y), 1)))


class TinyNormNet(nn.Module):
    """Toy for hand-checked values (3 input channels, 1 x 2 input): conv (3 -> 3, kernel (1, 2),
    no padding, bias) -> ln (LayerNorm2d(3), eps 1e-5) -> act -> GAP -> Linear(3, 1).
    One output position, two paths (the two kernel offsets)."""

    def __init__(self, act: str = "relu", num_classes: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, (1, 2), bias=True)
        self.ln = LayerNorm2d(3, eps=1e-5)
        self.act = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.ln(self.conv(x)))
        return self.fc(torch.flatten(self.pool(y), 1))


class StreamBlock(nn.Module):
    """One ConvNeXt-like block on a channels-first map h, with NO activation after the sum:
    t = dwconv(h) (3x3, padding 1, groups C, bias); t.permute(0, 2, 3, 1) -> norm
    (nn.LayerNorm(C)) -> pwconv1 (Linear C->2C) -> act (a PFV layer) -> pwconv2 (Linear 2C->C)
    -> * gamma (layer scale, (C,)) -> permute(0, 3, 1, 2); returns h + t (a sum layer
    ``"<this block's name>:sum"``)."""

    def __init__(self, dim: int, act: str) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 2 * dim)
        self.act = _act(act)
        self.pwconv2 = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(0.8 * torch.randn(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = self.dwconv(h).permute(0, 2, 3, 1)
        t = self.pwconv2(self.act(self.pwconv1(self.norm(t)))) * self.gamma
        return h + t.permute(0, 3, 1, 2)


class StreamNet(nn.Module):
    """A ConvNeXt-like residual stream without any activation after the sums:
    stem (Conv2d 3->8, kernel 2, stride 2, bias) -> stem_norm (LayerNorm2d) -> blocks.0, blocks.1
    (StreamBlock, h = h + block(h)) -> downsample (LayerNorm2d -> Conv2d 8->8, kernel 2, stride 2,
    bias) -> blocks2.0 (StreamBlock) -> GAP -> head_norm (nn.LayerNorm(8)) -> fc (Linear 8->K).
    PFV layers (sum layers on): input, blocks.0.act, blocks.0:sum, blocks.1.act, blocks.1:sum,
    blocks2.0.act, blocks2.0:sum (the head input); without sum layers only input and the three
    ``.act`` layers, and the head input is the stream (an affine function of all of them)."""

    def __init__(self, act: str = "relu", num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2, bias=True)
        self.stem_norm = LayerNorm2d(8)
        self.blocks = nn.Sequential(StreamBlock(8, act), StreamBlock(8, act))
        self.downsample = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 8, 2, stride=2, bias=True))
        self.blocks2 = nn.Sequential(StreamBlock(8, act))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem_norm(self.stem(x)))
        h = self.blocks2(self.downsample(h))
        return self.fc(self.head_norm(torch.flatten(self.pool(h), 1)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle, written exactly as torchvision writes it
    (``torchvision.models.shufflenetv2.channel_shuffle``): split the channels into ``groups``
    groups, transpose groups and channels-within-a-group, merge back."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(b, c, h, w)
    return x


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 unit (torchvision's ``InvertedResidual``, with biases on every conv and
    named submodules). Branch features ``bf = oup // 2``.

    stride 2 (downsampling): branch1 = dw (3x3, stride 2, depthwise on ``inp``) + dw_bn -> pw
    (1x1, inp -> bf) + pw_bn -> act; branch2 = pw1 (1x1, inp -> bf) + pw1_bn -> act1 -> dw (3x3,
    stride 2, depthwise) + dw_bn -> pw2 (1x1) + pw2_bn -> act2;
    ``cat((branch1(x), branch2(x)), 1)``.
    stride 1 (``inp == oup``): ``x1, x2 = x.chunk(2, dim=1)``; ``cat((x1, branch2(x2)), 1)`` with
    branch2 as above on bf channels (stride 1). Both end with ``channel_shuffle(out, 2)``."""

    def __init__(self, inp: int, oup: int, stride: int, act: str) -> None:
        super().__init__()
        assert stride in (1, 2) and oup % 2 == 0
        self.stride = stride
        bf = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                OrderedDict(
                    [
                        ("dw", nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=True)),
                        ("dw_bn", nn.BatchNorm2d(inp)),
                        ("pw", nn.Conv2d(inp, bf, 1, bias=True)),
                        ("pw_bn", nn.BatchNorm2d(bf)),
                        ("act", _act(act)),
                    ]
                )
            )
        else:
            assert inp == oup
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            OrderedDict(
                [
                    ("pw1", nn.Conv2d(inp if stride > 1 else bf, bf, 1, bias=True)),
                    ("pw1_bn", nn.BatchNorm2d(bf)),
                    ("act1", _act(act)),
                    ("dw", nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=True)),
                    ("dw_bn", nn.BatchNorm2d(bf)),
                    ("pw2", nn.Conv2d(bf, bf, 1, bias=True)),
                    ("pw2_bn", nn.BatchNorm2d(bf)),
                    ("act2", _act(act)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        out = channel_shuffle(out, 2)
        return out


class ShuffleNet(nn.Module):
    """A small ShuffleNetV2: conv1 (3->8, 3x3, bias) + bn1 -> act1 (8x8 on an 8x8 input);
    ``down`` (ShuffleUnit 8->16, stride 2; 4x4); ``unit`` (ShuffleUnit 16->16, stride 1);
    conv_last (16->16, 1x1, bias) + bn_last -> act_last -> ``mean([2, 3])`` -> fc (16 -> K).
    The channel shuffles are permutations, one component each (docs/srd.md): act_last's block
    has three paths per position (from down.branch1.act, down.branch2.act2, unit.branch2.act2),
    unit.branch2.act1's block reads the second half of down's shuffled output."""

    def __init__(self, act: str = "relu", num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = _act(act)
        self.down = ShuffleUnit(8, 16, 2, act)
        self.unit = ShuffleUnit(16, 16, 1, act)
        self.conv_last = nn.Conv2d(16, 16, 1, bias=True)
        self.bn_last = nn.BatchNorm2d(16)
        self.act_last = _act(act)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.unit(self.down(x))
        x = self.act_last(self.bn_last(self.conv_last(x)))
        x = x.mean([2, 3])
        return self.fc(x)


class TinyShuffleNet(nn.Module):
    """Toy for the channel-permutation consequence of docs/srd.md (3 input channels):
    conv1 (3->6, 3x3, bias) + bn1 -> act1 -> channel step -> conv2 (6->5, 3x3, bias) + bn2 -> act2
    -> GAP -> fc (5 -> K). The channel step (``shuffle``):
    ``"shuffle"``: ``channel_shuffle(., 2)`` (torchvision's view / transpose / view);
    ``"none"``: nothing (the same function once conv2's input channels carry the permutation);
    ``"slices"``: the same permutation written as ``cat`` of single-channel slices
    ``h[:, c:c+1]`` (a concatenation, one path per channel: a different SRD)."""

    def __init__(self, act: str = "relu", num_classes: int = 4, shuffle: str = "shuffle") -> None:
        super().__init__()
        assert shuffle in ("shuffle", "none", "slices")
        self.shuffle = shuffle
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(5)
        self.act2 = _act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, num_classes)
        # the shuffle's permutation, for the "slices" variant only
        self.order = shuffle_permutation(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        if self.shuffle == "shuffle":
            h = channel_shuffle(h, 2)
        elif self.shuffle == "slices":
            h = torch.cat([h[:, c : c + 1] for c in self.order], 1)
        y = self.act2(self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(self.pool(y), 1))


def shuffle_permutation(channels: int, groups: int) -> list[int]:
    """``perm[j]``: the input channel that a channel shuffle with ``groups`` groups puts at output
    channel ``j`` (out[:, j] = in[:, perm[j]]). From the shuffle's definition: input channel
    ``c = k * (C // g) + i`` is element (group k, index i) of the (g, C // g) view; the transpose
    makes it element (i, k) of a (C // g, g) view, which the merge flattens to ``j = i * g + k``.
    So ``perm[j] = (j % g) * (C // g) + j // g``."""
    assert channels % groups == 0
    per = channels // groups
    return [(j % groups) * per + j // groups for j in range(channels)]


OPS_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "CatNet": CatNet,
    "SliceNet": SliceNet,
    "GateNet": GateNet,
    "AdaptivePoolNet": AdaptivePoolNet,
    "UpsampleNet": UpsampleNet,
    "NormNet": NormNet,
    "ConvNeXtLike": ConvNeXtLike,
    "StreamNet": StreamNet,
    "ShuffleNet": ShuffleNet,
}

# Toys for hand-checked values (not in OPS_MODEL_CLASSES; build_ops_model knows them too).
TINY_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "TinyCatGateNet": TinyCatGateNet,
    "TinyNormNet": TinyNormNet,
    "TinyShuffleNet": TinyShuffleNet,
}

# The input shape each model is meant to be tested with (others work too where noted above).
OPS_INPUT_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "CatNet": (2, 3, 8, 8),
    "SliceNet": (2, 3, 8, 10),
    "GateNet": (2, 3, 8, 8),
    "AdaptivePoolNet": (2, 3, 8, 10),
    "UpsampleNet": (2, 3, 8, 10),
    "NormNet": (2, 3, 8, 10),
    "ConvNeXtLike": (2, 3, 8, 8),
    "StreamNet": (2, 3, 8, 8),
    "ShuffleNet": (2, 3, 8, 8),
}

# PFV layers that only feed gate factors: by the definition they receive no relevance.
GATE_BRANCH_LAYERS: dict[str, tuple[str, ...]] = {
    "GateNet": ("se_act", "se_sig", "sp_sig", "silu_sig", "cb_sig"),
}


def build_ops_model(
    name: str, act: str = "relu", seed: int = 0, num_classes: int = 4, **kwargs: object
) -> nn.Module:
    """``OPS_MODEL_CLASSES[name](act, num_classes, **kwargs)`` with weights drawn under
    ``torch.manual_seed(seed)``, random non-trivial BN statistics/affine parameters, random
    non-trivial GroupNorm / LayerNorm affine parameters and random non-zero biases; float64,
    eval mode."""
    cls = {**OPS_MODEL_CLASSES, **TINY_MODEL_CLASSES}[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(act=act, num_classes=num_classes, **kwargs)
    sm.randomize_bn(model, seed + 1)
    sm.randomize_biases(model, seed + 2)
    randomize_norms(model, seed + 3)
    return model.double().eval()


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Give every GroupNorm / LayerNorm / LayerNorm2d with affine parameters a random weight
    (either sign, |γ| in [0.6, 1.4]) and bias (0.6·N(0, 1)). In place; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm, LayerNorm2d)) and m.weight is not None:
            shape = m.weight.shape
            flip = torch.rand(shape, generator=g, dtype=torch.float64) < 0.15
            sign = torch.where(flip, -1.0, 1.0)
            gamma = sign * (0.6 + 0.8 * torch.rand(shape, generator=g, dtype=torch.float64))
            m.weight.copy_(gamma.to(m.weight.dtype))
            if m.bias is not None:
                beta = 0.6 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64)
                m.bias.copy_(beta.to(m.bias.dtype))
    return model


def ops_input(name: str, seed: int = 0, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Deterministic float64 input of ``OPS_INPUT_SHAPES[name]`` (or ``shape``)."""
    shape = OPS_INPUT_SHAPES[name] if shape is None else shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ==============================================================================================
# Nodes of an affine block
# ==============================================================================================


class _Node:
    """A linear operation inside an affine block.

    ``inputs``: the input nodes; ``ref``: the output tensor (N, C, H, W) computed with the real
    torch operation; ``bias``: the entry-op bias vector (C,) added at every output position, or
    None (a node whose bias differs per sample / position, such as a norm with fixed statistics,
    overrides ``bias_at``). ``sources(u)`` lists the components ``(input index, offset, input
    position)`` of output position ``u``; ``apply`` pushes a vector living at such an input
    position to ``u``."""

    inputs: list[_Node]
    ref: torch.Tensor
    bias: torch.Tensor | None = None
    # a head bias: split evenly over all the paths into it, not by norm (docs/srd.md)
    even_split: bool = False

    def bias_at(self, n: int, u: Pos) -> torch.Tensor:
        """The entry-op bias vector (C,) at output position ``u`` of sample ``n``."""
        assert self.bias is not None
        return self.bias

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        raise NotImplementedError

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Leaf(_Node):
    """A PFV layer used as the input of a block."""

    def __init__(self, name: str, ref: torch.Tensor):
        self.name = name
        self.inputs = []
        self.ref = ref


def _hw(t: torch.Tensor) -> Pos:
    return (int(t.shape[2]), int(t.shape[3]))


class _ConvNode(_Node):
    """Conv2d, optionally fused with the BatchNorm2d that is its only consumer (one entry op:
    bias ``s·b_conv + β − s·µ``, contributions measured after the BN scale)."""

    def __init__(self, inp: _Node, conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
        self.inputs = [inp]
        self.op = ConvEntryOp(conv, bn, _hw(inp.ref))
        self.bias = self.op.bias
        ref = conv(inp.ref)
        self.ref = bn(ref) if bn is not None else ref

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, off, p) for off, p in self.op.sources(u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return self.op.mats[off] @ vec  # type: ignore[index]


class _BNNode(_Node):
    """A BatchNorm2d that does not directly follow a conv: scale ``s = γ/√(σ²+ε)``, entry-op bias
    ``β − s·µ``."""

    def __init__(self, inp: _Node, bn: nn.BatchNorm2d):
        assert isinstance(bn, nn.BatchNorm2d) and not bn.training
        self.inputs = [inp]
        self.scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        self.bias = bn.bias.detach().double() - self.scale * bn.running_mean.double()
        self.ref = bn(inp.ref)

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return self.scale * vec


class _AddNode(_Node):
    """Elementwise sum of same-shape tensors: each summand is one branch."""

    def __init__(self, inputs: Sequence[_Node]):
        self.inputs = list(inputs)
        ref = self.inputs[0].ref
        for t in self.inputs[1:]:
            assert t.ref.shape == ref.shape
            ref = ref + t.ref
        self.ref = ref

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(i, None, u) for i in range(len(self.inputs))]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return vec


class _CatNode(_Node):
    """torch.cat along channels (dim 1: each input's vector goes to its own channel block, zeros
    elsewhere) or along a spatial dim (2 or 3: input i's position moves by the offset of i)."""

    def __init__(self, inputs: Sequence[_Node], dim: int):
        assert dim in (1, 2, 3)
        self.inputs = list(inputs)
        self.dim = dim
        self.ref = torch.cat([t.ref for t in self.inputs], dim)
        sizes = [int(t.ref.shape[dim]) for t in self.inputs]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.cout = int(self.ref.shape[1])

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        if self.dim == 1:
            return [(i, None, u) for i in range(len(self.inputs))]
        ax = self.dim - 2
        for i, (s, k) in enumerate(zip(self.starts, self.sizes, strict=True)):
            if s <= u[ax] < s + k:
                p = (u[0] - s, u[1]) if ax == 0 else (u[0], u[1] - s)
                return [(i, None, p)]
        raise AssertionError("position outside the concatenation")

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        if self.dim != 1:
            return vec
        out = vec.new_zeros(self.cout)
        out[self.starts[i] : self.starts[i] + self.sizes[i]] = vec
        return out


class _SliceNode(_Node):
    """``x[:, a:b:s]`` (dim 1: selected channels) or a slice along a spatial dim (2 or 3: the
    output position reads input position start + u*step; unselected positions start no path).
    ``chunk``/``split`` are channel slices."""

    def __init__(self, inp: _Node, dim: int, sl: slice):
        assert dim in (1, 2, 3)
        self.inputs = [inp]
        self.dim = dim
        size = int(inp.ref.shape[dim])
        self.index = list(range(*sl.indices(size)))
        idx = [slice(None)] * 4
        idx[dim] = sl
        self.ref = inp.ref[tuple(idx)]

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        if self.dim == 1:
            return [(0, None, u)]
        if self.dim == 2:
            return [(0, None, (self.index[u[0]], u[1]))]
        return [(0, None, (u[0], self.index[u[1]]))]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        if self.dim == 1:
            return vec[self.index]
        return vec


class _GateNode(_Node):
    """``signal * gate`` with the gate fixed to its forward value (per sample): a diagonal linear
    map of the signal. ``gate`` is (N, Cg, Hg, Wg) with Cg in {1, C}, Hg in {1, H}, Wg in {1, W}.
    The gate's own branch is not an input of this node (it gets no relevance)."""

    def __init__(self, signal: _Node, gate: torch.Tensor):
        self.inputs = [signal]
        self.gate = gate.detach()
        self.ref = signal.ref * self.gate
        assert self.ref.shape == signal.ref.shape, "the gate must broadcast to the signal"

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        gh = u[0] if self.gate.shape[2] > 1 else 0
        gw = u[1] if self.gate.shape[3] > 1 else 0
        return vec * self.gate[n, :, gh, gw]


class _MeanNode(_Node):
    """``x.mean((2, 3), keepdim=True)``: every input position contributes v(p) / (H*W)."""

    def __init__(self, inp: _Node):
        self.inputs = [inp]
        self.in_hw = _hw(inp.ref)
        self.ref = inp.ref.mean((2, 3), keepdim=True)

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        assert u == (0, 0)
        return [(0, None, (i, j)) for i in range(self.in_hw[0]) for j in range(self.in_hw[1])]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return vec / float(self.in_hw[0] * self.in_hw[1])


def adaptive_windows(in_size: int, out_size: int) -> list[list[int]]:
    """Input indices averaged by each output index o of an adaptive avg-pool axis:
    floor(o*I/S) .. ceil((o+1)*I/S) - 1 (docs/srd.md)."""
    out = []
    for o in range(out_size):
        start = (o * in_size) // out_size
        end = -((-(o + 1) * in_size) // out_size)  # ceil
        out.append(list(range(start, end)))
    return out


class _AdaptiveAvgPoolNode(_Node):
    """F.adaptive_avg_pool2d: each window position is a component with weight
    1/(window height * window width)."""

    def __init__(self, inp: _Node, size: Pos):
        self.inputs = [inp]
        h, w = _hw(inp.ref)
        self.win = (adaptive_windows(h, size[0]), adaptive_windows(w, size[1]))
        self.ref = F.adaptive_avg_pool2d(inp.ref, size)

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, (a, b)) for a in self.win[0][u[0]] for b in self.win[1][u[1]]]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return vec / float(len(self.win[0][u[0]]) * len(self.win[1][u[1]]))


def interp_weights(
    in_size: int,
    out_size: int,
    mode: str,
    align_corners: bool | None,
    scale_factor: float | None = None,
) -> list[dict[int, float]]:
    """Per output index of one axis: {input index: weight} with the non-zero weights that
    ``F.interpolate`` uses (PyTorch's formulas; a position named twice has its weights added).

    nearest:       src = min(floor(o * scale), I - 1)
    nearest-exact: src = min(floor((o + 0.5) * scale), I - 1)
    linear:        align_corners: x = o * (I-1)/(S-1) (0 when S == 1);
                   else x = max((o + 0.5) * scale - 0.5, 0);
                   i0 = floor(x), i1 = min(i0 + 1, I - 1), weights (1 - (x - i0), x - i0).
    ``scale`` is 1/scale_factor when a scale factor was given (and not recomputed), else I/S."""
    scale = (1.0 / scale_factor) if scale_factor is not None else in_size / out_size
    out: list[dict[int, float]] = []
    for o in range(out_size):
        w: dict[int, float] = {}
        if mode in ("nearest", "nearest-exact"):
            x = o * scale if mode == "nearest" else (o + 0.5) * scale
            w[min(int(math.floor(x)), in_size - 1)] = 1.0
        elif mode in ("linear", "bilinear"):
            if align_corners:
                x = o * ((in_size - 1) / (out_size - 1)) if out_size > 1 else 0.0
            else:
                x = max((o + 0.5) * scale - 0.5, 0.0)
            i0 = int(math.floor(x))
            i0 = min(i0, in_size - 1)
            i1 = min(i0 + 1, in_size - 1)
            lam1 = x - i0
            lam0 = 1.0 - lam1
            w[i0] = w.get(i0, 0.0) + lam0
            w[i1] = w.get(i1, 0.0) + lam1
        else:
            raise ValueError(f"interpolation mode {mode!r} not supported by the oracle")
        out.append({k: v for k, v in w.items() if v != 0.0})
    return out


class _InterpNode(_Node):
    """F.interpolate (nearest, nearest-exact, bilinear): each input position with a non-zero
    weight (product of the per-axis weights) is a component."""

    def __init__(
        self,
        inp: _Node,
        *,
        size: Pos | None = None,
        scale_factor: float | None = None,
        mode: str = "nearest",
        align_corners: bool | None = None,
    ):
        self.inputs = [inp]
        kw: dict[str, object] = {"mode": mode}
        if mode not in ("nearest", "nearest-exact"):
            kw["align_corners"] = align_corners
        if size is not None:
            self.ref = F.interpolate(inp.ref, size=size, **kw)  # type: ignore[arg-type]
        else:
            self.ref = F.interpolate(inp.ref, scale_factor=scale_factor, **kw)  # type: ignore[arg-type]
        h, w = _hw(inp.ref)
        ho, wo = _hw(self.ref)
        self.w = (
            interp_weights(h, ho, mode, align_corners, scale_factor),
            interp_weights(w, wo, mode, align_corners, scale_factor),
        )

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, (a, b)) for a in self.w[0][u[0]] for b in self.w[1][u[1]]]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return vec * (self.w[0][u[0]][p[0]] * self.w[1][u[1]][p[1]])


def _to_cl(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> channels-last (N, H, W, C)."""
    return t.permute(0, 2, 3, 1)


def _to_cf(t: torch.Tensor) -> torch.Tensor:
    """channels-last (N, H, W, C) -> (N, C, H, W)."""
    return t.permute(0, 3, 1, 2)


# Layout: every node's ``ref`` is kept channels-first (N, C, H, W). A channels-last segment of a
# model (``permute(0, 2, 3, 1)`` ... ``permute(0, 3, 1, 2)``) is described by nodes built with
# ``channels_last=True``: they compute their ``ref`` by applying the model's module to the
# channels-last tensor and permuting the result back. The permutes themselves are layout changes
# only: a PFV / contribution vector is still "all channels at one spatial position".


class _NormNode(_Node):
    """GroupNorm / LayerNorm over the channels at every position, with the statistics fixed to
    their forward values per sample (docs/srd.md, "LayerNorm and GroupNorm").

    µ and σ = √(var + ε) (biased variance) are computed here from the input:
    LayerNorm over channels: per sample and position, over the C channels;
    GroupNorm with G groups: per sample and group, over the group's channels and all positions.
    Then y = x ⊙ γ/σ + (β − γ ⊙ µ/σ): a pointwise map with the per-sample (and, for LayerNorm,
    per-position) scale ``γ/σ`` and the entry-op bias ``β − γ ⊙ µ/σ``, split over the paths into
    each output position by their norms measured after the scale. Not fused with a preceding
    conv.

    ``module``: ``nn.GroupNorm``, ``LayerNorm2d`` (channels-first), or ``nn.LayerNorm`` over the
    last dimension applied to the channels-last tensor (``channels_last=True``)."""

    def __init__(self, inp: _Node, module: nn.Module, *, channels_last: bool = False):
        self.inputs = [inp]
        x = inp.ref
        nb, c, h, w = x.shape
        if isinstance(module, nn.GroupNorm):
            assert not channels_last and module.num_channels == c
            groups = module.num_groups
            xg = x.reshape(nb, groups, (c // groups) * h * w)
            mu_g = xg.mean(dim=2)
            var_g = ((xg - mu_g[:, :, None]) ** 2).mean(dim=2)
            sig_g = torch.sqrt(var_g + module.eps)
            mu = mu_g.repeat_interleave(c // groups, dim=1)[:, :, None, None].expand(nb, c, h, w)
            sig = sig_g.repeat_interleave(c // groups, dim=1)[:, :, None, None].expand(nb, c, h, w)
            eps = module.eps
            ref = module(x)
        elif isinstance(module, (LayerNorm2d, nn.LayerNorm)):
            if isinstance(module, nn.LayerNorm):
                assert channels_last and tuple(module.normalized_shape) == (c,)
                ref = _to_cf(module(_to_cl(x)))
            else:
                assert not channels_last and module.num_channels == c
                ref = module(x)
            eps = module.eps
            mu1 = x.mean(dim=1, keepdim=True)
            var1 = ((x - mu1) ** 2).mean(dim=1, keepdim=True)
            mu = mu1.expand(nb, c, h, w)
            sig = torch.sqrt(var1 + eps).expand(nb, c, h, w)
        else:
            raise TypeError(f"not a supported norm: {type(module).__name__}")
        assert eps > 0.0
        gamma = (
            module.weight.detach().double()
            if getattr(module, "weight", None) is not None
            else x.new_ones(c)
        )
        beta = (
            module.bias.detach().double()
            if getattr(module, "bias", None) is not None
            else x.new_zeros(c)
        )
        self.scale = (gamma[None, :, None, None] / sig).contiguous()
        g4 = gamma[None, :, None, None]
        self.shift = (beta[None, :, None, None] - g4 * mu / sig).contiguous()
        self.bias = self.shift  # marks the entry op; per sample / position via bias_at
        self.ref = ref

    def bias_at(self, n: int, u: Pos) -> torch.Tensor:
        return self.shift[n, :, u[0], u[1]]

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return vec * self.scale[n, :, u[0], u[1]]


class _LinearNode(_Node):
    """``nn.Linear`` on the channel axis of a channels-last map: a 1x1 convolution (contribution
    ``W v(p)``; its bias is an entry op, one path per position so it goes to that path whole)."""

    def __init__(self, inp: _Node, linear: nn.Linear):
        assert isinstance(linear, nn.Linear)
        self.inputs = [inp]
        self.mat = linear.weight.detach().double()
        assert self.mat.shape[1] == inp.ref.shape[1]
        self.bias = linear.bias.detach().double() if linear.bias is not None else None
        self.ref = _to_cf(linear(_to_cl(inp.ref)))

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return self.mat @ vec


class _ChannelScaleNode(_Node):
    """Multiplication by a per-channel constant (ConvNeXt's layer scale ``t * gamma`` on the
    channels-last map, or ``(C, 1, 1)`` on a channels-first one): a per-channel scale, no bias."""

    def __init__(self, inp: _Node, gamma: torch.Tensor, *, channels_last: bool = True):
        self.inputs = [inp]
        self.gamma = gamma.detach().double().reshape(-1)
        assert self.gamma.numel() == inp.ref.shape[1]
        if channels_last:
            self.ref = _to_cf(_to_cl(inp.ref) * gamma.detach())
        else:
            self.ref = inp.ref * gamma.detach().reshape(-1, 1, 1)

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return vec * self.gamma


def permutation_of(op: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int]) -> list[int]:
    """The channel permutation that the tensor operation ``op`` performs on (1, C, H, W) maps,
    read off an index tensor (entry (c, h, w) holds its flat index ``(c * H + h) * W + w``):
    ``perm[j]`` is the input channel found at output channel ``j``. Asserts that ``op`` keeps the
    shape, moves no position (every entry stays at its (h, w)) and is a permutation of the
    channels."""
    _, c, h, w = (int(d) for d in shape)
    idx = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w)
    out = op(idx)
    assert tuple(out.shape) == (1, c, h, w), "not a channel permutation: the shape changes"
    src_c = torch.div(out[0], h * w, rounding_mode="floor")
    pos = idx[0, 0].expand(c, h, w)  # h * W + w at (h, w)
    assert torch.equal(out[0] - src_c * (h * w), pos), "the positions move"
    perm = src_c[:, 0, 0]
    assert torch.equal(src_c, perm[:, None, None].expand(c, h, w)), "channels mix positions"
    perm_list = [int(v) for v in perm.tolist()]
    assert sorted(perm_list) == list(range(c)), "not a permutation of the channels"
    return perm_list


class _ChannelPermNode(_Node):
    """A channel permutation (ShuffleNet's channel shuffle, docs/srd.md "Channel permutations"):
    one component per position, the input vector at the same position with its channels
    reordered, ``out[j] = in[perm[j]]`` (same norm); no bias. ``op`` is the model's own tensor
    operation: it computes ``ref`` and must perform exactly ``perm`` (checked on an index tensor
    and on the input)."""

    def __init__(self, inp: _Node, perm: Sequence[int], op: Callable[[torch.Tensor], torch.Tensor]):
        self.inputs = [inp]
        self.perm = list(perm)
        c = int(inp.ref.shape[1])
        assert sorted(self.perm) == list(range(c)), "not a permutation of the channels"
        assert permutation_of(op, (1, c, *_hw(inp.ref))) == self.perm
        self.ref = op(inp.ref)
        assert torch.equal(self.ref, inp.ref[:, self.perm])

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        return [(0, None, u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return vec[self.perm]


class _HeadNode(_Node):
    """The target logit of every sample as a linear map of the pooled vector
    (N, C, 1, 1) -> (N, 1, 1, 1): ``w[n] · vec + b[n]`` with ``w`` (N, C) the target's row of the
    (per-sample) head weight and ``b`` (N,) its head bias, an entry op split evenly over all its
    paths (a head bias). Used only where the head input is not a PFV layer."""

    even_split = True

    def __init__(self, inp: _Node, w: torch.Tensor, b: torch.Tensor):
        assert _hw(inp.ref) == (1, 1) and w.shape == inp.ref.shape[:2] and b.shape == w.shape[:1]
        self.inputs = [inp]
        self.w = w
        self.b = b
        self.bias = b  # marks the entry op; per sample via bias_at
        self.ref = (torch.einsum("nc,nc->n", w, inp.ref[:, :, 0, 0]) + b)[:, None, None, None]

    def bias_at(self, n: int, u: Pos) -> torch.Tensor:
        return self.b[n : n + 1]

    def sources(self, u: Pos) -> list[tuple[int, object, Pos]]:
        assert u == (0, 0)
        return [(0, None, u)]

    def apply(self, n: int, i: int, off: object, p: Pos, u: Pos, vec: torch.Tensor) -> torch.Tensor:
        return (self.w[n] @ vec).reshape(1)


# ==============================================================================================
# Graph description per model
# ==============================================================================================


@dataclass
class _Block:
    """An affine block: ``root.ref`` is the pre-activation z of the activation ``out_layer``
    (channels-first; ``channels_last``: the model applies the activation to the channels-last
    permutation of it). ``is_sum``: ``out_layer`` is a sum layer, ``root`` the sum node, and the
    activation the identity (v = z)."""

    out_layer: str
    root: _Node
    channels_last: bool = False
    is_sum: bool = False


@dataclass
class _Graph:
    layers: dict[str, torch.Tensor]
    blocks: list[_Block]  # forward order
    # the PFV layer feeding GAP; None where the head input is not a PFV layer (then head_root)
    head_layer: str | None
    # (K, C) and (K,) for GAP + Linear; per sample (N, K, C) and (N, K) when the head has a
    # LayerNorm with fixed statistics between GAP and Linear
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    logits: torch.Tensor  # (N, K)
    # the node feeding GAP when it is not a PFV layer (a residual stream's last sum without sum
    # layers); the head is then an affine block of its own (see the module docstring)
    head_root: _Node | None = None
    # every sum of two input-dependent tensors, by sum-layer name (PFV layers or not)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


class _Recorder:
    """Recomputes a model's forward node by node and collects PFV layers and blocks."""

    def __init__(self, model: nn.Module, x: torch.Tensor, sum_layers: bool = True):
        self.modules = dict(model.named_modules())
        self.layers: dict[str, torch.Tensor] = {"input": x}
        self.blocks: list[_Block] = []
        self.sum_layers = sum_layers
        self.sums: dict[str, torch.Tensor] = {}

    def leaf(self, name: str) -> _Leaf:
        return _Leaf(name, self.layers[name])

    def act(self, name: str, root: _Node, *, channels_last: bool = False) -> _Leaf:
        """Apply the activation module ``name`` to ``root.ref`` (to its channels-last permutation
        when ``channels_last``); record the PFV layer (channels-first) and the block."""
        assert name not in self.layers, f"activation {name} used twice"
        if channels_last:
            self.layers[name] = _to_cf(self.modules[name](_to_cl(root.ref)))
        else:
            self.layers[name] = self.modules[name](root.ref)
        self.blocks.append(_Block(name, root, channels_last))
        return self.leaf(name)

    def add(self, name: str, inputs: Sequence[_Node]) -> _Node:
        """A sum of input-dependent tensors, named ``name`` (see the module docstring). With sum
        layers: record the PFV layer ``name`` (identity activation, v = z = the sum) and its
        block, and return its leaf; without: return the sum node itself."""
        node = _AddNode(inputs)
        assert name not in self.sums and name not in self.layers, f"sum {name} used twice"
        self.sums[name] = node.ref
        if not self.sum_layers:
            return node
        self.layers[name] = node.ref
        self.blocks.append(_Block(name, node, is_sum=True))
        return self.leaf(name)

    def _head_input(self, inp: str | _Node) -> tuple[str | None, _Node | None, torch.Tensor]:
        if isinstance(inp, str):
            return inp, None, self.layers[inp]
        if isinstance(inp, _Leaf):
            return inp.name, None, self.layers[inp.name]
        return None, inp, inp.ref

    def head(self, inp: str | _Node, fc: nn.Linear) -> _Graph:
        layer, root, v = self._head_input(inp)
        w = fc.weight.detach().double()
        b = fc.bias.detach().double() if fc.bias is not None else w.new_zeros(w.shape[0])
        logits = torch.einsum("kc,nc->nk", w, v.mean(dim=(2, 3))) + b
        return _Graph(self.layers, self.blocks, layer, w, b, logits, root, self.sums)

    def head_norm(self, inp: str | _Node, ln: nn.LayerNorm, fc: nn.Linear) -> _Graph:
        """GAP -> LayerNorm over the pooled channels -> Linear. The LayerNorm's statistics are
        fixed per sample (µ, σ = √(var + ε) of the pooled vector), so the head is affine per
        sample: logits = W (s ⊙ pooled) + W (β − γ µ/σ) + b with s = γ/σ. Per-sample head weight
        ``W diag(s)`` (N, K, C) and head bias ``W (β − γ µ/σ) + b`` (N, K); both biases are head
        biases, split evenly over the n positions of the last PFV layer by the logit seed.
        ``inp``: the PFV layer (name or leaf) feeding GAP, or a node that is not one (then the
        head is a block of its own, see the module docstring)."""
        layer, root, v = self._head_input(inp)
        pooled = v.mean(dim=(2, 3))  # (N, C)
        c = pooled.shape[1]
        assert tuple(ln.normalized_shape) == (c,)
        mu = pooled.mean(dim=1, keepdim=True)
        var = ((pooled - mu) ** 2).mean(dim=1, keepdim=True)
        sig = torch.sqrt(var + ln.eps)
        gamma = ln.weight.detach().double() if ln.weight is not None else pooled.new_ones(c)
        beta = ln.bias.detach().double() if ln.bias is not None else pooled.new_zeros(c)
        scale = gamma[None, :] / sig  # (N, C)
        shift = beta[None, :] - gamma[None, :] * mu / sig  # (N, C)
        w = fc.weight.detach().double()
        b = fc.bias.detach().double() if fc.bias is not None else w.new_zeros(w.shape[0])
        w_eff = w[None, :, :] * scale[:, None, :]  # (N, K, C)
        b_eff = shift @ w.T + b[None, :]  # (N, K)
        logits = torch.einsum("nkc,nc->nk", w_eff, pooled) + b_eff
        return _Graph(self.layers, self.blocks, layer, w_eff, b_eff, logits, root, self.sums)


def _graph_catnet(m: CatNet, R: _Recorder) -> _Graph:
    h = R.act("act1", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    a = R.act("act_a", _ConvNode(R.leaf("act1"), m.conv_a, None))
    b = R.act("act_b", _ConvNode(R.leaf("act1"), m.conv_b, m.bn_b))
    cat = _CatNode([a, b, h], 1)
    h2 = R.act("act2", _ConvNode(cat, m.conv2, m.bn2))
    dense = _CatNode([h2, _ConvNode(R.leaf("act2"), m.conv_d, None)], 1)
    d = R.act("act_d", _BNNode(dense, m.bn_d))
    R.act("act3", _ConvNode(d, m.conv3, None))
    return R.head("act3", m.fc)


def _graph_slicenet(m: SliceNet, R: _Recorder) -> _Graph:
    h1 = R.act("act1", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    h2 = R.act("act2", _ConvNode(_SliceNode(h1, 1, slice(None, 5)), m.conv2, None))
    c = int(h2.ref.shape[1])
    k = -(-c // 2)  # chunk(2): first ceil(C/2) channels, then the rest
    a = _SliceNode(h2, 1, slice(0, k))
    b = _SliceNode(R.leaf("act2"), 1, slice(k, c))
    z3 = R.add("sum", [_ConvNode(a, m.conv3a, None), _ConvNode(b, m.conv3b, m.bn3b)])
    h3 = R.act("act3", z3)
    s = _SliceNode(_SliceNode(h3, 2, slice(1, None)), 3, slice(None, -1))
    g = R.act("act_g", _ConvNode(s, m.conv_g, m.bn_g))
    ch = R.act("act_h", _ConvNode(g, m.conv_h, m.bn_h))
    y: _Node = _SliceNode(_CatNode([R.leaf("act_g"), ch], 1), 1, slice(None, 6))
    y = _SliceNode(y, 2, slice(None, None, 2))
    if m.spatial_cat:
        y = _CatNode([_SliceNode(y, 3, slice(3, None)), _SliceNode(y, 3, slice(None, 3))], 3)
    R.act("act5", _ConvNode(y, m.conv5, None))
    return R.head("act5", m.fc)


def _graph_gatenet(m: GateNet, R: _Recorder) -> _Graph:
    h1 = R.act("act1", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    se = R.act("se_act", _ConvNode(_MeanNode(h1), m.se_fc1, None))
    gate = R.act("se_sig", _ConvNode(se, m.se_fc2, None))
    h2 = R.act("act2", _ConvNode(_GateNode(R.leaf("act1"), gate.ref), m.conv2, m.bn2))
    sp = R.act("sp_sig", _ConvNode(h2, m.sp_conv, None))
    t = _GateNode(R.leaf("act2"), sp.ref)
    # silu_sig's pre-activation is z3 = conv3(t); the product z3 * silu_sig(z3) is one more
    # (gate) step of act4's block, whose pre-activation is bn4(conv4(.))
    z3 = _ConvNode(t, m.conv3, None)
    silu = R.act("silu_sig", z3)
    y = _GateNode(z3, silu.ref)
    h4 = R.act("act4", _ConvNode(y, m.conv4, m.bn4))
    cb = R.act("cb_sig", _ConvNode(h4, m.cb_conv, None))
    R.act("act5", _ConvNode(_GateNode(R.leaf("act4"), cb.ref), m.conv5, None))
    return R.head("act5", m.fc)


def _graph_adaptivepoolnet(m: AdaptivePoolNet, R: _Recorder) -> _Graph:
    h1 = R.act("act1", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    h2 = R.act("act2", _ConvNode(_AdaptiveAvgPoolNode(h1, (5, 4)), m.conv2, m.bn2))
    R.act("act3", _ConvNode(_AdaptiveAvgPoolNode(h2, (3, 7)), m.conv3, None))
    return R.head("act3", m.fc)


def _graph_upsamplenet(m: UpsampleNet, R: _Recorder) -> _Graph:
    h1 = R.act("act1", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    h2 = R.act("act2", _ConvNode(h1, m.conv2, m.bn2))
    up = _InterpNode(h2, scale_factor=2, mode="nearest")
    h3 = R.act("act3", R.add("sum", [_ConvNode(up, m.conv3, None), R.leaf("act1")]))
    u4 = _InterpNode(h3, size=(5, 7), mode="bilinear", align_corners=True)
    h4 = R.act("act4", _ConvNode(u4, m.conv4, m.bn4))
    u5 = _InterpNode(h4, size=(7, 9), mode="bilinear", align_corners=False)
    R.act("act5", _ConvNode(u5, m.conv5, None))
    return R.head("act5", m.fc)


def _graph_tinycatgatenet(m: TinyCatGateNet, R: _Recorder) -> _Graph:
    sig = R.act("sig", _ConvNode(R.leaf("input"), m.gconv, None))
    cat = _CatNode([R.leaf("input"), _GateNode(R.leaf("input"), sig.ref)], 1)
    R.act("act", _ConvNode(cat, m.conv, None))
    return R.head("act", m.fc)


def _graph_normnet(m: NormNet, R: _Recorder) -> _Graph:
    # conv bias and norm shift are separate entry ops (no fusion with GroupNorm / LayerNorm)
    h1 = R.act("act1", _NormNode(_ConvNode(R.leaf("input"), m.conv1, None), m.gn1))
    R.act("act2", _NormNode(_ConvNode(h1, m.conv2, None), m.ln2))
    return R.head("act2", m.fc)


def _graph_convnextlike(m: ConvNeXtLike, R: _Recorder) -> _Graph:
    # the stem output is not a PFV layer: the block's first affine part runs from the input
    # through stem conv, stem LayerNorm2d, depthwise conv, LayerNorm, pwconv1 up to act's z
    stem = _NormNode(_ConvNode(R.leaf("input"), m.stem, None), m.stem_norm)
    t: _Node = _ConvNode(stem, m.dwconv, None)
    t = _NormNode(t, m.norm, channels_last=True)
    t = _LinearNode(t, m.pwconv1)
    a = R.act("act", t, channels_last=True)
    t = _ChannelScaleNode(_LinearNode(a, m.pwconv2), m.gamma, channels_last=True)
    # residual: (input -> stem -> stem_norm) + (act -> pwconv2 -> gamma); the stem node is shared
    # with act's block (its bias shares are the same paths' shares)
    R.act("act_out", R.add("sum", [stem, t]))
    return R.head_norm("act_out", m.head_norm, m.fc)


def _graph_tinynormnet(m: TinyNormNet, R: _Recorder) -> _Graph:
    R.act("act", _NormNode(_ConvNode(R.leaf("input"), m.conv, None), m.ln))
    return R.head("act", m.fc)


def _graph_resnetlike(m: sm.ResNetLike, R: _Recorder) -> _Graph:
    """small_models.ResNetLike described with the general nodes (cross-check against the plain
    CNN oracle of srd_oracle.py)."""
    a0 = R.act("act", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    l1 = m.layer1
    a11 = R.act("layer1.act1", _ConvNode(a0, l1.conv1, l1.bn1))
    a12 = R.act("layer1.act2", _ConvNode(a11, l1.conv2, l1.bn2))
    z13 = R.add("layer1:sum", [_ConvNode(a12, l1.conv3, l1.bn3), R.leaf("act")])
    a13 = R.act("layer1.act3", z13)
    l2 = m.layer2
    a21 = R.act("layer2.act1", _ConvNode(a13, l2.conv1, l2.bn1))
    a22 = R.act("layer2.act2", _ConvNode(a21, l2.conv2, l2.bn2))
    main = _ConvNode(a22, l2.conv3, l2.bn3)
    short = _ConvNode(R.leaf("layer1.act3"), l2.downsample[0], l2.downsample[1])
    R.act("layer2.act3", R.add("layer2:sum", [main, short]))
    return R.head("layer2.act3", m.fc)


def _stream_block(R: _Recorder, blk: StreamBlock, name: str, h: _Node) -> _Node:
    """StreamBlock ``name`` on the stream node ``h``: act's block runs from h's leaves through
    dwconv, LayerNorm, pwconv1; the sum's block is h (shortcut) + (act -> pwconv2 -> gamma)."""
    t: _Node = _ConvNode(h, blk.dwconv, None)
    t = _NormNode(t, blk.norm, channels_last=True)
    t = _LinearNode(t, blk.pwconv1)
    a = R.act(f"{name}.act", t, channels_last=True)
    t = _ChannelScaleNode(_LinearNode(a, blk.pwconv2), blk.gamma, channels_last=True)
    return R.add(f"{name}:sum", [h, t])


def _graph_streamnet(m: StreamNet, R: _Recorder) -> _Graph:
    h: _Node = _NormNode(_ConvNode(R.leaf("input"), m.stem, None), m.stem_norm)
    for i, blk in enumerate(m.blocks):
        h = _stream_block(R, blk, f"blocks.{i}", h)  # type: ignore[arg-type]
    h = _ConvNode(_NormNode(h, m.downsample[0]), m.downsample[1], None)  # type: ignore[arg-type]
    for i, blk in enumerate(m.blocks2):
        h = _stream_block(R, blk, f"blocks2.{i}", h)  # type: ignore[arg-type]
    # sum layers: h is the leaf "blocks2.0:sum"; without: the stream's last sum node
    return R.head_norm(h, m.head_norm, m.fc)


def _shuffle_node(inp: _Node, groups: int) -> _ChannelPermNode:
    """``channel_shuffle(inp, groups)``: the permutation from the shuffle's definition
    (``shuffle_permutation``), checked against the model's view / transpose / view."""
    perm = shuffle_permutation(int(inp.ref.shape[1]), groups)
    return _ChannelPermNode(inp, perm, lambda t: channel_shuffle(t, groups))


def _shuffle_unit(R: _Recorder, u: ShuffleUnit, name: str, x: _Node) -> _Node:
    """ShuffleUnit ``name`` on ``x`` (a PFV leaf or the previous unit's shuffle node): records
    its branch activations and returns the shuffle node of its output (not a PFV layer)."""
    if u.stride > 1:
        b1 = u.branch1
        t = _ConvNode(x, b1.dw, b1.dw_bn)  # type: ignore[arg-type]
        left: _Node = R.act(f"{name}.branch1.act", _ConvNode(t, b1.pw, b1.pw_bn))  # type: ignore[arg-type]
        right: _Node = x
    else:
        c = int(x.ref.shape[1])
        k = -(-c // 2)  # chunk(2): first ceil(C/2) channels, then the rest
        left = _SliceNode(x, 1, slice(0, k))
        right = _SliceNode(x, 1, slice(k, c))
    b2 = u.branch2
    a1 = R.act(f"{name}.branch2.act1", _ConvNode(right, b2.pw1, b2.pw1_bn))  # type: ignore[arg-type]
    t = _ConvNode(a1, b2.dw, b2.dw_bn)  # type: ignore[arg-type]
    a2 = R.act(f"{name}.branch2.act2", _ConvNode(t, b2.pw2, b2.pw2_bn))  # type: ignore[arg-type]
    return _shuffle_node(_CatNode([left, a2], 1), 2)


def _graph_shufflenet(m: ShuffleNet, R: _Recorder) -> _Graph:
    h = R.act("act1", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    y = _shuffle_unit(R, m.unit, "unit", _shuffle_unit(R, m.down, "down", h))
    R.act("act_last", _ConvNode(y, m.conv_last, m.bn_last))
    return R.head("act_last", m.fc)


def _graph_tinyshufflenet(m: TinyShuffleNet, R: _Recorder) -> _Graph:
    h: _Node = R.act("act1", _ConvNode(R.leaf("input"), m.conv1, m.bn1))
    if m.shuffle == "shuffle":
        h = _shuffle_node(h, 2)
    elif m.shuffle == "slices":  # a concatenation of single-channel slices: one path per channel
        h = _CatNode([_SliceNode(h, 1, slice(c, c + 1)) for c in m.order], 1)
    R.act("act2", _ConvNode(h, m.conv2, m.bn2))
    return R.head("act2", m.fc)


_BUILDERS: dict[type, Callable[[nn.Module, _Recorder], _Graph]] = {
    CatNet: _graph_catnet,  # type: ignore[dict-item]
    SliceNet: _graph_slicenet,  # type: ignore[dict-item]
    GateNet: _graph_gatenet,  # type: ignore[dict-item]
    AdaptivePoolNet: _graph_adaptivepoolnet,  # type: ignore[dict-item]
    UpsampleNet: _graph_upsamplenet,  # type: ignore[dict-item]
    TinyCatGateNet: _graph_tinycatgatenet,  # type: ignore[dict-item]
    NormNet: _graph_normnet,  # type: ignore[dict-item]
    ConvNeXtLike: _graph_convnextlike,  # type: ignore[dict-item]
    TinyNormNet: _graph_tinynormnet,  # type: ignore[dict-item]
    sm.ResNetLike: _graph_resnetlike,  # type: ignore[dict-item]
    StreamNet: _graph_streamnet,  # type: ignore[dict-item]
    ShuffleNet: _graph_shufflenet,  # type: ignore[dict-item]
    TinyShuffleNet: _graph_tinyshufflenet,  # type: ignore[dict-item]
}


_ADD_FUNCS = frozenset(
    {
        torch.add,
        torch.Tensor.add,
        torch.Tensor.add_,
        torch.Tensor.__add__,
        torch.Tensor.__radd__,
        torch.Tensor.__iadd__,
    }
)


class _SumCatcher(TorchFunctionMode):
    """Records every addition of two input-dependent tensors (both require grad: the input does,
    the parameters are frozen) with the qualified name of the innermost module whose forward is
    running (``stack``, kept by module pre/post hooks)."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.found: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if (
            func in _ADD_FUNCS
            and len(args) >= 2
            and all(isinstance(a, torch.Tensor) and a.requires_grad for a in args[:2])
        ):
            self.found.append((self.stack[-1], out.detach().clone()))
        return out


def sum_layer_names(modules: Sequence[str]) -> list[str]:
    """Sum-layer names for sums done, in forward order, by the forwards of ``modules``
    (qualified names, ``""`` = the top-level model): ``"<module>:sum"`` (``"sum"`` for the top
    level), with ``@0``, ``@1`` ... appended to all of a module's sums when it does several."""
    counts = Counter(modules)
    seen: Counter[str] = Counter()
    names = []
    for mod in modules:
        base = f"{mod}:sum" if mod else "sum"
        if counts[mod] > 1:
            base = f"{base}@{seen[mod]}"
            seen[mod] += 1
        names.append(base)
    return names


def _hooked_forward(
    model: nn.Module, x: torch.Tensor, names: Sequence[str]
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Run the model's own forward; capture (input, output) of every named activation module,
    and every sum of two input-dependent tensors by sum-layer name (forward order). Freezes the
    model's parameters (call it on a copy)."""
    mods = dict(model.named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stack: list[str] = []
    handles = []
    for name in names:

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            assert name not in seen, f"activation module {name} called twice"
            seen[name] = (args[0].detach().clone(), out.detach().clone())

        handles.append(mods[name].register_forward_hook(hook))
    for qn, mod in mods.items():

        def push(mod: nn.Module, args: tuple, qn: str = qn) -> None:
            stack.append(qn)

        def pop(mod: nn.Module, args: tuple, out: object, qn: str = qn) -> None:
            assert stack.pop() == qn

        handles.append(mod.register_forward_pre_hook(push))
        handles.append(mod.register_forward_hook(pop))
    for prm in model.parameters():
        prm.requires_grad_(False)
    catcher = _SumCatcher(stack)
    try:
        with torch.enable_grad(), catcher:
            out = model(x.detach().clone().requires_grad_(True)).detach()
    finally:
        for hd in handles:
            hd.remove()
    assert not stack
    mod_names = [mod for mod, _ in catcher.found]
    sums = dict(zip(sum_layer_names(mod_names), [t for _, t in catcher.found], strict=True))
    return out, seen, sums


@torch.no_grad()
def _build_graph(model: nn.Module, x: torch.Tensor, sum_layers: bool = True) -> _Graph:
    """Record the forward pass of a float64 eval copy of ``model`` on ``x`` and check it against
    the model's own forward: every pre-activation and PFV layer (captured by hooks on the
    activation modules), every sum of two input-dependent tensors (names and values, caught by
    a torch-function mode; PFV layers exactly when ``sum_layers``) and the logits."""
    builder = _BUILDERS.get(type(model))
    if builder is None:
        raise TypeError(f"srd_oracle_ops knows no description for {type(model).__name__}")
    m = copy.deepcopy(model).double().eval()
    xd = x.detach().to(torch.float64)
    g = builder(m, _Recorder(m, xd, sum_layers))
    names = [b.out_layer for b in g.blocks if not b.is_sum]
    ref, hooked, sums = _hooked_forward(m, xd, names)
    assert set(hooked) == set(names), (sorted(hooked), sorted(names))
    all_acts = [k for k, mod in m.named_modules() if isinstance(mod, sm.ACTIVATION_TYPES)]
    assert sorted(all_acts) == sorted(names), "an activation module is missing from the graph"
    for b in g.blocks:
        if b.is_sum:
            continue
        zin, vout = hooked[b.out_layer]
        if b.channels_last:
            zin, vout = _to_cf(zin), _to_cf(vout)
        torch.testing.assert_close(b.root.ref, zin, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g.layers[b.out_layer], vout, rtol=1e-12, atol=1e-12)
    # the sums: same names in the same (forward) order, same values; PFV layers iff sum_layers
    assert list(sums) == list(g.sums), (list(sums), list(g.sums))
    for k, t in sums.items():
        torch.testing.assert_close(g.sums[k], t, rtol=1e-12, atol=1e-12)
    sum_blocks = [b.out_layer for b in g.blocks if b.is_sum]
    assert sum_blocks == (list(sums) if sum_layers else []), sum_blocks
    for k in sums:
        assert (k in g.layers) == sum_layers, k
        if sum_layers:
            assert g.layers[k] is g.sums[k]  # identity activation: v = z
    assert (g.head_layer is None) == (g.head_root is not None)
    torch.testing.assert_close(g.logits, ref, rtol=1e-12, atol=1e-12)
    return g


# ==============================================================================================
# Paths, bias shares, relevance
# ==============================================================================================

# One step of a path: (node, input index, offset, input position, output position).
_Step = tuple[_Node, int, object, Pos, Pos]
# A path (or prefix): (leaf layer name, start position, steps in forward order).
_Path = tuple[str, Pos, tuple[_Step, ...]]


class _PathMemo:
    def __init__(self) -> None:
        self.memo: dict[tuple[int, Pos], list[_Path]] = {}

    def paths(self, node: _Node, u: Pos) -> list[_Path]:
        """Every path from a leaf position to ``node``'s output position ``u``."""
        key = (id(node), u)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if isinstance(node, _Leaf):
            res: list[_Path] = [(node.name, u, ())]
        else:
            res = []
            for i, off, p in node.sources(u):
                step = (node, i, off, p, u)
                for name, p0, steps in self.paths(node.inputs[i], p):
                    res.append((name, p0, steps + (step,)))
        self.memo[key] = res
        return res


def _contribution(layers: dict[str, torch.Tensor], n: int, path: _Path) -> torch.Tensor:
    """c_π: the leaf PFV v(p) pushed through the linear parts along ``path``."""
    name, p0, steps = path
    c = layers[name][n, :, p0[0], p0[1]]
    for node, i, off, p, u in steps:
        c = node.apply(n, i, off, p, u, c)
    return c


class _Shares:
    """Bias shares b_π(r) per (entry node, sample n, entry output position r)."""

    def __init__(self, layers: dict[str, torch.Tensor], memo: _PathMemo):
        self.layers = layers
        self.memo = memo
        self.cache: dict[tuple[int, int, Pos], dict[_Path, torch.Tensor]] = {}
        self.even_splits = 0

    def get(self, node: _Node, n: int, r: Pos) -> dict[_Path, torch.Tensor]:
        key = (id(node), n, r)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        assert node.bias is not None
        prefixes = self.memo.paths(node, r)
        if not prefixes:
            raise AssertionError("a bias entry position is reached by no path; bias would be lost")
        if node.even_split:  # a head bias: evenly over its paths
            norms = [1.0] * len(prefixes)
        else:
            norms = [
                float(torch.linalg.vector_norm(_contribution(self.layers, n, pr)))
                for pr in prefixes
            ]
        total = math.fsum(norms)
        if total == 0.0:
            self.even_splits += 1
        bias = node.bias_at(n, r)
        out = {
            pr: bias * (nm / total if total > 0.0 else 1.0 / len(prefixes))
            for pr, nm in zip(prefixes, norms, strict=True)
        }
        self.cache[key] = out
        return out


def _path_vector(
    layers: dict[str, torch.Tensor], shares: _Shares, n: int, path: _Path
) -> torch.Tensor:
    """c_π(q) + b_π(q): the contribution plus every bias share the path picked up at an entry op
    on the way, carried through the later nodes' linear parts."""
    name, p0, steps = path
    c = layers[name][n, :, p0[0], p0[1]]
    b: torch.Tensor | None = None
    for j, (node, i, off, p, u) in enumerate(steps):
        c = node.apply(n, i, off, p, u, c)
        if b is not None:
            b = node.apply(n, i, off, p, u, b)
        if node.bias is not None:
            s = shares.get(node, n, u)[(name, p0, steps[: j + 1])]
            b = s if b is None else b + s
    return c if b is None else c + b


def _block_items(
    g: _Graph, block: _Block, memo: _PathMemo, shares: _Shares, n: int, q: Pos
) -> list[tuple[str, Pos, torch.Tensor]]:
    """(leaf layer, start position, c_π(q) + b_π(q)) of every path of ``block`` into ``q``;
    asserts that they add up to z(q)."""
    items = [
        (path[0], path[1], _path_vector(g.layers, shares, n, path))
        for path in memo.paths(block.root, q)
    ]
    zq = block.root.ref[n, :, q[0], q[1]]
    zsum = torch.stack([v for _, _, v in items]).sum(0) if items else torch.zeros_like(zq)
    if not torch.allclose(zsum, zq, rtol=_Z_RTOL, atol=_Z_ATOL):
        raise AssertionError(
            f"paths do not add up to z at block {block.out_layer}, n={n}, q={q}: "
            f"{zsum.tolist()} vs {zq.tolist()}"
        )
    return items


def _propagate(
    g: _Graph, seeds: dict[str, torch.Tensor], stats: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Share relevance down through every block (reverse forward order); returns the relevance
    (N, h, w) of every PFV layer. ``stats`` (if given) receives ``dropped`` (positions with
    R(q) != 0 and z(q) = 0) and ``even_splits`` (entry positions where all norms were 0)."""
    R = {
        k: torch.zeros(t.shape[0], t.shape[2], t.shape[3], dtype=torch.float64)
        for k, t in g.layers.items()
    }
    for k, s in seeds.items():
        R[k] = R[k] + s
    memo = _PathMemo()
    shares = _Shares(g.layers, memo)
    dropped = 0
    for block in reversed(g.blocks):
        r_out = R[block.out_layer]
        nb, _, ho, wo = block.root.ref.shape
        for n in range(nb):
            for qi in range(ho):
                for qj in range(wo):
                    rq = float(r_out[n, qi, qj])
                    if rq == 0.0:
                        continue
                    items = _block_items(g, block, memo, shares, n, (qi, qj))
                    zq = block.root.ref[n, :, qi, qj]
                    zz = float(zq @ zq)
                    if zz == 0.0:
                        dropped += 1
                        continue
                    for layer, p, vec in items:
                        R[layer][n, p[0], p[1]] += float(vec @ zq) / zz * rq
    if stats is not None:
        stats["dropped"] = dropped
        stats["even_splits"] = shares.even_splits
    return R


# ==============================================================================================
# Public API
# ==============================================================================================


def _logit_seed(g: _Graph, target: Target) -> torch.Tensor:
    if g.head_layer is None:
        raise ValueError(
            "the head input is not a PFV layer (sum_layers=False on a residual stream without "
            "activations): there is no logit seed map; the head is a block of its own"
        )
    v = g.layers[g.head_layer]
    t = per_sample_targets(target, v.shape[0])
    if g.head_weight.dim() == 3:  # per-sample head (LayerNorm between GAP and Linear)
        rows = torch.arange(v.shape[0])
        w = g.head_weight[rows, t]
        b = g.head_bias[rows, t]
    else:
        w = g.head_weight[t]
        b = g.head_bias[t]
    n_pos = v.shape[2] * v.shape[3]
    return (torch.einsum("nc,nchw->nhw", w, v) + b[:, None, None]) / n_pos


def _logit_block_relevance(
    g: _Graph, target: Target, stats: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Relevance of every PFV layer with the head as an affine block of its own: GAP of
    ``g.head_root`` (or of the head layer's leaf when ``head_root`` is None) -> the target's head
    row with its head bias split evenly over all its paths; the block's one output (the target
    logit) is seeded with R = logit (see the module docstring). Where the head input is a PFV
    layer this is the ordinary logit seed."""
    root = g.head_root
    if root is None:
        assert g.head_layer is not None
        root = _Leaf(g.head_layer, g.layers[g.head_layer])
    nb = int(root.ref.shape[0])
    t = per_sample_targets(target, nb)
    rows = torch.arange(nb)
    if g.head_weight.dim() == 3:
        w, b = g.head_weight[rows, t], g.head_bias[rows, t]
    else:
        w, b = g.head_weight[t], g.head_bias[t]
    node = _HeadNode(_MeanNode(root), w, b)
    logit = node.ref[:, 0, 0, 0]
    torch.testing.assert_close(logit, g.logits[rows, t], rtol=1e-12, atol=1e-12)
    assert "logit" not in g.layers
    hg = dataclasses.replace(
        g, layers={**g.layers, "logit": node.ref}, blocks=[*g.blocks, _Block("logit", node)]
    )
    rel = _propagate(hg, {"logit": logit[:, None, None]}, stats)
    del rel["logit"]
    return rel


def ops_logit_seed(
    model: nn.Module, x: torch.Tensor, target: Target, *, sum_layers: bool = True
) -> tuple[str, torch.Tensor]:
    """(last PFV layer name, (N, h, w) logit seed (w_c · v(q) + b_c) / n). ValueError where the
    head input is not a PFV layer (StreamNet with ``sum_layers=False``)."""
    g = _build_graph(model, x, sum_layers)
    seed = _logit_seed(g, target)
    assert g.head_layer is not None
    return g.head_layer, seed


def srd_oracle_ops_relevance(
    model: nn.Module,
    x: torch.Tensor,
    target: Target | None = None,
    *,
    seeds: dict[str, torch.Tensor] | None = None,
    contrastive: bool = False,
    stats: dict[str, int] | None = None,
    sum_layers: bool = True,
) -> dict[str, torch.Tensor]:
    """Relevance (N, h, w) of every PFV layer. Seed: the logit seed of ``target`` (optionally
    contrastive) or the given ``seeds`` {layer name: (N, h, w)} (exactly one of the two).
    ``sum_layers``: sums of two input-dependent tensors are PFV layers (default; False = the
    earlier definition, where a head input that is not a PFV layer makes the head a block of
    its own, seeded with the logit, and ``contrastive`` is refused for want of a seed map)."""
    g = _build_graph(model, x, sum_layers)
    if (target is None) == (seeds is None):
        raise ValueError("give either target or seeds")
    if seeds is None:
        if g.head_root is not None:
            if contrastive:
                raise ValueError("contrastive needs a seed map on a PFV layer feeding the head")
            return _logit_block_relevance(g, target, stats)  # type: ignore[arg-type]
        seed = _logit_seed(g, target)  # type: ignore[arg-type]
        seeds = {g.head_layer: contrast_seed(seed) if contrastive else seed}  # type: ignore[dict-item]
    else:
        checked = {}
        for k, s in seeds.items():
            if k not in g.layers:
                raise KeyError(f"{k!r} is not a PFV layer; known: {sorted(g.layers)}")
            t = g.layers[k]
            s = torch.as_tensor(s).to(torch.float64)
            expected = (t.shape[0], t.shape[2], t.shape[3])
            if tuple(s.shape) != expected:
                raise ValueError(f"seed shape {tuple(s.shape)} != {expected} of layer {k!r}")
            checked[k] = contrast_seed(s) if contrastive else s
        seeds = checked
    return _propagate(g, seeds, stats)


def srd_oracle_ops(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    contrastive: bool = False,
    sum_layers: bool = True,
) -> torch.Tensor:
    """SRD pixel map (N, H, W), float64, logit seed (sums to the target logit per sample when
    not contrastive and no z(q) = 0)."""
    return srd_oracle_ops_relevance(
        model, x, target, contrastive=contrastive, sum_layers=sum_layers
    )["input"]


def srd_oracle_ops_layer_seed(
    model: nn.Module,
    x: torch.Tensor,
    layer_name: str,
    seed_map: torch.Tensor,
    *,
    contrastive: bool = False,
    sum_layers: bool = True,
) -> torch.Tensor:
    """SRD pixel map (N, H, W) when the PFV layer ``layer_name`` (activation module name, sum
    layer name or ``"input"``) is seeded with ``seed_map`` (N, h, w). A one-hot seed gives the
    ERF."""
    return srd_oracle_ops_relevance(
        model, x, seeds={layer_name: seed_map}, contrastive=contrastive, sum_layers=sum_layers
    )["input"]


def pfv_layers(
    model: nn.Module, x: torch.Tensor, *, sum_layers: bool = True
) -> dict[str, tuple[int, int, int]]:
    """PFV layer name -> (C, h, w), in forward order (``"input"`` first)."""
    g = _build_graph(model, x, sum_layers)
    return {k: (int(v.shape[1]), int(v.shape[2]), int(v.shape[3])) for k, v in g.layers.items()}


def sum_layers_of(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """Every sum of two input-dependent tensors of the model's forward, by sum-layer name ->
    (C, h, w), in forward order (the PFV layers that ``sum_layers=True`` adds)."""
    g = _build_graph(model, x, True)
    return {k: (int(v.shape[1]), int(v.shape[2]), int(v.shape[3])) for k, v in g.sums.items()}


def check_forward(model: nn.Module, x: torch.Tensor, *, sum_layers: bool = True) -> dict[str, int]:
    """Brute checks of the description (raise on failure): the recorded pre-activations, PFV
    layers, sums and logits equal the model's own forward (done in the graph build); every node's
    output recomputed from its components (``Σ apply(v(p)) + bias`` at every position) equals the
    torch op's output; and at every block output position (and, where the head input is not a
    PFV layer, at every head input position) the path vectors (contributions + bias shares) add
    up to z(q). Returns counts {"nodes", "positions", "even_splits"}."""
    g = _build_graph(model, x, sum_layers)
    seen: set[int] = set()
    count = 0

    def check_node(node: _Node) -> None:
        nonlocal count
        if id(node) in seen or isinstance(node, _Leaf):
            return
        seen.add(id(node))
        for inp in node.inputs:
            check_node(inp)
        nb, _, ho, wo = node.ref.shape
        for n in range(nb):
            for ui in range(ho):
                for uj in range(wo):
                    acc = node.ref.new_zeros(node.ref.shape[1])
                    for i, off, p in node.sources((ui, uj)):
                        vin = node.inputs[i].ref[n, :, p[0], p[1]]
                        acc = acc + node.apply(n, i, off, p, (ui, uj), vin)
                    if node.bias is not None:
                        acc = acc + node.bias_at(n, (ui, uj))
                    if not torch.allclose(acc, node.ref[n, :, ui, uj], rtol=1e-10, atol=1e-12):
                        raise AssertionError(
                            f"{type(node).__name__} output differs at n={n}, u={(ui, uj)}"
                        )
        count += 1

    memo = _PathMemo()
    shares = _Shares(g.layers, memo)
    positions = 0
    blocks = list(g.blocks)
    if g.head_root is not None:
        blocks.append(_Block("<head input>", g.head_root))
    for block in blocks:
        check_node(block.root)
        nb, _, ho, wo = block.root.ref.shape
        for n in range(nb):
            for qi in range(ho):
                for qj in range(wo):
                    _block_items(g, block, memo, shares, n, (qi, qj))
                    positions += 1
    return {"nodes": count, "positions": positions, "even_splits": shares.even_splits}
