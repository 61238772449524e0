"""absLRP (relative absolute magnitude LRP, "RAMP"; Vukadin et al., ACM TIST 2024) on the
operation-level engine (``engine/optrace.py``), for CNNs and Vision Transformers.

The kernel, for every computing call ``y = f(x_1, ..., x_n; theta)`` of the forward pass::

    g     = R_y / (|y| + 1e-9)
    R_x_i = N1( x_i * J_i^T g  +  |x_i| * Jabs_i^T g )

with ``J_i`` the Jacobian of ``f`` w.r.t. ``x_i``, ``Jabs_i`` that of ``f_abs`` (the same call
with every parameter replaced by its absolute value) at ``|x|``, and ``N1(v) = v / (sum |v| +
1e-9)`` per sample. This is the reference implementation's ``x * grad(y + f_abs(|x|))`` with
``R / |y|`` as the output gradient, written without the extra forward pass of ``f_abs``. Every
input is normalised separately, so a residual ``a + b`` weights its branch and its shortcut 1:1
and ``q @ k^T`` gives ``q`` and ``k`` one unit each.

Per call (what ``f_abs`` means):

* convolution, dense layer: ``|W|``, ``|b|`` (closed form: two transposed products);
* BatchNorm (eval): ``|gamma|``, ``|beta|``, running statistics as they are;
* LayerNorm: mean and variance constant (detached); ``f_abs`` normalises ``|x|`` with its own
  detached statistics and ``|gamma|``, ``|beta|``;
* softmax: maximum and denominator constant; ``f_abs`` is the same softmax of ``|x|``;
* matrix product of two activations (``q @ k^T``, ``attn @ v``; also inside
  ``F.scaled_dot_product_attention``, which is split into its three steps): ``|a| @ |b|``;
* ``+`` / ``-`` / ``*`` / ``/`` of activations or of an activation and a parameter (position
  embedding, LayerScale): the same call on absolute values (a parameter gets no relevance);
* elementwise activations (ReLU, GELU, ...): ``f(|x|)``, so ``R_x = N1((x f'(x) + |x|
  f'(|x|)) g)``;
* max pooling: without the division by ``|y|`` (the reference's VGG rule,
  ``max_pool_divide=True`` divides); average / adaptive pooling, means and sums: the kernel.

Calls that only move values (views, permutes, indexing, concatenation, eval dropout) pass the
relevance as it is, and so does multiplication by a number (``q * scale``).

**Differences from the reference code** (``abslrp_gae/``, HEAD 130e4e1), on purpose:

* the reference applies the kernel to every leaf module its rule set does not claim: on its
  ViT eval ``Dropout`` and the class-token pool ``x[:, 0]`` (a wrapper module; ``nn.Identity``
  placeholders such as ``q_norm`` / ``ls1`` / ``fc_norm`` pass through there), on VGG and
  ResNet also ``nn.Identity`` placeholders and the ``nn.Flatten`` around the classifier. On an
  identity the kernel gives ``2 R`` where the value is positive and ``0`` where it is
  negative, so the reference drops the relevance of negative entries at every dropout and of
  negative class-token channels, and the result depends on whether a model's code contains a
  no-op module. An identity should pass relevance unchanged; here it does.
* residual sums use the local rule (each input its own term), as the paper-era code did by
  detaching both inputs; the reference at HEAD takes one ``autograd.grad`` over both inputs,
  so the shortcut also receives the gradient through the whole branch it feeds.
* the reference sets ``max_pool_divide=False`` only in its VGG rule (ResNet's stem max pool
  divides); here one option holds for every max pool.

``variant="intline"`` is the paper-era rule (``ramp_gae/``, ``new_intline_rule``): the same
kernel, but the positive and the negative part of ``R_y`` travel as separate streams, each
normalised and then given back its mass, ``R_x = sum(R_y+) N1(T(R_y+)) + |sum(R_y-)| N1(T(R_y-))``;
the two inputs of a two-input call share each stream's mass in proportion to their summed raw
terms instead of getting one unit each. Positive and negative mass are conserved per layer.
Not reproduced from the paper-era code: its per-module absolute branches (LayerNorm
``|(x - mu) / sigma| |gamma| + |beta|``, softmax with ``f_abs = f``, two-stage BatchNorm); both
variants use the current ones. Its stabiliser was ``1e-9`` only where ``y == 0``.

The output relevance is contrastive by default, as in the reference (CLRP):
``R = N1(explain(onehot(t))) - N1(explain(uniform over the other classes))``, one forward pass
and two backward passes. ``contrastive=False`` returns the first term. The reference then
divides each map by its maximum absolute value; here the raw difference is returned (a
positive per-sample scale, which changes no ranking).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..engine.channels import is_channels_last, nonnegative
from ..engine.core import Target
from ..engine.gradmode import building_graph
from ..engine.optrace import ADD, KINDS, OpCall, OpRule
from ..errors import InvalidInputError
from . import options
from .base import Method, checked_reduction, register

Tensor = torch.Tensor

#: the reference's only stabiliser
EPS = 1e-9
REDUCTIONS = ("sum", "none")
VARIANTS = ("abslrp", "intline")


def unit_mass(v: Tensor, scratch: Scratch | None = None) -> Tensor:
    """``v / (sum |v| + 1e-9)`` per sample (the reference's ``SUM_TO_ONE``), in place
    (out of place while a differentiable map is built). ``scratch`` makes the sums faster."""
    if v.dim() == 0:
        return v
    dims = tuple(range(1, v.dim()))
    if not dims:
        total = v.abs()
    elif scratch is not None:
        total = scratch.l1(v, dims)
    else:
        total = torch.linalg.vector_norm(v, 1, dim=dims, keepdim=True)
    if building_graph(v):
        return v / (total + EPS)  # building a differentiable map: ``total`` read ``v``
    return v.div_(total.add_(EPS))


def _dense(t: Tensor) -> bool:
    """Contiguous or channels-last: non-overlapping entries, no gaps."""
    return t.is_contiguous() or is_channels_last(t)


class Scratch:
    """Reusable buffers for the rule's short-lived temporaries, one per named slot.

    On CPU a fresh buffer per call costs page faults whenever it is larger than what the
    allocator keeps (VGG16's first layers hold 100 MB per tensor at batch 8), and
    ``torch.linalg.vector_norm(v, 1)`` is 2-5x slower than ``|v|`` written into a buffer and
    summed. So the rule keeps one buffer per slot, as large as the largest tensor it held,
    for its lifetime (one explain call). A slot's contents are valid until the slot is asked
    for again; nothing returned to autograd may alias one."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def like(self, slot: str, v: Tensor) -> Tensor | None:
        """A tensor with ``v``'s shape, strides, dtype and device in the slot's buffer; None
        when ``v`` is not dense (non-overlapping, contiguous or channels-last) or grad mode
        is on (a differentiable map is being built: autograd may keep any operand)."""
        if not _dense(v) or torch.is_grad_enabled():
            return None
        # the buffer's first numel entries, laid out as ``v`` is (both are dense)
        return self._buffer(slot, v)[:v.numel()].as_strided(v.shape, v.stride())

    def _buffer(self, slot: str, v: Tensor) -> Tensor:
        """The slot's flat buffer, at least as large as ``v``, of its dtype and device."""
        buffer = self._buffers.get(slot)
        if (buffer is None or buffer.numel() < v.numel() or buffer.dtype != v.dtype
                or buffer.device != v.device):
            buffer = self._buffers[slot] = torch.empty(v.numel(), dtype=v.dtype,
                                                       device=v.device)
        return buffer

    def l1(self, v: Tensor, dims: tuple[int, ...]) -> Tensor:
        """``sum |v|`` over ``dims`` (kept); float64 keeps ``vector_norm``, the faster there."""
        view = None if v.dtype == torch.float64 else self.like("l1", v)
        if view is None:
            return torch.linalg.vector_norm(v, 1, dim=dims, keepdim=True)
        return torch.abs(v, out=view).sum(dims, keepdim=True)

    def contiguous(self, slot: str, v: Tensor) -> Tensor:
        """``v`` itself when it is contiguous, else a contiguous copy in the slot's buffer
        (a fresh one while grad mode is on)."""
        if v.is_contiguous():
            return v
        if torch.is_grad_enabled():
            return v.contiguous()
        buffer = self._buffer(slot, v)
        return buffer[:v.numel()].view(v.shape).copy_(v)

    def _elementwise(self, slot: str, func, v: Tensor, **kwargs) -> Tensor:
        """``func(v, **kwargs)``, written into the slot's buffer where it can be (a fresh
        tensor otherwise)."""
        view = self.like(slot, v)
        return func(v, **kwargs) if view is None else func(v, **kwargs, out=view)

    def absolute(self, slot: str, v: Tensor) -> Tensor:
        """``|v|``, in the slot's buffer where it can be."""
        return self._elementwise(slot, torch.abs, v)

    def positive(self, slot: str, v: Tensor) -> Tensor:
        """``v+`` (``clamp(min=0)``), in the slot's buffer where it can be."""
        return self._elementwise(slot, torch.clamp, v, min=0)

    def negative(self, slot: str, v: Tensor) -> Tensor:
        """``min(v, 0)``, in the slot's buffer where it can be."""
        return self._elementwise(slot, torch.clamp, v, max=0)

    def matmul(self, slot: str, a: Tensor, b: Tensor, like: Tensor) -> Tensor:
        """``a @ b``, in the slot's buffer when ``like`` (a contiguous tensor of the
        product's shape) is given one (never while grad mode is on: :meth:`like`)."""
        view = self.like(slot, like) if like.is_contiguous() else None
        return a @ b if view is None else torch.matmul(a, b, out=view)

    def denominator(self, output: Tensor, nonnegative: bool = False) -> Tensor:
        """``|y| + eps`` (``y + eps`` for a ``nonnegative`` output: the same values), in the
        ``denominator`` slot where it can be."""
        if nonnegative:
            return self._elementwise("denominator", torch.add, output, other=EPS)
        return self.absolute("denominator", output).add_(EPS)

    def clear(self) -> None:
        self._buffers.clear()


def _conv_transpose(call: OpCall, g: Tensor, like: Tensor, weight: Tensor) -> Tensor | None:
    """``J^T g`` of a recorded convolution with ``weight``; None for string padding."""
    stride = call.argument(3, "stride", 1)
    padding = call.argument(4, "padding", 0)
    dilation = call.argument(5, "dilation", 1)
    groups = call.argument(6, "groups", 1)
    if isinstance(padding, str):
        return None
    dims = like.dim() - 2

    def tup(v):
        return list(v) if isinstance(v, list | tuple) else [v] * dims

    if (dims == 2 and groups == 1 and tup(stride) == list(weight.shape[2:])
            and weight.shape[2:].numel() > 1  # a 1x1 one: oneDNN's is as fast, no copies
            and tup(padding) == [0, 0] and tup(dilation) == [1, 1]):
        return _patch_transpose(g, like, weight)
    return torch.ops.aten.convolution_backward(
        g, like, weight, None, tup(stride), tup(padding), tup(dilation), False, [0] * dims,
        groups, [True, False, False])[0]


def _derived_weight(w: Tensor, variant: str, out: Tensor | None = None) -> Tensor:
    """``w`` (``variant`` "plain"), ``|w|`` ("abs"), ``2 w+`` ("pos2": the doubled positive
    part, exact, a power of two) or ``[w, |w|]`` along the input channels ("stacked"); "abs"
    and "pos2" into ``out`` if given."""
    if variant == "abs":
        return torch.abs(w, out=out)
    if variant == "pos2":
        return torch.clamp(w, min=0, out=out).mul_(2)
    if variant == "stacked":
        return torch.cat([w, w.abs()], 1)
    return w


#: a convolution on at most this many input channels (an image) takes one transposed
#: convolution over ``[w, |w|]`` instead of two (see ``AbsLRPRule._stacked_conv_terms``)
_STACKED_CHANNELS = 8


def _patch_transpose(g: Tensor, like: Tensor, weight: Tensor) -> Tensor:
    """``J^T g`` of a convolution whose stride equals its kernel (a ViT's patch embedding):
    the windows do not overlap, so it is one matrix product and a rearrangement, 5-8x
    faster on CPU than ``convolution_backward``. Rows and columns the windows miss get 0."""
    n, c_out, h, w = g.shape
    c_in, k1, k2 = weight.shape[1:]
    patches = g.permute(0, 2, 3, 1).reshape(-1, c_out) @ weight.reshape(c_out, -1)
    result = (patches.reshape(n, h, w, c_in, k1, k2).permute(0, 3, 1, 4, 2, 5)
              .reshape(n, c_in, h * k1, w * k2))
    missed_h, missed_w = like.shape[2] - h * k1, like.shape[3] - w * k2
    if missed_h or missed_w:
        result = F.pad(result, (0, missed_w, 0, missed_h))
    return result


def _combine(direct: Tensor, absolute: Tensor) -> Tensor:
    """``x * J^T g + |x| * Jabs^T g`` from its two products, each rounded on its own (no fused
    multiply-add): where ``J = Jabs`` and ``x < 0`` the two cancel to exactly 0, as in the
    reference's single autograd call. A fused ``addcmul`` leaves ~1e-17 there, which the
    per-layer renormalisation can inflate into a whole unit of relevance when nothing else
    reaches that tensor."""
    return direct.add_(absolute)


def _times(grad: Tensor, factor: Tensor, keep_factor: bool = False) -> Tensor:
    """``grad * factor`` written into ``grad`` where that is safe, else into ``factor``
    (unless ``keep_factor``), else into a new tensor.

    The relevance reaching a call is the engine's own buffer, used by this call only (autograd
    hands each backward its incoming gradient and drops it after), so overwriting it saves a
    fresh buffer per call. It is written only when it is dense and owns its memory without
    overlap (a contiguous or channels-last tensor of the factor's shape); otherwise the
    product goes into ``factor``, which this rule made."""
    if grad.shape == factor.shape and grad.dtype == factor.dtype and _dense(grad):
        return grad.mul_(factor)
    if not keep_factor and torch.broadcast_shapes(grad.shape, factor.shape) == factor.shape:
        return factor.mul_(grad)
    return factor * grad


def _channel_shape(x: Tensor, v: Tensor) -> Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2))) if x.dim() > 1 else v


def _unit_grad(x: Tensor) -> Tensor:
    return torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)


def _gelu_derivative(x: Tensor, call: OpCall) -> Tensor:
    return torch.ops.aten.gelu_backward(_unit_grad(x), x,
                                        approximate=call.argument(1, "approximate", "none"))


def _silu_derivative(x: Tensor, call: OpCall) -> Tensor:
    if building_graph(x):  # aten's silu_backward has no derivative of its own
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    return torch.ops.aten.silu_backward(_unit_grad(x), x)


#: activations ``f(x) = x s(x)`` with ``s(-a) = 1 - s(a)``, and ``f'`` for each
_SELF_GATED = {F.gelu: _gelu_derivative, F.silu: _silu_derivative}
_RELU = (F.relu, torch.relu, Tensor.relu)
#: calls whose rule is ``factor(x, y) * g`` (diagonal Jacobians given detached statistics)
ELEMENTWISE = frozenset({"activation", "batch_norm", "layer_norm", "softmax"})


def _self_gated_factor(call: OpCall, x: Tensor, scratch: Scratch) -> Tensor:
    """``x f'(x) + |x| f'(|x|)`` for ``f(x) = x s(x)`` with ``s(-a) = 1 - s(a)`` (GELU,
    exact or tanh, and SiLU), with one derivative evaluation instead of two forward and two
    backward passes through autograd.

    With ``a = |x|``, ``f'(x) = s(x) + x s'(x)`` and ``s'`` even: for ``x >= 0`` the sum is
    ``2 a f'(a)``; for ``x < 0`` it is ``-a (1 - s(a) - a s'(a)) + a f'(a) = 2 a f'(a) - a``.
    So it is ``2 a f'(a) + min(x, 0)``, exactly, for every ``x``. ``a`` and ``min(x, 0)``
    are temporaries in ``scratch``: only the factor itself is a new tensor."""
    a = scratch.absolute("input", x)
    derivative = _SELF_GATED[call.func](a, call)
    if building_graph(derivative, x):  # out of place: autograd keeps the operands
        return derivative * a * 2 + x.clamp(max=0)
    return derivative.mul_(a).mul_(2).add_(scratch.negative("term", x))


#: ``2 phi(0)`` for the standard normal density ``phi``: ``2 phi(x) = this * exp(-x^2 / 2)``
_TWO_PHI_0 = math.sqrt(2 / math.pi)


def _exact_gelu_factor(x: Tensor, output: Tensor, scratch: Scratch,
                       out: Tensor | None = None) -> Tensor:
    """:func:`_self_gated_factor` for the exact GELU, from its output ``y = x Phi(x)``
    without any ``erf``: ``2 y + (-x)+ + 2 x^2 phi(x)``.

    Why: ``f'(a) = s(a) + a s'(a)`` with ``s = Phi`` and ``s' = phi`` even, and ``a s(a)`` is
    ``y`` for ``x >= 0`` and ``a + y`` for ``x < 0`` (``s(a) = 1 - s(x)``). So ``2 a f'(a) +
    min(x, 0) = 2 y + 2 (-x)+ + min(x, 0) + 2 x^2 phi(x) = 2 y + (-x)+ + 2 x^2 phi(x)``.
    One exponential in place of the derivative's ``erf`` and exponential; the factor is
    written into ``out`` (a new tensor if None), the rest into ``scratch``."""
    if building_graph(x, output):  # out of place: autograd keeps the operands
        square = x * x
        return output * 2 + (-x).clamp(min=0) + square * torch.exp(square * -0.5) * _TWO_PHI_0
    factor = torch.mul(x, x, out=out)
    view = scratch.like("term", factor)
    density = factor * -0.5 if view is None else torch.mul(factor, -0.5, out=view)
    factor.mul_(density.exp_()).mul_(_TWO_PHI_0).add_(output, alpha=2)
    return factor.sub_(scratch.negative("input", x))


def _worth_keeping(call: OpCall) -> bool:
    """Whether the scaled factor of an elementwise call is worth keeping between the two
    contrastive passes: it costs many operations (statistics, exponentials, a derivative)
    to recompute, unlike ReLU's or BatchNorm's (those are recomputed into the scratch)."""
    return call.kind in ("layer_norm", "softmax") or call.func in _SELF_GATED


def _plain_sum(call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> bool:
    """``a + b`` without ``alpha`` and without broadcasting any traced input."""
    return (call.func in ADD and "alpha" not in call.kwargs and len(call.args) <= 2
            and all(t.shape == output.shape for t in inputs))


def _variance(x: Tensor, dims: tuple[int, ...], scratch: Scratch) -> Tensor:
    """The biased variance over ``dims`` (kept), as the mean of the squared deviations from
    the mean (two passes, as stable as ``Tensor.var``), the deviations in ``scratch``: on CPU
    about 6x faster than ``Tensor.var`` over a ViT's 768 channels."""
    mean = x.mean(dims, keepdim=True)
    view = scratch.like("term", x)
    if view is None:  # out of place: autograd keeps the operands
        deviation = x - mean
        return (deviation * deviation).mean(dims, keepdim=True)
    deviation = torch.sub(x, mean, out=view)
    return deviation.mul_(deviation).mean(dims, keepdim=True)


def _elementwise_factor(call: OpCall, x: Tensor, output: Tensor, scratch: Scratch,
                        out: Tensor | None = None) -> Tensor | None:
    """``factor`` with ``x * J^T g + |x| * Jabs^T g = factor * g`` for the calls whose
    Jacobians (with LayerNorm's and softmax's statistics detached) are diagonal; None for
    the other calls of the :data:`ELEMENTWISE` kinds (they go through autograd). The factor
    is written into ``out`` (``x``'s shape; None: a new tensor; GELU-tanh and SiLU always
    make one), its temporaries into ``scratch`` (fresh memory costs page faults)."""
    kind = call.kind
    if kind == "activation":
        if call.func in _RELU:
            # f'(x) = [x > 0] and |x| f'(|x|) = |x|: x f'(x) + |x| = relu(x) + |x|, and the
            # output is relu(x)
            return torch.abs(x, out=out).add_(output)
        if call.func is F.gelu and call.argument(1, "approximate", "none") == "none":
            return _exact_gelu_factor(x, output, scratch, out)
        if call.func in _SELF_GATED:
            return _self_gated_factor(call, x, scratch)
    elif kind == "batch_norm":
        var = call.kept_argument(2, "running_var")
        weight = call.argument(3, "weight")
        eps = call.argument(7, "eps", 1e-5)
        if var is not None and (weight is None or isinstance(weight, Tensor)):
            # x a + |x| |a| with a = gamma / sqrt(var + eps) per channel is 2 |a| (x sign(a))+:
            # the two terms cancel exactly where x and a differ in sign and are equal where
            # they agree. Computed so, it takes one new tensor instead of two and gives the
            # same floating-point numbers (every step but the product is exact).
            inv = (var + eps).rsqrt()
            a = inv if weight is None else weight * inv
            doubled = _channel_shape(x, a.abs() * 2)
            signed = x if weight is None else torch.mul(x, _channel_shape(x, a.sign()),
                                                        out=out)
            if building_graph(signed, doubled):  # out of place: autograd keeps the operands
                return signed.clamp(min=0) * doubled
            positive = (torch.clamp(x, min=0, out=out) if signed is x
                        else signed.clamp_(min=0))
            return positive.mul_(doubled)
    elif kind == "layer_norm":
        shape = call.argument(1, "normalized_shape")
        weight = call.argument(2, "weight")
        eps = call.argument(4, "eps", 1e-5)
        if weight is None or isinstance(weight, Tensor):
            dims = tuple(range(-len(shape), 0))
            ax = scratch.absolute("input", x)
            inv = (_variance(x, dims, scratch) + eps).rsqrt_()
            inv_abs = (_variance(ax, dims, scratch) + eps).rsqrt_()
            direct = torch.mul(x, inv, out=out)
            if building_graph(ax, inv_abs):  # out of place: autograd keeps the operands
                absolute = ax * inv_abs
            else:
                absolute = ax.mul_(inv_abs)
            if weight is not None:
                direct.mul_(weight)
                absolute.mul_(weight.abs())
            return direct.add_(absolute)
    elif kind == "softmax":
        dim = call.argument(1, "dim")
        if isinstance(dim, int):
            ax = scratch.absolute("input", x)
            view = scratch.like("term", ax)
            if view is None:
                # out of place: softmax keeps its output for a differentiable map
                return _combine(x * output, torch.softmax(ax, dim) * ax)
            return _combine(torch.mul(x, output, out=out),
                            torch.softmax(ax, dim, out=view).mul_(ax))
    return None


class AbsLRPRule(OpRule):
    """The absLRP kernel at every computing call (see the module docstring)."""

    kinds = frozenset(KINDS)
    #: False: every term from autograd (the tests compare the closed forms with it)
    closed_forms = True

    def __init__(self, max_pool_divide: bool = False, variant: str = "abslrp",
                 passes: int = 1):
        self.max_pool_divide = max_pool_divide
        self.variant = variant
        # (id(weight), variant, layout) -> (weight, derived weight), for the rule's lifetime
        # (one explain call: the contrastive passes share it)
        self._weights: dict[tuple, tuple[Tensor, Tensor]] = {}
        # With two backward passes over one forward (contrastive), the first keeps for the
        # second, per input, whether it is non-negative (one number), and the scaled factor
        # ``factor / (|y| + eps)`` of the calls whose factor costs many operations (LayerNorm,
        # softmax, GELU/SiLU: see :func:`_worth_keeping`). ReLU's and BatchNorm's are
        # recomputed: kept, they hold a copy of nearly every CNN activation through the first
        # pass, and on CPU the fresh memory that takes (page faults) costs more than
        # recomputing them (about 1.6x faster contrastive absLRP on ResNet50).
        self.passes = passes
        self._scaled_factors: dict[int, Tensor] = {}
        self._signs: dict[tuple[int, int], bool] = {}
        self._scratch = Scratch()

    def _weight(self, w: Tensor, variant: str, like: Tensor | None = None) -> Tensor:
        """``w``, ``|w|`` or ``2 w+`` (``variant``: plain, abs, pos2), laid out like a 4-D
        channels-last input (oneDNN then needs no conversion in every backward convolution)."""
        nhwc = like is not None and w.dim() == 4 and is_channels_last(like)
        key = (id(w), variant, nhwc)
        entry = self._weights.get(key)
        if entry is None or entry[0] is not w:
            v = _derived_weight(w, variant)
            if nhwc:
                v = v.contiguous(memory_format=torch.channels_last)
            entry = (w, v)
            self._weights[key] = entry
        return entry[1]

    def _stacked_conv_terms(self, call: OpCall, g: Tensor, x: Tensor,
                            w: Tensor) -> Tensor | None:
        """``x * J^T g + |x| * Jabs^T g`` of a convolution on few channels (an image) from one
        transposed convolution with ``[w, |w|]`` stacked along the input channels: on 3
        channels it takes the time of one with ``w`` alone (half of two), and it gives the
        same numbers (each output channel is its own sum)."""
        c = x.shape[1]
        layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        # only its shape and layout are read: allocated, never written (no page is touched)
        like = torch.empty((x.shape[0], 2 * c, *x.shape[2:]), dtype=x.dtype, device=x.device,
                           memory_format=layout)
        both = _conv_transpose(call, g, like, self._weight(w, "stacked", x))
        if both is None:
            return None
        if building_graph(both, x):  # out of place: autograd keeps the operands
            return both[:, :c] * x + both[:, c:] * x.abs()
        direct = torch.mul(both[:, :c], x)
        return _combine(direct, both[:, c:].mul_(self._scratch.absolute("input", x)))

    def _dense_weight(self, w: Tensor, variant: str) -> Tensor:
        """A dense layer's ``|w|`` or ``2 w+``, written into the scratch at every use: a
        transformer has many dense layers of a few sizes, and one warm buffer rewritten per
        use is 5-7x faster on CPU than a fresh tensor per layer (ViT-B/16: 340 MB of page
        faults). Kept per weight (:meth:`_weight`) where there is no scratch."""
        view = self._scratch.like("weight", w)
        return self._weight(w, variant) if view is None else _derived_weight(w, variant, view)

    def reset(self) -> None:
        self._weights.clear()
        self._scaled_factors.clear()
        self._signs.clear()
        self._scratch.clear()

    def _input_nonnegative(self, call: OpCall, i: int, x: Tensor) -> bool:
        """Whether input ``i`` of ``call`` has no negative entry, checked once per call. Then
        ``x * J^T g + |x| * Jabs^T g = 2 x * J+^T g`` with the positive part of the weights:
        one product instead of two."""
        key = (call.index, i)
        known = self._signs.get(key)
        if known is None:
            known = nonnegative(x)
            if self.passes > 1:
                self._signs[key] = known
        return known

    def op_backward(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
                    grad: Tensor) -> list[Tensor]:
        if (call.kind in ELEMENTWISE and self.variant == "abslrp" and self.closed_forms
                and len(inputs) == 1):
            scaled = self._scaled_factors.pop(call.index, None)
            if scaled is not None:  # kept by the first pass, used for the last time
                return [unit_mass(_times(grad, scaled), self._scratch)]
            keep = self.passes > 1 and _worth_keeping(call)
            # a factor used once is written into the scratch, one kept into a new tensor
            out = None if keep else self._scratch.like("factor", inputs[0])
            factor = _elementwise_factor(call, inputs[0], output, self._scratch, out)
            if factor is not None:
                if building_graph(factor, output, grad):
                    return [unit_mass(factor / output.abs().add(EPS) * grad)]
                scaled = factor.div_(self._scratch.denominator(
                    output, nonnegative=call.func in _RELU))
                if keep:
                    self._scaled_factors[call.index] = scaled
                # nothing returned may alias the scratch, nor the kept factor
                kept = _times(grad, scaled, keep_factor=keep or out is not None)
                return [unit_mass(kept, self._scratch)]
        if call.kind == "max_pool" and not self.max_pool_divide:
            g = grad
        elif building_graph(grad, output):
            g = grad / output.abs().add(EPS)
        else:
            # in the scratch buffer: every term below is a new tensor, none a view of ``g``
            denominator = self._scratch.denominator(output)
            g = torch.div(grad, denominator, out=denominator)
        if self.variant == "intline":
            return self._intline(call, inputs, output, grad, g)
        return [unit_mass(t, self._scratch) for t in self._terms(call, inputs, output, g)]

    def _intline(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor, grad: Tensor,
                 g: Tensor) -> list[Tensor]:
        """The paper-era rule: the positive and the negative relevance travel as separate
        streams, each normalised and given back its mass; two inputs share a stream's mass in
        proportion to their summed raw relevance."""
        dims = tuple(range(1, grad.dim()))
        result: list[Tensor] = [torch.zeros_like(t) for t in inputs]
        for part, mass in ((g.clamp(min=0), grad.clamp(min=0).sum(dims)),
                           (g.clamp(max=0), grad.clamp(max=0).sum(dims).abs())):
            terms = self._terms(call, inputs, output, part)
            raw = [t.sum(tuple(range(1, t.dim()))) for t in terms]
            total = sum(raw) if len(terms) > 1 else None
            for i, t in enumerate(terms):
                share = mass if total is None else mass * raw[i] / (total + EPS)
                result[i] += unit_mass(t) * share.reshape(-1, *([1] * (t.dim() - 1)))
        return result

    def _terms(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
               g: Tensor) -> list[Tensor]:
        """``x * J^T g + |x| * Jabs^T g`` for each input (closed forms for the common
        calls, autograd for the rest)."""
        if not self.closed_forms:
            return self._autograd_terms(call, inputs, g)
        x = inputs[0]
        kind = call.kind
        w = call.argument(1, "weight") if kind in ("linear", "conv") else None
        if len(inputs) == 1 and isinstance(w, Tensor):  # BEiT passes weight= by keyword
            if kind == "linear":
                if self._input_nonnegative(call, 0, x):
                    return [(g @ self._dense_weight(w, "pos2")).mul_(x)]
                # the second product and |x| are temporaries: in the scratch buffers
                absolute = self._scratch.matmul("product", g, self._dense_weight(w, "abs"), x)
                return [_combine((g @ w).mul_(x),
                                 absolute.mul_(self._scratch.absolute("input", x)))]
            if self._input_nonnegative(call, 0, x):
                term = _conv_transpose(call, g, x, self._weight(w, "pos2", x))
                if term is not None:
                    return [term.mul_(x)]
            elif x.shape[1] <= _STACKED_CHANNELS and call.argument(6, "groups", 1) == 1:
                terms = self._stacked_conv_terms(call, g, x, w)
                if terms is not None:
                    return [terms]
            else:
                direct = _conv_transpose(call, g, x, self._weight(w, "plain", x))
                if direct is not None:
                    absolute = _conv_transpose(call, g, x, self._weight(w, "abs", x))
                    return [_combine(direct.mul_(x), absolute.mul_(x.abs()))]
        elif kind == "add" and _plain_sum(call, inputs, output):
            # J = Jabs = identity for every traced input: x g + |x| g = 2 x+ g
            if building_graph(g, *inputs):
                return [2 * t.clamp(min=0) * g for t in inputs]
            return [t.clamp(min=0).mul_(2).mul_(g) for t in inputs]
        elif kind in ELEMENTWISE:
            factor = _elementwise_factor(call, x, output, self._scratch)
            if factor is not None:
                return [factor * g if building_graph(factor, g) else factor.mul_(g)]
        elif kind == "matmul" and len(inputs) == 2 and call.func is not torch.einsum and (
                x.dim() >= 3 and x.dim() == inputs[1].dim()):
            # a @ b, both activations, same batch dimensions. Strided operands (a ViT's q, k
            # and v are views of one permuted tensor) are copied once here, not once in every
            # product below.
            scratch = self._scratch
            a = scratch.contiguous("left", inputs[0])
            b = scratch.contiguous("right", inputs[1])
            # A non-negative operand (softmax attention) halves the products: with a >= 0,
            # a (g b^T) + |a| (g |b|^T) = 2 a (g b+^T) and b (a^T g) + |b| (a^T g) = 2 b+ (a^T g)
            if self._input_nonnegative(call, 0, a):
                bp = scratch.positive("input", b)
                return [(g @ bp.mT).mul_(a).mul_(2), (a.mT @ g).mul_(bp).mul_(2)]
            if self._input_nonnegative(call, 1, b):
                ap = scratch.positive("input", a)
                return [(g @ b.mT).mul_(ap).mul_(2), (ap.mT @ g).mul_(b).mul_(2)]
            # |a|, |b| and the absolute products are temporaries: in the scratch buffers
            abs_a, abs_b = scratch.absolute("input", a), scratch.absolute("term", b)
            ra = _combine((g @ b.mT).mul_(a), scratch.matmul("product", g, abs_b.mT, a)
                          .mul_(abs_a))
            rb = _combine((a.mT @ g).mul_(b), scratch.matmul("product", abs_a.mT, g, b)
                          .mul_(abs_b))
            return [ra, rb]
        return self._autograd_terms(call, inputs, g)

    @staticmethod
    def _autograd_terms(call: OpCall, inputs: Sequence[Tensor], g: Tensor) -> list[Tensor]:
        """The kernel's terms from autograd: the definition, for every kind of call."""
        direct = call.vjp(inputs, g)
        absolute = call.vjp([t.abs() for t in inputs], g, param=torch.abs)
        # out of place: autograd may hand back ``g`` itself, or one tensor for two inputs
        return [_combine(d * t, a * t.abs()) for t, d, a in zip(inputs, direct, absolute,
                                                           strict=True)]


@register("abslrp")
class AbsLRP(Method):
    """absLRP / RAMP (Vukadin et al. 2024): relative absolute magnitude LRP, contrastive.

    Works on CNNs (conv, BatchNorm, pooling, residual sums, dense heads) and Vision
    Transformers (patch embedding, LayerNorm, attention as ``q @ k^T``, softmax and
    ``attn @ v``, GELU MLPs, class-token pooling); ViT maps are pixel-level through the
    patch-embedding convolution. Options: ``contrastive`` (default True: the reference's
    CLRP difference), ``max_pool_divide`` (default False, the reference's VGG rule),
    ``variant`` (``"abslrp"``, the current reference rule; ``"intline"``, the paper-era rule
    with separate positive and negative streams),
    ``channel_reduce`` (``"sum"``: (N, H, W); ``"none"``: (N, C, H, W)). Signed; each pass's
    input relevance has unit mass per sample. See ``docs/methods.md`` for the rule and the
    deliberate differences from the reference code.
    """

    family = "relevance"

    signed = True

    def __init__(self, model, contrastive: bool = True, max_pool_divide: bool = False,
                 variant: str = "abslrp", channel_reduce: str | None = None,
                 batch_size: int | None = None, channels_last: bool | None = None):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise InvalidInputError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        self.variant = variant
        reduce = checked_reduction(channel_reduce, REDUCTIONS, "sum")
        self.contrastive = options.flag(contrastive, "contrastive")
        self.max_pool_divide = options.flag(max_pool_divide, "max_pool_divide")
        self.channel_reduce = reduce

    def output_relevance(self, out: Tensor, target: Target) -> list[Tensor]:
        """The relevance at the logits: the target's (one-hot, or ``|d objective / d out|``
        for a callable target, each with unit mass) and, when contrastive, the uniform
        relevance of the other outputs."""
        grad_out, _ = self._target_gradient(out, target)
        seeds = [unit_mass(grad_out.abs())]
        if self.contrastive:
            seeds.append(unit_mass((grad_out == 0).to(out.dtype)))
        return seeds

    def relevance(self, x: Tensor, target: Target) -> Tensor:
        """Input relevance ``(N, C, ...)`` for one chunk (no batching, no reduction)."""

        def run(leaf: Tensor) -> Tensor:
            rule = AbsLRPRule(self.max_pool_divide, self.variant,
                              passes=2 if self.contrastive else 1)
            try:
                maps = self._traced_gradients(
                    leaf, rule, lambda out: self.output_relevance(out, target))
            finally:
                rule.reset()
            result = maps[0] if len(maps) == 1 else maps[0] - maps[1]
            return result.contiguous()

        return self._with_layout(x, run)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            rel = self.relevance(x, t)
            return rel.contiguous() if self.channel_reduce == "none" else rel.sum(1).contiguous()

        return self._batched(inputs, target, one)
