"""SRD, Sharing Ratio Decomposition (Han, Kim & Kwak, ICLR 2024).

The rule, stated once (the exact definition is ``docs/srd.md``):

* activation backward: the rank-1 map ``g -> z <v, g> / |z|^2`` per position, i.e. the PFV's
  relevance ``R = <v, g>`` (plus the bias relevance its position received) is passed to the
  pre-activation ``z`` and shared by projection onto it;
* bias ops: the relevance ``<b, g>`` of every bias is split over the paths feeding it by the norm
  of their contributions, and added to the relevance of their input positions.

Everything else (ordinary backward through conv/BN/pool/add, targets, batching, restoring the
model) is the engine's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import ops
from ..engine.channels import channel_dot, channel_norm, channel_weighted_sum, safe_divide
from ..engine.core import Rule, Target, Trace, keep_graph
from ..engine.gradmode import building_graph
from ..engine.graph import Node
from ..errors import InvalidInputError, OperationViewWarning, UnsupportedOperationError
from . import options
from .base import Method, register
from .srd_tokens import (
    check_conserved,
    known_on_tokens,
    model_structure,
    remember_no_tokens,
    remember_operation_view,
    token_relevance,
)

Tensor = torch.Tensor

SEEDS = ("auto", "logit", "gradcam")

#: below this many positions per channel a depthwise convolution's offset norms through a
#: dense layer are computed one offset at a time with the dense layer's Gram matrix
#: (:meth:`~srdxai.engine.ops.ConvOp.scaled_quadratic_norms`) instead of with K stacked ones
_QUADRATIC_POSITIONS_PER_CHANNEL = 8


class SRDRule(Rule):
    """The SRD backward rule with bias shares; see the module docstring."""

    wants_bias_ops = True
    keeps_pfv_values = True
    gate_products = True
    constant_statistics = True
    sum_layers = True

    def __init__(self, max_paths: int = 4096):
        # ``plain`` (the base class's flag) is also set while a Grad-CAM seed is computed
        # with true gradients
        self.max_paths = max_paths
        self.bias_relevance: dict[int, Tensor] = {}
        self.override: dict[int, Tensor] = {}
        self.transform: dict[int, Callable[[Tensor], Tensor]] = {}
        self.record: set[int] = set()
        self.recorded: dict[int, Tensor] = {}
        self.trace: Trace | None = None
        self._values: dict[int, Tensor] = {}

    def clear(self) -> None:
        """Drop every tensor the rule holds (seeds, recorded and pending relevance)."""
        for store in (self.bias_relevance, self.override, self.transform, self.recorded,
                      self._values):
            store.clear()

    # -- activations --------------------------------------------------------------------------
    def activation_backward(self, node, z, v, grad, fn):
        relevance = channel_dot(v, grad)
        self._values.pop(node.index, None)  # every bias op reading this layer is done
        bias = self.bias_relevance.pop(node.index, None)
        if bias is not None:
            relevance = relevance + bias
        if node.index in self.override:
            relevance = self.override[node.index].to(relevance.dtype)
        if node.index in self.transform:
            relevance = self.transform[node.index](relevance)
        if node.index in self.record:
            self.recorded[node.index] = relevance
        squares = channel_dot(z, z)
        self._route_stranded(node, squares, relevance)
        return z * safe_divide(relevance, squares).unsqueeze(1)  # share_onto(z, relevance)

    def _route_stranded(self, node: Node, squares: Tensor, relevance: Tensor) -> None:
        """Relevance on a zero pre-activation vector cannot ride the backward signal any
        further (the next layer reads it as a dot product with values that are 0 there). It
        can only have come from a bias share (a bias at a position no input reaches, split
        evenly, docs/srd.md): hand it on the same way, evenly over the paths into the
        pre-activation, or whole to the activation it is the output of (``relu(x) ** 2``,
        ``relu(0.8 * relu(x))``). Without this a map lost it without an error."""
        if self.plain or self.trace is None or node.pre is None:
            return
        stranded = (squares == 0) & (relevance != 0)
        if not _may_hold(stranded):
            return
        pre = self.trace.recorder.node_of(node.pre)
        if pre is None:
            return  # the pre-activation does not depend on the input: a constant
        rho = torch.where(stranded, relevance, torch.zeros_like(relevance))
        if pre.is_pfv:
            self._add_bias_relevance(pre, rho)
        else:
            self._split(pre, rho, even=False)

    def on_opaque(self, op: ops.OpaqueOp, out: Tensor) -> None:
        def check(grad: Tensor) -> None:
            # autograd materialises zeros for a gate's branch (the rule gives it nothing):
            # nothing reaches the operation then, so its decomposition is not needed
            if not self.plain and grad is not None and bool(torch.any(grad != 0)):
                raise op.error

        if out.requires_grad:
            out.register_hook(check)

    # -- biases -------------------------------------------------------------------------------
    def on_bias_op(self, op: ops.LinearOp, out: Tensor) -> Tensor:
        if out.requires_grad:
            out.register_hook(lambda g: self._bias_backward(op, g))
        return out

    def _bias_backward(self, op: ops.LinearOp, grad: Tensor | None) -> None:
        if self.plain or grad is None:
            # None: the rule gave this tensor nothing (a gate's own branch, such as the
            # `+ eps` of ConvNeXtV2's response normalisation): no bias relevance to split
            return None
        bias = op.bias
        if isinstance(op, ops.ConvOp) and _fused_bn(op) is not None:
            return None  # the BatchNorm after it carries this bias (docs/srd.md)
        if isinstance(op, ops.BatchNormOp):
            conv = _conv_before(op)
            if conv is not None and conv.bias is not None:
                bias = bias + conv.bias * op.scale
        rho = channel_weighted_sum(grad, bias)
        if not _may_hold(rho != 0):
            return None
        even = self.trace is not None and op in self.trace.head_ops
        self._split(op.output, rho, even)
        return None

    def _split(self, out_node: Node, rho: Tensor, even: bool) -> None:
        """Split the bias relevance ``rho`` (N, *spatial) over the paths into ``out_node``."""
        if not even and (self._split_conv_offsets(out_node, rho)
                         or self._split_through_pointwise(out_node, rho)):
            return
        weights: list[Tensor] = []
        valids: list[Tensor] = []
        routes: list[tuple[Node, tuple]] = []
        for src, steps, norm, valid in self._path_norms(out_node, even):
            routes.append((src, steps))
            valids.append(valid)
            weights.append(valid if even else norm)
            if len(routes) > self.max_paths:
                raise UnsupportedOperationError(
                    f"more than {self.max_paths} paths feed the bias of "
                    f"'{out_node.producer.name}': SRD splits every bias over the paths into it, "
                    "and here a long chain of linear operations without an activation in "
                    "between (a residual stream without activations, as in ConvNeXt and "
                    "transformers) multiplies them. Raise max_paths if you can afford it, or "
                    "explain this model with absLRP, an LRP composite or a gradient method.")
        if not routes:
            return
        total = sum(weights)
        valid_total = sum(valids)
        dead = total == 0
        if _may_hold(dead):
            # No contribution reaches these positions: split evenly over the paths that read
            # inside the input, which keeps relevance conserved (the reference gets NaN).
            weights = [torch.where(dead, v.to(w.dtype), w) for w, v in zip(weights, valids,
                                                                          strict=True)]
            total = torch.where(dead, valid_total.to(total.dtype), total)
        scale = safe_divide(rho, total)
        for (src, steps), w in zip(routes, weights, strict=True):
            share = scale * w
            for op, i, k in reversed(steps):
                share = op.component_scatter(share, i, k)
            self._add_bias_relevance(src, share)

    def _path_norms(self, out_node: Node, even: bool):
        """(source, steps, contribution norm at ``out_node``, inside-map) for every path.

        When the entry op is a convolution (possibly with its BatchNorm folded in), the last
        step's norms come from :meth:`ConvOp.offset_norms` (cheapest formula per layer).
        """
        if even:
            for src, steps, _, valid in self._paths(out_node, need_values=False):
                yield src, steps, None, valid
            return
        conv, scale = _entry_conv(out_node.producer)
        tail = ((out_node.producer, 0, 0),) if scale is not None else ()
        if conv is None or conv.inputs[0] is None:
            for src, steps, value, valid in self._paths(out_node, need_values=True):
                yield src, steps, channel_norm(value), valid
            return
        for src, steps, value, valid in self._paths(conv.inputs[0], need_values=True):
            norms = conv.offset_norms(value, scale)  # all offsets at once: (N, K, *out)
            conv.release()
            for j, k in enumerate(conv.components(0)):
                yield src, steps + ((conv, 0, k),) + tail, norms[:, j], conv.component_positions(
                    valid, 0, k)

    def _split_conv_offsets(self, out_node: Node, rho: Tensor) -> bool:
        """Fast path for the usual block ``PFV -> conv [-> BN]``: all offsets at once.

        Same result as the general path walk (tested against it); returns False when the
        block has another shape.
        """
        conv, scale = _entry_conv(out_node.producer)
        if conv is None:
            return False
        src = conv.inputs[0]
        if src is None or not src.is_pfv:
            return False
        if conv.one_path_each():
            # the only path takes the whole bias whatever its norm (an even split over one
            # path where the norm is 0): no norms to compute
            share = rho.unsqueeze(1)
        else:
            norms = conv.offset_norms(self._source_value(src), scale)
            conv.release()
            share = _shares(norms, conv.offset_inside(norms.dtype), rho)
        self._add_bias_relevance(src, conv.scatter_offsets(share))
        return True

    def _split_through_pointwise(self, out_node: Node, rho: Tensor) -> bool:
        """Fast path for a bias whose paths leave a PFV layer through one convolution and
        then pass only per-channel / per-position scales (and, at the entry, at most one 1x1
        convolution): ConvNeXt's LayerNorm shift and first dense layer after its depthwise
        convolution (``PFV -> dwconv -> LayerNorm -> Linear``).

        A LayerNorm over channels scales by ``weight / std(q)``: a channel vector times one
        number per position. So every offset ``k`` of the convolution contributes
        ``r(q) M_k v(p)`` at the entry op's output, ``M_k`` = (1x1 conv) diag(channel scales)
        (offset ``k``'s weights), and its norm is ``|r(q)| ||M_k v(p)||``: all offsets in one
        pass of :meth:`~srdxai.engine.ops.ConvOp.stacked_norms` instead of one full-size
        tensor per path. Same result as the general walk (tested against it); returns False
        when the block has another shape.
        """
        entry = out_node.producer
        post = None  # the 1x1 convolution's (C_out, C_in) matrix at the entry
        node = out_node
        if isinstance(entry, ops.ConvOp):
            if len(entry.offsets) > 1 and _plain_or_depthwise(entry):
                # a depthwise convolution reading another convolution through scales
                return self._split_through_two_convs(entry, None, None, None, rho)
            if (len(entry.offsets) != 1 or entry.groups != 1 or entry.inputs[0] is None
                    or tuple(entry.in_spatial) != tuple(entry.out_spatial)):
                return False
            post = entry.weight.reshape(entry.weight.shape[0], -1)
            node = entry.inputs[0]
        walked = _walk_pointwise(node)
        if walked is None:
            return False
        node, channel, position = walked
        if node.is_pfv:
            return False  # no convolution: a single path, the general walk is as cheap
        conv = node.producer
        src = conv.inputs[0]
        if src is None or not _plain_or_depthwise(conv):
            return False
        if tuple(conv.out_spatial) != tuple(out_node.spatial):
            return False
        if not src.is_pfv:
            return self._split_through_two_convs(conv, post, channel, position, rho)
        norms = _chain_norms(conv, self._source_value(src), post, channel)
        conv.release()
        if position is not None:
            norms = _times(norms, position.abs())
        share = _shares(norms, conv.offset_inside(norms.dtype), rho)
        self._add_bias_relevance(src, conv.scatter_offsets(share))
        return True

    def _split_through_two_convs(self, conv: ops.ConvOp, post: Tensor | None,
                                 channel: Tensor | None, position: Tensor | None,
                                 rho: Tensor) -> bool:
        """:meth:`_split_through_pointwise` when the depthwise ``conv`` reads, through more
        per-channel / per-position scales, another convolution ``first`` (groups 1) that
        reads a PFV layer (possibly through scales too): the first block of a ConvNeXt stage
        (stem, or LayerNorm -> downsampling conv; then LayerNorm -> depthwise conv ->
        LayerNorm -> dense). A path is a pair of offsets
        ``(j, k)``; per offset ``j`` of ``first``, the norms of all ``k`` come from one pass of
        :func:`_chain_norms`, either on ``first``'s offset-``j`` output (cost per position
        ~ K C_mid^2) or, when the input has few channels (the stem's 3), on the input itself
        with the composed weights' Gram matrices (~ K C_in^2)."""
        if conv.groups == 1:
            return False
        walked = _walk_pointwise(conv.inputs[0])
        if walked is None or walked[0].is_pfv:
            return False
        node, channel1, position1 = walked
        first = node.producer
        if first.groups != 1 or first.inputs[0] is None:
            return False
        # the first convolution may read its PFV layer through scales too (a LayerNorm)
        walked = _walk_pointwise(first.inputs[0])
        if walked is None or not walked[0].is_pfv:
            return False
        src, channel0, position0 = walked
        value = self._source_value(src)
        if channel0 is not None:
            value = value * channel0.to(value.dtype).reshape(1, -1, *([1] * (value.dim() - 2)))
        if position0 is not None:
            value = value * position0
        cmid, cin = first.weight.shape[:2]
        k1, k2 = len(first.offsets), len(conv.offsets)
        positions = math.prod(conv.in_spatial) * value.shape[0]
        dense = post is not None
        compose_cost = k1 * k2 * (cmid * cin * (cmid if dense else cin) + positions * cin * cin)
        direct_cost = k1 * positions * (cmid * cin + k2 * (cmid * cmid if dense else cmid))
        depth = conv.offset_weights()[:, :, 0]  # K2, C
        if channel is not None:
            depth = depth * channel.to(depth.dtype)
        compose = compose_cost < direct_cost
        gram_post = post.transpose(0, 1) @ post if dense else None  # once for every offset
        if compose:  # what sits between w1^T and w1 in each composed Gram matrix
            inner = (depth * depth).unsqueeze(2) if not dense else (
                gram_post.unsqueeze(0) * (depth.unsqueeze(2) * depth.unsqueeze(1)))
        parts = []
        for j in first.offsets:
            if compose:
                x = first.input_at_offset(value, j)
                if position1 is not None:
                    x = x * position1
                w1 = first.weight[(slice(None), slice(None), *j)]  # C_mid, C_in
                if channel1 is not None:
                    w1 = w1 * channel1.to(w1.dtype).reshape(-1, 1)
                if not dense:  # diag(d_k^2) between w1^T and w1
                    grams = w1.transpose(0, 1).unsqueeze(0) @ (inner * w1.unsqueeze(0))
                else:
                    grams = w1.transpose(0, 1).unsqueeze(0) @ inner @ w1.unsqueeze(0)
                parts.append(conv.stacked_norms(x, grams, grams=True))
            else:
                z = first.component_forward(value, 0, j, scale=channel1)
                if position1 is not None:
                    z = z * position1
                parts.append(_chain_norms(conv, z, post, channel, gram_post))
        first.release()
        conv.release()
        norms = torch.cat(parts, 1)  # (N, K1 * K2, *out), offsets of ``first`` outer
        if position is not None:
            norms = _times(norms, position.abs())
        inside = conv.offset_inside(norms.dtype).repeat(1, k1, *([1] * (norms.dim() - 2)))
        share = _shares(norms, inside, rho)
        for i, j in enumerate(first.offsets):
            mid = conv.scatter_offsets(share[:, i * k2:(i + 1) * k2])
            self._add_bias_relevance(src, first.component_scatter(mid, 0, j))
        return True

    def _add_bias_relevance(self, src: Node, spread: Tensor) -> None:
        prev = self.bias_relevance.get(src.index)
        self.bias_relevance[src.index] = spread if prev is None else prev + spread

    def _source_value(self, node: Node) -> Tensor:
        """A PFV layer's value in channels-last layout, cached until its own backward runs.

        Per-offset 1x1 convolutions and channel norms are about ten times faster on
        channels-last tensors than on NCHW ones on CPU (oneDNN reorders NCHW on every call).
        """
        value = self._values.get(node.index)
        if value is None:
            # not detached: in a backward pass with create_graph=True (a differentiable map)
            # the bias shares must depend on the activations; otherwise grad mode is off here
            value = node.tensor
            if value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            self._values[node.index] = value
        return value

    def _paths(
        self, node: Node, need_values: bool, fold: Tensor | None = None
    ) -> Iterator[tuple[Node, tuple, Any, Tensor]]:
        """Every path into ``node``: (source PFV node, steps, contribution, inside-map).

        ``fold``: a per-channel scale still to be applied to the contribution (a BatchNorm
        being folded into the convolution before it, which saves a pass over the tensor).
        """
        if node.is_pfv:
            value = self._source_value(node) if need_values else None
            if value is not None and fold is not None:
                value = value * fold
            yield node, (), value, node.tensor.new_ones((1, *node.spatial))
            return
        op = node.producer
        if need_values and fold is None and isinstance(op, ops.BatchNormOp):
            conv = _conv_before(op)
            if conv is not None:
                # Fold the scale into the convolution; the BN step itself is then identity.
                for src, steps, value, valid in self._paths(op.inputs[0], True, op.scale):
                    yield src, steps + ((op, 0, 0),), value, valid
                return
        for i, inp in enumerate(op.inputs):
            if inp is None:
                continue
            inner_fold = fold if isinstance(op, ops.ConvOp) else None
            for src, steps, value, valid in self._paths(inp, need_values):
                for k in op.components(i):
                    new_value = None
                    if need_values:
                        if isinstance(op, ops.ConvOp):
                            new_value = op.component_forward(value, i, k, scale=inner_fold)
                        else:
                            new_value = op.component_forward(value, i, k)
                            if fold is not None:
                                new_value = new_value * fold
                    yield src, steps + ((op, i, k),), new_value, op.component_positions(
                        valid, i, k)
                if isinstance(op, ops.WindowOp):
                    op.release()


def _may_hold(mask: Tensor) -> bool:
    """``mask.any()`` on a CPU; True elsewhere, where reading the answer would stall the
    device queue once per layer (the guarded work is correct for an all-False mask too)."""
    return bool(torch.any(mask)) if mask.device.type == "cpu" else True


def share_onto(z: Tensor, relevance: Tensor) -> Tensor:
    """``z * R / |z|^2`` per position (0 where ``z`` is the zero vector)."""
    sq = channel_dot(z, z)
    return z * safe_divide(relevance, sq).unsqueeze(1)


def _fused_bn(conv: ops.ConvOp) -> ops.BatchNormOp | None:
    consumers = conv.output.consumers
    if len(consumers) == 1 and isinstance(consumers[0], ops.BatchNormOp):
        return consumers[0]
    return None


def _conv_before(bn: ops.BatchNormOp) -> ops.ConvOp | None:
    src = bn.inputs[0]
    if src is not None and isinstance(src.producer, ops.ConvOp) and len(src.consumers) == 1:
        return src.producer
    return None


def _times(norms: Tensor, factor: Tensor) -> Tensor:
    """``norms * factor``, written into ``norms`` (a tensor the caller just made and owns)
    unless a differentiable map is being built: with (N, K1 * K2, *out) path norms (784 paths
    at ConvNeXt's stem block) every fresh full-size tensor costs its page faults."""
    if building_graph(norms, factor):
        return norms * factor
    return norms.mul_(factor)


def _shares(norms: Tensor, inside: Tensor, rho: Tensor) -> Tensor:
    """``rho`` split over the paths (dim 1 of ``norms``, (N, paths, *out)) in proportion to
    their norms; where every norm is 0, evenly over the paths that read inside the input
    (``inside``, 1 there), which keeps relevance conserved. ``norms`` is the caller's own
    fresh tensor and may be overwritten."""
    total = norms.sum(1, keepdim=True)
    dead = total == 0
    if _may_hold(dead):
        norms = torch.where(dead, inside.expand_as(norms), norms)
        total = torch.where(dead, inside.sum(1, keepdim=True), total)
    return _times(norms, safe_divide(rho.unsqueeze(1), total))


def _walk_pointwise(node: Node) -> tuple[Node, Tensor | None, Tensor | None] | None:
    """From ``node`` back through ops that scale each value in place, to the first PFV
    layer or convolution: (that node, product of the per-channel scales, product of the
    per-position scales); None if another op is in the way."""
    channel: Tensor | None = None
    position: Tensor | None = None
    while not node.is_pfv and not isinstance(node.producer, ops.ConvOp):
        op = node.producer
        factors = _pointwise_factors(op)
        if factors is None or len(op.inputs) != 1 or op.inputs[0] is None:
            return None
        c, r = factors
        if c is not None:
            channel = c if channel is None else channel * c
        if r is not None:
            position = r if position is None else position * r
        node = op.inputs[0]
    return node, channel, position


def _plain_or_depthwise(conv: ops.ConvOp) -> bool:
    cout, cin_g = conv.weight.shape[:2]
    return conv.groups == 1 or (cin_g == 1 and conv.groups == cout)


def _chain_norms(conv: ops.ConvOp, value: Tensor, post: Tensor | None,
                 channel: Tensor | None, gram: Tensor | None = None) -> Tensor:
    """``|| post diag(channel) W_k v(p_k(q)) ||`` for every offset ``k`` of ``conv`` (groups 1
    or depthwise) at every output position ``q``: (N, K, *out). ``post`` (C_out', C) and
    ``channel`` (C,) may be None (identity). When the quadratic form is cheaper, the Gram
    matrix of ``post`` (``gram``, if the caller already has it) is formed once and each
    offset's is ``G`` scaled by its weights."""
    w = conv.offset_weights()
    if channel is not None:
        w = w * channel.to(w.dtype).reshape(1, -1, 1)
    if conv.groups > 1:  # depthwise: M_k = post diag(d_k)
        d = w[:, :, 0]  # (K, C)
        if post is None:
            return conv.diagonal_norms(value, d)
        cout, c = post.shape
        if c < cout:
            g = post.transpose(0, 1) @ post if gram is None else gram
            # one (C, C) product per offset beats forming K Gram matrices once the map has
            # fewer than ~8 positions per channel (ConvNeXt-Tiny's stages 3 and 4: 1.2-2x)
            if value.shape[0] * math.prod(value.shape[2:]) < _QUADRATIC_POSITIONS_PER_CHANNEL * c:
                return conv.scaled_quadratic_norms(value, d, g)
            return conv.stacked_norms(value, g.unsqueeze(0) * (d.unsqueeze(2) * d.unsqueeze(1)),
                                      grams=True)
        return conv.stacked_norms(value, post.unsqueeze(0) * d.unsqueeze(1))
    if post is None:
        return conv.stacked_norms(value, w)
    if w.shape[2] < post.shape[0]:
        g = post.transpose(0, 1) @ post if gram is None else gram
        return conv.stacked_norms(value, w.transpose(1, 2) @ g @ w, grams=True)
    return conv.stacked_norms(value, post @ w)


def _pointwise_factors(op: ops.LinearOp) -> tuple[Tensor | None, Tensor | None] | None:
    """An op that scales each value in place, as (per-channel vector, per-position scalar),
    either None for 1; None if it is not such an op (or its scale does not factor so)."""
    if isinstance(op, ops.IdentityOp):
        return None, None
    if isinstance(op, ops.BatchNormOp):
        return torch.as_tensor(op.scale).reshape(-1), None
    if not isinstance(op, ops.PointwiseScale):
        return None
    if op.factors is not None:
        return op.factors
    if op.kind not in ("scale", "add_constant"):
        return None
    t = torch.as_tensor(op.scale)
    if t.numel() == 1:
        return None, t.reshape(())
    if t.dim() >= 2 and t.shape[1] == t.numel():
        return t.reshape(-1), None
    return None


def _entry_conv(op: ops.LinearOp) -> tuple[ops.ConvOp | None, Tensor | None]:
    """The convolution whose offsets carry a bias entry op's paths, and the per-channel scale
    of a BatchNorm folded into it: (conv, None) for a conv, (conv, BN scale) for a BN right
    after its conv, (None, None) otherwise."""
    if isinstance(op, ops.BatchNormOp):
        conv = _conv_before(op)
        return (conv, op.scale.reshape(-1)) if conv is not None else (None, None)
    if isinstance(op, ops.ConvOp):
        return op, None
    return None, None


def _contrast(relevance: Tensor) -> Tensor:
    """Subtract each sample's own spatial mean (the reference subtracts the batch mean)."""
    dims = tuple(range(1, relevance.dim()))
    if not dims:
        return relevance - relevance  # a single position has nothing to contrast
    return relevance - relevance.mean(dim=dims, keepdim=True)


@register("srd")
class SRD(Method):
    """Sharing Ratio Decomposition.

    Args:
        model: any CNN built from the supported operations (see ``docs/engine.md``), or a
            Vision Transformer or MLP-Mixer (a model with attention or a dense layer over the
            tokens), explained on token vectors (``methods/srd_tokens.py``: pixel maps only,
            logit seed).
        seed: ``"logit"`` (any head the engine decomposes: global pooling + dense layers,
            1x1-conv heads; the pixel map sums to the target logit), ``"gradcam"`` (the
            reference code's VGG16 seed: the Grad-CAM map of ``seed_layer``'s activation
            output), or ``"auto"`` (logit when the head is decomposed; gradcam when it only
            flattens a spatial map into dense layers, as VGG16's; any other operation the
            engine cannot decompose raises ``UnsupportedOperationError``).
        seed_layer: the PFV layer where a ``gradcam`` seed starts (default ``"low"``: the last
            spatial activation layer).
        contrastive: subtract each sample's mean from the seed map first (the reference code's
            default; off by default here so relevance is conserved).
        batch_size: explain at most this many samples at once (memory budget).
        max_paths: guard against affine blocks with too many paths (bias split cost).
        operation_view: with the logit seed, explain a model the PFV engine cannot decompose on
            the operation view, every operation a layer, with an ``OperationViewWarning``
            (default); ``False``: raise the PFV engine's ``UnsupportedOperationError`` instead.
        channels_last: run on a channels-last copy of 4-D inputs (default: yes, falling back
            to the ordinary layout if the model's code needs it); only speed changes.

    The map is signed and summed over channels: shape (N, H, W).
    """

    family = "decomposition"

    signed = True

    def __init__(
        self,
        model: nn.Module,
        seed: str = "auto",
        seed_layer: str = "low",
        contrastive: bool = False,
        batch_size: int | None = None,
        max_paths: int = 4096,
        channels_last: bool | None = None,
        operation_view: bool = True,
    ):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        self.operation_view = options.flag(operation_view, "operation_view")
        if not isinstance(seed, str) or seed not in SEEDS:
            raise InvalidInputError(f"unknown SRD seed '{seed}'; choose one of {SEEDS}.")
        self.seed = seed
        if not isinstance(seed_layer, str):
            raise InvalidInputError(
                f"seed_layer must be 'low', 'high' or a layer name (a str), got {seed_layer!r}.")
        self.seed_layer = seed_layer
        self.contrastive = options.flag(contrastive, "contrastive")
        self.max_paths = options.integer(max_paths, "max_paths")

    # -- public API ----------------------------------------------------------------------------
    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        """SRD-input: the pixel relevance map (N, H, W). Models with attention (Vision
        Transformers) or token-mixing dense layers (MLP-Mixers) are explained on token
        vectors (``methods/srd_tokens.py``)."""

        def one(x: Tensor, t: Target) -> Tensor:
            logit_seed = self.seed != "gradcam" and not self.contrastive
            known = known_on_tokens(self.model, x)
            if logit_seed and not known:
                # the PFV engine first, so that a CNN pays no probe: with the logit seed it
                # refuses any attention on the way (UnsupportedOperationError), and only then
                # is the model probed for it; what was found is kept for the next calls
                try:
                    result = self._explain(x, t)[0]
                except UnsupportedOperationError as refusal:
                    if not self._on_tokens(x):
                        if not self.operation_view:
                            raise
                        return self._on_operation_view(x, t, refusal)
                else:
                    if known is None:
                        remember_no_tokens(self.model, x)
                    return result
            elif not self._on_tokens(x):  # probed first: a transformer refuses these options
                return self._explain(x, t)[0]
            if not model_structure(self, x).token_vectors:  # remembered: a CNN's fallback
                return self._operation_view_map(x, t)
            return token_relevance(self, x, t).sum(1)

        return self._batched(inputs, target, one)

    def _on_operation_view(self, x: Tensor, target: Target,
                           refusal: UnsupportedOperationError) -> Tensor:
        """A model without attention or token mixing that the PFV engine cannot decompose
        (TResNet's space-to-depth, MobileViTV2's separable attention, a bias with more than
        ``max_paths`` paths): SRD on the operation view, every operation a layer, with an
        :class:`~srdxai.errors.OperationViewWarning`; where that view cannot decompose it
        either, both reasons in one error."""
        try:
            relevance = self._operation_view_map(x, target)
        except UnsupportedOperationError as also:
            raise UnsupportedOperationError(
                f"{refusal} (SRD on the operation view, every operation a layer, cannot "
                f"decompose it either: {also})") from refusal
        remember_operation_view(self.model, x)
        warnings.warn(OperationViewWarning(
            f"SRD's PFV engine cannot decompose this model ({str(refusal).split('. ')[0]}); "
            "it was explained on the operation view instead, every operation a layer "
            "(docs/srd.md). The map sums to the target logit; later calls on this model "
            "take this route without a warning."), stacklevel=4)
        return relevance

    def _operation_view_map(self, x: Tensor, target: Target) -> Tensor:
        """SRD on the operation view of a CNN the PFV engine cannot decompose: the view's
        rules were written for transformers and hybrids, so a map that lost relevance on the
        way is refused, never returned (:func:`~srdxai.methods.srd_tokens.check_conserved`)."""
        totals: list[Tensor] = []
        relevance = token_relevance(self, x, target, totals).sum(1)
        check_conserved(relevance, totals[-1], "SRD on the operation view")
        return relevance

    def _on_tokens(self, x: Tensor) -> bool:
        """Whether the model has attention or a dense layer over the tokens (probed once per
        model and input shape); then SRD runs on token vectors, where only the logit seed is
        defined."""
        structure = model_structure(self, x)
        tokens = structure.token_vectors
        logit_seed = self.seed != "gradcam" and not self.contrastive
        if tokens and not logit_seed:
            raise UnsupportedOperationError(
                "SRD on a transformer's token vectors starts from the target logit: "
                "seed='gradcam' and contrastive=True are defined for CNNs only; use "
                "seed='auto' or 'logit' and contrastive=False.")
        # a CNN the PFV engine refused earlier: the operation view, with the logit seed only
        return tokens or (structure.operation_view and logit_seed and self.operation_view)

    def _refuse_token_layers(self, x: Tensor) -> None:
        """Layer maps, ERFs and layer lists are the PFV engine's (probed first: the engine
        could read a transformer's token activations as 1-D maps)."""
        if model_structure(self, x).token_vectors:
            raise UnsupportedOperationError(
                "SRD's layer maps and effective receptive fields are defined here for CNN "
                "layers; on a transformer's token vectors only the pixel map is implemented "
                "(srdxai.explain(model, x, method='srd')).")

    def attribute_layer(
        self, inputs: Tensor, target: Target = None, layer: str = "low", upsample: bool = True
    ) -> Tensor:
        """The relevance of ``layer``'s PFVs (N, h, w), bilinearly upsampled to the input
        size unless ``upsample=False`` (the paper's SRD-low / SRD-high rows)."""

        def one(x: Tensor, t: Target) -> Tensor:
            self._refuse_token_layers(x)
            _, layers = self._explain(x, t, record=[layer])
            rel = layers[layer]
            if upsample and rel.dim() >= 2 and tuple(rel.shape[1:]) != tuple(x.shape[2:]):
                mode = "bilinear" if rel.dim() == 3 else "linear"
                rel = F.interpolate(rel[:, None], size=x.shape[2:], mode=mode,
                                    align_corners=False)[:, 0]
            return rel

        return self._batched(inputs, target, one)

    def erf(self, inputs: Tensor, layer: str, position: Sequence[int]) -> Tensor:
        """Effective receptive field (N, H, W) of the PFV at ``position`` of ``layer``:
        the pixel map of a one-hot relevance at that PFV."""
        position = tuple(int(p) for p in position)

        def one(x: Tensor, t: Target) -> Tensor:
            self._refuse_token_layers(x)

            def seed(trace: Trace, node: Node) -> Tensor:
                if len(position) != len(node.spatial) or any(
                    not 0 <= p < s for p, s in zip(position, node.spatial, strict=True)
                ):
                    raise InvalidInputError(
                        f"position {position} is outside layer '{node.name}' of spatial size "
                        f"{node.spatial}.")
                m = node.tensor.new_zeros((x.shape[0], *node.spatial))
                m[(slice(None), *position)] = 1.0
                return m

            return self._explain(x, None, seed_override=(layer, seed))[0]

        return self._batched(inputs, None, one)

    def layers(self, inputs: Tensor) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the PFV layers SRD sees on ``inputs`` (forward order)."""
        x = self._check(inputs[:1])
        self._refuse_token_layers(x)
        with self._guard(), Trace(self.model, x, SRDRule(self.max_paths)) as trace:
            trace.forward()
            return [(n.name, tuple(n.shape[1:])) for n in trace.pfv_layers]

    # -- the work ------------------------------------------------------------------------------
    def _explain(
        self,
        x: Tensor,
        target: Target,
        record: Sequence[str] = (),
        seed_override: tuple[str, Callable[[Trace, Node], Tensor]] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self._with_layout(x, lambda leaf: self._explain_leaf(leaf, target, record,
                                                                      seed_override))

    def _explain_leaf(self, x, target, record, seed_override):
        rule = SRDRule(self.max_paths)
        with self._guard(), Trace(self.model, x, rule) as trace:
            rule.trace = trace
            with torch.enable_grad():
                out = trace.forward()
                recorded_nodes = {name: trace.find_layer(name) for name in record}
                for node in recorded_nodes.values():
                    rule.record.add(node.index)
                if seed_override is not None:
                    layer, make_seed = seed_override
                    node = trace.find_layer(layer)
                    rule.override[node.index] = make_seed(trace, node)
                    start, start_grad = node.tensor, torch.zeros_like(node.tensor)
                else:
                    grad_out, _ = self._target_gradient(out, target)
                    start, start_grad = self._seed(trace, rule, out, grad_out)
                (gx,) = self._grad(start, x, start_grad, allow_unused=True)
                del out, start, start_grad
            if gx is None:
                gx = torch.zeros_like(x)
            pixel = (keep_graph(x) * gx).sum(1)
            bias = rule.bias_relevance.get(trace.recorder.input_node.index)
            if bias is not None:
                pixel = pixel + bias
            layers = {}
            for name, node in recorded_nodes.items():
                if node is trace.recorder.input_node:
                    layers[name] = pixel
                elif node.index in rule.recorded:
                    layers[name] = rule.recorded[node.index]
                else:
                    layers[name] = torch.zeros((x.shape[0], *node.spatial), dtype=x.dtype,
                                               device=x.device)
            rule.clear()  # a differentiable map's graph reaches the rule: no cycles through it
        return keep_graph(pixel).contiguous(), {k: keep_graph(v).contiguous() for k, v in
                                                layers.items()}

    def _seed(self, trace: Trace, rule: SRDRule, out: Tensor, grad_out: Tensor):
        seed = self.seed
        opaque = trace.opaque_on_paths()
        if seed == "auto":
            # the Grad-CAM seed is for models whose only undecomposed operation is a flatten of
            # a spatial map into dense layers (VGG16); any other operation the engine cannot
            # decompose is an error (which sends the model to the operation view), never a
            # silent change of seed
            others = [op for op in opaque if not getattr(op.error, "flatten_head", False)]
            if others:
                raise others[0].error
            seed = "gradcam" if opaque else "logit"
        if seed == "logit":
            if opaque:
                raise opaque[0].error
            if self.contrastive:
                for src in trace.head_sources:
                    rule.transform[src.index] = _contrast
            return out, grad_out
        # gradcam: true gradients down to the seed layer's output, then SRD below it. The
        # reference calls torchray's grad_cam on VGG16's conv5_3 ('features.28'), but its VGG
        # applies ReLU(inplace=True) right after: the probed tensor is overwritten, so its
        # Grad-CAM is the one of the post-activation values (and, since torch 1.13 moves
        # retained-gradient hooks along in-place ops, of their gradient). Taking the
        # pre-activation literally lets strongly negative background responses times negative
        # weights light up the background.
        node = trace.find_layer(self.seed_layer)
        if node.pre is None:
            raise InvalidInputError("the gradcam seed needs an activation layer, not the input.")
        rule.plain = True
        (gv,) = self._grad(out, node.tensor, grad_out, retain_graph=True)
        rule.plain = False
        v = keep_graph(node.tensor)
        weights = gv.mean(dim=tuple(range(2, gv.dim())), keepdim=True)
        cam = (weights * v).sum(1).clamp_min(0)
        rule.override[node.index] = cam
        if self.contrastive:
            rule.transform[node.index] = _contrast
        return node.tensor, torch.zeros_like(node.tensor)
