"""SRD on token vectors: sharing ratio decomposition for Vision Transformers.

Each token's feature vector is a pointwise feature vector (PFV), as each spatial position's
channel vector is in a CNN (``docs/srd.md``); inside attention each head's vector is one.
Relevance is one number per PFV. Every computing call is a layer: the relevance of each
output vector ``y(t)`` is shared among the call's input vectors by sharing ratios, the
projection of each source's contribution (plus its share of the call's constant term) on
the output::

    mu_{s -> t} = <c_{s -> t} + beta_{s -> t}, y(t)> / ||y(t)||^2,   R(s) = sum_t mu R(t)

``beta`` splits the constant term (a bias; a source that does not depend on the image) among
the input-dependent sources of ``y(t)`` by the norms of their contributions, so the ratios of
every output sum to 1 and the pixel map sums to the target logit. What that means per call:

* **per-token calls** (dense layers, LayerNorm, activations, scalings, adding a parameter such
  as the position embedding, BatchNorm per channel): one source, ``mu = 1``.
* **sums** ``y = a + b``: ``mu_a = <a, y> / ||y||^2`` per token; a vector that does not depend
  on the image (the class token before the first attention) is a constant term and its share
  goes to the other operand. At the logits ((N, K): DeiT's mean of two heads, the calls
  between the last dense layers and the output that only add, average or scale) the
  explained target logit is its own PFV: each head gets its contribution to it; any other
  (N, K) tensor (a pooled vector, an LSTM's state) is one vector per sample.
* **dense layers over the tokens** (MLP-Mixer, ResMLP, gMLP: ``Linear(T, T')`` on
  ``x.transpose(1, 2)``): ``y(t) = sum_s W[t, s] x(s) + b[t] 1``, the input vectors are the
  sources, ``c_{s -> t} = W[t, s] x(s)``, the bias split by ``|W[t, s]| ||x(s)||``; which
  dense layer reads tokens is followed through the pass (``engine/vector_axes.py``).
* **attention** ``o = A @ v`` per head: the value vectors are the sources,
  ``c_{s -> t} = A(t, s) v(s)``; the attention weights are the call's input-dependent weights
  (as a squeeze-excitation gate is in the CNN engine), so queries, keys and the softmax get no
  relevance. The value of a constant token is a constant term of every output. The weights
  are the factor made from a softmax's output (``OpCall.weights``: through views, and calls on
  it alone such as CaiT's talking-heads projection); with the weights
  second, ``x @ w`` (a global-context block's attention pooling), the columns of ``x`` are
  the vectors, the same form transposed; a product where neither factor is is refused.
* **token averages** ``y = mean_t x(t)`` (and global average pooling of a map):
  ``c_t = x(t) / T``; ``F.fold`` (VOLO): the column vectors of the windows are the sources
  of the map's vectors they are summed into.
* **convolutions** (the patch embedding; the stems and inverted-residual blocks of hybrid
  CNN-transformers such as MobileViT and LeViT): the input vectors in the window are the
  sources, ``c_p = W_offset x(p)``, the bias split by their norms (padding is no source); the
  image's pixels are the sources of the first one, so the map is pixel-level. On
  (N, C, H, W) maps the vectors lie along dim 1; a sum of two maps made by convolutions shares
  by the channel vectors (the operation view records which call made each tensor).
* **calls that only move values** (views, permutes, window partitions and shifts, indexing,
  concatenation) keep autograd's backward. The relevance of a vector is carried on its
  entries in proportion to their squares (:func:`_spread`), so where such calls regroup
  entries (heads split and concatenated, 2x2 tokens merged by Swin's patch merging, a class
  token concatenated to the patches) each part of a vector gets ``||x_k||^2 / ||x||^2`` of
  its relevance: SRD's ratio for a concatenation, whose parts contribute in disjoint slots.

* **max pooling** of an (N, C, ...) map (and ``amax`` over positions or tokens): the input
  vector that won a channel's maximum is the source of that entry, ``c_{p -> t} = y(t)`` on
  the channels ``p`` won, so ``mu_{p -> t} = sum_{c won by p} y_c(t)^2 / ||y(t)||^2`` (the
  PFV engine's routing by the recorded arg-max).
* **LayerNorm over more than a vector** (GroupNorm, a LayerNorm over (C, H, W)): the
  statistics are constants, so each position's vector is the one source of its output.
* **gates** ``s * g`` with both factors input-dependent and ``g`` broadcast against ``s`` (one
  value per channel or per position: squeeze-excitation in a hybrid's convolutional blocks,
  MaxViT's MBConv), or of ``s``'s shape and made by an activation where ``s`` is not (GLU
  variants: EVA's SwiGLU): the gate is a constant weight, as in the PFV engine (docs/srd.md), so
  ``s`` is the one source of each output vector (``mu = 1``) and the gate's branch gets no
  relevance.

Which entries do not depend on the image is followed through the pass by the operation view
(``OpRule.constant_parts``). Products of two input-dependent tensors other than these
raise ``UnsupportedOperationError``, and so does relevance that would be lost (reaching a
softmax, or the constant entries of a vector that also has input-dependent ones).
``srd_tokens`` refuses models with neither attention nor token mixing (``method="srd"``
explains CNNs with its PFV engine, and on this view only what that engine cannot decompose,
with an ``OperationViewWarning`` and a conservation check).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from ..engine.channels import safe_divide
from ..engine.core import Target, keep_graph
from ..engine.optrace import OpCall, OpRule, OpTrace
from ..engine.vector_axes import AxisProbe, VectorAxes
from ..errors import UnsupportedOperationError
from .base import Method, register

Tensor = torch.Tensor


def _spread(per_vector: Tensor, like: Tensor, axis: int = -1) -> Tensor:
    """One relevance per vector (along ``axis`` of ``like``: the last for tokens, 1 for an
    (N, C, ...) map; ``per_vector`` has ``like``'s shape without it) carried on the vector's
    entries in proportion to their squares (evenly over an all-zero vector).

    Why squares: where value-moving calls regroup entries between two operations (heads
    split from a token vector or concatenated back, 2x2 tokens merged into one vector, a
    class token concatenated to the patches), the next operation sees a vector made of
    parts x_k, and SRD's sharing ratio of a part, whose contribution is x_k in its own slots,
    is ``||x_k||^2 / ||x||^2``: summing the carried relevance over a part's entries gives
    exactly that."""
    squares = like * like
    total = squares.sum(axis, keepdim=True)
    weights = torch.where(total > 0, squares / torch.where(total > 0, total, 1.0),
                          torch.full_like(squares, 1.0 / like.shape[axis]))
    return per_vector.unsqueeze(axis) * weights


def _broadcast_gate(inputs: Sequence[Tensor], output: Tensor) -> int | None:
    """Which factor of a product of two input-dependent tensors is a gate: the one broadcast
    against the other (squeeze-excitation's ``(N, C, 1, 1)`` against the ``(N, C, H, W)``
    map), while the other has the output's shape; None when neither is (a product of two
    same-shape activations has no gate this rule can tell)."""
    for gate in (0, 1):
        g, s = inputs[gate], inputs[1 - gate]
        if (s.shape == output.shape and g.dim() == s.dim() and g.numel() < s.numel()
                and g.shape[0] == s.shape[0]):
            return gate
    return None


def _gate(call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> int | None:
    """Which factor of a product of two input-dependent tensors is a gate: the broadcast one
    (:func:`_broadcast_gate`), or, with equal shapes, :attr:`OpCall.gate` (a sigmoid's output,
    or another activation's where the other factor is neither an activation's output nor its
    input: GLU variants such as EVA's SwiGLU ``silu(x W) * (x V)``), as in the PFV engine
    (docs/srd.md)."""
    gate = _broadcast_gate(inputs, output)
    if gate is None and inputs[0].shape == inputs[1].shape == output.shape:
        gate = call.gate  # the operation view's reading of what made each factor
    return gate


def _vector_constant(mask: Tensor | None, like: Tensor, dims: int = 1) -> Tensor | None:
    """Which vectors (last ``dims`` dimensions) of an input do not depend on the model input
    at all (None: every vector does)."""
    if mask is None:
        return None
    per_vector = mask.expand(like.shape).flatten(-dims).all(-1) if dims > 1 else (
        mask.expand(like.shape).all(-1))
    return per_vector if bool(per_vector.any()) else None


def _share_constants(mu: Tensor, constant: Tensor | None, norms: Tensor) -> Tensor:
    """Sharing ratios ``mu (..., T, S)`` with the shares of constant sources (``constant``:
    (..., S) bool) handed to the input-dependent sources of the same output in proportion to
    the norms of their contributions ``norms (..., T, S)`` (evenly if those are all 0): a
    source that does not depend on the input is a constant term, as a bias is in SRD."""
    if constant is None:
        return mu
    const = constant.unsqueeze(-2).to(mu.dtype)
    dependent = 1.0 - const
    constant_share = (mu * const).sum(-1, keepdim=True)
    weights = norms * dependent
    total = weights.sum(-1, keepdim=True)
    even = dependent / dependent.sum(-1, keepdim=True).clamp_min(1.0)
    split = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), even)
    return mu * dependent + constant_share * split


class SRDTokenRule(OpRule):
    """Sharing ratios between token vectors, every computing call a layer (see the module
    docstring). The backward signal is the relevance itself, carried on each vector's
    entries (:func:`_spread`), so its sum over a vector is that vector's relevance."""

    kinds = frozenset({"conv", "linear", "matmul", "layer_norm", "normalize", "activation",
                       "softmax",
                       "add", "sub", "mul", "div", "avg_pool", "scale", "batch_norm",
                       "max_pool"})
    constant_parts = True

    def __init__(self) -> None:
        #: where each traced tensor's vectors lie: a dense layer over the tokens mixes them
        self.axes = VectorAxes()
        #: call index -> the vector axis of each traced input and of the output (None: unknown)
        self._input_axes: dict[int, tuple[int | None, ...]] = {}
        self._output_axes: dict[int, int | None] = {}
        #: call index -> the axis ``torch.stack`` added to its first input
        self._stacked_inputs: dict[int, int] = {}

        #: per traced tensor of at most 2 dimensions (logits, pooled vectors): the calls
        #: since the last dense layer that only added, averaged or scaled what it reads
        self._since_head: Any = WeakTensorKeyDictionary()
        #: those calls before the model's output (:meth:`mark_output`): at the logits
        self._logits: set[int] = set()

    def start(self, x: Tensor) -> None:
        """The model's input: its vectors (a pixel's channels) lie along dim 1."""
        self.axes.start(x)

    def mark_output(self, out: Tensor) -> None:
        """The model's output: the calls between its last dense layers and it that only add,
        average or scale logits (DeiT's ``(head(cls) + head_dist(dist)) / 2``) are where each
        entry of the (N, K) logits is its own PFV. Any other (N, K) tensor (an LSTM's state,
        a pooled vector) is one vector per sample."""
        self._logits = set(self._since_head.get(out, ()))

    def _follow_head(self, index: int | None, kind: str, inputs: Sequence[Any],
                     output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() > 2:
            return
        combines = index is None or kind in ("add", "sub", "scale", "avg_pool") or (
            kind in ("mul", "div") and len(inputs) == 1)
        if not combines:  # a dense layer (a head), or anything else that computes
            self._since_head[output] = frozenset()
            return
        calls = set() if index is None else {index}
        for t in inputs:
            if isinstance(t, Tensor):
                calls |= self._since_head.get(t, frozenset())
        self._since_head[output] = frozenset(calls)

    def on_call(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        self._input_axes[call.index] = tuple(self.axes.of(t) for t in inputs)
        stacked = self.axes.stacked(inputs[0]) if inputs else None
        if stacked is not None:
            self._stacked_inputs[call.index] = stacked
        self.axes.on_call(call, inputs, output)
        self._output_axes[call.index] = self.axes.of(output)
        self._follow_head(call.index, call.kind, inputs, output)
        return output

    def on_move(self, func, args: tuple, kwargs: dict, output) -> None:
        self.axes.on_move(func, args, kwargs, output)
        sources = tree_flatten((args, kwargs))[0]
        for t in tree_flatten(output)[0]:
            self._follow_head(None, "move", sources, t)

    def _refuse_other_axis(self, call: OpCall, inputs: Sequence[Tensor], expected: int,
                           what: str) -> None:
        """Refuse where the tracked vector axis of an input is known and is not the one
        the rule reads the vectors along (``expected``, counted from the end when
        negative): the rule would pair up entries of different vectors."""
        for t, axis in zip(inputs, self._input_axes.get(call.index, ()), strict=False):
            if axis is not None and axis != expected % t.dim():
                raise self._unsupported(
                    call, f"{what} on a tensor of shape {tuple(t.shape)} whose vectors lie "
                    f"along dim {axis}, not dim {expected % t.dim()}")

    def _unsupported(self, call: OpCall, why: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"SRD on token vectors cannot decompose {why} (call {call}). It explains Vision "
            "Transformers and hybrid CNN-transformers (docs/methods.md lists its operations); "
            "for a CNN use method='srd', which decomposes it with its PFV engine "
            "(docs/srd.md).")

    def op_backward(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
                    grad: Tensor) -> list[Tensor | None]:
        result = self._shared(call, inputs, output, grad)
        for i, (x, r) in enumerate(zip(inputs, result, strict=True)):
            self._refuse_part_constant(call, i, x, r)
        return result

    def _refuse_part_constant(self, call: OpCall, index: int, x: Tensor,
                              r: Tensor | None) -> None:
        """Refuse relevance carried onto the constant entries of an input vector that also has
        input-dependent ones (constant channels concatenated to a feature map, as a
        CoordConv's coordinates): it would be lost there. SRD's constant-term rule hands a
        constant source's share to the input-dependent sources of the same output; it is
        defined here for whole vectors (a class token), which the rules give nothing."""
        mask = call.constant[index]
        if r is None or mask is None:
            return
        axes = self._input_axes.get(call.index, ())
        axis = axes[index] if index < len(axes) and axes[index] is not None else (
            _untracked_axis(x, (call.producers[index],)))
        m = mask.expand(x.shape).movedim(axis, -1)
        part = m.any(-1, keepdim=True) & (~m).any(-1, keepdim=True)
        if bool((part & m & (r.movedim(axis, -1) != 0)).any()):
            raise self._unsupported(
                call, "vectors with constant entries beside input-dependent ones (constant "
                "channels concatenated to a feature map): relevance reaches the constant "
                "entries, where it would be lost")

    def _shared(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
                grad: Tensor) -> list[Tensor | None]:
        """What each traced input of the call receives (see the module docstring)."""
        kind, x = call.kind, inputs[0]
        if not bool(grad.any()):
            # a call no relevance reaches (a gate's own branch: ECA's 1-D convolution; the
            # softmax of attention weights, which are no PFVs) passes none on
            return [torch.zeros_like(t) for t in inputs]
        if kind == "softmax":
            # only attention weights come out of a softmax here, and the rules give those no
            # relevance; relevance reaching one (a softmax at the output, or mixing signal
            # vectors) would be dropped
            raise self._unsupported(call, "a softmax whose output carries relevance (only "
                                          "attention weights may come out of a softmax; "
                                          "explain the logits before a softmax head)")
        if kind == "conv":
            mask = call.constant[0]
            if mask is not None and bool((x * mask).any()):
                # constant zeros (explicit zero padding, NASNet's padded and sliced maps) are
                # padding: no source, as the convolution's own; other constants would be a
                # bias term this rule does not split
                raise self._unsupported(call, "a convolution over partly constant, non-zero "
                                              "input")
            if self._is_patch_embedding(call, x):
                return [self._patch_embedding(call, x, output, grad)]
            return [self._convolution(call, x, output, grad)]
        if kind == "max_pool":
            return [self._max_pool(call, x, output, grad)]
        if kind == "avg_pool":
            return [self._token_mean(call, x, output, grad)]
        if kind == "batch_norm":  # per channel (dim 1): one source per vector
            return [_spread(grad.sum(1), x, 1)]
        if len(inputs) == 2:
            if kind in ("add", "sub"):
                return self._residual(call, inputs, output, grad)
            if kind == "matmul":
                return self._weighted_sum(call, inputs, output, grad)
            gate = _gate(call, inputs, output) if kind == "mul" else None
            if gate is None:
                raise self._unsupported(
                    call, f"'{kind}' of two input-dependent tensors of shapes "
                    f"{tuple(inputs[0].shape)} and {tuple(inputs[1].shape)} (a gate must be "
                    "the broadcast factor, one value per channel or per position, or, with "
                    "equal shapes, an activation's output where the other factor is not one)")
            # a gate (squeeze-excitation in a hybrid's convolutional blocks) is a constant
            # weight of the signal, as in the PFV engine: one source, mu = 1, and the
            # gate's own branch gets nothing
            result = [torch.zeros_like(t) for t in inputs]
            result[1 - gate] = grad
            return result
        if kind == "layer_norm":
            return [self._layer_norm(call, x, grad)]
        if kind == "normalize":  # each vector scaled by its own norm: one source, mu = 1
            axis = self._input_axes.get(call.index, (None,))[0]
            if call.argument(2, "dim", 1) % x.dim() != (x.dim() - 1 if axis is None else axis):
                raise self._unsupported(call, "a normalisation across token vectors")
            return [grad]
        if kind in ("linear", "matmul"):
            if self.axes.reads_merged(call):
                raise self._unsupported(
                    call, "a dense layer on a flattened feature map (a VGG-style head): its "
                    "input joins the vectors of every position, and its output has no "
                    "decomposition into them here (the PFV engine's seed='gradcam' starts "
                    "below such a head)")
            axis = self.axes.mixes_tokens(call)
            if axis is not None:  # a dense layer over the tokens (MLP-Mixer, ResMLP, gMLP)
                return [self._token_mixing(call, x, output, grad, axis)]
            if kind == "matmul" and not call.is_input(0, "input"):
                raise self._unsupported(call, "a constant matrix mixing input-dependent rows "
                                              "whose vectors' axis is unknown")
            # per token: one source, mu = 1 (its bias too)
            return [_spread(grad.sum(-1), x)]
        if x.shape == grad.shape:  # elementwise: activations, scalings, + a parameter
            return [grad]
        if kind in ("add", "sub", "mul", "div"):  # broadcast against a parameter
            return [_reduce_to(grad, x)]
        raise self._unsupported(call, f"'{kind}' changing the shape {tuple(x.shape)} -> "
                                      f"{tuple(grad.shape)}")

    def _fold(self, call: OpCall, x: Tensor, y: Tensor, r: Tensor) -> Tensor:
        """``F.fold``: the windows' columns ``x`` (N, C * k, L) summed back into a map ``y``
        (N, C, H, W) (VOLO's outlook attention). The sources of ``y(p)`` are the column
        vectors (one window ``l``, one kernel offset ``o``: C entries) that land on ``p``,
        ``c_{(l, o) -> p} = x(:, o, l)``, no bias; their projections on ``y(p)`` summed over
        ``p`` are one input gradient, ``<x(:, o, l), (J^T g)(:, o, l)>`` with
        ``g = y R / ||y||^2``, as for a convolution."""
        if call.constant[0] is not None:
            raise self._unsupported(call, "a fold of partly constant columns")
        if x.dim() != 3 or y.dim() < 3:
            raise self._unsupported(call, "a fold of unbatched columns")
        g = y * safe_divide(r.sum(1, keepdim=True), (y * y).sum(1, keepdim=True))
        back = call.vjp([x], g)[0]
        columns = x.reshape(x.shape[0], y.shape[1], -1, x.shape[-1])  # (N, C, k, L)
        per_vector = (columns * back.reshape(columns.shape)).sum(1)
        return _spread(per_vector, columns, 1).reshape(x.shape)

    def _layer_norm(self, call: OpCall, x: Tensor, r: Tensor) -> Tensor:
        """A LayerNorm, its statistics detached, scales and shifts each entry alone: one
        source per vector, ``mu = 1``. Over one token vector (the usual (D,)) the vector is
        what it normalises; over more (a GroupNorm's group of channels and positions, a
        LayerNorm over (C, H, W) of a map, or over (T, D)) the vectors lie along dim 1 of a
        map and along the last dimension of tokens, not across the positions it averages."""
        normalized = call.argument(1, "normalized_shape")
        dims = len(normalized) if isinstance(normalized, list | tuple) else 1
        if dims == 1 and not call.grouped:
            axis = -1
            self._refuse_other_axis(call, [x], axis, "a LayerNorm over the last dimension")
        elif call.grouped or (call.producers[0] in _MAP_PRODUCERS and dims == x.dim() - 1):
            axis = 1
        elif x.dim() == 3 and dims == 2:
            axis = 2
        else:
            raise self._unsupported(
                call, f"a LayerNorm over {dims} dimensions of a tensor of shape "
                f"{tuple(x.shape)} whose vector axis is unknown")
        return _spread(r.sum(axis), x, axis)

    def _max_pool(self, call: OpCall, x: Tensor, y: Tensor, r: Tensor) -> Tensor:
        """Max pooling of an (N, C, ...) map (NesT's and GCViT's downsampling, a stem's pool)
        or ``amax`` over positions or tokens (Hiera's mask-unit pooling): each entry of an output
        vector comes from the input vector that won its channel's maximum, so
        ``c_{p -> t}`` is ``y(t)`` on the channels ``p`` won and 0 elsewhere, and
        ``mu_{p -> t} = sum_{c won by p} y_c(t)^2 / ||y(t)||^2``, as in the PFV engine: the
        output vector's relevance spread over its entries by their squares, each entry
        handed back to its winner."""
        if x.dim() < 3:
            raise self._unsupported(call, "a maximum of a tensor without positions")
        axis = 1  # pooling calls take (N, C, ...) maps
        if call.original in (torch.amax, Tensor.amax):
            # over the tokens of channels-last vectors (Hiera's mask-unit pooling), or over
            # the positions of a map made by convolutions
            axis = 1 if call.producers[0] in _MAP_PRODUCERS else x.dim() - 1
            dim = call.argument(1, "dim", ())
            dims = {d % x.dim() for d in (dim if isinstance(dim, list | tuple) else (dim,))}
            if not dims or dims & {0, axis}:
                raise self._unsupported(call, "a maximum over the batch or the feature vector")
            if not call.argument(2, "keepdim", False):
                axis -= sum(d < axis for d in dims)  # the output's vector axis
        back = call.vjp([x], _spread(r.sum(axis), y, axis))[0]
        mask = call.constant[0]
        if mask is not None and bool((back * mask).any()):
            # constant entries that never win (zero padding beside larger values) are no
            # source; a constant that wins a window would take relevance that cannot go
            # further (-inf padding never reaches here: the view pools it with its padding)
            raise self._unsupported(call, "max pooling where a constant entry (padding) wins "
                                          "a window")
        return back

    def _residual(self, call: OpCall, inputs: Sequence[Tensor], z: Tensor,
                  r: Tensor) -> list[Tensor]:
        """A sum of two input-dependent tensors, shared by the vectors along the axis where
        the operation view found them (:class:`~srdxai.engine.vector_axes.VectorAxes`); where
        it did not, along dim 1 of (N, C, ...) maps made by convolutions and the last axis of
        tokens."""
        axis = self._output_axes.get(call.index)
        if axis is None:
            axis = _untracked_axis(z, call.producers)
        # an operand whose known axis is another one would pair up entries of different vectors
        self._refuse_other_axis(call, inputs, axis - z.dim(), "a sum")
        if axis == z.dim() - 1:
            return self._residual_last(call.kind, inputs, call.constant, z, r,
                                       at_logits=call.index in self._logits)
        moved = [t.expand(z.shape).movedim(axis, -1) for t in inputs]
        constant = tuple(None if m is None else m.expand(z.shape).movedim(axis, -1)
                         for m in call.constant)
        ra, rb = self._residual_last(call.kind, moved, constant, z.movedim(axis, -1),
                                     r.movedim(axis, -1))
        return [_reduce_to(ra.movedim(-1, axis), inputs[0]),
                _reduce_to(rb.movedim(-1, axis), inputs[1])]

    @staticmethod
    def _residual_last(kind: str, inputs: Sequence[Tensor],
                       constant: Sequence[Tensor | None], z: Tensor,
                       r: Tensor, at_logits: bool = False) -> list[Tensor]:
        a, b = inputs
        if kind == "sub":
            b = -b
        a, b = a.expand(z.shape), b.expand(z.shape)
        const_a = _vector_constant(constant[0], a)
        const_b = _vector_constant(constant[1], b)
        if z.dim() == 2 and at_logits:
            # (N, K) logits (DeiT's mean of two heads): the explained target logit is its own
            # PFV, so each entry is shared by its two parts
            ra = torch.where(z != 0, r * a / torch.where(z != 0, z, 1.0), r / 2)
            rb = r - ra
            for mine, other, const in ((ra, rb, constant[0]), (rb, ra, constant[1])):
                if const is not None:  # a constant part is a constant term of the sum
                    moved = torch.where(const.expand(z.shape), mine, torch.zeros_like(mine))
                    mine.sub_(moved)
                    other.add_(moved)
            return [_reduce_to(ra, inputs[0]), _reduce_to(rb, inputs[1])]
        norm2 = (z * z).sum(-1)
        total = r.sum(-1)
        mu_a = safe_divide((a * z).sum(-1), norm2)
        mu_b = safe_divide((b * z).sum(-1), norm2)
        if const_a is not None:  # a constant vector is a constant term: its share goes to b
            mu_b = torch.where(const_a, mu_a + mu_b, mu_b)
            mu_a = torch.where(const_a, torch.zeros_like(mu_a), mu_a)
        if const_b is not None:
            mu_a = torch.where(const_b, mu_a + mu_b, mu_a)
            mu_b = torch.where(const_b, torch.zeros_like(mu_b), mu_b)
        ra = _spread(mu_a * total, a)
        rb = _spread(mu_b * total, b)
        return [_reduce_to(ra, inputs[0]), _reduce_to(rb, inputs[1])]

    def _weighted_sum(self, call: OpCall, inputs: Sequence[Tensor], o: Tensor,
                      r: Tensor) -> list[Tensor]:
        """A product of two input-dependent matrices: attention weights (made from a softmax)
        mixing vectors. ``A @ v`` (a transformer's attention: the rows of ``v`` are the
        vectors) or ``x @ w`` with ``w`` the weights (a global-context block's attention
        pooling, ``x`` (N, 1, C, HW) @ ``softmax(...)`` (N, 1, HW, 1): the columns of ``x``
        are the vectors), which is the first form transposed."""
        if not bool(r.any()):  # q @ k^T: nothing comes back through the softmax
            return [torch.zeros_like(t) for t in inputs]
        if call.weights[0]:
            return self._attention(call.constant[1], inputs, o, r)
        if call.weights[1]:
            x, w = inputs
            constant = call.constant[0]
            rw, rx = self._attention(None if constant is None else constant.mT,
                                     [w.mT, x.mT], o.mT, r.mT)
            return [rx.mT, rw.mT]
        raise self._unsupported(
            call, f"a product of two input-dependent matrices of shapes "
            f"{tuple(inputs[0].shape)} and {tuple(inputs[1].shape)} neither of which is "
            "attention weights (made from a softmax's output)")

    def _token_mixing(self, call: OpCall, x: Tensor, y: Tensor, r: Tensor,
                      axis: int) -> Tensor:
        """A dense layer over the tokens: ``F.linear`` on ``x.transpose(1, 2)`` (MLP-Mixer's
        and ResMLP's token mixing, gMLP's spatial gating unit), whose vectors lie along
        ``axis``, or a parameter matrix times the tokens (``W @ x``, vectors along the last
        axis). Output vector ``y(t) = sum_s W[t, s] x(s) + b[t] 1``: the sources are the input
        vectors, ``c_{s -> t} = W[t, s] x(s)``, the bias ``b[t] 1`` split among them by
        ``||c_{s -> t}|| = |W[t, s]| ||x(s)||`` (evenly where all are 0), as a convolution's
        bias over its window; the same form as attention with fixed weights and a bias."""
        if call.kind == "linear":
            weight, bias = call.argument(1, "weight"), call.argument(2, "bias")
        elif call.is_input(0, "input"):  # x @ W reads the columns of W
            weight, bias = call.argument(1, "other"), None
            weight = weight.mT if isinstance(weight, Tensor) else weight
        else:  # W @ x: the vectors lie along x's last axis, the tokens along the one before
            weight, bias = call.argument(0, "input"), None
        if not isinstance(weight, Tensor) or weight.dim() != 2 or (
                bias is not None and not isinstance(bias, Tensor)):
            raise self._unsupported(call, "a dense layer over the tokens whose weight or bias "
                                          "depends on the input")
        move = call.kind == "linear" or call.is_input(0, "input")
        v, o, rr = ((t.movedim(axis, -1) for t in (x, y, r)) if move else (x, y, r))
        weight = weight.to(v.dtype)
        per_out = rr.sum(-1)  # (..., T): one relevance per output vector
        projection = weight * (o @ v.mT)  # (..., T, S): <W[t, s] x(s), y(t)>
        norms = weight.abs() * torch.linalg.vector_norm(v, dim=-1).unsqueeze(-2)
        if bias is not None:
            total = norms.sum(-1, keepdim=True)
            share = torch.where(total > 0, norms / torch.where(total > 0, total, 1.0),
                                torch.full_like(norms, 1.0 / norms.shape[-1]))
            projection = projection + share * (bias.to(o.dtype) * o.sum(-1)).unsqueeze(-1)
        mu = safe_divide(projection, (o * o).sum(-1, keepdim=True))
        mask = call.constant[0]
        if mask is not None:
            mask = mask.expand(x.shape).movedim(axis, -1) if move else mask.expand(x.shape)
        constant = _vector_constant(mask, v)
        if constant is not None:  # a constant token is a constant term of every output
            mu = _share_constants(mu, constant, norms)
        back = _spread((mu * per_out.unsqueeze(-1)).sum(-2), v)
        return back.movedim(-1, axis) if move else back

    @staticmethod
    def _attention(constant_v: Tensor | None, inputs: Sequence[Tensor], o: Tensor,
                   r: Tensor) -> list[Tensor]:
        a, v = inputs  # o = a @ v: a mixes the rows of v
        v = v.expand(*o.shape[:-2], *v.shape[-2:])
        per_out = r.sum(-1)  # (..., T): one relevance per (head, token) output vector
        mu = safe_divide(a * (o @ v.mT), (o * o).sum(-1, keepdim=True))  # (..., T, S)
        constant = _vector_constant(constant_v, v)
        if constant is not None:
            norms = a.abs() * torch.linalg.vector_norm(v, dim=-1).unsqueeze(-2)
            mu = _share_constants(mu, constant, norms)
        per_source = (mu * per_out.unsqueeze(-1)).sum(-2)  # (..., S)
        return [torch.zeros_like(a), _reduce_to(_spread(per_source, v), inputs[1])]

    def _token_mean(self, call: OpCall, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
        """Averages (or sums) of token vectors: ``z = scale * sum_t x(t)``, each token a source
        with ``c_t = scale * x(t)``. Global average pooling of an (N, C, ...) map is the same
        with the channel vectors as tokens."""
        func = call.original
        if func in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
            size = call.argument(1, "output_size")
            sizes = size if isinstance(size, list | tuple) else (size,)
            if any(s not in (1, None) for s in sizes):
                raise self._unsupported(call, "adaptive pooling to more than one position")
            moved = self._token_mean_last(_moved_mask(call, x, 1), x.movedim(1, -1),
                                          z.movedim(1, -1),
                                          r.movedim(1, -1), tuple(range(1, x.dim() - 1)),
                                          mean=True, keepdim=True)
            return moved.movedim(-1, 1)
        if func in (F.interpolate, F.upsample, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
            return self._positions_mixed(call, x, z, r)
        if func is F.fold:
            return self._fold(call, x, z, r)
        if func not in (torch.mean, Tensor.mean, torch.sum, Tensor.sum):
            raise self._unsupported(call, "this average")
        dim = call.argument(1, "dim")
        if dim is None:
            raise self._unsupported(call, "a mean over every dimension")
        dims = tuple(d % x.dim() for d in (dim if isinstance(dim, list | tuple) else (dim,)))
        keepdim = bool(call.argument(2, "keepdim", False))
        mean = func in (torch.mean, Tensor.mean)
        every_position = x.dim() >= 4 and set(dims) == set(range(2, x.dim()))
        if x.dim() >= 3 and (call.producers[0] in _MAP_PRODUCERS or every_position) \
                and 0 not in dims and 1 not in dims:
            # an (N, C, ...) map made by convolutions, averaged over positions (a
            # squeeze-excitation's x.mean((2, 3)), a head's global pooling): its vectors lie
            # along dim 1; so they do in a mean over every dimension after the second of an
            # (N, C, H, W) tensor however it was made (PVT-v2's head pools the tokens it
            # permuted back into a map: over (W, C) of channels-last tokens it would mean
            # nothing)
            moved = self._token_mean_last(_moved_mask(call, x, 1), x.movedim(1, -1),
                                          z.movedim(1, -1),
                                          r.movedim(1, -1), tuple(d - 1 for d in dims), mean,
                                          keepdim)
            return moved.movedim(-1, 1)
        axis = self._input_axes.get(call.index, (None,))[0]
        if dims == (self._stacked_inputs.get(call.index),) and axis not in dims:
            return self._stacked_mean(call, x, z, r, dims[0], axis, mean, keepdim)
        if axis is not None and axis != x.dim() - 1 and axis not in dims and 0 not in dims:
            # tokens whose vectors lie along another axis (an MLP-Mixer's (N, C, T) after a
            # dense layer over the tokens)
            return self._mean_along(_moved_mask(call, x, axis), x, z, r, dims, axis, mean,
                                    keepdim)
        if 0 in dims or x.dim() - 1 in dims:
            raise self._unsupported(call, "an average over the batch or the feature vector")
        return self._token_mean_last(_moved_mask(call, x, -1), x, z, r, dims, mean=mean,
                                     keepdim=keepdim)

    def _stacked_mean(self, call: OpCall, x: Tensor, z: Tensor, r: Tensor, dim: int,
                      axis: int | None, mean: bool, keepdim: bool) -> Tensor:
        """The mean (or sum) over the axis ``torch.stack`` added (CrossViT's
        ``torch.mean(torch.stack(logits, 0), 0)``: the parts are not the batch): at the logits
        each part gets its contribution to each entry (the target logit is its own PFV, as
        DeiT's two heads); elsewhere each part's vector is a source of the output vector."""
        if call.constant[0] is not None:
            raise self._unsupported(call, "an average of stacked parts, some constant")
        scale = 1.0 / x.shape[dim] if mean else 1.0
        zs, rs = (z, r) if keepdim else (z.unsqueeze(dim), r.unsqueeze(dim))
        if call.index in self._logits and z.dim() == 2:
            part = x * scale
            return torch.where(zs != 0, rs * part / torch.where(zs != 0, zs, 1.0),
                               (rs / x.shape[dim]).expand(x.shape))
        if axis is None:
            raise self._unsupported(call, "an average of stacked parts whose vectors' axis "
                                          "is unknown")
        return self._mean_along(None, x, z, r, (dim,), axis, mean, keepdim)

    @classmethod
    def _mean_along(cls, mask: Tensor | None, x: Tensor, z: Tensor, r: Tensor,
                    dims: tuple[int, ...], axis: int, mean: bool, keepdim: bool) -> Tensor:
        """:meth:`_token_mean_last` of vectors along ``axis`` of ``x`` (not one of
        ``dims``): the same average with the vectors moved last, and back. ``mask``: laid
        out as ``x.movedim(axis, -1)``."""
        out_axis = axis if keepdim else axis - sum(d < axis for d in dims)
        back = cls._token_mean_last(mask, x.movedim(axis, -1), z.movedim(out_axis, -1),
                                    r.movedim(out_axis, -1), tuple(d - (d > axis) for d in dims),
                                    mean=mean, keepdim=keepdim)
        return back.movedim(-1, axis)

    @staticmethod
    def _positions_mixed(call: OpCall, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
        """Resampling and average pooling of an (N, C, ...) map: a fixed non-negative mix of
        input positions, ``c_{p -> t} = w_{t, p} x(p)``, no bias; the projections summed over
        ``t`` are one input gradient, as for a convolution."""
        g = z * safe_divide(r.sum(1), (z * z).sum(1)).unsqueeze(1)
        (jtg,) = call.vjp([x], g)
        return _spread((x * jtg).sum(1), x, 1)

    @staticmethod
    def _token_mean_last(mask: Tensor | None, x: Tensor, z: Tensor, r: Tensor,
                         dims: tuple[int, ...], mean: bool, keepdim: bool) -> Tensor:
        """The average (or sum) over ``dims`` of vectors along the last axis of ``x``;
        ``mask``: ``x``'s constant entries (laid out as ``x``), or None."""
        if not keepdim:
            for d in sorted(dims):
                z, r = z.unsqueeze(d), r.unsqueeze(d)
        scale = 1.0 / math.prod(x.shape[d] for d in dims) if mean else 1.0
        contribution = (x * z).sum(-1) * scale  # <c_t, z> per source token
        norm2 = (z * z).sum(-1)
        mu = safe_divide(contribution, norm2)
        constant = _vector_constant(mask, x)
        if constant is not None:
            # the constant tokens' shares go to the others of the same output, by norm
            norms = torch.linalg.vector_norm(x, dim=-1) * scale
            const_share = (mu * constant).sum(dims, keepdim=True)
            weights = norms * ~constant
            total = weights.sum(dims, keepdim=True)
            mu = mu * ~constant + const_share * safe_divide(weights, total)
        return _spread(mu * r.sum(-1), x)

    @staticmethod
    def _is_patch_embedding(call: OpCall, x: Tensor) -> bool:
        """A 2-D convolution whose windows tile the input (stride = kernel, no padding, no
        dilation, one group): each pixel is a source of one token only."""
        weight = call.argument(1, "weight")
        if x.dim() != 4 or not isinstance(weight, Tensor):
            return False
        k = tuple(weight.shape[2:])

        def pair(v):
            return tuple(v) if isinstance(v, list | tuple) else (v,) * len(k)

        return (pair(call.argument(3, "stride", 1)) == k
                and pair(call.argument(4, "padding", 0)) == (0, 0)
                and pair(call.argument(5, "dilation", 1)) == (1, 1)
                and call.argument(6, "groups", 1) == 1
                and not x.shape[2] % k[0] and not x.shape[3] % k[1])

    def _convolution(self, call: OpCall, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
        """Any 2-D convolution as an SRD layer: the sources of output vector ``z(t)`` are the
        input vectors ``x(p)`` in its window, ``c_{p -> t} = W_o x(p)`` for the offset ``o``
        of ``p``; the bias is split among them by ``||W_o x(p)||`` (padding contributes
        nothing). The projections summed over ``t`` are one input gradient:
        ``sum_t <W_o x(p), g(t)> = <x(p), (J^T g)(p)>`` with ``g = z R / ||z||^2``."""
        weight, bias = call.argument(1, "weight"), call.argument(2, "bias")
        if x.dim() != 4 or not isinstance(weight, Tensor) or isinstance(
                call.argument(4, "padding", 0), str):
            raise self._unsupported(call, "a convolution other than a 2-D one with numeric "
                                          "padding")
        stride, padding = call.argument(3, "stride", 1), call.argument(4, "padding", 0)
        dilation, groups = call.argument(5, "dilation", 1), call.argument(6, "groups", 1)
        per_out = r.sum(1)  # (N, h, w)
        g = z * safe_divide(per_out, (z * z).sum(1)).unsqueeze(1)
        (jtg,) = call.vjp([x], g)
        pixel = (x * jtg).sum(1)  # (N, H, W): the contributions' projections
        if bias is not None:
            rho = (bias.reshape(1, -1, 1, 1) * g).sum(1)  # the bias's share of R(t)
            norms, valid = _offset_norms(x, weight, stride, padding, dilation, groups)
            total = norms.sum(1, keepdim=True)
            count = valid.sum(1, keepdim=True).clamp_min(1.0)
            share = torch.where(total > 0, norms / torch.where(total > 0, total, 1.0),
                                valid / count)
            spread = share * rho.flatten(1).unsqueeze(1)  # (N, K, L)
            pixel = pixel + F.fold(spread, x.shape[2:], tuple(weight.shape[2:]),
                                   dilation=dilation, padding=padding, stride=stride)[:, 0]
        return _spread(pixel, x, 1)

    def _patch_embedding(self, call: OpCall, x: Tensor, z: Tensor, r: Tensor) -> Tensor:
        weight, bias = call.argument(1, "weight"), call.argument(2, "bias")
        k = tuple(weight.shape[2:])
        n, c, h, w = x.shape
        ph, pw = h // k[0], w // k[1]
        norm2 = (z * z).sum(1)  # (N, ph, pw)
        per_token = r.sum(1)
        # <W_k x(p), z(t)> for every pixel, summed over its channels
        direct = (F.conv_transpose2d(z, weight, stride=k) * x).sum(1)  # (N, H, W)
        if bias is not None:
            # ||W_k x(p)|| from each offset's Gram matrix W_k^T W_k (C x C)
            gram = torch.einsum("dcij,deij->ijce", weight, weight)
            patches = x.reshape(n, c, ph, k[0], pw, k[1]).permute(0, 2, 4, 3, 5, 1)
            norms = torch.einsum("nabijc,ijce,nabije->nabij", patches, gram, patches)
            norms = norms.clamp(min=0).sqrt()  # (N, ph, pw, kh, kw)
            bias_proj = (bias.reshape(1, -1, 1, 1) * z).sum(1)  # <b, z(t)>
            total = norms.sum((-2, -1), keepdim=True)
            even = torch.full_like(norms, 1.0 / (k[0] * k[1]))
            share = torch.where(total > 0, norms / torch.where(total > 0, total, 1.0), even)
            bias_part = share * bias_proj[..., None, None]
            bias_part = bias_part.permute(0, 1, 3, 2, 4).reshape(n, h, w)
            direct = direct + bias_part
        mu = safe_divide(direct, _tile(norm2, k))
        pixel = mu * _tile(per_token, k)
        return _spread(pixel, x, 1)


def _moved_mask(call: OpCall, x: Tensor, axis: int) -> Tensor | None:
    """The constant-entries mask of the call's input ``x`` laid out as
    ``x.movedim(axis, -1)`` (None: every entry depends on the input)."""
    mask = call.constant[0]
    return None if mask is None else mask.expand(x.shape).movedim(axis, -1)


#: producers of (N, C, ...) feature maps, whose vectors lie along dim 1
_MAP_PRODUCERS = frozenset({"conv", "batch_norm", "avg_pool", "max_pool"})


def _untracked_axis(t: Tensor, producers: Sequence[str | None]) -> int:
    """The vector axis of a tensor the operation view found none for: dim 1 of an
    (N, C, ...) map made by convolutions, else the last (tokens)."""
    return 1 if t.dim() >= 3 and any(p in _MAP_PRODUCERS for p in producers) else t.dim() - 1


def _offset_norms(x: Tensor, weight: Tensor, stride, padding, dilation,
                  groups: int) -> tuple[Tensor, Tensor]:
    """``||W_o x(p)||`` for every output position and kernel offset, (N, K, L), from each
    offset's (per group) Gram matrix ``W_o^T W_o``; and which offsets read the input rather
    than padding (N, K, L)."""
    kernel = tuple(weight.shape[2:])
    n, c = x.shape[:2]
    cg = c // groups
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    k = math.prod(kernel)
    cols = cols.reshape(n, groups, cg, k, -1)  # (N, G, Cg, K, L)
    w = weight.reshape(groups, -1, cg, k)  # (G, Dg, Cg, K)
    gram = torch.einsum("gdck,gdek->gkce", w, w)  # (G, K, Cg, Cg)
    squares = torch.einsum("ngckl,gkce,ngekl->nkl", cols, gram, cols)
    ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    valid = F.unfold(ones, kernel, dilation=dilation, padding=padding, stride=stride)
    return squares.clamp_min(0).sqrt(), valid.expand(n, -1, -1)


def _tile(per_token: Tensor, k: tuple[int, ...]) -> Tensor:
    """(N, ph, pw) -> (N, H, W): each token's value over its patch."""
    return per_token.repeat_interleave(k[0], 1).repeat_interleave(k[1], 2)


def _reduce_to(r: Tensor, like: Tensor) -> Tensor:
    """Sum a relevance over the dimensions ``like`` was broadcast along."""
    if r.shape == like.shape:
        return r
    lead = r.dim() - like.dim()
    out = r.sum(tuple(range(lead))) if lead else r
    dims = tuple(i for i, (a, b) in enumerate(zip(out.shape, like.shape, strict=True))
                 if b == 1 and a != 1)
    return out.sum(dims, keepdim=True) if dims else out


class TokenStructure(NamedTuple):
    """What a probe pass found: attention (a matrix product of two input-dependent tensors)
    and token mixing (a dense layer over the tokens: MLP-Mixer, ResMLP, gMLP)."""

    attention: bool
    mixing: bool
    #: neither, but SRD's PFV engine cannot decompose the model and the operation view can
    operation_view: bool = False

    @property
    def token_vectors(self) -> bool:
        """The model has token vectors (attention or token mixing): SRD's CNN options and
        layer maps do not apply."""
        return self.attention or self.mixing

    @property
    def on_tokens(self) -> bool:
        """SRD explains the model on the operation view (``method="srd"`` routes it here)."""
        return self.token_vectors or self.operation_view


def token_structure(method: Method, leaf: Tensor) -> TokenStructure:
    """Whether the model has attention or mixes tokens with a dense layer: one probe pass on
    one sample, without autograd."""
    x = leaf[:1].detach()
    probe = AxisProbe(x)
    with method._guard(), torch.no_grad(), OpTrace(method.model, x, probe) as trace:
        trace.forward()
        attention = any(c.kind == "matmul" and c.n_inputs == 2 for c in trace.calls)
        return TokenStructure(attention, probe.axes.any_mixing)


#: per model (weakly: the entry goes with the model), its :class:`TokenStructure`, by input
#: (shape, dtype, device) and the model's module types: the probe, or a failed attempt of the
#: PFV engine, costs a forward pass that every later call on the same model would repeat
_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module, x: Tensor) -> tuple:
    return (tuple(x.shape[1:]), x.dtype, x.device, tuple(type(m) for m in model.modules()))


def known_on_tokens(model: nn.Module, x: Tensor) -> bool | None:
    """What an earlier call found out about whether SRD explains ``model`` on token vectors
    for inputs like ``x`` (None: nothing yet)."""
    known = _STRUCTURE.get(model, {}).get(_structure_key(model, x))
    return None if known is None else known.on_tokens


def remember_no_tokens(model: nn.Module, x: Tensor) -> None:
    """The PFV engine explained ``model`` on inputs like ``x``: no attention, no token mixing."""
    _STRUCTURE.setdefault(model, {})[_structure_key(model, x)] = TokenStructure(False, False)


def remember_operation_view(model: nn.Module, x: Tensor) -> None:
    """SRD's PFV engine refused ``model`` on inputs like ``x`` and the operation view explained
    it: later calls go there directly."""
    entries = _STRUCTURE.setdefault(model, {})
    key = _structure_key(model, x)
    entries[key] = (entries.get(key) or TokenStructure(False, False))._replace(
        operation_view=True)


def model_structure(method: Method, x: Tensor) -> TokenStructure:
    """:func:`token_structure`, probed once per model, input shape and structure."""
    entries = _STRUCTURE.setdefault(method.model, {})
    key = _structure_key(method.model, x)
    known = entries.get(key)
    if known is None:
        known = entries[key] = token_structure(method, x)
    return known


def model_has_attention(method: Method, x: Tensor) -> bool:
    """Whether the model multiplies two input-dependent tensors by a matrix product (an
    attention), probed once per model, input shape and structure."""
    return model_structure(method, x).attention


def model_on_tokens(method: Method, x: Tensor) -> bool:
    """Whether SRD explains the model on token vectors: it has attention or mixes tokens
    with a dense layer (probed once per model, input shape and structure)."""
    return model_structure(method, x).on_tokens


def token_relevance(method: Method, x: Tensor, target: Target,
                    totals: list[Tensor] | None = None) -> Tensor:
    """Input relevance ``(N, C, H, W)`` of SRD on token vectors for one chunk: each pixel's
    relevance carried on its channels (summing over them gives the pixel map). ``totals``:
    a list that gets the relevance the pass started with, per sample (the target logit)."""

    def run(leaf: Tensor) -> Tensor:
        rule = SRDTokenRule()
        rule.start(leaf)

        def seeds(out: Tensor) -> list[Tensor]:
            rule.mark_output(out)
            seed = method._target_gradient(out, target)[0] * keep_graph(out)
            if totals is not None:
                totals.append(seed.detach().flatten(1).sum(1))
            return [seed]

        (rel,) = method._traced_gradients(leaf, rule, seeds)
        return rel.contiguous()

    return method._with_layout(x, run)


def check_conserved(relevance: Tensor, total: Tensor, what: str) -> None:
    """Refuse a map that does not sum to the relevance its pass started with, per sample
    (float rounding allowed for: relative to the target and to the map's absolute mass).
    SRD conserves by construction wherever every operation passes its relevance on; this
    guards a model whose operations hand some of it to entries that do not depend on the
    input (constant channels concatenated to a feature map), where it would be lost."""
    got = relevance.detach().flatten(1).sum(1).to(torch.float64)
    total = total.to(torch.float64)
    mass = relevance.detach().flatten(1).abs().sum(1).to(torch.float64)
    eps = torch.finfo(relevance.dtype).eps
    allowed = 1e4 * eps * (total.abs() + mass) + torch.finfo(relevance.dtype).tiny
    bad = (got - total).abs() > allowed
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise UnsupportedOperationError(
            f"{what}: the map of sample {i} sums to {float(got[i]):.6g}, not to the "
            f"{float(total[i]):.6g} it started with: an operation handed part of the relevance "
            "to entries that do not depend on the input (e.g. constant channels concatenated to "
            "a feature map), where it is lost. Explain this model with absLRP or a gradient "
            "method.")


@register("srd_tokens")
class SRDTokens(Method):
    """SRD for Vision Transformers: token vectors as PFVs, every computing call a layer
    (sharing ratios at residual sums, attention with the values as sources and the attention
    weights as the mixing kernel, token averages and the patch embedding with SRD's bias
    share); prefix tokens (class, distillation, registers) are constant terms. Signed;
    pixel-level (N, H, W); sums to the target logit. ``method="srd"`` routes every model with
    attention or a dense layer over the tokens here (Vision Transformers, hybrids, MLP-Mixers);
    other models are refused (see the module docstring and docs/methods.md)."""

    family = "decomposition"

    signed = True

    def relevance(self, x: Tensor, target: Target) -> Tensor:
        """Input relevance ``(N, C, H, W)`` (each pixel's relevance on its channels)."""
        if not model_on_tokens(self, x):
            raise UnsupportedOperationError(
                "srd_tokens explains models with attention or token-mixing dense layers "
                "(Vision Transformers, hybrids, MLP-Mixers); this model has neither: use "
                "method='srd', which decomposes a CNN with its PFV engine.")
        return token_relevance(self, x, target)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self._batched(inputs, target, lambda x, t: self.relevance(x, t).sum(1))
