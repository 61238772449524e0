"""Operation-level tracing for relevance rules that act on every computing call.

The PFV engine (``graph.py``) decomposes CNN layers into the components SRD needs. Rules of
the LRP family for transformers (absLRP, AttnLRP, CP-LRP) need less structure but more
coverage: every call that computes something (convolution, dense layer, matrix product of two
activations, softmax, LayerNorm, activation, pooling, sums and products) gets the rule's own
backward, and calls that only move values (views, permutes, indexing, concatenation) keep
autograd's, which moves the backward signal the same way.

:class:`OpTrace` runs a model under :class:`OpTracer`, the operation view of the tracing core
(``tracer.py``: tracking, in-place calls, module names and checks live there). Each computing
call whose inputs depend on the model input becomes an :class:`OpCall` (its kind, the module
it ran in, and a recipe to run it again on other inputs or with modified parameters) and its
output is produced by :class:`_OpFunction`, whose backward asks the :class:`OpRule`. The
forward values are the model's own (computed by the original call).

In-place calls on traced tensors run out of place (the core makes the old tensor an alias of
the result); writing into a traced tensor by index is refused.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from ..errors import UnsupportedOperationError
from .catalogue import (
    ACTIVATIONS,
    DROPOUT,
    MOVING,
    dropout_in_training,
    func_name,
    gate_factor,
    number_exponent,
    unfold_filled,
)
from .gradmode import building_graph, is_differentiable
from .tracer import Tracer

Tensor = torch.Tensor

# --- which calls compute and which only move values -------------------------------------------

CONV = {F.conv1d, F.conv2d, F.conv3d}
LINEAR = {F.linear}
MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm,
          Tensor.bmm, torch.einsum}
BATCH_NORM = {F.batch_norm}
LAYER_NORM = {F.layer_norm}
#: ``x / max(||x||_p, eps)`` along one axis (Swin V2's cosine attention)
NORMALIZE = {F.normalize}
SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax}
ADD = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__}
SUB = {torch.sub, Tensor.sub, Tensor.__sub__, Tensor.__rsub__}
MUL = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
DIV = {torch.div, Tensor.div, Tensor.__truediv__, Tensor.__rtruediv__}
NEG = {torch.neg, Tensor.neg, Tensor.__neg__}
MAX_POOL = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
            F.adaptive_max_pool2d, torch.amax, Tensor.amax}
AVG_POOL = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, Tensor.mean,
            torch.sum, Tensor.sum,
            # upsampling (nearest, (bi)linear): a weighted mean of input positions with
            # non-negative weights, linear like the averages above; F.fold sums the
            # overlapping windows back into a map (VOLO's outlook attention)
            F.interpolate, F.upsample, F.fold}
#: resampling: each output entry a weighted mean of nearby input entries
RESAMPLE = {F.interpolate, F.upsample}
#: reductions over some dimensions of a tensor: the output is laid out as the input (tokens
#: stay tokens, a map stays a map), so it keeps the input's producer (:class:`TensorFacts`)
REDUCTIONS = {torch.amax, Tensor.amax, torch.mean, Tensor.mean, torch.sum, Tensor.sum}
SDPA = {F.scaled_dot_product_attention}
#: ``nn.MultiheadAttention``'s function (torchvision's ViT, ``nn.TransformerEncoderLayer``)
MULTI_HEAD_ATTENTION = {F.multi_head_attention_forward}
_MHA_ARGUMENTS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
                  "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p",
                  "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
                  "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
                  "k_proj_weight", "v_proj_weight", "static_k", "static_v",
                  "average_attn_weights", "is_causal")
MOVE = MOVING
MOVE_PROPERTIES = {"T", "mT", "H", "mH"}

#: the kinds of computing calls, in the words of the rules
KINDS = ("conv", "linear", "matmul", "batch_norm", "layer_norm", "normalize", "activation",
         "softmax",
         "add", "sub", "mul", "div", "max_pool", "avg_pool", "scale")


def detached_layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
                        bias: Tensor | None = None, eps: float = 1e-5, *,
                        statistics_of: Tensor | None = None) -> Tensor:
    """LayerNorm whose mean and variance are constants for autograd (linear in ``x``).

    ``statistics_of``: take them from this tensor, undetached (how :meth:`OpCall.vjp` keeps
    a differentiable map's dependence on them; see ``constant_statistics``).
    """
    dims = tuple(range(-len(normalized_shape), 0))
    source = x.detach() if statistics_of is None else statistics_of
    mean = source.mean(dims, keepdim=True)
    var = source.var(dims, keepdim=True, unbiased=False)
    y = (x - mean) / (var + eps).sqrt()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def detached_normalize(x: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12,
                       out: Tensor | None = None, *,
                       statistics_of: Tensor | None = None) -> Tensor:
    """``F.normalize`` with the norm a constant for autograd (linear in ``x``): the LRP form
    of a normalisation, as LayerNorm's detached statistics (``statistics_of``: as in
    :func:`detached_layer_norm`)."""
    if out is not None:
        raise ValueError("detached_normalize does not write into out=")
    source = x.detach() if statistics_of is None else statistics_of
    return x / torch.linalg.vector_norm(source, p, dim, keepdim=True).clamp_min(eps)


def detached_softmax(x: Tensor, dim: int | None = None, *args: Any,
                     statistics_of: Tensor | None = None, **kwargs: Any) -> Tensor:
    """Softmax whose maximum and denominator are constants for autograd."""
    if dim is None:
        dim = kwargs.get("dim", -1)
    if statistics_of is None:
        e = (x - x.amax(dim, keepdim=True).detach()).exp()
        return e / e.sum(dim, keepdim=True).detach()
    shift = statistics_of.amax(dim, keepdim=True).detach()  # cancels out: any constant will do
    return (x - shift).exp() / (statistics_of - shift).exp().sum(dim, keepdim=True)


def constant_statistics(func: Callable) -> Callable:
    """Mark ``func`` as an LRP form whose statistics are autograd constants, computed from its
    first input unless the keyword ``statistics_of`` names another tensor."""
    func.constant_statistics = True  # type: ignore[attr-defined]
    return func


constant_statistics(detached_layer_norm)
constant_statistics(detached_normalize)
constant_statistics(detached_softmax)


def _is_number(obj: Any) -> bool:
    if isinstance(obj, bool):
        return False
    if isinstance(obj, int | float):
        return True
    return isinstance(obj, Tensor) and obj.dim() == 0


class _Input:
    """Placeholder for the ``index``-th traced input of a recorded call."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Keep:
    """A tensor argument that is not a parameter (BatchNorm's running statistics): kept as it
    is when the rule modifies parameters."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class PaddedMaxPool:
    """``pool(F.pad(u, pad, value=-inf), ...)``: max pooling of a tensor the model padded
    with ``-inf`` first, as one call (the operation view records it so)."""

    def __init__(self, pool: Callable, pad: Sequence[int]):
        self.pool, self.pad = pool, tuple(pad)
        self.__name__ = getattr(pool, "__name__", "max_pool")

    def __call__(self, u: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.pool(F.pad(u, self.pad, value=float("-inf")), *args, **kwargs)


class OpCall:
    """One computing call of the forward pass: its kind, where it ran, and how to run it again.

    ``run(inputs, param=f)`` repeats the call on other values of its traced inputs, with
    ``f`` applied to every parameter tensor (weights, biases, position embeddings; not
    BatchNorm's running statistics). LayerNorm and softmax run again in their *detached* form
    (statistics, maximum and denominator constant), absLRP's; ``func=call.original`` runs what
    the model called.
    """

    __slots__ = ("kind", "name", "func", "original", "args", "kwargs", "n_inputs", "index",
                 "constant", "producers", "gate", "weights", "grouped")

    def __init__(self, kind: str, name: str, func: Callable, args: tuple, kwargs: dict,
                 n_inputs: int, index: int, original: Callable | None = None):
        self.kind, self.name, self.func = kind, name, func
        self.original = original or func  # what the model called (``func``: the LRP form)
        self.args, self.kwargs, self.n_inputs, self.index = args, kwargs, n_inputs, index
        #: with a rule that asks for them (``OpRule.constant_parts``): per traced input, a
        #: bool mask of its entries that do not depend on the model input (a class token
        #: concatenated to the patch tokens), or None where every entry depends on it
        self.constant: tuple[Tensor | None, ...] = (None,) * n_inputs
        #: with the same rules: per traced input, the kind of the computing call that made
        #: it (through elementwise calls; None after calls that only move values)
        self.producers: tuple[str | None, ...] = (None,) * n_inputs
        #: with the same rules, for a product of two equally shaped traced tensors: which
        #: one is a gate as the PFV engine tells (docs/srd.md): a sigmoid's (hard-sigmoid's)
        #: output where the other is not, else another activation's output where the other
        #: is neither an activation's output nor that activation's input (GLU variants); None
        self.gate: int | None = None
        #: with the same rules, per traced input: made from a softmax's output alone (through
        #: views and calls on it and constants only: CaiT's talking-heads projection), i.e.
        #: attention weights
        self.weights: tuple[bool, ...] = (False,) * n_inputs
        #: a LayerNorm that is one group of a GroupNorm (over the group's channels and
        #: positions of an (N, C, ...) map): its input's vectors lie along dim 1
        self.grouped = False

    def __repr__(self) -> str:
        return f"OpCall({self.kind}, {func_name(self.func)}, in '{self.name}')"

    def run(self, inputs: Sequence[Tensor], param: Callable[[Tensor], Tensor] | None = None,
            func: Callable | None = None) -> Tensor:
        def fill(obj: Any) -> Any:
            if isinstance(obj, _Input):
                return inputs[obj.index]
            if isinstance(obj, _Keep):
                return obj.tensor
            if param is not None and isinstance(obj, Tensor) and obj.is_floating_point():
                return param(obj)
            return obj

        args = tuple(fill(a) for a in self.args)
        kwargs = {k: fill(v) for k, v in self.kwargs.items()}
        with torch._C.DisableTorchFunction():
            return (func or self.func)(*args, **kwargs)

    def vjp(self, inputs: Sequence[Tensor], grad: Tensor,
            param: Callable[[Tensor], Tensor] | None = None,
            func: Callable | None = None) -> list[Tensor]:
        """``J^T grad`` for each input, the Jacobian of ``func`` (default: :attr:`func`, the
        detached LRP form) taken at ``inputs`` (autograd).

        In a backward pass run with ``create_graph=True`` the result stays differentiable with
        respect to ``inputs`` and ``grad``; the statistics of a ``constant_statistics`` form are
        then computed from the undetached input, so they are constant for this Jacobian but
        not for the derivative of the result.
        """
        func = func or self.func
        if building_graph(grad, *inputs):
            leaves = [x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
                      for x in inputs]
            if getattr(func, "constant_statistics", False):
                first = inputs[0]
                func = functools.partial(func, statistics_of=first)
            out = self.run(leaves, param, func)
            grads = torch.autograd.grad(out, leaves, grad, allow_unused=True, create_graph=True)
        else:
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            with torch.enable_grad():
                out = self.run(leaves, param, func)
                grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads,
                                                                         strict=True)]

    def argument(self, position: int, name: str, default: Any = None) -> Any:
        """An argument of the original call, by position or keyword (placeholders as such)."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else default

    def is_input(self, position: int, name: str) -> bool:
        """The argument at ``position`` (or keyword ``name``) depends on the model input."""
        return isinstance(self.argument(position, name), _Input)

    def batch_norm_affine(self) -> tuple[Tensor, Tensor] | None:
        """An eval BatchNorm call as ``y = x * scale + shift`` per channel: ``(scale,
        shift)``, 1-D, or None without running statistics."""
        mean, var = self.kept_argument(1, "running_mean"), self.kept_argument(2, "running_var")
        if mean is None or var is None:
            return None
        gamma, beta = self.argument(3, "weight"), self.argument(4, "bias")
        scale = (gamma if gamma is not None else 1.0) / (var + self.argument(7, "eps", 1e-5)).sqrt()
        shift = -mean * scale
        return scale, shift + beta if beta is not None else shift

    def kept_argument(self, position: int, name: str) -> Tensor | None:
        """A tensor argument that is not a parameter (BatchNorm's running statistics), or
        None if the call has none there."""
        value = self.argument(position, name)
        return value.tensor if isinstance(value, _Keep) else None


class OpRule:
    """What a method does at each computing call (subclass and override).

    ``kinds``: the kinds whose backward the rule replaces; calls of other kinds keep
    autograd's backward. ``op_backward`` returns, for each traced input of the call, what flows
    to it. ``on_call`` sees every computing call in the forward pass with its inputs and
    output (and may return a replacement output).
    """

    kinds: frozenset[str] = frozenset()
    #: every replaced backward is autograd's again (see ``engine.core.differentiable``)
    plain: bool = False
    #: ``"error"``: a computing call the tracer has no kind for raises; ``"gradient"``: it
    #: keeps autograd's backward
    unknown: str = "error"
    #: follow which entries of traced tensors do not depend on the input (parameters
    #: concatenated to input-dependent ones: class, distillation and register tokens) and
    #: hand them to the rule as ``OpCall.constant``; rules that treat such parts as constant
    #: terms (SRD) need it, the others skip its cost
    constant_parts: bool = False

    def op_backward(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
                    grad: Tensor) -> Sequence[Tensor | None]:
        return call.vjp(inputs, grad)

    def on_call(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        return output

    def on_move(self, func: Callable, args: tuple, kwargs: dict, output: Any) -> None:
        """Sees every call that only moves values (views, permutes, indexing, concatenation,
        padding, eval dropout) after it ran: ``func(*args, **kwargs)`` gave ``output``."""

    def to_gradient(self) -> None:
        """From now on the traced graph differentiates as the unmodified model."""
        self.plain = True


class RecordingRule(OpRule):
    """Records the calls and changes nothing: every backward is autograd's, and a call the
    tracer has no kind for is allowed (a probe of the model's structure)."""

    unknown = "gradient"


class TensorFacts:
    """What the operation view attaches to a traced tensor for a rule with
    ``constant_parts``: ``mask`` (bool, the tensor's shape, or None) is True at the entries
    that do not depend on the input; ``producer`` is the kind of the computing call that made
    it, through elementwise calls and reductions such as means and ``amax`` (None after a call
    that only moves values): a rule can tell
    an (N, C, H, W) feature map made by a convolution from channels-last tokens;
    ``weights``: whether it was made from a softmax's output alone (attention weights, also
    after views and calls on them and constants only)."""

    __slots__ = ("mask", "producer", "activation", "pre", "weights")

    def __init__(self, mask: Tensor | None, producer: str | None = None,
                 activation: str | None = None, pre: weakref.ref | None = None,
                 weights: bool = False):
        self.mask = mask
        self.producer = producer
        # for an activation's output (not moved since): its name and a weak reference to its
        # input (held weakly: a ViT's every MLP hidden layer would otherwise stay alive)
        self.activation, self.pre = activation, pre
        self.weights = weights  # made from a softmax's output alone: attention weights


def is_elementwise(kind: str, n_inputs: int) -> bool:
    """A call whose output entry depends on the same entry of its one traced input only
    (activations, scalings, arithmetic with a parameter): it keeps its input's constant
    entries and producer."""
    return kind in ("activation", "scale") or (kind in ("add", "sub", "mul", "div")
                                                and n_inputs == 1)


def _any_dependent(mask: Tensor, dims: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Constant where every entry over ``dims`` is: the mask of an output computed from
    whole vectors along ``dims`` (a dense layer, a LayerNorm), broadcast to ``shape``."""
    return mask.all(dim=tuple(dims), keepdim=True).expand(*shape)


class _OpNode:
    """What an :class:`_OpFunction` needs in its backward."""

    __slots__ = ("call", "rule", "output")

    def __init__(self, call: OpCall, rule: OpRule, output: Tensor):
        self.call, self.rule, self.output = call, rule, output


class _OpFunction(torch.autograd.Function):
    """The output of a computing call; backward: the rule's ``op_backward``."""

    @staticmethod
    def forward(ctx, node, *inputs):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.call, ctx.rule = node.call, node.rule
        ctx.save_for_backward(*inputs, node.output)
        return node.output

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved = ctx.saved_tensors
        inputs, output = saved[:-1], saved[-1]
        if grad is None:
            return (None,) * (len(inputs) + 1)
        if ctx.rule.plain:
            return (None, *ctx.call.vjp(inputs, grad, func=ctx.call.original))
        grads = ctx.rule.op_backward(ctx.call, inputs, output, grad)
        return (None, *grads)


class _Relevance(torch.autograd.Function):
    """Multiplication by a number in a relevance-space rule: the signal passes unchanged."""

    @staticmethod
    def forward(ctx, node, x):  # type: ignore[override]
        ctx.call, ctx.rule = node.call, node.rule
        ctx.save_for_backward(x)
        return node.output

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.rule.plain:
            (x,) = ctx.saved_tensors
            return None, ctx.call.vjp([x], grad, func=ctx.call.original)[0]
        return None, grad


class OpTracer(Tracer):
    """The operation view of the tracing core (see the module docstring)."""

    def __init__(self, rule: OpRule):
        super().__init__()
        self.rule = rule
        self.calls: list[OpCall] = []
        # id(tensor) -> (tensor, tensor.unbind(0)): see :meth:`_move`
        self._unbound: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}
        self._grouping = False  # inside a GroupNorm: its LayerNorm calls are marked grouped
        #: tensors padded with -inf -> (the tensor padded, the padding): only max pooling may
        #: read them (:meth:`_record`)
        self._max_only: Any = WeakTensorKeyDictionary()

    def _move(self, func, args, kwargs) -> Any:
        """Run a value-moving call. ``t[i]`` with an integer ``i`` is taken from one shared
        ``t.unbind(0)``, the same view: a ViT's ``q, k, v = qkv[0], qkv[1], qkv[2]`` then
        sends its relevance back through one stacking of the three parts, where three
        separate selections would each fill a zero tensor of ``qkv``'s size and two more
        passes would add them (about 5% of a contrastive absLRP pass on ViT-B/16). Safe
        because in-place calls on traced tensors run out of place here: no unbound view is
        ever written to."""
        if (func is Tensor.__getitem__ and len(args) == 2 and not kwargs
                and type(args[1]) is int and isinstance(args[0], Tensor)
                and args[0].dim() > 0 and -args[0].shape[0] <= args[1] < args[0].shape[0]):
            t = args[0]
            entry = self._unbound.get(id(t))
            if entry is None or entry[0] is not t:
                entry = self._unbound[id(t)] = (t, t.unbind(0))
            return entry[1][args[1]]
        return func(*args, **kwargs)

    def _track_outputs(self, out: Any, masks: Any = None, weights: bool = False,
                       moved: TensorFacts | None = None) -> Any:
        """Track a call's floating outputs. ``moved``: the facts of the activation output a
        value-moving call moved (its values stay that activation's outputs)."""
        flat = tree_flatten(out)[0]
        flat_masks = tree_flatten(masks)[0] if masks is not None else [None] * len(flat)
        if len(flat_masks) != len(flat):
            flat_masks = [None] * len(flat)
        made = (moved.activation, moved.pre) if moved is not None else (None, None)
        for t, m in zip(flat, flat_masks, strict=True):
            if isinstance(t, Tensor) and t.is_floating_point():
                partly = (isinstance(m, Tensor) and m.shape == t.shape and bool(m.any()))
                if partly or weights or moved is not None:
                    self.track(t, TensorFacts(m if partly else None, None, *made,
                                              weights=weights))
                else:
                    self.track(t, True)
        return out

    def _moved_activation(self, args) -> TensorFacts | None:
        """The facts of an activation's output that a value-moving call moves as its first
        argument (ECA's ``sigmoid(y).view(N, C, 1, 1).expand_as(x)``), so that a product
        still tells it for a gate, as the PFV engine does; None otherwise."""
        entry = self.entry_of(args[0]) if args else None
        return entry if isinstance(entry, TensorFacts) and entry.activation else None

    def weights_of(self, obj: Any) -> bool:
        """Whether a traced tensor was made from a softmax's output alone (see
        :class:`TensorFacts`)."""
        entry = self.entry_of(obj)
        return isinstance(entry, TensorFacts) and entry.weights

    def _moved_weights(self, args, kwargs) -> bool:
        """Whether a value-moving call moves attention weights only (a global-context
        block's ``softmax(...).unsqueeze(3)``): every traced tensor among its arguments is."""
        flat = [t for t in tree_flatten((args, kwargs))[0] if self.is_tracked(t)]
        return bool(flat) and all(self.weights_of(t) for t in flat)

    def producer_of(self, obj: Any) -> str | None:
        """The kind of the computing call that made a traced tensor (see
        :class:`TensorFacts`)."""
        entry = self.entry_of(obj)
        return entry.producer if isinstance(entry, TensorFacts) else None

    def _gate_of(self, a: Tensor, b: Tensor) -> int | None:
        """Which of two equally shaped factors is a gate (:attr:`OpCall.gate`)."""
        names, of_other = [], []
        for t, other in ((a, b), (b, a)):
            entry = self.entry_of(t)
            made = isinstance(entry, TensorFacts) and entry.activation is not None
            names.append(entry.activation if made else None)
            of_other.append(made and entry.pre is not None and entry.pre() is other)
        return gate_factor(names, of_other)

    # -- entries that do not depend on the input (``OpRule.constant_parts``) --------------------
    def constant_mask(self, obj: Any) -> Tensor | None:
        """The constant-entries mask of a traced tensor (None: every entry depends on the
        input)."""
        entry = self.entry_of(obj)
        return entry.mask if isinstance(entry, TensorFacts) else None

    def _moved_masks(self, func, args, kwargs) -> Any:
        """The masks of a value-moving call's outputs: the same call on the masks (True for
        an untracked floating tensor, such as a class token concatenated to the patches).
        None when no argument holds a constant entry (and the call pads none in)."""
        flat = tree_flatten((args, kwargs))[0]
        if func is not F.unfold and not any(
                isinstance(t, Tensor) and t.is_floating_point()
                and (not self.is_tracked(t) or self.constant_mask(t) is not None) for t in flat):
            return None

        def as_mask(obj: Any) -> Any:
            if not isinstance(obj, Tensor) or not obj.is_floating_point():
                return obj
            if not self.is_tracked(obj):
                return torch.ones(obj.shape, dtype=torch.bool, device=obj.device)
            mask = self.constant_mask(obj)
            return mask if mask is not None else torch.zeros(obj.shape, dtype=torch.bool,
                                                             device=obj.device)

        try:
            with torch._C.DisableTorchFunction():
                if func is F.unfold:  # its zero padding is constant
                    return unfold_filled(tree_map(as_mask, args), tree_map(as_mask, kwargs),
                                         True)
                return func(*tree_map(as_mask, args), **tree_map(as_mask, kwargs))
        except (RuntimeError, TypeError, ValueError):
            return None  # a call that does not take bool tensors: treated as input-dependent

    def _padded_mask(self, args, kwargs, mode: str) -> Tensor | None:
        """The constant entries of a padding's output: the input's own constant entries, moved
        as the values are, and, with zero padding, the padded entries (zeros, which do not
        depend on the input; Twins pads its token map to whole windows, whose padded tokens'
        values are then the qkv bias alone)."""
        x = args[0] if args else kwargs.get("input")
        pad = args[1] if len(args) > 1 else kwargs.get("pad")
        if not isinstance(x, Tensor) or not self.is_tracked(x) or not any(pad):
            return None
        mask = self.constant_mask(x)
        if mask is None and mode != "constant":
            return None  # copies of input-dependent entries
        with torch._C.DisableTorchFunction():
            inside = torch.zeros(x.shape, device=x.device) if mask is None else mask.float()
            if mode == "constant":
                return F.pad(inside, pad, value=1.0) > 0.5
            return F.pad(inside, pad, mode=mode) > 0.5

    def _computed_mask(self, call: OpCall, args, inputs: list[Tensor],
                       out: Tensor) -> Tensor | None:
        """Which entries of a computing call's output do not depend on the input."""
        masks = [self.constant_mask(t) for t in inputs]
        zeroed = self._zeroed(call, args, inputs, out)
        if zeroed is not None:  # x * c is 0 wherever the constant c is, whatever x is
            mask = masks[0]
            return zeroed if mask is None else zeroed | mask.expand(out.shape)
        if all(m is None for m in masks):
            return None
        full = [m if m is not None else torch.zeros(t.shape, dtype=torch.bool,
                                                    device=t.device)
                for m, t in zip(masks, inputs, strict=True)]
        shape, kind = out.shape, call.kind
        if is_elementwise(kind, len(inputs)) or kind == "batch_norm":
            mask = full[0]  # elementwise (per channel for BatchNorm)
            return mask.expand(shape) if mask.shape != shape else mask
        if kind in ("add", "sub", "mul", "div"):
            return (full[0] & full[1]).expand(shape)
        if kind in ("linear", "softmax"):
            return _any_dependent(full[0], (-1,), shape)
        if kind == "normalize":
            return _any_dependent(full[0], (call.argument(2, "dim", 1),), shape)
        if kind == "layer_norm":
            normalized = call.argument(1, "normalized_shape")
            dims = len(normalized) if isinstance(normalized, list | tuple) else 1
            return _any_dependent(full[0], tuple(range(-dims, 0)), shape)
        if kind == "matmul" and call.original is not torch.einsum and len(args) >= 2:
            a, b = args[0], args[1]
            ma = full[0] if self.is_tracked(a) else torch.ones(a.shape, dtype=torch.bool,
                                                                 device=a.device)
            mb = full[-1] if self.is_tracked(b) else torch.ones(b.shape, dtype=torch.bool,
                                                                device=b.device)
            if ma.dim() >= 2 and mb.dim() >= 2:
                k = ma.shape[-1]
                both = ma.to(torch.float64) @ mb.to(torch.float64)
                return (both == k).expand(shape)
        return None  # other kinds: treated as input-dependent

    def _zeroed(self, call: OpCall, args, inputs: list[Tensor], out: Tensor) -> Tensor | None:
        """For a product of one traced tensor and a constant (a padding mask's 0s and 1s:
        an LSTM keeping its state over padding, ``keep * h_new + (1 - keep) * h``), the
        output entries where the constant is 0; None where there are none."""
        if call.kind not in ("mul", "scale") or len(inputs) != 1 or \
                call.original not in MUL or len(args) < 2:
            return None
        other = args[1] if self.is_tracked(args[0]) else args[0]
        if isinstance(other, Tensor):
            zero = other.detach() == 0
            return zero.expand(out.shape) if bool(zero.any()) else None
        if _is_number(other) and other == 0:
            return torch.ones(out.shape, dtype=torch.bool, device=out.device)
        return None

    def unsupported(self, what: str, advice: str = "", fatal: bool = False,
                    moves_values: bool = False) -> UnsupportedOperationError:
        return super().unsupported(
            what, advice or (
                f"{type(self.rule).__name__} has rules for convolutions, dense layers, matrix "
                "products, eval BatchNorm, LayerNorm, elementwise activations, softmax, +, -, "
                "*, /, max/average pooling, means and sums, scaled dot-product attention, and "
                "calls that only move values (views, permutes, indexing, concatenation). "
                "Rewrite the model with these, or explain it with a gradient method."),
            fatal, moves_values)

    # -- the view --------------------------------------------------------------------------------
    def handle(self, func, args, kwargs, tracked):
        return self._dispatch(func, args, kwargs)

    def _dispatch(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as .T or .mT
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            out = func(*args, **kwargs)
            if prop not in MOVE_PROPERTIES:
                return out
            self._track_outputs(out)
            self.rule.on_move(func, args, kwargs, out)
            return out
        if func in MOVE:
            masks, weights, moved = None, False, None
            if self.rule.constant_parts:
                masks = self._moved_masks(func, args, kwargs)
                weights = self._moved_weights(args, kwargs)
                moved = self._moved_activation(args)
            out = self._track_outputs(self._move(func, args, kwargs), masks, weights, moved)
            if self._reads_max_only(args, kwargs):
                raise self.unsupported(
                    f"'{func_name(func)}' moving a tensor padded with -inf (only max pooling "
                    "may read it)")
            self.rule.on_move(func, args, kwargs, out)
            return out
        if func in DROPOUT:
            if dropout_in_training(func, args, kwargs):
                raise self.unsupported("dropout in training mode (call model.eval() first)")
            out = func(*args, **kwargs)
            # the identity in eval mode: what is known about the input holds for the output
            entry = self.entry_of(args[0]) if args else None
            if isinstance(out, Tensor) and entry is not None:
                self.track(out, entry)
            else:
                self._track_outputs(out)
            self.rule.on_move(func, args, kwargs, out)
            return out
        if func is F.pad:
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = kwargs.get("value", args[3] if len(args) > 3 else None)
            minus_inf = mode == "constant" and value is not None and not math.isfinite(value)
            if minus_inf and value != float("-inf"):
                raise self.unsupported(f"padding with mode '{mode}' and value {value}")
            # zero padding, or copies of the edge entries (reflect, replicate, circular: TResNet's
            # anti-aliasing), each moved as it is: autograd's backward sums the copies' relevance
            masks = self._padded_mask(args, kwargs, mode) if self.rule.constant_parts else None
            out = self._track_outputs(func(*args, **kwargs), masks)
            if minus_inf:  # only max pooling may read it, as one call with the padding
                self._max_only[out] = (args[0] if args else kwargs["input"],
                                       args[1] if len(args) > 1 else kwargs["pad"])
            self.rule.on_move(func, args, kwargs, out)
            return out
        if func in SDPA:
            return self._attention(args, kwargs)
        if func is F.group_norm:
            return self._group_norm(args, kwargs)
        if func in (torch.max, Tensor.max) and isinstance(
                kwargs.get("dim", args[1] if len(args) > 1 else None), int):
            return self._max_over(args, kwargs)
        if func in MULTI_HEAD_ATTENTION:
            return self._multi_head_attention(args, kwargs)
        kind = self._kind(func, args, kwargs)
        if kind is None:
            out = func(*args, **kwargs)
            if not any(isinstance(t, Tensor) and t.is_floating_point()
                       for t in tree_flatten(out)[0]):
                return out  # sizes, comparisons, indices ...
            if self.rule.unknown == "gradient":
                return self._track_outputs(out)
            raise self.unsupported(f"the operation '{func_name(func)}'")
        return self._record(kind, func, args, kwargs)

    def _kind(self, func, args, kwargs) -> str | None:
        if func in CONV:
            return "conv"
        if func in LINEAR:
            return "linear"
        if func in MATMUL:
            return "matmul"
        if func in BATCH_NORM:
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            if training:
                raise self.unsupported("BatchNorm in training mode (call model.eval() first)")
            return "batch_norm"
        if func in LAYER_NORM:
            return "layer_norm"
        if func in NORMALIZE:
            return "normalize"
        if func in ACTIVATIONS and number_exponent(func, args, kwargs):
            return "activation"
        if func in SOFTMAX:
            return "softmax"
        if func in MAX_POOL:
            if kwargs.get("return_indices") or (func in (F.max_pool1d, F.max_pool2d,
                                                         F.max_pool3d) and len(args) > 6
                                                and args[6]):
                raise self.unsupported("max pooling that returns indices")
            return "max_pool"
        if func in AVG_POOL:
            return "avg_pool"
        if func in NEG:
            return "scale"
        operands = [a for a in args[:2]]
        if func in MUL or func in DIV:
            traced = [self.is_tracked(a) for a in operands]
            other = operands[1] if traced[0] else operands[0]
            if sum(traced) == 1 and _is_number(other) and (func in MUL or traced[0]):
                return "scale"
            return "mul" if func in MUL else "div"
        if func in ADD:
            return "add"
        if func in SUB:
            return "sub"
        return None

    def _reads_max_only(self, args: tuple, kwargs: dict) -> bool:
        """Whether a call reads a tensor padded with -inf (nothing to look for, and no
        flattening of the arguments, in the usual pass without one)."""
        return bool(self._max_only) and any(
            isinstance(t, Tensor) and t in self._max_only
            for t in tree_flatten((args, kwargs))[0])

    def _record(self, kind: str, func, args, kwargs) -> Any:
        inputs: list[Tensor] = []
        if kind == "max_pool" and args and isinstance(args[0], Tensor) and \
                args[0] in self._max_only:
            # timm's 'same' max pooling, NASNet's cells: F.pad(u, -inf) then max pooling,
            # recorded as one call on u, so that every rule running the call again (absLRP on
            # |u|) pads with -inf as the model did, and no rule meets -inf * 0
            source, pad = self._max_only[args[0]]
            func, args = PaddedMaxPool(func, pad), (source, *args[1:])
        elif self._reads_max_only(args, kwargs):
            raise self.unsupported(
                f"'{func_name(func)}' reading a tensor padded with -inf (only max pooling "
                "may: its windows never pick the padding)")

        def place(obj: Any) -> Any:
            if self.is_tracked(obj):
                inputs.append(obj)
                return _Input(len(inputs) - 1)
            return obj

        call_args = tuple(tree_map(place, a) if isinstance(a, list | tuple) else place(a)
                          for a in args)
        call_kwargs = {k: place(v) for k, v in kwargs.items()}
        differentiable = func
        if kind == "batch_norm":
            call_args = tuple(_Keep(a) if i in (1, 2) and isinstance(a, Tensor) else a
                              for i, a in enumerate(call_args))
            for key in ("running_mean", "running_var"):
                if isinstance(call_kwargs.get(key), Tensor):
                    call_kwargs[key] = _Keep(call_kwargs[key])
        elif kind == "layer_norm":
            differentiable = detached_layer_norm
        elif kind == "softmax":
            differentiable = detached_softmax
        elif kind == "normalize":
            differentiable = detached_normalize
        call = OpCall(kind, self.where, differentiable, call_args, call_kwargs,
                      len(inputs), len(self.calls), original=func)
        call.grouped = self._grouping and kind == "layer_norm"
        self.calls.append(call)
        if kind not in self.rule.kinds:
            out = func(*args, **kwargs)  # autograd's backward
        else:
            with torch.no_grad():
                value = func(*args, **kwargs)
            if not isinstance(value, Tensor):
                raise self.unsupported(f"'{func_name(func)}' returning several tensors")
            if kind == "scale":
                out = _Relevance.apply(_OpNode(call, self.rule, value), inputs[0])
            else:
                out = _OpFunction.apply(_OpNode(call, self.rule, value), *inputs)
        facts: Any = True
        if self.rule.constant_parts:
            call.constant = tuple(self.constant_mask(t) for t in inputs)
            call.producers = tuple(self.producer_of(t) for t in inputs)
            call.weights = tuple(self.weights_of(t) for t in inputs)
            if kind == "mul" and len(inputs) == 2 and inputs[0].shape == inputs[1].shape:
                call.gate = self._gate_of(*inputs)
            mask = None
            if isinstance(out, Tensor):
                mask = self._computed_mask(call, args, inputs, out)
            producer: str | None = kind
            if is_elementwise(kind, len(inputs)) or func in REDUCTIONS:
                producer = call.producers[0]
            elif kind in ("add", "sub") and len(inputs) == 2:
                known = {p for p in call.producers if p is not None}
                producer = known.pop() if len(known) == 1 else None
            made = ACTIVATIONS.get(func) if kind == "activation" else None
            pre = weakref.ref(inputs[0]) if made else None
            if func in RESAMPLE and len(inputs) == 1:
                # an activation's output resampled (GhostNetV2's attention gate, a sigmoid's
                # output upsampled to the signal's size) still tells for a gate, as a moved one
                moved = self._moved_activation((inputs[0],))
                if moved is not None:
                    made, pre = moved.activation, moved.pre
            weights = kind == "softmax" or (bool(inputs) and all(call.weights))
            facts = TensorFacts(mask if mask is not None and bool(mask.any()) else None,
                                producer, made, pre, weights)
        out = self.rule.on_call(call, inputs, out)
        self.track(out, facts)
        return out

    def _attention(self, args, kwargs):
        """``F.scaled_dot_product_attention`` as its three steps, each a call of its own."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args, strict=False)) | kwargs
        if bound.get("is_causal"):
            raise self.unsupported("causal scaled dot-product attention")
        mask = bound.get("attn_mask")
        if mask is not None and (mask.dtype == torch.bool or not bool(torch.isfinite(mask).all())):
            # -inf scores would meet the relevance rules' products with the softmax's input
            raise self.unsupported(
                "scaled dot-product attention with a boolean or non-finite attn_mask",
                "A finite float mask (a relative position bias) is added to the scores; "
                "explain a model that masks positions out with a gradient method.")
        if bound.get("dropout_p", 0.0):
            raise self.unsupported("attention dropout in training mode (call model.eval())")
        q, k, v = bound["query"], bound["key"], bound["value"]
        scale = bound.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        return self._attention_steps(q, k, v, scale, mask)[0]

    def _max_over(self, args, kwargs):
        """``x.max(dim)``, the values and their indices (VOLO's token-label head), as the call
        ``torch.amax(x, dim)`` with the indices alongside (they do not depend on the values'
        relevance). Where entries tie for the maximum, ``amax`` shares the backward signal
        evenly among them, ``max`` would give it all to one."""
        names = ("input", "dim", "keepdim")
        bound = dict(zip(names, args, strict=False)) | kwargs
        x, dim, keepdim = bound["input"], bound["dim"], bool(bound.get("keepdim", False))
        with torch._C.DisableTorchFunction():
            indices = torch.argmax(x, dim, keepdim=keepdim)
        values = self.__torch_function__(torch.amax, (), (x, dim, keepdim))
        return torch.return_types.max((values, indices))

    def _group_norm(self, args, kwargs):
        """``F.group_norm(x, groups, weight, bias, eps)`` as one LayerNorm per group, over
        the group's channels and positions, with the group's weight and bias expanded over
        its positions: the same function (PoolFormer's GroupNorm with one group is one
        LayerNorm over (C, H, W)), so every rule treats a GroupNorm as it treats a LayerNorm,
        affine parameters included. Each LayerNorm call is marked :attr:`OpCall.grouped`
        (its input's vectors lie along dim 1). Groups after the first are selected, normalised
        and concatenated back, each a call of its own."""
        names = ("input", "num_groups", "weight", "bias", "eps")
        bound = dict(zip(names, args, strict=False)) | kwargs
        x, groups = bound["input"], bound["num_groups"]
        weight, bias, eps = bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
        call = self.__torch_function__
        width = x.shape[1] // groups
        spatial = tuple(x.shape[2:])
        parts = []
        for g in range(groups):
            part = x if groups == 1 else call(Tensor.narrow, (), (x, 1, g * width, width))
            affine = [None if p is None else
                      p[g * width:(g + 1) * width].reshape(width, *[1] * len(spatial))
                      .expand(width, *spatial) for p in (weight, bias)]
            self._grouping = True
            try:
                parts.append(call(F.layer_norm, (), (part, (width, *spatial), *affine, eps)))
            finally:
                self._grouping = False
        return parts[0] if groups == 1 else call(torch.cat, (), (parts, 1))

    def _attention_steps(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
                         bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``softmax(q k^T * scale + bias) v`` as a scaling, a product, the sum with the
        bias (a float ``attn_mask``: BEiT's and MaxViT's relative position biases), a softmax
        and a product, each a call of its own: (the output, the attention weights)."""
        q = self.__torch_function__(Tensor.__mul__, (), (q, scale))
        kt = self.__torch_function__(Tensor.transpose, (), (k, -2, -1))
        scores = self.__torch_function__(torch.matmul, (), (q, kt))
        if bias is not None:
            scores = self.__torch_function__(Tensor.__add__, (), (scores, bias))
        attn = self.__torch_function__(torch.softmax, (), (scores, -1))
        return self.__torch_function__(torch.matmul, (), (attn, v)), attn

    def _multi_head_attention(self, args, kwargs):
        """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``; sequence first,
        ``(L, N, E)``) as the calls it is made of, batch first, as timm writes attention:
        query, key and value transposed to ``(N, L, E)`` (every rule takes dimension 0 for
        the batch: absLRP's per-sample normalisation, SRD's token vectors), the input
        projections (one dense layer on the packed weights when query, key and value are one
        tensor, as torch and timm write a self-attention; one for key and value when they are
        one), the heads split off to ``(N, heads, L, E / heads)``, the three attention steps
        of ``F.scaled_dot_product_attention``, the heads merged back, the output projection,
        and the result transposed back to ``(L, N, E)``. Masks, ``bias_k`` / ``bias_v``, zero
        attention and static keys are refused."""
        bound = dict(zip(_MHA_ARGUMENTS, args, strict=False)) | kwargs
        for name, what in (("key_padding_mask", "a key padding mask"),
                           ("attn_mask", "an attention mask"), ("bias_k", "bias_k"),
                           ("bias_v", "bias_v"), ("static_k", "static keys"),
                           ("static_v", "static values")):
            if bound.get(name) is not None:
                raise self.unsupported(f"multi-head attention with {what}")
        if bound.get("add_zero_attn") or bound.get("is_causal"):
            raise self.unsupported("multi-head attention with add_zero_attn or is_causal")
        if bound.get("training", True) and bound.get("dropout_p", 0.0):
            raise self.unsupported("attention dropout in training mode (call model.eval())")
        query, key, value = bound["query"], bound["key"], bound["value"]
        if query.dim() != 3:
            raise self.unsupported(
                f"unbatched multi-head attention (a query of shape {tuple(query.shape)})")
        call = self.__torch_function__
        heads = int(bound["num_heads"])
        embed = query.shape[-1]
        separate = bool(bound.get("use_separate_proj_weight"))
        if separate:
            weights = [bound["q_proj_weight"], bound["k_proj_weight"], bound["v_proj_weight"]]
        else:
            weights = list(bound["in_proj_weight"].chunk(3))
        bias = bound.get("in_proj_bias")
        biases = list(bias.chunk(3)) if bias is not None else [None] * 3

        def batch_first(t: Tensor) -> Tensor:
            return call(Tensor.transpose, (), (t, 0, 1))

        if query is key and key is value and not separate:
            packed = call(F.linear, (), (batch_first(query), bound["in_proj_weight"], bias))
            q, k, v = call(Tensor.chunk, (), (packed, 3, -1))
        elif key is value and not separate:
            q = call(F.linear, (), (batch_first(query), weights[0], biases[0]))
            # the packed weights' last two thirds: key and value (views, no copy per call)
            kv_bias = None if bias is None else bias[embed:]
            packed = call(F.linear, (), (batch_first(key), bound["in_proj_weight"][embed:],
                                         kv_bias))
            k, v = call(Tensor.chunk, (), (packed, 2, -1))
        else:
            q, k, v = (call(F.linear, (), (batch_first(t), w, b))
                       for t, w, b in zip((query, key, value), weights, biases, strict=True))

        def split_heads(t: Tensor) -> Tensor:  # (N, L, E) -> (N, heads, L, E / heads)
            t = call(Tensor.reshape, (), (t, t.shape[0], t.shape[1], heads, embed // heads))
            return call(Tensor.transpose, (), (t, 1, 2))

        out, attn = self._attention_steps(split_heads(q), split_heads(k), split_heads(v),
                                          1.0 / math.sqrt(embed // heads))
        out = call(Tensor.transpose, (), (out, 1, 2))  # (N, L, heads, E / heads)
        out = call(Tensor.reshape, (), (out, out.shape[0], out.shape[1], embed))
        out = call(F.linear, (), (out, bound["out_proj_weight"], bound.get("out_proj_bias")))
        weights_out = None
        if bound.get("need_weights", True):
            weights_out = (call(Tensor.mean, (), (attn, 1))
                           if bound.get("average_attn_weights", True) else attn)
        return batch_first(out), weights_out


class OpTrace:
    """One forward pass of ``model`` on ``x`` under an :class:`OpRule` (a context manager).

    ``forward()`` returns the model output; ``calls`` lists the computing calls in forward
    order. Module hooks added for naming are removed when ``forward`` returns.
    """

    def __init__(self, model: nn.Module, x: Tensor, rule: OpRule):
        self.model, self.x, self.rule = model, x, rule
        self.calls: list[OpCall] = []

    def __enter__(self) -> OpTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        if is_differentiable():
            self.rule.to_gradient()  # the returned map keeps this graph
        self.calls = []

    def forward(self) -> Tensor:
        tracer = OpTracer(self.rule)
        try:
            return tracer.run(self.model, self.x)
        finally:
            self.calls = tracer.calls
