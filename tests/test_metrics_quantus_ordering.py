"""Cross-checks of srdxai.metrics.ordering (ROAD, region perturbation, IROF, selectivity)
against Quantus 0.6, and tests that show each Quantus bug the docstrings document.

As in tests/test_metrics_quantus.py: float64 tiny CNNs on both sides (Quantus feeds the model
``torch.Tensor(x)``, so its calls run with float64 as the default dtype), agreement to 1e-9
relative, Quantus' numpy draws recorded during its call and fed to ours as ``draws=``.
Quantus imports zennit, which imports torchvision: that needs tests/_compat.py's shim.
Quantus 0.6's IROF calls ``np.trapz``, which numpy 2.4 removed: those tests put
``np.trapezoid`` (the same function) back under the old name.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from quantus_guard import PER_SAMPLE, RTOL, import_quantus
from srdxai.metrics.ordering import (
    irof,
    noisy_linear_imputation,
    region_perturbation,
    road,
    selectivity,
)
from srdxai.metrics.registry import METRICS

quantus = import_quantus()
from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation  # noqa: E402 - after the guard

DOUBLE = torch.float64
# tiny float64 convolutions: extra intra-op threads only add overhead (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3/2 -> ReLU -> global average pool -> Linear(6 -> 5)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class SumModel(nn.Module):
    """Logits ``[sum of every input value, 0]``: drops are sums of what was replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.flatten(1).sum(1)
        return torch.stack([total, torch.zeros_like(total)], 1)


def make_data(channels: int, size: int, n: int = 6, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = TinyCNN(channels).to(DOUBLE).eval()
    x = torch.randn(n, channels, size, size, dtype=DOUBLE)
    with torch.no_grad():
        y = model(x).argmax(1)
    pixel = srdxai.explain(model, x, y, "gradient_x_input")
    element = srdxai.explain(model, x, y, "gradient_x_input", channel_reduce="none")
    return {"model": model, "x": x.numpy(), "y": y.numpy(), "a": pixel[:, None].numpy(),
            "element": element.numpy()}


@pytest.fixture(scope="module")
def rgb():
    return make_data(3, 16)


@pytest.fixture(scope="module")
def gray():
    return make_data(1, 16)


@contextlib.contextmanager
def quantus_in_float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_default_dtype(default)


def quantus_call(metric, data, maps=None, **kwargs):
    maps = data["a"] if maps is None else maps
    with quantus_in_float64():
        return metric(model=data["model"], x_batch=data["x"], y_batch=data["y"], a_batch=maps,
                      **kwargs)


def assert_same(ours, theirs, rtol: float = RTOL) -> float:
    ours_np = torch.as_tensor(ours).detach().cpu().numpy().astype(np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    np.testing.assert_allclose(ours_np, theirs, rtol=rtol, atol=0, equal_nan=True)
    scale = np.maximum(np.abs(theirs), 1e-300)
    difference = float(np.nanmax(np.abs(ours_np - theirs) / scale))
    print(f"max relative difference to Quantus: {difference:.3g}")  # shown with pytest -s
    return difference


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


# --- ROAD -----------------------------------------------------------------------------------

def test_noisy_linear_imputation_matches_quantus(monkeypatch):
    """Quantus' imputation of (C, H, W) arrays, with its np.random.randn noise recorded."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 9, 11))
    n = 9 * 11
    block = np.array([r * 11 + c for r in range(2, 7) for c in range(0, 5)])  # touches a border
    cases = [rng.permutation(n)[:k] for k in (1, 10, 50, 98)] + [block, np.array([0, n - 1])]
    normals = Recorder(monkeypatch, "randn")
    for pixels in cases:
        theirs = quantus_imputation(image, pixels, noise=0.01)
        z = normals.draws[-1].reshape(3, -1)
        assert_same(noisy_linear_imputation(image, pixels, noise=0.01, normals=z), theirs)
        # one channel: Quantus' solve returns a vector
        theirs = quantus_imputation(image[:1], pixels, noise=0.0)
        assert_same(noisy_linear_imputation(image[:1], pixels, noise=0.0), theirs)


def road_draws(recorded: list[np.ndarray], n: int, counts: list[int]) -> torch.Tensor:
    """Quantus draws percentage by percentage, sample by sample: (N, T, C=1, K)."""
    draws = torch.zeros(n, len(counts), 1, max(counts), dtype=DOUBLE)
    for t, k in enumerate(counts):
        for i in range(n):
            draws[i, t, 0, :k] = torch.as_tensor(recorded[t * n + i]).reshape(-1)
    return draws


PERCENTAGES = [5, 20, 40, 60, 80, 95]


def test_road_matches_quantus_on_one_channel_inputs(gray, monkeypatch):
    """Quantus returns the accuracy over the batch per percentage: our curve's mean."""
    normals = Recorder(monkeypatch, "randn")
    theirs = quantus_call(quantus.ROAD(percentages=PERCENTAGES, noise=0.01, **PER_SAMPLE), gray)
    counts = [int(256 * p / 100) for p in PERCENTAGES]
    draws = road_draws(normals.draws, 6, counts)
    ours = road(gray["model"], gray["x"], gray["y"], gray["a"], percentages=PERCENTAGES,
                draws=draws)
    assert list(theirs) == PERCENTAGES
    assert_same(ours.curve.mean(0), list(theirs.values()))
    assert 0 < float(ours.curve.mean()) < 1  # some predictions go, some stay


def test_quantus_road_fails_on_rgb_inputs(rgb):
    """Quantus ranks the map broadcast over the channels, so its top indices run up to C*H*W,
    and indexes the (H*W,) pixel mask with them."""
    with pytest.raises(IndexError, match="out of bounds"):
        quantus_call(quantus.ROAD(percentages=[50], **PER_SAMPLE), rgb)
    ours = road(rgb["model"], rgb["x"], rgb["y"], rgb["a"], percentages=[50])
    assert ours.curve.shape == (6, 1)


def test_quantus_road_averages_only_the_first_batch(gray, monkeypatch):
    normals = Recorder(monkeypatch, "randn")
    theirs = quantus_call(quantus.ROAD(percentages=PERCENTAGES, **PER_SAMPLE), gray,
                          batch_size=2)
    # batch by batch: draws come percentage-major within each batch of two samples
    counts = [int(256 * p / 100) for p in PERCENTAGES]
    draws = torch.cat([road_draws(normals.draws[b * 12:(b + 1) * 12], 2, counts)
                       for b in range(3)])
    ours = road(gray["model"], gray["x"], gray["y"], gray["a"], percentages=PERCENTAGES,
                draws=draws)
    assert_same(ours.curve[:2].mean(0), list(theirs.values()))  # samples 0 and 1 only
    assert not torch.equal(ours.curve[:2].mean(0), ours.curve.mean(0))


# --- region perturbation and selectivity ----------------------------------------------------

@pytest.mark.parametrize("patch_size", [4, 5])  # 5: padded 16 -> 20, partial border patches
@pytest.mark.parametrize("maps", ["a", "element"])
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_matches_quantus(rgb, patch_size, maps, order):
    metric = quantus.RegionPerturbation(patch_size=patch_size, regions_evaluation=10, order=order,
                                        **PER_SAMPLE)
    theirs = np.asarray(quantus_call(metric, rgb, maps=rgb[maps]))
    ours = region_perturbation(rgb["model"], rgb["x"], rgb["y"], rgb[maps],
                               patch_size=patch_size, regions_evaluation=10, order=order)
    assert theirs.shape == (6, 10)
    assert_same(ours.curve, theirs)
    assert_same(ours.auc, [np.trapezoid(curve) for curve in theirs])  # get_auc_score's terms
    assert_same(ours.aopc, theirs.sum(1) / 11)


@pytest.mark.parametrize("patch_size", [4, 5])
@pytest.mark.parametrize("maps", ["a", "element"])
def test_selectivity_matches_quantus(rgb, patch_size, maps):
    theirs = np.asarray(quantus_call(quantus.Selectivity(patch_size=patch_size, **PER_SAMPLE),
                                     rgb, maps=rgb[maps]))
    ours = selectivity(rgb["model"], rgb["x"], rgb["y"], rgb[maps], patch_size=patch_size)
    assert theirs.shape == (6, 16)
    assert_same(ours.curve, theirs)
    assert_same(ours.auc, [np.trapezoid(curve) for curve in theirs])


def ordered_patch_values(a: np.ndarray, values: list[np.ndarray], patch: int) -> torch.Tensor:
    """A replacement image (N, 1, H, W) whose k-th most relevant patch of sample i holds
    ``values[k][i]`` (H divisible by ``patch``; patches after the last value hold 0)."""
    n, _, h, w = a.shape
    rows, cols = np.divmod(np.arange(h * w), w)
    patch_of_pixel = (rows // patch) * (w // patch) + cols // patch
    field = np.zeros((n, h * w))
    for i in range(n):
        sums = np.bincount(patch_of_pixel, weights=a[i, 0].ravel())
        rank = np.empty(len(sums), dtype=int)
        rank[np.argsort(-sums)] = np.arange(len(sums))
        for k, value in enumerate(values):
            field[i, rank[patch_of_pixel] == k] = value[i]
    return torch.as_tensor(field.reshape(n, 1, h, w))


def test_uniform_replacement_matches_quantus_given_its_draws(rgb, monkeypatch):
    """Quantus' "uniform" fills each patch with one U(0, 1) value per sample and step; ours
    draws one per element, but given Quantus' values as draws the curves agree."""
    uniform = Recorder(monkeypatch, "uniform")
    metric = quantus.RegionPerturbation(patch_size=4, regions_evaluation=6,
                                        perturb_baseline="uniform", **PER_SAMPLE)
    theirs = np.asarray(quantus_call(metric, rgb))
    assert [d.shape for d in uniform.draws] == [(6,)] * 6  # one value per sample and step
    field = ordered_patch_values(rgb["a"], uniform.draws, 4).expand(-1, 3, -1, -1)
    ours = region_perturbation(rgb["model"], rgb["x"], rgb["y"], rgb["a"], patch_size=4,
                               regions_evaluation=6, baseline="uniform", draws=field)
    assert_same(ours.curve, theirs)


def test_quantus_region_perturbation_direction_is_reversed():
    """On a sum model with the map of exact contributions, the right map's drops are the
    largest (Samek et al.: higher AOPC is better); Quantus declares LOWER better."""
    torch.manual_seed(5)
    data = {"model": SumModel().eval(), "x": torch.rand(3, 1, 8, 8, dtype=DOUBLE).numpy(),
            "y": np.zeros(3, dtype=np.int64)}
    options = {"patch_size": 4, "perturb_baseline": 0.0, **PER_SAMPLE}
    right = np.asarray(quantus_call(quantus.RegionPerturbation(**options), data,
                                    maps=data["x"], softmax=False))
    wrong = np.asarray(quantus_call(quantus.RegionPerturbation(**options), data,
                                    maps=1 - data["x"], softmax=False))  # reversed order
    assert (np.trapezoid(right, axis=1) > np.trapezoid(wrong, axis=1)).all()
    assert quantus.RegionPerturbation.score_direction.name == "LOWER"
    assert METRICS["region_perturbation"].direction == "higher"
    assert quantus.Selectivity.score_direction.name == "LOWER"  # right there
    assert METRICS["selectivity"].direction == "lower"


def test_quantus_mean_baseline_drifts_between_steps():
    """Quantus' "mean" replaces step k's patch with the mean of the image after step k - 1;
    ours with the clean image's mean. Sum model, 8x8, 4 patches of 4x4, two steps."""
    torch.manual_seed(6)
    x = torch.rand(2, 1, 8, 8, dtype=DOUBLE)
    data = {"model": SumModel().eval(), "x": x.numpy(), "y": np.zeros(2, dtype=np.int64)}
    metric = quantus.RegionPerturbation(patch_size=4, regions_evaluation=2,
                                        perturb_baseline="mean", **PER_SAMPLE)
    theirs = np.asarray(quantus_call(metric, data, maps=data["x"], softmax=False))
    ours = region_perturbation(SumModel(), x, [0, 0], x, patch_size=4, regions_evaluation=2,
                               baseline="mean", softmax=False)
    for i in range(2):
        patches = x[i, 0].unfold(0, 4, 4).unfold(1, 4, 4).reshape(4, 16)
        first, second = patches[patches.sum(1).argsort(descending=True)[:2]]
        m0 = x[i].mean()
        m1 = (x[i].sum() - first.sum() + 16 * m0) / 64  # the mean after step 1
        drift = [(first - m0).sum(), (first - m0).sum() + (second - m1).sum()]
        assert_same(torch.stack(drift), theirs[i])
        fixed = [(first - m0).sum(), (first - m0).sum() + (second - m0).sum()]
        assert_same(ours.curve[i], torch.stack(fixed))
    assert not np.allclose(ours.curve[:, 1].numpy(), theirs[:, 1])


# --- IROF -----------------------------------------------------------------------------------

@pytest.fixture
def trapz(monkeypatch):
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


@pytest.mark.parametrize("baseline", ["black", 0.0])
def test_irof_matches_quantus_sample_by_sample(gray, trapz, baseline):
    """One-channel inputs (Quantus' IROF refuses others) and one sample per Quantus call: its
    batch-wide baseline is then the sample's own ("black": the minimum, which replacing with
    the minimum never changes). SLIC with Quantus' parameters on both sides."""
    ours = irof(gray["model"], gray["x"], gray["y"], gray["a"], baseline=baseline)
    metric = quantus.IROF(perturb_baseline=baseline, return_aggregate=False, **PER_SAMPLE)
    for i in range(6):
        one = {k: v[i:i + 1] if k != "model" else v for k, v in gray.items()}
        assert_same(ours.aoc[i:i + 1], quantus_call(metric, one))


def test_quantus_irof_fails_on_rgb_inputs(rgb, trapz):
    """Its segment mask is (N, 1, H, W) and baseline_replacement_by_mask asserts that it has
    the input's shape."""
    with pytest.raises(AssertionError, match="mask shape"):
        quantus_call(quantus.IROF(return_aggregate=False, **PER_SAMPLE), rgb)
    assert irof(rgb["model"], rgb["x"], rgb["y"], rgb["a"]).aoc.shape == (6,)


def stripes(n: int, size: int) -> np.ndarray:
    """Sample i cut into vertical stripes of width i + 3 (different segment counts)."""
    cols = np.arange(size)
    return np.stack([np.broadcast_to(cols // (i + 3), (size, size)) for i in range(n)])


def test_quantus_irof_pads_shorter_curves_with_zeros(gray, trapz, monkeypatch):
    """In one Quantus batch, a sample with S_i segments below the batch's largest S gets its
    curve padded with zeros, so the trapezoid from its last point down to 0 is subtracted
    too: Quantus' AOC = ours - curve[S_i - 1] / 2. Both sides get the same segments (Quantus'
    SLIC is replaced; on one-channel 16x16 images it gives every image the same count) and a
    fixed baseline (Quantus' named ones are batch-wide)."""
    segments = stripes(6, 16)
    handed_out = iter(segments)
    monkeypatch.setattr(quantus.helpers.utils, "get_superpixel_segments",
                        lambda img, segmentation_method: next(handed_out))
    metric = quantus.IROF(perturb_baseline=0.0, return_aggregate=False, **PER_SAMPLE)
    theirs = np.asarray(quantus_call(metric, gray))
    ours = irof(gray["model"], gray["x"], gray["y"], gray["a"], baseline=0.0, segments=segments)
    counts = ours.n_segments.tolist()
    assert counts == [6, 4, 4, 3, 3, 2]
    last = torch.stack([ours.curve[i, c - 1] for i, c in enumerate(counts)])
    shorter = torch.tensor([c < max(counts) for c in counts])
    assert_same(ours.aoc - torch.where(shorter, last / 2, torch.zeros_like(last)), theirs)
    assert not np.allclose(ours.aoc.numpy(), theirs)


def test_quantus_irof_mean_baseline_depends_on_the_batch(gray, trapz):
    """Quantus' default "mean" is the mean of the whole (perturbed) batch: a sample scores
    differently alone and beside others. Ours uses the sample's own mean."""
    metric = quantus.IROF(return_aggregate=False, **PER_SAMPLE)
    in_batch = np.asarray(quantus_call(metric, gray))
    one = {k: v[:1] if k != "model" else v for k, v in gray.items()}
    alone = np.asarray(quantus_call(metric, one))
    assert abs(in_batch[0] - alone[0]) > 1e-6
    ours = irof(gray["model"], gray["x"], gray["y"], gray["a"])
    ours_alone = irof(gray["model"], one["x"], one["y"], one["a"])
    assert torch.allclose(ours.aoc[:1], ours_alone.aoc, rtol=1e-12, atol=0)
