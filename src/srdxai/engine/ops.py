"""Linear operations recorded by the engine, each split into *components*.

SRD needs, for every bias, the contribution of each way ("path") an input position reaches an
output position. Every linear operation below therefore knows

* ``components(i)``: the ways its ``i``-th input reaches an output position (kernel offsets of a
  convolution or pooling window, the single identity of a pointwise op, every position of a
  global average pool);
* ``component_forward(x, i, k)``: the part of the output due to input ``x`` through component
  ``k`` alone (full channel vectors, the op's bias excluded);
* ``component_positions(m, i, k)``: the same position routing for a single-channel map, without
  any channel mixing or arg-max masking (tells which output positions a component reaches from
  inside the input, i.e. not from padding);
* ``component_scatter(m, i, k)``: the adjoint of ``component_positions``: sends a per-output-
  position scalar map back to the input position it came from.

Tensors are laid out ``(N, C, *spatial)``; scalar maps ``(B, *spatial)``. A 2-D tensor ``(N, C)``
has one position (empty spatial shape).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .channels import channel_dot, channel_norm, safe_sqrt
from .gradmode import building_graph

Component = Any


def as_tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * dims
    return value


@dataclass(eq=False)
class LinearOp:
    """Base class: one recorded call of a linear operation."""

    name: str  # the module (and function) that ran it, for error messages
    inputs: list[Any] = field(default_factory=list)  # engine nodes (None for constants)
    output: Any = None
    bias: torch.Tensor | None = None  # broadcastable to the output, or None

    kind = "linear"

    def components(self, i: int) -> Sequence[Component]:
        return (0,)

    def component_forward(self, x: torch.Tensor, i: int, k: Component) -> torch.Tensor:
        raise NotImplementedError

    def component_positions(self, m: torch.Tensor, i: int, k: Component) -> torch.Tensor:
        return m

    def component_scatter(self, m: torch.Tensor, i: int, k: Component) -> torch.Tensor:
        return m


class PointwiseScale(LinearOp):
    """``x * scale`` with a per-channel (or broadcastable constant) scale: BatchNorm, constants."""

    kind = "scale"

    def __init__(self, name: str, scale: torch.Tensor | float, bias: torch.Tensor | None = None):
        super().__init__(name=name, bias=bias)
        self.scale = scale
        # ``scale`` as (per-channel vector (C,), per-sample-and-position scalar (N, 1, *S)),
        # either None for 1, when it factors so (a LayerNorm over channels: weight / std);
        # rules use it to carry the scale through per-offset norms without the full tensor
        self.factors: tuple[torch.Tensor | None, torch.Tensor | None] | None = None

    def component_forward(self, x, i, k):
        return x * self.scale


class BatchNormOp(PointwiseScale):
    kind = "batchnorm"


class IdentityOp(LinearOp):
    """Eval-mode dropout, ``contiguous``, ``clone``: the value passes unchanged."""

    kind = "identity"

    def component_forward(self, x, i, k):
        return x


class AddOp(LinearOp):
    """Sum of several input-dependent tensors (residual connections), each with a coefficient."""

    kind = "add"

    def __init__(self, name: str, coefficients: Sequence[float]):
        super().__init__(name=name)
        self.coefficients = list(coefficients)

    def component_forward(self, x, i, k):
        c = self.coefficients[i]
        return x if c == 1 else x * c


class ReshapeOp(LinearOp):
    """A view that keeps batch and channels and only re-lays the spatial positions."""

    kind = "reshape"

    def __init__(self, name: str, in_spatial: tuple[int, ...], out_spatial: tuple[int, ...]):
        super().__init__(name=name)
        self.in_spatial = in_spatial
        self.out_spatial = out_spatial

    def component_forward(self, x, i, k):
        return x.reshape(*x.shape[:2], *self.out_spatial)

    def component_positions(self, m, i, k):
        return m.reshape(m.shape[0], *self.out_spatial)

    def component_scatter(self, m, i, k):
        return m.reshape(m.shape[0], *self.in_spatial)


class PadOp(LinearOp):
    """Constant zero padding (or cropping, for negative pads) of the spatial dimensions."""

    kind = "pad"

    def __init__(self, name: str, pads: Sequence[int]):
        super().__init__(name=name)
        self.pads = list(pads)

    def component_forward(self, x, i, k):
        return F.pad(x, self.pads)

    def component_positions(self, m, i, k):
        return F.pad(m, self.pads)

    def component_scatter(self, m, i, k):
        return F.pad(m, [-p for p in self.pads])


class LinearLayerOp(LinearOp):
    """``F.linear`` on a ``(N, C)`` vector (a single position)."""

    kind = "fc"

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(name=name, bias=bias)
        self.weight = weight

    def component_forward(self, x, i, k):
        return F.linear(x, self.weight)


_TABLE_CACHE: dict[tuple, tuple[dict, dict]] = {}


def _build_index_tables(in_spatial, out_spatial, offsets, stride, dilation, pad_before, device):
    flat_index, inside_map = {}, {}
    grids = [torch.arange(o, device=device) for o in out_spatial]
    for off in offsets:
        coords = [g * s + o * d - p
                  for g, s, o, d, p in zip(grids, stride, off, dilation, pad_before, strict=True)]
        mesh = torch.meshgrid(*coords, indexing="ij") if len(coords) > 1 else coords
        inside = torch.ones(out_spatial, dtype=torch.bool, device=device)
        flat = torch.zeros(out_spatial, dtype=torch.long, device=device)
        for c, size in zip(mesh, in_spatial, strict=True):
            inside &= (c >= 0) & (c < size)
            flat = flat * size + c.clamp(0, size - 1)
        flat_index[off] = flat.reshape(-1)
        inside_map[off] = inside.reshape(-1)
    return flat_index, inside_map


class WindowOp(LinearOp):
    """Shared position arithmetic of convolutions and pooling windows.

    Output position ``q`` reads input position ``stride*q + offset*dilation - pad_before`` per
    spatial dimension, for each kernel offset. The index tables are built once per call.
    """

    def _setup_window(
        self,
        in_spatial: Sequence[int],
        out_spatial: Sequence[int],
        kernel: Sequence[int],
        stride: Sequence[int],
        dilation: Sequence[int],
        pad_before: Sequence[int],
        device: torch.device,
    ) -> None:
        self.in_spatial = tuple(in_spatial)
        self.out_spatial = tuple(out_spatial)
        self.kernel = tuple(kernel)
        self._window = (tuple(stride), tuple(dilation), tuple(pad_before), device)
        self.offsets = list(itertools.product(*(range(k) for k in self.kernel)))
        self.n_in = math.prod(self.in_spatial)
        self._tables: tuple[dict, dict] | None = None
        self.stride, self.dilation, self.pad_before = (tuple(stride), tuple(dilation),
                                                       tuple(pad_before))
        # Padding after the input so that every offset's strided slice is in range.
        self._pad_after = tuple(
            max(0, st * (n - 1) + d * (kk - 1) + 1 - p - size)
            for st, n, d, kk, p, size in zip(self.stride, self.out_spatial, self.dilation,
                                             self.kernel, self.pad_before, self.in_spatial,
                                             strict=True))
        self._trivial = all(kk == 1 for kk in self.kernel) and all(
            st == 1 for st in self.stride) and not any(self.pad_before) and (
            self.in_spatial == self.out_spatial)
        self._padded: tuple[torch.Tensor, torch.Tensor] | None = None

    def _index_tables(self) -> tuple[dict, dict]:
        """Per offset: the flat input index each output position reads, and whether it is
        inside the input. Built on first use only (plain-gradient rules never need them) and
        shared by every op with the same geometry."""
        if self._tables is None:
            stride, dilation, pad_before, device = self._window
            key = (self.in_spatial, self.out_spatial, self.kernel, stride, dilation, pad_before,
                   str(device))
            tables = _TABLE_CACHE.get(key)
            if tables is None:
                tables = _build_index_tables(self.in_spatial, self.out_spatial, self.offsets,
                                             stride, dilation, pad_before, device)
                if len(_TABLE_CACHE) > 256:
                    _TABLE_CACHE.clear()
                _TABLE_CACHE[key] = tables
            self._tables = tables
        return self._tables

    @property
    def _flat_index(self) -> dict:
        return self._index_tables()[0]

    @property
    def _inside(self) -> dict:
        return self._index_tables()[1]

    def inside_map(self, k: Component) -> torch.Tensor:
        """Flat (out positions,) mask: where offset ``k`` reads inside the input."""
        return self._inside[k]

    def release(self) -> None:
        """Drop the cached padded input (memory) once a rule is done with this call."""
        self._padded = None

    def input_at_offset(self, x: torch.Tensor, k: Component) -> torch.Tensor:
        """The input values offset ``k`` reads for every output position, (N, C, *out)
        (zero where it reads padding)."""
        return self._shifted(x, k)

    def _shifted(self, x: torch.Tensor, k: Component) -> torch.Tensor:
        """The input positions offset ``k`` reads, as a strided view of the padded input."""
        if self._trivial:
            return x
        cached = self._padded
        if cached is None or cached[0] is not x:
            pads: list[int] = []
            for p, extra in zip(reversed(self.pad_before), reversed(self._pad_after),
                                strict=True):
                pads += [p, extra]
            cached = (x, F.pad(x, pads) if any(pads) else x)
            self._padded = cached
        xp = cached[1]
        index = [slice(None), slice(None)]
        for off, s, d, n in zip(k, self.stride, self.dilation, self.out_spatial, strict=True):
            index.append(slice(off * d, off * d + s * (n - 1) + 1, s))
        return xp[tuple(index)]

    def components(self, i: int) -> Sequence[Component]:
        return self.offsets

    def _gather(self, x: torch.Tensor, off: Component) -> torch.Tensor:
        """Input values at the positions component ``off`` reads, zero where it reads padding."""
        lead = x.shape[: x.dim() - len(self.in_spatial)]
        flat = x.reshape(*lead, self.n_in)
        out = flat.index_select(-1, self._flat_index[off])
        out = out * self._inside[off].to(out.dtype)
        return out.reshape(*lead, *self.out_spatial)

    def component_positions(self, m, i, k):
        return self._gather(m, k)

    def component_scatter(self, m, i, k):
        flat_out = m.reshape(m.shape[0], -1) * self._inside[k].to(m.dtype)
        canvas = m.new_zeros(m.shape[0], self.n_in)
        canvas.index_add_(1, self._flat_index[k], flat_out)
        return canvas.reshape(m.shape[0], *self.in_spatial)


#: output values per block of :meth:`ConvOp.stacked_norms`: 16 MB of float32 on a CPU (of
#: 1, 2 and 4 Mi values the fastest on ConvNeXt-Tiny's four stages together), 256 MB on a
#: GPU (few, large launches)
_NORM_BLOCK = 1 << 22
_NORM_BLOCK_GPU = 1 << 26
#: input channels below which :meth:`ConvOp.stacked_norms` takes its Gram quadratic forms
#: as batched matrix-vector products (an RGB input: 1.5x faster there than a product and a
#: sum), at and above which as a product in place and a sum (64-512 channels: about 5x)
_BATCHED_DOT_BELOW = 16


class ConvOp(WindowOp):
    """Convolution (1-D or 2-D, any stride, zero padding, dilation, groups / depthwise)."""

    kind = "conv"
    #: the model's dense layer on the channel axis of a channels-last map, recorded as this
    #: 1x1 convolution (rules that tell layer types apart treat it as dense)
    dense = False

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: Sequence[int],
        pad_before: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        in_spatial: Sequence[int],
        out_spatial: Sequence[int],
    ):
        super().__init__(name=name, bias=bias)
        self.weight = weight
        self.groups = groups
        self._setup_window(
            in_spatial, out_spatial, weight.shape[2:], stride, dilation, pad_before, weight.device
        )
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]

    def component_forward(self, x, i, k, scale: torch.Tensor | None = None):
        # The part of the output due to kernel offset k: a 1x1 convolution of the input
        # positions that offset reads, at output resolution. ``scale`` (per output channel)
        # folds a following BatchNorm into the weights.
        w = self._offset_weight(k, scale)
        return self._conv(self._shifted(x, k), w.reshape(*w.shape, *([1] * len(k))),
                          groups=self.groups)

    def _offset_weight(self, k: Component, scale: torch.Tensor | None) -> torch.Tensor:
        """The (C_out, C_in/groups) weights of kernel offset ``k``, times ``scale`` per output
        channel if given."""
        w = self.weight[(slice(None), slice(None), *k)]
        return w if scale is None else w * scale.reshape(-1, 1)

    def offset_weights(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Every offset's :meth:`_offset_weight` at once, (K, C_out, C_in/groups), in the order
        of :attr:`offsets` (the kernel's row-major order)."""
        w = self.weight.flatten(2).permute(2, 0, 1)
        return w if scale is None else w * scale.reshape(1, -1, 1)

    # -- all offsets at once (the common "PFV -> conv [-> BN]" bias split) ------------------
    def offset_norms(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Norm over output channels of every offset's contribution: (N, K, *out).

        Uses whichever is cheaper per offset: the 1x1 convolution itself (C_in*C_out per
        position), or the quadratic form with the offset's Gram matrix W_k^T W_k (C_in^2).
        For depthwise kernels the quadratic form is a channel sum of x^2 * w^2.
        """
        if self._norms_at_inputs_apply(x):
            return self._offset_norms_at_inputs(x, scale)
        cout, cin_g = self.weight.shape[:2]
        if cin_g == 1 and self._norms_at_inputs_apply_full(x):
            # depthwise (any channel multiplier): each output channel reads one input channel,
            # so the squared norm is a per-input-channel weighted sum of x^2, for all offsets
            # in one 1x1 convolution at the input positions
            w = self.offset_weights(scale)[:, :, 0]
            sq_w = (w * w).reshape(len(self.offsets), self.groups, cout // self.groups).sum(2)
            return self._diagonal_sq_norms(x, sq_w)
        return torch.stack([self.offset_norm(x, k, scale) for k in self.offsets], 1)

    def _norms_at_inputs_apply(self, x: torch.Tensor) -> bool:
        # A stride-1 2-D convolution reads every input position with every offset, so the
        # norms can be computed once per input position and then shifted (below). Strided or
        # grouped convolutions keep the per-offset path (it computes only what is read).
        return self.groups == 1 and self._norms_at_inputs_apply_full(x)

    def _offset_norms_at_inputs(self, x: torch.Tensor,
                                scale: torch.Tensor | None) -> torch.Tensor:
        """:meth:`offset_norms` for stride-1 convolutions, all offsets in one 1x1 convolution.

        Offset ``k``'s contribution at output position ``p`` is ``W_k x(q)`` with ``q`` the
        input position it reads, so its norm is a function of ``q`` alone. One 1x1
        convolution with the offsets' weights stacked (or their Gram matrices, when C_in <
        C_out) gives every offset's norm at every input position; a gather then moves each
        offset's norms to the output positions that read them (0 where they read padding).
        Per-offset shifted copies of the input cost several times more (memory traffic).
        """
        weights = self.offset_weights(scale)
        return self.stacked_norms(x, weights)

    def stacked_norms(self, x: torch.Tensor, weights: torch.Tensor,
                      grams: bool = False) -> torch.Tensor:
        """``|| M_k x(q_k(p)) ||`` over output channels for every offset ``k`` at every output
        position ``p``, (N, K, *out): ``weights`` (K, C_out', C_in) holds one matrix ``M_k``
        per offset (the offset's weights, possibly followed by more linear maps), ``q_k(p)``
        the input position offset ``k`` reads for output ``p`` (0 where it reads padding).

        Stride-1 2-D convolutions: one matrix product of the stacked weights at the input
        positions (in blocks of about ``_NORM_BLOCK`` output values, so the (K*C)-channel
        intermediate stays in cache), then a gather; otherwise per offset on the shifted
        input.
        ``grams``: ``weights`` already holds the Gram matrices ``M_k^T M_k`` (K, C_in, C_in).
        """
        n_off, cout, cin = weights.shape
        gram = grams or cin < cout
        if gram and not grams:
            weights = weights.transpose(1, 2) @ weights  # K, Ci, Ci
        if not self._norms_at_inputs_apply_full(x):
            ones = (1,) * len(self.kernel)
            norms = []
            for j, k in enumerate(self.offsets):
                xs = self._shifted(x, k)
                y = self._conv(xs, weights[j].reshape(*weights[j].shape, *ones).to(x.dtype))
                norms.append(safe_sqrt(channel_dot(y, xs)) if gram else channel_norm(y))
            return torch.stack(norms, 1)
        n = x.shape[0]
        # (positions, C_in) rows of the channels-last input times the (C_in, K * C_out')
        # stacked weights, a block of rows at a time into one reused buffer (a fresh
        # full-size product would spend most of its time faulting in its pages); each block's
        # squared norms are reduced while it is in cache
        rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(
            -1, cin)
        stacked = weights.reshape(-1, cin).transpose(0, 1).to(x.dtype)
        width_out = stacked.shape[1]
        block = _NORM_BLOCK if x.device.type == "cpu" else _NORM_BLOCK_GPU
        step = max(1, block // width_out)
        differentiable = building_graph(rows, stacked)
        if not differentiable:
            buffer = rows.new_empty(min(step, rows.shape[0]), width_out)
            sq_in = rows.new_empty(rows.shape[0], n_off)
        parts = []
        for i in range(0, rows.shape[0], step):
            xb = rows[i:i + step]
            if differentiable:  # no ``out=``: autograd records these products
                y = (xb @ stacked).unflatten(-1, (n_off, -1))
                parts.append((y @ xb.unsqueeze(-1)).squeeze(-1) if gram else (y * y).sum(-1))
                continue
            y = torch.matmul(xb, stacked, out=buffer[:xb.shape[0]]).unflatten(-1, (n_off, -1))
            if gram and cin >= _BATCHED_DOT_BELOW:
                # x . (G_k x) as a product in place and a sum: a batched matrix-vector
                # product of (K, C) matrices is about 5x slower on a CPU (VGG16's layers)
                torch.sum(y.mul_(xb.unsqueeze(1)), -1, out=sq_in[i:i + step])
            elif gram:
                torch.matmul(y, xb.unsqueeze(-1), out=sq_in[i:i + step].unsqueeze(-1))
            else:
                torch.sum(y.square_(), -1, out=sq_in[i:i + step])
        if differentiable:
            sq_in = torch.cat(parts, 0)
        return self._gather_offsets(sq_in.reshape(n, -1, n_off).transpose(1, 2), safe_sqrt)

    def diagonal_norms(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """:meth:`stacked_norms` for diagonal ``M_k = diag(weights[k])`` ((K, C) weights: a
        depthwise convolution followed by per-channel scales)."""
        return self._diagonal_sq_norms(x, weights * weights)

    def _diagonal_sq_norms(self, x: torch.Tensor, sq_w: torch.Tensor) -> torch.Tensor:
        """:meth:`diagonal_norms` from the squared weights (K, C)."""
        sq_w = sq_w.to(x.dtype)
        if not self._norms_at_inputs_apply_full(x):
            ones = (1,) * len(self.kernel)
            return torch.stack([
                safe_sqrt(self._conv(self._shifted(x, k) ** 2,
                                     sq_w[j].reshape(1, -1, *ones))[:, 0])
                for j, k in enumerate(self.offsets)], 1)
        n = x.shape[0]
        sq_in = F.conv2d(x * x, sq_w.reshape(*sq_w.shape, 1, 1))  # N, K, H, W
        return self._gather_offsets(sq_in.reshape(n, len(self.offsets), -1), safe_sqrt)

    def scaled_quadratic_norms(self, x: torch.Tensor, d: torch.Tensor,
                               g: torch.Tensor) -> torch.Tensor:
        """:meth:`stacked_norms` for ``M_k^T M_k = diag(d_k) G diag(d_k)`` ((K, C) ``d``, one
        (C, C) ``G``: a depthwise convolution, per-channel scales, then a dense layer with
        Gram matrix ``G``), as ``(d_k * x) G (d_k * x)`` per input position: cheaper in memory
        than K Gram matrices when the map has fewer positions than channels."""
        if not self._norms_at_inputs_apply_full(x):
            return self.stacked_norms(x, g.unsqueeze(0) * (d.unsqueeze(2) * d.unsqueeze(1)),
                                      grams=True)
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # (N * P, C)
        g, d = g.to(x.dtype), d.to(x.dtype)
        rows = []
        for dk in d:  # one offset at a time: (N * P, C) intermediates only
            y = flat * dk
            rows.append(((y @ g) * y).sum(-1))
        sq_in = torch.stack(rows, 0).reshape(len(self.offsets), n, -1).transpose(0, 1)
        return self._gather_offsets(sq_in, safe_sqrt)

    def _norms_at_inputs_apply_full(self, x: torch.Tensor) -> bool:
        """Every input position is read by every offset (stride 1, 2-D), several offsets."""
        return x.dim() == 4 and len(self.offsets) > 1 and all(s == 1 for s in self.stride)

    def _gather_offsets(self, sq_in: torch.Tensor, finish) -> torch.Tensor:
        """(N, K, in positions) -> (N, K, *out): each offset's values at the output positions
        that read them, 0 where they read padding."""
        n, n_off = sq_in.shape[:2]
        index = torch.stack([self._flat_index[k] for k in self.offsets])
        sq_out = sq_in.gather(2, index.unsqueeze(0).expand(n, -1, -1)).reshape(
            n, n_off, *self.out_spatial) * self.offset_inside(sq_in.dtype)
        return finish(sq_out)

    def offset_norm(self, x: torch.Tensor, k: Component,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
        """``|| scale * component_forward(x, k) ||`` over output channels, (N, *out)."""
        cout, cin_g = self.weight.shape[:2]
        cout_g = cout // self.groups
        ones = (1,) * len(self.kernel)
        w = self._offset_weight(k, scale)
        xs = self._shifted(x, k)
        if cin_g == 1:
            per_in = (w * w).reshape(self.groups, cout_g).sum(1)  # one weight per channel
            sq = self._conv(xs * xs, per_in.reshape(1, -1, *ones))[:, 0]
        elif cin_g < cout_g:
            wg = w.reshape(self.groups, cout_g, cin_g)
            gram = torch.bmm(wg.transpose(1, 2), wg).reshape(self.groups * cin_g, cin_g)
            sq = channel_dot(self._conv(xs, gram.reshape(*gram.shape, *ones),
                                        groups=self.groups), xs)
        else:
            out = self._conv(xs, w.reshape(*w.shape, *ones), groups=self.groups)
            return channel_norm(out)
        return safe_sqrt(sq)

    def one_path_each(self) -> bool:
        """Every output position reads exactly one input position inside the input (a 1x1
        kernel, any stride, no padding): each bias entering here has one path per position."""
        return len(self.offsets) == 1 and bool(self._inside[self.offsets[0]].all())

    def offset_inside(self, dtype: torch.dtype) -> torch.Tensor:
        """1 where an offset reads inside the input: (1, K, *out)."""
        inside = torch.stack([self._inside[k] for k in self.offsets]).to(dtype)
        return inside.reshape(1, len(self.offsets), *self.out_spatial)

    def scatter_offsets(self, shares: torch.Tensor) -> torch.Tensor:
        """Send per-offset shares (N, K, *out) to the input positions they came from."""
        n = shares.shape[0]
        if self._trivial:  # a 1x1 stride-1 kernel reads the position it writes
            return shares.reshape(n, *self.in_spatial)
        index = torch.cat([self._flat_index[k] for k in self.offsets])
        inside = torch.cat([self._inside[k] for k in self.offsets]).to(shares.dtype)
        canvas = shares.new_zeros(n, self.n_in)
        canvas.index_add_(1, index, shares.reshape(n, -1) * inside)
        return canvas.reshape(n, *self.in_spatial)


class MaxPoolOp(WindowOp):
    """Max pooling, linear given the arg-max routing recorded in the forward pass."""

    kind = "maxpool"

    def __init__(
        self,
        name: str,
        indices: torch.Tensor,
        kernel: Sequence[int],
        stride: Sequence[int],
        pad_before: Sequence[int],
        dilation: Sequence[int],
        in_spatial: Sequence[int],
        out_spatial: Sequence[int],
    ):
        super().__init__(name=name)
        self._setup_window(
            in_spatial, out_spatial, kernel, stride, dilation, pad_before, indices.device
        )
        self.indices = indices.reshape(*indices.shape[:2], -1)

    def component_forward(self, x, i, k):
        # Keep, per channel, only the values whose recorded arg-max is the position this
        # window offset reads (positions in the padding never win).
        won = (self.indices == self._flat_index[k]) & self._inside[k]
        won = won.reshape(*won.shape[:2], *self.out_spatial).to(x.dtype)
        shifted = self._shifted(x, k)
        if shifted.dim() == 4 and shifted.is_contiguous(memory_format=torch.channels_last) or (
            x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ):
            won = won.contiguous(memory_format=torch.channels_last)
        return shifted * won


class AvgPoolOp(WindowOp):
    """Average pooling; ``coefficient`` is 1/divisor per output position (PyTorch's rules)."""

    kind = "avgpool"

    def __init__(
        self,
        name: str,
        coefficient: torch.Tensor,
        kernel: Sequence[int],
        stride: Sequence[int],
        pad_before: Sequence[int],
        in_spatial: Sequence[int],
        out_spatial: Sequence[int],
    ):
        super().__init__(name=name)
        self._setup_window(
            in_spatial,
            out_spatial,
            kernel,
            stride,
            (1,) * len(kernel),
            pad_before,
            coefficient.device,
        )
        self.coefficient = coefficient  # shape out_spatial

    def component_forward(self, x, i, k):
        return self._shifted(x, k) * self.coefficient


class GlobalAvgPoolOp(LinearOp):
    """Mean over all spatial positions; every input position is one component."""

    kind = "gap"

    def __init__(self, name: str, in_spatial: tuple[int, ...], out_spatial: tuple[int, ...]):
        super().__init__(name=name)
        self.in_spatial = in_spatial
        self.out_spatial = out_spatial  # () or (1, 1, ...) when keepdim
        self.n_in = math.prod(in_spatial)

    def components(self, i):
        return range(self.n_in)

    def component_forward(self, x, i, k):
        flat = x.reshape(*x.shape[:2], self.n_in)
        return (flat[..., k] / self.n_in).reshape(*x.shape[:2], *self.out_spatial)

    def component_positions(self, m, i, k):
        return m.reshape(m.shape[0], self.n_in)[:, k].reshape(m.shape[0], *self.out_spatial)

    def component_scatter(self, m, i, k):
        canvas = m.new_zeros(m.shape[0], self.n_in)
        canvas[:, k] = m.reshape(m.shape[0])
        return canvas.reshape(m.shape[0], *self.in_spatial)


class OpaqueOp(LinearOp):
    """An operation the engine runs but cannot decompose; using its decomposition raises."""

    kind = "opaque"

    def __init__(self, name: str, error: Exception):
        super().__init__(name=name)
        # kept without its traceback and chained exceptions: those hold the frames of the
        # forward pass (the model, the trace), and this op is reachable from a tensor hook
        # that lives in autograd's C++ graph, where the garbage collector cannot see the cycle
        self._error = error.with_traceback(None)
        self._error.__context__ = self._error.__cause__ = None
        #: it only moves values (a view, a permute): the plain gradient through it is exact
        self.moves_values = False
        #: it adds a bias the engine did not record (a dense layer on tokens, a LayerNorm)
        self.has_bias = False

    @property
    def error(self) -> Exception:
        """Why the engine cannot decompose the operation: a fresh copy per raise, so that no
        raise leaves its frames on the stored error."""
        return copy.copy(self._error)

    def components(self, i):
        raise self.error

    def component_forward(self, x, i, k):
        raise self.error


# --- operations that only move values, and resampling ---------------------------------------

def _block_index(dim: int, start: int, stop: int, ndim: int) -> tuple:
    """The index ``[:, ..., start:stop, ...]`` at dimension ``dim`` of an ``ndim``-D tensor."""
    return (slice(None),) * dim + (slice(start, stop),) + (slice(None),) * (ndim - dim - 1)


class CatOp(LinearOp):
    """``torch.cat`` along channels or a spatial dimension: input ``i`` fills its own block
    ``starts[i] : starts[i] + sizes[i]`` of the output (one component per input)."""

    kind = "cat"

    def __init__(self, name: str, dim: int, starts: Sequence[int], sizes: Sequence[int],
                 out_spatial: tuple[int, ...], in_spatials: Sequence[tuple[int, ...]]):
        super().__init__(name=name)
        self.dim = dim  # 1 (channels) or a spatial dimension >= 2
        self.starts, self.sizes = list(starts), list(sizes)
        self.out_spatial, self.in_spatials = out_spatial, list(in_spatials)

    def _place(self, x: torch.Tensor, i: int, channels: int | None) -> torch.Tensor:
        shape = list(x.shape)
        if channels is None:  # a scalar map (B, *spatial): only a spatial cat moves it
            shape[1:] = self.out_spatial
            dim = self.dim - 1
        else:
            shape[1] = channels
            shape[2:] = self.out_spatial
            dim = self.dim
        canvas = x.new_zeros(shape)
        canvas[_block_index(dim, self.starts[i], self.starts[i] + self.sizes[i],
                            len(shape))] = x
        return canvas

    def component_forward(self, x, i, k):
        channels = x.shape[1] if self.dim != 1 else sum(self.sizes)
        return self._place(x, i, channels)

    def component_positions(self, m, i, k):
        return m if self.dim == 1 else self._place(m, i, None)

    def component_scatter(self, m, i, k):
        if self.dim == 1:
            return m
        dim = self.dim - 1
        return m[_block_index(dim, self.starts[i], self.starts[i] + self.sizes[i], m.dim())]


class SliceOp(LinearOp):
    """Basic slicing of every dimension but the batch (``x[:, a:b]``, ``narrow``, ``split``,
    ``chunk``): ``slices[d - 1]`` selects along dimension ``d``."""

    kind = "slice"

    def __init__(self, name: str, slices: Sequence[slice], in_spatial: tuple[int, ...],
                 out_spatial: tuple[int, ...]):
        super().__init__(name=name)
        self.slices = tuple(slices)
        self.in_spatial, self.out_spatial = in_spatial, out_spatial

    def component_forward(self, x, i, k):
        return x[(slice(None), *self.slices)]

    def component_positions(self, m, i, k):
        return m[(slice(None), *self.slices[1:])]

    def component_scatter(self, m, i, k):
        canvas = m.new_zeros((m.shape[0], *self.in_spatial))
        canvas[(slice(None), *self.slices[1:])] = m
        return canvas


class ChannelPermuteOp(LinearOp):
    """A reordering of the channel axis (ShuffleNet's channel shuffle, written by the model as
    views and a transpose): output channel ``j`` is input channel ``order[j]`` at the same
    position. One component per position, the whole vector reordered, no bias."""

    kind = "channel_permute"

    def __init__(self, name: str, order: torch.Tensor):
        super().__init__(name=name)
        self.order = order  # (C,) int64, a permutation of range(C)

    def component_forward(self, x, i, k):
        return x.index_select(1, self.order.to(x.device))


class ResampleOp(LinearOp):
    """Each output position is a weighted sum of a few input positions, with the same weights
    for every channel: adaptive average pooling with overlapping windows, upsampling.

    Separable per axis: ``axes[d] = (index, weight)``, both (out_size, K_d): output index ``o``
    reads input index ``index[o, j]`` with weight ``weight[o, j]`` (0: not a path). A component
    is one choice of ``j`` per axis; it reaches an output position where its weight is not 0.
    """

    kind = "resample"

    def __init__(self, name: str, axes: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 in_spatial: tuple[int, ...], out_spatial: tuple[int, ...]):
        super().__init__(name=name)
        self.in_spatial, self.out_spatial = tuple(in_spatial), tuple(out_spatial)
        self.n_in = math.prod(self.in_spatial)
        self.offsets = list(itertools.product(*(range(idx.shape[1]) for idx, _ in axes)))
        self._flat: dict[Component, torch.Tensor] = {}
        self._weight: dict[Component, torch.Tensor] = {}
        for k in self.offsets:
            cols = [idx[:, j] for (idx, _), j in zip(axes, k, strict=True)]
            ws = [w[:, j] for (_, w), j in zip(axes, k, strict=True)]
            mesh = torch.meshgrid(*cols, indexing="ij") if len(cols) > 1 else cols
            wmesh = torch.meshgrid(*ws, indexing="ij") if len(ws) > 1 else ws
            flat = torch.zeros(self.out_spatial, dtype=torch.long, device=cols[0].device)
            weight = torch.ones(self.out_spatial, dtype=ws[0].dtype, device=ws[0].device)
            for c, w, size in zip(mesh, wmesh, self.in_spatial, strict=True):
                flat = flat * size + c
                weight = weight * w
            self._flat[k], self._weight[k] = flat.reshape(-1), weight

    def components(self, i):
        return self.offsets

    def _gather(self, x: torch.Tensor, k: Component) -> torch.Tensor:
        lead = x.shape[: x.dim() - len(self.in_spatial)]
        out = x.reshape(*lead, self.n_in).index_select(-1, self._flat[k])
        return out.reshape(*lead, *self.out_spatial)

    def component_forward(self, x, i, k):
        return self._gather(x, k) * self._weight[k].to(x.dtype)

    def component_positions(self, m, i, k):
        return self._gather(m, k) * (self._weight[k] != 0).to(m.dtype)

    def component_scatter(self, m, i, k):
        flat_out = m.reshape(m.shape[0], -1) * (self._weight[k] != 0).reshape(1, -1).to(m.dtype)
        canvas = m.new_zeros(m.shape[0], self.n_in)
        canvas.index_add_(1, self._flat[k], flat_out)
        return canvas.reshape(m.shape[0], *self.in_spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole op (every component) on ``x``: used to check the tables against the
        function the model called."""
        return sum(self.component_forward(x, 0, k) for k in self.offsets)


def adaptive_pool_axis(size_in: int, size_out: int, device: torch.device,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling along one axis: output ``o`` averages inputs
    ``floor(o*I/S) .. ceil((o+1)*I/S) - 1`` (PyTorch's windows)."""
    o = torch.arange(size_out, device=device)
    start = (o * size_in) // size_out
    end = -((-(o + 1) * size_in) // size_out)
    length = end - start
    width = int(length.max())
    j = torch.arange(width, device=device)
    index = (start[:, None] + j).clamp_max(size_in - 1)
    weight = torch.where(j[None, :] < length[:, None], 1.0 / length[:, None].to(dtype),
                         torch.zeros((), dtype=dtype, device=device))
    return index, weight.to(dtype)


def interpolate_axis(size_in: int, size_out: int, mode: str, align_corners: bool | None,
                     scale: float | None, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's source indices and weights of ``F.interpolate`` along one axis.

    ``scale``: the scale factor the caller gave (PyTorch then uses 1/scale as the step unless
    the size is recomputed); None: size_in / size_out.
    """
    o = torch.arange(size_out, device=device, dtype=torch.float64)
    step = (1.0 / scale) if scale else size_in / size_out
    if mode in ("nearest", "nearest-exact"):
        src = o * step if mode == "nearest" else (o + 0.5) * step
        index = src.floor().long().clamp(0, size_in - 1)[:, None]
        return index, torch.ones((size_out, 1), dtype=dtype, device=device)
    if align_corners:
        src = o * ((size_in - 1) / (size_out - 1)) if size_out > 1 else o * 0
    else:
        src = ((o + 0.5) * step - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp(0, size_in - 1)
    i1 = (i0 + 1).clamp_max(size_in - 1)
    frac = (src - i0.to(torch.float64)).clamp(0, 1)
    index = torch.stack([i0, i1], 1)
    weight = torch.stack([1 - frac, frac], 1).to(dtype)
    return index, weight
