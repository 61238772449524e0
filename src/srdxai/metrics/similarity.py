"""Similarity between two batches of explanation maps: pure, batched torch functions.

Every measure takes two maps ``a`` and ``b`` of the same shape, (N, H, W) or (N, C, H, W), and
returns float64 scores of shape (N,): one value per sample, computed from that sample alone
(nothing is pooled across the batch). Inputs must be floating-point torch tensors without NaN
or Inf; the statistics are computed in float64. Nothing is detached, so the measures can serve
as differentiable losses (e.g. the target term of an explanation-manipulation attack).

* :func:`normalise_map` is the preprocessing of Dombrowski et al. (NeurIPS 2019, "Explanations
  can be manipulated and geometry is to blame"): the channel-summed absolute map, normalised to
  sum 1 per sample.
* :func:`pearson` is the Pearson correlation of the flattened maps (NaN for a constant map).
* :func:`mse` is the mean squared error.
* :func:`ssim` is the structural similarity index with the definition and defaults of
  ``skimage.metrics.structural_similarity`` (see its docstring for the one difference: the
  default ``data_range``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from .common import pearson as pearson_along_last

Tensor = torch.Tensor
NormaliseMode = Literal["sum_abs", "max_abs"] | None

__all__ = ["normalise_map", "scaled_abs_map", "pearson", "mse", "ssim"]

#: skimage's Gaussian window reaches ``int(GAUSSIAN_TRUNCATE * sigma + 0.5)`` pixels each side.
GAUSSIAN_TRUNCATE = 3.5


# --- checks ---------------------------------------------------------------------------------

def _check_map(a: object, name: str) -> Tensor:
    """A finite floating (N, H, W) or (N, C, H, W) tensor with a non-empty batch and image."""
    if not isinstance(a, Tensor):
        raise InvalidInputError(
            f"{name} must be a torch.Tensor of shape (N, H, W) or (N, C, H, W), got "
            f"{type(a).__name__}; convert numpy arrays with torch.as_tensor first.")
    if a.dim() not in (3, 4):
        raise InvalidInputError(
            f"{name} must have shape (N, H, W) or (N, C, H, W) (a batch of maps with at least two "
            f"dimensions per map); got {tuple(a.shape)}. Add a batch dimension with {name}[None] "
            "for a single map.")
    if not a.is_floating_point():
        raise InvalidInputError(f"{name} must be floating point, got {a.dtype}.")
    if a.numel() == 0:
        raise InvalidInputError(f"{name} is empty (shape {tuple(a.shape)}).")
    finite = torch.isfinite(a.detach()).flatten(1).all(1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise InvalidInputError(f"{name} contains NaN or Inf (samples {bad}).")
    return a.to(torch.float64)


def _check_pair(a: object, b: object) -> tuple[Tensor, Tensor]:
    a64 = _check_map(a, "a")
    b64 = _check_map(b, "b")
    if a64.shape != b64.shape:
        raise InvalidInputError(
            f"a and b must have the same shape; got {tuple(a64.shape)} and {tuple(b64.shape)}.")
    if a64.device != b64.device:
        raise InvalidInputError(f"a is on {a64.device} but b is on {b64.device}.")
    return a64, b64


# --- preprocessing --------------------------------------------------------------------------

def normalise_map(a: Tensor, mode: NormaliseMode = "sum_abs") -> Tensor:
    """Preprocess explanation maps before comparing them.

    Args:
        a: maps (N, H, W) or (N, C, H, W).
        mode: ``"sum_abs"`` (default; Dombrowski et al.'s preprocessing): ``|a|`` summed over the
            channels if ``a`` is 4-D, then divided by its sum, so each sample sums to 1.
            ``"max_abs"``: the same channel-summed ``|a|`` divided by its maximum, so each
            sample's largest value is 1. ``None``: ``a`` unchanged (as float64, same shape).

    Returns:
        float64 maps (N, H, W) for ``"sum_abs"`` and ``"max_abs"``; ``a``'s shape for ``None``.
        An all-zero sample stays all zero (no NaN).
    """
    a64 = _check_map(a, "a")
    if mode is None:
        return a64
    if mode not in ("sum_abs", "max_abs"):
        raise InvalidInputError(f"mode must be 'sum_abs', 'max_abs' or None, got {mode!r}.")
    return scaled_abs_map(a64, mode)


def scaled_abs_map(a: Tensor, mode: NormaliseMode = "sum_abs") -> Tensor:
    """:func:`normalise_map`'s ``"sum_abs"`` / ``"max_abs"`` step without its checks: keeps
    ``a``'s dtype and autograd graph (the manipulation attack's loss differentiates it)."""
    m = a.abs()
    if m.dim() == 4:
        m = m.sum(1)
    flat = m.flatten(1)
    scale = flat.sum(1) if mode == "sum_abs" else flat.amax(1)
    # An all-zero map has scale 0: divide it by 1 instead, which leaves it zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return m / scale.reshape(-1, *([1] * (m.dim() - 1)))


# --- measures -------------------------------------------------------------------------------

def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the flattened maps, per sample (all channels and pixels).

    ``r = sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) sum((b - mean b)^2))``,
    clipped to [-1, 1] against rounding (as ``numpy.corrcoef``).

    Returns:
        float64 (N,). NaN for a sample where either map is constant (every value equal): the
        correlation is undefined there (0/0), as in ``numpy.corrcoef``.
    """
    a64, b64 = _check_pair(a, b)
    return pearson_along_last(a64.flatten(1), b64.flatten(1))


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all channels and pixels, per sample: ``mean((a - b)^2)``.

    Returns:
        float64 (N,).
    """
    a64, b64 = _check_pair(a, b)
    return (a64 - b64).square().flatten(1).mean(1)


def _data_range(
    data_range: float | Sequence[float] | Tensor | None, a: Tensor, b: Tensor
) -> Tensor:
    """The data range per sample, float64 (N,); see :func:`ssim`."""
    n = a.shape[0]
    if data_range is None:
        both = torch.cat([a.detach().flatten(1), b.detach().flatten(1)], 1)
        return both.amax(1) - both.amin(1)
    if isinstance(data_range, bool):
        raise InvalidInputError("data_range must be a number or one number per sample.")
    try:
        r = torch.as_tensor(data_range, dtype=torch.float64, device=a.device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidInputError(
            f"data_range must be a number or one number per sample: {error}") from None
    r = r.detach().reshape(-1)
    if r.numel() == 1:
        r = r.expand(n)
    elif r.numel() != n:
        raise InvalidInputError(
            f"data_range must be one number or one per sample ({n}); got {r.numel()} values.")
    if not (torch.isfinite(r).all() and (r > 0).all()):
        raise InvalidInputError(f"data_range must be positive and finite; got {r.tolist()}.")
    return r


def _gaussian_kernel(sigma: float, device: torch.device) -> Tensor:
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim(
    a: Tensor,
    b: Tensor,
    data_range: float | Sequence[float] | Tensor | None = None,
    win_size: int = 7,
    gaussian: bool = False,
    sigma: float = 1.5,
    K1: float = 0.01,  # noqa: N803 - the names of the SSIM paper and skimage
    K2: float = 0.03,  # noqa: N803
) -> Tensor:
    """Mean structural similarity index (Wang et al., 2004) per sample.

    The definition and defaults of ``skimage.metrics.structural_similarity`` for 2-D
    single-channel images. With local means ``mu``, variances ``v`` and covariance ``v_ab``
    over a sliding window, ``C1 = (K1 R)^2``, ``C2 = (K2 R)^2`` and ``R`` the data range::

        S = (2 mu_a mu_b + C1) (2 v_ab + C2) / ((mu_a^2 + mu_b^2 + C1) (v_a + v_b + C2))

    and the score is the mean of ``S`` over the valid region only: the windows that lie wholly
    inside the map, i.e. without a border of ``(window - 1) // 2`` pixels on each side
    (skimage computes ``S`` everywhere and crops that border before averaging).

    * ``gaussian=False`` (default): a uniform ``win_size x win_size`` window and the sample
      covariance (variances and covariance times ``n / (n - 1)``, ``n = win_size**2``), as
      skimage's defaults ``gaussian_weights=False, use_sample_covariance=True``.
    * ``gaussian=True``: a normalised Gaussian window of standard deviation ``sigma``, cut
      ``int(3.5 sigma + 0.5)`` pixels each side of the centre (11 x 11 for sigma 1.5;
      ``win_size`` is ignored, as in skimage), and the population covariance: Wang et al.'s
      convention, skimage's ``gaussian_weights=True, sigma=sigma, use_sample_covariance=False``.
    * (N, C, H, W) maps: SSIM per channel, averaged over the channels, with one data range for
      all channels of a sample (skimage's ``channel_axis`` behaviour).

    Args:
        a, b: maps of the same shape, (N, H, W) or (N, C, H, W); each map's height and width
            must be at least the window size.
        data_range: ``R``: one positive number, or one per sample (a sequence or tensor of N
            values). ``None`` (default): per sample, ``max(a, b) - min(a, b)``, the largest
            minus the smallest value over both maps of that sample (all channels). skimage has
            no usable default for float images (it raises a ValueError and asks for
            ``data_range``); this choice equals calling skimage with
            ``data_range=max(a.max(), b.max()) - min(a.min(), b.min())`` for each sample. The
            range is a constant: no gradient flows through it. If it is 0, the sample's two
            maps are the same constant map, and its score is 1 (the formula would give 0/0).
        win_size: odd side of the uniform window, at least 3 (used when ``gaussian=False``).
        gaussian: use the Gaussian window (see above).
        sigma: the Gaussian's standard deviation in pixels (used when ``gaussian=True``).
        K1, K2: the stabilising constants of the SSIM paper.

    Returns:
        float64 (N,), at most 1; 1 for identical maps.
    """
    a64, b64 = _check_pair(a, b)
    if gaussian:
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not (
                math.isfinite(sigma) and sigma > 0):
            raise InvalidInputError(f"sigma must be a positive number, got {sigma!r}.")
        kernel = _gaussian_kernel(float(sigma), a64.device)
        cov_norm = 1.0
    else:
        if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or (
                win_size % 2 == 0):
            raise InvalidInputError(f"win_size must be an odd integer >= 3, got {win_size!r}.")
        kernel = torch.full((win_size,), 1.0 / win_size, dtype=torch.float64, device=a64.device)
        n_window = win_size * win_size
        cov_norm = n_window / (n_window - 1)
    for name, k in (("K1", K1), ("K2", K2)):
        if isinstance(k, bool) or not isinstance(k, int | float) or not (
                math.isfinite(k) and k > 0):
            raise InvalidInputError(f"{name} must be a positive number, got {k!r}.")
    size = kernel.numel()
    height, width = a64.shape[-2:]
    if height < size or width < size:
        raise InvalidInputError(
            f"the maps ({height} x {width}) are smaller than the SSIM window ({size} x {size}); "
            "use a smaller win_size (or sigma with gaussian=True).")
    r = _data_range(data_range, a64, b64)

    n = a64.shape[0]
    channels = a64.shape[1] if a64.dim() == 4 else 1
    x = a64.reshape(n * channels, 1, height, width)
    y = b64.reshape(n * channels, 1, height, width)
    # Filter the five moment maps at once: one group per map, a separable window, no padding
    # (so only the valid region, where the window lies inside the map, is computed).
    stack = torch.cat([x, y, x * x, y * y, x * y], 1)
    rows = kernel.reshape(1, 1, 1, size).expand(5, 1, 1, size)
    cols = kernel.reshape(1, 1, size, 1).expand(5, 1, size, 1)
    filtered = F.conv2d(F.conv2d(stack, rows, groups=5), cols, groups=5)
    mu_x, mu_y, m_xx, m_yy, m_xy = filtered.unbind(1)
    v_x = cov_norm * (m_xx - mu_x * mu_x)
    v_y = cov_norm * (m_yy - mu_y * mu_y)
    v_xy = cov_norm * (m_xy - mu_x * mu_y)

    r_rows = r.repeat_interleave(channels)[:, None, None]
    c1 = (K1 * r_rows) ** 2
    c2 = (K2 * r_rows) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * v_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (v_x + v_y + c2)
    zero_range = r_rows == 0  # only possible with data_range=None: identical constant maps
    s = numerator / torch.where(zero_range, torch.ones_like(denominator), denominator)
    s = torch.where(zero_range, torch.ones_like(s), s)
    return s.flatten(1).mean(1).reshape(n, channels).mean(1)
