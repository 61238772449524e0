"""Plumbing shared by every metric: input checks, attribution preprocessing, batched forwards.

Conventions the metrics rely on (docs/metrics.md explains them for users):

* Inputs ``x`` are image batches (N, C, H, W); numpy arrays are converted to the model's device
  and dtype, tensors must already match (the same rule as ``srdxai.explain``).
* Attribution maps are (N, H, W) "pixel maps" or (N, C, H, W) "element maps"; (N, 1, H, W) is
  read as a pixel map. A pixel map's feature is a pixel (perturbing it changes every channel),
  an element map's feature is one input value.
* Every normalisation is per sample. Statistics are computed in float64; forward passes run in
  the model's dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engine.core import model_guard
from ..engine.memory import (
    DefaultChunk,
    budget_chunk,
    cache_chunk,
    current_budget,
    element_chunk,
    run_in_chunks,
    run_tuned,
)
from ..errors import InvalidInputError, InvalidTargetError, NonFiniteError

Tensor = torch.Tensor
Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]
Normalise = Literal["max", "sum"] | bool | None
Baseline = float | int | str | Tensor | np.ndarray
EmptyMaskPolicy = Literal["nan", "raise"]


NAMED_BASELINES = ("black", "white", "mean", "zero", "blur")


# --- conversions and checks -----------------------------------------------------------------

def model_device_dtype(model: nn.Module | None) -> tuple[torch.device, torch.dtype] | None:
    """Where the model's floating parameters (or buffers) live; None for a model without any
    (it then takes inputs as they come)."""
    if model is not None:
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
    return None


def to_tensor(value: Any, name: str) -> Tensor:
    """Accept Quantus-style numpy arrays (and nested lists) as well as tensors."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray | list | tuple):
        try:
            array = np.asarray(value)
            if not array.flags.writeable:  # e.g. np.broadcast_to views; torch wants to own it
                array = array.copy()
            return torch.as_tensor(array)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InvalidInputError(f"{name} cannot be converted to a tensor: {error}") from None
    raise InvalidInputError(
        f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}.")


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    return model


def check_inputs(x: Any, model: nn.Module | None) -> Tensor:
    """A finite floating (N, C, H, W) batch on the model's device and dtype."""
    numpy_given = not isinstance(x, Tensor)
    x = to_tensor(x, "x")
    if x.dim() != 4:
        raise InvalidInputError(
            f"x must have shape (N, C, H, W); got {tuple(x.shape)}. The metrics are defined for "
            "image batches; add a batch dimension with x[None] if needed.")
    if x.shape[0] == 0:
        raise InvalidInputError("x holds an empty batch.")
    reference = model_device_dtype(model)
    device, dtype = reference or (torch.device("cpu"), torch.get_default_dtype())
    if numpy_given:
        if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int32, torch.int64)):
            raise InvalidInputError(f"x must hold numbers, got {x.dtype}.")
        x = x.to(device=device, dtype=dtype if reference or not x.is_floating_point() else x.dtype)
    elif not x.is_floating_point():
        raise InvalidInputError(f"x must be floating point, got {x.dtype}.")
    elif reference is not None and (x.device != device or x.dtype != dtype):
        raise InvalidInputError(
            f"x is {x.dtype} on {x.device} but the model's parameters are {dtype} on {device}; "
            "move one of them (e.g. x.to(next(model.parameters())))")
    if not all_finite(x):
        raise InvalidInputError(
            f"x contains NaN or Inf (samples {nonfinite_samples(x)}); clean it first.")
    return x


def all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite (integers always are). One sum in the usual
    case: NaN and Inf propagate through a sum, so a finite sum means finite values (16
    images of 3x32x32: 11 against 116 us for the elementwise test); the elementwise test
    only where the sum is not finite, which finite values that overflow it can also give."""
    if not t.is_floating_point():
        return True
    t = t.detach()
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def nonfinite_samples(t: Tensor) -> list[int]:
    return (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()


def check_targets(y: Any, n: int, device: torch.device) -> Tensor | None:
    """One class index per sample as a long tensor (N,); None stays None (predicted class)."""
    if y is None:
        return None
    if isinstance(y, int | np.integer) and not isinstance(y, bool):
        return torch.full((n,), int(y), dtype=torch.long, device=device)
    t = to_tensor(y, "y").reshape(-1)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise InvalidTargetError("y must hold integer class indices.")
    elif t.dtype == torch.bool:
        raise InvalidTargetError("y must hold integer class indices, got booleans.")
    if t.numel() != n:
        raise InvalidTargetError(f"y must have one class per sample ({n}); got {t.numel()}.")
    if (t < 0).any():
        raise InvalidTargetError(f"y holds negative class indices: {t[t < 0].tolist()}.")
    return t.to(device=device, dtype=torch.long)


def check_attributions(a: Any, x: Tensor | None, name: str = "attributions") -> Tensor:
    """Finite (N, H, W) pixel maps or (N, C, H, W) element maps matching ``x``.

    (N, 1, H, W) becomes (N, H, W): Quantus' layout for one-channel maps is a pixel map.
    """
    a = to_tensor(a, name)
    if not (a.is_floating_point() or a.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise InvalidInputError(f"{name} must hold numbers, got {a.dtype}.")
    if a.dim() == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.dim() not in (3, 4):
        raise InvalidInputError(
            f"{name} must have shape (N, H, W) or (N, C, H, W); got {tuple(a.shape)}.")
    if x is not None:
        if a.shape[0] != x.shape[0]:
            raise InvalidInputError(
                f"{name} hold {a.shape[0]} maps but x holds {x.shape[0]} samples.")
        if a.shape[-2:] != x.shape[-2:]:
            raise InvalidInputError(
                f"{name} have spatial size {tuple(a.shape[-2:])} but x has "
                f"{tuple(x.shape[-2:])}; upsample layer maps first (explain(..., upsample=True)).")
        if a.dim() == 4 and a.shape[1] != x.shape[1]:
            raise InvalidInputError(
                f"{name} have {a.shape[1]} channels but x has {x.shape[1]}; pass (N, H, W) "
                "maps or one channel per input channel.")
        a = a.to(x.device)
    if a.shape[0] == 0:
        raise InvalidInputError(f"{name} hold an empty batch.")
    a = a.to(torch.float64)
    if not all_finite(a):
        raise InvalidInputError(
            f"{name} contain NaN or Inf (samples {nonfinite_samples(a)}); the explanation "
            "method failed on them.")
    return a


def check_masks(masks: Any, a: Tensor) -> Tensor:
    """Binary (N, H, W) masks for the maps ``a``, as a bool tensor."""
    if masks is None:
        raise InvalidInputError("this metric needs masks= (binary (N, H, W) ground-truth masks).")
    m = to_tensor(masks, "masks")
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 3:
        raise InvalidInputError(
            f"masks must have shape (N, H, W) or (N, 1, H, W); got {tuple(m.shape)}.")
    if m.shape[0] != a.shape[0] or m.shape[-2:] != a.shape[-2:]:
        raise InvalidInputError(
            f"masks have shape {tuple(m.shape)} but the attributions {tuple(a.shape)}; they "
            "must share the batch size and the spatial size.")
    if m.dtype != torch.bool:
        if not all_finite(m):
            raise InvalidInputError("masks contain NaN or Inf.")
        if not ((m == 0) | (m == 1)).all():
            raise InvalidInputError(
                "masks must be binary (0/1 or bool); got other values, e.g. "
                f"{m[(m != 0) & (m != 1)][:3].tolist()}.")
        m = m != 0
    return m.to(a.device)


def empty_mask_nan(scores: Tensor, masks: Tensor, policy: EmptyMaskPolicy) -> Tensor:
    """Apply the empty-mask policy: NaN for samples whose mask has no pixel, or raise."""
    if policy not in ("nan", "raise"):
        raise InvalidInputError(f"empty_mask must be 'nan' or 'raise', got {policy!r}.")
    empty = ~masks.flatten(1).any(1)
    if empty.any():
        if policy == "raise":
            raise InvalidInputError(
                f"masks of samples {empty.nonzero().flatten().tolist()} are empty.")
        scores = scores.masked_fill(empty, math.nan)
    return scores


def check_finite_number(value: Any, name: str, positive: bool = False) -> float:
    """A finite real number (``positive``: > 0), as a float: a NaN noise level or replacement
    value would otherwise turn every score into NaN without a word."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidInputError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise InvalidInputError(
            f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}.")
    return value


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_explain(explain: Any, metric: str) -> Explain:
    if explain is None or not callable(explain):
        raise InvalidInputError(
            f"{metric} re-runs the explanation method: pass explain=callable(model, x, y) -> maps, "
            "e.g. lambda m, x, y: srdxai.explain(m, x, y, 'saliency').")
    return explain


# --- attribution preprocessing --------------------------------------------------------------

def normalise_attributions(a: Tensor, normalise: Normalise) -> Tensor:
    """Per-sample normalisation: ``"max"`` (or True) divides by max|a|, ``"sum"`` by sum|a|.

    All-zero maps stay zero (as Quantus' ``normalise_by_max``). Never across the batch: Quantus
    0.5+ divides by one maximum over the whole batch, which makes a sample's score depend on
    the other samples.
    """
    if normalise is None or normalise is False:
        return a
    mode = "max" if normalise is True else normalise
    if mode not in ("max", "sum"):
        raise InvalidInputError(f"normalise must be 'max', 'sum', True, False or None; got "
                                f"{normalise!r}.")
    flat = a.flatten(1).abs()
    scale = flat.amax(1) if mode == "max" else flat.sum(1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return a / scale.view(-1, *([1] * (a.dim() - 1)))


def preprocess_attributions(a: Tensor, normalise: Normalise, abs: bool) -> Tensor:
    """Normalise, then take |a| (Quantus' order)."""
    a = normalise_attributions(a, normalise)
    return a.abs() if abs else a


# --- features, baselines and perturbations --------------------------------------------------

def feature_count(a: Tensor) -> int:
    """Pixels of a pixel map, elements of an element map."""
    return a[0].numel()


def features_to_input(feature_mask: Tensor, a_dim: int, x_shape: torch.Size) -> Tensor:
    """Expand a (B, F) feature mask to the input layout (B, C, H, W)."""
    b = feature_mask.shape[0]
    _, c, h, w = x_shape
    if a_dim == 3:
        return feature_mask.view(b, 1, h, w).expand(b, c, h, w)
    return feature_mask.view(b, c, h, w)


def rise_kernel(kernel_size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """RISE's blur kernel, one axis: scipy's ``gaussian_filter`` (``truncate=4``, ``mode=
    "reflect"``) of a delta in the middle of ``kernel_size`` samples. The Gaussian reaches
    ``4 sigma = 20`` samples beyond the 11, so reflection folds its tails back onto the kernel
    (flatter than a truncated and renormalised Gaussian); the 2-D kernel is its outer
    product, as ``gaussian_filter`` is separable. Written out here so scipy is not needed."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    taps /= taps.sum()
    centre, period = kernel_size // 2, 2 * kernel_size
    kernel = np.zeros(kernel_size)
    for i in range(kernel_size):  # 11 x 41 terms, once per call
        q = (i + offsets) % period
        index = np.where(q < kernel_size, q, period - 1 - q)  # half-sample reflection
        kernel[i] = taps[index == centre].sum()
    return kernel


def gaussian_blur(x: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's insertion substrate: the image convolved with :func:`rise_kernel`'s 2-D kernel
    per channel, zero padding (RISE's ``conv2d(x, kern, padding=klen // 2)``)."""
    radius = kernel_size // 2
    kernel_1d = torch.as_tensor(rise_kernel(kernel_size, sigma), dtype=torch.float64,
                                device=x.device)
    kernel_2d = torch.outer(kernel_1d, kernel_1d).to(x.dtype)
    c = x.shape[1]
    weight = kernel_2d.expand(c, 1, kernel_size, kernel_size)
    return F.conv2d(x, weight, padding=radius, groups=c)


def baseline_values(baseline: Baseline, x: Tensor) -> Tensor:
    """The replacement values, as a tensor of x's shape.

    Named baselines are per sample: ``"black"``/``"white"`` the sample's minimum/maximum over all
    its elements (Quantus' meaning, which in a normalised input space is the darkest value, not
    0), ``"mean"`` its mean, ``"zero"`` 0, ``"blur"`` a Gaussian-blurred copy (RISE). A number is
    used everywhere; a tensor or array must broadcast to x's shape (e.g. (C, 1, 1)).
    """
    if isinstance(baseline, bool):
        raise InvalidInputError("baseline must be a number, a name or a tensor, not a bool.")
    if isinstance(baseline, int | float | np.floating | np.integer):
        return torch.full_like(x, check_finite_number(baseline, "baseline"))
    if isinstance(baseline, str):
        flat = x.flatten(1)
        per_sample = {
            "black": lambda: flat.amin(1),
            "white": lambda: flat.amax(1),
            "mean": lambda: flat.mean(1),
            "zero": lambda: torch.zeros(x.shape[0], dtype=x.dtype, device=x.device),
        }
        if baseline == "blur":
            return gaussian_blur(x)
        if baseline not in per_sample:
            raise InvalidInputError(
                f"unknown baseline {baseline!r}; use a number, a tensor or one of "
                f"{', '.join(NAMED_BASELINES)}.")
        return per_sample[baseline]().view(-1, 1, 1, 1).expand_as(x).contiguous()
    values = to_tensor(baseline, "baseline").to(device=x.device, dtype=x.dtype)
    if not all_finite(values):
        raise InvalidInputError("baseline contains NaN or Inf (in the model's dtype "
                                f"{x.dtype}); pass finite replacement values.")
    try:
        return torch.broadcast_to(values, x.shape).contiguous()
    except RuntimeError:
        raise InvalidInputError(
            f"baseline of shape {tuple(values.shape)} does not broadcast to x's shape "
            f"{tuple(x.shape)}.") from None


# --- model outputs --------------------------------------------------------------------------

def default_batch_size(x: Tensor, batch_size: int | None, explain: bool = False,
                       model: nn.Module | None = None) -> int:
    """``batch_size`` if given, else as many images as the device's element budget allows,
    for forward-only chunks on a CPU no more than keep the largest activation in the caches
    (:func:`~srdxai.engine.memory.cache_chunk`), capped by a
    :func:`~srdxai.engine.memory.memory_budget` when one is set (the memory of one ``model``
    pass is estimated once)."""
    if batch_size is not None:
        return check_positive_int(batch_size, "batch_size")
    size = element_chunk(x, backward=explain)
    if model is None:
        return size
    if not explain:  # forward-only chunks: keep the activations in the CPU's caches
        size = cache_chunk(model, x, size)
    size = budget_chunk(model, x, size, backward=explain)
    # a default forward-only chunk may be tuned by timing (scores_in_batches); not under a
    # memory budget, which caps it
    return size if explain or current_budget() is not None else DefaultChunk(size, x)


def adaptive_chunks(total: int, size: int, progress: bool, desc: str,
                    run: Callable[[int, int], None], model: nn.Module | None = None) -> None:
    """``run(start, stop)`` over ``0..total`` in chunks of ``size`` (a tqdm bar if
    ``progress``); a chunk that runs out of memory is retried in halves
    (:func:`~srdxai.engine.memory.run_in_chunks`). With the ``model`` of forward-only passes, a
    default size is tuned (:func:`~srdxai.engine.memory.run_tuned`)."""
    with tqdm(total=total, disable=not progress, desc=desc, unit="img", leave=False) as bar:

        def one(start: int, stop: int) -> None:
            run(start, stop)
            bar.update(stop - start)

        if model is None:
            run_in_chunks(total, size, one, desc or "metric")
        else:
            run_tuned(model, total, size, one, desc or "metric")


#: inputs with at most this many channels (images) take :func:`select_per_sample`'s pixel
#: masks one channel at a time
_PER_CHANNEL_SELECT = 4


def select_per_sample(mask: Tensor, replacement: Tensor, source: Tensor,
                      sample: Tensor) -> Tensor:
    """``torch.where(mask, replacement[sample], source[sample])``: row ``i`` of the result is
    sample ``sample[i]``'s input with the ``mask[i]`` entries replaced.

    The perturbed inputs of a sample-major chunk come in runs of rows of one sample; each
    run is one ``torch.where`` reading that sample's two images by broadcasting, instead of
    copying both images for every row first (three writes per input instead of one: on a
    small CNN at 3x32x32 those copies cost a third of a forward pass). Images come out
    channels-last, the layout :func:`scores_in_batches` gives the model, so they are not
    copied again there.
    """
    values, counts = torch.unique_consecutive(sample, return_counts=True)
    if values.numel() * 4 > sample.numel():  # rows of many samples: the gathers are as cheap
        return torch.where(mask, replacement[sample], source[sample])
    layout = torch.channels_last if source.dim() == 4 else torch.contiguous_format
    out = torch.empty((sample.numel(), *source.shape[1:]), dtype=source.dtype,
                      device=source.device, memory_format=layout)
    runs = zip(values.tolist(), counts.tolist(), strict=True)
    start = 0
    channels = source.shape[1] if source.dim() == 4 else 0
    if 0 < channels <= _PER_CHANNEL_SELECT and (mask.shape[1] == 1 or mask.stride(1) == 0):
        # a pixel mask (broadcast over the channels): one torch.where per channel, each a
        # plane of the channels-last result written with a stride of C. A where or blend of
        # the whole result broadcasts the mask over an innermost dimension of only C values,
        # which a CPU runs 2-2.5x slower (small CNN, 3x32x32: 2.7 against 6.7 us per input).
        planes = out.permute(0, 2, 3, 1)
        pixels = mask[:, 0]
        for value, count in runs:
            rows = slice(start, start + count)
            for c in range(channels):
                torch.where(pixels[rows], replacement[value, c], source[value, c],
                            out=planes[rows, ..., c])
            start += count
        return out
    if not (source.is_floating_point() and replacement.is_floating_point()):
        for value, count in runs:
            torch.where(mask[start:start + count], replacement[value:value + 1],
                        source[value:value + 1], out=out[start:start + count])
            start += count
        return out
    # ``source * (1 - m) + replacement * m`` with m in {0, 1} is exactly one of the two values
    # (x * 1 = x, x * 0 = 0, x + 0 = x) for finite values, which the metrics check both are;
    # writing a channels-last result so is about 1.8x faster than a broadcast torch.where on
    # a CPU. A mask broadcast over a dimension of an input (stride 0: a pixel mask over the
    # channels) is converted without it; its rows stay, since runs slice them.
    narrow = mask[(slice(None), *(slice(0, 1) if st == 0 and n > 1 else slice(None)
                                   for st, n in zip(mask.stride()[1:], mask.shape[1:],
                                                    strict=True)))]
    take = narrow.to(source.dtype)
    keep = 1 - take
    for value, count in runs:
        rows = out[start:start + count]
        torch.mul(source[value:value + 1], keep[start:start + count], out=rows)
        rows.addcmul_(replacement[value:value + 1], take[start:start + count])
        start += count
    return out


def channels_last_rows(t: Tensor) -> Tensor:
    """An (N, C, H, W) batch as (N, H*W*C) rows in channels-last memory order: the order of
    the chunks the metrics hand to the model (a view where ``t`` is channels-last already)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def feature_units(features: Tensor, a_dim: int, shape: torch.Size) -> tuple[Tensor, int]:
    """Features (indices into a flattened map, any shape) as units of the
    :func:`channels_last_rows` of inputs of ``shape``, and the width of a unit: for a pixel
    map a unit is a pixel, its ``C`` contiguous values (unit ``p``, width ``C``); for an element
    map one value (element ``c*H*W + p`` of the map is unit ``p*C + c``, width 1). Writing
    whole units keeps the indices ``C`` times fewer than one per value (faithfulness
    correlation's subsets: N x runs x 224 pixels)."""
    _, channels, height, width = shape
    if a_dim == 3:
        return features, channels
    pixels = height * width
    return features % pixels * channels + features // pixels, 1


def empty_chunk(count: int, shape: torch.Size, like: Tensor) -> tuple[Tensor, Tensor]:
    """A new channels-last chunk of ``count`` inputs of an (N, C, H, W) ``shape``, with
    ``like``'s dtype and device, and the same memory as (count, H*W*C) rows
    (:func:`channels_last_rows` order)."""
    channels, height, width = shape[1:]
    flat = torch.empty((count, height * width * channels), dtype=like.dtype, device=like.device)
    # (count, C, H, W) with channels-last strides: the rows, viewed (one op fewer than allocating
    # channels-last and viewing it as rows, a few microseconds per chunk)
    return flat.view(count, height, width, channels).permute(0, 3, 1, 2), flat


def values_at(rows: Tensor, sample: Tensor, where: Tensor, width: int) -> Tensor:
    """The units ``where[i]`` (of ``width`` values, :func:`feature_units`) of row
    ``sample[i]`` of ``rows``, as ``(*where.shape, width)``, read in place (no copy of the rows
    themselves)."""
    per_row = rows.shape[1] // width
    flat = (where + sample[:, None] * per_row).flatten()
    return rows.reshape(-1, width).index_select(0, flat).view(*where.shape, width)


def constant_per_sample(values: Tensor) -> Tensor | None:
    """``values`` (N, ...) as one number per sample (N,) where each sample's values are all
    the same (the named baselines but "blur": a sample's minimum, maximum, mean or 0), else
    None: perturbed inputs then take that number, without reading the replaced units."""
    flat = values.reshape(values.shape[0], -1)
    first = flat[:, 0]
    return first if bool((flat == first[:, None]).all()) else None


def replacement_at(rows: Tensor, constants: Tensor | None, sample: Tensor, where: Tensor,
                   width: int) -> Tensor:
    """The replacement values of the units ``where`` of each row's sample, broadcastable to
    ``(*where.shape, width)``: the sample's one number where ``constants`` (from
    :func:`constant_per_sample`) has it, else read from ``rows`` (:func:`values_at`)."""
    if constants is not None:
        return constants[sample].view(-1, *([1] * where.dim()))
    return values_at(rows, sample, where, width)


def replaced_rows(source_rows: Tensor, shape: torch.Size, sample: Tensor, where: Tensor,
                  values: Tensor, width: int) -> Tensor:
    """A chunk of perturbed inputs (channels-last, ``(len(sample), *shape[1:])``): row ``i``
    is a copy of sample ``sample[i]`` of ``source_rows`` (:func:`channels_last_rows`) with the
    units at ``where[i]`` (of ``width`` values, :func:`feature_units`) set to ``values[i]``
    (anything that broadcasts to ``(*where.shape, width)``). For perturbations that replace a
    few features per input (subsets, groups): one write of the input, then a small scatter,
    instead of a mask over every element. A unit given twice must have one value."""
    count = sample.numel()
    out, rows = empty_chunk(count, shape, source_rows)
    torch.index_select(source_rows, 0, sample, out=rows)
    # a scatter along the units (each unit's index repeated over its values by a stride of 0)
    # is about 2x faster on a CPU than index_put_ with a row index (53 rows of 224 units of
    # 3: 57 against 105 us)
    units = where.reshape(count, -1, 1)
    full = (count, units.shape[1], width)
    rows.view(count, -1, width).scatter_(
        1, units.expand(full), values.to(rows.dtype).expand(*where.shape, width).reshape(full))
    return out


class GroupedInputs:
    """Perturbed inputs that each replace one group of features: group ``g`` is features
    ``order[:, g*step:(g+1)*step]`` (the last group may be smaller), taken from
    ``replacement`` (non-sensitivity, monotonicity correlation).

    ``order`` is (N, F) (one order per sample) or (1, F) (the same for all); ``a_dim`` says
    whether a feature is a pixel (3) or an element (4) of the (N, C, H, W) inputs. Each
    input is a copy of its sample and a scatter of its group's units
    (:func:`replaced_rows`); the last group is padded by repeating its last feature.
    """

    def __init__(self, order: Tensor, step: int, a_dim: int, source: Tensor,
                 replacement: Tensor | None):
        n_features = order.shape[1]
        self.groups = -(-n_features // step)
        padded = torch.arange(self.groups * step, device=order.device).clamp(max=n_features - 1)
        features = order[:, padded].view(order.shape[0], self.groups, step)
        self.positions, self.width = feature_units(features, a_dim, source.shape)
        self.shared = order.shape[0] == 1
        self.shape = source.shape
        self.source_rows = channels_last_rows(source)
        self.replacement_rows = (None if replacement is None
                                 else channels_last_rows(replacement))
        self.constants = None if replacement is None else constant_per_sample(replacement)

    def __call__(self, sample: Tensor, group: Tensor, values: Tensor | None = None) -> Tensor:
        """Row ``i``: sample ``sample[i]`` with group ``group[i]`` replaced, by
        ``replacement`` or, if given, by the one value ``values[i]``."""
        where = self.positions[0 if self.shared else sample, group]
        if values is not None:
            replaced = values[:, None, None]
        else:
            assert self.replacement_rows is not None
            replaced = replacement_at(self.replacement_rows, self.constants, sample, where,
                                      self.width)
        return replaced_rows(self.source_rows, self.shape, sample, where, replaced, self.width)


def lerp_selects_exactly(source: Tensor, replacement: Tensor, largest: int = 1) -> bool:
    """Whether ``torch.lerp(source, replacement, w)`` with weights ``w`` in {0, 1} (as
    floats, computed from integers up to ``largest``) is exactly the select of ``source``
    (w = 0) or ``replacement`` (w = 1) for every element: a float32/64 dtype shared by both,
    integers up to ``largest`` exact in it, and ``|end - start|`` finite (at most
    ``max|source| + max|replacement|``, summed in float64). ATen's lerp returns an endpoint
    exactly at weights 0 and 1 (``start + w (end - start)`` below 0.5, ``end - (end - start)
    (1 - w)`` above)."""
    exact_below = {torch.float32: 2 ** 24, torch.float64: 2 ** 53}.get(source.dtype)
    return (exact_below is not None and replacement.dtype == source.dtype
            and largest < exact_below
            and float(source.abs().amax()) + float(replacement.abs().amax())
            < torch.finfo(source.dtype).max)


class RankedInputs:
    """Perturbed inputs that take an image's top-ranked features from ``replacement`` and the
    rest from ``source``: ``inputs(rank_row, counts)`` row ``i`` is image
    ``image_of[rank_row[i]]`` with every feature of rank < ``counts[i]`` under ranking
    ``rank_row[i]`` replaced (pixel flipping, insertion, deletion, monotonicity, region
    perturbation, IROF, Sensitivity-n); :meth:`grid` builds the rows of a whole grid of
    rankings times counts.

    ``ranks`` (R, F) ranks the features of an ``a_dim``-dimensional map (3: pixels, 4:
    elements) of the (N, C, H, W) inputs, one ranking per row; ``image_of`` (R,) names the
    image of each ranking (default: ranking i is image i's; Sensitivity-n has many per
    image). A row equals ``select_per_sample(features_to_input(ranks[rank_row] < counts[:,
    None], ...), replacement, source, image_of[rank_row])``, value for value, in
    channels-last memory (what :func:`scores_in_batches` gives the model).

    How: every input element's rank is laid out once, as a floating tensor in the chunks'
    memory order; a chunk's weights are then ``rank < count`` as floats (1 where replaced,
    0 where kept; ranks are exact in floating point below 2^mantissa), and
    ``torch.lerp(source, replacement, weight)``, exactly one of the two values at a weight of 0
    or 1 (ATen's lerp uses ``start + w (end - start)`` below 0.5 and ``end - (end - start)
    (1 - w)`` above). Three contiguous passes over a row are about 3x faster on a CPU than a
    boolean mask broadcast over the channels of a channels-last row (an inner loop of C = 3
    values): a small CNN at 3x32x32 spent 6-9 us per input building its chunks so, about 3
    now, against about 45 us per input of forward pass. Where that arithmetic could differ
    from a select (other dtypes, ranks not exact in the dtype, ``end - start`` overflowing),
    the boolean select is used.
    """

    def __init__(self, ranks: Tensor, a_dim: int, source: Tensor, replacement: Tensor,
                 image_of: Tensor | None = None):
        self.ranks, self.a_dim = ranks, a_dim
        self.source, self.replacement = source, replacement
        self.image_of = image_of
        # the image of each ranking as Python ints: runs of rows are grouped by it per chunk
        self.images = (list(range(ranks.shape[0])) if image_of is None
                       else image_of.tolist())
        self.weights: Tensor | None = None  # one reused buffer of chunk weights
        dtype = source.dtype
        self.arithmetic = lerp_selects_exactly(source, replacement, ranks.shape[1])
        if not self.arithmetic:
            if ranks.shape[1] <= torch.iinfo(torch.int16).max:
                # compared only: a quarter of the memory traffic of the gather per chunk
                self.ranks = ranks.to(torch.int16)
            return
        shape = (ranks.shape[0], *source.shape[1:])
        self.rank_rows = channels_last_rows(features_to_input(ranks.to(dtype), a_dim, shape))
        self.source_rows = channels_last_rows(source)
        self.replacement_rows = channels_last_rows(replacement)
        # the images' rows as lists of views: a chunk picks a few of them, and a list index
        # costs a fraction of a tensor index (about 1 us each; not for the rankings, which
        # can be thousands, each picked once or twice)
        self.source_list = list(self.source_rows.unbind(0))
        self.replacement_list = list(self.replacement_rows.unbind(0))
        self.columns: tuple[Tensor, Tensor] | None = None  # the last counts, as a column

    def _column(self, counts: Tensor) -> Tensor:
        """``counts`` as a column of the weights' dtype (exact: counts are at most F), made
        once for the counts of a whole grid."""
        if self.columns is None or self.columns[0] is not counts:
            self.columns = (counts, counts.to(self.rank_rows.dtype)[:, None])
        return self.columns[1]

    def _chunk(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """A new chunk of ``rows`` inputs, its rows view, and the reused weights for it."""
        out, flat = empty_chunk(rows, self.source.shape, self.source)
        if self.weights is None or self.weights.shape[0] < rows:
            self.weights = flat.new_empty(flat.shape)
        return out, flat, self.weights[:rows]

    def __call__(self, rank_row: Tensor, counts: Tensor) -> Tensor:
        if not self.arithmetic:
            chosen = self.ranks[rank_row] < counts[:, None]
            images = rank_row if self.image_of is None else self.image_of[rank_row]
            return select_per_sample(features_to_input(chosen, self.a_dim, self.source.shape),
                                     self.replacement, self.source, images)
        out, flat, weights = self._chunk(rank_row.numel())
        counts = counts[:, None]
        values, runs = torch.unique_consecutive(rank_row, return_counts=True)
        # weight 1.0 where rank < count, else 0.0: one comparison written as floats (for
        # integer ranks and counts the same as clamp(count - rank, 0, 1), in one op not two)
        if values.numel() * 4 > rank_row.numel():  # rows of many rankings: gather them
            images = rank_row if self.image_of is None else self.image_of[rank_row]
            torch.lt(self.rank_rows[rank_row], counts, out=weights)
            torch.lerp(self.source_rows[images], self.replacement_rows[images], weights,
                       out=flat)
            return out
        start = 0
        for value, count in zip(values.tolist(), runs.tolist(), strict=True):
            part = slice(start, start + count)
            image = self.images[value]
            torch.lt(self.rank_rows[value], counts[part], out=weights[part])
            torch.lerp(self.source_rows[image], self.replacement_rows[image], weights[part],
                       out=flat[part])
            start += count
        return out

    def grid(self, start: int, stop: int, counts: Tensor) -> Tensor:
        """Rows ``start..stop`` of the grid of every ranking times every count, ranking-major:
        row ``f`` is ``self(f // P, counts[f % P])`` with ``P = len(counts)``.

        The rows a chunk needs are found by arithmetic (no index tensors per chunk), the
        rankings whose every count lies in the chunk take their weights in one comparison
        together, and each image's rows one ``lerp``: a few operations per chunk however many
        short runs it holds (Sensitivity-n: 8 counts per ranking, 6-7 rankings per chunk).
        """
        points = counts.numel()
        if not self.arithmetic:
            flat = torch.arange(start, stop, device=counts.device)
            return self(flat // points, counts[flat % points])
        out, flat, weights = self._chunk(stop - start)
        column = self._column(counts)
        images = self.images
        position = start
        while position < stop:  # the weights, by whole rankings where they fit
            ranking, first = divmod(position, points)
            begin = position - start
            whole = (stop - position) // points if first == 0 else 0
            if whole:
                torch.lt(self.rank_rows[ranking:ranking + whole, None], column,
                         out=weights[begin:begin + whole * points].view(whole, points, -1))
                position += whole * points
            else:
                last = min(points, first + stop - position)
                torch.lt(self.rank_rows[ranking], column[first:last],
                         out=weights[begin:begin + last - first])
                position += last - first
        position = start
        while position < stop:  # the inputs, one lerp per image
            image = images[position // points]
            ranking = position // points + 1
            while ranking * points < stop and images[ranking] == image:
                ranking += 1
            end = min(stop, ranking * points)
            part = slice(position - start, end - start)
            torch.lerp(self.source_list[image], self.replacement_list[image], weights[part],
                       out=flat[part])
            position = end
        return out


#: the most memory :class:`MaskedInputs` lays its masks out in as blend weights; more masks
#: take the boolean select per chunk instead
_MASK_TABLE_BYTES = 64 << 20


class MaskedInputs:
    """Perturbed inputs of a grid of images times masks shared by every image (MuFidelity's
    removed grid cells, infidelity's patches): ``grid(start, stop)`` row ``f`` is image
    ``f // R`` with the elements of mask ``f % R`` taken from ``replacement``, in
    channels-last memory (what :func:`scores_in_batches` gives the model).

    ``masks_of(indices)`` gives the masks of those indices, (k, 1 or C, H, W) bool (a pixel
    mask applies to every channel), so that the ``count`` masks need not exist at once (small
    patches of a large image are thousands). Where their blend weights fit in
    :data:`_MASK_TABLE_BYTES`, the masks are laid out once as 0/1 weights in the chunks'
    memory order and each image's rows of a chunk are one ``torch.lerp`` reading them: exactly
    the select (:func:`lerp_selects_exactly`); otherwise each chunk builds its masks and takes
    the select itself.
    """

    def __init__(self, count: int, masks_of: Callable[[Tensor], Tensor], source: Tensor,
                 replacement: Tensor):
        self.count, self.masks_of = count, masks_of
        self.source, self.replacement = source, replacement
        shape = (count, *source.shape[1:])
        self.arithmetic = (math.prod(shape) * source.element_size() <= _MASK_TABLE_BYTES
                           and lerp_selects_exactly(source, replacement))
        if self.arithmetic:
            every = masks_of(torch.arange(count, device=source.device))
            self.weight_rows = channels_last_rows(every.expand(shape).to(source.dtype))
            self.source_rows = channels_last_rows(source)
            self.replacement_rows = channels_last_rows(replacement)

    def grid(self, start: int, stop: int) -> Tensor:
        if not self.arithmetic:
            flat = torch.arange(start, stop, device=self.source.device)
            return select_per_sample(self.masks_of(flat % self.count), self.replacement,
                                     self.source, flat // self.count)
        out, flat = empty_chunk(stop - start, self.source.shape, self.source)
        done = 0
        for image, first, last in grid_runs(start, stop, self.count):  # one lerp per image
            part = slice(done, done + last - first)
            torch.lerp(self.source_rows[image], self.replacement_rows[image],
                       self.weight_rows[first:last], out=flat[part])
            done += last - first
        return out


def grid_runs(start: int, stop: int, per: int) -> Iterator[tuple[int, int, int]]:
    """Rows ``start..stop`` of a block-major grid of ``per`` rows per block, as runs
    ``(block, first, last)``: rows ``first..last`` of one block each, in order."""
    position = start
    while position < stop:
        block, first = divmod(position, per)
        last = min(per, first + stop - position)
        yield block, first, last
        position += last - first


def check_finite_logits(out: Tensor, what: str, samples: Tensor | None = None) -> Tensor:
    """Refuse model outputs holding NaN or Inf, naming the samples they belong to (``samples``:
    the original sample of each row, for rows that are perturbed copies; else the rows are
    named)."""
    if all_finite(out):  # one sum in the usual case
        return out
    # some value is NaN or Inf: name the rows holding one
    bad = ~torch.isfinite(out.detach()).flatten(1).all(1)
    rows = bad.nonzero().flatten()
    owners = rows if samples is None else samples.to(rows.device)[rows]
    owners = sorted(set(owners.tolist()))
    shown = ", ".join(map(str, owners[:10])) + (", ..." if len(owners) > 10 else "")
    raise NonFiniteError(
        f"{what}: the model's output holds NaN or Inf on {int(bad.sum())} of "
        f"{out.shape[0]} inputs (of samples {shown}). The model overflows on them: for "
        "perturbed inputs the replacement values (baseline, mask value or noise) are "
        "probably far outside the data the model handles; choose values within the "
        "input range (e.g. baseline='black' or 'mean').")


def checked_shape(out: Any, rows: int) -> Tensor:
    """A model's output for a chunk of ``rows`` inputs, checked to be logits of shape (rows,
    classes) (finiteness: :func:`check_finite_logits`)."""
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != rows:
        raise InvalidInputError(
            "the model must return logits of shape (N, classes); got "
            f"{getattr(out, 'shape', type(out).__name__)}.")
    return out


def target_scores(out: Tensor, targets: Tensor, softmax: bool) -> Tensor:
    """The target class's logit (or softmax probability) per row of checked logits ``out``,
    in ``out``'s dtype; a target beyond the model's classes raises
    :class:`~srdxai.errors.InvalidTargetError` (targets are never negative: check_targets)."""
    if out.device.type != "cpu" and targets.numel() and int(targets.max()) >= out.shape[1]:
        # on a CPU, gather checks the indices itself (below): no extra reduction per chunk
        _refuse_targets(targets, out.shape[1])
    if softmax:
        out = out.softmax(1)
    try:
        return out.gather(1, targets.view(-1, 1)).view(-1)
    except (RuntimeError, IndexError):
        if targets.numel() and int(targets.max()) >= out.shape[1]:
            _refuse_targets(targets, out.shape[1])
        raise


def _refuse_targets(targets: Tensor, classes: int) -> None:
    raise InvalidTargetError(
        f"y holds classes >= the model's {classes} outputs: "
        f"{targets[targets >= classes].unique().tolist()}.")


def chunks(total: int, size: int, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of at most ``size`` items, with a tqdm bar only if ``progress``."""
    with tqdm(total=total, disable=not progress, desc=desc, unit="img", leave=False) as bar:
        for start in range(0, total, size):
            stop = min(total, start + size)
            yield start, stop
            bar.update(stop - start)


def concat_in_chunks(total: int, size: int, fn: Callable[[int, int], Tensor],
                     what: str) -> Tensor:
    """``torch.cat`` of ``fn(start, stop)`` over ``0..total`` in chunks of ``size``; a chunk
    that runs out of memory is retried in halves (:func:`~srdxai.engine.memory.run_in_chunks`).
    """
    parts: dict[int, Tensor] = {}

    def run(start: int, stop: int) -> None:
        parts[start] = fn(start, stop)

    run_in_chunks(total, size, run, what)
    return torch.cat([parts[k] for k in sorted(parts)])


def predicted_classes(model: nn.Module, x: Tensor, batch_size: int,
                      what: str = "metric") -> Tensor:
    """The arg-max class per sample (of finite outputs: the arg-max of NaN is arbitrary)."""

    def run(a: int, b: int) -> Tensor:
        out = model(x[a:b])
        return check_finite_logits(out, what, torch.arange(a, b)).argmax(1)

    with torch.no_grad():
        return concat_in_chunks(x.shape[0], batch_size, run, "predicted classes")


class _LayoutForward:
    """Call the model on channels-last copies of 4-D inputs.

    oneDNN (CPU) runs convolutions, depthwise ones above all, much faster in channels-last
    layout (EfficientNet-Lite0: about 1.5x); values are identical up to float rounding. Models
    whose code depends on the layout (``.view`` on a 4-D activation) raise a RuntimeError in
    it: the call is then repeated, and all later ones made, in the ordinary layout.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.channels_last = True

    def __call__(self, inputs: Tensor) -> Tensor:
        if self.channels_last and inputs.dim() == 4:
            try:
                return self.model(inputs.contiguous(memory_format=torch.channels_last))
            except RuntimeError as error:
                if "view" not in str(error) and "stride" not in str(error):
                    raise
                self.channels_last = False
        return self.model(inputs.contiguous())


def scores_in_batches(
    model: nn.Module,
    make_inputs: Callable[[int, int], Tensor],
    y: Tensor,
    total: int,
    batch_size: int,
    softmax: bool,
    progress: bool,
    desc: str,
    per_sample: int = 1,
    sample_offset: int = 0,
    owners: Tensor | None = None,
    correct: bool = False,
) -> Tensor:
    """Class scores of ``total`` perturbed inputs built chunk by chunk by ``make_inputs``
    (``make_inputs(start, stop)``: the inputs of rows ``start..stop``).

    Only one chunk of perturbed inputs exists at a time, so memory is bounded by
    ``batch_size`` whatever the number of perturbations. Items are laid out sample-major,
    ``per_sample`` per sample starting at sample ``sample_offset``, or, where the samples have
    different numbers of items, ``owners`` (total,) names the sample of each. Each item is
    scored for its sample's class in ``y`` (one per sample), and a non-finite output is traced
    back to the sample it perturbs in the error. ``correct``: 1.0 where the arg-max class is
    the target (the first index on ties, as numpy), else 0.0, instead of the score.
    """
    out = torch.empty(total, dtype=torch.float64)
    forward = _LayoutForward(model)
    what = desc or "metric"
    pending = _PendingScores(out, y, softmax, correct, what,
                             lambda a, b: _owners(owners, per_sample, sample_offset, a, b))

    def run(start: int, stop: int) -> None:
        inputs = make_inputs(start, stop)
        pending.add(start, checked_shape(forward(inputs), inputs.shape[0]))

    with torch.no_grad():
        adaptive_chunks(total, batch_size, progress, desc, run, model=model)
        pending.flush()
    return out


#: the logits :func:`scores_in_batches` holds to score together: at most this many rows (a
#: non-finite output is reported after at most that many more inputs) and bytes
_PENDING_ROWS = 4096
_PENDING_BYTES = 4 * 2**20


class _PendingScores:
    """Logits of consecutive chunks, checked and scored together: the finiteness check,
    softmax, targets, gather and copy into the results once per block of chunks instead of
    once per chunk (on a small CNN, a fifth of what a chunk costs besides its pass; the first
    operations after a forward pass run on cold caches, 10x slower than warm ones). Row-wise,
    so the scores are those of chunk-by-chunk scoring. Row ``r``'s target is ``y`` of its
    sample, ``owners(first, stop)`` naming the samples of rows ``first..stop``."""

    def __init__(self, out: Tensor, y: Tensor, softmax: bool, correct: bool, what: str,
                 owners: Callable[[int, int], Tensor]):
        self.out, self.y, self.softmax, self.correct, self.what = out, y, softmax, correct, what
        self.owners = owners
        self.logits: Tensor | None = None
        self.start = self.filled = 0

    def add(self, start: int, logits: Tensor) -> None:
        rows = logits.shape[0]
        held = self.logits
        capacity = 0 if held is None else held.shape[0]
        # the buffer takes these logits if they have its classes, dtype and device
        alike = held is not None and (logits.shape[1], logits.dtype, logits.device) == (
            held.shape[1], held.dtype, held.device)
        if self.filled and (not alike or start != self.start + self.filled
                            or self.filled + rows > capacity):
            self.flush()
        if not alike or rows > capacity:
            per_row = max(1, logits.shape[1] * logits.element_size())
            capacity = max(rows, min(_PENDING_ROWS, _PENDING_BYTES // per_row))
            self.logits = logits.new_empty((capacity, logits.shape[1]))
        assert self.logits is not None
        if self.filled == 0:
            self.start = start
        self.logits[self.filled:self.filled + rows] = logits
        self.filled += rows

    def flush(self) -> None:
        """Check and score the logits held, into their rows of the results."""
        if not self.filled:
            return
        assert self.logits is not None
        first, stop = self.start, self.start + self.filled
        logits = self.logits[:self.filled]
        samples = self.owners(first, stop)
        # the owners of the rows name them in an error too
        check_finite_logits(logits, self.what, samples)
        targets = self.y[samples.to(self.y.device)]
        if self.correct:
            # range-checked like the scores, then 1.0 where the arg-max is the target
            target_scores(logits, targets, False)
            self.out[first:stop] = logits.argmax(1) == targets
        else:  # float32 to float64 (exact) in the one copy into the results
            self.out[first:stop] = target_scores(logits, targets, self.softmax)
        self.filled = 0


def _owners(owners: Tensor | None, per_sample: int, sample_offset: int, start: int,
            stop: int) -> Tensor:
    """The original sample of each of the rows ``start..stop`` of a sample-major run."""
    return (owners[start:stop] if owners is not None
            else torch.arange(start, stop) // per_sample + sample_offset)


def explain_checked(explain: Explain, model: nn.Module, x: Tensor, y: Tensor,
                    like: Tensor | None) -> Tensor:
    """Run the user's explanation method and check its maps like given attributions."""
    maps = explain(model, x, y)
    maps = check_attributions(maps, x, name="explain(...) maps")
    if like is not None and maps.shape[1:] != like.shape[1:]:
        raise InvalidInputError(
            f"explain returned maps of shape {tuple(maps.shape[1:])} per sample but the "
            f"attributions have {tuple(like.shape[1:])}; use the same method and channel "
            "reduction for both.")
    return maps


# --- statistics -----------------------------------------------------------------------------

def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last axis, in float64, clipped to [-1, 1] against
    rounding; NaN where either side is constant (scipy.stats.pearsonr and numpy.corrcoef
    return NaN there too). Constancy is tested on the values themselves, as scipy does:
    centring a constant vector such as 0.1s can leave rounding noise instead of zeros."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    constant = (a == a[..., :1]).all(-1) | (b == b[..., :1]).all(-1)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denominator = a.norm(dim=-1) * b.norm(dim=-1)
    undefined = constant | (denominator == 0)
    r = (a * b).sum(-1) / torch.where(undefined, torch.ones_like(denominator), denominator)
    r = r.clamp(-1.0, 1.0)
    return torch.where(undefined, torch.full_like(r, math.nan), r)


def average_ranks(a: Tensor) -> Tensor:
    """Ranks (1 = smallest) along the last axis, float64; tied values share the mean of their
    ranks (scipy.stats.rankdata's "average")."""
    a = a.to(torch.float64)
    n = a.shape[-1]
    if a.device.type != "cpu" or n < 2:
        return _average_ranks_torch(a)
    flat = a.reshape(-1, n)
    # on a CPU: the keyed sort and numpy's elementwise operations instead of the sort,
    # index_add and scatter below (16 rows of 64: 72 against 81 us; 8 maps of 224x224: 20
    # against 25 ms); the same values, since a tie group's mean rank (first + last) / 2 + 1
    # is exact in float64 as their sum / count is
    order = stable_order(flat)
    values = flat.detach().gather(1, order).numpy()
    positions = np.arange(n)
    starts = np.ones(values.shape, dtype=bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]  # NaN != NaN: each NaN its own group
    ends = np.ones(values.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, positions, n - 1)[:, ::-1], axis=1)[:, ::-1]
    mean_rank = torch.from_numpy((first + last) / 2 + 1)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank).reshape(a.shape)


def _average_ranks_torch(a: Tensor) -> Tensor:
    """:func:`average_ranks` of float64 ``a`` in torch operations (any device)."""
    values, order = a.sort(-1)
    n = values.shape[-1]
    flat = values.reshape(-1, n)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[:, 1:] = flat[:, 1:] != flat[:, :-1]
    group = starts.cumsum(-1) - 1  # tie group of each sorted position, per row
    group = group + torch.arange(flat.shape[0], device=a.device)[:, None] * n
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=a.device).expand_as(flat)
    total = torch.zeros(flat.numel(), dtype=torch.float64, device=a.device)
    count = torch.zeros_like(total)
    total.index_add_(0, group.flatten(), positions.flatten())
    count.index_add_(0, group.flatten(), torch.ones_like(positions).flatten())
    mean_rank = (total / count.clamp(min=1))[group].reshape(values.shape)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation along the last axis (Pearson's of the average ranks, as
    scipy.stats.spearmanr); NaN where either side is constant."""
    return pearson(average_ranks(a), average_ranks(b))


def stable_order(values: Tensor, descending: bool = False) -> Tensor:
    """The indices that sort each row of ``values`` (N, F), equal values in index order:
    ``torch.sort(values, dim=1, descending=descending, stable=True).indices``, the same
    indices, faster on a CPU.

    A stable sort is slow on a CPU (16 maps of 32x32: about 1.1 ms). The values rounded to
    float32 (exact for 32 bits or fewer) are sorted as 64-bit integer keys instead, each the
    value's bits mapped to an integer of the same order in the high half and its index in the
    low half: equal values then sort by index, the stable order by construction, and numpy
    sorts integers with SIMD kernels (the same maps: 0.13 ms, 0.17 ms as float64). The bits
    are mapped as integers, with no float arithmetic, so subnormals keep their order whatever
    the CPU's denormal mode; -0.0 is made 0.0 first (a tie, as in a comparison sort).
    Rounding float64 values can make two of them equal: that order is kept where the float64
    values along it are sorted (then it is the stable sort: it sorts them, and equal values
    come in index order); otherwise numpy's argsort of the float64 values is, where no row
    holds two equal values, and else the stable sort runs. So does a row holding NaN (torch
    sorts NaN above everything, whatever its sign).
    """
    if not (values.device.type == "cpu" and values.dim() == 2 and 1 < values.shape[1] < 2**31
            and values.is_floating_point()):
        return torch.sort(values, dim=1, descending=descending, stable=True).indices
    # numpy from here: its elementwise operations on arrays this small cost a fraction of
    # torch's (16 x 1024 values: 6 against 25-40 us each)
    exact = values.detach().resolve_neg()
    # narrower floats are float32 exactly (numpy has no bfloat16)
    exact = (exact if exact.element_size() >= 4 else exact.to(torch.float32)).numpy()
    if np.isnan(exact).any():
        return torch.sort(values, dim=1, descending=descending, stable=True).indices
    with np.errstate(over="ignore"):  # float64 beyond float32's range rounds to +-inf
        order = _keyed_order(exact.astype(np.float32), descending)
    if exact.dtype.itemsize <= 4:
        return torch.from_numpy(order)
    # torch's gather: numpy's take_along_axis builds index arrays (4x slower here)
    ranked = torch.from_numpy(exact).gather(1, torch.from_numpy(order)).numpy()
    later, earlier = ranked[:, 1:], ranked[:, :-1]
    if (later <= earlier).all() if descending else (later >= earlier).all():
        return torch.from_numpy(order)
    keys = -exact if descending else exact
    order = np.argsort(keys, axis=1)
    ranked = torch.from_numpy(keys).gather(1, torch.from_numpy(order)).numpy()
    if not (ranked[:, 1:] == ranked[:, :-1]).any():  # -0.0 == 0.0 ties too
        return torch.from_numpy(order)
    return torch.sort(values, dim=1, descending=descending, stable=True).indices


def _keyed_order(values: np.ndarray, descending: bool) -> np.ndarray:
    """:func:`stable_order` of float32 rows without NaN, by sorting (order key, index)."""
    bits = np.ascontiguousarray(values).view(np.int32)
    # a float's bits as a signed integer order the non-negative floats; a negative float's
    # magnitude bits are flipped so that the larger magnitude is the smaller integer
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    ordered[bits == -2**31] = 0  # -0.0 (flipped to -1 just above) ties with 0.0
    if descending:
        np.invert(ordered, out=ordered)  # -k - 1: the reverse order, still distinct
    keys = ordered.astype(np.int64)
    keys <<= 32
    keys |= np.arange(values.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    keys &= 0xFFFFFFFF
    return keys


def descending_ranks(a: Tensor) -> Tensor:
    """Each feature's position (0 = largest) when each sample's flattened map is sorted by
    descending value; ties keep index order (a stable sort)."""
    return inverse_order(stable_order(a.flatten(1), descending=True))


def inverse_order(order: Tensor) -> Tensor:
    """Each feature's position in ``order`` (N, F), row by row: the inverse permutation of
    each row of sort indices (a feature's rank)."""
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def pixel_map(a: Tensor) -> Tensor:
    """An (N, H, W) map as it is, an (N, C, H, W) one summed over its channels."""
    return a.sum(1) if a.dim() == 4 else a


def trapezoid(curve: Tensor, x: Tensor | None = None) -> Tensor:
    """Area under each row of ``curve`` (unit spacing, or the points ``x``)."""
    if curve.shape[-1] < 2:
        return torch.zeros(curve.shape[:-1], dtype=curve.dtype, device=curve.device)
    if x is None:
        return torch.trapezoid(curve, dim=-1)
    return torch.trapezoid(curve, x.to(curve), dim=-1)


def guarded(model: nn.Module | None):
    """Eval mode and frozen parameters during the metric, restored afterwards."""
    return model_guard(model) if model is not None else contextlib.nullcontext()


class MetricInputs:
    """Checked inputs shared by the model-based metrics: the model, the inputs, one target per
    sample (the predicted class when ``y`` is None), the maps (given, or from ``explain``) and
    the chunk size of the forward passes."""

    def __init__(self, model: Any, x: Any, y: Any, attributions: Any,
                 explain: Explain | None, batch_size: int | None, need_maps: bool = True,
                 metric: str = "metric"):
        self.metric = metric
        self.model = check_model(model)
        self.x = check_inputs(x, self.model)
        self.n = self.x.shape[0]
        self.batch_size = default_batch_size(self.x, batch_size, model=self.model)
        targets = check_targets(y, self.n, self.x.device)
        if targets is None:
            targets = predicted_classes(self.model, self.x, self.batch_size, metric)
        self.y = targets
        self.a: Tensor | None = None
        if attributions is not None:
            self.a = check_attributions(attributions, self.x)
        elif need_maps:
            if explain is None:
                raise InvalidInputError("pass attributions= or explain= to compute them.")
            self.a = explain_checked(explain, self.model, self.x, self.y, None)

    @property
    def maps(self) -> Tensor:
        """The checked maps (given, or from ``explain``); for metrics built with maps."""
        assert self.a is not None, "MetricInputs(need_maps=False) has no maps"
        return self.a

    def clean_scores(self, softmax: bool) -> Tensor:
        """Scores of the unperturbed inputs (N,)."""
        return self.scores_of(self.x, softmax, "unperturbed inputs")

    def scores_of(self, inputs: Tensor, softmax: bool, what: str) -> Tensor:
        """Scores of the targets for ``inputs`` shaped like ``x`` (N,), in chunks."""
        return scores_in_batches(
            self.model, lambda s, e: inputs[s:e], self.y, self.n, self.batch_size,
            softmax, False, f"{self.metric} ({what})")
