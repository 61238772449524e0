"""More faithfulness tests (infidelity, monotonicity correlation, sufficiency) and Focus.

* :func:`infidelity` (Yeh et al., NeurIPS 2019): does ``I . a`` predict the output change
  ``f(x) - f(x - I)`` for perturbations ``I`` (square patches set to a baseline, or Gaussian
  noise)?
* :func:`monotonicity_correlation` (Nguyen and Martinez, 2020): do features with larger |a|
  move the output more when they are replaced by random values?
* :func:`sufficiency` (Dasgupta et al., ICML 2022): do samples with similar explanations get
  the same prediction?
* :func:`focus` (Arias-Duart et al., 2022): on a 2x2 mosaic, how much of the positive relevance
  falls on the tiles of the explained class?

Perturbed inputs are built chunk by chunk and scored with
:func:`~srdxai.metrics.common.scores_in_batches` (perturbations of several samples share a
forward pass); random draws are made sample by sample from a CPU generator, so results do not
depend on ``batch_size``. docs/metrics.md gives the definitions and the differences from
Quantus 0.6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Unpack

import torch
from torch import nn

from ..errors import InvalidInputError
from .common import (
    Baseline,
    EmptyMaskPolicy,
    Explain,
    GroupedInputs,
    MaskedInputs,
    MetricInputs,
    Normalise,
    baseline_values,
    check_attributions,
    check_finite_number,
    check_inputs,
    check_masks,
    check_positive_int,
    empty_chunk,
    empty_mask_nan,
    feature_count,
    guarded,
    inverse_order,
    predicted_classes,
    preprocess_attributions,
    scores_in_batches,
    spearman,
    stable_order,
    to_tensor,
)
from .gae import make_mosaics
from .registry import register_metric
from .robustness import BlockDraws
from .sampling import Sampling, SamplingOptions, sampling_of

Tensor = torch.Tensor

__all__ = ["infidelity", "gaussian_noise", "monotonicity_correlation", "sufficiency", "focus",
           "focus_mosaics", "quadrant_masks"]


def _check_explicit_draws(draws: Any, shape: tuple[int | None, ...], layout: str) -> Tensor:
    """Explicit draws as float64, checked against ``shape`` (None: any size >= 1)."""
    explicit = to_tensor(draws, "draws").to(torch.float64)
    if explicit.dim() != len(shape) or any(
            (size is None and got < 1) or (size is not None and got != size)
            for size, got in zip(shape, explicit.shape, strict=True)):
        expected = ", ".join("any" if size is None else str(size) for size in shape)
        raise InvalidInputError(
            f"draws must have shape {layout} = ({expected}); got {tuple(explicit.shape)}.")
    if not torch.isfinite(explicit).all():
        raise InvalidInputError("draws contain NaN or Inf; pass finite values.")
    return explicit


def _expand_map(a: Tensor, x_shape: torch.Size) -> Tensor:
    """A pixel map broadcast over the input's channels (Quantus' reading of a 1-channel map in
    ``I . a``); an element map as it is."""
    return a[:, None].expand(x_shape) if a.dim() == 3 else a


# --- Infidelity -------------------------------------------------------------------------------

def _patch_edges(size: int, patch: int) -> tuple[Tensor, Tensor]:
    """Start and stop (exclusive) of the patches along one axis: a grid of step ``patch``
    centred as Quantus pads it (``floor(pad / 2)`` before, ``ceil(pad / 2)`` after, ``pad`` =
    what is missing for a whole number of patches), cut at the image border."""
    pad = (-size) % patch
    starts = torch.arange(-(pad // 2), size, patch)
    return starts.clamp(min=0), (starts + patch).clamp(max=size)


def _patches(height: int, width: int, sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """All patches of all sizes as (P, 4) rows ``(top, bottom, left, right)`` and their
    weights (P,): each size weighs 1 / len(sizes), shared equally by its patches."""
    rects, weights = [], []
    for size in sizes:
        top, bottom = _patch_edges(height, size)
        left, right = _patch_edges(width, size)
        rows, cols = top.numel(), left.numel()
        rect = torch.stack([top.repeat_interleave(cols), bottom.repeat_interleave(cols),
                            left.repeat(rows), right.repeat(rows)], 1)
        rects.append(rect)
        weights.append(torch.full((rows * cols,), 1.0 / (len(sizes) * rows * cols),
                                  dtype=torch.float64))
    return torch.cat(rects), torch.cat(weights)


def _check_patch_sizes(patch_sizes: Sequence[int] | int) -> list[int]:
    sizes = [patch_sizes] if isinstance(patch_sizes, int) else patch_sizes
    try:
        sizes = list(sizes)
    except TypeError:
        raise InvalidInputError(
            f"patch_sizes must be an int or a sequence of ints, got {patch_sizes!r}.") from None
    if not sizes:
        raise InvalidInputError("patch_sizes must name at least one patch size.")
    return [check_positive_int(p, "each patch size") for p in sizes]


#: torch's CPU normal sampler turns uniforms into normals in groups of this many values
_BOX_MULLER_GROUP = 16


def _box_muller(uniforms: Tensor, std: float, out: Tensor) -> None:
    """Normals ``out`` (G, 2, 8) from ``uniforms`` (G, 2, 8) as torch's CPU sampler pairs them:
    value j of a group of 16 takes ``u1 = 1 - u[j]`` and ``u2 = u[j + 8]``, and
    ``r = sqrt(-2 log u1)``, ``theta = 2 pi u2`` give ``r cos(theta) std`` at j and
    ``r sin(theta) std`` at j + 8 (products in the same order)."""
    radius = torch.log(1 - uniforms[:, 0]).mul_(-2.0).sqrt_()
    theta = uniforms[:, 1].mul(2.0 * math.pi)
    torch.cos(theta, out=out[:, 0]).mul_(radius).mul_(std)
    torch.sin(theta, out=out[:, 1]).mul_(radius).mul_(std)


def gaussian_noise(shape: Sequence[int], std: float, generator: torch.Generator) -> Tensor:
    """float64 noise of ``shape`` drawn from N(0, std^2) with the CPU ``generator``: the draws
    of :func:`infidelity` (``perturbation="gaussian"``), one call per sample.

    The values of ``torch.normal(0.0, std, shape, generator=generator, dtype=torch.float64)``
    to within a few units in the last place (at most 2.6 in 9.8 million values; about 99 % are
    equal), and the generator is left in the same state. The same uniforms are drawn
    (``torch.rand``) and paired as torch's sampler pairs them (Box-Muller in groups of 16, the
    last group of a size that 16 does not divide drawn again, as torch does); the logarithm,
    sine and cosine are torch's vectorised, multi-threaded ones, where torch's sampler computes
    them one value at a time on one thread with the C library's. Why: the draws are most of
    infidelity's work on a small model, and this takes about half the time (1.7 against 3.1 ms
    for 50 x 3x32x32, 2026-12-07, 2-core Intel Xeon). Fewer than 16 values: ``torch.normal``.
    """
    count = math.prod(shape)
    if count < _BOX_MULLER_GROUP:
        return torch.normal(0.0, std, tuple(shape), generator=generator, dtype=torch.float64)
    uniforms = torch.rand(count, generator=generator, dtype=torch.float64)
    whole = count - count % _BOX_MULLER_GROUP
    out = torch.empty(count, dtype=torch.float64)
    _box_muller(uniforms[:whole].view(-1, 2, 8), std, out[:whole].view(-1, 2, 8))
    if whole < count:  # torch draws 16 more uniforms for the last 16 values
        tail = torch.rand(_BOX_MULLER_GROUP, generator=generator, dtype=torch.float64)
        _box_muller(tail.view(1, 2, 8), std, out[count - _BOX_MULLER_GROUP:].view(1, 2, 8))
    return out.view(tuple(shape))


@register_metric(family="faithfulness", direction="lower", needs=("model",))
def infidelity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    perturbation: Literal["patches", "gaussian"] = "patches",
    patch_sizes: Sequence[int] | int = (4,),
    baseline: Baseline = "black",
    nr_samples: int = 10,
    noise_std: float = 0.1,
    optimal_scale: bool = False,
    softmax: bool = False,
    abs: bool = False,
    normalise: Normalise = None,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Infidelity (Yeh et al., NeurIPS 2019): the expected squared error of the map's
    prediction of the output change under perturbations.

    ``INFD = E_I[(I . a - (f_y(x) - f_y(x - I)))^2]`` over a distribution of perturbations
    ``I`` (lower is better). A pixel map multiplies every channel of ``I``. Two distributions:

    * ``"patches"`` (default; Quantus' ``Infidelity``, Yeh et al.'s square removal): for each
      size p in ``patch_sizes``, every patch of a p x p grid is set to ``baseline`` on all
      channels, one patch at a time (``I = x - x_patch``). The grid is centred as Quantus pads
      it, with border patches cut at the image edge when p does not divide H or W. The
      expectation is exact: the mean over the patches of a size, then over the sizes. Random
      draws are not used.
    * ``"gaussian"`` (Captum's documented perturbation): ``nr_samples`` draws of
      ``I ~ N(0, noise_std^2)`` on every element, ``x - I`` scored.

    ``optimal_scale=True`` first rescales the map by the least-squares factor
    ``beta = E[(I . a) d] / E[(I . a)^2]`` (Yeh et al.'s code, Captum's ``normalize=True``), so
    the score no longer depends on the map's scale.

    **Differences from Quantus 0.6**: Quantus never restores the image between patches: patch k
    is removed on top of patches 1..k-1, so its perturbations are the growing prefixes of a
    raster sweep ending with the whole image removed, not single patches; and it crashes
    (a reshape error) when a patch size does not divide H and W. Its ``n_perturb_samples``
    repeats the same deterministic sweep (no draws), so it only multiplies the cost. With a
    non-cumulative perturbation function, Quantus gives our value
    (tests/test_metrics_quantus_attribution_tests.py).

    Args:
        perturbation: ``"patches"`` or ``"gaussian"``.
        patch_sizes: patch sides in pixels (an int or a sequence; Quantus' default ``[4]``).
        baseline: value of removed patches: a number, "black" (Quantus' default: the sample's
            minimum), "white", "mean", "zero", "blur" or a tensor broadcasting to x.
        nr_samples: Gaussian draws per sample (Captum's default 10).
        noise_std: standard deviation of the Gaussian noise, in model input units.
        optimal_scale: rescale the map optimally first (see above).
        softmax: score the softmax probability instead of the logit (Quantus: logits).
        abs, normalise: attribution preprocessing (per sample; Quantus: none).
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`).
            ``draws`` (Gaussian only): float noise ``I`` of shape
            ``(N, nr_samples, C, H, W)``, sample-major as Captum's ``repeat_interleave``;
            overrides ``nr_samples``.

    Returns:
        float64 (N,) >= 0. Forward passes per sample: 1 + the number of patches
        (``sum_p ceil(H / p) * ceil(W / p)`` with centring) or 1 + ``nr_samples``.
    """
    sampling = sampling_of(sampling, dict(options), "infidelity")
    if perturbation not in ("patches", "gaussian"):
        raise InvalidInputError(
            f"perturbation must be 'patches' or 'gaussian', got {perturbation!r}.")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="infidelity")
        a = _expand_map(preprocess_attributions(s.maps, normalise, abs), s.x.shape)
        x64 = s.x.to(torch.float64)
        _, _, height, width = s.x.shape
        if perturbation == "patches":
            if sampling.draws is not None:
                raise InvalidInputError(
                    "infidelity: draws= are Gaussian noise, but perturbation='patches' draws "
                    "nothing (every patch is used); pass perturbation='gaussian' or no draws.")
            sizes = _check_patch_sizes(patch_sizes)
            rects, weights = _patches(height, width, sizes)
            rects = rects.to(s.x.device)
            per = rects.shape[0]
            base = baseline_values(baseline, s.x)
            # I . a for every patch: the sum over the patch of sum_c a * (x - baseline)
            gain = (a * (x64 - base.to(torch.float64))).sum(1)  # (N, H, W)
            row_ids = torch.arange(height, device=s.x.device)
            col_ids = torch.arange(width, device=s.x.device)
            in_rows = (row_ids >= rects[:, :1]) & (row_ids < rects[:, 1:2])  # (P, H)
            in_cols = (col_ids >= rects[:, 2:3]) & (col_ids < rects[:, 3:4])  # (P, W)
            sums = torch.einsum("nhw,ph,pw->np", gain, in_rows.to(torch.float64),
                                in_cols.to(torch.float64)).cpu()

            # the patches' masks (k, 1, H, W), built for the patches asked for: thousands of
            # small patches of a large image are not all kept at once
            inputs = MaskedInputs(
                per, lambda patch: (in_rows[patch][:, :, None] & in_cols[patch][:, None, :])
                [:, None], s.x, base)

            def perturbed(start: int, stop: int) -> Tensor:
                return inputs.grid(start, stop)
        else:
            std = check_finite_number(noise_std, "noise_std", positive=True)
            shape = s.x.shape[1:]
            if sampling.draws is None:
                per = check_positive_int(nr_samples, "nr_samples")
                generator = sampling.make_generator()
                # drawn scaled, as ``torch.normal(0, std)`` (the values of ``torch.randn(...)
                # * std``: ATen draws a normal as ``z * std + mean``) to within a few units in
                # the last place, in about half its time
                source = BlockDraws(per, lambda: gaussian_noise((per, *shape), std, generator))
            else:
                explicit = _check_explicit_draws(sampling.draws, (s.n, None, *shape),
                                                 "(N, nr_samples, C, H, W)")
                per = explicit.shape[1]
                source = BlockDraws(per, None, explicit)
            weights = torch.full((per,), 1.0 / per, dtype=torch.float64)
            sums = torch.empty(s.n * per, dtype=torch.float64)
            a64 = a.flatten(1).to(torch.float64)

            def perturbed(start: int, stop: int) -> Tensor:
                out, _ = empty_chunk(stop - start, s.x.shape, s.x)
                at = start
                # a block of draws is one sample's: each part is a run of that sample's rows,
                # taken with its map and image by broadcasting (no per-row gathers)
                for sample, noise in source.parts(start, stop):
                    noise = noise.to(s.x.device)
                    rows = slice(at - start, at - start + noise.shape[0])
                    # I . a per row: one matrix-vector product (no (rows, C, H, W) product)
                    sums[at:at + noise.shape[0]] = torch.mv(noise.flatten(1), a64[sample]).cpu()
                    # x - I in float64, rounded once into the chunk (channels-last, as
                    # scores_in_batches gives the model)
                    torch.sub(x64[sample], noise, out=out[rows])
                    at += noise.shape[0]
                return out

        clean = s.clean_scores(softmax)
        scores = scores_in_batches(s.model, perturbed, s.y, s.n * per, s.batch_size, softmax,
                                   sampling.progress, "infidelity", per_sample=per)
        change = clean[:, None] - scores.view(s.n, per)
        sums = sums.view(s.n, per)
        if optimal_scale:
            energy = (weights * sums * sums).sum(1, keepdim=True)
            beta = (weights * sums * change).sum(1, keepdim=True) / torch.where(
                energy > 0, energy, torch.ones_like(energy))
            sums = sums * beta
        return ((sums - change) ** 2 * weights).sum(1).to(s.x.device)


# --- Monotonicity correlation ----------------------------------------------------------------

def _ascending_groups(a: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Each flattened map sorted by ascending value (ties keep index order) and cut into
    groups of ``size``: the features in that order (N, F), and each feature's group (N, F)."""
    order = stable_order(a.flatten(1))
    return order, inverse_order(order) // size


@register_metric(family="faithfulness", direction="higher", needs=("model",))
def monotonicity_correlation(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_samples: int = 100,
    features_in_step: int = 1,
    baseline: Baseline = "uniform",
    uniform_low: float = 0.0,
    uniform_high: float = 1.0,
    softmax: bool = True,
    abs: bool = True,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Monotonicity correlation (Nguyen and Martinez, 2020): Spearman's correlation of the
    attributions with how much replacing each feature moves the output.

    As Quantus' ``MonotonicityCorrelation``. The features are sorted by ascending attribution
    and cut into groups of ``features_in_step``. For each group, ``nr_samples`` times, all its
    features are set to one value drawn from ``U(uniform_low, uniform_high)`` (one value per
    group and draw, as Quantus) and the squared change of the target's score is recorded; its
    mean over the draws (the "variance" of the paper, taken around f_y(x)) is correlated, with
    Spearman's rank correlation, with the group's attribution sum. Higher is better. Quantus
    divides the variances by f_y(x)^2, a per-sample constant Spearman ignores, so ``eps`` is not
    needed. With a deterministic ``baseline`` (a number, "black", ...) every draw would be the
    same input: one forward pass per group is made instead of ``nr_samples``.

    A pixel map's feature is a pixel (all channels get the value); Quantus 0.6 reads maps as
    broadcast over channels, so pass the map expanded to (N, C, H, W) to reproduce it. Ties in
    the ordering keep index order (numpy's quicksort leaves them unspecified; with
    ``features_in_step=1`` ties only decide which draw goes to which tied feature).

    Args:
        nr_samples: draws per group (Quantus' default 100).
        features_in_step: features per group (a partial last group is allowed; Quantus needs
            it to divide H*W).
        baseline: ``"uniform"`` (Quantus' default) or a deterministic replacement value (see
            :func:`~srdxai.metrics.faithfulness_correlation`).
        uniform_low, uniform_high: the uniform distribution (Quantus' 0 and 1).
        softmax: probabilities (Quantus' default) or logits.
        abs, normalise: attribution preprocessing (Quantus: ``abs=True``, max-normalised).
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`).
            ``draws``: float values ``(N, groups, nr_samples)``, group g in ascending
            attribution order; overrides ``nr_samples``.

    Returns:
        float64 correlations (N,) in [-1, 1]; NaN when the attributions or the changes are
        constant. Forward passes per sample: 1 + ``ceil(F / features_in_step) * nr_samples``
        (1 + groups with a deterministic baseline).
    """
    sampling = sampling_of(sampling, dict(options), "monotonicity_correlation")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="monotonicity_correlation")
        a = preprocess_attributions(s.maps, normalise, abs)
        n_features = feature_count(a)
        step = check_positive_int(features_in_step, "features_in_step")
        groups = math.ceil(n_features / step)
        order, group_of = _ascending_groups(a, step)  # (N, F) each
        group_sums = torch.zeros(s.n, groups, dtype=torch.float64, device=a.device)
        group_sums.scatter_add_(1, group_of, a.flatten(1))
        uniform = isinstance(baseline, str) and baseline == "uniform"
        if uniform:
            low = check_finite_number(uniform_low, "uniform_low")
            high = check_finite_number(uniform_high, "uniform_high")
            if high <= low:
                raise InvalidInputError(
                    f"uniform_high ({high}) must be larger than uniform_low ({low}).")
            if sampling.draws is None:
                runs = check_positive_int(nr_samples, "nr_samples")
                generator = sampling.make_generator()
                source = BlockDraws(groups * runs, lambda: torch.rand(
                    groups * runs, generator=generator, dtype=torch.float64) * (high - low) + low)
            else:
                explicit = _check_explicit_draws(sampling.draws, (s.n, groups, None),
                                                 "(N, groups, nr_samples)")
                runs = explicit.shape[2]
                source = BlockDraws(groups * runs, None,
                                    explicit.reshape(s.n, groups * runs))
            base = None
        else:
            if sampling.draws is not None:
                raise InvalidInputError(
                    "monotonicity_correlation: draws= are uniform replacement values, but "
                    f"baseline={baseline!r} is deterministic; pass baseline='uniform' or no "
                    "draws.")
            runs = 1
            base = baseline_values(baseline, s.x)
        per = groups * runs

        # group g: the features of ranks g*step .. (g+1)*step - 1 in ascending order
        inputs = GroupedInputs(order, step, a.dim(), s.x, base)

        def perturbed(start: int, stop: int) -> Tensor:
            flat = torch.arange(start, stop, device=s.x.device)
            sample, group = flat // per, (flat % per) // runs
            if base is None:
                values = source.rows(start, stop).to(device=s.x.device, dtype=s.x.dtype)
                return inputs(sample, group, values)
            return inputs(sample, group)

        clean = s.clean_scores(softmax)
        scores = scores_in_batches(s.model, perturbed, s.y, s.n * per, s.batch_size, softmax,
                                   sampling.progress, "monotonicity correlation",
                                   per_sample=per)
        variance = ((scores.view(s.n, groups, runs) - clean[:, None, None]) ** 2).mean(2)
        return spearman(group_sums.cpu(), variance).to(s.x.device)


# --- Sufficiency ------------------------------------------------------------------------------

DISTANCES = ("seuclidean", "euclidean", "cityblock")


def _distances(a: Tensor, distance: str) -> Tensor:
    """(N, N) pairwise distances of the rows of ``a`` (float64), as scipy's ``cdist``; for
    "seuclidean" each feature is divided by its standard deviation over the batch, and features
    that are the same in every map (variance 0) are left out (scipy divides 0 by 0 there). The
    variance's ddof does not matter: it scales every distance alike."""
    if distance == "seuclidean":
        keep = (a != a[:1]).any(0)
        variance = a[:, keep].var(0, unbiased=False)
        a = a[:, keep] / torch.where(variance > 0, variance, torch.ones_like(variance)).sqrt()
    if a.shape[1] == 0:
        return torch.zeros(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
    p = 1.0 if distance == "cityblock" else 2.0
    return torch.cdist(a[None], a[None], p=p, compute_mode="donot_use_mm_for_euclid_dist")[0]


@register_metric(family="faithfulness", direction="higher", needs=("model",))
def sufficiency(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    threshold: float = 0.6,
    distance: Literal["seuclidean", "euclidean", "cityblock"] = "seuclidean",
    abs: bool = True,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Sufficiency (Dasgupta et al., ICML 2022): the share of the samples explained alike
    that get the same prediction.

    As Quantus' ``Sufficiency``. The maps (preprocessed, flattened) are compared pairwise with
    ``distance``; distances are divided by the largest one of the batch, and sample j counts as
    explained alike by sample i when their distance is at most ``threshold``. The score of i is
    the fraction of those j != i whose predicted class equals i's. A batch-level metric: a
    sample's score depends on the other samples of the call (not on ``batch_size``). ``y``
    chooses the explained class when maps are computed with ``explain``; the score compares
    predicted classes.

    **Differences from Quantus 0.6**: (1) a sample with no other sample within the threshold
    scores NaN (the fraction is undefined; Quantus returns 0). (2) With "seuclidean", a
    feature that is the same in every map (e.g. a border where every map is 0) has variance 0;
    scipy then divides 0 by 0 and every distance becomes NaN, so Quantus scores every sample
    0; we leave such features out (they add 0 to every distance). (3) Quantus compares samples
    only within its evaluation batches (``batch_size=64``); we compare all samples of the call.
    (4) Maps are normalised per sample (Quantus: over the batch, which with "seuclidean" and
    the distance normalisation changes nothing).

    Args:
        threshold: largest normalised distance at which explanations count as alike
            (Quantus' 0.6).
        distance: "seuclidean" (Quantus' default, standardised Euclidean with the variance of
            each feature over the batch), "euclidean" or "cityblock".
        abs, normalise: attribution preprocessing (Quantus: ``abs=True``, max-normalised).
        sampling: batch size and progress (:class:`~srdxai.metrics.Sampling`).

    Returns:
        float64 (N,) in [0, 1]; NaN for a sample without alike samples. Forward passes: one
        per sample (the predictions).
    """
    sampling = sampling_of(sampling, dict(options), "sufficiency")
    threshold = check_finite_number(threshold, "threshold")
    if distance not in DISTANCES:
        raise InvalidInputError(f"distance must be one of {', '.join(DISTANCES)}; got "
                                f"{distance!r}.")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="sufficiency")
        predicted = (s.y if y is None else
                     predicted_classes(s.model, s.x, s.batch_size, "sufficiency"))
        a = preprocess_attributions(s.maps, normalise, abs).flatten(1).to(torch.float64)
        d = _distances(a, distance)
        largest = d.max()
        d = d / largest if largest > 0 else d
        alike = d <= threshold
        alike.fill_diagonal_(False)
        same = predicted[:, None] == predicted[None, :]
        count = alike.sum(1)
        agree = (alike & same).sum(1).to(torch.float64)
        return torch.where(count > 0, agree / count.clamp(min=1),
                           torch.full_like(agree, math.nan))


# --- Focus ------------------------------------------------------------------------------------

def quadrant_masks(quadrants: Any, height: int, width: int) -> Tensor:
    """(N, H, W) bool masks of the flagged quadrants of an H x W mosaic.

    ``quadrants`` (N, 4) flags in :func:`~srdxai.metrics.make_mosaics`' tile order (top-left,
    top-right, bottom-left, bottom-right; Quantus' ``custom_batch`` order); the split is at
    ``H // 2`` and ``W // 2`` (Quantus').
    """
    q = to_tensor(quadrants, "quadrants")
    if q.dim() != 2 or q.shape[1] != 4:
        raise InvalidInputError(
            f"quadrants must have shape (N, 4) (flags for top-left, top-right, bottom-left, "
            f"bottom-right); got {tuple(q.shape)}.")
    if q.dtype != torch.bool:
        if q.is_floating_point() and not torch.isfinite(q).all():
            raise InvalidInputError("quadrants contain NaN or Inf.")
        if not ((q == 0) | (q == 1)).all():
            raise InvalidInputError("quadrants must hold 0/1 or bool flags.")
        q = q != 0
    height = check_positive_int(height, "height", 2)
    width = check_positive_int(width, "width", 2)
    bottom = torch.arange(height, device=q.device) >= height // 2
    right = torch.arange(width, device=q.device) >= width // 2
    tile = bottom[:, None].long() * 2 + right[None, :].long()  # (H, W) in 0..3
    return q[:, tile]


def focus_mosaics(images: Any, labels: Any, targets: Any) -> tuple[Tensor, Tensor]:
    """Mosaics for :func:`focus` and the quadrants holding each mosaic's target class.

    ``images`` (4M, C, h, w) in groups of four consecutive images (tile order of
    :func:`~srdxai.metrics.make_mosaics`), ``labels`` (4M,) their classes, ``targets`` (M,) the
    class each mosaic is explained for (Arias-Duart et al. use two tiles of the target class
    and two of other classes). Returns ``(mosaics (M, C, 2h, 2w), quadrants (M, 4) bool)``;
    pass them as ``focus(model, mosaics, targets, explain=..., quadrants=quadrants)``.
    """
    x = to_tensor(images, "images")
    if x.dim() != 4 or x.shape[0] == 0 or x.shape[0] % 4:
        raise InvalidInputError(
            f"images must have shape (4M, C, h, w) with M >= 1; got {tuple(x.shape)}.")
    m = x.shape[0] // 4
    tile_labels = to_tensor(labels, "labels").reshape(-1)
    goal = to_tensor(targets, "targets").reshape(-1)
    if tile_labels.numel() != 4 * m or goal.numel() != m:
        raise InvalidInputError(
            f"labels must hold {4 * m} classes (one per image) and targets {m} (one per "
            f"mosaic); got {tile_labels.numel()} and {goal.numel()}.")
    quadrants = tile_labels.view(m, 4).to(goal.device) == goal[:, None]
    return make_mosaics(x), quadrants.to(x.device)


@register_metric(family="localisation", direction="higher", needs=("masks",))
def focus(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    quadrants: Any = None,
    abs: bool = False,
    normalise: Normalise = True,
    empty_mask: EmptyMaskPolicy = "nan",
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Focus (Arias-Duart et al., FUZZ-IEEE 2022): the share of the positive relevance on a
    2x2 mosaic that falls on the tiles of the explained class.

    As Quantus' ``Focus``: ``sum(relu(a) * mask) / (sum(relu(a)) + 1e-9)`` with ``mask`` the
    target-class tiles. ``x`` holds the mosaics (build them with :func:`focus_mosaics` or
    :func:`~srdxai.metrics.make_mosaics`), ``y`` the class explained on each. The tiles are
    given either as ``masks`` ((N, H, W) binary, any region) or as ``quadrants`` ((N, 4) flags
    in tile order top-left, top-right, bottom-left, bottom-right, Quantus' ``custom_batch``;
    split at ``H // 2``, ``W // 2``). Element maps take ``relu`` per element, the mask covering
    every channel.

    **Differences from Quantus 0.6**: a map without positive relevance scores NaN (the share
    is undefined; Quantus returns 0 through its 1e-9), and so does a mosaic without a
    target-class tile (``empty_mask="nan"``; Quantus returns 0). Maps are normalised per sample
    (the ratio is scale-free up to the 1e-9).

    Args:
        quadrants: (N, 4) 0/1 or bool flags, instead of ``masks``.
        abs: take |a| first (Quantus: False).
        normalise: per-sample normalisation (Quantus: max).
        empty_mask: ``"nan"`` scores a sample without target tiles NaN, ``"raise"`` raises.
        sampling: batch size and progress (:class:`~srdxai.metrics.Sampling`); only used
            when the maps are computed with ``explain``.

    Returns:
        float64 (N,) in [0, 1]. No forward pass when ``attributions`` are given (else one
        ``explain`` call).
    """
    sampling = sampling_of(sampling, dict(options), "focus")
    if masks is not None and quadrants is not None:
        raise InvalidInputError("focus: pass the target tiles as masks= or as quadrants=, not "
                                "both.")
    if masks is None and quadrants is None:
        raise InvalidInputError(
            "focus needs the mosaics' target-class tiles: masks= (binary (N, H, W) masks) or "
            "quadrants= ((N, 4) flags for top-left, top-right, bottom-left, bottom-right).")
    if attributions is not None:
        x_checked = check_inputs(x, model) if x is not None else None
        a = check_attributions(attributions, x_checked)
    else:
        with guarded(model):
            a = MetricInputs(model, x, y, None, explain, sampling.batch_size,
                                      metric="focus").maps
    if quadrants is not None:
        tiles = quadrant_masks(quadrants, a.shape[-2], a.shape[-1]).to(a.device)
        if tiles.shape[0] != a.shape[0]:
            raise InvalidInputError(
                f"quadrants hold {tiles.shape[0]} rows but there are {a.shape[0]} maps.")
    else:
        tiles = check_masks(masks, a)
    a = preprocess_attributions(a, normalise, abs).clamp_min(0)
    inside_mask = tiles[:, None].expand_as(a) if a.dim() == 4 else tiles
    inside = (a * inside_mask).flatten(1).sum(1)
    total = a.flatten(1).sum(1)
    share = torch.where(total > 0, inside / (total + 1e-9), torch.full_like(total, math.nan))
    return empty_mask_nan(share, tiles, empty_mask)
