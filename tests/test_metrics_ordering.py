"""srdxai.metrics.ordering (ROAD, region perturbation, IROF, selectivity): known answers on
hand-built models, batch and chunk invariance, untouched inputs, errors, the sampling object.

The Quantus cross-checks are in tests/test_metrics_quantus_ordering.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from srdxai.errors import InvalidInputError, NonFiniteError
from srdxai.metrics import Sampling
from srdxai.metrics.common import stable_order
from srdxai.metrics.ordering import (
    IROFResult,
    RegionPerturbationResult,
    irof,
    noisy_linear_imputation,
    region_perturbation,
    road,
    selectivity,
)
from srdxai.metrics.registry import METRICS

DOUBLE = torch.float64
# tiny float64 convolutions: extra intra-op threads only add overhead (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")
EDGE, DIAGONAL = 1 / 6, 1 / 12


class SumModel(nn.Module):
    """Logits ``[sum of every input value, threshold]``: the class-0 logit changes by exactly
    what a perturbation adds or removes, and class 0 is predicted while the sum exceeds the
    threshold."""

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.flatten(1).sum(1)
        return torch.stack([total, torch.full_like(total, self.threshold)], 1)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = TinyCNN().to(DOUBLE).eval()
    x = torch.randn(5, 3, 12, 12, dtype=DOUBLE)
    with torch.no_grad():
        y = model(x).argmax(1)
    a = srdxai.explain(model, x, y, "gradient_x_input")
    return model, x, y, a


def corner_value(img: torch.Tensor) -> torch.Tensor:
    """Imputation of pixel (0, 0) alone: the mean of its 3 in-image neighbours with weights
    1/6 (edge) and 1/12 (diagonal), renormalised by their sum 5/12."""
    return (EDGE * img[:, 0, 1] + EDGE * img[:, 1, 0] + DIAGONAL * img[:, 1, 1]) / (5 / 12)


# --- ROAD -----------------------------------------------------------------------------------

def test_imputation_known_values():
    torch.manual_seed(1)
    img = torch.rand(2, 5, 6, dtype=DOUBLE)
    # one corner pixel: the weighted mean of its 3 neighbours
    out = noisy_linear_imputation(img, [0], noise=0.0)
    assert torch.allclose(out[:, 0, 0], corner_value(img))
    assert torch.equal(out.flatten(1)[:, 1:], img.flatten(1)[:, 1:])  # nothing else moves
    # a linear ramp has the weighted mean of a symmetric neighbourhood at every interior
    # pixel, so removing any interior block reproduces it exactly
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), indexing="ij")
    ramp = torch.stack([2 * rows + 3 * cols, -rows + 0.5 * cols]).to(DOUBLE)
    interior = [r * 6 + c for r in range(1, 4) for c in range(1, 5)]
    assert torch.allclose(noisy_linear_imputation(ramp, interior, noise=0.0), ramp)
    # two adjacent removed pixels (0, 0), (0, 1) couple: solve the 2x2 system by hand
    v = img
    rhs0 = EDGE * v[:, 1, 0] + DIAGONAL * v[:, 1, 1]  # known neighbours of (0, 0)
    rhs1 = EDGE * v[:, 0, 2] + EDGE * v[:, 1, 1] + DIAGONAL * (v[:, 1, 0] + v[:, 1, 2])
    # (5/12) p = 1/6 q + rhs0 ; (8/12) q = 1/6 p + rhs1 (the 5 in-image neighbours of (0, 1))
    det = (5 / 12) * (8 / 12) - EDGE * EDGE
    p = ((8 / 12) * rhs0 + EDGE * rhs1) / det
    q = ((5 / 12) * rhs1 + EDGE * rhs0) / det
    pair = noisy_linear_imputation(img, [1, 0], noise=0.0)
    assert torch.allclose(pair[:, 0, 0], p) and torch.allclose(pair[:, 0, 1], q)
    # noise: normals column j belongs to pixels[j]
    z = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=DOUBLE)
    noisy = noisy_linear_imputation(img, [1, 0], noise=0.1, normals=z)
    assert torch.allclose(noisy[:, 0, 1], q + 0.1 * z[:, 0])
    assert torch.allclose(noisy[:, 0, 0], p + 0.1 * z[:, 1])


def test_road_known_curve_on_a_sum_model():
    """4x4 one-channel images; percentages 10 and 15 remove int(16 * p / 100) = 1 and 2 pixels.
    The map ranks pixel (0, 0) first and (3, 3) second; they are not neighbours, so each is its
    corner's weighted mean. The sum model's logit is the image's sum."""
    torch.manual_seed(2)
    x = torch.rand(3, 1, 4, 4, dtype=DOUBLE)
    a = torch.zeros(3, 4, 4, dtype=DOUBLE)
    a[:, 0, 0], a[:, 3, 3] = 2.0, 1.0
    total = x.flatten(1).sum(1)
    img = x[:, 0]
    v00 = corner_value(img)
    v33 = corner_value(img.flip(1, 2))  # (3, 3) is (0, 0) of the flipped image
    draws = torch.zeros(3, 2, 1, 2, dtype=DOUBLE)
    draws[:, 0, 0, 0] = 1.0  # percentage 10: noise of pixel (0, 0)
    draws[:, 1, 0, :] = torch.tensor([2.0, -1.0])  # percentage 15: (0, 0), then (3, 3)
    expected = torch.stack([
        total - img[:, 0, 0] + v00 + 0.01 * 1.0,
        total - img[:, 0, 0] + v00 + 0.01 * 2.0 - img[:, 3, 3] + v33 + 0.01 * -1.0,
    ], 1)
    y = torch.zeros(3, dtype=torch.long)
    result = road(SumModel(), x, y, a, percentages=[10, 15], readout="logit", draws=draws)
    assert torch.allclose(result.curve, expected)
    assert torch.allclose(result.fractions, torch.tensor([0.10, 0.15], dtype=DOUBLE))
    assert torch.allclose(result.auc, 0.05 * (expected[:, 0] + expected[:, 1]) / 2)
    # LeRF removes (0, 0) and (3, 3) last: with the negated map it removes them first
    lerf = road(SumModel(), x, y, -a, percentages=[10, 15], readout="logit", draws=draws,
                order="lerf")
    assert torch.allclose(lerf.curve, expected)
    # "correct": class 0 wins while the sum exceeds the threshold; put it between the points
    for i in range(3):
        threshold = float(expected[i].mean())
        got = road(SumModel(threshold), x[i:i + 1], y[i:i + 1], a[i:i + 1], percentages=[10, 15],
                   draws=draws[i:i + 1])
        assert got.curve.tolist() == [[float(expected[i, 0] > threshold),
                                       float(expected[i, 1] > threshold)]]
        assert got.curve.sum() == 1


def test_road_zero_percent_is_the_clean_input_and_probability_readout(cnn):
    model, x, y, a = cnn
    result = road(model, x, y, a, percentages=[0, 50], readout="probability")
    with torch.no_grad():
        clean = model(x).softmax(1).gather(1, y[:, None])[:, 0]
    assert torch.allclose(result.curve[:, 0], clean)
    correct = road(model, x, y, a, percentages=[0, 50])
    assert correct.curve[:, 0].eq(1).all()  # y is the predicted class


def test_road_batch_chunks_seed_and_draws(cnn):
    model, x, y, a = cnn
    percentages = [10, 40, 70]
    full = road(model, x, y, a, percentages=percentages, readout="logit", seed=4)
    for size in (1, 4):  # every (sample, percentage) has its own generator
        chunked = road(model, x, y, a, percentages=percentages, readout="logit", seed=4,
                       batch_size=size)
        assert torch.equal(chunked.curve, full.curve)
    other = road(model, x, y, a, percentages=percentages, readout="logit", seed=5)
    assert not torch.equal(other.curve, full.curve)
    # explicit draws: a batch equals its samples one at a time
    draws = torch.randn(5, 3, 3, 101, dtype=DOUBLE, generator=torch.Generator().manual_seed(0))
    batch = road(model, x, y, a, percentages=percentages, readout="logit", draws=draws)
    for i in range(5):
        alone = road(model, x[i:i + 1], y[i:i + 1], a[i:i + 1], percentages=percentages,
                     readout="logit", draws=draws[i:i + 1])
        assert torch.allclose(alone.curve, batch.curve[i:i + 1], rtol=1e-12, atol=0)
    # noise=0: no randomness at all
    quiet = [road(model, x, y, a, percentages=percentages, noise=0.0, seed=s).curve
             for s in (0, 1)]
    assert torch.equal(*quiet)


# --- region perturbation and selectivity ----------------------------------------------------

def patch_sums_sorted(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Sums of the (H/patch)^2 patches of x (no padding), largest first."""
    n = x.shape[0]
    sums = x.sum(1).unfold(1, patch, patch).unfold(2, patch, patch).sum((-1, -2)).reshape(n, -1)
    return sums.sort(1, descending=True).values


def test_region_perturbation_known_drops_on_a_sum_model():
    """The map is the image itself and the model sums it, so patches are removed in order of
    their true contribution: with baseline 0 the k-th drop is the sum of the k largest patch
    sums."""
    torch.manual_seed(3)
    x = torch.rand(2, 2, 8, 8, dtype=DOUBLE)
    a = x.sum(1)
    y = torch.zeros(2, dtype=torch.long)
    drops = patch_sums_sorted(x, 4).cumsum(1)  # 4 patches
    result = region_perturbation(SumModel(), x, y, a, patch_size=4, baseline=0.0, softmax=False)
    assert isinstance(result, RegionPerturbationResult)
    assert torch.allclose(result.curve, drops)
    assert torch.allclose(result.fractions, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=DOUBLE))
    assert torch.allclose(result.auc, torch.trapezoid(drops, dim=1))
    assert torch.allclose(result.aopc, drops.sum(1) / 5)  # k = 0..4, the k = 0 drop is 0
    # K = 2 regions; LeRF removes the smallest patches first; the reversed map is worse
    two = region_perturbation(SumModel(), x, y, a, patch_size=4, regions_evaluation=2,
                              baseline=0.0, softmax=False)
    assert torch.allclose(two.curve, drops[:, :2]) and torch.allclose(two.aopc,
                                                                      drops[:, :2].sum(1) / 3)
    ascending = patch_sums_sorted(x, 4).flip(1).cumsum(1)
    lerf = region_perturbation(SumModel(), x, y, a, patch_size=4, order="lerf", baseline=0.0,
                               softmax=False)
    assert torch.allclose(lerf.curve, ascending)
    worse = region_perturbation(SumModel(), x, y, -a, patch_size=4, baseline=0.0, softmax=False)
    assert (worse.aopc < result.aopc).all()  # MoRF: higher is better
    # element maps rank patches by their sum over channels too
    elements = region_perturbation(SumModel(), x, y, x, patch_size=4, baseline=0.0,
                                   softmax=False)
    assert torch.allclose(elements.curve, drops)


def test_patches_of_a_size_that_does_not_divide_the_image():
    """5x5 with patch 4: padded by 3, 1 row/column before and 2 after (Quantus' floor/ceil
    split), so the patch rows and columns are {0, 1, 2} and {3, 4}: 4 patches of 9, 6, 6 and 4
    pixels. Pixel (2, 2) is in the first patch, (3, 3) in the last; with 2 rows before (the
    other split) both would be in the last."""
    x = torch.zeros(1, 1, 5, 5, dtype=DOUBLE)
    x[0, 0, 2, 2], x[0, 0, 3, 3] = 1.0, 10.0
    y = torch.zeros(1, dtype=torch.long)
    result = selectivity(SumModel(), x, y, x[:, 0], patch_size=4, baseline=0.0, softmax=False)
    # the last patch (sum 10) goes first, leaving 1; then the first (sum 1), leaving 0
    assert result.curve.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(result.fractions, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=DOUBLE))
    # a baseline of 1 shows the patch sizes: each removal adds its pixel count minus its sum;
    # 11 -> 11 - 10 + 4 -> 5 - 1 + 9 -> 13 + 6 -> 19 + 6 = 25, all 25 pixels ones
    ones = selectivity(SumModel(), x, y, x[:, 0], patch_size=4, baseline=1.0, softmax=False)
    assert ones.curve.tolist() == [[5.0, 13.0, 19.0, 25.0]]


def test_selectivity_known_curve_on_a_sum_model():
    torch.manual_seed(4)
    x = torch.rand(3, 1, 8, 8, dtype=DOUBLE)
    y = torch.zeros(3, dtype=torch.long)
    total = x.flatten(1).sum(1, keepdim=True)
    expected = total - patch_sums_sorted(x, 2).cumsum(1)  # 16 patches, ends at 0
    result = selectivity(SumModel(), x, y, x[:, 0], patch_size=2, baseline=0.0, softmax=False)
    assert torch.allclose(result.curve, expected)
    assert torch.allclose(result.auc, torch.trapezoid(expected, dim=1))
    worse = selectivity(SumModel(), x, y, -x[:, 0], patch_size=2, baseline=0.0, softmax=False)
    assert (result.auc < worse.auc).all()  # lower is better
    # "black" is the sample's minimum
    black = selectivity(SumModel(), x, y, x[:, 0], patch_size=2, softmax=False)
    minimum = x.flatten(1).amin(1, keepdim=True)
    sizes = torch.arange(1, 17, dtype=DOUBLE) * 4
    assert torch.allclose(black.curve, expected + minimum * sizes)


def test_uniform_replacement_draws_range_and_seed(cnn):
    model, x, y, a = cnn
    # draws are the replacement values: the same as a tensor baseline
    values = torch.rand(x.shape, dtype=DOUBLE, generator=torch.Generator().manual_seed(1))
    drawn = region_perturbation(model, x, y, a, patch_size=4, baseline="uniform", draws=values)
    given = region_perturbation(model, x, y, a, patch_size=4, baseline=values)
    assert torch.equal(drawn.curve, given.curve)
    # by default U(sample min, sample max) per element, reproducible from the seed
    seeded = [selectivity(model, x, y, a, patch_size=4, baseline="uniform", seed=s).curve
              for s in (0, 0, 1)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    box = selectivity(SumModel(), x, torch.zeros(5, dtype=torch.long), a, patch_size=12,
                      baseline="uniform", uniform_range=(2.0, 3.0), softmax=False)
    assert box.curve.shape == (5, 1)  # one patch: the whole image is noise in [2, 3)
    assert (box.curve >= 2 * x[0].numel()).all() and (box.curve < 3 * x[0].numel()).all()
    # one sample alone draws the same noise as the first sample of the batch
    first = selectivity(model, x[:1], y[:1], a[:1], patch_size=4, baseline="uniform", seed=3)
    batch = selectivity(model, x, y, a, patch_size=4, baseline="uniform", seed=3)
    assert torch.allclose(first.curve, batch.curve[:1], rtol=1e-12, atol=0)


# --- IROF -----------------------------------------------------------------------------------

def test_irof_known_curve_ranks_segments_by_mean_relevance():
    """Two segments: A is one pixel worth 0.9, B the other 15 pixels (mean 0.5, sum 7.5).
    The map is the image: by mean A goes first (by sum B would). Baseline 0, sum model:
    curve = [(S - 0.9) / S, 0] with S the image's sum; AOC = 2 - trapezoid."""
    x = torch.full((1, 1, 4, 4), 0.5, dtype=DOUBLE)
    x[0, 0, 2, 1] = 0.9
    segments = torch.zeros(1, 4, 4, dtype=torch.long)
    segments[0, 2, 1] = 7  # any labels: they are renumbered
    y = torch.zeros(1, dtype=torch.long)
    result = irof(SumModel(), x, y, x[:, 0], segments=segments, baseline=0.0, softmax=False)
    total = 0.5 * 15 + 0.9
    assert isinstance(result, IROFResult)
    assert torch.allclose(result.curve, torch.tensor([[(total - 0.9) / total, 0.0]],
                                                     dtype=DOUBLE))
    assert result.n_segments.tolist() == [2]
    assert torch.allclose(result.aoc, torch.tensor([2 - ((total - 0.9) / total) / 2],
                                                   dtype=DOUBLE))
    assert result.segments[0, 2, 1] == 1 and (result.segments.sum() == 1)


def stripes(n: int = 5, size: int = 12) -> torch.Tensor:
    """Sample i cut into vertical stripes of width i + 2: 6, 4, 3, 3 and 2 segments."""
    cols = torch.arange(size)
    return torch.stack([(cols // (i + 2)).expand(size, size) for i in range(n)])


def test_irof_samples_with_different_segment_counts(cnn):
    model, x, y, a = cnn
    segments = stripes()
    result = irof(model, x, y, a, segments=segments)
    counts = [6, 4, 3, 3, 2]
    assert result.n_segments.tolist() == counts and result.curve.shape == (5, 6)
    for i, count in enumerate(counts):
        assert torch.isfinite(result.curve[i, :count]).all()
        assert torch.isnan(result.curve[i, count:]).all()
        aoc = count - torch.trapezoid(result.curve[i, :count])
        assert torch.allclose(result.aoc[i], aoc)
    # the default baseline is each sample's own mean
    means = x.mean((1, 2, 3), keepdim=True).expand_as(x)
    assert torch.equal(irof(model, x, y, a, segments=segments, baseline=means).aoc, result.aoc)


def test_irof_default_segments_are_quantus_slic(cnn):
    model, x, y, a = cnn
    from skimage.segmentation import slic

    result = irof(model, x[:2], y[:2], a[:2])
    for i in range(2):  # SLIC's 100 segments on 12x12 noise: about one per pixel
        labels = slic(x[i].permute(1, 2, 0).numpy(), start_label=0)
        assert np.array_equal(result.segments[i].numpy(), labels)
        assert int(result.n_segments[i]) == len(np.unique(labels))


# --- invariances shared by all four ---------------------------------------------------------

CALLS = {
    "road": lambda m, x, y, a, **kw: road(m, x, y, a, percentages=[20, 60], noise=0.0,
                                          readout="logit", **kw).curve,
    "region_perturbation": lambda m, x, y, a, **kw: region_perturbation(
        m, x, y, a, patch_size=4, **kw).curve,
    "selectivity": lambda m, x, y, a, **kw: selectivity(m, x, y, a, patch_size=4, **kw).curve,
    "irof": lambda m, x, y, a, rows=slice(None), **kw: irof(
        m, x, y, a, segments=stripes()[rows], **kw).aoc,
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_batch_equals_samples_and_batch_size_does_not_matter(cnn, name):
    model, x, _, a = cnn
    y = torch.tensor([0, 3, 1, 4, 2])  # a class per sample: a chunk's wrong targets fail
    call = CALLS[name]
    full = call(model, x, y, a)
    for size in (1, 3):
        assert torch.allclose(call(model, x, y, a, batch_size=size), full, rtol=1e-12, atol=0)
    for i in range(5):
        rows = slice(i, i + 1)
        extra = {"rows": rows} if name == "irof" else {}
        alone = call(model, x[rows], y[rows], a[rows], **extra)
        assert torch.allclose(alone, full[rows], rtol=1e-12, atol=0)
    # numpy inputs (Quantus style) and (N, 1, H, W) maps give the same
    as_numpy = call(model, x.numpy(), y.numpy(), a[:, None].numpy())
    assert torch.allclose(as_numpy, full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_inputs_and_model_are_left_alone(cnn, name):
    model, x, y, a = cnn
    model = TinyCNN().to(DOUBLE)
    model.load_state_dict(cnn[0].state_dict())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0, y0, a0 = x.clone(), y.clone(), a.clone()
    CALLS[name](model, x, y, a)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(a, a0)


def test_sampling_object_equals_keywords(cnn):
    model, x, y, a = cnn
    run = Sampling(seed=7, batch_size=2)
    assert torch.equal(road(model, x, y, a, percentages=[30], sampling=run).curve,
                       road(model, x, y, a, percentages=[30], seed=7, batch_size=2).curve)
    for metric in (region_perturbation, selectivity):
        assert torch.equal(
            metric(model, x, y, a, baseline="uniform", patch_size=6, sampling=run).curve,
            metric(model, x, y, a, baseline="uniform", patch_size=6, seed=7,
                   batch_size=2).curve)
    cut = stripes()
    assert torch.equal(irof(model, x, y, a, segments=cut, sampling=Sampling(batch_size=2)).aoc,
                       irof(model, x, y, a, segments=cut, batch_size=2).aoc)
    with pytest.raises(InvalidInputError, match="not both"):
        road(model, x, y, a, sampling=run, seed=1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        irof(model, x, y, a, nr_runs=3)


def test_registry_entries():
    expected = {"road": "lower", "region_perturbation": "higher", "irof": "higher",
                "selectivity": "lower"}
    for name, direction in expected.items():
        info = METRICS[name]
        assert (info.family, info.direction, info.needs) == ("faithfulness", direction,
                                                             ("model",))
        assert info.summary.endswith(".") and len(info.summary) > 20


def test_clear_errors(cnn):
    model, x, y, a = cnn
    bad = [
        (lambda: road(model, x, y, a, percentages=[100]), r"\[0, 100\)"),
        (lambda: road(model, x, y, a, percentages=[-1]), r"\[0, 100\)"),
        (lambda: road(model, x, y, a, percentages=[]), "non-empty"),
        (lambda: road(model, x, y, a, percentages=[50, 10]), "increase"),
        (lambda: road(model, x, y, a, order="top"), "order must be one of"),
        (lambda: road(model, x, y, a, readout="accuracy"), "readout must be one of"),
        (lambda: road(model, x, y, a, noise=-0.1), "noise must be >= 0"),
        (lambda: road(model, x, y, a, noise=float("nan")), "finite"),
        (lambda: road(model, x, y, a, percentages=[50], draws=torch.zeros(5, 1, 3, 10)),
         r"K >= 72"),
        (lambda: road(model, x, y, a[:, :8]), "spatial size"),
        (lambda: road(model, x, y, None), "attributions= or explain="),
        (lambda: region_perturbation(model, x, y, a, patch_size=0), "patch_size"),
        (lambda: region_perturbation(model, x, y, a, regions_evaluation=0), "regions_eval"),
        (lambda: region_perturbation(model, x, y, a, draws=torch.zeros_like(x)),
         "unless baseline='uniform'"),
        (lambda: region_perturbation(model, x, y, a, baseline="uniform",
                                     draws=torch.zeros(5, 3, 4, 4)), "shaped like x"),
        (lambda: selectivity(model, x, y, a, baseline="uniform", uniform_range=(1, 0)),
         "low < high"),
        (lambda: selectivity(model, x, y, a, baseline="grey"), "unknown baseline"),
        (lambda: irof(model, x, y, a, segments=torch.zeros(5, 8, 8)), "segments must be"),
        (lambda: irof(model, x, y, a, segments=torch.zeros(5, 12, 12)), "two segments"),
        (lambda: irof(model, x, y, a, segments=torch.full((5, 12, 12), 0.5)), "integer"),
        (lambda: irof(model, x, y, a, segments=stripes(), draws=torch.zeros(1)), "no draws"),
        (lambda: noisy_linear_imputation(torch.zeros(1, 2, 2), [0, 1, 2, 3]), "at least one"),
        (lambda: noisy_linear_imputation(torch.zeros(1, 2, 2), [1, 1]), "distinct"),
        (lambda: noisy_linear_imputation(torch.zeros(1, 2, 2), [4]), "lie in"),
        (lambda: noisy_linear_imputation(torch.zeros(2, 2), [0]), r"\(C, H, W\)"),
    ]
    for call, message in bad:
        with pytest.raises(InvalidInputError, match=message):
            call()


class Overflows(nn.Module):
    """The wrapped model, except that the logits are Inf wherever an input value exceeds 5."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        big = x.flatten(1).abs().amax(1) > 5
        return torch.where(big[:, None], torch.full_like(out, float("inf")), out)


def test_non_finite_outputs_raise_naming_the_metric_and_samples(cnn):
    model, x, y, a = cnn
    net = Overflows(model)
    assert x.abs().max() < 5
    for name, call in [
        ("region perturbation", lambda: region_perturbation(net, x, y, a, baseline=100.0)),
        ("selectivity", lambda: selectivity(net, x, y, a, baseline=100.0)),
        ("IROF", lambda: irof(net, x, y, a, segments=stripes(), baseline=100.0)),
    ]:
        with pytest.raises(NonFiniteError, match=rf"{name}.*NaN or Inf.*samples 0, 1, 2"):
            call()
    # ROAD imputes within the image's range: make sample 2 overflow by itself, with a pixel
    # the map ranks last (never removed), and give y (no clean forward pass)
    hot, low = x.clone(), a.clone()
    hot[2, 0, 5, 5], low[2, 5, 5] = 7.0, -100.0
    with pytest.raises(NonFiniteError, match=r"ROAD.*of samples 2\)"):
        road(net, hot, y, low, percentages=[10, 50])
    with pytest.raises(NonFiniteError, match=r"IROF \(unperturbed inputs\).*of samples 2\)"):
        irof(net, hot, y, low, segments=stripes())



@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64])
def test_stable_order_is_the_stable_sort(descending, dtype):
    """stable_order's fast paths (float32 and narrower: a sort of (order key, index) integers;
    float64: numpy's unstable argsort where nothing ties) give the indices of a stable sort,
    also with ties, signed zeros, subnormals, infinities, extreme magnitudes and NaN of
    either sign."""
    g = torch.Generator().manual_seed(3)
    tiny = torch.finfo(dtype).tiny if dtype.is_floating_point else 1
    biggest = torch.finfo(dtype).max if dtype.is_floating_point else 2**40
    rows = [torch.randn(500, generator=g),  # no ties
            torch.randint(0, 5, (500,), generator=g).float(),  # many ties
            torch.randint(-3, 4, (500,), generator=g).float() * 0.25,  # ties of both signs
            torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, 2.0] * 4),  # zeros of both signs tie
            torch.tensor([1.0, float("inf"), -float("inf"), 0.5] * 3),
            torch.full((40,), 3.0),  # one value
            # subnormals (their order is their value's), the smallest normals, the extremes
            torch.tensor([tiny / 4, -tiny / 4, tiny / 2, 0.0, -tiny, tiny, biggest, -biggest,
                          -tiny / 2, tiny / 4] * 2, dtype=torch.float64),
            # float64 values that round to the same float32, out of index order: without
            # ties, and with ties among them
            torch.tensor([1.0 + 2**-40, 1.0, 1.0 + 2**-45, 3.0, 1.0 + 2**-41, 2.0],
                         dtype=torch.float64),
            torch.tensor([1.0 + 2**-40, 1.0, 1.0, 1.0 + 2**-40, 0.5], dtype=torch.float64),
            # NaN and no ties: numpy places NaN last, torch's descending sort first
            torch.randn(50, generator=g).index_fill_(0, torch.tensor([7]), float("nan")),
            # NaN with the sign bit set: torch sorts it above everything too
            torch.randn(50, generator=g).index_fill_(0, torch.tensor([3, 9]),
                                                     -float("nan"))]
    for row in rows:
        values = torch.stack([row, row.flip(0)]).to(dtype) if dtype != torch.int64 else (
            torch.stack([row, row.flip(0)]).nan_to_num(7.0, 9.0, -9.0).to(dtype))
        expected = torch.sort(values, dim=1, descending=descending, stable=True).indices
        assert torch.equal(stable_order(values, descending=descending), expected), row[:8]
