"""Along which axis each traced tensor holds its feature vectors, on the operation view.

SRD on token vectors needs to know, at every dense layer, whether the layer mixes the entries
of one vector (a transformer's MLP: the vectors lie along the last axis, the one the layer
reads) or mixes vectors (an MLP-Mixer's, ResMLP's or gMLP's token-mixing layer, which reads
``x.transpose(1, 2)``: the vectors lie along dim 1 and the layer combines the tokens). The
shape alone cannot tell ((N, C, T) and (N, T, C) look alike), and position tags cannot either
once a token-mixing layer has given every hidden token the same place. So the axis travels
with the values:

* The input image (N, C, ...): dim 1.
* Calls that only move values: the same call runs on a ``meta`` tensor of the input's shape
  (no data), and the output axis is the one with the input axis's stride: permutes,
  transposes, views that keep the axis (a head split keeps its innermost part: a head's
  vector), indexing, splits and expansions. Copies that keep the number of dimensions
  (concatenation, ``contiguous``, padding, rolls) keep the axis; ``torch.stack`` and
  ``unbind`` shift it. Anything else (a view that merges the axis with another, ``F.unfold``)
  makes it unknown.
* Computing calls: convolutions, BatchNorm and pooling give dim 1; a dense layer gives the
  last axis when it reads the vectors, and keeps the input's axis when it reads the tokens
  (:meth:`VectorAxes.mixes_tokens`); elementwise calls, LayerNorm, softmax and
  normalisations keep it; a sum or product of two tensors keeps the axis they agree on;
  reductions shift it; ``A @ v`` (attention) gives the last axis.

:meth:`VectorAxes.of` returns None for an unknown axis; a rule then keeps its default
reading, so the tracking can only add knowledge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from .optrace import RecordingRule, is_elementwise

Tensor = torch.Tensor

#: computing calls whose output is an (N, C, ...) map with its vectors along dim 1
_MAP_KINDS = frozenset({"conv", "batch_norm", "avg_pool", "max_pool"})
#: computing calls that keep their (first) input's axis, besides elementwise ones
_NORMALISING_KINDS = frozenset({"layer_norm", "normalize", "softmax"})
#: what :meth:`VectorAxes._through_meta` gives for an axis a view merged with the later ones
MERGED = -1
#: reductions over some dimensions (a mean over tokens, Hiera's ``amax``)
_REDUCTIONS = {torch.mean, Tensor.mean, torch.sum, Tensor.sum, torch.amax, Tensor.amax}
#: copies that keep the number of dimensions and the meaning of every axis
_SAME_AXES = {torch.cat, torch.concat, torch.concatenate, torch.Tensor.contiguous,
              torch.Tensor.clone, torch.clone, torch.Tensor.to, torch.Tensor.float,
              torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16,
              torch.Tensor.type_as, torch.Tensor.flip, torch.flip, torch.Tensor.roll,
              torch.roll, torch.Tensor.masked_fill, torch.masked_fill, torch.Tensor.index_select,
              torch.index_select, torch.Tensor.gather, torch.gather,
              torch.Tensor.take_along_dim, torch.take_along_dim, torch.nn.functional.pad,
              torch.nn.functional.pixel_shuffle, torch.nn.functional.pixel_unshuffle,
              torch.Tensor.requires_grad_}


def contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return strides[::-1]


class VectorAxes:
    """The vector axis of the tensors of one traced forward pass (see the module docstring).

    Feed it the input (:meth:`start`), every call that moves values (:meth:`on_move`) and
    every computing call (:meth:`on_call`); read a tensor's axis with :meth:`of`, and whether
    a dense call read tokens with :meth:`mixes_tokens`. Entries go away with their tensors."""

    def __init__(self) -> None:
        self._axes: Any = WeakTensorKeyDictionary()
        #: tensors whose vectors a view merged with the axes after them (a flattened map)
        self._merged: Any = WeakTensorKeyDictionary()
        #: tensors made by ``torch.stack``: the axis it added (CrossViT's stacked heads)
        self._stacked: Any = WeakTensorKeyDictionary()
        #: call index -> the vector axis of the input of a dense call that mixes tokens
        self._mixing: dict[int, int] = {}
        #: indices of the dense calls that read a merged tensor (a VGG-style flatten head)
        self._merged_dense: set[int] = set()

    def start(self, x: Tensor) -> None:
        if x.dim() >= 2:
            self._axes[x] = 1

    def of(self, t: Any) -> int | None:
        """The vector axis of a traced tensor (non-negative), or None if unknown."""
        if not isinstance(t, Tensor):
            return None
        return self._axes.get(t)

    def mixes_tokens(self, call: Any) -> int | None:
        """For a dense call (``F.linear``, or a parameter matrix times a traced tensor):
        the vector axis of its input where it mixes vectors rather than the entries of each
        vector, else None."""
        return self._mixing.get(call.index)

    def merged(self, t: Any) -> bool:
        """Whether a view merged the vectors of ``t`` with the axes after them (a feature
        map flattened into one vector per sample, its channels outermost)."""
        return isinstance(t, Tensor) and bool(self._merged.get(t, False))

    def stacked(self, t: Any) -> int | None:
        """The axis ``torch.stack`` added to make ``t`` (not the batch: the parts stacked,
        CrossViT's branch heads), or None."""
        return self._stacked.get(t) if isinstance(t, Tensor) else None

    def reads_merged(self, call: Any) -> bool:
        """Whether a dense call reads a merged tensor (:meth:`merged`)."""
        return call.index in self._merged_dense

    @property
    def any_mixing(self) -> bool:
        """Whether some dense call of the pass mixed token vectors."""
        return bool(self._mixing)

    def _set(self, t: Any, axis: int | None) -> None:
        if isinstance(t, Tensor) and axis is not None and 0 <= axis < t.dim():
            self._axes[t] = axis

    # -- calls that move values -----------------------------------------------------------------
    def on_move(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        flat = tree_flatten((args, kwargs))[0]
        source = next((a for a in flat if isinstance(a, Tensor) and self.of(a) is not None),
                      None)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if source is None:
            if any(self.merged(a) for a in flat):  # still merged, whatever moves it
                for t in outs:
                    self._merged[t] = True
            return
        axis = self.of(source)
        name = getattr(func, "__name__", "")
        if func in _SAME_AXES:
            for t in outs:
                if t.dim() == source.dim():
                    self._set(t, axis)
            return
        if func in (torch.stack,):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % (source.dim() + 1)
            for t in outs:
                self._set(t, axis + (dim <= axis))
                self._stacked[t] = dim
            return
        if name == "unbind":
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % source.dim()
            if dim != axis:
                for t in outs:
                    self._set(t, axis - (dim < axis))
            return
        for t, axis_out in zip(outs, self._through_meta(func, args, kwargs, source, axis),
                               strict=False):
            if axis_out == MERGED:
                self._merged[t] = True
            else:
                self._set(t, axis_out)

    @staticmethod
    def _through_meta(func: Any, args: tuple, kwargs: dict, source: Tensor,
                      axis: int) -> list[int | None]:
        """The call run on data-free ``meta`` tensors (``source`` contiguous): each output's
        dimension with the stride of ``source``'s ``axis`` (a view of it), or the same axis for
        a copy with as many dimensions; for a view that merged the axis with the ones after it,
        the dimension it went into, or :data:`MERGED` where that made one vector per sample (a
        flattened map); None otherwise."""
        meta_source = torch.empty(source.shape, dtype=source.dtype, device="meta")

        def as_meta(obj: Any) -> Any:
            if obj is source:
                return meta_source
            if isinstance(obj, Tensor):
                return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
            return obj

        try:
            with torch._C.DisableTorchFunction():
                result = func(*tree_map(as_meta, args), **tree_map(as_meta, kwargs))
        except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
            return []
        stride = contiguous_strides(source.shape)[axis]
        found: list[int | None] = []
        for t in tree_flatten(result)[0]:
            if not isinstance(t, Tensor):
                continue
            if t._base is not meta_source:  # a copy
                found.append(axis if t.dim() == source.dim() else None)
                continue
            dims = [d for d in range(t.dim()) if t.stride(d) == stride
                    and (t.shape[d] > 1 or source.shape[axis] == 1)]
            if not dims and t.dim() < source.dim() and source.shape[axis] > 1:
                # merged with the axes after it: into one vector per sample (a flattened map:
                # MERGED), or into a wider vector axis (NesT joins its heads as (C', H))
                covering = [d for d in range(t.dim()) if t.stride(d) <= stride
                            < t.stride(d) * t.shape[d]]
                found.append(MERGED if t.dim() <= 2 or len(covering) != 1 else covering[0])
                continue
            found.append(dims[-1] if len(dims) == 1 or (
                len(dims) > 1 and all(t.shape[d] == 1 for d in dims[:-1])) else None)
        return found

    # -- computing calls ------------------------------------------------------------------------
    def on_call(self, call: Any, inputs: Sequence[Tensor], out: Tensor) -> None:
        if not isinstance(out, Tensor):
            return
        kind = call.kind
        first = inputs[0] if inputs else None
        axis = self.of(first)
        dense = kind == "linear" or (kind == "matmul" and len(inputs) == 1)
        keeps = is_elementwise(kind, len(inputs)) or kind in _NORMALISING_KINDS
        if self.merged(first):
            if dense:
                self._merged_dense.add(call.index)
            elif keeps:
                self._merged[out] = True
            return
        if call.original in _REDUCTIONS:
            if axis is not None and first is not None:
                self._set(out, self._reduced_axis(call, first, axis))
            return
        if kind in _MAP_KINDS:
            self._set(out, 1)
            return
        if dense:
            self._dense(call, first, axis, out)
            return
        if kind == "matmul":
            if call.weights[0]:
                # attention: A @ v mixes the rows of v, vectors along the last axis; where v's
                # vectors are its columns (DaViT's channel attention, A @ q^T) it mixes the
                # entries of each column, which stay the vectors
                v = inputs[1] if len(inputs) > 1 else None
                columns = v is not None and self.of(v) == v.dim() - 2
                self._set(out, out.dim() - (2 if columns else 1))
            elif call.weights[1]:
                # x @ w: the columns of x are the vectors (a global-context block's pooling
                # of an (N, 1, C, HW) map); where x's vectors are its rows (channel attention
                # written q @ A^T) it mixes the entries of each row, which stay the vectors
                x = inputs[0] if inputs else None
                rows = x is not None and self.of(x) == x.dim() - 1
                self._set(out, out.dim() - (1 if rows else 2))
            return
        if keeps:
            if axis is not None and first is not None:
                self._set(out, axis + out.dim() - first.dim())
            return
        if kind in ("add", "sub", "mul", "div"):
            # aligned from the right, as broadcasting aligns them
            known = {self.of(t) - t.dim() for t in inputs if self.of(t) is not None}
            if len(known) == 1:
                self._set(out, out.dim() + known.pop())

    def _dense(self, call: Any, x: Tensor | None, axis: int | None, out: Tensor) -> None:
        if x is None:
            return
        last = x.dim() - 1
        if call.kind == "matmul" and not call.is_input(0, "input"):
            # W @ x: a parameter matrix mixes the rows of x, the vectors along its last axis
            if axis == last and x.dim() >= 2:
                self._mixing[call.index] = axis
                self._set(out, out.dim() - 1)
            return
        if axis is not None and axis != last and x.dim() >= 3:
            self._mixing[call.index] = axis  # reads tokens: the vectors keep their axis
            self._set(out, axis)
        else:
            self._set(out, out.dim() - 1)

    @staticmethod
    def _reduced_axis(call: Any, x: Tensor, axis: int) -> int | None:
        """The axis after a mean, sum or maximum over some dimensions (None: over it)."""
        dim = call.argument(1, "dim")
        if dim is None:
            return None
        dims = {d % x.dim() for d in (dim if isinstance(dim, list | tuple) else (dim,))}
        if axis in dims:
            return None
        keepdim = bool(call.argument(2, "keepdim", False))
        return axis if keepdim else axis - sum(d < axis for d in dims)


class AxisProbe(RecordingRule):
    """A recording rule (a probe pass that changes nothing) that also follows the vector axes
    from the traced input ``x``: :attr:`axes` tells afterwards which dense calls mixed tokens."""

    def __init__(self, x: Tensor) -> None:
        self.axes = VectorAxes()
        self.axes.start(x)

    def on_call(self, call: Any, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        self.axes.on_call(call, inputs, output)
        return output

    def on_move(self, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self.axes.on_move(func, args, kwargs, output)
