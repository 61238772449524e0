"""Cross-checks of srdxai.metrics.attribution_tests against Quantus 0.6 (tiny CNN, 3x16x16).

Model and inputs are float64 on both sides (see tests/test_metrics_quantus.py), so scores agree
to 1e-9 relative where the definitions agree. Random draws are recorded during the Quantus call
(``np.random.uniform`` for MonotonicityCorrelation) and passed to ours as ``draws=``. Each
documented Quantus bug has a test that shows it. Quantus imports zennit, which imports
torchvision: that needs tests/_compat.py's shim.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from quantus_guard import PER_SAMPLE, RTOL, import_quantus
from srdxai.metrics.attribution_tests import (
    focus,
    infidelity,
    monotonicity_correlation,
    sufficiency,
)

quantus = import_quantus()

QUIET = {"disable_warnings": True}
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


class TinyCNN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3/2 -> ReLU -> global average pool -> Linear(6 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    signed = srdxai.explain(model, x, y, "gradient_x_input")
    elements = srdxai.explain(model, x, y, "gradient_x_input", channel_reduce="none")
    return {"model": model, "x": x.numpy(), "y": y.numpy(), "a": signed.numpy(),
            "elements": elements.numpy()}


@pytest.fixture(scope="module")
def varied():
    """A linear model on 8 random images: its predictions vary (three classes), which
    sufficiency needs (the tiny CNN predicts one class for every image)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)).double().eval()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    assert len(set(y.tolist())) == 3
    a = srdxai.explain(model, x, y, "gradient_x_input")
    return {"model": model, "x": x.numpy(), "y": y.numpy(), "a": a.numpy()}


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
    maps = maps[:, None] if maps.ndim == 3 else maps
    with quantus_in_float64():
        out = metric(model=data["model"], x_batch=data["x"], y_batch=data["y"], a_batch=maps,
                     **kwargs)
    return np.asarray(out, dtype=np.float64)


def assert_same(ours: torch.Tensor, theirs: np.ndarray, rtol: float = RTOL) -> None:
    np.testing.assert_allclose(ours.detach().cpu().numpy(), theirs, rtol=rtol, atol=0,
                               equal_nan=True)


class Recorder:
    """Wrap a numpy.random function and keep what it returned."""

    def __init__(self, monkeypatch, name: str):
        self.real = getattr(np.random, name)
        self.draws: list[np.ndarray] = []
        monkeypatch.setattr(np.random, name, self)

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.draws.append(np.asarray(out))
        return out


# --- infidelity -------------------------------------------------------------------------------

def single_patch(x: np.ndarray, baseline: str):
    """A Quantus perturb_func that removes one patch from the *original* images (Quantus hands
    it the previous, already perturbed images); the baseline as Quantus' "black" / "mean"."""
    flat = x.reshape(x.shape[0], -1)
    value = {"black": flat.min(1), "mean": flat.mean(1)}[baseline]

    def perturb(arr, indices, **kwargs):
        assert arr.shape == flat.shape
        out = flat.copy()
        out[np.arange(flat.shape[0])[:, None], indices] = value[:, None]
        return out

    return perturb


@pytest.mark.parametrize("baseline", ["black", "mean"])
@pytest.mark.parametrize("sizes, preprocessing", [
    ([4], {}), ([2, 4, 8], {}), ([4, 16], {"abs": True, "normalise": True})])
def test_infidelity_matches_quantus_with_single_patch_perturbations(data, baseline, sizes,
                                                                   preprocessing):
    theirs = quantus_call(
        quantus.Infidelity(perturb_func=single_patch(data["x"], baseline),
                           perturb_patch_sizes=sizes, **preprocessing, **PER_SAMPLE),
        data, data["a"])
    ours = infidelity(data["model"], data["x"], data["y"], data["a"], patch_sizes=sizes,
                      baseline=baseline, abs=preprocessing.get("abs", False),
                      normalise=preprocessing.get("normalise", None))
    assert_same(ours, theirs)
    assert np.all(theirs > 0)


def cumulative_reference(data, patch: int) -> np.ndarray:
    """Quantus 0.6's Infidelity written out: patches in raster order, each removed on top of
    the previous ones (black baseline), the squared error averaged over the sweep."""
    model, x = data["model"], torch.as_tensor(data["x"])
    y = torch.as_tensor(data["y"])
    a = torch.as_tensor(data["a"])[:, None].expand_as(x)
    black = x.flatten(1).amin(1).view(-1, 1, 1, 1)
    with torch.no_grad():
        clean = model(x).gather(1, y[:, None])[:, 0]
        current, errors = x.clone(), []
        for top in range(0, x.shape[2], patch):
            for left in range(0, x.shape[3], patch):
                current[:, :, top:top + patch, left:left + patch] = black
                change = clean - model(current).gather(1, y[:, None])[:, 0]
                errors.append(((a * (x - current)).flatten(1).sum(1) - change) ** 2)
    return torch.stack(errors, 1).mean(1).numpy()


def test_quantus_infidelity_removes_patches_cumulatively(data):
    """Quantus 0.6 bug: its image is not restored between patches, so its perturbations are
    the growing prefixes of a raster sweep (the last one removes the whole image). Its score is
    that sweep's, not the single-patch expectation ours (and Quantus with a single-patch
    perturb_func) computes; its n_perturb_samples repeats the same deterministic sweep."""
    theirs = quantus_call(quantus.Infidelity(perturb_patch_sizes=[4], **QUIET), data, data["a"])
    np.testing.assert_allclose(theirs, cumulative_reference(data, 4), rtol=RTOL)
    repeated = quantus_call(quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=3,
                                               **QUIET), data, data["a"])
    np.testing.assert_allclose(repeated, theirs, rtol=1e-12)
    ours = infidelity(data["model"], data["x"], data["y"], data["a"], patch_sizes=4).numpy()
    assert np.all(np.abs(ours - theirs) > 0.1 * np.abs(theirs))


def test_quantus_infidelity_crashes_when_a_patch_size_does_not_divide_the_image(data):
    """Quantus 0.6 bug: it pads the image for patches that do not fit, then reshapes the
    unpadded one to the padded shape. Ours cuts the border patches instead."""
    with pytest.raises(ValueError, match="cannot reshape"):
        quantus_call(quantus.Infidelity(perturb_patch_sizes=[3], **QUIET), data, data["a"])
    ours = infidelity(data["model"], data["x"], data["y"], data["a"], patch_sizes=3)
    assert torch.isfinite(ours).all()


# --- monotonicity correlation -----------------------------------------------------------------

@pytest.mark.parametrize("step", [16, 64])
def test_monotonicity_correlation_matches_quantus_with_its_draws(data, monkeypatch, step):
    """Element maps without ties, so the ascending order (and the groups) is the same on both
    sides; Quantus draws one uniform value per sample for every (group, draw)."""
    recorder = Recorder(monkeypatch, "uniform")
    np.random.seed(3)
    theirs = quantus_call(quantus.MonotonicityCorrelation(nr_samples=4, features_in_step=step,
                                                          **PER_SAMPLE), data, data["elements"])
    monkeypatch.undo()
    groups, n = 3 * 16 * 16 // step, data["x"].shape[0]
    draws = np.stack(recorder.draws).reshape(groups, 4, n).transpose(2, 0, 1)
    ours = monotonicity_correlation(data["model"], data["x"], data["y"], data["elements"],
                                    features_in_step=step, draws=draws)
    assert_same(ours, theirs)
    assert np.isfinite(theirs).all() and len(set(np.round(theirs, 6))) > 1


def test_monotonicity_correlation_deterministic_baseline_matches_quantus(data):
    """With a deterministic baseline Quantus' draws are all the same input: one is enough."""
    theirs = quantus_call(quantus.MonotonicityCorrelation(
        nr_samples=2, features_in_step=32, perturb_baseline="black", **PER_SAMPLE),
        data, data["elements"])
    ours = monotonicity_correlation(data["model"], data["x"], data["y"], data["elements"],
                                    features_in_step=32, baseline="black")
    assert_same(ours, theirs)


# --- sufficiency ------------------------------------------------------------------------------

def assert_same_or_nan_for_zero(ours: torch.Tensor, theirs: np.ndarray) -> None:
    """Ours is NaN exactly where no other sample is alike, which Quantus scores 0."""
    ours_np = ours.numpy()
    undefined = np.isnan(ours_np)
    assert np.all(theirs[undefined] == 0)
    np.testing.assert_allclose(ours_np[~undefined], theirs[~undefined], rtol=RTOL, atol=0)


def sufficiency_from_scipy(data, maps: np.ndarray, distance: str, threshold: float):
    """Sufficiency written out with scipy's distances: the other samples within the threshold
    (distances divided by the largest), and the share of them with the same predicted class;
    NaN without any."""
    from scipy.spatial.distance import cdist

    flat = maps.reshape(len(maps), -1)
    distances = cdist(flat, flat, distance)
    alike = distances / distances.max() <= threshold
    np.fill_diagonal(alike, False)
    with torch.no_grad():
        predicted = data["model"](torch.as_tensor(data["x"])).argmax(1).numpy()
    same = predicted[:, None] == predicted[None, :]
    with np.errstate(invalid="ignore"):
        return (alike & same).sum(1) / alike.sum(1)


def test_sufficiency_matches_quantus(varied):
    # Quantus normalises over the batch; a global scale cancels in the distance normalisation,
    # so Quantus' default equals ours without normalisation ...
    theirs = quantus_call(quantus.Sufficiency(threshold=0.9, **QUIET), varied, varied["a"])
    ours = sufficiency(varied["model"], varied["x"], varied["y"], varied["a"], threshold=0.9,
                       normalise=None)
    assert_same_or_nan_for_zero(ours, theirs)
    finite = ours[~ours.isnan()]
    assert ours.isnan().any() and (finite > 0).any() and (finite < 1).any()  # every case
    # ... and ours per sample equals Quantus on maps normalised per sample beforehand.
    a = np.abs(varied["a"])
    per_sample = a / a.reshape(len(a), -1).max(1)[:, None, None]
    theirs = quantus_call(quantus.Sufficiency(threshold=0.9, normalise=False, **QUIET), varied,
                          per_sample)
    ours = sufficiency(varied["model"], varied["x"], varied["y"], varied["a"], threshold=0.9)
    assert_same_or_nan_for_zero(ours, theirs)


@pytest.mark.parametrize("distance, threshold", [("euclidean", 0.85), ("cityblock", 0.88)])
def test_quantus_sufficiency_refuses_every_distance_but_seuclidean(varied, distance,
                                                                  threshold):
    """Quantus 0.6 bug: it passes ``V=None`` to scipy's cdist whatever ``distance_func`` is,
    and every metric but "seuclidean" refuses that keyword (TypeError). Ours is checked
    against scipy's distances directly."""
    with pytest.raises(TypeError):
        quantus_call(quantus.Sufficiency(threshold=threshold, distance_func=distance, **QUIET),
                     varied, varied["a"])
    ours = sufficiency(varied["model"], varied["x"], varied["y"], varied["a"],
                       threshold=threshold, distance=distance, normalise=None)
    expected = sufficiency_from_scipy(varied, np.abs(varied["a"]), distance, threshold)
    assert_same(ours, expected)
    assert np.isnan(expected).any() and np.isfinite(expected).any()


def test_quantus_sufficiency_is_zero_when_a_feature_is_constant(varied):
    """Quantus 0.6 bug: "seuclidean" divides by each feature's variance over the batch; one
    feature equal in every map (here a zero corner) makes every distance 0/0 = NaN, and every
    sample scores 0. Ours leaves the feature out (it adds 0 to every distance): the scores of
    scipy's distances over the other features."""
    a = varied["a"].copy()
    a[:, 0, 0] = 0.0
    theirs = quantus_call(quantus.Sufficiency(threshold=0.9, **QUIET), varied, a)
    assert np.all(theirs == 0)
    ours = sufficiency(varied["model"], varied["x"], varied["y"], a, threshold=0.9,
                       normalise=None)
    without_corner = np.abs(a).reshape(len(a), -1)[:, 1:]
    expected = sufficiency_from_scipy(varied, without_corner, "seuclidean", 0.9)
    assert_same(ours, expected)
    assert (expected[np.isfinite(expected)] > 0).any()


def test_quantus_sufficiency_compares_only_within_its_batches(varied):
    """Quantus 0.6 compares a sample only with the samples of its evaluation batch
    (``batch_size``, 64 by default); ours with every sample of the call. Quantus with batch
    size 4 equals ours on each half."""
    theirs = quantus_call(quantus.Sufficiency(threshold=0.9, **QUIET), varied, varied["a"],
                          batch_size=4)
    halves = torch.cat([sufficiency(varied["model"], varied["x"][part], varied["y"][part],
                                    varied["a"][part], threshold=0.9, normalise=None)
                        for part in (slice(0, 4), slice(4, 8))])
    assert_same_or_nan_for_zero(halves, theirs)
    whole = sufficiency(varied["model"], varied["x"], varied["y"], varied["a"], threshold=0.9,
                        normalise=None)
    assert not torch.equal(whole.nan_to_num(-1.0), halves.nan_to_num(-1.0))


# --- focus ------------------------------------------------------------------------------------

QUADRANTS = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]]


@pytest.mark.parametrize("abs_", [False, True])
@pytest.mark.parametrize("maps", ["a", "elements"])
def test_focus_matches_quantus(data, abs_, maps):
    theirs = quantus_call(quantus.Focus(abs=abs_, **PER_SAMPLE), data, data[maps],
                          custom_batch=QUADRANTS)
    ours = focus(data["model"], data["x"], data["y"], data[maps], quadrants=QUADRANTS,
                 abs=abs_)
    assert_same(ours, theirs, rtol=1e-12)
    assert len(set(np.round(theirs, 6))) > 1


def test_quantus_focus_scores_undefined_shares_zero(data):
    """Quantus 0.6 returns 0 for a map without positive relevance and for a mosaic without a
    target tile (its 1e-9 turns 0/0 into 0); the share is undefined there: ours is NaN."""
    a = -np.abs(data["a"])
    a[1:, 0, 0] = 1.0
    quadrants = [[1, 0, 0, 0]] + [[0, 0, 0, 0]] + QUADRANTS[2:]
    theirs = quantus_call(quantus.Focus(**PER_SAMPLE), data, a, custom_batch=quadrants)
    ours = focus(data["model"], data["x"], data["y"], a, quadrants=quadrants)
    assert theirs[:2].tolist() == [0.0, 0.0] and math.isnan(ours[0]) and math.isnan(ours[1])
    assert_same(ours[2:], theirs[2:], rtol=1e-12)
