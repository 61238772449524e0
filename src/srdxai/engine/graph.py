"""Recording a model's forward pass as a graph of PFV layers and linear operations.

The :class:`Recorder` is the PFV view of the tracing core (``tracer.py``: tracking, in-place
calls, module names and checks live there). Calls that depend on the explained input are
sorted into three kinds:

* elementwise activations: replaced by a rule-specific autograd function (the method's rule);
  their outputs are the PFV layers;
* linear operations (conv, linear, BatchNorm, pooling, ``+``, views, padding, ...): run as usual
  and recorded with their component structure (:mod:`srdxai.engine.ops`);
* anything else: a clear :class:`UnsupportedOperationError` naming the call and the module.

In-place calls (``relu_``, ``inplace=True``, ``+=``) reach the view out of place (the core
makes the old tensor an alias of the result).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedOperationError
from . import ops
from .catalogue import (
    ACTIVATIONS,
    DROPOUT,
    MOVING,
    SOFTMAX,
    dropout_in_training,
    func_name,
    gate_factor,
    number_exponent,
)
from .gradmode import is_differentiable
from .tracer import Tracer

Tensor = torch.Tensor


class Node:
    """A recorded tensor that depends on the explained input."""

    __slots__ = ("tensor", "shape", "producer", "is_pfv", "name", "consumers", "pre",
                 "activation", "index", "perm", "channel_split", "__weakref__")

    def __init__(self, tensor: Tensor | None, producer: ops.LinearOp | None, index: int,
                 shape: tuple[int, ...]):
        self.tensor = tensor  # kept for PFV layers when the rule needs their values
        self.shape = shape
        self.producer = producer
        self.is_pfv = producer is None
        self.name = ""
        self.consumers: list[ops.LinearOp] = []
        self.pre: Tensor | None = None  # pre-activation value, for PFV layers of activations
        self.activation = ""
        self.index = index
        # None: the tensor is laid out (batch, channels, *spatial), as every recorded op
        # assumes; else the permutation that gives the tensor the model sees from that
        # canonical layout (channels last: ConvNeXt's ``permute(0, 2, 3, 1)``)
        self.perm: tuple[int, ...] | None = None
        # None, or (source, ids) for a tensor whose channel axis the model split into several
        # axes (a channel shuffle's ``view(N, g, C // g, H, W)``): ``source`` is the canonical
        # (N, C, *spatial) tensor it came from and ``ids`` (int64, the split axes' shape)
        # names the source channel at every index of the split axes. Such a tensor may only be
        # permuted among its channel axes, copied, and viewed back into one channel axis
        # (:class:`~srdxai.engine.ops.ChannelPermuteOp`).
        self.channel_split: tuple[Tensor, Tensor] | None = None

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    def __repr__(self) -> str:
        return f"Node({self.name or self.activation or 'tensor'}, {self.shape})"


ADD_FUNCS = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__}
SUB_FUNCS = {torch.sub, Tensor.sub, Tensor.__sub__, Tensor.__rsub__}
MUL_FUNCS = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
DIV_FUNCS = {torch.div, Tensor.div, Tensor.__truediv__}
CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
MAXPOOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool1d_with_indices: 1,
                 F.max_pool2d_with_indices: 2}
AVGPOOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2}
ADAPTIVE_AVG_FUNCS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2}
# (``view_as``: also what a module's full backward hook runs on its inputs and outputs)
VIEW_FUNCS = {Tensor.view, Tensor.reshape, torch.reshape, torch.flatten, Tensor.flatten,
              Tensor.squeeze, torch.squeeze, Tensor.unsqueeze, torch.unsqueeze, Tensor.view_as,
              Tensor.reshape_as}
IDENTITY_FUNCS = {Tensor.contiguous, Tensor.clone, torch.clone}
MEAN_FUNCS = {torch.mean, Tensor.mean}
SUM_FUNCS = {torch.sum, Tensor.sum}
CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
SPLIT_FUNCS = {Tensor.split, torch.split, Tensor.chunk, torch.chunk, Tensor.tensor_split,
               torch.tensor_split}
NARROW_FUNCS = {Tensor.narrow, torch.narrow}
INTERPOLATE_FUNCS = {F.interpolate, F.upsample}
# Calls that only move values: when the engine cannot decompose one (e.g. flattening a spatial
# map), the plain gradient through it is still exact for rules that only need values moved.
MOVING_FUNCS = MOVING | {F.pad}
# a transpose of two axes is the permute that swaps them (a text model's (N, L, E) <-> (N, E, L))
TRANSPOSE_FUNCS = {Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes,
                   Tensor.swapdims, torch.swapdims}
PERMUTE_FUNCS = {Tensor.permute, torch.permute} | TRANSPOSE_FUNCS
NORM_FUNCS = {F.layer_norm, F.group_norm}
# Calls the recorder runs on the canonical (batch, channels, *spatial) view of a channels-last
# tensor, giving the model the result in the channels-last layout again.
LAYOUT_AWARE = (set(ACTIVATIONS) | ADD_FUNCS | SUB_FUNCS | MUL_FUNCS | DIV_FUNCS
                | {F.linear, F.layer_norm} | DROPOUT | IDENTITY_FUNCS)


def _keeps_axes(x: Tensor, out: Tensor) -> bool:
    """``out`` has ``x``'s axes in their order, some of them reduced to 1 or broadcast
    from 1 (an elementwise call, a reduction with ``keepdim``): the channel axis is where
    it was."""
    return out.dim() == x.dim() and all(o == i or 1 in (o, i) for o, i in zip(
        out.shape, x.shape, strict=True))


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def channels_last_perm(ndim: int) -> tuple[int, ...]:
    """(0, 2, ..., ndim - 1, 1): (N, C, *S) -> (N, *S, C)."""
    return (0, *range(2, ndim), 1)


def identity_activation(t: Tensor) -> Tensor:
    """The activation of a sum layer: the identity (a new tensor object, so that the layer
    gets a node of its own)."""
    return t.view_as(t)


def _bind(args: tuple, kwargs: dict, names: list[str], defaults: dict[str, Any]) -> dict:
    bound = dict(defaults)
    for n, a in zip(names, args, strict=False):
        bound[n] = a
    bound.update(kwargs)
    return bound


def _split_channel_shape(source: Sequence[int], shape: Sequence[int]) -> tuple[int, ...] | None:
    """The channel axes of ``shape`` when it is ``source`` (N, C, *spatial) with only its
    channel axis reshaped (split into several axes, or merged back into one), else None."""
    spatial = len(source) - 2
    if len(source) < 2 or len(shape) < 2 + spatial or shape[0] != source[0]:
        return None
    if spatial and tuple(shape[-spatial:]) != tuple(source[2:]):
        return None
    channels = tuple(shape[1:len(shape) - spatial])
    if not channels or math.prod(channels) != source[1]:
        return None
    return channels


def _activation_node(node: Node) -> Node | None:
    """The activation's output (a PFV layer) the node is, possibly moved since: expanded,
    viewed, reshaped or re-laid (ECA's ``x * y.expand_as(x)``), or resampled (GhostNetV2's
    attention gate, a sigmoid's output upsampled to the signal's size); None for any other
    node."""
    while not node.is_pfv:
        op = node.producer
        moved = op.kind in ("reshape", "identity", "layout", "resample") or (
            op.kind == "opaque" and op.moves_values)
        # the moved tensor is the first argument (``expand_as``'s second only gives a shape)
        if not moved or not op.inputs or op.inputs[0] is None:
            return None
        node = op.inputs[0]
    # the model's input and residual sums are PFV layers too, but no activation's outputs
    return node if node.activation not in ("", "input", "identity") else None


def _same_shape_gate(a: Tensor, b: Tensor, na: Node, nb: Node) -> int | None:
    """Which of two equally shaped factors is the gate (:func:`catalogue.gate_factor`)."""
    made = [_activation_node(na), _activation_node(nb)]
    return gate_factor([None if m is None else m.activation for m in made],
                       [m is not None and m.pre is other for m, other in zip(made, (b, a),
                                                                             strict=True)])


# Where the bias of a call that may carry one sits: (position, keyword).
_BIAS_ARGUMENT = {F.linear: (2, "bias"), F.conv1d: (2, "bias"), F.conv2d: (2, "bias"),
                  F.conv3d: (2, "bias"), F.batch_norm: (4, "bias"), F.layer_norm: (3, "bias"),
                  F.group_norm: (3, "bias")}


def _bias_argument(func: Any, args: tuple, kwargs: dict) -> bool:
    """The call adds a bias (a tensor argument), or may shift its output (a norm)."""
    if func in (F.batch_norm, F.layer_norm, F.group_norm):
        return True  # shifts by -mean * scale even without a bias parameter
    where = _BIAS_ARGUMENT.get(func)
    if where is None:
        return False
    position, name = where
    bias = kwargs.get(name, args[position] if len(args) > position else None)
    return isinstance(bias, Tensor)


class Recorder(Tracer):
    """The PFV view of the tracing core; see the module docstring.

    ``make_activation(z, func, fn_kwargs, node_factory)`` is supplied by the engine: it returns
    the activation output computed with the method's autograd rule.
    """

    def __init__(
        self,
        input_tensor: Tensor,
        activation_apply: Callable[[Tensor, Callable[[Tensor], Tensor], str], Tensor],
        on_bias_op: Callable[[ops.LinearOp, Tensor], Tensor] | None = None,
        on_opaque: Callable[[ops.LinearOp, Tensor], None] | None = None,
        strict: bool = False,
        keep_pfv_values: bool = True,
        on_linear_op: Callable[[ops.LinearOp, list, Tensor], Tensor] | None = None,
        gate_apply: Callable[[Tensor, Tensor], Tensor] | None = None,
        norm_apply: Callable[[Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor] | None = None,
        sum_layers: bool = False,
    ):
        super().__init__()
        # every sum of two input-dependent tensors is also a PFV layer (identity activation)
        self.sum_layers = sum_layers
        self.verb = "decompose"
        # ``norm_apply(x, scale, fn)``: ``fn(x)`` (a LayerNorm / GroupNorm) whose backward, for
        # the rule, is ``grad * scale`` (statistics constant); None: norms are not decomposed
        self.norm_apply = norm_apply
        # ``gate_apply(signal, gate)``: ``signal * gate`` with the gate a constant for the
        # rule (its backward gives the gate nothing unless the rule is plain); None: products
        # of two input-dependent tensors are not decomposed
        self.gate_apply = gate_apply
        self.on_linear_op = on_linear_op
        self.keep_pfv_values = keep_pfv_values
        self.on_opaque = on_opaque
        self.strict = strict
        self.opaque_ops: list[ops.LinearOp] = []
        self.order: list[Node] = []
        self.activation_apply = activation_apply
        self.on_bias_op = on_bias_op
        self.input_node = self._add_node(input_tensor, None, keep=True)
        self.input_node.name = "input"
        self.input_node.activation = "input"

    # -- bookkeeping -------------------------------------------------------------------------
    def _add_node(self, tensor: Tensor, producer: ops.LinearOp | None, keep: bool = False) -> Node:
        """Register ``tensor``. Only PFV values the rule needs are held; every other tensor is
        tracked through a weak reference, so the trace costs no memory beyond autograd's."""
        node = Node(tensor if keep else None, producer, len(self.order), tuple(tensor.shape))
        self.track(tensor, node)
        self.order.append(node)
        if producer is not None:
            producer.output = node
            for inp in producer.inputs:
                if inp is not None:
                    inp.consumers.append(producer)
        return node

    def node_of(self, obj: Any) -> Node | None:
        return self.entry_of(obj)

    def input_entry(self, x: Tensor) -> Node:
        return self.input_node

    def unsupported(self, what: str, advice: str = "", fatal: bool = False,
                    moves_values: bool = False) -> UnsupportedOperationError:
        """The error for an operation the engine cannot decompose. ``moves_values``: the
        operation only moves values (a view, a permute), so a plain gradient through it is
        still exact for rules that do not need its decomposition."""
        return super().unsupported(what, advice or (
                    "Supported: conv, linear, eval BatchNorm, LayerNorm/GroupNorm over"
                    " channels, max/avg/adaptive-avg pooling, upsampling, residual '+',"
                    " concatenation, slices and splits, sigmoid gates, zero padding,"
                    " flatten/view of pooled maps, eval dropout and elementwise activations"
                    " (docs/srd.md). Rewrite the model with these, or explain it with absLRP"
                    " or a gradient method."), fatal, moves_values)

    # -- the view ----------------------------------------------------------------------------
    def handle(self, func, args, kwargs, tracked):
        try:
            if any(self.node_of(t).channel_split is not None for t in tracked):
                return self._on_split_channels(func, args, kwargs, tracked)
            perms = {self.node_of(t).perm for t in tracked}
            if perms != {None} and func not in PERMUTE_FUNCS:
                return self._in_canonical_layout(func, args, kwargs, perms)
            return self._dispatch(func, args, kwargs)
        except UnsupportedOperationError as error:
            if self.strict or getattr(error, "fatal", False):
                raise
            return self._opaque(func, args, kwargs, error)

    def _opaque(self, func, args, kwargs, error: UnsupportedOperationError):
        """Run an operation the engine cannot decompose and remember why.

        Its outputs stay tracked, so the forward pass completes and plain gradients flow
        through it; a rule that needs the decomposition raises ``error`` only if its backward
        actually reaches the operation (e.g. SRD seeded below a VGG classifier is fine).
        """
        out = func(*args, **kwargs)
        flat_in, _ = tree_flatten((args, kwargs))
        inputs = [t for t in flat_in if self.is_tracked(t)]
        perms = {self.node_of(t).perm for t in inputs}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.is_floating_point() and not self.is_tracked(t):
                node = self._opaque_node(t, error, inputs, _bias_argument(func, args, kwargs))
                if len(perms) == 1 and all(_keeps_axes(x, t) for x in inputs):
                    # a channels-last reduction or elementwise step (the norms of ConvNeXtV2's
                    # response normalisation, a gate's branch): still channels-last, so a
                    # product with it lines up in the canonical layout
                    node.perm = next(iter(perms))
        return out

    def _opaque_node(self, out: Tensor, error: UnsupportedOperationError,
                     inputs: Sequence[Tensor], has_bias: bool = False) -> Node:
        """Record ``out`` as made from ``inputs`` by an operation the engine cannot
        decompose (an :class:`~srdxai.engine.ops.OpaqueOp` that raises ``error`` if a rule
        needs its decomposition)."""
        op = ops.OpaqueOp(self.where, error)
        op.moves_values = bool(getattr(error, "moves_values", False))
        op.has_bias = has_bias
        op.inputs = []
        self.opaque_ops.append(op)
        if self.on_opaque is not None:
            self.on_opaque(op, out)
        op.inputs = [self.node_of(i) for i in inputs]
        return self._add_node(out, op)

    def _dispatch(self, func, args, kwargs):
        """A call on canonical-layout tensors (``__torch_function__`` re-lays the others)."""
        if func in PERMUTE_FUNCS:
            return self._permute(func, args, kwargs)
        if func in NORM_FUNCS:
            return self._norm(func, args, kwargs)
        if func in ACTIVATIONS and number_exponent(func, args, kwargs):
            return self._activation(func, args, kwargs, ACTIVATIONS[func])
        for funcs, handler in ((ADD_FUNCS, self._add), (SUB_FUNCS, self._sub),
                               (MUL_FUNCS, self._mul), (DIV_FUNCS, self._div)):
            if func in funcs:
                return handler(func, args, kwargs)
        if func in CONV_FUNCS:
            return self._conv(func, args, kwargs)
        if func is F.linear:
            return self._linear(args, kwargs)
        if func is F.batch_norm:
            return self._batch_norm(args, kwargs)
        if func in MAXPOOL_FUNCS:
            return self._max_pool(func, args, kwargs)
        if func in AVGPOOL_FUNCS:
            return self._avg_pool(func, args, kwargs)
        if func in ADAPTIVE_AVG_FUNCS:
            return self._adaptive_avg_pool(func, args, kwargs)
        if func in MEAN_FUNCS:
            return self._mean(func, args, kwargs)
        if func in VIEW_FUNCS:
            return self._view(func, args, kwargs)
        if func in CAT_FUNCS:
            return self._cat(args, kwargs)
        if func is torch.stack:
            return self._stack(args, kwargs)
        if func is Tensor.__getitem__:
            return self._getitem(args)
        if func in NARROW_FUNCS:
            return self._narrow(args, kwargs)
        if func in SPLIT_FUNCS:
            return self._split(func, args, kwargs)
        if func in INTERPOLATE_FUNCS:
            return self._interpolate(func, args, kwargs)
        if func is F.pad:
            return self._pad(args, kwargs)
        if func in DROPOUT:
            if dropout_in_training(func, args, kwargs):
                raise self.unsupported("dropout in training mode", "Call model.eval() first.")
            return self._identity(args[0])
        if func in IDENTITY_FUNCS:
            # contiguous() and clone() must give what they promise (code may .view() next)
            with torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
            return self._identity(args[0], out)
        out = func(*args, **kwargs)
        if not any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
            return out  # sizes, dtypes, shapes, comparisons to Python values ...
        if func in SOFTMAX:
            raise self.unsupported(
                f"a {getattr(func, '__name__', 'softmax')} (not linear between activations)",
                "If the model ends in a softmax, explain its logits: drop the softmax (the "
                "classifier's last layer gives them).")
        raise self.unsupported(f"the operation '{func_name(func)}'",
                                moves_values=func in MOVING_FUNCS)

    # -- handlers ----------------------------------------------------------------------------
    def _record(self, op: ops.LinearOp, inputs: list[Any], out: Tensor) -> Tensor:
        op.inputs = [self.node_of(t) for t in inputs]
        if out.dim() < 2:
            raise self.unsupported(
                f"'{op.kind}' producing a tensor of shape {tuple(out.shape)}",
                "SRD needs (batch, channels, ...) tensors throughout the network.",
            )
        if self.on_linear_op is not None:
            out = self.on_linear_op(op, [t if isinstance(t, Tensor) else None for t in inputs],
                                    out)
        if op.bias is not None and self.on_bias_op is not None:
            out = self.on_bias_op(op, out)
        self._add_node(out, op)
        return out

    def _activation(self, func, args, kwargs, act_name: str) -> Tensor:
        z = args[0]
        extra_args = args[1:]
        fn_kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        if func in (F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.hardtanh, F.silu,
                    F.mish, F.hardswish, F.hardsigmoid):
            # positional 'inplace' arguments of these functionals are dropped
            names = {F.leaky_relu: 1, F.elu: 1, F.celu: 1, F.hardtanh: 2}
            extra_args = extra_args[: names.get(func, 0)]

        def fn(t: Tensor) -> Tensor:
            with torch._C.DisableTorchFunction():
                return func(t, *extra_args, **fn_kwargs)

        if z.dim() < 2:
            raise self.unsupported(f"an activation on a tensor of shape {tuple(z.shape)}")
        if act_name == "clamp" and any(isinstance(a, Tensor) for a in (*extra_args,
                                                                     *fn_kwargs.values())):
            raise self.unsupported("a clamp with tensor bounds")
        module_name, module = self.module_stack[-1] if self.module_stack else ("", None)
        leaf = module is not None and not any(True for _ in module.children())
        name = module_name if leaf else f"{module_name}:{act_name}".lstrip(":")
        v = self.activation_apply(z, fn, name)
        node = self._add_node(v, None, keep=self.keep_pfv_values)
        node.pre = z
        node.activation = act_name
        node.name = name
        return v

    def _sum_layer(self, z: Tensor) -> Tensor:
        """The output of a sum of two input-dependent tensors as a PFV layer with the
        identity as its activation (docs/srd.md: the residual stream's PFV layers)."""
        module_name = self.module_stack[-1][0] if self.module_stack else ""
        name = f"{module_name}:sum".lstrip(":")
        v = self.activation_apply(z, identity_activation, name)
        node = self._add_node(v, None, keep=self.keep_pfv_values)
        node.pre = z
        node.activation = "identity"
        node.name = name
        return v

    def _add(self, func, args, kwargs):
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if func is Tensor.__radd__:
            a, b = b, a
        return self._combine(func, a, b, 1.0, float(alpha))

    def _sub(self, func, args, kwargs):
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if func is Tensor.__rsub__:
            return self._combine(func, b, a, 1.0, -float(alpha))
        return self._combine(func, a, b, 1.0, -float(alpha))

    def _combine(self, func, a, b, ca: float, cb: float) -> Tensor:
        """``ca*a + cb*b`` where at least one side depends on the input."""
        with torch._C.DisableTorchFunction():
            out = ca * a + cb * b if (ca, cb) != (1.0, 1.0) else a + b
        na, nb = self.node_of(a), self.node_of(b)
        if na is not None and nb is not None:
            if a.shape != out.shape or b.shape != out.shape:
                raise self.unsupported(
                    f"a broadcasting '+' of shapes {tuple(a.shape)} and {tuple(b.shape)}")
            op = ops.AddOp(self.where, [ca, cb])
            out = self._record(op, [a, b], out)
            return self._sum_layer(out) if self.sum_layers else out
        tracked, const, ct, cc = (a, b, ca, cb) if na is not None else (b, a, cb, ca)
        if isinstance(const, Tensor) and torch.broadcast_shapes(const.shape, tracked.shape) != (
            tracked.shape
        ):
            raise self.unsupported(
                f"adding a constant of shape {tuple(const.shape)} that broadcasts the input-"
                f"dependent tensor {tuple(tracked.shape)}")
        bias = const * cc if isinstance(const, Tensor) else torch.full(
            (), float(const) * cc, dtype=out.dtype, device=out.device)
        op = ops.PointwiseScale(self.where, ct if ct != 1.0 else 1.0, bias=bias.detach())
        op.kind = "add_constant"
        return self._record(op, [tracked], out)

    def _mul(self, func, args, kwargs):
        a, b = args[0], args[1]
        if self.node_of(a) is not None and self.node_of(b) is not None:
            if self.gate_apply is not None:
                return self._gate(a, b)
            raise self.unsupported(
                "a product of two input-dependent tensors (e.g. attention or a gating "
                "'sigmoid(x) * x' / squeeze-excitation)",
                "SRD's sharing ratios are defined for affine maps between activations only.",
            )
        tracked, const = (a, b) if self.node_of(a) is not None else (b, a)
        return self._scale(func, tracked, const, lambda t, c: t * c)

    def _div(self, func, args, kwargs):
        a, b = args[0], args[1]
        if self.node_of(b) is not None:
            raise self.unsupported("a division by an input-dependent tensor")
        if kwargs.get("rounding_mode") is not None:
            raise self.unsupported("a rounding division")
        return self._scale(func, a, 1.0 / b, lambda t, c: t * c)

    def _scale(self, func, tracked: Tensor, const: Any, apply) -> Tensor:
        if isinstance(const, Tensor):
            if torch.broadcast_shapes(const.shape, tracked.shape) != tracked.shape:
                raise self.unsupported(
                    f"a product with a constant of shape {tuple(const.shape)} that changes the "
                    f"shape of {tuple(tracked.shape)}")
            const = const.detach()
        with torch._C.DisableTorchFunction():
            out = apply(tracked, const)
        op = ops.PointwiseScale(self.where, const)
        return self._record(op, [tracked], out)

    def _conv(self, func, args, kwargs):
        b = _bind(args, kwargs, ["input", "weight", "bias", "stride", "padding", "dilation",
                                 "groups"],
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        x, weight = b["input"], b["weight"]
        if self.node_of(weight) is not None or (
            b["bias"] is not None and self.node_of(b["bias"]) is not None
        ):
            raise self.unsupported("a convolution whose weights depend on the input")
        d = CONV_FUNCS[func]
        stride = ops.as_tuple(b["stride"], d)
        dilation = ops.as_tuple(b["dilation"], d)
        kernel = weight.shape[2:]
        if isinstance(b["padding"], str):
            if b["padding"] == "valid":
                pad_before = (0,) * d
            else:  # 'same': PyTorch puts the odd extra padding at the end
                pad_before = tuple(dl * (k - 1) // 2 for dl, k in zip(dilation, kernel,
                                                                       strict=True))
        else:
            pad_before = ops.as_tuple(b["padding"], d)
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
        op = ops.ConvOp(self.where, weight.detach(),
                        None if b["bias"] is None else b["bias"].detach().reshape(
                            1, -1, *([1] * d)),
                        stride, pad_before, dilation, int(b["groups"]), x.shape[2:],
                        out.shape[2:])
        return self._record(op, [x], out)

    def _linear(self, args, kwargs):
        b = _bind(args, kwargs, ["input", "weight", "bias"], {"bias": None})
        x = b["input"]
        if x.dim() != 2:
            raise self.unsupported(
                f"a linear layer on a tensor of shape {tuple(x.shape)}",
                "SRD here decomposes linear layers on (batch, features) vectors, e.g. a "
                "classifier after global average pooling. For a flatten of a spatial map into "
                "a linear layer (VGG-style heads) use seed='gradcam' with a conv layer; for a "
                "vision transformer's (batch, tokens, dim) tensors use method='srd_tokens'.",
            )
        with torch._C.DisableTorchFunction():
            out = F.linear(*args, **kwargs)
        op = ops.LinearLayerOp(self.where, b["weight"].detach(),
                               None if b["bias"] is None else b["bias"].detach().reshape(1, -1))
        return self._record(op, [x], out)

    def _batch_norm(self, args, kwargs):
        b = _bind(args, kwargs, ["input", "running_mean", "running_var", "weight", "bias",
                                 "training", "momentum", "eps"],
                  {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                   "eps": 1e-5})
        x = b["input"]
        if b["training"] or b["running_mean"] is None:
            raise self.unsupported(
                "BatchNorm with batch statistics (training mode or no running statistics)",
                "Call model.eval() so BatchNorm is an affine map.")
        with torch._C.DisableTorchFunction():
            out = F.batch_norm(*args, **kwargs)
            inv = torch.rsqrt(b["running_var"].detach() + b["eps"])
            scale = inv if b["weight"] is None else b["weight"].detach() * inv
            shift = -b["running_mean"].detach() * scale
            if b["bias"] is not None:
                shift = shift + b["bias"].detach()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        op = ops.BatchNormOp(self.where, scale.reshape(shape), bias=shift.reshape(shape))
        return self._record(op, [x], out)

    def _max_pool(self, func, args, kwargs):
        d = MAXPOOL_FUNCS[func]
        b = _bind(args, kwargs, ["input", "kernel_size", "stride", "padding", "dilation",
                                 "ceil_mode", "return_indices"],
                  {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                   "return_indices": False})
        x = b["input"]
        kernel = ops.as_tuple(b["kernel_size"], d)
        stride = ops.as_tuple(b["stride"], d) if b["stride"] not in (None, []) else kernel
        padding = ops.as_tuple(b["padding"], d)
        dilation = ops.as_tuple(b["dilation"], d)
        pool = F.max_pool1d_with_indices if d == 1 else F.max_pool2d_with_indices
        with torch._C.DisableTorchFunction():
            out, indices = pool(x, kernel, stride, padding, dilation, ceil_mode=b["ceil_mode"],
                                return_indices=True)
        op = ops.MaxPoolOp(self.where, indices, kernel, stride, padding, dilation, x.shape[2:],
                           out.shape[2:])
        out = self._record(op, [x], out)
        return (out, indices) if b["return_indices"] or func in (
            F.max_pool1d_with_indices, F.max_pool2d_with_indices) else out

    def _avg_pool(self, func, args, kwargs):
        d = AVGPOOL_FUNCS[func]
        names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
        if d == 2:
            names.append("divisor_override")
        b = _bind(args, kwargs, names, {"stride": None, "padding": 0, "ceil_mode": False,
                                        "count_include_pad": True, "divisor_override": None})
        x = b["input"]
        kernel = ops.as_tuple(b["kernel_size"], d)
        stride = ops.as_tuple(b["stride"], d) if b["stride"] not in (None, []) else kernel
        padding = ops.as_tuple(b["padding"], d)
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
            # 1/divisor per output position: the pooled ones-map divided by how many inside
            # positions each window holds (exact for every PyTorch divisor rule).
            ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
            pooled_ones = func(ones, *args[1:], **kwargs).reshape(out.shape[2:])
        op = ops.AvgPoolOp(self.where, torch.ones(out.shape[2:], dtype=x.dtype,
                                                  device=x.device),
                           kernel, stride, padding, x.shape[2:], out.shape[2:])
        count = sum(op.inside_map(k).reshape(out.shape[2:]).to(x.dtype) for k in op.offsets)
        op.coefficient = torch.where(count > 0, pooled_ones / count.clamp_min(1),
                                     torch.zeros_like(pooled_ones))
        return self._record(op, [x], out)

    def _adaptive_avg_pool(self, func, args, kwargs):
        d = ADAPTIVE_AVG_FUNCS[func]
        x = args[0]
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        size = ops.as_tuple(size, d)
        in_sp = tuple(x.shape[2:])
        size = tuple(i if s is None else s for s, i in zip(size, in_sp, strict=True))
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
        if all(s == 1 for s in size):
            op = ops.GlobalAvgPoolOp(self.where, in_sp, tuple(out.shape[2:]))
            return self._record(op, [x], out)
        if all(i % s == 0 for i, s in zip(in_sp, size, strict=True)):
            kernel = tuple(i // s for i, s in zip(in_sp, size, strict=True))
            coefficient = torch.full(size, 1.0 / math.prod(kernel), dtype=x.dtype,
                                     device=x.device)
            op = ops.AvgPoolOp(self.where, coefficient, kernel, kernel, (0,) * d, in_sp, size)
            return self._record(op, [x], out)
        # windows that overlap or differ in size (e.g. 4x4 -> 7x7)
        axes = [ops.adaptive_pool_axis(i, s, x.device, x.dtype)
                for i, s in zip(in_sp, size, strict=True)]
        op = ops.ResampleOp(self.where, axes, in_sp, size)
        op.kind = "adaptive_avgpool"
        self._check_resample(op, x, out, "adaptive average pooling")
        return self._record(op, [x], out)

    def _mean(self, func, args, kwargs):
        x = args[0]
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if dims is None or kwargs.get("dtype") is not None:
            raise self.unsupported("a mean over all dimensions")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        dims = tuple(sorted(d % x.dim() for d in dims))
        if dims != tuple(range(2, x.dim())):
            raise self.unsupported(
                f"a mean over dimensions {dims} of a tensor of shape {tuple(x.shape)}",
                "Only a mean over all spatial dimensions (global average pooling) is linear "
                "per position.")
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
        op = ops.GlobalAvgPoolOp(self.where, tuple(x.shape[2:]),
                                 (1,) * len(dims) if keepdim else ())
        return self._record(op, [x], out)

    def _view(self, func, args, kwargs):
        x = args[0]
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
        in_sp, out_sp = tuple(x.shape[2:]), tuple(out.shape[2:])
        split = _split_channel_shape(x.shape, out.shape)
        if split is not None and (out.dim() < 2 or out.shape[:2] != x.shape[:2]):
            # the channel axis split into several (a channel shuffle's first view)
            ids = torch.arange(x.shape[1], device=x.device).reshape(split)
            return self._split_channels(x, ids, out)
        if out.dim() < 2 or out.shape[:2] != x.shape[:2] or math.prod(in_sp) != math.prod(
            out_sp
        ):
            error = self.unsupported(
                f"'{func_name(func)}' from {tuple(x.shape)} to {tuple(out.shape)}",
                "Only views that keep batch and channels (e.g. flattening a 1x1 pooled map) "
                "keep pointwise feature vectors intact. For flatten+linear heads use "
                "seed='gradcam' with a conv layer.",
                moves_values=True,
            )
            # a map flattened into one vector per sample: a VGG-style head, below which
            # SRD's automatic seed starts (Grad-CAM's)
            error.flatten_head = out.dim() == 2 and x.dim() >= 3  # type: ignore[attr-defined]
            raise error
        op = ops.ReshapeOp(self.where, in_sp, out_sp)
        return self._record(op, [x], out)

    # -- a channel axis split into several (channel shuffles) ---------------------------------
    def _split_channels(self, source: Tensor, ids: Tensor, out: Tensor) -> Tensor:
        """Track ``out``, a tensor whose channel axis is split into ``ids.shape``, as a node
        that remembers its source: no decomposition of its own (an opaque, value-moving op),
        only what :meth:`_on_split_channels` lets the model do with it."""
        error = self.unsupported(
            f"a tensor of shape {tuple(out.shape)} whose channel axis is split into several "
            "axes, used other than in a channel permutation",
            "Splitting the channels into axes, permuting those axes and viewing them back "
            "into one channel axis (a channel shuffle) is decomposed; any other use of the "
            "split axes is not.", moves_values=True)
        self._opaque_node(out, error, [source]).channel_split = (source, ids)
        return out

    def _on_split_channels(self, func, args, kwargs, tracked) -> Any:
        """A call on a tensor whose channel axis is split (:attr:`Node.channel_split`): a
        permute among the split axes, a copy, or a view. A view back to one channel axis
        gives the source's channels reordered, recorded as one
        :class:`~srdxai.engine.ops.ChannelPermuteOp` on the source (the model gets the same
        values; the intermediate tensors get no gradient). Anything else is refused."""
        x = args[0] if args else None
        node = self.node_of(x)
        if func in MUL_FUNCS and len(tracked) == 2:
            return self._split_gated(args)
        if func in SUM_FUNCS | MEAN_FUNCS and node is not None and node.channel_split is not None:
            return self._split_summed(func, args, kwargs)
        if (len(tracked) != 1 or node is None or node.channel_split is None
                or func not in PERMUTE_FUNCS | VIEW_FUNCS | IDENTITY_FUNCS):
            raise self.unsupported(
                f"'{func_name(func)}' on a tensor whose channel axis is split into several "
                "axes", "Only permuting the split axes among themselves, copying and viewing "
                "them back into one channel axis (a channel shuffle) is decomposed.",
                moves_values=func in MOVING_FUNCS)
        source, ids = node.channel_split
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
        spatial = tuple(source.shape[2:])
        axes = ids.dim()
        if func in IDENTITY_FUNCS:
            new_ids = ids
        elif func in PERMUTE_FUNCS:
            dims = self._permuted_dims(func, args, kwargs, x.dim())
            if dims[0] != 0 or dims[axes + 1:] != tuple(range(axes + 1, x.dim())):
                raise self.unsupported(
                    f"'{func_name(func)}' moving the batch or spatial axes of a tensor whose "
                    "channel axis is split", moves_values=True)
            new_ids = ids.permute([d - 1 for d in dims[1:axes + 1]])
        else:
            split = _split_channel_shape(source.shape, out.shape)
            if split is None:
                raise self.unsupported(
                    f"'{func_name(func)}' from {tuple(x.shape)} to {tuple(out.shape)} on a "
                    "tensor whose channel axis is split", "Only views that keep the batch "
                    f"and the spatial axes {spatial} are decomposed there.", moves_values=True)
            new_ids = ids.reshape(split)
        if new_ids.dim() > 1:
            return self._split_channels(source, new_ids, out)
        order = new_ids.reshape(-1)
        with torch._C.DisableTorchFunction():
            merged = source.index_select(1, order)  # = out, from the source directly
        if torch.equal(order, torch.arange(order.numel(), device=order.device)):
            return self._identity(source, merged)
        return self._record(ops.ChannelPermuteOp(self.where, order), [source], merged)

    def _split_parts(self, x: Tensor) -> tuple[Tensor, list[Tensor]] | None:
        """The source of a tensor whose channel axis is split into (groups, channels) in
        order (a stack of branches along dim 1, ResNeSt's ``view(N, radix, C, H, W)``), and
        each group's channel indices; None for any other split (a shuffle)."""
        source, ids = self.node_of(x).channel_split
        if ids.dim() != 2 or not torch.equal(ids.reshape(-1), torch.arange(
                ids.numel(), device=ids.device)):
            return None
        return source, [row for row in ids]

    def _split_gated(self, args) -> Tensor:
        """``x * g`` with ``x``'s channels split into (groups, channels) and ``g`` one value per
        group and channel (SKNet's and ResNeSt's softmax over the branches, (N, k, C, 1, 1)):
        the product of the source with ``g`` laid out as its channels, a gate as any other
        (a constant weight), split again."""
        a, b = args[0], args[1]
        signal, gate = (a, b) if a.numel() >= b.numel() else (b, a)  # the gate: (N, k, C, 1, 1)
        parts = self._split_parts(signal) if self.node_of(signal).channel_split else None
        n = signal.shape[0]
        if (parts is None or gate.dim() != signal.dim() or gate.shape[:3] != signal.shape[:3]
                or any(s != 1 for s in gate.shape[3:])):
            raise self.unsupported(
                f"a product of a tensor of shape {tuple(signal.shape)} whose channel axis is "
                f"split with one of shape {tuple(gate.shape)}", "Only a gate with one value per "
                "group and channel (split attention's softmax over the branches) is decomposed.")
        source = parts[0]
        flat = (n, source.shape[1], *([1] * (source.dim() - 2)))
        gate_parts = self._split_parts(gate) if self.node_of(gate).channel_split else None
        if gate_parts is not None:  # viewed from (N, k * C, 1, 1) itself (ResNeSt)
            gate_flat = gate_parts[0]
        else:
            gate_flat = self.__torch_function__(Tensor.reshape, (), (gate, flat))
        gated = self._dispatch(torch.mul, (source, gate_flat), {})
        with torch._C.DisableTorchFunction():
            out = gated.view(signal.shape)
        return self._split_channels(gated, self.node_of(signal).channel_split[1], out)

    def _split_summed(self, func, args, kwargs) -> Tensor:
        """A sum or mean over the groups of a tensor whose channels are split into (groups,
        channels) (SKNet's and ResNeSt's sum of the branches): the sum of the source's channel
        blocks, each a slice, added in order (a mean: that sum scaled)."""
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        dims = dim if isinstance(dim, list | tuple) else (dim,)
        parts = self._split_parts(x)
        if parts is None or None in dims or [d % x.dim() for d in dims] != [1] or keepdim:
            raise self.unsupported(
                f"'{func_name(func)}' over dimensions {dim} of a tensor whose channel axis is "
                "split", "Only a sum or mean over the groups (dim 1, split attention's branches) "
                "is decomposed.", moves_values=False)
        source, groups = parts
        total = None
        for ids in groups:
            block = self.__torch_function__(Tensor.narrow, (), (source, 1, int(ids[0]),
                                                                ids.numel()))
            total = block if total is None else self.__torch_function__(
                Tensor.__add__, (), (total, block))
        if func in MEAN_FUNCS:
            total = self.__torch_function__(Tensor.__mul__, (), (total, 1.0 / len(groups)))
        return total

    def _stack(self, args, kwargs) -> Tensor:
        """``torch.stack`` of (N, C, ...) maps along dim 1 (SKNet's branches): their
        concatenation along the channels, viewed with the channel axis split into
        (branches, channels)."""
        tensors = kwargs.get("tensors", args[0] if args else None)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if dim != 1 or len({tuple(t.shape) for t in tensors}) != 1:
            raise self.unsupported(f"torch.stack along dimension {dim}",
                                   "Only stacking maps of one shape along dim 1 (branches) "
                                   "is decomposed.", moves_values=True)
        catted = self._cat((list(tensors), 1), {})
        k, c = len(tensors), tensors[0].shape[1]
        with torch._C.DisableTorchFunction():
            out = catted.view(catted.shape[0], k, c, *catted.shape[2:])
        ids = torch.arange(k * c, device=catted.device).reshape(k, c)
        return self._split_channels(catted, ids, out)

    def _pad(self, args, kwargs):
        b = _bind(args, kwargs, ["input", "pad", "mode", "value"],
                  {"mode": "constant", "value": None})
        if b["mode"] != "constant" or (b["value"] not in (None, 0, 0.0)):
            raise self.unsupported(
                f"padding with mode '{b['mode']}' and value {b['value']}",
                "Only zero padding is linear without a bias.",
                moves_values=b["mode"] != "constant")
        x = b["input"]
        if len(b["pad"]) > 2 * (x.dim() - 2):
            raise self.unsupported("padding of the batch or channel dimension")
        with torch._C.DisableTorchFunction():
            out = F.pad(*args, **kwargs)
        return self._record(ops.PadOp(self.where, b["pad"]), [x], out)

    def _identity(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        with torch._C.DisableTorchFunction():
            if out is None or out is x:
                out = x.view_as(x)  # a tensor of its own, so that it gets a node of its own
        return self._record(ops.IdentityOp(self.where), [x], out)

    # -- operations that move values, resampling, gates ---------------------------------------
    def _spatial_dim(self, x: Tensor, dim: int, what: str) -> int:
        """``dim`` as a non-negative dimension of ``x``; refuse the batch dimension."""
        d = dim % x.dim()
        if d == 0:
            raise self.unsupported(f"{what} along the batch dimension",
                                    "Explain the samples separately instead.",
                                    moves_values=True)
        return d

    def _cat(self, args, kwargs):
        tensors = kwargs.get("tensors", args[0] if args else None)
        dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
        tensors = [self.resolve(t) for t in tensors]
        with torch._C.DisableTorchFunction():
            out = torch.cat(tensors, dim)
        if any(self.node_of(t) is None for t in tensors):
            raise self.unsupported(
                "a concatenation with a tensor that does not depend on the input (e.g. a "
                "class token or a constant map)", moves_values=True)
        d = self._spatial_dim(out, dim, "a concatenation")
        starts, sizes, start = [], [], 0
        for t in tensors:
            starts.append(start)
            sizes.append(t.shape[d])
            start += t.shape[d]
        op = ops.CatOp(self.where, d, starts, sizes, tuple(out.shape[2:]),
                       [tuple(t.shape[2:]) for t in tensors])
        return self._record(op, list(tensors), out)

    def _slice(self, x: Tensor, slices: list[slice], out: Tensor) -> Tensor:
        op = ops.SliceOp(self.where, slices, tuple(x.shape[2:]), tuple(out.shape[2:]))
        return self._record(op, [x], out)

    def _full_slices(self, x: Tensor) -> list[slice]:
        return [slice(None)] * (x.dim() - 1)

    def _getitem(self, args):
        x, index = args[0], args[1]
        with torch._C.DisableTorchFunction():
            out = x[index]
        items = list(index) if isinstance(index, tuple) else [index]
        if any(item is Ellipsis for item in items):
            at = items.index(Ellipsis)
            fill = x.dim() - (len(items) - 1)
            items = items[:at] + [slice(None)] * fill + items[at + 1:]
        if len(items) > x.dim() or not all(isinstance(i, slice) for i in items) or any(
            isinstance(v, Tensor) for i in items for v in (i.start, i.stop, i.step)
        ):
            raise self.unsupported(
                f"indexing with {index!r}",
                "Only basic slicing (start:stop:step, '...') keeps the tensor's dimensions; "
                "integer, boolean or tensor indices are not decomposed.", moves_values=True)
        items += [slice(None)] * (x.dim() - len(items))
        if items[0] != slice(None):
            self._spatial_dim(x, 0, "slicing")
        return self._slice(x, items[1:], out)

    def _narrow(self, args, kwargs):
        b = _bind(args, kwargs, ["input", "dim", "start", "length"], {})
        x = b["input"]
        d = self._spatial_dim(x, int(b["dim"]), "narrow")
        start = int(b["start"]) % x.shape[d]
        with torch._C.DisableTorchFunction():
            out = x.narrow(d, start, int(b["length"]))
        slices = self._full_slices(x)
        slices[d - 1] = slice(start, start + int(b["length"]))
        return self._slice(x, slices, out)

    def _split(self, func, args, kwargs):
        x = args[0]
        name = getattr(func, "__name__", "split")
        default_dim = 0
        dim = kwargs.get("dim", args[2] if len(args) > 2 else default_dim)
        d = self._spatial_dim(x, int(dim), f"'{name}'")
        with torch._C.DisableTorchFunction():
            parts = func(*args, **kwargs)
        outs, start = [], 0
        for part in parts:  # consecutive blocks along d, in order
            slices = self._full_slices(x)
            slices[d - 1] = slice(start, start + part.shape[d])
            start += part.shape[d]
            outs.append(self._slice(x, slices, part))
        return tuple(outs)

    def _interpolate(self, func, args, kwargs):
        b = _bind(args, kwargs, ["input", "size", "scale_factor", "mode", "align_corners",
                                 "recompute_scale_factor", "antialias"],
                  {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
                   "recompute_scale_factor": None, "antialias": False})
        x, mode = b["input"], b["mode"]
        with torch._C.DisableTorchFunction():
            out = func(*args, **kwargs)
        if mode not in ("nearest", "nearest-exact", "linear", "bilinear", "trilinear") or b[
            "antialias"
        ]:
            raise self.unsupported(f"interpolation with mode '{mode}'",
                                    "Supported: nearest, nearest-exact, (bi/tri)linear.")
        in_sp, out_sp = tuple(x.shape[2:]), tuple(out.shape[2:])
        scales = b["scale_factor"]
        if scales is None or b["recompute_scale_factor"]:
            scales = [None] * len(in_sp)
        elif not isinstance(scales, list | tuple):
            scales = [float(scales)] * len(in_sp)
        axes = [ops.interpolate_axis(i, o, mode, b["align_corners"], s, x.device, x.dtype)
                for i, o, s in zip(in_sp, out_sp, scales, strict=True)]
        op = ops.ResampleOp(self.where, axes, in_sp, out_sp)
        self._check_resample(op, x, out, f"interpolation with mode '{mode}'")
        return self._record(op, [x], out)

    def _check_resample(self, op: ops.ResampleOp, x: Tensor, out: Tensor, what: str) -> None:
        """The tables must reproduce what the model computed; otherwise refuse (never a
        silently wrong decomposition)."""
        with torch._C.DisableTorchFunction(), torch.no_grad():
            again = op.forward(x.detach())
            scale = out.detach().abs().max().clamp_min(1e-30)
            tol = 1e-4 if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-9
            if not bool(((again - out.detach()).abs().max() / scale) <= tol):
                raise self.unsupported(
                    f"{what} from {tuple(x.shape[2:])} to {tuple(out.shape[2:])}",
                    "Its sampling positions could not be reproduced exactly.")

    def _gate(self, a: Tensor, b: Tensor) -> Tensor:
        """``a * b`` with both factors input-dependent: the gate (docs/srd.md) is a constant
        weight and the other factor the signal; refused when neither is a gate."""
        na, nb = self.node_of(a), self.node_of(b)
        out_shape = torch.broadcast_shapes(a.shape, b.shape)
        gate = signal = None
        if a.shape != b.shape:
            if tuple(b.shape) != tuple(out_shape) and tuple(a.shape) == tuple(out_shape):
                signal, gate = a, b
            elif tuple(a.shape) != tuple(out_shape) and tuple(b.shape) == tuple(out_shape):
                signal, gate = b, a
        else:
            which = _same_shape_gate(a, b, na, nb)
            if which is not None:
                signal, gate = (b, a) if which == 0 else (a, b)
        if gate is None or signal.dim() < 2:
            raise self.unsupported(
                f"a product of two input-dependent tensors of shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)} where neither is a gate",
                "A gate is a factor broadcast over the other (squeeze-excitation, spatial "
                "attention) or, with equal shapes, the direct output of a sigmoid or "
                "hard-sigmoid, or of an activation when the other factor is not one (GLU "
                "variants); its value is then a constant weight (docs/srd.md). Attention "
                "products are not decomposed by this engine.")
        out = self.gate_apply(signal, gate)
        # inside ``differentiable`` the bias shares must depend on the gate's value too
        op = ops.PointwiseScale(self.where, gate if is_differentiable() else gate.detach())
        op.kind = "gate"
        return self._record(op, [signal], out)

    # -- channels-last tensors and normalisation -----------------------------------------------
    def _relaid(self, x: Tensor, dims: Sequence[int], perm: tuple[int, ...] | None) -> Tensor:
        """``x.permute(dims)`` (the same values) recorded with layout ``perm`` (None:
        canonical): a model's permute, and how a channels-last tensor enters a call in the
        canonical layout and its result leaves."""
        with torch._C.DisableTorchFunction():
            view = x.permute(tuple(dims))
        op = ops.IdentityOp(self.where)
        op.kind = "layout"
        out = self._record(op, [x], view)
        self.node_of(out).perm = perm
        return out

    @staticmethod
    def _permuted_dims(func, args, kwargs, ndim: int) -> tuple[int, ...]:
        """The permutation of the axes a transpose or permute call makes, as ``permute``'s
        ``dims`` (non-negative)."""
        if func in TRANSPOSE_FUNCS:
            names = ("dim0", "dim1") if "dim0" in kwargs else ("axis0", "axis1")
            pair = [*args[1:3], *(kwargs[k] for k in names if k in kwargs)]
            swapped = list(range(ndim))
            a, b = (int(d) % ndim for d in pair)
            swapped[a], swapped[b] = swapped[b], swapped[a]
            return tuple(swapped)
        dims = kwargs.get("dims", args[1:] if len(args) > 2 or not isinstance(
            args[1] if len(args) > 1 else None, list | tuple) else args[1])
        return tuple(int(d) % ndim for d in dims)

    def _permute(self, func, args, kwargs):
        x = args[0]
        dims = self._permuted_dims(func, args, kwargs, x.dim())
        current = self.node_of(x).perm or tuple(range(x.dim()))
        new = tuple(current[d] for d in dims)
        if new == tuple(range(x.dim())):
            return self._relaid(x, dims, None)
        if x.dim() >= 3 and new == channels_last_perm(x.dim()):
            return self._relaid(x, dims, new)
        raise self.unsupported(
            f"the operation '{func_name(func)}'",
            f"It permutes the axes {dims} of a tensor of shape {tuple(x.shape)}; only moving "
            "the channel axis last and back keeps pointwise feature vectors (ConvNeXt's "
            "channels-last blocks, a text model's (N, L, E) embeddings).", moves_values=True)

    def _in_canonical_layout(self, func, args, kwargs, perms: set) -> Any:
        """Run a call on a channels-last tensor in the canonical layout and give the model
        the result channels-last again."""
        if len(perms) != 1:
            raise self.unsupported(f"'{func_name(func)}' on tensors of different layouts")
        perm = next(iter(perms))
        if perm is not None and func in SPLIT_FUNCS | CAT_FUNCS | MEAN_FUNCS:
            return self._along_canonical_dim(func, args, kwargs, perm)
        if perm is None or func not in LAYOUT_AWARE:
            raise self.unsupported(
                f"'{func_name(func)}' on a channels-last tensor",
                "Channels-last blocks may hold dense layers, LayerNorm, activations, sums "
                "and per-channel scales.", moves_values=func in MOVING_FUNCS)
        inv = _inverse(perm)
        ndim = len(perm)

        def canonical(obj: Any) -> Any:
            if not isinstance(obj, Tensor):
                return obj
            if self.node_of(obj) is not None:
                return self._relaid(obj, inv, None)
            if obj.dim() == 0:
                return obj
            # a constant broadcast against the channels-last tensor (layer scale, a bias)
            with torch._C.DisableTorchFunction():
                full = obj.reshape((1,) * (ndim - obj.dim()) + tuple(obj.shape))
                return full.permute(inv)

        if func is F.linear:
            out = self._dense_as_conv(args, kwargs, canonical)
        elif func is F.layer_norm:
            b = _bind(args, kwargs, ["input", "normalized_shape", "weight", "bias", "eps"],
                      {"weight": None, "bias": None, "eps": 1e-5})
            x = b["input"]
            if tuple(b["normalized_shape"]) != (x.shape[-1],):
                raise self.unsupported(
                    f"a LayerNorm over {tuple(b['normalized_shape'])} of a channels-last "
                    f"tensor of shape {tuple(x.shape)}")
            out = self._layer_norm_channels(canonical(x), b["weight"], b["bias"], b["eps"])
        else:
            c_args = tuple(canonical(a) for a in args)
            c_kwargs = {k: canonical(v) for k, v in kwargs.items()}
            out = self._dispatch(func, c_args, c_kwargs)
        return self._relaid(out, perm, perm)

    def _along_canonical_dim(self, func, args, kwargs, perm: tuple[int, ...]) -> Any:
        """A split, a concatenation or a mean of channels-last tensors (MambaOut's and gMLP's
        gated blocks split their channels with ``dim=-1``, MambaOut's head averages over
        ``(1, 2)``): the same call along the matching axes of the canonical layout (axis
        ``d`` of the channels-last view is axis ``perm[d]``), its results given back
        channels-last (a mean without ``keepdim``: as they are, its positions gone)."""
        position = 2 if func in SPLIT_FUNCS else 1
        tensors = args[0]
        ndim = (tensors[0] if func in CAT_FUNCS else tensors).dim()
        dim = kwargs.get("dim", args[position] if len(args) > position else 0)
        if func in MEAN_FUNCS and dim is None:
            raise self.unsupported("a mean over all dimensions")
        dims = [int(d) % ndim for d in (dim if isinstance(dim, list | tuple) else (dim,))]
        mapped = tuple(perm[d] for d in dims) if isinstance(dim, list | tuple) else perm[dims[0]]
        inv = _inverse(perm)
        moved = ([self._relaid(t, inv, None) for t in tensors] if func in CAT_FUNCS
                 else self._relaid(tensors, inv, None))
        rest = [*args[1:position], mapped, *args[position + 1:]]
        kw = {k: v for k, v in kwargs.items() if k != "dim"}
        out = self._dispatch(func, (moved, *rest), kw)

        def back(t: Tensor) -> Tensor:
            # a mean without keepdim has no channels-last layout left
            return t if t.dim() != ndim else self._relaid(t, perm, perm)

        return back(out) if isinstance(out, Tensor) else tuple(back(t) for t in out)

    def _dense_as_conv(self, args, kwargs, canonical) -> Tensor:
        """A dense layer on the channel axis of a channels-last map: a 1x1 convolution."""
        b = _bind(args, kwargs, ["input", "weight", "bias"], {"bias": None})
        x = canonical(b["input"])
        d = x.dim() - 2
        weight = b["weight"].detach()
        weight = weight.reshape(*weight.shape, *([1] * d))
        bias = None if b["bias"] is None else b["bias"].detach()
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
        with torch._C.DisableTorchFunction():
            out = conv(x, weight, bias)
        op = ops.ConvOp(self.where, weight,
                        None if bias is None else bias.reshape(1, -1, *([1] * d)),
                        (1,) * d, (0,) * d, (1,) * d, 1, x.shape[2:], out.shape[2:])
        op.dense = True  # the model's dense layer (LRP composites give it the dense rule)
        return self._record(op, [x], out)

    def _norm(self, func, args, kwargs):
        if func is F.layer_norm:
            b = _bind(args, kwargs, ["input", "normalized_shape", "weight", "bias", "eps"],
                      {"weight": None, "bias": None, "eps": 1e-5})
            x = b["input"]
            if x.dim() != 2 or tuple(b["normalized_shape"]) != (x.shape[1],):
                raise self.unsupported(
                    f"a LayerNorm over {tuple(b['normalized_shape'])} of a tensor of shape "
                    f"{tuple(x.shape)}",
                    "A LayerNorm over the channels of a (batch, channels) vector or of a "
                    "channels-last map is decomposed. For vision transformers use "
                    "method='srd_tokens', 'abslrp' or 'attnlrp'.")
            return self._layer_norm_channels(x, b["weight"], b["bias"], b["eps"])
        b = _bind(args, kwargs, ["input", "num_groups", "weight", "bias", "eps"],
                  {"weight": None, "bias": None, "eps": 1e-5})
        x, groups = b["input"], int(b["num_groups"])
        n, c = x.shape[:2]
        dims = (1,) * (x.dim() - 2)

        def statistics(t: Tensor) -> tuple[Tensor, Tensor]:
            flat = t.reshape(n, groups, -1)
            mean = flat.mean(-1, keepdim=True)
            var = flat.var(-1, unbiased=False, keepdim=True)
            return tuple(s.expand(n, groups, c // groups).reshape(n, c, *dims)
                         for s in (mean, var))

        def fn(t: Tensor) -> Tensor:
            return F.group_norm(t, groups, b["weight"], b["bias"], b["eps"])

        return self._constant_statistics(x, statistics, b["weight"], b["bias"], b["eps"], fn,
                                         "groupnorm")

    def _layer_norm_channels(self, x: Tensor, weight, bias, eps) -> Tensor:
        """LayerNorm over the channel axis of a canonical (N, C, *S) tensor."""
        c = x.shape[1]

        def statistics(t: Tensor) -> tuple[Tensor, Tensor]:
            return t.mean(1, keepdim=True), t.var(1, unbiased=False, keepdim=True)

        def fn(t: Tensor) -> Tensor:
            return F.layer_norm(t.movedim(1, -1), (c,), weight, bias, eps).movedim(-1, 1)

        return self._constant_statistics(x, statistics, weight, bias, eps, fn, "layernorm")

    def _constant_statistics(self, x, statistics, weight, bias, eps, fn, kind) -> Tensor:
        """A norm as the pointwise affine map ``x * scale + shift`` with its statistics fixed
        (docs/srd.md): ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``."""
        if self.norm_apply is None:
            raise self.unsupported(
                f"a {'LayerNorm' if kind == 'layernorm' else 'GroupNorm'} (its statistics "
                "depend on the input)",
                "For vision transformers use method='srd_tokens', 'abslrp' or 'attnlrp'; for "
                "other models a gradient method.")
        with torch._C.DisableTorchFunction():
            source = x if is_differentiable() else x.detach()
            mean, var = statistics(source)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            inv_std = torch.rsqrt(var + eps)
            scale = inv_std
            if weight is not None:
                scale = scale * weight.detach().reshape(shape)
            shift = -mean * scale
            if bias is not None:
                shift = shift + bias.detach().reshape(shape)
            out = self.norm_apply(x, scale, fn)
        # inside ``differentiable`` the bias shares must depend on the statistics too
        keep = (lambda t: t) if is_differentiable() else (lambda t: t.detach())
        op = ops.PointwiseScale(self.where, keep(scale), bias=keep(shift))
        op.kind = kind
        if kind == "layernorm":  # weight per channel times 1 / std per sample and position
            op.factors = (None if weight is None else weight.detach().reshape(-1),
                          keep(inv_std))
        return self._record(op, [x], out)
