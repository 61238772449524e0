"""Faithfulness metrics that remove features in the order of the map and read a curve.

* :func:`road` (Rong et al., ICML 2022): remove a percentage of the most (or least) relevant
  pixels and impute them with noisy linear imputation (:func:`noisy_linear_imputation`).
* :func:`region_perturbation` (Samek et al., 2017): replace square patches cumulatively in
  order of their summed relevance and record the drop of the score (AOPC).
* :func:`irof` (Rieger and Hansen, 2020): the same with SLIC superpixels ranked by mean
  relevance; the area over the curve of the score relative to the clean score.
* :func:`selectivity` (Montavon et al., 2018): the score after each patch removal; its area.

Perturbed inputs of several samples and steps share a forward pass (chunks of
``sampling.batch_size``); the only per-item Python work is ROAD's sparse linear solve and the
SLIC segmentation, neither of which is a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Unpack

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from .common import (
    Baseline,
    Explain,
    MetricInputs,
    Normalise,
    RankedInputs,
    baseline_values,
    check_finite_number,
    check_positive_int,
    descending_ranks,
    guarded,
    inverse_order,
    pixel_map,
    preprocess_attributions,
    scores_in_batches,
    stable_order,
    to_tensor,
    trapezoid,
)
from .faithfulness import CurveResult
from .registry import register_metric
from .sampling import Sampling, SamplingOptions, sampling_of

Tensor = torch.Tensor
Order = Literal["morf", "lerf"]
Readout = Literal["correct", "probability", "logit"]

__all__ = [
    "IROFResult",
    "RegionPerturbationResult",
    "irof",
    "noisy_linear_imputation",
    "region_perturbation",
    "road",
    "selectivity",
]

#: ROAD's neighbourhood: (row offset, column offset) -> weight; the 4 edge neighbours weigh
#: twice the 4 diagonal ones, and the 8 weights sum to 1.
IMPUTATION_STENCIL = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)


@dataclass(frozen=True)
class RegionPerturbationResult(CurveResult):
    """Region perturbation curves.

    Attributes:
        curve: (N, K) drops ``f_y(x) - f_y(x_k)`` after k = 1..K regions are replaced.
        fractions: (K,) the fraction of the regions replaced at each point (k / regions).
        auc: (N,) the trapezoid under ``curve`` with unit spacing (Quantus' AUC).
        aopc: (N,) Samek et al.'s AOPC, ``sum_k curve[k] / (K + 1)`` (the k = 0 term is 0).
    """

    aopc: Tensor


@dataclass(frozen=True)
class IROFResult:
    """IROF curves; samples may have different numbers of superpixels.

    Attributes:
        curve: (N, S) the score relative to the clean score, ``f_y(x_k) / f_y(x)``, after the
            k = 1..S_i most relevant segments are replaced; NaN after a sample's last segment
            (S is the largest S_i).
        n_segments: (N,) S_i, the number of segments of each sample.
        segments: (N, H, W) the segment of every pixel, labels 0..S_i-1.
        aoc: (N,) Quantus' area over the curve, ``S_i - trapezoid(curve[i, :S_i])`` (unit
            spacing). It grows with S_i; divide by ``n_segments`` to compare images.
    """

    curve: Tensor
    n_segments: Tensor
    segments: Tensor
    aoc: Tensor


# --- shared plumbing ------------------------------------------------------------------------

def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise InvalidInputError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


# --- ROAD -----------------------------------------------------------------------------------

def _impute(values: np.ndarray, pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The noiseless linear imputation: (C, k) values of the removed ``pixels`` (flat indices)
    of ``values`` (C, H*W), solving one sparse system for all of them (see
    :func:`noisy_linear_imputation`)."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    k = pixels.size
    unknown = np.full(height * width, -1, dtype=np.int64)
    unknown[pixels] = np.arange(k)
    rows, cols = np.divmod(pixels, width)
    # unknown i: sum_j w_ij v_j - (sum of i's in-image weights) v_i = -sum_known w_ij x_j
    weight_sum = np.zeros(k)
    rhs = np.zeros((k, values.shape[0]))
    entry_rows, entry_cols, entry_weights = [], [], []
    for (dr, dc), weight in IMPUTATION_STENCIL:
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        equation = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        weight_sum[equation] += weight
        variable = unknown[neighbour]
        removed = variable >= 0
        entry_rows.append(equation[removed])
        entry_cols.append(variable[removed])
        entry_weights.append(np.full(int(removed.sum()), weight))
        rhs[equation[~removed]] -= weight * values[:, neighbour[~removed]].T
    entry_rows.append(np.arange(k))
    entry_cols.append(np.arange(k))
    entry_weights.append(-weight_sum)
    system = csc_matrix(
        (np.concatenate(entry_weights), (np.concatenate(entry_rows), np.concatenate(entry_cols))),
        shape=(k, k))
    solution = spsolve(system, rhs)
    return np.asarray(solution, dtype=np.float64).reshape(k, -1).T


def noisy_linear_imputation(
    image: Any,
    pixels: Any,
    noise: float = 0.01,
    *,
    normals: Any = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ROAD's noisy linear imputation of the ``pixels`` of one ``image`` (Rong et al., 2022).

    Every removed pixel becomes the weighted mean of its 8 neighbours (weight 1/6 for the four
    sharing an edge, 1/12 for the four diagonal ones; neighbours outside the image are left
    out and the mean renormalised), where removed neighbours are unknowns themselves: one
    sparse linear system over all removed pixels, solved exactly (scipy's ``spsolve``),
    channel by channel with the same matrix. Then ``noise * normals`` is added, an independent
    standard normal per channel and removed pixel. This is the imputation of Rong et al.'s
    ``NoisyLinearImputer`` and of Quantus' ``noisy_linear_imputation``.

    Args:
        image: (C, H, W) tensor or array.
        pixels: flat indices ``h * W + w`` of the removed pixels, distinct; at least one pixel
            must stay (the system is singular without a known value).
        noise: standard deviation of the added noise (ROAD: 0.01); 0 for the pure imputation.
        normals: (C, k) standard normals, column j for ``pixels[j]`` (e.g. the draws Quantus
            made); default drawn from ``generator`` (or torch's global generator).
        generator: the source of ``normals``.

    Returns:
        float64 (C, H, W) image on ``image``'s device, the removed pixels imputed.
    """
    img = to_tensor(image, "image")
    if img.dim() != 3 or not (img.is_floating_point() or img.dtype in (torch.int32,
                                                                        torch.int64)):
        raise InvalidInputError(f"image must be a (C, H, W) array of numbers; got shape "
                                f"{tuple(img.shape)} of {img.dtype}.")
    channels, height, width = img.shape
    index = to_tensor(pixels, "pixels").reshape(-1)
    if index.is_floating_point() or index.dtype == torch.bool:
        raise InvalidInputError("pixels must hold integer flat pixel indices h * W + w.")
    index = index.to(torch.int64).cpu()
    if index.numel() and (index.min() < 0 or index.max() >= height * width):
        raise InvalidInputError(f"pixels must lie in [0, H*W = {height * width}).")
    if index.unique().numel() != index.numel():
        raise InvalidInputError("pixels must be distinct.")
    if index.numel() >= height * width:
        raise InvalidInputError(
            "noisy linear imputation needs at least one pixel left to impute from; remove "
            "fewer pixels.")
    noise = check_finite_number(noise, "noise")
    k = index.numel()
    if normals is None:
        z = torch.randn(channels, k, generator=generator, dtype=torch.float64)
    else:
        z = to_tensor(normals, "normals").to(torch.float64).cpu()
        if z.shape != (channels, k) or not torch.isfinite(z).all():
            raise InvalidInputError(f"normals must be finite, of shape (C, k) = "
                                    f"({channels}, {k}); got {tuple(z.shape)}.")
    values = img.detach().to("cpu", torch.float64).reshape(channels, -1).numpy().copy()
    if k:
        idx = index.numpy()
        values[:, idx] = _impute(values, idx, height, width) + noise * z.numpy()
    return torch.from_numpy(values).reshape(channels, height, width).to(img.device)


def _check_percentages(percentages: Any, n_pixels: int) -> list[float]:
    if percentages is None:
        return [float(p) for p in range(1, 100, 2)]
    values = to_tensor(percentages, "percentages").reshape(-1)
    if values.numel() == 0 or values.dtype == torch.bool:
        raise InvalidInputError("percentages must be a non-empty list of numbers in [0, 100).")
    out = [float(p) for p in values.tolist()]
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise InvalidInputError(f"percentages must increase (they are the curve's x axis); "
                                f"got {out}.")
    for p in out:
        if not (math.isfinite(p) and 0 <= p < 100):
            raise InvalidInputError(f"percentages must lie in [0, 100); got {p}.")
        if int(n_pixels * p / 100) >= n_pixels:
            raise InvalidInputError(
                f"percentage {p} removes all {n_pixels} pixels; ROAD imputes from the pixels "
                "that stay, so at least one must.")
    return out


@register_metric(family="faithfulness", direction="lower", needs=("model",),
                 returns="CurveResult (curve and area per sample)",
                 axes=("fraction of pixels removed and imputed, most relevant first",
                       "target still predicted (1 or 0)", "linear"))
def road(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    percentages: Sequence[float] | None = None,
    noise: float = 0.01,
    order: Order = "morf",
    readout: Readout = "correct",
    abs: bool = False,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> CurveResult:
    """ROAD (Rong et al., ICML 2022): the prediction after the most relevant pixels are
    removed and imputed from their neighbours.

    RemOve And Debias, as Quantus' ``ROAD``. For each percentage p, the ``int(H * W * p / 100)``
    most relevant pixels (``order="morf"``; least relevant first with ``"lerf"``) are removed
    and imputed with :func:`noisy_linear_imputation` (all channels of a pixel), and the model is
    run on the result; the curve holds, per sample and percentage, whether the target is still
    the predicted class (Quantus; Rong et al. report this accuracy averaged over a test set) or
    the target's probability or logit. MoRF: lower is better (the prediction goes quickly);
    LeRF: higher is better. The area is the trapezoid over the removed fraction p / 100.

    Pixels are ranked by the map summed over channels (an element map is a pixel map here:
    ROAD imputes pixels); ties go to the lower index. Differences from Quantus 0.6, whose
    ``ROAD`` returns one batch-averaged accuracy per percentage: it raises an IndexError on
    any input with more than one channel (it ranks the map broadcast over channels and
    indexes pixels with the element indices), and it averages only the first batch of
    ``batch_size`` (64) samples (``custom_postprocess`` reads ``evaluation_scores[0]``).
    We return every sample's curve; ``result.curve.mean(0)`` is Quantus' number on
    one-channel inputs.

    Args:
        percentages: percentages of the pixels removed (Quantus: 1, 3, ..., 99), in [0, 100).
        noise: standard deviation of the imputation noise (ROAD, Quantus: 0.01).
        order: ``"morf"`` (most relevant first, Quantus) or ``"lerf"``.
        readout: ``"correct"`` (1.0 while the arg-max is the target; Quantus), ``"probability"``
            (softmax) or ``"logit"``.
        abs, normalise: attribution preprocessing (only the order matters).
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`; its
            fields may be given as keywords instead). ``draws``: float (N, T, C, K) standard
            normals with K >= the largest count of removed pixels: ``draws[i, t, :, j]`` is the
            noise of the j-th removed pixel (in removal order) of sample i at percentage t,
            extra columns are ignored. Default: every (sample, percentage) draws from its own
            generator, seeded from ``sampling``'s generator, so results do not depend on the
            chunking.

    Returns:
        :class:`~srdxai.metrics.CurveResult`: ``curve`` (N, T), ``fractions`` (T,) = p / 100,
        ``auc`` (N,). T forward passes per sample (one more when ``y`` is None, for the
        predicted class) and T sparse solves of up to ``H * W`` unknowns per sample.
    """
    sampling = sampling_of(sampling, options, "road")
    order = _check_choice(order, "order", ("morf", "lerf"))
    readout = _check_choice(readout, "readout", ("correct", "probability", "logit"))
    noise = check_finite_number(noise, "noise")
    if noise < 0:
        raise InvalidInputError(f"noise must be >= 0, got {noise}.")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size, metric="ROAD")
        a = pixel_map(preprocess_attributions(s.a, normalise, abs)).flatten(1)
        channels, height, width = s.x.shape[1:]
        n_pixels = height * width
        percent = _check_percentages(percentages, n_pixels)
        steps = len(percent)
        counts = [int(n_pixels * p / 100) for p in percent]  # Quantus' rounding
        removal_order = stable_order(a, descending=order == "morf").cpu().numpy()
        widest = max(counts)
        if sampling.draws is not None:
            normals = to_tensor(sampling.draws, "draws").to(torch.float64).cpu()
            if normals.dim() != 4 or tuple(normals.shape[:3]) != (s.n, steps, channels) or (
                    normals.shape[3] < widest):
                raise InvalidInputError(
                    f"draws must have shape (N={s.n}, T={steps}, C={channels}, K >= {widest}); "
                    f"got {tuple(normals.shape)}.")
            if not torch.isfinite(normals).all():
                raise InvalidInputError("draws contain NaN or Inf.")
            seeds = None
        else:
            normals = None
            seeds = torch.randint(0, 2**62, (s.n, steps), generator=sampling.make_generator())
        images = s.x.detach().to("cpu", torch.float64).reshape(s.n, channels, -1).numpy()

        def imputed(i: int, t: int) -> np.ndarray:
            k = counts[t]
            values = images[i].copy()
            if k == 0:
                return values
            if normals is not None:
                z = normals[i, t, :, :k].numpy()
            else:
                assert seeds is not None
                generator = torch.Generator().manual_seed(int(seeds[i, t]))
                z = torch.randn(channels, k, generator=generator, dtype=torch.float64).numpy()
            pixels = removal_order[i, :k]
            values[:, pixels] = _impute(values, pixels, height, width) + noise * z
            return values

        def perturbed(start: int, stop: int) -> Tensor:
            items = [divmod(f, steps) for f in range(start, stop)]
            batch = np.stack([imputed(i, t) for i, t in items])
            inputs = torch.from_numpy(batch).reshape(-1, channels, height, width)
            return inputs.to(device=s.x.device, dtype=s.x.dtype)

        curve = scores_in_batches(s.model, perturbed, s.y, s.n * steps, s.batch_size,
                                  readout == "probability", sampling.progress, "ROAD",
                                  per_sample=steps, correct=readout == "correct"
                                  ).view(s.n, steps)
        fractions = torch.tensor(percent, dtype=torch.float64) / 100
        return CurveResult(curve=curve.to(s.x.device), fractions=fractions,
                           auc=trapezoid(curve, fractions).to(s.x.device))


# --- patches: region perturbation and selectivity -------------------------------------------

def _patch_of_pixel(height: int, width: int, patch_size: int) -> tuple[Tensor, int]:
    """Each pixel's patch index (H*W,) and the number of patches. Patches tile the image
    padded to a multiple of ``patch_size``, the padding split evenly (the smaller half at the
    top and left, as Quantus' ``get_padding_size``), so border patches may be partial."""

    def axis(size: int) -> tuple[Tensor, int]:
        total = (-size) % patch_size
        before = total // 2
        return (torch.arange(size) + before) // patch_size, (size + total) // patch_size

    rows, n_rows = axis(height)
    cols, n_cols = axis(width)
    return (rows[:, None] * n_cols + cols[None, :]).flatten(), n_rows * n_cols


def _replacement(s: MetricInputs, baseline: Any, uniform_range: Any, sampling: Sampling,
                 metric: str) -> Tensor:
    """The replacement image (N, C, H, W): the baseline, or uniform noise for "uniform"."""
    if not (isinstance(baseline, str) and baseline == "uniform"):
        sampling.refuse_draws(metric, "it draws nothing unless baseline='uniform'")
        return baseline_values(baseline, s.x)
    if sampling.draws is not None:
        values = to_tensor(sampling.draws, "draws").to(device=s.x.device, dtype=s.x.dtype)
        if values.shape != s.x.shape or not torch.isfinite(values).all():
            raise InvalidInputError(
                f"draws (the uniform replacement values) must be finite and shaped like x "
                f"{tuple(s.x.shape)}; got {tuple(values.shape)}.")
        return values
    if uniform_range is None:
        flat = s.x.flatten(1).to(torch.float64)
        low, high = flat.amin(1).cpu(), flat.amax(1).cpu()
    else:
        if not isinstance(uniform_range, tuple | list) or len(uniform_range) != 2:
            raise InvalidInputError(f"uniform_range must be (low, high); got {uniform_range!r}.")
        lo = check_finite_number(uniform_range[0], "uniform_range[0]")
        hi = check_finite_number(uniform_range[1], "uniform_range[1]")
        if not lo < hi:
            raise InvalidInputError(f"uniform_range must have low < high; got {uniform_range}.")
        low, high = torch.full((s.n,), lo), torch.full((s.n,), hi)
    generator = sampling.make_generator()
    shape = s.x.shape[1:]
    noise = torch.stack([torch.rand(shape, generator=generator, dtype=torch.float64)
                         for _ in range(s.n)])  # sample by sample: independent of N
    view = (-1, 1, 1, 1)
    values = low.view(view).double() + (high - low).view(view).double() * noise
    return values.to(device=s.x.device, dtype=s.x.dtype)


def _patch_curve(s: MetricInputs, a: Tensor, patch_size: int, regions: int | None, order: Order,
                 replacement: Tensor, softmax: bool, progress: bool,
                 desc: str) -> tuple[Tensor, int]:
    """Scores (N, K) after the first k = 1..K patches (in ``order`` of their summed
    relevance) are replaced; K = all patches, or at most ``regions``."""
    height, width = s.x.shape[-2:]
    patch_of_pixel, n_patches = _patch_of_pixel(height, width, patch_size)
    patch_of_pixel = patch_of_pixel.to(s.x.device)
    per_pixel = pixel_map(a).flatten(1)
    sums = torch.zeros(s.n, n_patches, dtype=per_pixel.dtype, device=per_pixel.device)
    sums.index_add_(1, patch_of_pixel.to(per_pixel.device), per_pixel)
    rank = inverse_order(stable_order(sums, descending=order == "morf"))
    rank_of_pixel = rank.to(s.x.device)[:, patch_of_pixel]  # (N, H*W)
    steps = n_patches if regions is None else min(regions, n_patches)
    inputs = RankedInputs(rank_of_pixel, 3, s.x, replacement)
    counts = torch.arange(1, steps + 1, device=s.x.device)  # the first k patches replaced

    def perturbed(start: int, stop: int) -> Tensor:
        return inputs.grid(start, stop, counts)

    scores = scores_in_batches(s.model, perturbed, s.y, s.n * steps, s.batch_size, softmax,
                               progress, desc, per_sample=steps)
    return scores.view(s.n, steps), n_patches


@register_metric(family="faithfulness", direction="higher", needs=("model",),
                 returns="RegionPerturbationResult (drop curve, AUC and AOPC per sample)",
                 axes=("fraction of regions replaced, most relevant first",
                       "drop of the class probability", "linear"))
def region_perturbation(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    patch_size: int = 8,
    regions_evaluation: int = 100,
    order: Order = "morf",
    baseline: Baseline = "black",
    uniform_range: tuple[float, float] | None = None,
    softmax: bool = True,
    abs: bool = False,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> RegionPerturbationResult:
    """Region perturbation (Samek et al., IEEE TNNLS 2017): the drop of the score as the most
    relevant patches are replaced one after another (AOPC).

    As Quantus' ``RegionPerturbation``. The image is tiled into non-overlapping ``patch_size``
    squares (padded evenly to a multiple of the size, so border patches may be partial); patches
    are ranked by their summed relevance (most relevant first, or least with ``order="lerf"``)
    and the first ``k = 1..K`` are replaced cumulatively (K = ``regions_evaluation``, at most
    all patches). The curve is the drop ``f_y(x) - f_y(x_k)``; AOPC (Samek et al.) is its mean
    over ``k = 0..K``, the k = 0 term being 0. With MoRF a larger AOPC is better (Samek et al.:
    the score falls fastest when the map is right); with LeRF a smaller one.

    Differences from Quantus 0.6: it declares "lower is better" (``score_direction=LOWER``)
    for this curve of drops, the opposite of Samek et al.'s reading; its ``"mean"`` replaces
    each patch by the mean of the already perturbed (and edge-padded) image, so the value
    drifts from step to step (ours: the sample's mean); its ``"uniform"`` fills each patch with
    one U(0, 1) value (ours: an independent value per pixel and channel, Samek et al.'s uniform
    noise, over the sample's range by default); ties go to the lower patch index (Quantus'
    unstable argsort leaves them open); ``order="random"`` is not offered (pass a random map).

    Args:
        patch_size: side of the square patches (Quantus: 8; Samek et al.: 9).
        regions_evaluation: patches replaced, K (Quantus: 100).
        order: ``"morf"`` (Quantus' default) or ``"lerf"``.
        baseline: replacement: a number, ``"black"`` (Quantus' default: the sample's
            minimum), ``"white"``, ``"mean"``, ``"zero"``, ``"blur"``, a tensor broadcasting
            to x, or ``"uniform"`` (noise, see ``uniform_range``).
        uniform_range: (low, high) of the ``"uniform"`` noise; default: each sample's
            minimum and maximum.
        softmax: probabilities (Quantus' default) or logits.
        abs, normalise: attribution preprocessing (only the order matters).
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`; its
            fields may be given as keywords instead). ``draws``: with ``baseline="uniform"``
            only, the replacement values themselves, shaped like x (N, C, H, W); drawn sample
            by sample otherwise.

    Returns:
        :class:`RegionPerturbationResult`: ``curve`` (N, K), ``fractions`` (K,), ``auc`` and
        ``aopc`` (N,). K + 1 forward passes per sample.
    """
    sampling = sampling_of(sampling, options, "region_perturbation")
    order = _check_choice(order, "order", ("morf", "lerf"))
    patch_size = check_positive_int(patch_size, "patch_size")
    regions = check_positive_int(regions_evaluation, "regions_evaluation")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="region perturbation")
        a = preprocess_attributions(s.a, normalise, abs)
        replacement = _replacement(s, baseline, uniform_range, sampling, "region_perturbation")
        clean = s.clean_scores(softmax)
        scores, n_patches = _patch_curve(s, a, patch_size, regions, order, replacement, softmax,
                                         sampling.progress, "region perturbation")
        drops = clean[:, None].cpu() - scores
        steps = drops.shape[1]
        fractions = torch.arange(1, steps + 1, dtype=torch.float64) / n_patches
        return RegionPerturbationResult(
            curve=drops.to(s.x.device), fractions=fractions,
            auc=trapezoid(drops).to(s.x.device), aopc=(drops.sum(1) / (steps + 1)).to(s.x.device))


@register_metric(family="faithfulness", direction="lower", needs=("model",),
                 returns="CurveResult (curve and area per sample)",
                 axes=("fraction of patches replaced, most relevant first",
                       "class probability", "linear"))
def selectivity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    patch_size: int = 8,
    baseline: Baseline = "black",
    uniform_range: tuple[float, float] | None = None,
    softmax: bool = True,
    abs: bool = False,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> CurveResult:
    """Selectivity (Montavon et al., Digital Signal Processing 2018): the area under the score
    as the most relevant patches are replaced one after another.

    As Quantus' ``Selectivity``. Patches (tiled as in :func:`region_perturbation`) are replaced
    cumulatively in order of their summed relevance, most relevant first, until all are gone;
    the curve holds the target's score after each removal (the clean input is not a point) and
    the score is the trapezoid under it with unit spacing (Quantus' AUC). A selective map makes
    the score fall at once: lower is better.

    Differences from Quantus 0.6 are those of :func:`region_perturbation` (``"mean"`` and
    ``"uniform"`` replacements, ties); its direction (lower) is right here.

    Args:
        patch_size: side of the square patches (Quantus: 8).
        baseline, uniform_range: replacement, as in :func:`region_perturbation` (Quantus:
            ``"black"``).
        softmax: probabilities (Quantus' default) or logits.
        abs, normalise: attribution preprocessing (only the order matters).
        sampling: as in :func:`region_perturbation` (draws only with ``baseline="uniform"``).

    Returns:
        :class:`~srdxai.metrics.CurveResult`: ``curve`` (N, P) over all P patches,
        ``fractions`` (P,) = k / P, ``auc`` (N,). P forward passes per sample.
    """
    sampling = sampling_of(sampling, options, "selectivity")
    patch_size = check_positive_int(patch_size, "patch_size")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="selectivity")
        a = preprocess_attributions(s.a, normalise, abs)
        replacement = _replacement(s, baseline, uniform_range, sampling, "selectivity")
        scores, n_patches = _patch_curve(s, a, patch_size, None, "morf", replacement, softmax,
                                         sampling.progress, "selectivity")
        fractions = torch.arange(1, n_patches + 1, dtype=torch.float64) / n_patches
        return CurveResult(curve=scores.to(s.x.device), fractions=fractions,
                           auc=trapezoid(scores).to(s.x.device))


# --- IROF -----------------------------------------------------------------------------------

def _slic_segments(x: Tensor) -> Tensor:
    """Quantus' superpixels: scikit-image's ``slic`` with its default parameters (100
    segments, compactness 10, 10 iterations, connectivity enforced, Lab for 3 channels) on
    each (H, W, C) float64 image, labels from 0."""
    from skimage.segmentation import slic

    images = x.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    return torch.stack([torch.from_numpy(np.asarray(slic(image, start_label=0), np.int64))
                        for image in images])


def _check_segments(segments: Any, s: MetricInputs) -> Tensor:
    labels = to_tensor(segments, "segments")
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (s.n, *s.x.shape[-2:]):
        raise InvalidInputError(
            f"segments must be (N, H, W) = {(s.n, *s.x.shape[-2:])} labels; got "
            f"{tuple(labels.shape)}.")
    if labels.is_floating_point():
        if not (torch.isfinite(labels).all() and torch.equal(labels, labels.round())):
            raise InvalidInputError("segments must hold integer labels.")
    elif labels.dtype == torch.bool:
        raise InvalidInputError("segments must hold integer labels, got booleans.")
    return labels.to(torch.int64)


@register_metric(family="faithfulness", direction="higher", needs=("model",),
                 returns="IROFResult (curve and area over it per sample)",
                 axes=("superpixels replaced, most relevant first",
                       "class probability relative to the clean image", "linear"))
def irof(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    segments: Any = None,
    baseline: Baseline = "mean",
    softmax: bool = True,
    abs: bool = False,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> IROFResult:
    """IROF (Rieger and Hansen, 2020): the area over the relative score as the most relevant
    superpixels are replaced one after another.

    Iterative Removal Of Features, as Quantus' ``IROF``. The image is cut into superpixels
    (scikit-image's SLIC with Quantus' parameters, or the given ``segments``); segments are
    ranked by the mean relevance of their pixels and replaced cumulatively, most relevant first,
    by the baseline (the sample's mean). The curve is the target's score relative to the clean
    score, ``f_y(x_k) / f_y(x)`` for k = 1..S; the score is Quantus' area over it,
    ``S - trapezoid(curve)`` (unit spacing). A map whose first segments matter makes the curve
    fall early: higher is better.

    Differences from Quantus 0.6: its ``"mean"`` (and ``"black"``, ``"white"``) baseline is
    computed over the whole batch of the already perturbed images, so a sample's score depends
    on the other samples and drifts from step to step (ours: each sample's own mean of its
    clean image); samples with fewer segments than the batch's largest count get a curve
    padded with zeros whose last trapezoid (``curve[S_i - 1] / 2``) is subtracted too (ours:
    each sample's own curve); ties in the ranking go to the lower label. Quantus 0.6 also
    refuses inputs with more than one channel (its segment mask is (N, 1, H, W) and the
    replacement asserts the input's shape) and calls ``np.trapz``, which numpy 2.4 no longer
    has.

    Args:
        segments: (N, H, W) integer labels of your own segmentation; default SLIC per image.
            Every sample needs at least two segments.
        baseline: replacement value: ``"mean"`` (Quantus' default), a number, ``"black"``,
            ``"white"``, ``"zero"``, ``"blur"`` or a tensor broadcasting to x.
        softmax: probabilities (Quantus' default, and what the ratio to the clean score is
            meant for) or logits. A sample whose clean score is 0 has a NaN curve and score.
        abs, normalise: attribution preprocessing (only the order matters).
        sampling: batch size and progress (:class:`~srdxai.metrics.Sampling`; its fields may be
            given as keywords instead); IROF draws nothing.

    Returns:
        :class:`IROFResult`: ``curve`` (N, S), ``n_segments``, ``segments``, ``aoc`` (N,).
        1 + S_i forward passes per sample (S_i: its number of segments).
    """
    sampling = sampling_of(sampling, options, "irof")
    sampling.refuse_draws("irof", "it is deterministic and draws nothing")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size, metric="IROF")
        a = pixel_map(preprocess_attributions(s.a, normalise, abs)).flatten(1)
        labels = _slic_segments(s.x) if segments is None else _check_segments(segments, s)
        # relabel every sample's segments 0..S_i-1 (in the order of the given labels)
        dense = torch.empty_like(labels.flatten(1))
        counts = []
        for i in range(s.n):
            values, inverse = labels[i].flatten().unique(return_inverse=True)
            dense[i] = inverse
            counts.append(values.numel())
        n_segments = torch.tensor(counts)
        if (n_segments < 2).any():
            raise InvalidInputError(
                f"IROF needs at least two segments per image; samples "
                f"{(n_segments < 2).nonzero().flatten().tolist()} have one (SLIC merges "
                "flat or noise-like images into one superpixel): pass segments=.")
        widest = int(n_segments.max())
        dense = dense.to(s.x.device)
        sums = torch.zeros(s.n, widest, dtype=torch.float64, device=s.x.device)
        sizes = torch.zeros(s.n, widest, dtype=torch.float64, device=s.x.device)
        sums.scatter_add_(1, dense, a.to(s.x.device))
        sizes.scatter_add_(1, dense, torch.ones_like(a, device=s.x.device))
        means = torch.where(sizes > 0, sums / sizes.clamp(min=1), -math.inf)  # pad last
        rank = descending_ranks(means)
        rank_of_pixel = rank.gather(1, dense)  # (N, H*W)
        replacement = baseline_values(baseline, s.x)
        owners = torch.arange(s.n).repeat_interleave(n_segments)
        steps = torch.cat([torch.arange(1, c + 1) for c in counts])
        owners_dev, steps_dev = owners.to(s.x.device), steps.to(s.x.device)
        inputs = RankedInputs(rank_of_pixel, 3, s.x, replacement)

        def perturbed(start: int, stop: int) -> Tensor:
            sample, k = owners_dev[start:stop], steps_dev[start:stop]
            return inputs(sample, k)

        clean = s.clean_scores(softmax).cpu()
        scores = scores_in_batches(s.model, perturbed, s.y, owners.numel(), s.batch_size, softmax,
                                   sampling.progress, "IROF", owners=owners)
        curve = torch.full((s.n, widest), math.nan, dtype=torch.float64)
        reference = clean.masked_fill(clean == 0, math.nan)  # no ratio to a zero score
        curve[owners, steps - 1] = scores / reference[owners]
        aoc = torch.stack([counts[i] - trapezoid(curve[i, :counts[i]]) for i in range(s.n)])
        return IROFResult(curve=curve.to(s.x.device), n_segments=n_segments.to(s.x.device),
                          segments=dense.view(s.n, *s.x.shape[2:]), aoc=aoc.to(s.x.device))
