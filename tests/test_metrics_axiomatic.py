"""srdxai.metrics.axiomatic: non-sensitivity.

A known answer on a linear model (derivation in the comments), batch = per sample, chunking,
inputs and model left alone, errors and the sampling object. The Quantus cross-check is in
tests/test_metrics_quantus_axiomatic.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import srdxai
from srdxai.errors import InvalidInputError
from srdxai.metrics.axiomatic import non_sensitivity
from srdxai.metrics.sampling import Sampling

DOUBLE = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


def linear_model(weight: torch.Tensor) -> nn.Module:
    """Logits = weight @ flatten(x), no bias."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model.to(DOUBLE).eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 3)).to(DOUBLE).eval()
    x = torch.randn(4, 3, 6, 6, dtype=DOUBLE)
    with torch.no_grad():
        y = model(x).argmax(1)
    maps = srdxai.explain(model, x, y, "gradient_x_input")
    maps[:, :2] = 0.0  # zero attribution on the top rows: both kinds of violation occur
    return model, x, y, maps


def test_non_sensitivity_known_answer():
    # Logit f = w . x on one 1x4x4 image of ones; baseline 0 changes f by w_i when feature i is
    # removed, so the model ignores exactly the features with w_i = 0: {0, 1, 2, 3}. The map is
    # zero on {2, 3, 4}. Violations (symmetric difference): {0, 1} (ignored but attributed) and
    # {4} (used but zero attribution): 3.
    w = torch.arange(1.0, 17.0, dtype=DOUBLE)
    w[:4] = 0.0
    model = linear_model(w[None])
    x = torch.ones(1, 1, 4, 4, dtype=DOUBLE)
    a = torch.rand(1, 16, generator=torch.Generator().manual_seed(0), dtype=DOUBLE) + 0.5
    a[0, 2:5] = 0.0
    a = a.view(1, 4, 4)
    assert non_sensitivity(model, x, 0, a, baseline=0.0, softmax=False).tolist() == [3.0]
    # Groups of 2 in index order: {0,1} {2,3} {4,5} ... The model ignores {0,1} and {2,3};
    # zero attribution: only {2,3} ({4,5} has a_5 > 0). Symmetric difference: {0,1}: 1.
    assert non_sensitivity(model, x, 0, a, baseline=0.0, softmax=False,
                           features_in_step=2).tolist() == [1.0]
    # Groups of 3 (the last one partial: {15}): the model ignores only {0,1,2} ({3,4,5} holds
    # w_4, w_5 != 0); no group has zero attribution everywhere ({0,1,2} has a_0, a_1 > 0,
    # {3,4,5} has a_5 > 0). Symmetric difference: {0,1,2}: 1.
    assert non_sensitivity(model, x, 0, a, baseline=0.0, softmax=False,
                           features_in_step=3).tolist() == [1.0]
    # The perfect map (zero exactly where w is): 0 violations
    perfect = (w != 0).to(DOUBLE).view(1, 4, 4)
    assert non_sensitivity(model, x, 0, perfect, baseline=0.0, softmax=False).tolist() == [0.0]


def test_negative_attributions_are_not_zero_attributions():
    # abs=False: a strongly negative attribution is not "zero" (|a| >= eps). The model uses
    # every feature, the map is -1 everywhere: 0 violations (Quantus' `a < eps` counts all 16).
    model = linear_model(torch.ones(1, 16, dtype=DOUBLE))
    x = torch.ones(1, 1, 4, 4, dtype=DOUBLE)
    a = -torch.ones(1, 4, 4, dtype=DOUBLE)
    assert non_sensitivity(model, x, 0, a, abs=False, baseline=0.0,
                           softmax=False).tolist() == [0.0]


def test_pixel_maps_remove_every_channel_of_a_pixel():
    # Logit = x[channel 1, pixel 0]; a pixel map counts pixels: removing pixel 0 (all
    # channels) moves f, the others do not. A map that is 1 only on pixel 0: 0 violations; on
    # an element map it is 1 only on (channel 1, pixel 0): also 0.
    w = torch.zeros(1, 2 * 2 * 2, dtype=DOUBLE)
    w[0, 4] = 1.0  # channel 1, pixel (0, 0)
    model = linear_model(w)
    x = torch.ones(1, 2, 2, 2, dtype=DOUBLE)
    pixel = torch.zeros(1, 2, 2, dtype=DOUBLE)
    pixel[0, 0, 0] = 1.0
    assert non_sensitivity(model, x, 0, pixel, baseline=0.0, softmax=False).tolist() == [0.0]
    element = torch.zeros(1, 2, 2, 2, dtype=DOUBLE)
    element[0, 1, 0, 0] = 1.0
    assert non_sensitivity(model, x, 0, element, baseline=0.0, softmax=False).tolist() == [0.0]
    assert non_sensitivity(model, x, 0, pixel[:, None].expand(1, 2, 2, 2), baseline=0.0,
                           softmax=False).tolist() == [1.0]  # (channel 0, pixel 0) ignored


def test_batch_equals_per_sample_and_batch_size_does_not_matter(cnn):
    model, x, y, a = cnn
    whole = non_sensitivity(model, x, y, a)
    assert 0 < whole.sum() < 4 * 36
    for size in (2, 7):
        assert torch.equal(non_sensitivity(model, x, y, a, batch_size=size), whole)
    alone = torch.cat([non_sensitivity(model, x[i:i + 1], y[i:i + 1], a[i:i + 1])
                       for i in range(4)])
    assert torch.equal(alone, whole)
    assert torch.equal(non_sensitivity(model, x, y, a, sampling=Sampling(batch_size=3)),
                       non_sensitivity(model, x, y, a, batch_size=3))


def test_inputs_and_model_are_left_alone(cnn):
    model, x, y, a = cnn
    model.train()
    params = [p.detach().clone() for p in model.parameters()]
    x_copy, y_copy, a_copy = x.clone(), y.clone(), a.clone()
    try:
        non_sensitivity(model, x, y, a, normalise=None, abs=False)
        non_sensitivity(model, x, None, explain=lambda m, xx, yy: srdxai.explain(
            m, xx, yy, "saliency"), features_in_step=5)
        assert model.training
        assert all(p.requires_grad for p in model.parameters())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
        assert torch.equal(x, x_copy) and torch.equal(y, y_copy) and torch.equal(a, a_copy)
    finally:
        model.eval()


@pytest.mark.parametrize("options, message", [
    ({"eps": 0.0}, "eps must be a finite number > 0"),
    ({"eps": math.nan}, "eps must be a finite number > 0"),
    ({"features_in_step": 0}, "features_in_step must be an int >= 1"),
    ({"baseline": "grey"}, "unknown baseline"),
    ({"sampling": Sampling(), "seed": 1}, "not both"),
])
def test_bad_options_are_named(cnn, options, message):
    model, x, y, a = cnn
    with pytest.raises(InvalidInputError, match=message):
        non_sensitivity(model, x, y, a, **options)


def test_bad_inputs_are_named(cnn):
    model, x, y, a = cnn
    with pytest.raises(InvalidInputError, match="pass attributions= or explain="):
        non_sensitivity(model, x, y)
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        non_sensitivity(model, x, y, a.clone().fill_(math.nan))
    with pytest.raises(InvalidInputError, match="spatial size"):
        non_sensitivity(model, x, y, a[:, :3])
