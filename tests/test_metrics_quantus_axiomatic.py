"""Cross-check of srdxai.metrics.axiomatic against Quantus 0.6 (tiny CNN, 3x8x8, float64).

Non-sensitivity is deterministic: the scores must be equal. Quantus 0.6 reads a one-channel map
broadcast over channels (features are input elements), so it is given element maps. The
documented Quantus bugs each have a test. Quantus imports zennit, which imports torchvision:
that needs tests/_compat.py's shim.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from quantus_guard import PER_SAMPLE, import_quantus
from srdxai.metrics.axiomatic import non_sensitivity

quantus = import_quantus()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).double().eval()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    elements = srdxai.explain(model, x, y, "gradient_x_input", channel_reduce="none")
    elements[:, :, :3] = 0.0  # zero attribution on the top rows, which the model does use
    return {"model": model, "x": x.numpy(), "y": y.numpy(), "elements": elements.numpy()}


@contextlib.contextmanager
def quantus_in_float64():
    """Quantus feeds the model ``torch.Tensor(x)``: make the default dtype float64."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_default_dtype(default)


def quantus_call(metric, data, maps, **kwargs):
    with quantus_in_float64():
        out = metric(model=data["model"], x_batch=data["x"], y_batch=data["y"], a_batch=maps,
                     **kwargs)
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("options", [
    {},  # Quantus' defaults: abs, max-normalised, black baseline, probabilities, eps 1e-5
    {"eps": 1e-3, "perturb_baseline": "mean"},
    {"softmax": False, "eps": 1e-4},
])
def test_non_sensitivity_matches_quantus(data, options):
    options = dict(options)
    softmax = options.pop("softmax", True)
    theirs = quantus_call(quantus.NonSensitivity(**options, **PER_SAMPLE), data,
                          data["elements"], softmax=softmax)
    ours = non_sensitivity(data["model"], data["x"], data["y"], data["elements"],
                           eps=options.get("eps", 1e-5),
                           baseline=options.get("perturb_baseline", "black"), softmax=softmax)
    np.testing.assert_array_equal(ours.numpy(), theirs)
    assert len(set(theirs.tolist())) > 1 and theirs.min() > 0


def test_quantus_non_sensitivity_crashes_for_groups_of_features(data):
    """Quantus 0.6 bug: with ``features_in_step > 1`` it XORs one "no effect" flag per group
    with one "zero attribution" flag per feature: a broadcasting error. Ours counts groups."""
    with pytest.raises(ValueError, match="broadcast"):
        quantus_call(quantus.NonSensitivity(features_in_step=2, **PER_SAMPLE), data,
                     data["elements"])
    ours = non_sensitivity(data["model"], data["x"], data["y"], data["elements"],
                           features_in_step=2)
    assert torch.all((ours >= 0) & (ours <= 3 * 8 * 8 / 2))


def test_quantus_non_sensitivity_counts_negative_attributions_as_zero(data):
    """Quantus 0.6 bug: it tests ``a < eps`` rather than ``|a| < eps``, so with ``abs=False``
    every negative attribution counts as "zero attribution". Quantus on the signed map equals
    ours on the map with its negative part set to 0."""
    signed = data["elements"]
    assert (signed < 0).any()
    theirs = quantus_call(quantus.NonSensitivity(abs=False, normalise=False,
                                                 disable_warnings=True), data, signed)
    clipped = non_sensitivity(data["model"], data["x"], data["y"], np.clip(signed, 0, None),
                              abs=False, normalise=None)
    np.testing.assert_array_equal(clipped.numpy(), theirs)
    ours = non_sensitivity(data["model"], data["x"], data["y"], signed, abs=False,
                           normalise=None)
    assert (ours.numpy() < theirs).all()
