"""srdxai.metrics.attribution_tests: infidelity, monotonicity correlation, sufficiency and Focus.

Known answers on hand-built models (derivations in the comments), batch = per sample, chunking,
inputs and model left alone, errors, and the sampling object. The Quantus cross-checks are in
tests/test_metrics_quantus_attribution_tests.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from srdxai.errors import InvalidInputError
from srdxai.metrics.attribution_tests import (
    focus,
    focus_mosaics,
    gaussian_noise,
    infidelity,
    monotonicity_correlation,
    quadrant_masks,
    sufficiency,
)
from srdxai.metrics.sampling import Sampling

DOUBLE = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def linear_model(weight: torch.Tensor) -> nn.Module:
    """Logits = weight @ flatten(x), no bias (weight: (classes, features))."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model.to(DOUBLE).eval()


class Recording(nn.Module):
    """A model that keeps every batch it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.detach().clone())
        return self.inner(x)


def gradient_x_input(model, x, y):
    return srdxai.explain(model, x, y, "gradient_x_input")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = TinyCNN().to(DOUBLE).eval()
    x = torch.randn(4, 3, 8, 8, dtype=DOUBLE)
    # a class per sample, not the predicted ones (all 0 here): a chunk's wrong targets fail
    y = torch.tensor([0, 2, 1, 2])
    return model, x, y, gradient_x_input(model, x, y)


#: cheap options per metric for the generic tests
CHEAP = {
    "infidelity": (infidelity, {"patch_sizes": (2, 3)}),
    "infidelity_gaussian": (infidelity, {"perturbation": "gaussian", "nr_samples": 3}),
    "monotonicity_correlation": (monotonicity_correlation,
                                 {"nr_samples": 3, "features_in_step": 4}),
    "sufficiency": (sufficiency, {"threshold": 0.95}),
}
PER_SAMPLE = ["infidelity", "infidelity_gaussian", "monotonicity_correlation"]


# --- infidelity -------------------------------------------------------------------------------

def test_infidelity_known_answers_on_the_sum_model():
    # f(x) = sum of all 16 pixels of one 4x4 image holding 0..15, baseline 0, map a = 0:
    # I . a = 0, so each patch scores (its pixel sum)^2. Patches of 2x2: sums 0+1+4+5 = 10,
    # 2+3+6+7 = 18, 8+9+12+13 = 42, 10+11+14+15 = 50; mean of squares (100 + 324 + 1764 +
    # 2500) / 4 = 1172.
    model = linear_model(torch.ones(1, 16, dtype=DOUBLE))
    x = torch.arange(16, dtype=DOUBLE).view(1, 1, 4, 4)
    zero_map = torch.zeros(1, 4, 4, dtype=DOUBLE)
    got = infidelity(model, x, 0, zero_map, patch_sizes=2, baseline=0.0)
    assert got.tolist() == [1172.0]
    # The map a = 1 (the gradient) explains every removal exactly: infidelity 0.
    ones_map = torch.ones(1, 4, 4, dtype=DOUBLE)
    assert infidelity(model, x, 0, ones_map, patch_sizes=2, baseline=0.0).tolist() == [0.0]
    # a = 3 overshoots by 2 x the patch sum: (2 * sum)^2, 4 x 1172; optimal scaling
    # (beta = 1/3) removes it.
    assert infidelity(model, x, 0, 3 * ones_map, patch_sizes=2, baseline=0.0).tolist() == [
        4 * 1172.0]
    scaled = infidelity(model, x, 0, 3 * ones_map, patch_sizes=2, baseline=0.0,
                        optimal_scale=True)
    assert scaled.item() == pytest.approx(0.0, abs=1e-20)


def test_infidelity_patches_that_do_not_divide_the_image():
    # A 5x5 image of ones under the sum model, a = 0, baseline 0: a patch scores its area^2.
    # p = 2: 1 pixel of padding, none before (floor(1/2) = 0): rows/cols [0,2), [2,4), [4,5),
    # areas 4 4 2 / 4 4 2 / 2 2 1, mean of squares (16*4 + 4*4 + 1) / 9 = 81 / 9 = 9.
    # p = 3: padding 1, none before: [0,3), [3,5): areas 9 6 6 4, (81+36+36+16) / 4 = 42.25.
    # Both sizes: the mean of the two means, 25.625. p = 4 (padding 3: 1 before): [0,3),
    # [3,5): the same patches as p = 3.
    model = linear_model(torch.ones(1, 25, dtype=DOUBLE))
    x = torch.ones(1, 1, 5, 5, dtype=DOUBLE)
    a = torch.zeros(1, 5, 5, dtype=DOUBLE)
    assert infidelity(model, x, 0, a, patch_sizes=2, baseline=0.0).tolist() == [9.0]
    assert infidelity(model, x, 0, a, patch_sizes=3, baseline=0.0).tolist() == [42.25]
    both = infidelity(model, x, 0, a, patch_sizes=(2, 3), baseline=0.0)
    assert both.item() == pytest.approx(25.625, rel=1e-15)
    assert infidelity(model, x, 0, a, patch_sizes=4, baseline=0.0).tolist() == [42.25]


def test_infidelity_gaussian_known_answer_with_explicit_noise():
    # Sum model on one 1x2x2 image, a = 0: each draw scores (sum of I)^2. Draws I = 0.5 and
    # I = -1 everywhere: sums 2 and -4, infidelity (4 + 16) / 2 = 10. The gradient map a = 1
    # explains any noise exactly.
    model = linear_model(torch.ones(1, 4, dtype=DOUBLE))
    x = torch.randn(1, 1, 2, 2, dtype=DOUBLE)
    noise = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), -1.0)])[None]
    zero = torch.zeros(1, 2, 2, dtype=DOUBLE)
    got = infidelity(model, x, 0, zero, perturbation="gaussian", draws=noise.to(DOUBLE))
    assert got.item() == pytest.approx(10.0, rel=1e-14)
    exact = infidelity(model, x, 0, torch.ones(1, 2, 2, dtype=DOUBLE), perturbation="gaussian",
                       nr_samples=5)
    assert exact.item() == pytest.approx(0.0, abs=1e-24)


@pytest.mark.parametrize("shape", [(5,), (16,), (17,), (3, 5, 5), (7, 3, 5, 5), (50, 3, 32, 32)])
def test_gaussian_noise_is_torchs_normal_to_the_last_bits(shape):
    # the same uniforms paired as torch's sampler pairs them (groups of 16, the tail of a size
    # 16 does not divide drawn again): each value within 4 units in the last place of
    # torch.normal's (torch's vectorised log, sin and cos against the C library's), most of
    # them equal, and the generator left where torch.normal leaves it
    eps = torch.finfo(DOUBLE).eps
    for seed, std in ((0, 1.0), (1, 0.1), (2, 3.7)):
        ours_g, torch_g = (torch.Generator().manual_seed(seed) for _ in range(2))
        got = gaussian_noise(shape, std, ours_g)
        expected = torch.normal(0.0, std, shape, generator=torch_g, dtype=DOUBLE)
        assert got.shape == shape and got.dtype == DOUBLE
        torch.testing.assert_close(got, expected, rtol=4 * eps, atol=0)
        if got.numel() >= 500:
            assert (got == expected).double().mean() > 0.95
        assert torch.equal(torch.rand(4, generator=ours_g), torch.rand(4, generator=torch_g))


def test_infidelity_pixel_maps_multiply_every_channel():
    # A pixel map equals the element map repeated over channels (Quantus' broadcast).
    model = linear_model(torch.randn(2, 3 * 4 * 4, generator=torch.Generator().manual_seed(3),
                                     dtype=DOUBLE))
    x = torch.randn(2, 3, 4, 4, dtype=DOUBLE)
    a = torch.randn(2, 4, 4, dtype=DOUBLE)
    for options in ({"patch_sizes": 2}, {"perturbation": "gaussian", "nr_samples": 4}):
        pixel = infidelity(model, x, [0, 1], a, **options)
        element = infidelity(model, x, [0, 1], a[:, None].expand(2, 3, 4, 4), **options)
        torch.testing.assert_close(pixel, element, rtol=1e-13, atol=0)


def test_infidelity_gaussian_matches_captum_with_the_same_noise(cnn):
    """Captum's infidelity with the perturbation ``(noise, x - noise)`` of its documentation,
    fed our noise in its ``repeat_interleave`` layout (sample-major). Captum wants maps of the
    input's shape: the pixel map repeated over channels, which is how ours reads it."""
    captum_metrics = pytest.importorskip("captum.metrics")
    model, x, y, a = cnn
    noise = torch.randn(4, 5, *x.shape[1:], generator=torch.Generator().manual_seed(9),
                        dtype=DOUBLE) * 0.1

    def perturb(inputs):
        return noise.reshape(-1, *x.shape[1:]), inputs - noise.reshape(-1, *x.shape[1:])

    for optimal in (False, True):
        theirs = captum_metrics.infidelity(model, perturb, x, a[:, None].expand_as(x), target=y,
                                           n_perturb_samples=5, normalize=optimal)
        ours = infidelity(model, x, y, a, perturbation="gaussian", draws=noise,
                          optimal_scale=optimal)
        torch.testing.assert_close(ours, theirs.to(DOUBLE), rtol=1e-9, atol=0)


# --- monotonicity correlation -----------------------------------------------------------------

def test_monotonicity_correlation_known_answer():
    # Linear logits f = w . x on one 1x4x4 image of zeros, every feature replaced by the value
    # 1 (explicit draws): the change of feature i is w_i, its mean square w_i^2, increasing in
    # |w_i|. The map |w| ranks the features the same way: Spearman 1; the map 1/|w| exactly
    # reversed: -1.
    w = torch.arange(1, 17, dtype=DOUBLE) * torch.tensor([1.0, -1.0]).repeat(8)
    model = linear_model(w[None])
    x = torch.zeros(1, 1, 4, 4, dtype=DOUBLE)
    ones = torch.ones(1, 16, 2, dtype=DOUBLE)
    good = w.abs().view(1, 4, 4)
    assert monotonicity_correlation(model, x, 0, good, softmax=False,
                                    draws=ones).item() == pytest.approx(1.0, abs=1e-15)
    assert monotonicity_correlation(model, x, 0, 1 / good, softmax=False,
                                    draws=ones).item() == pytest.approx(-1.0, abs=1e-15)
    # Groups of 2 under w = 1..16 (all positive): the group of features 2g, 2g+1 (0-based)
    # changes the logit by w_2g + w_2g+1 = 4g + 3, increasing with the group's sum of |w|.
    # (With the alternating signs above every group would change it by -1: constant, NaN.)
    positive = linear_model(w.abs()[None])
    pairs = torch.ones(1, 8, 3, dtype=DOUBLE)
    assert monotonicity_correlation(positive, x, 0, good, softmax=False, features_in_step=2,
                                    draws=pairs).item() == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(monotonicity_correlation(model, x, 0, good, softmax=False,
                                               features_in_step=2, draws=pairs))
    # a deterministic baseline: one forward pass per feature, the same answer
    assert monotonicity_correlation(model, x, 0, good, softmax=False,
                                    baseline=1.0).item() == pytest.approx(1.0, abs=1e-15)


def test_monotonicity_correlation_uses_one_draw_per_group_and_draw():
    # Two features per group, sum model, x = 0: each draw sets the group to one value v, so the
    # change is 2 v and the score of group g is mean_r (2 v_gr)^2.
    model = linear_model(torch.ones(1, 4, dtype=DOUBLE))
    x = torch.zeros(1, 1, 2, 2, dtype=DOUBLE)
    a = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]], dtype=DOUBLE)
    recording = Recording(model)
    draws = torch.tensor([[[0.5, 0.1], [0.2, 0.9]]], dtype=DOUBLE)  # (N, groups, runs)
    # an explicit batch size: the default would first probe the model's activation sizes
    monotonicity_correlation(recording, x, 0, a, softmax=False, features_in_step=2, draws=draws,
                             abs=False, normalise=None, batch_size=8)
    calls = recording.calls
    perturbed = torch.cat(calls[1:]).flatten(1)  # after the clean pass
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0.1, 0.1, 0, 0],
                             [0, 0, 0.2, 0.2], [0, 0, 0.9, 0.9]], dtype=DOUBLE)
    torch.testing.assert_close(perturbed, expected, rtol=0, atol=0)


# --- sufficiency ------------------------------------------------------------------------------

def sign_model() -> nn.Module:
    """Logits (x_0, -x_0) of the first input value: class 0 when it is positive."""
    weight = torch.zeros(2, 4, dtype=DOUBLE)
    weight[0, 0], weight[1, 0] = 1.0, -1.0
    return linear_model(weight)


def test_sufficiency_known_answer():
    # Maps: samples 0 and 1 share map A, samples 2 and 3 map B, so the only pairs within the
    # threshold are (0, 1) and (2, 3) (normalised distance 0; A-B is the largest, 1). The
    # predictions are 0, 0, 0, 1: samples 0 and 1 agree with their partner (1.0), 2 and 3 do
    # not (0.0). A fifth sample with a map C far from both has no partner: NaN.
    model = sign_model()
    x = torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=DOUBLE).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    first = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DOUBLE)
    second = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=DOUBLE)
    maps = torch.stack([first, first, second, second])
    for distance in ("seuclidean", "euclidean", "cityblock"):
        got = sufficiency(model, x.contiguous(), None, maps, distance=distance)
        assert got.tolist() == [1.0, 1.0, 0.0, 0.0], distance
    third = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DOUBLE)
    x5 = torch.cat([x, torch.ones(1, 1, 2, 2, dtype=DOUBLE)]).contiguous()
    got = sufficiency(model, x5, None, torch.cat([maps, third[None]]), distance="euclidean",
                      threshold=0.6)
    # A-B is sqrt(2), A-C and B-C sqrt(3): normalised sqrt(2/3) = 0.82 and 1, all > 0.6
    assert got[:4].tolist() == [1.0, 1.0, 0.0, 0.0] and math.isnan(got[4])


def test_sufficiency_compares_predictions_not_labels_and_ignores_constant_features():
    model = sign_model()
    x = torch.tensor([1.0, 2.0, -3.0], dtype=DOUBLE).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    maps = torch.tensor([[0.0, 1.0, 0.5, 0.2], [0.0, 1.0, 0.4, 0.2], [0.0, 0.0, 0.0, 0.2]],
                        dtype=DOUBLE).view(3, 2, 2)
    # Features 0 and 3 are the same in every map: left out of the standardised distance (scipy
    # would make every distance 0/0 = NaN). Features 1 and 2 have variances 2/9 and 0.14/3:
    # standardised distances 0.46 (0-1), 3.14 (0-2), 2.82 (1-2), normalised 0.15, 1, 0.90.
    # Only (0, 1) is within 0.5; both predict class 0: 1, 1, and NaN for sample 2. Labels y do
    # not enter: the predictions are compared.
    expected = sufficiency(model, x.contiguous(), None, maps, normalise=None, threshold=0.5)
    with_labels = sufficiency(model, x.contiguous(), [2, 2, 2], maps, normalise=None,
                              threshold=0.5)
    assert torch.equal(expected.nan_to_num(7.0), with_labels.nan_to_num(7.0))
    assert expected[:2].tolist() == [1.0, 1.0] and math.isnan(expected[2])


def test_sufficiency_permuting_the_batch_permutes_the_scores(cnn):
    model, x, y, a = cnn
    scores = sufficiency(model, x, y, a, threshold=0.95)
    order = torch.tensor([2, 0, 3, 1])
    permuted = sufficiency(model, x[order], y[order], a[order], threshold=0.95)
    torch.testing.assert_close(permuted, scores[order], rtol=1e-14, atol=0, equal_nan=True)
    assert torch.isfinite(scores).any()


# --- focus ------------------------------------------------------------------------------------

def test_focus_known_answer():
    # A 4x4 mosaic: relevance 3 in the top-left tile (one pixel), 1 in the bottom-right one,
    # -5 in the top-right one. Positive relevance 4, of which 3 on the target tile (top-left):
    # 0.75 (the 1e-9 of Quantus, against a positive total 0.8 after max-normalisation, moves
    # it by 1e-9). Both tiles: 1.0; none of the positives on
    # target tiles: 0.
    a = torch.zeros(1, 4, 4, dtype=DOUBLE)
    a[0, 0, 0], a[0, 3, 3], a[0, 1, 3] = 3.0, 1.0, -5.0
    assert focus(None, None, None, a, quadrants=[[1, 0, 0, 0]]).item() == pytest.approx(
        0.75, abs=1e-9)
    assert focus(None, None, None, a, quadrants=[[1, 0, 0, 1]]).item() == pytest.approx(
        1.0, abs=2e-9)
    assert focus(None, None, None, a, quadrants=[[0, 1, 1, 0]]).item() == 0.0
    # abs=True counts |-5| too: 3 / 9 on the top-left tile
    assert focus(None, None, None, a, quadrants=[[1, 0, 0, 0]], abs=True).item() == (
        pytest.approx(1 / 3, abs=1e-9))


def test_focus_masks_equal_quadrants_and_odd_sizes_split_at_half():
    quadrants = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]])
    masks = quadrant_masks(quadrants, 5, 7)
    # rows 0..1 are the top (5 // 2 = 2), columns 0..2 the left (7 // 2 = 3)
    assert masks[0, :2, :3].all() and not masks[0, :2, 3:].any()
    assert not masks[0, 2:, :3].any() and masks[0, 2:, 3:].all()
    assert masks[1].sum() == 5 * 7 - 2 * 3
    a = torch.randn(2, 3, 5, 7, dtype=DOUBLE)
    by_quadrants = focus(None, None, None, a, quadrants=quadrants)
    by_masks = focus(None, None, None, a, masks)
    torch.testing.assert_close(by_quadrants, by_masks, rtol=0, atol=0)


def test_focus_undefined_shares_are_nan():
    a = -torch.rand(2, 4, 4, dtype=DOUBLE)  # no positive relevance
    a[1, 0, 0] = 1.0
    got = focus(None, None, None, a, quadrants=[[1, 0, 0, 0], [0, 0, 0, 0]])
    assert math.isnan(got[0]) and math.isnan(got[1])  # no positives; no target tile
    with pytest.raises(InvalidInputError, match="empty"):
        focus(None, None, None, a, quadrants=[[1, 0, 0, 0], [0, 0, 0, 0]], empty_mask="raise")


def test_focus_with_explain_on_built_mosaics(cnn):
    model, _, _, _ = cnn
    images = torch.randn(8, 3, 4, 4, dtype=DOUBLE)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2])
    mosaics, quadrants = focus_mosaics(images, labels, torch.tensor([0, 1]))
    assert mosaics.shape == (2, 3, 8, 8)
    assert quadrants.tolist() == [[True, False, True, False], [True, True, False, False]]
    torch.testing.assert_close(mosaics[1, :, 4:, 4:], images[7], rtol=0, atol=0)
    targets = torch.tensor([0, 1])
    computed = focus(model, mosaics, targets, explain=gradient_x_input, quadrants=quadrants)
    given = focus(model, mosaics, targets, gradient_x_input(model, mosaics, targets),
                  quadrants=quadrants)
    torch.testing.assert_close(computed, given, rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="multiple|4M"):
        focus_mosaics(images[:6], labels[:6], targets)


# --- shared properties ------------------------------------------------------------------------

@pytest.mark.parametrize("name", PER_SAMPLE)
def test_batch_equals_per_sample_and_batch_size_does_not_matter(cnn, name):
    model, x, y, a = cnn
    fn, options = CHEAP[name]
    whole = fn(model, x, y, a, **options, seed=3)
    for size in (2, 7):
        torch.testing.assert_close(fn(model, x, y, a, **options, seed=3, batch_size=size),
                                   whole, rtol=1e-12, atol=1e-15, equal_nan=True)
    if name == "infidelity":  # deterministic: each sample alone gives its own score
        alone = torch.cat([fn(model, x[i:i + 1], y[i:i + 1], a[i:i + 1], **options)
                           for i in range(4)])
        torch.testing.assert_close(alone, whole, rtol=1e-12, atol=1e-15)


def test_random_metrics_alone_equal_the_batch_with_the_batch_draws(cnn):
    """With the draws of the batch (our own, recorded by layout), each sample alone scores as
    in the batch."""
    model, x, y, a = cnn
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 3, *x.shape[1:], generator=gen, dtype=DOUBLE) * 0.1
    values = torch.rand(4, 48, 2, generator=gen, dtype=DOUBLE)  # 3*8*8/4 = 48 groups
    element = srdxai.explain(model, x, y, "gradient_x_input", channel_reduce="none")
    cases = [(infidelity, {"perturbation": "gaussian"}, noise, a),
             (monotonicity_correlation, {"features_in_step": 4}, values, element)]
    for fn, options, draws, maps in cases:
        whole = fn(model, x, y, maps, **options, draws=draws)
        alone = torch.cat([fn(model, x[i:i + 1], y[i:i + 1], maps[i:i + 1], **options,
                              draws=draws[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(alone, whole, rtol=1e-12, atol=1e-15)


def test_own_draws_are_the_documented_layout(cnn):
    """Seeded draws equal the same draws passed explicitly: per sample, in sample order, one
    generator (infidelity: randn (nr_samples, C, H, W) * noise_std; monotonicity: rand
    (groups * nr_samples) scaled to [low, high))."""
    model, x, y, a = cnn
    g = torch.Generator().manual_seed(11)
    noise = torch.stack([torch.randn(3, *x.shape[1:], generator=g, dtype=DOUBLE) * 0.2
                         for _ in range(4)])
    torch.testing.assert_close(
        infidelity(model, x, y, a, perturbation="gaussian", nr_samples=3, noise_std=0.2,
                   seed=11),
        infidelity(model, x, y, a, perturbation="gaussian", draws=noise), rtol=1e-13, atol=0)
    g = torch.Generator().manual_seed(12)
    values = torch.stack([torch.rand(16 * 2, generator=g, dtype=DOUBLE) * 2 - 1
                          for _ in range(4)]).view(4, 16, 2)
    torch.testing.assert_close(
        monotonicity_correlation(model, x, y, a, nr_samples=2, features_in_step=4,
                                 uniform_low=-1.0, uniform_high=1.0, seed=12),
        monotonicity_correlation(model, x, y, a, features_in_step=4, draws=values),
        rtol=1e-13, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_sampling_object_equals_keywords_and_the_seed_matters(cnn, name):
    model, x, y, a = cnn
    fn, options = CHEAP[name]
    by_object = fn(model, x, y, a, **options, sampling=Sampling(seed=4, batch_size=3))
    by_keywords = fn(model, x, y, a, **options, seed=4, batch_size=3)
    torch.testing.assert_close(by_object, by_keywords, rtol=0, atol=0, equal_nan=True)
    if name in ("infidelity_gaussian", "monotonicity_correlation"):
        other = fn(model, x, y, a, **options, sampling=Sampling(seed=5))
        assert not torch.equal(other.nan_to_num(7.0), by_object.nan_to_num(7.0))
    with pytest.raises(InvalidInputError, match="not both"):
        fn(model, x, y, a, **options, sampling=Sampling(seed=4), seed=4)


@pytest.mark.parametrize("name", sorted(CHEAP) + ["focus"])
def test_inputs_and_model_are_left_alone(cnn, name):
    model, x, y, a = cnn
    model.train()
    params = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    x_copy, y_copy, a_copy = x.clone(), y.clone(), a.clone()
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True
    masks_copy = masks.clone()
    try:
        if name == "focus":
            focus(model, x, y, a, masks, normalise=None)
            focus(model, x, y, explain=gradient_x_input, quadrants=np.eye(4)[:, ::-1].copy())
        else:
            fn, options = CHEAP[name]
            fn(model, x, y, a, masks, **options, normalise=None)
            fn(model, x, y, explain=gradient_x_input, **options)
        assert model.training
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
        assert [p.requires_grad for p in model.parameters()] == flags
        assert torch.equal(x, x_copy) and torch.equal(y, y_copy) and torch.equal(a, a_copy)
        assert torch.equal(masks, masks_copy)
    finally:
        model.eval()


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y, a: infidelity(m, x, y, a, perturbation="noise"), "perturbation must be"),
    (lambda m, x, y, a: infidelity(m, x, y, a, patch_sizes=0), "patch size must be an int"),
    (lambda m, x, y, a: infidelity(m, x, y, a, patch_sizes=[]), "at least one patch size"),
    (lambda m, x, y, a: infidelity(m, x, y, a, draws=torch.zeros(4, 2, 3, 8, 8)),
     "perturbation='gaussian'"),
    (lambda m, x, y, a: infidelity(m, x, y, a, perturbation="gaussian", noise_std=0.0),
     "noise_std must be a finite number > 0"),
    (lambda m, x, y, a: infidelity(m, x, y, a, perturbation="gaussian",
                                   draws=torch.zeros(4, 2, 3, 8, 7)),
     r"draws must have shape \(N, nr_samples, C, H, W\) = \(4, any, 3, 8, 8\)"),
    (lambda m, x, y, a: infidelity(m, x, y, a, perturbation="gaussian",
                                   draws=torch.full((4, 1, 3, 8, 8), math.nan)),
     "draws contain NaN"),
    (lambda m, x, y, a: infidelity(m, x, y, a[:2]), "hold 2 maps but x holds 4"),
    (lambda m, x, y, a: infidelity(m, x, y), "pass attributions= or explain="),
    (lambda m, x, y, a: monotonicity_correlation(m, x, y, a, uniform_low=1.0,
                                                 uniform_high=0.0), "uniform_high"),
    (lambda m, x, y, a: monotonicity_correlation(m, x, y, a, features_in_step=0),
     "features_in_step must be an int >= 1"),
    (lambda m, x, y, a: monotonicity_correlation(m, x, y, a, baseline="black",
                                                 draws=torch.zeros(4, 64, 1)),
     "deterministic"),
    (lambda m, x, y, a: monotonicity_correlation(m, x, y, a, draws=torch.zeros(4, 63, 2)),
     r"\(N, groups, nr_samples\) = \(4, 64, any\)"),
    (lambda m, x, y, a: monotonicity_correlation(m, x, y, a, baseline="grey"),
     "unknown baseline"),
    (lambda m, x, y, a: sufficiency(m, x, y, a, distance="cosine"), "distance must be one of"),
    (lambda m, x, y, a: sufficiency(m, x, y, a, threshold=math.nan), "threshold must be a fin"),
    (lambda m, x, y, a: focus(m, x, y, a), "masks="),
    (lambda m, x, y, a: focus(m, x, y, a, torch.ones(4, 8, 8), quadrants=torch.ones(4, 4)),
     "not both"),
    (lambda m, x, y, a: focus(m, x, y, a, quadrants=torch.ones(4, 3)), r"shape \(N, 4\)"),
    (lambda m, x, y, a: focus(m, x, y, a, quadrants=torch.full((4, 4), 2)), "0/1 or bool"),
    (lambda m, x, y, a: focus(m, x, y, a, quadrants=torch.ones(3, 4)), "3 rows but there are 4"),
    (lambda m, x, y, a: focus(m, x, y, a, torch.full((4, 8, 8), 0.5)), "binary"),
])
def test_bad_inputs_are_named(cnn, call, message):
    model, x, y, a = cnn
    with pytest.raises(InvalidInputError, match=message):
        call(model, x, y, a)
