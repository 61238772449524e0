"""Complexity metrics: how concentrated is a map? (Maps only; no model calls.)"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from .common import Explain, Normalise, check_attributions, check_inputs, preprocess_attributions
from .registry import register_metric

Tensor = torch.Tensor

__all__ = ["sparseness", "complexity"]


def _maps(model: nn.Module | None, x: Any, attributions: Any) -> Tensor:
    if attributions is None:
        raise InvalidInputError("this metric scores given maps: pass attributions=.")
    x_checked = check_inputs(x, model) if x is not None else None
    return check_attributions(attributions, x_checked)


@register_metric(family="complexity", direction="higher", rows=("sparseness",))
def sparseness(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    abs: bool = True,
    normalise: Normalise = True,
) -> Tensor:
    """Sparseness (Chalasani et al., ICML 2020): the Gini index of the map's values.

    With the values sorted ascending, ``v_1 <= ... <= v_n`` (each + 1e-7, as Quantus, so an
    all-zero map is uniform rather than 0/0), ``G = sum_k (2k - n - 1) v_k / (n sum_k v_k)``.
    0 for a uniform map, ``1 - 1/n`` when one feature holds all the mass. Higher is sparser.

    Args:
        abs: take |a| first (Quantus' default; the Gini index is defined for non-negative
            values).
        normalise: per-sample normalisation; the index is scale-free except for the 1e-7.

    Returns:
        float64 scores (N,).
    """
    a = preprocess_attributions(_maps(model, x, attributions), normalise, abs)
    values = torch.sort(a.flatten(1) + 1e-7, dim=1).values
    n = values.shape[1]
    weights = 2 * torch.arange(1, n + 1, dtype=values.dtype, device=values.device) - n - 1
    return (weights * values).sum(1) / (n * values.sum(1))


@register_metric(family="complexity", direction="lower")
def complexity(
    model: nn.Module | None,
    x: Any,
    y: Any,
    attributions: Any,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    abs: bool = True,
    normalise: Normalise = True,
) -> Tensor:
    """Complexity (Bhatt et al., IJCAI 2020): the entropy of the map as a distribution,
    ``-sum_i p_i log p_i`` with ``p = a / sum|a|``. Lower is simpler.

    ``0 log 0 = 0`` exactly (Quantus adds 1e-12 inside the log instead; the difference is at
    most about 1e-12 per feature). An all-zero map has no distribution: NaN.

    Args:
        abs: take |a| first (Quantus' default; with ``abs=False`` negative values give NaN).
        normalise: per-sample normalisation (the entropy is scale-free; kept for parity).

    Returns:
        float64 scores (N,) in [0, log n].
    """
    a = preprocess_attributions(_maps(model, x, attributions), normalise, abs).flatten(1)
    mass = a.abs().sum(1, keepdim=True)
    p = a / mass
    return -torch.special.xlogy(p, p).sum(1)
