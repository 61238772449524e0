"""Where each entry of a traced tensor sits in the input image, on the operation view.

A rule that places per-entry values on the image grid (FullGrad's bias maps) cannot read
positions off a tensor's shape once a model folds windows or patches into the batch (Swin's
window attention with its cyclic shifts, MobileViT's unfolded patches, LeViT's subsampled
tokens): a ``(B * windows, 49, C)`` tensor says nothing about which pixel a row came from. So
positions travel with the values. Every traced tensor gets three *tags* of its own shape:
the sample, and the row and column, in input pixels, of the centre of the input region the
entry summarises (pixel ``i``'s centre is ``i + 0.5``).

* The input image: its own sample, row and column.
* Calls that only move values (views, permutes, rolls, window partitions, indexing,
  concatenation, padding, splits) run again on the tags, so every entry keeps its place.
  An untracked tensor joined to tracked ones (a class, distillation or register token, the
  zeros of padding) has no place: NaN.
* A computing call's output entry sits at the mean position of the entries it reads: a dense
  layer, LayerNorm or softmax averages over the dimensions it mixes (all of one token's
  channels share its place, and a patch-merging layer's 2 x 2 neighbours give their centre);
  a convolution or pooling sits at its window's centre taps (padding excluded); a matrix
  product ``a @ b`` takes the rows of ``a``; an upsampled map sits on its own grid of the
  image; a mean or sum runs on the tags and divides by the same call on ones; elementwise
  calls, scalings and BatchNorm keep their input's tags; a sum or product of two traced
  tensors keeps the tags where the two agree (where one has no place, the other's).
* A tensor made by a call the view does not know (traced, without tags) is *unknown*:
  :meth:`PositionTags.of` returns None for it, and outputs computed from it get ``-inf``, so a
  rule can refuse instead of placing values where they do not belong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from .catalogue import unfold_filled
from .optrace import is_elementwise

Tensor = torch.Tensor
Tags = tuple[Tensor, Tensor, Tensor]  # sample, row, column

#: a tag that no place can have: computed from a tensor of unknown positions
UNKNOWN = float("-inf")

_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MAX_TO_AVG = {F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d,
               F.max_pool3d: F.avg_pool3d, F.adaptive_max_pool1d: F.adaptive_avg_pool1d,
               F.adaptive_max_pool2d: F.adaptive_avg_pool2d}


class PositionTags:
    """Position tags of the tensors of one traced forward pass (see the module docstring).

    Feed it the input (:meth:`start`), every call that moves values (:meth:`on_move`) and
    every computing call (:meth:`on_call`); read a tensor's tags with :meth:`of`. Tags go
    away with their tensors."""

    def __init__(self) -> None:
        self._tags: Any = WeakTensorKeyDictionary()
        self._size: tuple[int, ...] = ()  # the input's spatial size

    def start(self, x: Tensor) -> None:
        """Tag the model's input ``(N, C, *spatial)``; only its first two spatial dimensions
        get rows and columns (a 1-D signal: rows only)."""
        shape, opts = x.shape, {"dtype": torch.float32, "device": x.device}
        self._size = tuple(shape[2:])
        sample = torch.arange(shape[0], **opts).reshape(-1, *[1] * (x.dim() - 1))
        spatial = x.dim() - 2
        rows = (torch.arange(shape[2], **opts) + 0.5).reshape(-1, *[1] * (spatial - 1)) \
            if spatial >= 1 else torch.zeros((), **opts)
        cols = (torch.arange(shape[3], **opts) + 0.5).reshape(-1, *[1] * (spatial - 2)) \
            if spatial >= 2 else torch.zeros((), **opts)
        self._tags[x] = tuple(t.expand(shape) for t in (sample, rows, cols))

    def of(self, t: Any) -> Tags | None:
        """The tags of a traced tensor; None when its positions are unknown."""
        if not isinstance(t, Tensor):
            return None
        return self._tags.get(t)

    # -- calls that move values -----------------------------------------------------------------
    def on_move(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Tag the outputs of a call that only moves values: the same call on the tags."""
        outs = [t for t in tree_flatten(out)[0]
                if isinstance(t, Tensor) and t.is_floating_point()]
        if not outs:
            return
        moved: list[list[Tensor]] = []
        for component in range(3):
            def as_tag(obj: Any, c: int = component) -> Any:
                if not isinstance(obj, Tensor) or not obj.is_floating_point():
                    return obj
                tags = self.of(obj)
                if tags is not None:
                    return tags[c]
                # a tensor joined to tracked ones: no place (a parameter), or unknown
                return torch.full(obj.shape, float("nan"), dtype=torch.float32,
                                  device=obj.device)

            moved_kwargs = tree_map(as_tag, kwargs)
            moved_args = tree_map(as_tag, args)
            if func is F.pad:  # zero-padded entries have no place; copies keep theirs
                mode = moved_args[2] if len(moved_args) > 2 else moved_kwargs.get(
                    "mode", "constant")
                moved_args = tuple(moved_args[:2])
                moved_kwargs = {**moved_kwargs, "mode": mode}
                if mode == "constant":
                    moved_kwargs["value"] = float("nan")
                else:
                    moved_kwargs.pop("value", None)
            try:
                with torch._C.DisableTorchFunction():
                    result = (unfold_filled(moved_args, moved_kwargs, float("nan"))
                              if func is F.unfold else func(*moved_args, **moved_kwargs))
            except (RuntimeError, TypeError, ValueError, IndexError):
                return  # the outputs stay unknown
            flat = [t for t in tree_flatten(result)[0] if isinstance(t, Tensor)
                    and t.is_floating_point()]
            if len(flat) != len(outs) or any(a.shape != b.shape for a, b in zip(
                    flat, outs, strict=True)):
                return
            moved.append(flat)
        for i, t in enumerate(outs):
            self._tags[t] = (moved[0][i], moved[1][i], moved[2][i])

    # -- computing calls ------------------------------------------------------------------------
    def on_call(self, call: Any, inputs: Sequence[Tensor], out: Tensor) -> None:
        """Tag the output of a computing call (an ``OpCall`` of ``engine/optrace.py``)."""
        if not isinstance(out, Tensor) or not out.is_floating_point():
            return
        known = [self.of(t) for t in inputs]
        if not inputs or any(k is None for k in known):
            self._tags[out] = _unknown(out)
            return
        by_columns = call.kind == "matmul" and _placed_by_columns(call, known)
        try:
            tags = tuple(self._component(call, inputs, [k[c] for k in known], out, c,
                                         by_columns) for c in range(3))
        except (RuntimeError, TypeError, ValueError, IndexError):
            tags = None
        if tags is None or None in tags:
            self._tags[out] = _unknown(out)
            return
        # an entry with one unknown coordinate has no known place at all
        lost = tags[0].isneginf() | tags[1].isneginf() | tags[2].isneginf()
        if bool(lost.any()):
            tags = tuple(torch.where(lost, UNKNOWN, t) for t in tags)
        self._tags[out] = tags

    def _resampled(self, tags: Tensor, component: int, shape: torch.Size) -> Tensor | None:
        """A feature map resampled to another grid (upsampling) covers the image as before:
        output position ``j`` of ``n`` along an axis of ``L`` pixels sits at
        ``(j + 1/2) L / n``. (Reading the tags of a 1 x 1 map, say, could not tell where the
        four entries of its 2 x 2 upsampling lie.)"""
        spatial = len(shape) - 2
        if spatial < 1 or tags.shape[:2] != shape[:2] or len(self._size) < spatial:
            return None
        if component == 0:  # the sample: as the input's first entry per sample
            return tags.reshape(shape[0], -1)[:, :1].reshape(
                -1, *[1] * (len(shape) - 1)).expand(shape)
        axis = component - 1  # rows, then columns
        if axis >= spatial:
            return torch.zeros((), dtype=tags.dtype, device=tags.device).expand(shape)
        n, length = shape[2 + axis], self._size[axis]
        centres = (torch.arange(n, dtype=tags.dtype, device=tags.device) + 0.5) * (length / n)
        return centres.reshape(-1, *[1] * (spatial - axis - 1)).expand(shape)

    def _component(self, call: Any, inputs: Sequence[Tensor], tags: list[Tensor],
                   out: Tensor, component: int = 0, by_columns: bool = False) -> Tensor | None:
        kind, shape = call.kind, out.shape
        first = tags[0]
        if is_elementwise(kind, len(inputs)) or kind == "batch_norm":
            return first.expand(shape) if _broadcasts(first.shape, shape) else None
        if kind in ("add", "sub", "mul", "div"):
            full = [t for t, x in zip(tags, inputs, strict=True) if x.shape == shape]
            if len(full) == 1:  # the other is broadcast over it (a gate, a summary)
                return full[0]
            a, b = (t.expand(shape) for t in tags)
            # where one has no place the other's holds; where they disagree, unknown
            merged = torch.where(a.isnan(), b, a)
            clash = ~(a.isnan() | b.isnan()) & (a != b)
            return torch.where(clash | a.isneginf() | b.isneginf(), UNKNOWN, merged)
        if kind == "linear":
            return first.mean(-1, keepdim=True).expand(shape)
        if kind == "layer_norm" and call.grouped:
            return first  # a GroupNorm's statistics: each entry stays where it is
        if kind == "layer_norm":
            normalized = call.argument(1, "normalized_shape")
            n = len(normalized) if isinstance(normalized, list | tuple) else 1
            return first.mean(tuple(range(-n, 0)), keepdim=True).expand(shape)
        if kind in ("softmax", "normalize"):  # each output entry reads its whole vector
            dim = call.argument(1, "dim") if kind == "softmax" else call.argument(2, "dim", 1)
            return first.mean(dim, keepdim=True).expand(shape) if isinstance(dim, int) \
                else None
        if kind == "matmul":
            return self._matmul(call, tags, shape, by_columns)
        if kind == "conv":
            return _conv_centre(call, first, shape)
        if kind == "avg_pool" and call.original in _POOL_DIMS:
            return _pool_centre(call, first, shape)
        if kind == "avg_pool" and call.original in (F.interpolate, F.upsample):
            return self._resampled(first, component, shape)
        if kind == "avg_pool":
            ones = [torch.ones_like(t) for t in tags]
            return (call.run(tags, func=call.original)
                    / call.run(ones, func=call.original)).expand(shape)
        if kind == "max_pool":
            return _max_pool_mean(call, first, shape)
        return None

    @staticmethod
    def _matmul(call: Any, tags: list[Tensor], shape: torch.Size,
                by_columns: bool) -> Tensor | None:
        """``a @ b``: an output row sits where ``a``'s row does (a query token); with only
        ``b`` traced, or ``by_columns`` (:func:`_placed_by_columns`), a column where ``b``'s
        column does."""
        if call.original is torch.einsum:
            return None
        if call.is_input(0, "input") and not by_columns:
            a = tags[0]
            return a.mean(-1, keepdim=True).expand(shape) if a.dim() >= 2 else None
        b = tags[-1]
        return b.mean(-2, keepdim=True).expand(shape) if b.dim() >= 2 else None


def _placed_by_columns(call: Any, known: Sequence[Tags]) -> bool:
    """Whether ``a @ b``, both traced, sits where ``b``'s columns do: ``a``'s rows share one
    place and ``b``'s columns do not (channel attention, XCiT's and DaViT's ``attn @ v``
    over the channels: the rows are channels, the columns tokens). Decided once, over the
    rows and columns of the image, for all three tags."""
    if len(known) != 2 or call.original is torch.einsum or not call.is_input(0, "input"):
        return False
    a, b = known
    if a[1].dim() < 2 or b[1].dim() < 2:
        return False
    rows = [_varies(t.mean(-1, keepdim=True), -2) for t in a[1:]]
    columns = [_varies(t.mean(-2, keepdim=True), -1) for t in b[1:]]
    return not any(rows) and any(columns)


def _varies(t: Tensor, dim: int) -> bool:
    """Whether ``t`` holds more than one place along ``dim`` (NaN, no place, does not
    count)."""
    if t.shape[dim] < 2:
        return False
    return bool(((t - t.narrow(dim, 0, 1)).abs() > 1e-6).any())


def _unknown(out: Tensor) -> Tags:
    t = torch.full((), UNKNOWN, dtype=torch.float32, device=out.device).expand(out.shape)
    return (t, t, t)


def _broadcasts(source: Sequence[int], shape: Sequence[int]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(source), tuple(shape))) == tuple(shape)
    except RuntimeError:
        return False


def _centre_taps(kernel: Sequence[int], like: Tensor) -> Tensor:
    """A ``(1, 1, *kernel)`` kernel with ones at the window's centre (the two middle taps
    per dimension of an even size)."""
    taps = torch.zeros((1, 1, *kernel), dtype=like.dtype, device=like.device)
    middle = tuple(slice((k - 1) // 2, k // 2 + 1) for k in kernel)
    taps[(0, 0, *middle)] = 1.0
    return taps


def _centre_of_windows(tags: Tensor, kernel: Sequence[int], dims: int, shape: torch.Size,
                       **geometry: Any) -> Tensor | None:
    """The position of each window's centre, whatever the weights: the mean of the input
    positions at its central taps. (The mean over the whole window would move the border
    windows, which padding cuts short, inwards, and a stack of them by a whole position.)
    Padding taps carry no position."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(dims)
    if conv is None or tags.dim() != dims + 2:
        return None
    taps = _centre_taps(kernel, tags)
    summary = tags.mean(1, keepdim=True)  # one place per position, whatever the channel
    with torch._C.DisableTorchFunction():
        total = conv(summary, taps, None, **geometry)
        count = conv(torch.ones_like(summary), taps, None, **geometry)
    if total.shape[2:] != shape[2:]:
        return None
    return (total / count).expand(shape)


def _conv_centre(call: Any, tags: Tensor, shape: torch.Size) -> Tensor | None:
    """A convolution's output position: its window's centre."""
    dims = _CONV.get(call.original)
    weight = call.argument(1, "weight")
    if dims is None or not isinstance(weight, Tensor):
        return None
    return _centre_of_windows(tags, weight.shape[2:], dims, shape,
                              stride=call.argument(3, "stride", 1),
                              padding=call.argument(4, "padding", 0),
                              dilation=call.argument(5, "dilation", 1))


def _sizes(value: Any, dims: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] * dims


_POOL_DIMS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1,
              F.avg_pool2d: 2, F.avg_pool3d: 3}


def _pool_centre(call: Any, tags: Tensor, shape: torch.Size) -> Tensor | None:
    """A max or average pooling's output position: its window's centre (which entry wins a
    max depends on the values, not on the place the output stands for)."""
    dims = _POOL_DIMS.get(call.original)
    if dims is None or call.argument(5 if call.original in _MAX_TO_AVG else 4,
                                      "ceil_mode", False):
        return None  # ceil mode: windows past the end, whose centre moves
    kernel = _sizes(call.argument(1, "kernel_size"), dims)
    stride = call.argument(2, "stride", None) or kernel
    dilation = call.argument(4, "dilation", 1) if call.original in _MAX_TO_AVG else 1
    return _centre_of_windows(tags, kernel, dims, shape, stride=stride,
                              padding=call.argument(3, "padding", 0), dilation=dilation)


def _max_pool_mean(call: Any, tags: Tensor, shape: torch.Size) -> Tensor | None:
    """A max over dimensions (``amax``) or an adaptive max pooling: the mean position of
    what it reads; a max pooling with a kernel: its window's centre."""
    func = call.original
    if func in (torch.amax, Tensor.amax):
        dim = call.argument(1, "dim", None)
        keep = call.argument(2, "keepdim", False)
        if dim is None:
            return None
        return tags.mean(dim, keepdim=keep).expand(shape)
    if func in (F.adaptive_max_pool1d, F.adaptive_max_pool2d):
        with torch._C.DisableTorchFunction():
            return _MAX_TO_AVG[func](tags, call.argument(1, "output_size")).expand(shape)
    return _pool_centre(call, tags, shape)
