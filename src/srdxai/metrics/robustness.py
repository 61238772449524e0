"""Robustness metrics: how much does the explanation move when the input moves a little?

The explanation method is re-run on ``nr_samples`` noisy copies of every input. All copies are
explained in chunks of ``batch_size`` images (one ``explain`` call per chunk, samples and noise
draws mixed in one batch), never one call per noise draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, Unpack

import torch
from torch import nn

from ..errors import InvalidInputError
from .common import (
    Explain,
    Normalise,
    adaptive_chunks,
    check_attributions,
    check_explain,
    check_finite_logits,
    check_finite_number,
    check_inputs,
    check_model,
    check_positive_int,
    check_targets,
    default_batch_size,
    explain_checked,
    grid_runs,
    guarded,
    predicted_classes,
    preprocess_attributions,
    to_tensor,
)
from .registry import register_metric
from .sampling import Sampling, SamplingOptions, sampling_of

Tensor = torch.Tensor
Score = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = ["local_lipschitz_estimate", "max_sensitivity", "avg_sensitivity", "BlockDraws",
           "NoiseDraws", "noise_draws", "uniform_bounds"]


class BlockDraws:
    """Random draws handed out row by row in one flat order, block by block: block k is the
    k-th ``draw()`` (or ``explicit[k]``), a tensor of ``block_rows`` rows. Blocks are drawn in
    order from the generator, so the draws depend on it only, not on how the work is chunked.

    Ranges come in increasing order, except that a range that ran out of memory is asked for
    again in parts: blocks before a range's first one are dropped, no others."""

    def __init__(self, block_rows: int, draw: Callable[[], Tensor] | None,
                 explicit: Tensor | None = None):
        self.block_rows = block_rows
        self.draw = draw
        self.explicit = explicit
        self._cache: dict[int, Tensor] = {}
        self._drawn = -1  # the last block drawn from the generator

    def block(self, k: int) -> Tensor:
        if self.explicit is not None:
            return self.explicit[k]
        if k not in self._cache:
            if k <= self._drawn:
                raise RuntimeError(f"random draws of block {k} were dropped (internal error)")
            assert self.draw is not None
            for missing in range(self._drawn + 1, k + 1):
                self._cache[missing] = self.draw()
            self._drawn = k
        return self._cache[k]

    def parts(self, start: int, stop: int) -> Iterator[tuple[int, Tensor]]:
        """Rows [start, stop) of the flat (block, row) order as (block index, its rows there)
        in order, views of the blocks (no copy)."""
        self._cache = {k: v for k, v in self._cache.items() if k >= start // self.block_rows}
        for k, first, last in grid_runs(start, stop, self.block_rows):
            yield k, self.block(k)[first:last]

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the flat (block, row) order."""
        return torch.cat([rows for _, rows in self.parts(start, stop)])


class NoiseDraws(BlockDraws):
    """The noise of the robustness metrics, drawn step by step: step s is one (N, C, H, W)
    tensor, as Quantus draws one batch-shaped array per step.

    Rows are handed out in the flat order (step, sample) (:class:`BlockDraws`).
    ``explicit`` (S, N, C, H, W) replaces the generator.
    """

    def __init__(self, shape: torch.Size, steps: int, kind: Literal["gaussian", "uniform"],
                 low_or_mean: float, high_or_std: float, generator: torch.Generator | None,
                 explicit: Tensor | None = None):
        self.shape = shape
        self.steps = steps
        a, b = low_or_mean, high_or_std

        def draw() -> Tensor:  # scaled and shifted in place: the values of ``n * b + a``
            if kind == "gaussian":
                return torch.randn(shape, generator=generator, dtype=torch.float64).mul_(b).add_(a)
            return torch.rand(shape, generator=generator, dtype=torch.float64).mul_(b - a).add_(a)

        super().__init__(shape[0], draw, explicit)


def noise_draws(sampling: Sampling, x: Tensor, nr_samples: int,
                kind: Literal["gaussian", "uniform"], low_or_mean: float, high_or_std: float
                ) -> NoiseDraws:
    """The noise of ``nr_samples`` steps for inputs ``x``: drawn from ``sampling``'s generator,
    or its explicit ``draws`` (S, *x.shape), checked (then S steps)."""
    if sampling.draws is None:
        steps = check_positive_int(nr_samples, "nr_samples")
        return NoiseDraws(x.shape, steps, kind, low_or_mean, high_or_std,
                          sampling.make_generator())
    explicit = to_tensor(sampling.draws, "draws").to(torch.float64)
    if explicit.dim() != 5 or explicit.shape[1:] != x.shape:
        raise InvalidInputError(
            f"draws must be noise of shape (nr_samples, *x.shape) = (S, "
            f"{', '.join(map(str, x.shape))}); got {tuple(explicit.shape)}.")
    if explicit.shape[0] == 0:
        raise InvalidInputError("draws hold no noise draw.")
    if not torch.isfinite(explicit).all():
        raise InvalidInputError("draws contain NaN or Inf; pass finite noise.")
    return NoiseDraws(x.shape, explicit.shape[0], kind, low_or_mean, high_or_std, None,
                      explicit)


def _robustness(model, x, y, attributions, explain, *, metric: str, nr_samples: int,
                noise: tuple[Literal["gaussian", "uniform"], float, float], normalise: Normalise,
                abs: bool, sampling: Sampling, nan_when_prediction_changes: bool, score: Score,
                reduce: str) -> Tensor:
    model = check_model(model)
    explain = check_explain(explain, metric)
    with guarded(model):
        x = check_inputs(x, model)
        n = x.shape[0]
        size = default_batch_size(x, sampling.batch_size, explain=True, model=model)
        targets = check_targets(y, n, x.device)
        if targets is None:
            targets = predicted_classes(model, x, size, metric)
        if attributions is None:
            a = explain_checked(explain, model, x, targets, None)
        else:
            a = check_attributions(attributions, x)
        reference = preprocess_attributions(a, normalise, abs).flatten(1)
        x64 = x.to(torch.float64)
        clean_classes = (predicted_classes(model, x, size, metric) if nan_when_prediction_changes
                         else None)

        source = noise_draws(sampling, x, nr_samples, *noise)
        steps = source.steps

        values = torch.empty(steps * n, dtype=torch.float64)

        def run(start: int, stop: int) -> None:
            sample = torch.arange(start, stop) % n
            sample_dev = sample.to(x.device)
            perturbed64 = x64[sample_dev] + source.rows(start, stop).to(x.device)
            perturbed = perturbed64.to(x.dtype)
            maps = explain_checked(explain, model, perturbed, targets[sample_dev], a)
            maps = preprocess_attributions(maps, normalise, abs).flatten(1)
            chunk = score(reference[sample_dev], maps, x64[sample_dev].flatten(1),
                          perturbed64.flatten(1))
            if clean_classes is not None:
                with torch.no_grad():
                    logits = check_finite_logits(model(perturbed), metric, sample)
                    changed = logits.argmax(1) != clean_classes[sample_dev]
                chunk = chunk.masked_fill(changed, math.nan)
            values[start:stop] = chunk.cpu()

        adaptive_chunks(steps * n, size, sampling.progress, metric, run)
        values = values.view(steps, n)
        if reduce == "max":
            # Quantus: nanmax, or max (NaN wins) when NaN marks a changed prediction.
            out = values.max(0).values if nan_when_prediction_changes else _nanmax(values)
        else:
            out = values.mean(0) if nan_when_prediction_changes else torch.nanmean(values, 0)
        return out.to(x.device)


def _nanmax(values: Tensor) -> Tensor:
    # not nan_to_num: it would also turn +inf into the largest float (1.8e308)
    filled = torch.where(values.isnan(), torch.full_like(values, -math.inf), values)
    best = filled.max(0).values
    return torch.where(values.isnan().all(0), torch.full_like(best, math.nan), best)


def _lipschitz(a: Tensor, b: Tensor, x: Tensor, x_perturbed: Tensor) -> Tensor:
    return (a - b).norm(dim=1) / ((x - x_perturbed).norm(dim=1) + 1e-10)


def _relative_change(a: Tensor, b: Tensor, x: Tensor, x_perturbed: Tensor) -> Tensor:
    # An all-zero reference map has no relative change: NaN (docs/metrics.md), not the 0/0 or
    # x/0 that division gives (Quantus returns those, nan or inf).
    norm = a.norm(dim=1)
    change = (a - b).norm(dim=1) / torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, change, torch.full_like(change, math.nan))


@register_metric(family="robustness", direction="lower", needs=("model", "explain"),
                 rows=("stability",))
def local_lipschitz_estimate(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_samples: int = 200,
    perturb_mean: float = 0.0,
    perturb_std: float = 0.1,
    normalise: Normalise = True,
    abs: bool = False,
    nan_when_prediction_changes: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Local Lipschitz estimate (Alvarez-Melis and Jaakkola, 2018; "Sta." in SRD's table).

    ``max_k ||a(x) - a(x + d_k)||_2 / (||d_k||_2 + 1e-10)`` over ``nr_samples`` Gaussian
    perturbations ``d_k ~ N(perturb_mean, perturb_std^2)`` of every input element (Quantus'
    defaults: 200 draws, std 0.1 in the model's input space). Both maps are normalised per
    sample (Quantus 0.5+ normalises over the whole batch). Lower is more stable.

    Args:
        nr_samples: noise draws per input.
        perturb_mean, perturb_std: the Gaussian noise.
        normalise, abs: preprocessing of both the given and the re-computed maps.
        nan_when_prediction_changes: a draw that changes the predicted class scores NaN, and
            the result is NaN if any did (Quantus' ``return_nan_when_prediction_changes``);
            otherwise NaN draws are skipped.
        sampling: seed, draws, batch size and progress (:class:`~srdxai.metrics.Sampling`;
            its fields may be given as keywords instead). ``draws``: explicit noise
            (nr_samples, N, C, H, W), e.g. Quantus' draws (see :class:`NoiseDraws`).
            ``batch_size``: perturbed inputs per explain call (default: 1 Mi input elements on
            a CPU, 4 Mi on a GPU).

    Returns:
        float64 estimates (N,).
    """
    # std 0 would make ||d_k|| = 0: the estimate would be float rounding divided by 1e-10
    perturb_mean = check_finite_number(perturb_mean, "perturb_mean")
    perturb_std = check_finite_number(perturb_std, "perturb_std", positive=True)
    return _robustness(
        model, x, y, attributions, explain, metric="local_lipschitz_estimate",
        nr_samples=nr_samples, noise=("gaussian", perturb_mean, perturb_std),
        normalise=normalise, abs=abs,
        sampling=sampling_of(sampling, options, "local_lipschitz_estimate"),
        nan_when_prediction_changes=nan_when_prediction_changes, score=_lipschitz, reduce="max")


def uniform_bounds(lower_bound: float, upper_bound: float | None) -> tuple[float, float]:
    """The uniform noise's (low, high): ``U(-lower_bound, lower_bound)`` when ``upper_bound``
    is None, else ``U(lower_bound, upper_bound)``; checked."""
    if upper_bound is None:
        # U(-b, b): b = 0 would perturb nothing and divide rounding noise by the map's norm
        lower_bound = check_finite_number(lower_bound, "lower_bound", positive=True)
        return -lower_bound, lower_bound
    lower_bound = check_finite_number(lower_bound, "lower_bound")
    upper_bound = check_finite_number(upper_bound, "upper_bound")
    if upper_bound <= lower_bound:
        raise InvalidInputError(
            f"upper_bound ({upper_bound}) must be larger than lower_bound ({lower_bound}).")
    return lower_bound, upper_bound


@register_metric(family="robustness", direction="lower", needs=("model", "explain"))
def max_sensitivity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_samples: int = 200,
    lower_bound: float = 0.2,
    upper_bound: float | None = None,
    normalise: Normalise = False,
    abs: bool = False,
    nan_when_prediction_changes: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Max-sensitivity (Yeh et al., NeurIPS 2019), as Quantus' ``MaxSensitivity``.

    ``max_k ||a(x) - a(x + d_k)||_2 / ||a(x)||_2`` with uniform noise ``d_k`` on every element:
    ``U(-lower_bound, lower_bound)`` when ``upper_bound`` is None (Quantus' default, 0.2),
    else ``U(lower_bound, upper_bound)``. No normalisation by default (Quantus). Lower is
    better. Other arguments as :func:`local_lipschitz_estimate`.
    """
    low, high = uniform_bounds(lower_bound, upper_bound)
    return _robustness(
        model, x, y, attributions, explain, metric="max_sensitivity", nr_samples=nr_samples,
        noise=("uniform", low, high), normalise=normalise, abs=abs,
        sampling=sampling_of(sampling, options, "max_sensitivity"),
        nan_when_prediction_changes=nan_when_prediction_changes, score=_relative_change,
        reduce="max")


@register_metric(family="robustness", direction="lower", needs=("model", "explain"))
def avg_sensitivity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_samples: int = 200,
    lower_bound: float = 0.2,
    upper_bound: float | None = None,
    normalise: Normalise = False,
    abs: bool = False,
    nan_when_prediction_changes: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Avg-sensitivity (Yeh et al., NeurIPS 2019): as :func:`max_sensitivity` with the mean
    over the noise draws instead of the maximum."""
    low, high = uniform_bounds(lower_bound, upper_bound)
    return _robustness(
        model, x, y, attributions, explain, metric="avg_sensitivity", nr_samples=nr_samples,
        noise=("uniform", low, high), normalise=normalise, abs=abs,
        sampling=sampling_of(sampling, options, "avg_sensitivity"),
        nan_when_prediction_changes=nan_when_prediction_changes, score=_relative_change,
        reduce="mean")
