"""Layer-wise relevance propagation (LRP) composites for CNNs, as one rule on the engine.

Relevance flows as the backward signal, as in zennit: the backward pass starts from the target
logit (the one-hot target times the model output, zennit's default output attribution) and
the "gradient" that reaches the input *is* the relevance, so it is not multiplied by the input
afterwards. What each recorded operation does with the relevance coming from above (``R``):

=========================  ============================================================
operation                  relevance rule
=========================  ============================================================
elementwise activation     *Pass*: ``R`` unchanged (zennit's ``Pass`` for activations)
convolution / dense layer  a layer rule (below), chosen by the composite
BatchNorm after a conv or  merged into that layer (zennit's BatchNorm canonizer, done
dense layer                virtually): the layer rule runs on ``W * scale`` and
                           ``b * scale + shift`` from the layer's input to the BN output
other BatchNorm            *Pass*
residual ``a + b``         *Norm*: ``R_a = a R / s(a + b)``, ``R_b = b R / s(a + b)`` (the
                           split zennit's ResNet canonizer gets from its ``Sum`` + ``Norm``)
average pooling (also      *Norm*: ``R_x = x * J^T (R / s(z))``
adaptive / global)
max pooling, views,        the gradient (zennit hooks nothing there): max pooling sends
padding, dropout, other    ``R`` to the arg-max, views re-lay it
=========================  ============================================================

Layer rules, each exactly zennit's ``BasicHook`` formulation: with the layer input ``x``, its
positive / negative parts ``x+``, ``x-``, the weights ``W`` (``W+``, ``W-`` their clamped parts),
bias ``b`` and the stabiliser ``s(z) = z + eps * sign(z)`` (``sign(0) = +1``), ``J_V^T g`` the
transposed layer with weights ``V`` applied to ``g``:

* ``epsilon``: ``R_x = x * J_W^T (R / s(z))``, ``z`` the layer output (bias included).
* ``zplus``: ``z = W+ x+ + b+ + W- x-``; ``R_x = x+ J_{W+}^T(R/s(z)) + x- J_{W-}^T(R/s(z))``.
* ``alpha_beta``: ``alpha`` times the ``zplus`` term minus ``beta`` times its mirror image
  (``W- x+ + b- + W+ x-`` over its own denominator).
* ``gamma``: weights ``W + gamma W+`` / ``W + gamma W-`` for the positive / negative outputs
  (zennit's generalised gamma rule, also for negative inputs).
* ``zbox`` (first layer): ``z = W x - W+ l - W- h`` (bias cancels);
  ``R_x = x J_W^T(g) - l J_{W+}^T(g) - h J_{W-}^T(g)``, ``g = R / s(z)``.
* ``wsquare`` / ``flat`` (first layer): ``R_x = J_V^T (R / s(V 1 + c))`` with ``V = W**2``,
  ``c = b**2`` / ``V = 1``, ``c = 0``.

The "first layer" is the first convolution or dense layer the forward pass runs (zennit takes
the first matching module in ``named_modules()`` order; the same layer in every usual CNN).
Where the two libraries differ on purpose (zennit's merged BatchNorm still divides by
``sqrt(1 + eps)``; every ``a + b`` of two input-dependent tensors is a residual sum here, while
zennit needs a canonizer per block class) see ``tests/test_lrp.py``.

Nothing on the user's model is modified: the merges and rules are computed from the recorded
operations, and the model guard restores the train/eval flags and ``requires_grad``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import ops
from ..engine.channels import nonnegative
from ..engine.core import Rule, Target, Trace, is_differentiable, keep_graph
from ..engine.gradmode import building_graph
from ..engine.optrace import KINDS, OpCall, OpRule
from ..engine.tracer import module_label
from ..errors import InvalidInputError, UnsupportedOperationError
from . import options
from .attnlrp import sigma_detached_layer_norm
from .base import Method, checked_reduction, register

Tensor = torch.Tensor

REDUCTIONS = ("sum", "none")
FIRST_LAYER_RULES = ("zbox", "flat", "wsquare")
LAYER_RULES = ("epsilon", "zplus", "alpha_beta", "gamma") + FIRST_LAYER_RULES

# ImageNet preprocessing, (pixel in [0, 1] - mean) / std: the default ZBox bounds.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (zennit's stabiliser)."""
    return torch.where(z >= 0, z + eps, z - eps)


def ratio(r: Tensor, z: Tensor, eps: float) -> Tensor:
    """``r / stabilize(z, eps)`` in a single new tensor (bit-identical: ``-2 eps + eps`` and
    ``0 * -2 eps + eps`` are exact)."""
    den = (z < 0).to(z.dtype)
    den.mul_(-2 * eps).add_(eps).add_(z)
    if building_graph(r, z):
        return r / den  # building a differentiable map: no out= (same values)
    return torch.div(r, den, out=den)


# --- a convolution or dense layer, optionally with a BatchNorm folded in ----------------------

class _Affine:
    """The affine map of a recorded conv / dense op (BatchNorm merged when given) with the
    ability to run it with modified weights and to apply its transpose."""

    def __init__(self, op: ops.ConvOp | ops.LinearLayerOp, bn: ops.BatchNormOp | None = None):
        weight = op.weight
        bias = None if op.bias is None else op.bias.reshape(-1)
        if bn is not None:
            scale = torch.as_tensor(bn.scale).reshape(-1)
            shift = bn.bias.reshape(-1) if bn.bias is not None else torch.zeros_like(scale)
            weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
            bias = shift if bias is None else bias * scale + shift
        self.weight, self.bias = weight, bias
        self.conv = isinstance(op, ops.ConvOp)
        if self.conv:
            dims = weight.dim() - 2
            self.stride = list(op.stride)
            self.dilation = list(op.dilation)
            self.groups = op.groups
            self.zeros = [0] * dims
            kernel = weight.shape[2:]
            symmetric = tuple(
                (i + 2 * p - d * (k - 1) - 1) // s + 1
                for i, p, d, k, s in zip(op.in_spatial, op.pad_before, op.dilation, kernel,
                                         op.stride, strict=True))
            if symmetric == tuple(op.out_spatial):
                self.padding, self.pads = list(op.pad_before), None
            else:  # asymmetric ('same' with an even kernel): pad explicitly
                self.padding = self.zeros
                pads: list[int] = []
                for i, p, d, k, s, o in reversed(list(zip(op.in_spatial, op.pad_before,
                                                          op.dilation, kernel, op.stride,
                                                          op.out_spatial, strict=True))):
                    pads += [p, (o - 1) * s + d * (k - 1) + 1 - i - p]
                self.pads = pads

    def align(self, x: Tensor) -> None:
        """Lay the weights out like the input (channels-last), once, so that the modified
        weights derived from them need no conversion in every convolution."""
        if self.conv and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last
        ):
            self.weight = self.weight.contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if not self.conv:
            return F.linear(x, w, b)
        if self.pads is not None:
            x = F.pad(x, self.pads)
        return torch.ops.aten.convolution(x, w, b, self.stride, self.padding, self.dilation,
                                          False, self.zeros, self.groups)

    def transpose(self, g: Tensor, w: Tensor, like: Tensor) -> Tensor:
        """``J_w^T g``: the gradient of ``forward(x, w)`` w.r.t. ``x`` (shaped like ``like``)."""
        if not self.conv:
            return g @ w
        if self.pads is not None:
            like = F.pad(like, self.pads)
        gx = torch.ops.aten.convolution_backward(
            g, like, w, None, self.stride, self.padding, self.dilation, False, self.zeros,
            self.groups, [True, False, False])[0]
        if self.pads is not None:
            gx = F.pad(gx, [-p for p in self.pads])
        return gx


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


# --- layer rules ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LayerRule:
    """One of zennit's layer rules with its parameters (see the module docstring)."""

    name: str
    epsilon: float = 1e-6  # the stabiliser (zennit: ``epsilon`` for Epsilon, else ``stabilizer``)
    alpha: float = 2.0
    beta: float = 1.0
    gamma: float = 0.25
    low: Any = None
    high: Any = None

    @property
    def needs_z(self) -> bool:
        return self.name in ("epsilon", "gamma", "zbox")

    def relevance(self, layer: _Affine, x: Tensor, z: Tensor | None, r: Tensor) -> Tensor:
        """The relevance of the layer input ``x`` given the relevance ``r`` of its output
        ``z`` (``z`` only for rules with ``needs_z``)."""
        layer.align(x)
        return getattr(self, "_" + self.name)(layer, x, z, r)

    # Each method below is zennit's BasicHook for that rule, in closed form; ``T`` is the
    # transposed layer. Tensors returned by ``layer.transpose`` are fresh, so they are scaled
    # in place.
    def _epsilon(self, layer, x, z, r):
        return layer.transpose(ratio(r, z, self.epsilon), layer.weight, x).mul_(x)

    def _zplus(self, layer, x, z, r):
        w, b, eps = layer.weight, layer.bias, self.epsilon
        wp = w.clamp(min=0)
        if nonnegative(x):
            s = ratio(r, layer.forward(x, wp, _pos(b)), eps)
            return layer.transpose(s, wp, x).mul_(x)
        wn, xp, xn = w.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
        s = ratio(r, layer.forward(xp, wp, _pos(b)) + layer.forward(xn, wn, None), eps)
        return layer.transpose(s, wp, x).mul_(xp).add_(layer.transpose(s, wn, x).mul_(xn))

    def _alpha_beta(self, layer, x, z, r):
        w, b, eps = layer.weight, layer.bias, self.epsilon
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        if nonnegative(x):
            sp = ratio(r, layer.forward(x, wp, _pos(b)), eps)
            sn = ratio(r, layer.forward(x, wn, _neg(b)), eps)
            positive = layer.transpose(sp, wp, x).mul_(self.alpha)
            return positive.sub_(layer.transpose(sn, wn, x).mul_(self.beta)).mul_(x)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        sp = ratio(r, layer.forward(xp, wp, _pos(b)) + layer.forward(xn, wn, None), eps)
        sn = ratio(r, layer.forward(xp, wn, _neg(b)) + layer.forward(xn, wp, None), eps)
        positive = layer.transpose(sp, wp, x).mul_(xp).add_(layer.transpose(sp, wn, x).mul_(xn))
        negative = layer.transpose(sn, wn, x).mul_(xp).add_(layer.transpose(sn, wp, x).mul_(xn))
        return positive.mul_(self.alpha).sub_(negative.mul_(self.beta))

    def _gamma(self, layer, x, z, r):
        w, b, g, eps = layer.weight, layer.bias, self.gamma, self.epsilon
        wp, wn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        bp = None if b is None else b + g * b.clamp(min=0)
        bn = None if b is None else b + g * b.clamp(max=0)
        # zennit: the positive (negative) part of the relevance goes only to outputs z > 0 (< 0)
        rp, rn = (z > 0).to(r.dtype).mul_(r), (z < 0).to(r.dtype).mul_(r)
        if nonnegative(x):
            gp = ratio(rp, layer.forward(x, wp, bp), eps)
            gn = ratio(rn, layer.forward(x, wn, bn), eps)
            return layer.transpose(gp, wp, x).add_(layer.transpose(gn, wn, x)).mul_(x)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        gp = ratio(rp, layer.forward(xp, wp, bp) + layer.forward(xn, wn, None), eps)
        gn = ratio(rn, layer.forward(xp, wn, bn) + layer.forward(xn, wp, None), eps)
        inputs_pos = layer.transpose(gp, wp, x).add_(layer.transpose(gn, wn, x)).mul_(xp)
        inputs_neg = layer.transpose(gp, wn, x).add_(layer.transpose(gn, wp, x)).mul_(xn)
        return inputs_pos.add_(inputs_neg)

    def _zbox(self, layer, x, z, r):
        w, b = layer.weight, layer.bias
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        low, high = _bound(self.low, x), _bound(self.high, x)
        zz = z - (layer.forward(low, wp, _pos(b)) + layer.forward(high, wn, _neg(b)))
        s = ratio(r, zz, self.epsilon)
        bounds = layer.transpose(s, wp, x).mul_(low).add_(layer.transpose(s, wn, x).mul_(high))
        return layer.transpose(s, w, x).mul_(x).sub_(bounds)

    def _wsquare(self, layer, x, z, r):
        w2 = layer.weight * layer.weight
        b2 = None if layer.bias is None else layer.bias * layer.bias
        ones = torch.ones_like(x)
        return layer.transpose(ratio(r, layer.forward(ones, w2, b2), self.epsilon), w2, ones)

    def _flat(self, layer, x, z, r):
        w1 = torch.ones_like(layer.weight)
        ones = torch.ones_like(x)
        return layer.transpose(ratio(r, layer.forward(ones, w1, None), self.epsilon), w1, ones)


def _bound(value: Any, x: Tensor) -> Tensor:
    """A ZBox bound broadcast to ``x``: a number, a per-channel vector ``(C,)``, or a tensor
    that broadcasts to one sample (e.g. ``(1, C, 1, 1)``) or to the batch."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() == 1 and t.numel() == x.shape[1] and x.dim() > 2:
        t = t.reshape(1, -1, *([1] * (x.dim() - 2)))
    try:
        return torch.broadcast_to(t, x.shape)
    except RuntimeError:
        raise InvalidInputError(
            f"the ZBox bound of shape {tuple(t.shape)} does not broadcast to the first layer's "
            f"input {tuple(x.shape)}; give a number, one value per channel, or a tensor like "
            "(1, C, 1, 1).") from None


# --- autograd functions: the value passes, the backward is the relevance rule -----------------

class _Held:
    """What an LRP autograd function outputs and keeps (not a tensor argument, so autograd
    does not track it): the op's value (detached; handed over once by :meth:`take`, since the
    function's context must not hold its own output), its ``original`` output with the true
    graph (inside ``engine.differentiable`` only), and the rule that says which backward runs."""

    __slots__ = ("value", "original", "owner")

    def __init__(self, out: Tensor, owner: LRPRule, always_original: bool = False):
        self.value: Tensor | None = out.detach()
        self.original = out if always_original or is_differentiable() else None
        self.owner = owner

    def take(self) -> Tensor:
        value, self.value = self.value, None
        assert value is not None
        return value

    def true_vjp(self, inputs: Sequence[Tensor | None], r: Tensor) -> list[Tensor | None]:
        """The model's own backward (``differentiable``'s second differentiation). With one
        input only: for several, ``autograd.grad`` gives total derivatives, and an input that
        depends on another would be counted twice."""
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        # retain: a rule that read ``original`` put its graph into the map's graph as well
        grads = iter(torch.autograd.grad(self.original, wanted, r, allow_unused=True,
                                         retain_graph=True,
                                         create_graph=torch.is_grad_enabled()))
        return [next(grads) if t is not None and t.requires_grad else None for t in inputs]

    def z(self, saved: Tensor | None) -> Tensor | None:
        """The output for a rule that reads it: with its graph when there is one."""
        return saved if saved is None or self.original is None else self.original


class _LayerRelevance(torch.autograd.Function):
    """Output of a conv / dense layer; backward: its layer rule."""

    @staticmethod
    def forward(ctx, x, held, spec):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.held = spec, held
        value = held.take()
        ctx.save_for_backward(x, value if spec.rule.needs_z else None)
        return value

    @staticmethod
    def backward(ctx, r):  # type: ignore[override]
        if r is None:  # merged into the BatchNorm that follows: nothing comes through here
            return None, None, None
        x, z = ctx.saved_tensors
        held, spec = ctx.held, ctx.spec
        if held.owner.plain:
            return held.true_vjp([x], r)[0], None, None
        return spec.rule.relevance(_Affine(spec.op), x, held.z(z), r), None, None


class _MergedRelevance(torch.autograd.Function):
    """Output of a BatchNorm that follows a conv / dense layer: the layer rule runs on the
    merged weights from the layer's input ``x``, if the layer's output feeds only this
    BatchNorm (checked on the complete graph at backward time); otherwise the BatchNorm
    passes the relevance (zennit's ``Pass``) and the layer applies its own rule."""

    @staticmethod
    def forward(ctx, x, layer_out, held, spec):  # type: ignore[override]
        ctx.spec, ctx.held = spec, held
        value = held.take()
        ctx.save_for_backward(x, layer_out, value if spec.rule.needs_z else None)
        return value

    @staticmethod
    def backward(ctx, r):  # type: ignore[override]
        spec, held = ctx.spec, ctx.held
        x, layer_out, z = ctx.saved_tensors
        if held.owner.plain:
            return None, held.true_vjp([layer_out], r)[0], None, None
        node = spec.bn.inputs[0]
        if node is None or len(node.consumers) != 1:
            return None, r, None, None
        return spec.rule.relevance(_Affine(spec.op, spec.bn), x, held.z(z), r), None, None, None


class _Pass(torch.autograd.Function):
    """zennit's ``Pass``: the relevance goes to the input unchanged (unmerged BatchNorm)."""

    @staticmethod
    def forward(ctx, x, held):  # type: ignore[override]
        ctx.held = held
        ctx.save_for_backward(x)
        return held.take()

    @staticmethod
    def backward(ctx, r):  # type: ignore[override]
        if ctx.held.owner.plain:
            return ctx.held.true_vjp(ctx.saved_tensors, r)[0], None
        return r, None


class _SumNorm(torch.autograd.Function):
    """zennit's ``Norm`` on ``z = ca*a + cb*b``: ``R_a = ca a R / s(z)``, likewise ``R_b``."""

    @staticmethod
    def forward(ctx, a, b, held, coefficients, eps):  # type: ignore[override]
        ctx.coefficients, ctx.eps, ctx.held = coefficients, eps, held
        value = held.take()
        ctx.save_for_backward(a, b, value)
        return value

    @staticmethod
    def backward(ctx, r):  # type: ignore[override]
        a, b, z = ctx.saved_tensors
        held = ctx.held
        ca, cb = ctx.coefficients
        if held.owner.plain:
            # the partial derivatives (autograd.grad of the sum w.r.t. [a, b] would give
            # total ones: a may depend on b, as a residual branch on its shortcut)
            return ca * r, cb * r, None, None, None
        s = ratio(r, held.z(z), ctx.eps)
        ra = a * s if ca == 1 else (ca * a) * s
        rb = b * s if cb == 1 else (cb * b) * s
        return ra, rb, None, None, None


class _GlobalPoolNorm(torch.autograd.Function):
    """``Norm`` on a global average pool: ``R_x = x * (R / s(z)) / n``."""

    @staticmethod
    def forward(ctx, x, held, eps):  # type: ignore[override]
        ctx.eps, ctx.held = eps, held
        value = held.take()
        ctx.save_for_backward(x, value)
        return value

    @staticmethod
    def backward(ctx, r):  # type: ignore[override]
        x, z = ctx.saved_tensors
        held = ctx.held
        if held.owner.plain:
            return held.true_vjp([x], r)[0], None, None
        n, c = x.shape[:2]
        positions = math.prod(x.shape[2:])
        s = ratio(r, held.z(z), ctx.eps).reshape(n, c, *([1] * (x.dim() - 2))).div_(positions)
        return x * s, None, None


class _GraphNorm(torch.autograd.Function):
    """``Norm`` on any linear op (average pooling): ``R_x = x * J^T (R / s(z))`` with ``J^T``
    the op's own backward, from the original (undetached) output's graph."""

    @staticmethod
    def forward(ctx, x, held, eps):  # type: ignore[override]
        ctx.eps, ctx.held = eps, held
        value = held.take()
        ctx.save_for_backward(x, value)
        return value

    @staticmethod
    def backward(ctx, r):  # type: ignore[override]
        x, z = ctx.saved_tensors
        held = ctx.held
        if held.owner.plain:
            return held.true_vjp([x], r)[0], None, None
        s = ratio(r, held.z(z), ctx.eps)
        (jt,) = held.true_vjp([x], s)
        if not torch.is_grad_enabled():  # not building a differentiable map: free the graph
            held.original = None
        return jt * x, None, None


# --- the rule on the engine -----------------------------------------------------------------

@dataclass
class _LayerSpec:
    op: Any
    rule: LayerRule
    bn: Any = None


LayerKey = str | type
"""A key of ``layer_rules``: a module's qualified name (``"features.0"``, ``"head"``) or a
module class (``torch.nn.Conv2d``: every module of that class or a subclass)."""


@dataclass
class LRPConfig:
    """Which layer rule goes where (see :class:`LRPComposite`): ``overrides`` first (a
    module's name, then its class, in the order given), then the ``first`` layer's rule, then
    ``conv`` / ``dense`` by layer type."""

    conv: LayerRule
    dense: LayerRule
    first: LayerRule | None = None
    stabilizer: float = 1e-6  # for Norm (average pooling, residual sums)
    overrides: Sequence[tuple[LayerKey, LayerRule]] = ()
    modules: Mapping[str, nn.Module] = field(default_factory=dict)  # name -> module

    def choose(self, where: str, dense: bool, first: bool) -> LayerRule:
        """The rule of a conv (``dense`` False) or dense layer that ran in module ``where``
        (the qualified name the engine records), ``first`` if no layer ran before it."""
        if self.overrides:
            for key, rule in self.overrides:
                if isinstance(key, str) and key == where:
                    return rule
            module = self.modules.get(where)
            if module is not None:
                for key, rule in self.overrides:
                    if isinstance(key, type) and isinstance(module, key):
                        return rule
        if first and self.first is not None:
            return self.first
        return self.dense if dense else self.conv


class LRPRule(Rule):
    """LRP on the engine: activations pass relevance, linear ops get their layer rules."""

    wants_linear_ops = True
    keeps_pfv_values = False
    gate_products = True  # a gate is a constant weight: its signal takes all the relevance
    constant_statistics = True  # LayerNorm / GroupNorm pass relevance unchanged (AttnLRP's)

    def __init__(self, config: LRPConfig):
        self.config = config
        self._first_seen = False
        # id(conv / dense op) -> (its input, its rule), for a BatchNorm that follows; forward only
        self._layers: dict[int, tuple[Tensor, LayerRule]] = {}

    def reset(self) -> None:
        """Forget the forward pass's tensors (call after it, and on errors)."""
        self._layers.clear()

    def activation_backward(self, node, z, v, grad, fn):
        return grad

    def on_linear_op(self, op, inputs, out):
        with torch._C.DisableTorchFunction():
            return self._wrap(op, inputs, out)

    def _wrap(self, op: ops.LinearOp, inputs: list[Tensor | None], out: Tensor) -> Tensor:
        cfg = self.config
        if isinstance(op, ops.ConvOp | ops.LinearLayerOp):
            x = inputs[0]
            if x is None:
                return out
            dense = not isinstance(op, ops.ConvOp) or op.dense
            rule = cfg.choose(op.name, dense, first=not self._first_seen)
            self._first_seen = True
            self._layers[id(op)] = (x, rule)
            return _LayerRelevance.apply(x, _Held(out, self), _LayerSpec(op, rule))
        if isinstance(op, ops.BatchNormOp):
            x = inputs[0]
            src = op.inputs[0]
            layer = None if src is None else src.producer
            if x is None:
                return out
            if layer is not None and id(layer) in self._layers:
                layer_x, rule = self._layers[id(layer)]
                return _MergedRelevance.apply(layer_x, x, _Held(out, self),
                                              _LayerSpec(layer, rule, op))
            return _Pass.apply(x, _Held(out, self))
        if isinstance(op, ops.AddOp):
            a, b = inputs
            if a is None or b is None:
                return out
            return _SumNorm.apply(a, b, _Held(out, self), tuple(op.coefficients),
                                  cfg.stabilizer)
        if isinstance(op, ops.GlobalAvgPoolOp):
            if inputs[0] is None:
                return out
            return _GlobalPoolNorm.apply(inputs[0], _Held(out, self), cfg.stabilizer)
        if isinstance(op, ops.AvgPoolOp | ops.ResampleOp):
            if inputs[0] is None:
                return out
            return _GraphNorm.apply(inputs[0], _Held(out, self, always_original=True),
                                    cfg.stabilizer)
        if isinstance(op, ops.PointwiseScale) and op.kind in ("scale", "gate", "layernorm",
                                                                "groupnorm"):
            # y = s * x elementwise: each y carries one x's relevance, whatever s is (the
            # gradient would multiply the relevance by s)
            if inputs[0] is None:
                return out
            return _Pass.apply(inputs[0], _Held(out, self))
        return out  # max pooling, views, slices, concatenation, padding, dropout: the gradient

    def on_opaque(self, op: ops.OpaqueOp, out: Tensor) -> None:
        """An operation that computes something the rules cannot decompose (a softmax, a
        matrix product, a LayerNorm) would get the plain gradient, which is not relevance:
        refuse when the backward pass reaches it. Operations that only move values are fine."""
        if op.moves_values or not out.requires_grad:
            return

        def check(grad: Tensor) -> None:
            # zeros (a gate's branch, which the rule gives nothing) need no rule
            if not self.plain and grad is not None and bool(torch.any(grad != 0)):
                raise UnsupportedOperationError(
                    f"{type(self).__name__.replace('Rule', '')} has no layer rule for an "
                    f"operation in '{op.name}': {op.error} Leave transformer_rules at its "
                    "default (or set it True) for the rules on attention and LayerNorm.")

        out.register_hook(check)


# --- the transformer rules: every computing call (engine/optrace.py) --------------------------

class _CallLayer:
    """A recorded conv / dense call as the layer the :class:`LayerRule` formulas need (the
    same interface as :class:`_Affine`): run it with other weights, apply its transpose."""

    def __init__(self, call: OpCall):
        self.call = call
        self.weight = call.argument(1, "weight")
        self.bias = call.argument(2, "bias")
        self.conv = call.kind == "conv"

    def align(self, x: Tensor) -> None:
        pass

    def _params(self, w: Tensor, b: Tensor | None):
        weight, bias = self.weight, self.bias

        def swap(t: Tensor) -> Tensor:
            if t is weight:
                return w
            if t is bias:
                return torch.zeros_like(t) if b is None else b
            return t

        return swap

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self.call.run([x], param=self._params(w, b), func=self.call.original)

    def transpose(self, g: Tensor, w: Tensor, like: Tensor) -> Tensor:
        if not self.conv:
            return g @ w  # F.linear: y = x W^T over the last axis
        return self.call.vjp([like], g, param=self._params(w, None),
                             func=self.call.original)[0]


class _MergedCallLayer(_CallLayer):
    """A recorded conv / dense call with the eval BatchNorm that directly follows it merged
    in, as the CNN rules merge it (:class:`_Affine`, zennit's canonizer): weight ``W * s``
    per output channel, bias ``b * s + t``, with ``s`` and ``t`` BatchNorm's scale and shift.
    The layer rules then see the BatchNorm's output as the layer's ``z``."""

    def __init__(self, call: OpCall, bn: OpCall):
        super().__init__(call)
        self._original = (self.weight, self.bias)
        scale, shift = bn.batch_norm_affine()  # merged only with running statistics
        weight = self.weight
        self.weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        self.bias = shift if self.bias is None else self.bias * scale + shift

    def _params(self, w: Tensor, b: Tensor | None):
        weight, bias = self._original

        def swap(t: Tensor) -> Tensor:
            if t is weight:
                return w
            if t is bias:  # the merged bias is added after the call
                return torch.zeros_like(t)
            return t

        return swap

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        out = self.call.run([x], param=self._params(w, None), func=self.call.original)
        if b is None:
            return out
        return out + (b.reshape(-1, *([1] * (out.dim() - 2))) if self.conv else b)


class TransformerLRPRule(OpRule):
    """The LRP composites on every computing call, for models the CNN rules cannot decompose
    (attention, LayerNorm over tokens). Relevance is the backward signal; per call kind
    (``s(z)``: the stabiliser, ``J``: the call's Jacobian, ``y``: its output):

    * conv / dense layer: the composite's layer rule (``LRPConfig.choose``);
    * LayerNorm: ``R_x = x * J^T (R / s(y))`` with the standard deviation constant and the
      centring kept (AttnLRP's LayerNorm rule); ``F.normalize`` the same with the norm
      constant (Swin V2's cosine attention);
    * softmax: ``R_x = x * J^T (R / s(y))``, the true Jacobian (AttnLRP's softmax rule);
    * matrix product or elementwise product of two input-dependent tensors: each operand
      ``x_i * J_i^T (R / s(y)) / 2`` (AttnLRP's uniform rule);
    * sums, differences, means, average pooling, upsampling, products with constants:
      ``R_x = x * J^T (R / s(y))`` (zennit's ``Norm``: a constant added keeps its share);
    * eval BatchNorm right after a conv / dense layer whose output nothing else uses: merged
      into that layer, as the CNN rules merge it (zennit's canonizer), so the layer rule sees
      the BatchNorm's output as its ``z`` (passing ``R`` through the BatchNorm alone and
      dividing by the convolution's own output blew the epsilon rule up, 1e12 times the logit
      on a ResNet18);
    * elementwise activations, multiplication by a number, other BatchNorms: ``R`` passes
      unchanged;
    * max pooling and calls that only move values: the gradient (relevance moves with them).

    A division by an input-dependent tensor has no rule and is refused.
    """

    kinds = frozenset(KINDS)

    def __init__(self, config: LRPConfig):
        self.config = config
        self.first_layer: int | None = None  # index of the first conv / dense call
        # id(output) -> (weak reference to it, the conv / dense call that made it)
        self._layer_outputs: dict[int, tuple[weakref.ref, OpCall]] = {}
        self._uses: dict[int, int] = {}  # conv / dense call index -> calls reading its output
        self._merged: dict[int, tuple[OpCall, Tensor]] = {}  # call index -> (BatchNorm, y)

    def _layer_of(self, t: Tensor) -> OpCall | None:
        entry = self._layer_outputs.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def on_call(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        for t in inputs:
            layer = self._layer_of(t)
            if layer is not None:
                self._uses[layer.index] += 1
        if call.kind in ("conv", "linear"):
            if self.first_layer is None:
                self.first_layer = call.index
            self._layer_outputs[id(output)] = (weakref.ref(output), call)
            self._uses[call.index] = 0
        if call.kind == "batch_norm" and len(inputs) == 1:
            layer = self._layer_of(inputs[0])
            if layer is not None and call.batch_norm_affine() is not None:
                self._merged[layer.index] = (call, output)
        divisor = 0 if call.original is Tensor.__rtruediv__ else 1
        if call.kind == "div" and call.is_input(divisor, "other"):
            raise UnsupportedOperationError(
                f"the LRP composites have no rule for a division by an input-dependent tensor "
                f"(in module '{call.name}'). Use method='abslrp' or a gradient method.")
        return output

    def op_backward(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
                    grad: Tensor) -> Sequence[Tensor | None]:
        kind, r = call.kind, grad
        if kind in ("conv", "linear"):
            if len(inputs) != 1 or not call.is_input(0, "input"):
                raise UnsupportedOperationError(
                    f"the LRP composites have no rule for a {kind} layer whose weights depend "
                    f"on the input (in module '{call.name}').")
            rule = self.config.choose(call.name, dense=kind == "linear",
                                      first=call.index == self.first_layer)
            merged = self._merged.get(call.index)
            if merged is not None and self._uses[call.index] == 1:
                bn, y = merged  # r is the BatchNorm output's relevance, passed unchanged
                return [rule.relevance(_MergedCallLayer(call, bn), inputs[0], y.detach(), r)]
            return [rule.relevance(_CallLayer(call), inputs[0], output, r)]
        if kind in ("activation", "batch_norm", "scale"):
            return [r]
        if kind == "max_pool":
            return call.vjp(inputs, r, func=call.original)
        func = (sigma_detached_layer_norm if kind == "layer_norm"
                else call.func if kind == "normalize"  # the norm constant
                else call.original)
        grads = call.vjp(inputs, ratio(r, output, self.config.stabilizer), func=func)
        relevance = [x * g for x, g in zip(inputs, grads, strict=True)]
        if len(inputs) == 2 and kind in ("matmul", "mul"):
            relevance = [t / 2 for t in relevance]
        return relevance


# --- the methods ----------------------------------------------------------------------------

class LRPComposite(Method):
    """Shared machinery of the LRP composites; subclasses set the layer rules.

    Options: ``epsilon`` (the Epsilon rule's stabiliser, default 1e-6 as zennit),
    ``stabilizer`` (every other rule's, 1e-6), ``gamma`` (0.25), ``alpha``/``beta`` (2, 1),
    ``first_layer`` (``"zbox"``, ``"flat"``, ``"wsquare"`` or None: the rule of the first
    conv / dense layer the input meets), ``low``/``high`` (ZBox bounds in the first layer's
    input space: numbers, one value per channel or a broadcastable tensor; default the
    ImageNet-normalised pixel range ``((0 - mean) / std, (1 - mean) / std)`` per channel),
    ``channel_reduce`` (``"sum"``: (N, H, W); ``"none"``: (N, C, H, W)),
    ``layer_rules`` (overrides: ``{key: rule name}``, a key a module's qualified name or a
    module class, a rule one of ``LAYER_RULES``; e.g. ``{"head": "zplus", nn.Conv2d:
    "gamma"}``; a name beats a class, classes are tried in the order given),
    ``transformer_rules`` (None: automatic; True: :class:`TransformerLRPRule` on every
    computing call, the rules for attention and LayerNorm over tokens; False: the CNN rules,
    refusing what they cannot decompose). Automatic picks the transformer rules when a
    computing operation the CNN rules cannot decompose lies on a path from the input to the
    output (a vision transformer's attention), decided once per input shape.

    A callable target is seeded with ``d objective / d output * output``.
    """

    family = "relevance"

    conv_rule = "zplus"
    dense_rule = "epsilon"
    default_first_layer: str | None = None
    signed = True

    def __init__(self, model, epsilon: float = 1e-6, stabilizer: float = 1e-6,
                 gamma: float = 0.25, alpha: float = 2.0, beta: float = 1.0,
                 first_layer: str | None = "default", low: Any = None, high: Any = None,
                 channel_reduce: str | None = None,
                 layer_rules: Mapping[LayerKey, str] | None = None,
                 transformer_rules: bool | None = None, batch_size: int | None = None,
                 channels_last: bool | None = None):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        reduce = checked_reduction(channel_reduce, REDUCTIONS, "sum")
        if transformer_rules not in (None, True, False):
            raise InvalidInputError(
                f"transformer_rules must be None (automatic), True or False, got "
                f"{transformer_rules!r}.")
        self.transformer_rules = transformer_rules
        self._routes: dict[tuple, bool] = {}  # input shape -> transformer rules?
        self.layer_rules = self._checked_layer_rules(model, layer_rules)
        if first_layer == "default":
            first_layer = self.default_first_layer
        if first_layer is not None and (not isinstance(first_layer, str)
                                        or first_layer not in FIRST_LAYER_RULES):
            raise InvalidInputError(
                f"first_layer must be one of {FIRST_LAYER_RULES} or None, got {first_layer!r}.")
        epsilon = options.real(epsilon, "epsilon", 0)
        stabilizer = options.real(stabilizer, "stabilizer", 0, above=True)
        gamma = options.real(gamma, "gamma", 0)
        alpha, beta = options.real(alpha, "alpha", 0), options.real(beta, "beta", 0)
        if abs(alpha - beta - 1) > 1e-12:
            raise InvalidInputError(
                f"alpha and beta must be >= 0 with alpha - beta = 1, got {alpha}, {beta}.")
        if (low is None) != (high is None):
            raise InvalidInputError("give both low and high for the ZBox rule, or neither.")
        if low is not None:
            try:
                inverted = bool(torch.any(torch.as_tensor(low) > torch.as_tensor(high)))
            except (TypeError, ValueError, RuntimeError) as error:
                raise InvalidInputError(
                    f"low and high must be numbers or tensors that broadcast together: "
                    f"{error}") from None
            if inverted:
                raise InvalidInputError(
                    "the ZBox bounds need low <= high (the input range, e.g. the normalised "
                    f"pixel range); got low={low!r}, high={high!r}.")
        self.channel_reduce = reduce
        self.first_layer = first_layer
        self.epsilon, self.stabilizer = epsilon, stabilizer
        self.gamma, self.alpha, self.beta = gamma, alpha, beta
        self.low, self.high = low, high

    @staticmethod
    def _checked_layer_rules(model: nn.Module, layer_rules: Mapping[LayerKey, str] | None
                             ) -> list[tuple[LayerKey, str]]:
        if layer_rules is None:
            return []
        if not isinstance(layer_rules, Mapping):
            raise InvalidInputError(
                "layer_rules must be a dict {module name or module class: rule name}, got "
                f"{type(layer_rules).__name__}.")
        names = {n for n, _ in model.named_modules()} if isinstance(model, nn.Module) else set()
        checked = []
        for key, rule in layer_rules.items():
            if rule not in LAYER_RULES:
                raise InvalidInputError(
                    f"layer_rules[{key!r}] = {rule!r} is not a layer rule; choose one of "
                    f"{LAYER_RULES}.")
            if isinstance(key, str):
                if key not in names:
                    close = sorted(n for n in names if n and (key in n or n in key))[:8]
                    raise InvalidInputError(
                        f"layer_rules names the module '{key}', which the model does not have"
                        + (f" (did you mean one of {close}?)" if close else "")
                        + "; use the qualified names of model.named_modules().")
            elif not (isinstance(key, type) and issubclass(key, nn.Module)):
                raise InvalidInputError(
                    f"a layer_rules key must be a module name (str) or a module class "
                    f"(e.g. torch.nn.Conv2d), got {key!r}.")
            checked.append((key, rule))
        return checked

    def _layer_rule(self, name: str, low: Any = None, high: Any = None) -> LayerRule:
        eps = self.epsilon if name == "epsilon" else self.stabilizer
        return LayerRule(name, epsilon=eps, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                         low=low, high=high)

    def _bounds(self, x: Tensor) -> tuple[Any, Any]:
        """The ZBox bounds: the user's, or the ImageNet-normalised pixel range."""
        if self.low is not None:
            return self.low, self.high
        if x.shape[1] != 3:
            raise InvalidInputError(
                "the ZBox rule needs the input range: pass low= and high= (the default is the "
                "ImageNet-normalised range of 3-channel images).")
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)
        return (0 - mean) / std, (1 - mean) / std

    def _config(self, x: Tensor) -> LRPConfig:
        def rule(name: str) -> LayerRule:
            if name == "zbox":
                return self._layer_rule(name, *self._bounds(x))
            return self._layer_rule(name)

        # every module under the label the engine records its calls with
        modules = {module_label(name, m): m for name, m in self.model.named_modules()}
        return LRPConfig(conv=rule(self.conv_rule), dense=rule(self.dense_rule),
                         first=None if self.first_layer is None else rule(self.first_layer),
                         stabilizer=self.stabilizer,
                         overrides=[(key, rule(name)) for key, name in self.layer_rules],
                         modules=modules)

    def _reduce(self, relevance: Tensor) -> Tensor:
        if self.channel_reduce == "none":
            return relevance.contiguous()
        return relevance.sum(1).contiguous()

    def _use_transformer_rules(self, leaf: Tensor) -> bool:
        """Whether a computing operation the CNN rules cannot decompose lies on a path from
        the input to the output (one probe pass on one sample, once per input shape)."""
        if self.transformer_rules is not None:
            return self.transformer_rules
        key = (tuple(leaf.shape[1:]), leaf.dtype, leaf.device, leaf.is_contiguous())
        if key not in self._routes:
            probe = Rule()
            # the CNN rules' recording, without their layer rules
            probe.gate_products = LRPRule.gate_products
            probe.constant_statistics = LRPRule.constant_statistics
            with self._guard(), torch.no_grad(), Trace(self.model, leaf[:1].detach(),
                                                       probe) as trace:
                trace.forward()
                self._routes[key] = any(not op.moves_values
                                        for op in trace.opaque_on_paths())
        return self._routes[key]

    def relevance(self, x: Tensor, target: Target) -> Tensor:
        """Input relevance ``(N, C, ...)`` for one chunk (no batching, no reduction)."""
        config = self._config(x)

        def run(leaf: Tensor) -> Tensor:
            if self._use_transformer_rules(leaf):
                (rel,) = self._traced_gradients(
                    leaf, TransformerLRPRule(config),
                    lambda out: [self._target_gradient(out, target)[0] * keep_graph(out)])
                return keep_graph(rel).contiguous()
            rule = LRPRule(config)
            try:
                with self._guard(), torch.enable_grad(), Trace(self.model, leaf, rule) as trace:
                    out = trace.forward()
                    rule.reset()
                    grad_out, _ = self._target_gradient(out, target)
                    seed = grad_out * keep_graph(out)
                    (rel,) = self._grad(out, leaf, seed, allow_unused=True)
                    del out
            finally:
                rule.reset()
            if rel is None:
                return torch.zeros_like(leaf).contiguous()
            return keep_graph(rel).contiguous()

        return self._with_layout(x, run)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self._batched(inputs, target,
                             lambda x, t: self._reduce(self.relevance(x, t)))


@register("lrp_epsilon_plus")
class LRPEpsilonPlus(LRPComposite):
    """LRP EpsilonPlus (zennit's composite): z+ for convolutions, epsilon for dense layers.

    Rules per layer type: convolutions z+; dense layers epsilon (``epsilon``, 1e-6); average
    pooling and residual sums Norm; activations and unmerged BatchNorm Pass (a BatchNorm
    after a conv / dense layer is merged into it); max pooling, views and padding the
    gradient. ``first_layer="flat"`` gives zennit's EpsilonPlusFlat. Signed; channels summed
    to (N, H, W) (``channel_reduce="none"``: (N, C, H, W)).
    """

    conv_rule = "zplus"
    dense_rule = "epsilon"


@register("lrp_epsilon_gamma_box")
class LRPEpsilonGammaBox(LRPComposite):
    """LRP EpsilonGammaBox (zennit's composite): ZBox first layer, gamma convs, epsilon dense.

    Rules per layer type: the first conv / dense layer ZBox (``low``, ``high``: default the
    ImageNet-normalised pixel range); other convolutions gamma (``gamma``, 0.25); dense layers
    epsilon (``epsilon``, 1e-6); average pooling and residual sums Norm; activations and
    unmerged BatchNorm Pass (a BatchNorm after a conv / dense layer is merged into it); max
    pooling, views and padding the gradient. Signed; channels summed to (N, H, W)
    (``channel_reduce="none"``: (N, C, H, W)).
    """

    conv_rule = "gamma"
    dense_rule = "epsilon"
    default_first_layer = "zbox"


@register("lrp_zplus")
class LRPZPlus(LRPComposite):
    """LRP-z+ (the SRD paper's baseline): z+ for every convolution and dense layer.

    Rules per layer type: convolutions and dense layers z+ (zennit's ``ZPlus`` hook on both;
    zennit ships no such composite); average pooling and residual sums Norm; activations and
    unmerged BatchNorm Pass (a BatchNorm after a conv / dense layer is merged into it); max
    pooling, views and padding the gradient. Signed (negative only through negative inputs of
    the first layer or a negative target logit); channels summed to (N, H, W)
    (``channel_reduce="none"``: (N, C, H, W)).
    """

    conv_rule = "zplus"
    dense_rule = "zplus"


@register("lrp_alpha_beta")
class LRPAlphaBeta(LRPComposite):
    """LRP alpha-beta (zennit's EpsilonAlpha2Beta1): alpha-beta convs, epsilon dense layers.

    Rules per layer type: convolutions alpha-beta (``alpha=2``, ``beta=1``; alpha - beta must
    be 1); dense layers epsilon (``epsilon``, 1e-6); average pooling and residual sums Norm;
    activations and unmerged BatchNorm Pass (a BatchNorm after a conv / dense layer is merged
    into it); max pooling, views and padding the gradient. Signed; channels summed to
    (N, H, W) (``channel_reduce="none"``: (N, C, H, W)).
    """

    conv_rule = "alpha_beta"
    dense_rule = "epsilon"


@register("lrp_epsilon")
class LRPEpsilon(LRPComposite):
    """LRP-epsilon with layer rules: epsilon for every convolution and dense layer.

    Rules per layer type: convolutions and dense layers epsilon (``epsilon``, 1e-6; a
    BatchNorm after a conv / dense layer is merged into it, so its shift counts as bias);
    average pooling and residual sums Norm; activations and unmerged BatchNorm Pass; max
    pooling, views and padding the gradient. Unlike ``epsilon_lrp`` (the modified chain rule,
    which stabilises at the activations) this is zennit's per-layer Epsilon hook. Signed;
    channels summed to (N, H, W) (``channel_reduce="none"``: (N, C, H, W)).
    """

    conv_rule = "epsilon"
    dense_rule = "epsilon"
