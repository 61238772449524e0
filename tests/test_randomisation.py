"""Randomisation sanity checks: MPRT (cascading, independent) and the random-logit test,
against loops written from Adebayo et al.'s and Sixt et al.'s definitions with skimage's SSIM
and scipy's Spearman."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import srdxai
from srdxai import metrics
from srdxai.errors import InvalidInputError
from srdxai.metrics.randomisation import hog_cosine, map_similarity, randomisable_layers

skimage_metrics = pytest.importorskip("skimage.metrics")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 4)).eval()


def explain(model, x, y):
    return srdxai.explain(model, x, y, "gradient_x_input")


@pytest.fixture(scope="module")
def case():
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return small_cnn(), x, torch.tensor([0, 3, 1])


def _oracle_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    ua, ub = np.abs(a) / np.abs(a).max(), np.abs(b) / np.abs(b).max()
    return {"ssim": skimage_metrics.structural_similarity(ua, ub, data_range=1.0),
            "spearman_abs": scipy.stats.spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0],
            "spearman": scipy.stats.spearmanr(a.ravel(), b.ravel())[0]}


@pytest.mark.parametrize("order", ["cascading", "independent"])
def test_mprt_equals_a_loop_over_layers(case, order):
    model, x, y = case
    result = metrics.model_parameter_randomisation(model, x, y, explain=explain, order=order,
                                                   seed=5, keep_maps=True)
    names = ["7", "3", "1", "0"]  # Linear, second conv, BatchNorm, first conv: output first
    assert result.layers == names == randomisable_layers(model)
    original = explain(model, x, y).detach().double().numpy()
    twin = copy.deepcopy(model)
    for k, name in enumerate(names):
        if order == "independent":
            twin = copy.deepcopy(model)
        torch.manual_seed(5 + k)
        dict(twin.named_modules())[name].reset_parameters()
        maps = explain(twin, x, y).detach().double().numpy()
        assert np.allclose(result.maps[k].numpy(), maps, atol=1e-6)
        for s in range(3):
            expected = _oracle_similarity(original[s], maps[s])
            for measure, value in expected.items():
                assert float(result.similarity[measure][k, s]) == pytest.approx(
                    value, abs=1e-6), (name, s, measure)


def test_mprt_leaves_the_model_and_the_random_state_alone(case):
    model, x, y = case
    state = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    metrics.model_parameter_randomisation(model, x, y, explain=explain, layers=["7", "0"])
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training


def test_mprt_refuses_what_it_cannot_do(case):
    model, x, y = case
    with pytest.raises(InvalidInputError, match="explain"):
        metrics.model_parameter_randomisation(model, x, y)
    with pytest.raises(InvalidInputError, match="no such layer"):
        metrics.model_parameter_randomisation(model, x, y, explain=explain, layers=["9"])
    with pytest.raises(InvalidInputError, match="unknown similarity"):
        metrics.model_parameter_randomisation(model, x, y, explain=explain,
                                              measures=["ssim", "psnr"])
    with pytest.raises(InvalidInputError, match="order"):
        metrics.model_parameter_randomisation(model, x, y, explain=explain, order="random")


def test_random_logit_compares_with_the_other_class_of_a_binary_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).eval()
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 1, 0])
    got = metrics.random_logit(model, x, y, explain=explain)
    mine, other = explain(model, x, y).double(), explain(model, x, 1 - y).double()
    for s in range(4):
        ssim = _oracle_similarity(mine[s].numpy(), other[s].numpy())["ssim"]
        assert float(got[s]) == pytest.approx(ssim, abs=1e-6)
    with pytest.raises(InvalidInputError, match="2 classes"):
        metrics.random_logit(nn.Sequential(nn.Flatten(), nn.Linear(192, 1)).eval(), x, None,
                             explain=explain)


def test_hog_cosine_equals_a_loop_and_is_one_for_the_same_structure():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 12, 10, generator=g, dtype=torch.float64)
    b = torch.rand(2, 12, 10, generator=g, dtype=torch.float64)

    def descriptor(m: np.ndarray) -> np.ndarray:
        h, w = m.shape
        hist = np.zeros((math.ceil(h / 8), math.ceil(w / 8), 9))
        for i in range(h):
            for j in range(w):
                gx = (m[i, j + 1] if j + 1 < w else 0.0) - (m[i, j - 1] if j >= 1 else 0.0)
                gy = (m[i + 1, j] if i + 1 < h else 0.0) - (m[i - 1, j] if i >= 1 else 0.0)
                if j == 0 or j == w - 1:
                    gx = 0.0  # no central difference at the border (padded with 0)
                if i == 0 or i == h - 1:
                    gy = 0.0
                angle = math.atan2(gy, gx) % math.pi
                cell_h = min(8, h - 8 * (i // 8))
                cell_w = min(8, w - 8 * (j // 8))
                hist[i // 8, j // 8, min(int(angle / math.pi * 9), 8)] += (
                    math.hypot(gx, gy) / (cell_h * cell_w))
        return hist.ravel()

    got = hog_cosine(a, b)
    for s in range(2):
        da, db = descriptor(a[s].numpy()), descriptor(b[s].numpy())
        expected = da @ db / np.linalg.norm(da) / np.linalg.norm(db)
        assert float(got[s]) == pytest.approx(expected, abs=1e-10)
    assert torch.allclose(hog_cosine(a, 3 * a), torch.ones(2, dtype=torch.float64))
    assert set(map_similarity(a, b)) == {"ssim", "spearman_abs", "spearman", "hog_cosine"}


def test_steps_group_consecutive_layers_and_independent_restores_each_group(case):
    model, x, y = case
    grouped = metrics.model_parameter_randomisation(model, x, y, explain=explain, steps=3,
                                                    seed=5, keep_maps=True)
    assert grouped.layers == ["7..3", "1", "0"]
    full = metrics.model_parameter_randomisation(model, x, y, explain=explain, seed=5,
                                                 keep_maps=True)
    # cascading: a group of two draws the same values as two single steps; the maps after it
    # are the maps after the second single step
    assert torch.allclose(grouped.maps[0], full.maps[1]) and torch.allclose(grouped.maps[2],
                                                                            full.maps[3])
    independent = metrics.model_parameter_randomisation(model, x, y, explain=explain,
                                                        order="independent", steps=2, seed=5,
                                                        keep_maps=True)
    assert independent.layers == ["7..3", "1..0"]
    twin = copy.deepcopy(model)
    for k, name in enumerate(["1", "0"]):
        torch.manual_seed(5 + 2 + k)
        dict(twin.named_modules())[name].reset_parameters()
    assert torch.allclose(independent.maps[1], explain(twin, x, y).detach().double(),
                          atol=1e-6)
    with pytest.raises(InvalidInputError, match="steps"):
        metrics.model_parameter_randomisation(model, x, y, explain=explain, steps=0)


def test_a_model_that_cannot_be_copied_is_a_clear_error(case):
    import threading

    model, x, y = case
    odd = copy.deepcopy(model)
    odd.lock = threading.Lock()  # not deep-copyable
    with pytest.raises(InvalidInputError, match="deepcopy"):
        metrics.model_parameter_randomisation(odd, x, y, explain=explain)


def test_discrete_entropy_equals_numpy_histogram_and_scipy():
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(3, 9, 11, generator=g, dtype=torch.float64) ** 3
    maps[2] = 1.5  # constant: entropy 0
    got = metrics.randomisation.discrete_entropy(maps, n_bins=17)
    for s in range(3):
        hist, _ = np.histogram(maps[s].numpy(), bins=17)
        assert float(got[s]) == pytest.approx(scipy.stats.entropy(hist), abs=1e-12)


def test_efficient_mprt_is_the_relative_rise_of_entropy_on_the_random_model(case):
    model, x, y = case
    got = metrics.efficient_mprt(model, x, y, explain=explain, seed=3, n_bins=20)
    twin = copy.deepcopy(model)
    for k, name in enumerate(["0", "1", "3", "7"]):  # bottom-up, all of them
        torch.manual_seed(3 + k)
        dict(twin.named_modules())[name].reset_parameters()
    before = explain(model, x, y).detach().double().numpy()
    after = explain(twin, x, y).detach().double().numpy()
    for s in range(3):
        h0 = scipy.stats.entropy(np.histogram(before[s], bins=20)[0])
        h1 = scipy.stats.entropy(np.histogram(after[s], bins=20)[0])
        assert float(got[s]) == pytest.approx((h1 - h0) / h0, abs=1e-6)


def test_smooth_mprt_without_noise_is_mprt_and_with_noise_is_reproducible(case):
    model, x, y = case
    plain = metrics.model_parameter_randomisation(model, x, y, explain=explain,
                                                  order="bottom_up", measures=["spearman"])
    assert plain.layers == ["0", "1", "3", "7"]
    quiet = metrics.smooth_mprt(model, x, y, explain=explain, nr_samples=2, noise_magnitude=0.0)
    assert torch.allclose(quiet.similarity["spearman"], plain.similarity["spearman"])
    noisy = metrics.smooth_mprt(model, x, y, explain=explain, nr_samples=3, seed=1)
    again = metrics.smooth_mprt(model, x, y, explain=explain, nr_samples=3, seed=1)
    assert torch.equal(noisy.similarity["spearman"], again.similarity["spearman"])
    assert not torch.allclose(noisy.similarity["spearman"], plain.similarity["spearman"])
