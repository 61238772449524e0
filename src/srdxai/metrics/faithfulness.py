"""Faithfulness metrics: does removing what the map calls important change the output?

Every perturbed input is built chunk by chunk and scored in batched forward passes of at most
``batch_size`` images; there is no Python loop over perturbation steps. A pixel map's feature is
a pixel (all its channels are replaced), an element map's feature is one input value.
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
    MaskedInputs,
    MetricInputs,
    Normalise,
    RankedInputs,
    baseline_values,
    channels_last_rows,
    check_positive_int,
    constant_per_sample,
    descending_ranks,
    feature_count,
    feature_units,
    guarded,
    inverse_order,
    pearson,
    pixel_map,
    preprocess_attributions,
    replaced_rows,
    replacement_at,
    scores_in_batches,
    select_per_sample,
    spearman,
    to_tensor,
    trapezoid,
)
from .registry import register_metric
from .sampling import Sampling, SamplingOptions, sampling_of

Tensor = torch.Tensor

__all__ = [
    "CurveResult",
    "SensitivityNResult",
    "faithfulness_correlation",
    "faithfulness_correlations",
    "mu_fidelity",
    "monotonicity",
    "completeness",
    "random_subsets",
    "pixel_flipping",
    "insertion",
    "deletion",
    "sensitivity_n",
    "random_permutations",
    "sensitivity_n_grid",
]


@dataclass(frozen=True)
class CurveResult:
    """A perturbation curve per sample and its area.

    Attributes:
        curve: (N, T) class scores along the curve.
        fractions: (T,) the fraction of features perturbed at each point.
        auc: (N,) the area under each curve (see the metric for its x axis).
    """

    curve: Tensor
    fractions: Tensor
    auc: Tensor


@dataclass(frozen=True)
class SensitivityNResult:
    """Sensitivity-n curves.

    Attributes:
        curve: (N, G) Pearson correlation per sample and subset size.
        n_grid: (G,) the subset sizes n (features).
    """

    curve: Tensor
    n_grid: Tensor

    @property
    def mean_curve(self) -> Tensor:
        """The curve averaged over samples (NaN samples skipped), as Ancona et al. plot it."""
        return torch.nanmean(self.curve, dim=0)


# --- faithfulness correlation ---------------------------------------------------------------

def random_subsets(n_samples: int, n_features: int, nr_runs: int, subset_size: int,
                   generator: torch.Generator) -> Tensor:
    """The draws of :func:`faithfulness_correlation`: (N, nr_runs, subset_size) feature indices,
    each row a uniform subset without replacement.

    Drawn sample by sample as the ``subset_size`` largest of ``nr_runs x n_features`` uniform
    keys, so the draws depend only on the generator's state, not on batch sizes.
    """
    rows = []
    for _ in range(n_samples):
        keys = torch.rand(nr_runs, n_features, generator=generator)
        rows.append(keys.topk(subset_size, dim=1).indices)
    return torch.stack(rows)


@register_metric(family="faithfulness", direction="higher", needs=("model",),
                 rows=("fidelity", "fidelity[*"))
def faithfulness_correlation(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_runs: int = 100,
    subset_size: int | float = 224,
    baseline: Baseline = "black",
    softmax: bool = False,
    abs: bool = False,
    normalise: Normalise = True,
    correlation: Correlation = "pearson",
    cell: int = 1,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Faithfulness correlation (Bhatt et al., IJCAI 2020; "Fid." in SRD's table).

    For each of ``nr_runs`` random subsets S of ``subset_size`` features, set S to the baseline
    and record ``sum_S a`` and ``f_y(x) - f_y(x_S)``; the score is the Pearson correlation of
    the two over the runs. Quantus' defaults: 100 runs, 224 features, the "black" baseline (the
    sample's minimum value), logits.

    Args:
        nr_runs: random subsets per sample.
        subset_size: features per subset (pixels for (N, H, W) maps, elements for
            (N, C, H, W) maps; Quantus 0.6 always draws elements; pass the map expanded to
            (N, C, H, W) to reproduce it), or a float in (0, 1): that fraction of the
            features, rounded (at least 1).
        correlation: ``"pearson"`` (Bhatt et al., Quantus) or ``"spearman"`` (xplique).
        cell: features are square cells of ``cell x cell`` pixels (the last row and column
            of cells may be smaller) instead of single pixels; a cell's attribution is the
            map's sum over it (and over channels), removing it sets all its pixels and
            channels to the baseline. 1 (default): pixels, or elements of an element map.
        baseline: replacement value: a number, "black", "white", "mean", "zero", "blur" or a
            tensor broadcasting to x.
        softmax: score the softmax probability instead of the logit.
        abs, normalise: attribution preprocessing (per sample).
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`;
            its fields may be given as keywords instead). ``draws``: explicit subsets
            (N, nr_runs, subset_size) of feature indices, e.g. the ones Quantus drew; they
            override ``nr_runs``/``subset_size``/``seed`` (see :func:`random_subsets`).
            ``batch_size``: perturbed images per forward pass (default: 2 Mi input elements per
            chunk on a CPU, e.g. 13 images at 3x224x224; 32 Mi on a GPU).

    Returns:
        float64 correlations (N,) in [-1, 1]; NaN when the output or the sums do not vary.
    """
    sampling = sampling_of(sampling, options, "faithfulness_correlation")
    reading = {"abs": abs, "normalise": normalise, "correlation": correlation}
    return faithfulness_correlations(
        model, x, y, attributions, masks, explain, readings={"": reading}, nr_runs=nr_runs,
        subset_size=subset_size, baseline=baseline, softmax=softmax, cell=cell,
        sampling=sampling)[""]


def faithfulness_correlations(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    readings: dict[str, dict[str, Any]],
    nr_runs: int = 100,
    subset_size: int | float = 224,
    baseline: Baseline = "black",
    softmax: bool = False,
    cell: int = 1,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> dict[str, Tensor]:
    """:func:`faithfulness_correlation` read several ways from the same perturbed inputs.

    ``readings`` maps a name to the map-side options ``abs``, ``normalise`` and
    ``correlation`` (defaults False, True, ``"pearson"``); they do not change which inputs are
    scored, so all readings share one set of draws and forward passes. Returns the scores by
    name. The other arguments are :func:`faithfulness_correlation`'s.
    """
    sampling = sampling_of(sampling, options, "faithfulness_correlations")
    draws = sampling.draws
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="faithfulness correlation")
        if not readings:
            raise InvalidInputError("readings must name at least one way to read the drops.")
        allowed = {"abs", "normalise", "correlation"}
        for name, options in readings.items():
            if not isinstance(options, dict) or set(options) - allowed:
                raise InvalidInputError(
                    f"reading {name!r} may set only {', '.join(sorted(allowed))}; got "
                    f"{options!r}.")
        correlate = {name: _correlation(r.get("correlation", "pearson"))
                     for name, r in readings.items()}
        maps = {name: preprocess_attributions(s.a, r.get("normalise", True), r.get("abs", False))
                for name, r in readings.items()}
        cell = check_positive_int(cell, "cell")
        cells = None
        if cell > 1:
            for name, a in maps.items():
                cells, maps[name] = _cells(a, cell)
        a = next(iter(maps.values()))
        n_features = a.shape[1] if cells is not None else feature_count(a)
        if draws is None:
            nr_runs = check_positive_int(nr_runs, "nr_runs", 2)
            subset_size = _subset_count(subset_size, n_features)
            if subset_size >= n_features:
                raise InvalidInputError(
                    f"subset_size ({subset_size}) must be smaller than the number of features "
                    f"({n_features}).")
            draws = random_subsets(s.n, n_features, nr_runs, subset_size,
                                   sampling.make_generator())
        indices = to_tensor(draws, "draws").to(device=s.x.device, dtype=torch.long)
        if indices.dim() != 3 or indices.shape[0] != s.n or indices.shape[1] < 2:
            raise InvalidInputError(
                f"draws must have shape (N={s.n}, runs >= 2, subset_size); got "
                f"{tuple(indices.shape)}.")
        if indices.min() < 0 or indices.max() >= n_features:
            raise InvalidInputError(f"draws hold feature indices outside [0, {n_features}).")
        runs, size = indices.shape[1:]
        base = baseline_values(baseline, s.x)

        if cells is not None:
            cell_of_pixel = cells.to(s.x.device)

            def perturbed(start: int, stop: int) -> Tensor:
                flat = torch.arange(start, stop, device=s.x.device)
                sample, run = flat // runs, flat % runs
                chosen = torch.zeros(flat.numel(), n_features, dtype=torch.bool,
                                     device=s.x.device).scatter_(1, indices[sample, run], True)
                removed = chosen[:, cell_of_pixel].view(-1, 1, *s.x.shape[2:])
                return select_per_sample(removed, base, s.x, sample)
        else:
            # each input: a copy of its sample's image (the one write an input needs), then
            # the subset's elements taken from the baseline
            x_rows, base_rows = channels_last_rows(s.x), channels_last_rows(base)
            constants = constant_per_sample(base)
            positions, width = feature_units(indices, a.dim(), s.x.shape)
            positions = positions.reshape(s.n * runs, size)  # row i*runs + r: (i, r)'s subset

            def perturbed(start: int, stop: int) -> Tensor:
                sample = torch.arange(start, stop, device=s.x.device) // runs
                where = positions[start:stop]
                values = replacement_at(base_rows, constants, sample, where, width)
                return replaced_rows(x_rows, s.x.shape, sample, where, values, width)

        clean = s.clean_scores(softmax)
        scores = scores_in_batches(s.model, perturbed, s.y, s.n * runs, s.batch_size, softmax,
                                   sampling.progress, "faithfulness correlation",
                                   per_sample=runs).view(s.n, runs)
        drops = clean[:, None] - scores
        out = {}
        for name, a in maps.items():
            sums = a.flatten(1).gather(1, indices.flatten(1)).view(s.n, runs, size).sum(2)
            out[name] = correlate[name](sums.cpu(), drops).to(s.x.device)
        return out


@register_metric(family="faithfulness", direction="higher", needs=("model",),
                 rows=("mufidelity",))
def mu_fidelity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    grid_size: int = 9,
    subset_fraction: float = 0.2,
    baseline: Baseline = 0.0,
    nr_samples: int = 200,
    softmax: bool = False,
    abs: bool = False,
    normalise: Normalise = None,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """MuFidelity as xplique defines it (``xplique.metrics.MuFidelity``; Bhatt et al., 2020).

    The image is cut into ``grid_size x grid_size`` cells. Each of ``nr_samples`` draws removes
    every cell independently with probability ``subset_fraction`` (so about that fraction of
    the image), setting all its pixels and channels to ``baseline``; the score is Spearman's
    correlation, over the draws, of the map's sum over the removed pixels and the drop of the
    target's score. The draws are the same for every sample of the call. A cell covers the
    pixels that nearest-neighbour upsampling of the grid to the image assigns to it (TF's
    ``resize(method="nearest")``: source ``floor((i + 0.5) * grid_size / H)``). As xplique,
    an undefined correlation (constant map sums or scores) counts as 0, not NaN.

    Args:
        grid_size: cells per side (xplique's default 9; the co-author's port of it, too).
        subset_fraction: probability that a cell is removed (0.2).
        baseline: replacement value (xplique: 0.0), as for :func:`faithfulness_correlation`.
        nr_samples: draws per sample (200).
        softmax: score the softmax probability instead of the logit.
        abs, normalise: attribution preprocessing (per sample; Spearman ignores scaling).
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`).
            ``draws``: explicit removed-cell masks, bool ``(nr_samples, grid_size, grid_size)``.

    Returns:
        float64 correlations (N,) in [-1, 1].
    """
    sampling = sampling_of(sampling, options, "mu_fidelity")
    draws = sampling.draws
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="MuFidelity")
        a = preprocess_attributions(s.a, normalise, abs)
        grid_size = check_positive_int(grid_size, "grid_size")
        if draws is None:
            nr_samples = check_positive_int(nr_samples, "nr_samples", 2)
            fraction = float(subset_fraction)
            if not 0.0 < fraction < 1.0:
                raise InvalidInputError(
                    f"subset_fraction must lie in (0, 1), got {subset_fraction!r}.")
            keys = torch.rand(nr_samples, grid_size, grid_size,
                              generator=sampling.make_generator())
            draws = keys < fraction
        removed_cells = to_tensor(draws, "draws").to(device=s.x.device, dtype=torch.bool)
        if removed_cells.dim() != 3 or removed_cells.shape[1:] != (grid_size, grid_size) or (
                removed_cells.shape[0] < 2):
            raise InvalidInputError(
                f"draws must have shape (nr_samples >= 2, {grid_size}, {grid_size}); got "
                f"{tuple(removed_cells.shape)}.")
        runs = removed_cells.shape[0]
        height, width = s.x.shape[-2:]
        rows = ((torch.arange(height, device=s.x.device) + 0.5) * grid_size / height).long()
        cols = ((torch.arange(width, device=s.x.device) + 0.5) * grid_size / width).long()
        removed = removed_cells[:, rows.clamp(max=grid_size - 1)][
            :, :, cols.clamp(max=grid_size - 1)]  # (runs, H, W)
        per_pixel = pixel_map(a).to(torch.float64)
        attribution_sums = torch.einsum("nhw,rhw->nr", per_pixel, removed.to(torch.float64))
        base = baseline_values(baseline, s.x)

        inputs = MaskedInputs(runs, lambda run: removed[run][:, None], s.x, base)

        def perturbed(start: int, stop: int) -> Tensor:
            return inputs.grid(start, stop)

        clean = s.clean_scores(softmax)
        scores = scores_in_batches(s.model, perturbed, s.y, s.n * runs, s.batch_size, softmax,
                                   sampling.progress, "MuFidelity",
                                   per_sample=runs).view(s.n, runs)
        drops = clean[:, None] - scores
        rho = spearman(attribution_sums.cpu(), drops.cpu())
        return torch.nan_to_num(rho, nan=0.0).to(s.x.device)


Correlation = Literal["pearson", "spearman"]


def _correlation(name: object) -> Any:
    if name == "pearson":
        return pearson
    if name == "spearman":
        return spearman
    raise InvalidInputError(f"correlation must be 'pearson' or 'spearman', got {name!r}.")


def _subset_count(subset_size: object, n_features: int) -> int:
    """A subset size given as a count, or as a float fraction of the features."""
    if isinstance(subset_size, float):
        if not 0.0 < subset_size < 1.0:
            raise InvalidInputError(
                f"a fractional subset_size must lie in (0, 1), got {subset_size}; give a "
                "count as an int.")
        return max(1, round(subset_size * n_features))
    return check_positive_int(subset_size, "subset_size")


def _cells(a: Tensor, cell: int) -> tuple[Tensor, Tensor]:
    """Square cells of ``cell`` pixels: each pixel's cell index (H*W,) and the map summed per
    cell (N, cells), over channels too for an element map."""
    height, width = a.shape[-2:]
    columns = -(-width // cell)
    rows = torch.arange(height, device=a.device) // cell
    cols = torch.arange(width, device=a.device) // cell
    cell_of_pixel = (rows[:, None] * columns + cols[None, :]).flatten()
    per_pixel = pixel_map(a).flatten(1)
    sums = torch.zeros(a.shape[0], -(-height // cell) * columns, dtype=per_pixel.dtype,
                       device=a.device).index_add_(1, cell_of_pixel, per_pixel)
    return cell_of_pixel, sums


# --- ordered perturbation curves ------------------------------------------------------------

def _ordered_curve(s: MetricInputs, a: Tensor, counts: Tensor, start_from: Tensor,
                   replace_with: Tensor, softmax: bool, progress: bool, desc: str) -> Tensor:
    """Scores (N, T): point t has the ``counts[t]`` top-ranked features of ``start_from`` taken
    from ``replace_with``."""
    inputs = RankedInputs(descending_ranks(a), a.dim(), start_from, replace_with)
    steps = counts.numel()
    counts = counts.to(s.x.device)

    def perturbed(start: int, stop: int) -> Tensor:
        return inputs.grid(start, stop, counts)

    scores = scores_in_batches(s.model, perturbed, s.y, s.n * steps, s.batch_size, softmax,
                               progress, desc, per_sample=steps)
    return scores.view(s.n, steps)


@register_metric(family="faithfulness", direction="higher", needs=("model",),
                 rows=("monotonicity",))
def monotonicity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    features_in_step: int = 1,
    baseline: Baseline = "black",
    softmax: bool = False,
    abs: bool = True,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Monotonicity (Arya et al., 2019; Quantus' ``Monotonicity`` as intended): start from the
    baseline and put the input's features back from the least to the most important,
    ``features_in_step`` at a time; 1.0 if the target's score never decreases, else 0.0.

    Quantus 0.6 fills its starting image with the baseline and then "perturbs" it with the
    same baseline value, so no feature of the input is ever put back: its scores are constant
    and every map passes (tests/test_metrics_quantus.py shows both). Ties in the ordering go to
    the lower index.

    Returns:
        float64 (N,) of 1.0 / 0.0; ``ceil(F / features_in_step)`` forward passes per sample.
    """
    sampling = sampling_of(sampling, options, "monotonicity")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="monotonicity")
        a = preprocess_attributions(s.a, normalise, abs)
        n_features = feature_count(a)
        step = check_positive_int(features_in_step, "features_in_step")
        counts = torch.arange(step, n_features + step, step).clamp(max=n_features)
        start = baseline_values(baseline, s.x)
        # ascending importance: the top-ranked features of -a come first
        curve = _ordered_curve(s, -a, counts, start, s.x, softmax, sampling.progress,
                               "monotonicity")
        return (curve.diff(dim=1) >= 0).all(1).to(torch.float64)


@register_metric(family="axiomatic", direction="lower", needs=("model",),
                 rows=("completeness",))
def completeness(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    baseline: Baseline = "black",
    softmax: bool = False,
    relative: bool = True,
    abs: bool = False,
    normalise: Normalise = None,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Completeness (Sundararajan et al., 2017; Quantus' ``Completeness``): how far the map's
    sum is from the output change it should explain, ``|sum(a) - (f_y(x) - f_y(x'))|`` with
    ``x'`` the baseline image; divided by ``|f_y(x) - f_y(x')|`` when ``relative``.

    Lower is better; 0 is complete (integrated gradients with the same baseline tends to 0 as
    its steps grow). Quantus returns ``sum(a) == f_y(x) - f_y(x')`` compared exactly in floating
    point, and by default after max-normalising the map, so nearly every map fails; we report
    the gap on the raw map (``normalise=None``).

    Returns:
        float64 (N,); NaN for a relative gap when the output does not change.
    """
    sampling = sampling_of(sampling, options, "completeness")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="completeness")
        a = preprocess_attributions(s.a, normalise, abs)
        start = baseline_values(baseline, s.x)
        change = (s.clean_scores(softmax) - s.scores_of(start, softmax, "baseline")).to(
            torch.float64).cpu()
        gap = (a.flatten(1).sum(1).to(torch.float64).cpu() - change).abs()
        if relative:
            gap = torch.where(change != 0, gap / change.abs().clamp_min(1e-300),
                              torch.full_like(gap, math.nan))
        return gap.to(s.x.device)


@register_metric(family="faithfulness", direction="lower", needs=("model",),
                 returns="CurveResult (curve and area per sample)",
                 axes=("fraction of features replaced, most relevant first",
                       "class probability", "linear"))
def pixel_flipping(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    features_in_step: int = 1,
    baseline: Baseline = "black",
    softmax: bool = True,
    abs: bool = False,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> CurveResult:
    """Pixel flipping (Bach et al., 2015), as Quantus' ``PixelFlipping``.

    Features are replaced by the baseline cumulatively, ``features_in_step`` at a time, in
    order of descending attribution; the curve holds the class score after each step (not the
    unperturbed score), ``ceil(F / features_in_step)`` points. The AUC is Quantus': the
    trapezoid rule with unit spacing (so it grows with the number of steps). Lower is better.

    A pixel map flips pixels; Quantus 0.6 flips elements of the map broadcast over channels,
    so our ``features_in_step=k`` on an (N, H, W) map equals its ``features_in_step=k*C``.
    Ties are broken by feature index (Quantus' numpy argsort leaves them unspecified).

    Args:
        features_in_step: features replaced per step.
        baseline: replacement value (see :func:`faithfulness_correlation`).
        softmax: probabilities (Quantus' default for this metric) or logits.
        abs, normalise: attribution preprocessing (per sample).
        sampling: batch size and progress (:class:`~srdxai.metrics.Sampling`).
    """
    sampling = sampling_of(sampling, options, "pixel_flipping")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="pixel flipping")
        a = preprocess_attributions(s.a, normalise, abs)
        n_features = feature_count(a)
        step = check_positive_int(features_in_step, "features_in_step")
        points = math.ceil(n_features / step)
        counts = torch.clamp(torch.arange(1, points + 1) * step, max=n_features)
        curve = _ordered_curve(s, a, counts, s.x, baseline_values(baseline, s.x), softmax,
                               sampling.progress, "pixel flipping")
        return CurveResult(curve=curve, fractions=counts.to(torch.float64) / n_features,
                           auc=trapezoid(curve))


def _insertion_deletion(model, x, y, attributions, explain, step, baseline, softmax, abs,
                        normalise, sampling: Sampling, insert: bool) -> CurveResult:
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="insertion" if insert else "deletion")
        a = preprocess_attributions(s.a, normalise, abs)
        n_features = feature_count(a)
        if step is None:
            step = math.ceil(n_features / 224)
        step = check_positive_int(step, "step")
        points = math.ceil(n_features / step) + 1
        counts = torch.clamp(torch.arange(points) * step, max=n_features)
        substrate = baseline_values(baseline, s.x)
        start, replace = (substrate, s.x) if insert else (s.x, substrate)
        curve = _ordered_curve(s, a, counts, start, replace, softmax, sampling.progress,
                               "insertion" if insert else "deletion")
        fractions = counts.to(torch.float64) / n_features
        return CurveResult(curve=curve, fractions=fractions, auc=trapezoid(curve, fractions))


@register_metric(family="faithfulness", direction="higher", needs=("model",),
                 returns="CurveResult (curve and area per sample)", rows=("auc_insertion",),
                 axes=("fraction of pixels inserted", "class probability", "linear"))
def insertion(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    step: int | None = None,
    baseline: Baseline = "blur",
    softmax: bool = True,
    abs: bool = False,
    normalise: Normalise = None,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> CurveResult:
    """Insertion (Petsiuk et al., RISE, BMVC 2018): start from a blurred copy and put back the
    original features in order of descending attribution, ``step`` at a time.

    The curve has ``ceil(F / step) + 1`` points, from 0 to all features inserted; the AUC is
    the trapezoid over the inserted fraction in [0, 1] (RISE's normalised AUC). Higher is
    better.

    Args:
        step: features per step; default ``ceil(F / 224)``, RISE's 224 pixels at 224x224.
        baseline: the starting substrate: "blur" (RISE: Gaussian, kernel 11, sigma 5), a
            number, "black", "white", "mean", "zero" or a tensor.
        softmax: probabilities (RISE) or logits.
        abs, normalise: attribution preprocessing (only the order matters).
        sampling: batch size and progress (:class:`~srdxai.metrics.Sampling`).
    """
    return _insertion_deletion(model, x, y, attributions, explain, step, baseline, softmax, abs,
                               normalise, sampling_of(sampling, options, "insertion"),
                               insert=True)


@register_metric(family="faithfulness", direction="lower", needs=("model",),
                 returns="CurveResult (curve and area per sample)", rows=("auc_deletion",),
                 axes=("fraction of pixels removed", "class probability", "linear"))
def deletion(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    step: int | None = None,
    baseline: Baseline = 0.0,
    softmax: bool = True,
    abs: bool = False,
    normalise: Normalise = None,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> CurveResult:
    """Deletion (Petsiuk et al., RISE, BMVC 2018): replace features by the baseline (RISE: 0)
    in order of descending attribution, ``step`` at a time. Lower AUC is better.

    Same curve layout and AUC as :func:`insertion` (the first point is the clean input).
    """
    return _insertion_deletion(model, x, y, attributions, explain, step, baseline, softmax, abs,
                               normalise, sampling_of(sampling, options, "deletion"),
                               insert=False)


# --- Sensitivity-n (Ancona et al., ICLR 2018) ----------------------------------------------

def sensitivity_n_grid(n_features: int, points: int = 16, max_fraction: float = 0.8) -> Tensor:
    """Default subset sizes: ``points`` log-spaced integers from 1 to ``max_fraction * F``
    (duplicates removed), the log-scaled axis of Ancona et al.'s plots."""
    top = max(1, int(max_fraction * n_features))
    grid = np.unique(np.round(np.geomspace(1, top, points)).astype(np.int64))
    return torch.as_tensor(grid)


def random_permutations(n_samples: int, n_features: int, nr_subsets: int,
                        generator: torch.Generator) -> Tensor:
    """The draws of :func:`sensitivity_n`: (N, nr_subsets, F) random permutations of the
    features; subset r of size n is the first n features of permutation r."""
    return torch.stack([torch.rand(nr_subsets, n_features, generator=generator).argsort(1)
                        for _ in range(n_samples)])


#: Sensitivity-n runs the forward passes of several samples together while their ranks (and
#: their table laid out per input element) stay within this many bytes
_SENSITIVITY_N_BLOCK_BYTES = 64 * 2**20


@register_metric(family="faithfulness", direction="higher", needs=("model",),
                 returns="SensitivityNResult (a correlation per n per sample)",
                 rows=("sensitivity_n*",),
                 axes=("n, features removed at random (log scale)",
                       "Pearson r (map sum vs output change)", "log"))
def sensitivity_n(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    n_grid: Sequence[int] | Tensor | None = None,
    nr_subsets: int = 100,
    baseline: Baseline = 0.0,
    softmax: bool = False,
    abs: bool = False,
    normalise: Normalise = None,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> SensitivityNResult:
    """Sensitivity-n with Ancona et al.'s protocol (ICLR 2018), not Quantus' ``SensitivityN``.

    A map satisfies Sensitivity-n when, for every subset S of n features,
    ``sum_S a = f_y(x) - f_y(x with S set to the baseline)``. For each n on the grid, draw
    ``nr_subsets`` uniform random subsets of size n, remove them, and take the Pearson
    correlation between the attribution sums and the output changes; the result is one curve
    per sample over n. (Quantus instead removes features cumulatively in attribution order and
    correlates across samples.)

    Subsets are nested across n: subset r of size n is the first n features of the r-th random
    permutation (common random numbers; every single subset is still uniform of its size).

    Args:
        n_grid: subset sizes; default :func:`sensitivity_n_grid` (16 log-spaced sizes up to
            80 % of the features).
        nr_subsets: random subsets per n and sample (Ancona et al. average about a thousand;
            100 by default for cost: G * nr_subsets forward passes per sample).
        baseline: removal value; Ancona et al. set removed features to 0.
        softmax: logits (default, pre-softmax as Ancona et al.) or probabilities.
        abs, normalise: attribution preprocessing (none by default: the test is about the
            raw map's scale).
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`).
            ``draws``: explicit permutations (N, nr_subsets, F); see
            :func:`random_permutations`.
    """
    sampling = sampling_of(sampling, options, "sensitivity_n")
    draws = sampling.draws
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="sensitivity-n")
        a = preprocess_attributions(s.a, normalise, abs)
        n_features = feature_count(a)
        grid = sensitivity_n_grid(n_features) if n_grid is None else to_tensor(n_grid, "n_grid")
        grid = grid.reshape(-1).to(torch.long)
        if grid.numel() == 0 or grid.min() < 1 or grid.max() > n_features:
            raise InvalidInputError(f"n_grid must hold subset sizes in [1, {n_features}].")
        if draws is None:
            subsets = check_positive_int(nr_subsets, "nr_subsets", 2)
            gen = sampling.make_generator()
            permutations = None
        else:
            permutations = to_tensor(draws, "draws").to(torch.long)
            if permutations.shape[0] != s.n or permutations.dim() != 3 or (
                    permutations.shape[2] != n_features) or permutations.shape[1] < 2:
                raise InvalidInputError(
                    f"draws must be permutations of shape (N={s.n}, subsets >= 2, "
                    f"F={n_features}); got {tuple(permutations.shape)}.")
            if not torch.equal(permutations.sort(2).values,
                               torch.arange(n_features).expand_as(permutations)):
                raise InvalidInputError("draws must hold permutations of the feature indices.")
            subsets = permutations.shape[1]
        clean = s.clean_scores(softmax)
        base = baseline_values(baseline, s.x)
        grid_dev = grid.to(s.x.device)
        points = grid.numel()
        curve = torch.empty(s.n, points, dtype=torch.float64)
        # Blocks of samples, each one run of forward passes; the permutations are drawn sample
        # by sample in order (independent of batch_size and of the blocks), and a block holds
        # its samples' (subsets, F) ranks, and their table laid out per input element, within
        # a memory bound.
        per_sample_bytes = subsets * s.x[0].numel() * s.x.element_size() + (
            subsets * n_features * 8)
        block = max(1, min(s.n, _SENSITIVITY_N_BLOCK_BYTES // per_sample_bytes))
        for first in range(0, s.n, block):
            members = range(first, min(s.n, first + block))
            ranks, sums = [], []
            for i in members:
                if permutations is None:
                    order = torch.rand(subsets, n_features, generator=gen).argsort(1)
                else:
                    order = permutations[i]
                order = order.to(s.x.device)
                rank = inverse_order(order)
                ranks.append(rank)
                sums.append(a[i].flatten()[order].cumsum(1)[:, grid_dev - 1].T)  # (G, subsets)
            # one "sample" of RankedInputs per (sample, subset): its ranks and the image
            rows = torch.arange(first, first + len(members), device=s.x.device)
            rows = rows.repeat_interleave(subsets)
            inputs = RankedInputs(torch.cat(ranks), a.dim(), s.x, base, image_of=rows)

            def perturbed(start: int, stop: int, inputs=inputs) -> Tensor:
                # subset-major: the n grid of one subset, then the next subset
                return inputs.grid(start, stop, grid_dev)

            scores = scores_in_batches(
                s.model, perturbed, s.y, len(members) * subsets * points, s.batch_size, softmax,
                sampling.progress, "sensitivity-n", per_sample=subsets * points,
                sample_offset=first).view(len(members), subsets, points)
            for j, i in enumerate(members):
                curve[i] = pearson(sums[j].cpu(), clean[i] - scores[j].T)
        return SensitivityNResult(curve=curve.to(s.x.device), n_grid=grid)
