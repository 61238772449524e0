"""Known answers of the mask-based localisation metrics (the Quantus cross-checks are in
tests/test_metrics_quantus.py)."""

from __future__ import annotations

import math

import pytest
import torch

from srdxai import metrics
from srdxai.errors import InvalidInputError

MASK = torch.zeros(3, 8, 8, dtype=torch.bool)
MASK[0, 2:5, 2:6] = True  # 12 pixels
MASK[1, :, :4] = True  # half the image
# sample 2: empty


def _maps(kind: str) -> torch.Tensor:
    base = torch.linspace(0.1, 0.9, 64, dtype=torch.float64).reshape(8, 8) * 0.01
    if kind == "mask":  # the mask itself, plus a small ramp to break ties
        return MASK.double() + base
    if kind == "inverse":
        return (~MASK).double() + base
    return torch.ones(3, 8, 8, dtype=torch.float64)  # constant: all ties


def test_a_map_that_is_the_mask_scores_perfectly_and_its_inverse_scores_zero():
    good, bad = _maps("mask"), _maps("inverse")
    for name, best, worst in (("relevance_rank_accuracy", 1.0, 0.0),
                              ("localisation_auc", 1.0, 0.0)):
        fn = getattr(metrics, name)
        assert fn(None, None, None, good, MASK)[:2].tolist() == [best, best], name
        assert fn(None, None, None, bad, MASK)[:2].tolist() == [worst, worst], name
        assert math.isnan(float(fn(None, None, None, good, MASK)[2]))  # empty mask
    top = metrics.top_k_intersection(None, None, None, good, MASK, k=10)
    assert top[:2].tolist() == [1.0, 1.0]
    assert metrics.top_k_intersection(None, None, None, bad, MASK, k=10)[:2].tolist() == [0, 0]
    mass = metrics.relevance_mass_accuracy(None, None, None, good, MASK, normalise=None)
    inside = (good * MASK).flatten(1).sum(1) / good.flatten(1).sum(1)
    assert torch.allclose(mass[:2], inside[:2])


def test_ties_count_half_in_the_auc_and_concept_influence_scales_by_the_mask_share():
    flat = _maps("constant")
    assert metrics.localisation_auc(None, None, None, flat, MASK)[:2].tolist() == [0.5, 0.5]
    plain = metrics.top_k_intersection(None, None, None, _maps("mask"), MASK, k=4)
    scaled = metrics.top_k_intersection(None, None, None, _maps("mask"), MASK, k=4,
                                        concept_influence=True)
    assert scaled[:2].tolist() == pytest.approx([float(plain[0]) * 64 / 12,
                                                float(plain[1]) * 64 / 32])
    full = torch.ones(1, 8, 8, dtype=torch.bool)
    assert math.isnan(float(metrics.localisation_auc(None, None, None, flat[:1], full)[0]))
    with pytest.raises(InvalidInputError, match="larger than the number of features"):
        metrics.top_k_intersection(None, None, None, flat, MASK, k=65)
