"""Localisation metrics: does the attribution fall on the object (a ground-truth mask)?

They only read the maps and the masks; ``model``, ``x`` and ``y`` are accepted for the
common signature (``x``, when given, is used to check the map shapes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from .common import (
    EmptyMaskPolicy,
    Explain,
    Normalise,
    average_ranks,
    check_attributions,
    check_inputs,
    check_masks,
    check_positive_int,
    descending_ranks,
    empty_mask_nan,
    preprocess_attributions,
)
from .registry import register_metric

Tensor = torch.Tensor

__all__ = ["pointing_game", "attribution_localisation", "relevance_mass_accuracy",
           "relevance_rank_accuracy", "top_k_intersection", "localisation_auc"]


def _maps_and_masks(model: nn.Module | None, x: Any, attributions: Any,
                    masks: Any) -> tuple[Tensor, Tensor]:
    x_checked = check_inputs(x, model) if x is not None else None
    if attributions is None:
        raise InvalidInputError("this metric scores given maps: pass attributions=.")
    a = check_attributions(attributions, x_checked)
    return a, check_masks(masks, a)


def _dilate(masks: Tensor, radius: int) -> Tensor:
    """Grow each mask by a disk of ``radius`` pixels (Euclidean distance <= radius)."""
    offsets = torch.arange(-radius, radius + 1, device=masks.device, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).to(torch.float32)
    grown = F.conv2d(masks[:, None].to(torch.float32), disk[None, None], padding=radius)
    return grown[:, 0] > 0.5


def _over_channels(masks: Tensor, a: Tensor) -> Tensor:
    """The (N, H, W) masks shaped like the maps: broadcast over channels for (N, C, H, W)."""
    return masks[:, None].expand_as(a) if a.dim() == 4 else masks


def _area_fraction(masks: Tensor) -> Tensor:
    """Each mask's share of the image, float64 (N,)."""
    return masks.flatten(1).sum(1).to(torch.float64) / masks[0].numel()


@register_metric(family="localisation", direction="higher", needs=("masks",),
                 rows=("pointing_game", "pointing_game_*"))
def pointing_game(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    tolerance: int = 0,
    weighted: bool = False,
    abs: bool = False,
    normalise: Normalise = True,
    empty_mask: EmptyMaskPolicy = "nan",
) -> Tensor:
    """Pointing game (Zhang et al., IJCV 2018): 1 if the map's maximum lies in the mask, else 0.

    Ties count as a hit if any maximal position is in the mask (Quantus' rule). Element maps
    (N, C, H, W) take the maximum over all elements; the mask covers every channel.

    Args:
        tolerance: the original game's tolerance in pixels (15 in the paper): a hit if the
            maximum lies within this Euclidean distance of the mask. 0 (default) is Quantus'
            ``PointingGame``, which has no tolerance.
        weighted: a hit scores ``1 - mask_area / image_area`` instead of 1, which rewards hits
            on small objects (Quantus' ``weighted=True``, without its v0.6.0 bool-cast bug).
        abs: take |a| first (so strongly negative evidence can also "point").
        normalise: per-sample normalisation (does not move the maximum; kept for parity).
        empty_mask: ``"nan"`` scores a sample with an empty mask NaN, ``"raise"`` raises.

    Returns:
        float64 scores (N,): 1.0 hit, 0.0 miss, NaN for empty masks.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise InvalidInputError(f"tolerance must be an int >= 0 (pixels), got {tolerance!r}.")
    a, m = _maps_and_masks(model, x, attributions, masks)
    a = preprocess_attributions(a, normalise, abs)
    target = _over_channels(_dilate(m, tolerance) if tolerance > 0 else m, a)
    flat = a.flatten(1)
    at_max = flat == flat.amax(1, keepdim=True)
    hit = (at_max & target.reshape(flat.shape)).any(1).to(torch.float64)
    if weighted:
        hit = hit * (1.0 - _area_fraction(m))
    return empty_mask_nan(hit, m, empty_mask)


@register_metric(family="localisation", direction="higher", needs=("masks",),
                 rows=("attribution_localisation",))
def attribution_localisation(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    weighted: bool = False,
    positive_only: bool = False,
    abs: bool = True,
    normalise: Normalise = True,
    empty_mask: EmptyMaskPolicy = "nan",
) -> Tensor:
    """Attribution localisation (Kohlbrenner et al., 2020): the share of attribution mass that
    falls inside the mask, ``sum_mask(a) / (sum(a) + 1e-9)``.

    The defaults are Quantus' (``abs=True``: the mass of |a|). Kohlbrenner's "positive
    relevance" variant is ``abs=False, positive_only=True``. A ratio above 1 can only come from
    negative mass outside the mask; it is NaN, as in Quantus.

    Args:
        weighted: multiply by ``mask_area / image_area`` (Quantus' ``weighted=True`` as in
            v0.4.2; v0.6.0 divides by a batch-dependent size, a bug).
        positive_only: clip the map at 0 first (Quantus' ``positive_attributions``), after
            normalisation and ``abs``.
        abs: take |a| first (Quantus' default).
        normalise: per-sample normalisation (the ratio is scale-free; kept for parity).
        empty_mask: ``"nan"`` scores a sample with an empty mask NaN, ``"raise"`` raises.

    Returns:
        float64 scores (N,) in [0, 1] (NaN for empty masks and ratios above 1).
    """
    a, m = _maps_and_masks(model, x, attributions, masks)
    a = preprocess_attributions(a, normalise, abs)
    if positive_only:
        a = a.clamp_min(0)
    inside = (a * _over_channels(m, a)).flatten(1).sum(1)
    total = a.flatten(1).sum(1)
    ratio = inside / (total + 1e-9)
    ratio = ratio.masked_fill(ratio > 1, float("nan"))
    if weighted:
        ratio = ratio * _area_fraction(m)
    return empty_mask_nan(ratio, m, empty_mask)


def _flat_pair(model: nn.Module | None, x: Any, attributions: Any, masks: Any,
               normalise: Normalise, abs: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Preprocessed maps and masks flattened to (N, F) (element maps: the mask repeated over
    channels), and the (N, H, W) masks."""
    a, m = _maps_and_masks(model, x, attributions, masks)
    a = preprocess_attributions(a, normalise, abs)
    return a.flatten(1).to(torch.float64), _over_channels(m, a).flatten(1), m


def _top(a: Tensor, k: Tensor | int) -> Tensor:
    """(N, F) bool: each row's ``k`` largest values (per row ``k`` when a tensor); ties go to
    the lower index (a stable sort; Quantus' ``np.argsort`` leaves them to its quicksort)."""
    return descending_ranks(a) < torch.as_tensor(k, device=a.device).reshape(-1, 1)


@register_metric(family="localisation", direction="higher", needs=("masks",),
                 rows=("relevance_mass_accuracy",))
def relevance_mass_accuracy(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    abs: bool = False,
    normalise: Normalise = True,
    empty_mask: EmptyMaskPolicy = "nan",
) -> Tensor:
    """Relevance mass accuracy (Arras et al., 2022; Quantus' ``RelevanceMassAccuracy``): the
    map's sum inside the mask over its total sum, ``sum_mask(a) / sum(a)``.

    Signed maps by default (Quantus): negative mass outside the mask can push it above 1. A map
    summing to 0 gives inf or NaN, as Quantus' division does.

    Returns:
        float64 scores (N,); NaN for empty masks.
    """
    a, m_flat, m = _flat_pair(model, x, attributions, masks, normalise, abs)
    inside = (a * m_flat).sum(1)
    return empty_mask_nan(inside / a.sum(1), m, empty_mask)


@register_metric(family="localisation", direction="higher", needs=("masks",),
                 rows=("relevance_rank_accuracy",))
def relevance_rank_accuracy(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    abs: bool = False,
    normalise: Normalise = True,
    empty_mask: EmptyMaskPolicy = "nan",
) -> Tensor:
    """Relevance rank accuracy (Arras et al., 2022; Quantus' ``RelevanceRankAccuracy``): with
    ``K`` the mask's size, the fraction of the ``K`` highest-scored features that lie in the
    mask. Ties are broken by position (Quantus: by numpy's unstable sort).

    Returns:
        float64 scores (N,) in [0, 1]; NaN for empty masks.
    """
    a, m_flat, m = _flat_pair(model, x, attributions, masks, normalise, abs)
    size = m_flat.sum(1)
    hits = (_top(a, size) & m_flat).sum(1).to(torch.float64)
    return empty_mask_nan(hits / size.clamp_min(1), m, empty_mask)


@register_metric(family="localisation", direction="higher", needs=("masks",),
                 rows=("top_k_intersection",))
def top_k_intersection(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    k: int = 1000,
    concept_influence: bool = False,
    abs: bool = False,
    normalise: Normalise = True,
    empty_mask: EmptyMaskPolicy = "nan",
) -> Tensor:
    """Top-k intersection (Theiner et al., 2021; Quantus' ``TopKIntersection``): the fraction
    of the map's ``k`` highest-scored features that lie in the mask.

    Args:
        k: features counted (Quantus' default 1000; at most the number of features).
        concept_influence: divide by the mask's share of the image (Quantus' option).

    Returns:
        float64 scores (N,); NaN for empty masks.
    """
    a, m_flat, m = _flat_pair(model, x, attributions, masks, normalise, abs)
    k = check_positive_int(k, "k")
    if k > a.shape[1]:
        raise InvalidInputError(f"k ({k}) is larger than the number of features "
                                f"({a.shape[1]}).")
    share = (_top(a, k) & m_flat).sum(1).to(torch.float64) / k
    if concept_influence:
        share = share * a.shape[1] / m_flat.sum(1).clamp_min(1)
    return empty_mask_nan(share, m, empty_mask)


@register_metric(family="localisation", direction="higher", needs=("masks",),
                 rows=("localisation_auc",))
def localisation_auc(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    abs: bool = False,
    normalise: Normalise = True,
    empty_mask: EmptyMaskPolicy = "nan",
) -> Tensor:
    """ROC AUC of the map as a detector of the mask (Fawcett, 2006; Quantus' ``AUC``): the
    probability that a feature inside the mask scores higher than one outside, ties counting
    half (the Mann-Whitney statistic, equal to scikit-learn's ``roc_curve`` + ``auc``).

    Returns:
        float64 scores (N,) in [0, 1]; NaN for empty masks and for masks covering everything.
    """
    a, m_flat, m = _flat_pair(model, x, attributions, masks, normalise, abs)
    positives = m_flat.sum(1).to(torch.float64)
    negatives = m_flat.shape[1] - positives
    ranks = average_ranks(a)
    u = (ranks * m_flat).sum(1) - positives * (positives + 1) / 2
    auc = u / (positives * negatives).clamp_min(1)
    auc = auc.masked_fill(negatives == 0, float("nan"))
    return empty_mask_nan(auc, m, empty_mask)
