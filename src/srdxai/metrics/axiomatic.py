"""Axiomatic metrics: does the map satisfy a property every explanation should have?

(``completeness`` lives in :mod:`srdxai.metrics.faithfulness`.)
"""

from __future__ import annotations

import math
from typing import Any, Unpack

import torch
from torch import nn

from .common import (
    Baseline,
    Explain,
    GroupedInputs,
    MetricInputs,
    Normalise,
    baseline_values,
    check_finite_number,
    check_positive_int,
    feature_count,
    guarded,
    preprocess_attributions,
    scores_in_batches,
)
from .registry import register_metric
from .sampling import Sampling, SamplingOptions, sampling_of

Tensor = torch.Tensor

__all__ = ["non_sensitivity"]


@register_metric(family="axiomatic", direction="lower", needs=("model",))
def non_sensitivity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    eps: float = 1e-5,
    features_in_step: int = 1,
    baseline: Baseline = "black",
    softmax: bool = True,
    abs: bool = True,
    normalise: Normalise = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Non-sensitivity (Nguyen and Martinez, 2020): how many features have zero attribution
    but move the output, or have attribution but do not move it.

    As Quantus' ``NonSensitivity``. The features are cut, in index order, into groups of
    ``features_in_step``; each group is set to ``baseline`` alone (one forward pass per group).
    A group has zero attribution when every feature in it has ``|a| < eps``; the model is
    insensitive to it when the target's score moves by less than ``eps``. The score counts the
    groups where exactly one of the two holds: the size of the symmetric difference of "zero
    attribution" and "no effect". 0 is perfect; lower is better.

    **Differences from Quantus 0.6**: Quantus tests ``a < eps``, not ``|a| < eps``, so with
    ``abs=False`` every negative attribution counts as zero (the paper asks for zero
    attribution); with its default ``abs=True`` the two agree. It crashes (a broadcasting
    error) for ``features_in_step > 1``, comparing one flag per group with one per feature; we
    count groups. A pixel map's feature is a pixel (all channels replaced); Quantus 0.6 reads
    maps broadcast over channels, so pass the map expanded to (N, C, H, W) to reproduce it.

    Args:
        eps: threshold for both "zero attribution" (on the preprocessed map) and "no effect"
            (on the score); Quantus' 1e-5.
        features_in_step: features per group, consecutive in index order (a partial last group
            is allowed; Quantus needs it to divide H*W and crashes above 1).
        baseline: replacement value (Quantus' "black": the sample's minimum); see
            :func:`~srdxai.metrics.faithfulness_correlation`.
        softmax: probabilities (Quantus' default) or logits.
        abs, normalise: attribution preprocessing (Quantus: ``abs=True``, max-normalised).
        sampling: batch size and progress (:class:`~srdxai.metrics.Sampling`).

    Returns:
        float64 counts (N,) in [0, groups]. Forward passes per sample:
        1 + ``ceil(F / features_in_step)``.
    """
    sampling = sampling_of(sampling, dict(options), "non_sensitivity")
    eps = check_finite_number(eps, "eps", positive=True)
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="non_sensitivity")
        a = preprocess_attributions(s.maps, normalise, abs)
        n_features = feature_count(a)
        step = check_positive_int(features_in_step, "features_in_step")
        groups = math.ceil(n_features / step)
        magnitude = a.flatten(1).abs()
        padded = torch.zeros(s.n, groups * step, dtype=magnitude.dtype, device=a.device)
        padded[:, :n_features] = magnitude
        zero_attribution = (padded.view(s.n, groups, step).amax(2) < eps).cpu()
        # groups of consecutive features in index order, the same for every sample
        inputs = GroupedInputs(torch.arange(n_features, device=s.x.device)[None], step, a.dim(),
                               s.x, baseline_values(baseline, s.x))

        def perturbed(start: int, stop: int) -> Tensor:
            flat = torch.arange(start, stop, device=s.x.device)
            sample, group = flat // groups, flat % groups
            return inputs(sample, group)

        clean = s.clean_scores(softmax)
        scores = scores_in_batches(s.model, perturbed, s.y, s.n * groups, s.batch_size, softmax,
                                   sampling.progress, "non-sensitivity", per_sample=groups)
        no_effect = (scores.view(s.n, groups) - clean[:, None]).abs() < eps
        return (no_effect ^ zero_attribution).sum(1).to(torch.float64).to(s.x.device)
