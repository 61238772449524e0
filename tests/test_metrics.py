"""srdxai.metrics: known answers, invariances, draws, errors and GAE (no Quantus needed).

Models are tiny (linear maps and a two-conv CNN on 3x8x8 or 3x16x16 inputs) so the file runs in
seconds. The Quantus cross-checks are in tests/test_metrics_quantus.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai import metrics
from srdxai.errors import InvalidInputError, InvalidTargetError

DOUBLE = torch.float64


class TinyCNN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3/2 -> ReLU -> global average pool -> Linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class ColourNet(nn.Module):
    """Logits = 10 x the mean of each channel: the class is the dominant colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * x.mean((2, 3))


def saliency(model, x, y):
    return srdxai.explain(model, x, y, "saliency")


def gradient_x_input(model, x, y):
    return srdxai.explain(model, x, y, "gradient_x_input")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = TinyCNN().to(DOUBLE).eval()
    x = torch.randn(6, 3, 16, 16, dtype=DOUBLE)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, saliency(model, x, y)


@pytest.fixture(scope="module")
def linear():
    """A perfectly linear model; gradient x input is then exact for any removal (baseline 0)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).to(DOUBLE).eval()
    x = torch.randn(4, 3, 8, 8, dtype=DOUBLE)
    y = torch.tensor([0, 1, 2, 3])
    return model, x, y


# --- localisation ---------------------------------------------------------------------------

def square_mask(n=2, size=16, top=4, left=4, side=5):
    m = torch.zeros(n, size, size, dtype=torch.bool)
    m[:, top:top + side, left:left + side] = True
    return m


def test_pointing_game_hit_miss_tolerance_weighted_and_empty_mask():
    a = torch.zeros(4, 16, 16, dtype=DOUBLE)
    a[0, 6, 6] = 1.0  # inside the mask
    a[1, 12, 12] = 1.0  # outside, 4 px below-right of the mask's corner (8, 8): distance 5.66
    a[2, 12, 6] = 1.0  # 4 px below the mask's last row (8)
    a[3, 6, 6] = 1.0
    masks = square_mask(4)
    masks[3] = False  # empty
    game = metrics.pointing_game(None, None, None, a, masks)
    assert game[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(game[3])
    near = metrics.pointing_game(None, None, None, a, masks, tolerance=4)
    assert near[:3].tolist() == [1.0, 0.0, 1.0]
    assert metrics.pointing_game(None, None, None, a, masks, tolerance=5)[1].item() == 0.0
    assert metrics.pointing_game(None, None, None, a, masks, tolerance=6)[:3].tolist() == [1] * 3
    weighted = metrics.pointing_game(None, None, None, a, masks, weighted=True)
    assert weighted[:3].tolist() == pytest.approx([1 - 25 / 256, 0.0, 0.0])
    with pytest.raises(InvalidInputError, match="empty"):
        metrics.pointing_game(None, None, None, a, masks, empty_mask="raise")


def test_pointing_game_ties_abs_and_element_maps():
    a = torch.zeros(2, 16, 16, dtype=DOUBLE)
    a[:, 0, 0] = 2.0
    a[:, 5, 5] = 2.0  # a tie, inside the mask: a hit
    assert metrics.pointing_game(None, None, None, a, square_mask()).tolist() == [1.0, 1.0]
    signed = torch.zeros(1, 16, 16, dtype=DOUBLE)
    signed[0, 0, 0], signed[0, 5, 5] = 1.0, -3.0
    mask = square_mask(1)
    assert metrics.pointing_game(None, None, None, signed, mask).item() == 0.0
    assert metrics.pointing_game(None, None, None, signed, mask, abs=True).item() == 1.0
    elements = torch.zeros(1, 3, 16, 16, dtype=DOUBLE)
    elements[0, 2, 6, 7] = 1.0  # max in channel 2, inside the (all-channel) mask
    assert metrics.pointing_game(None, None, None, elements, mask).item() == 1.0


def test_attribution_localisation_known_ratios():
    masks = square_mask(3)
    a = torch.zeros(3, 16, 16, dtype=DOUBLE)
    a[0][masks[0]] = 1.0  # all inside
    a[1][masks[1]] = 1.0
    a[1, 0, :5] = 5.0  # as much mass outside as inside (25)
    a[2][masks[2]] = 1.0
    a[2, 0, 0] = -25.0  # negative mass outside
    ratio = metrics.attribution_localisation(None, None, None, a, masks)  # abs=True
    assert ratio.tolist() == pytest.approx([1.0, 0.5, 0.5])
    signed = metrics.attribution_localisation(None, None, None, a, masks, abs=False)
    assert signed[:2].tolist() == pytest.approx([1.0, 0.5]) and math.isnan(signed[2])  # 25/0
    positive = metrics.attribution_localisation(None, None, None, a, masks, abs=False,
                                                positive_only=True)
    assert positive.tolist() == pytest.approx([1.0, 0.5, 1.0])
    weighted = metrics.attribution_localisation(None, None, None, a, masks, weighted=True)
    assert weighted.tolist() == pytest.approx([25 / 256, 12.5 / 256, 12.5 / 256])


# --- complexity -----------------------------------------------------------------------------

def test_sparseness_and_complexity_known_answers():
    uniform = torch.full((2, 8, 8), 0.3, dtype=DOUBLE)
    one_hot = torch.zeros(2, 8, 8, dtype=DOUBLE)
    one_hot[:, 3, 4] = 1.0
    assert metrics.sparseness(None, None, None, uniform).abs().max() < 1e-12
    assert metrics.sparseness(None, None, None, one_hot).tolist() == pytest.approx(
        [1 - 1 / 64] * 2, abs=1e-5)
    assert metrics.complexity(None, None, None, uniform).tolist() == pytest.approx(
        [math.log(64)] * 2)
    assert metrics.complexity(None, None, None, one_hot).tolist() == [0.0, 0.0]
    assert metrics.complexity(None, None, None, torch.zeros(1, 4, 4)).isnan().all()


def test_per_sample_normalisation_makes_scores_batch_independent(cnn):
    """A sample's score must not depend on the other samples (Quantus 0.5+ normalises by a
    batch-wide maximum)."""
    model, x, y, a = cnn
    scaled = a.clone()
    scaled[0] *= 1000  # a louder neighbour
    for metric in (metrics.sparseness, metrics.complexity):
        assert torch.allclose(metric(model, x, y, a)[1:], metric(model, x, y, scaled)[1:])
    lle = metrics.local_lipschitz_estimate(model, x, y, a, explain=saliency, nr_samples=3)
    lle_scaled = metrics.local_lipschitz_estimate(model, x, y, scaled, explain=saliency,
                                                  nr_samples=3)
    assert torch.allclose(lle, lle_scaled)  # per-sample max-normalisation removes the scale


# --- faithfulness: known answers on a linear model ------------------------------------------

@pytest.mark.parametrize("channel_reduce", ["sum", "none"])
def test_linear_model_has_faithfulness_correlation_one(linear, channel_reduce):
    model, x, y = linear
    a = srdxai.explain(model, x, y, "gradient_x_input", channel_reduce=channel_reduce)
    score = metrics.faithfulness_correlation(model, x, y, a, baseline=0.0, nr_runs=30,
                                             subset_size=20)
    assert score.tolist() == pytest.approx([1.0] * 4, abs=1e-10)
    # With Quantus' "black" baseline the removed value is min(x), not 0: no longer exact.
    black = metrics.faithfulness_correlation(model, x, y, a, nr_runs=30, subset_size=20)
    assert (black < 1 - 1e-6).all()


@pytest.mark.parametrize("channel_reduce", ["sum", "none"])
def test_linear_model_satisfies_sensitivity_n_for_all_n(linear, channel_reduce):
    model, x, y = linear
    a = srdxai.explain(model, x, y, "gradient_x_input", channel_reduce=channel_reduce)
    result = metrics.sensitivity_n(model, x, y, a, nr_subsets=20)
    n_features = 64 if channel_reduce == "sum" else 192
    assert result.n_grid[0] == 1 and result.n_grid[-1] == int(0.8 * n_features)
    assert result.curve.shape == (4, result.n_grid.numel())
    assert torch.allclose(result.curve, torch.ones_like(result.curve), atol=1e-10)
    # Saliency (|gradient|, no x) is not sensitivity-n on a linear model.
    sal = metrics.sensitivity_n(model, x, y, saliency(model, x, y), nr_subsets=20)
    assert (sal.mean_curve < 0.9).all()


def test_sensitivity_n_draws_are_nested_permutations(linear):
    model, x, y = linear
    a = gradient_x_input(model, x, y)
    perms = metrics.random_permutations(4, 64, 5, torch.Generator().manual_seed(0))
    assert perms.shape == (4, 5, 64)
    assert (perms.sort(-1).values == torch.arange(64)).all()
    given = metrics.sensitivity_n(model, x, y, a, draws=perms, n_grid=[3, 10])
    seeded = metrics.sensitivity_n(model, x, y, a, nr_subsets=5, seed=0, n_grid=[3, 10])
    assert torch.equal(given.curve, seeded.curve)


@pytest.mark.parametrize("block_bytes", [None, 1])
def test_sensitivity_n_by_hand(cnn, monkeypatch, block_bytes):
    """Explicit permutations, a loop over samples, n and subsets from the definition; the
    samples run together or (a bound of 1 byte) one block each: the same curves."""
    from srdxai.metrics import faithfulness

    if block_bytes is not None:
        monkeypatch.setattr(faithfulness, "_SENSITIVITY_N_BLOCK_BYTES", block_bytes)
    model, x, _, _ = cnn
    y = torch.tensor([0, 3, 1, 4, 2, 0])  # a different class per sample, in every block
    a = saliency(model, x, y)
    perms = metrics.random_permutations(6, 256, 4, torch.Generator().manual_seed(2))
    grid = [1, 7, 40, 200]
    got = metrics.sensitivity_n(model, x, y, a, draws=perms, n_grid=grid, baseline=0.5)
    with torch.no_grad():
        for i in range(6):
            clean = model(x[i:i + 1])[0, y[i]]
            expected = []
            for n in grid:
                sums, drops = [], []
                for r in range(4):
                    removed = perms[i, r, :n]
                    perturbed = x[i].clone().view(3, -1)
                    perturbed[:, removed] = 0.5
                    drops.append(float(clean - model(perturbed.view(1, 3, 16, 16))[0, y[i]]))
                    sums.append(float(a[i].flatten()[removed].sum()))
                expected.append(np.corrcoef(sums, drops)[0, 1])
            assert got.curve[i].numpy() == pytest.approx(expected, abs=1e-9)


class SumModel(nn.Module):
    """Logits [sum of channel 0, 0]: the class-0 score drops by exactly what is removed."""

    def forward(self, x):
        total = x[:, 0].flatten(1).sum(1)
        return torch.stack([total, torch.zeros_like(total)], 1)


def test_insertion_and_deletion_curves_of_a_known_model():
    torch.manual_seed(2)
    x = torch.rand(3, 1, 4, 4, dtype=DOUBLE)
    y = torch.zeros(3, dtype=torch.long)
    a = x[:, 0].clone()  # the exact contribution of each pixel
    top_sums = torch.sort(x.flatten(1), descending=True).values.cumsum(1)
    total = top_sums[:, -1:]
    expected_deletion = torch.cat([total, total - top_sums], 1)  # 17 points: 0..16 deleted
    expected_insertion = torch.cat([torch.zeros_like(total), top_sums], 1)
    fractions = torch.arange(17, dtype=DOUBLE) / 16
    deletion = metrics.deletion(SumModel(), x, y, a, step=1, softmax=False)
    insertion = metrics.insertion(SumModel(), x, y, a, step=1, softmax=False, baseline=0.0)
    assert torch.allclose(deletion.curve, expected_deletion)
    assert torch.allclose(insertion.curve, expected_insertion)
    assert torch.allclose(deletion.fractions, fractions)
    assert torch.allclose(deletion.auc, torch.trapezoid(expected_deletion, fractions))
    assert torch.allclose(insertion.auc, torch.trapezoid(expected_insertion, fractions))
    # A good map deletes fast and inserts fast; the reversed map is worse on both.
    worse_del = metrics.deletion(SumModel(), x, y, -a, step=1, softmax=False)
    worse_ins = metrics.insertion(SumModel(), x, y, -a, step=1, softmax=False, baseline=0.0)
    assert (deletion.auc < worse_del.auc).all() and (insertion.auc > worse_ins.auc).all()
    # step=3 on 16 pixels: 0, 3, ..., 15, 16 -> 7 points
    coarse = metrics.deletion(SumModel(), x, y, a, step=3, softmax=False)
    assert coarse.fractions.mul(16).tolist() == [0, 3, 6, 9, 12, 15, 16]
    assert torch.allclose(coarse.curve, expected_deletion[:, [0, 3, 6, 9, 12, 15, 16]])


def test_pixel_flipping_known_curve_and_pixel_vs_element_maps(cnn):
    torch.manual_seed(3)
    x = torch.rand(2, 1, 4, 4, dtype=DOUBLE)
    y = torch.zeros(2, dtype=torch.long)
    a = x[:, 0]
    result = metrics.pixel_flipping(SumModel(), x, y, a, features_in_step=4, softmax=False,
                                    baseline=0.0)
    top_sums = torch.sort(x.flatten(1), descending=True).values.cumsum(1)
    expected = top_sums[:, -1:] - top_sums[:, [3, 7, 11, 15]]
    assert torch.allclose(result.curve, expected)
    assert torch.allclose(result.auc, torch.trapezoid(expected, dim=1))
    # A pixel map flipping k pixels per step equals the map broadcast over channels flipping
    # k*C elements (ties between a pixel's channels are adjacent in the stable order).
    model, x, y, a = cnn
    pixels = metrics.pixel_flipping(model, x, y, a, features_in_step=8)
    elements = metrics.pixel_flipping(model, x, y, a[:, None].expand_as(x), features_in_step=24)
    assert torch.allclose(pixels.curve, elements.curve)


# --- random draws: seeds, explicit draws, batch-size invariance -----------------------------

def test_faithfulness_correlation_draws_seed_and_batch_size(cnn):
    model, x, y, a = cnn
    options = {"nr_runs": 12, "subset_size": 20}
    first = metrics.faithfulness_correlation(model, x, y, a, seed=7, **options)
    again = metrics.faithfulness_correlation(model, x, y, a, seed=7, batch_size=5, **options)
    other = metrics.faithfulness_correlation(model, x, y, a, seed=8, **options)
    assert torch.allclose(first, again, rtol=0, atol=1e-12) and not torch.allclose(first, other)
    draws = metrics.random_subsets(6, 256, 12, 20, torch.Generator().manual_seed(7))
    assert draws.shape == (6, 12, 20)
    assert all(len(set(row.tolist())) == 20 for row in draws.flatten(0, 1))
    given = metrics.faithfulness_correlation(model, x, y, a, draws=draws)
    assert torch.equal(given, first)
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(metrics.faithfulness_correlation(model, x, y, a, generator=generator,
                                                        **options), first)


def test_faithfulness_correlation_by_hand(cnn):
    """One sample, explicit subsets: the correlation computed the slow way."""
    model, x, y, a = cnn
    draws = metrics.random_subsets(6, 256, 5, 30, torch.Generator().manual_seed(1))
    ours = metrics.faithfulness_correlation(model, x, y, a, draws=draws, softmax=True)
    i = 2
    sums, drops = [], []
    with torch.no_grad():
        clean = model(x[i:i + 1]).softmax(1)[0, y[i]]
        for run in range(5):
            perturbed = x[i].clone().view(3, -1)
            perturbed[:, draws[i, run]] = x[i].min()
            drops.append(clean - model(perturbed.view(1, 3, 16, 16)).softmax(1)[0, y[i]])
            normalised = a[i] / a[i].abs().max()
            sums.append(normalised.flatten()[draws[i, run]].sum())
    expected = np.corrcoef(torch.stack(sums).numpy(), torch.stack(drops).numpy())[0, 1]
    assert ours[i].item() == pytest.approx(expected, abs=1e-12)


def test_robustness_known_answers():
    """Map = the input itself, unnormalised: LLE = max ||d|| / ||d|| = 1, and
    max-sensitivity = max ||d|| / ||x||; a constant map scores 0."""
    model = TinyCNN().to(DOUBLE).eval()
    x = torch.rand(3, 3, 8, 8, dtype=DOUBLE) + 0.5
    y = torch.zeros(3, dtype=torch.long)
    identity = lambda m, xx, yy: xx  # noqa: E731 - an element map equal to the input
    lle = metrics.local_lipschitz_estimate(model, x, y, explain=identity, normalise=False,
                                           nr_samples=5)
    assert lle.tolist() == pytest.approx([1.0] * 3, abs=1e-9)
    noise = torch.rand(4, 3, 3, 8, 8, dtype=DOUBLE, generator=torch.Generator().manual_seed(0))
    noise = (noise - 0.5) * 0.4
    sensitivity = metrics.max_sensitivity(model, x, y, explain=identity, draws=noise)
    expected = (noise.flatten(2).norm(dim=2) / x.flatten(1).norm(dim=1)).max(0).values
    assert torch.allclose(sensitivity, expected)
    average = metrics.avg_sensitivity(model, x, y, explain=identity, draws=noise)
    assert torch.allclose(average, (noise.flatten(2).norm(dim=2) / x.flatten(1).norm(dim=1))
                          .mean(0))
    constant = lambda m, xx, yy: torch.ones(xx.shape[0], 8, 8, dtype=DOUBLE)  # noqa: E731
    assert metrics.local_lipschitz_estimate(model, x, y, explain=constant,
                                            nr_samples=3).abs().max() == 0


def test_robustness_batch_size_seed_and_noise_draws(cnn):
    model, x, y, a = cnn
    first = metrics.local_lipschitz_estimate(model, x, y, a, explain=saliency, nr_samples=4,
                                             seed=3)
    chunked = metrics.local_lipschitz_estimate(model, x, y, a, explain=saliency, nr_samples=4,
                                               seed=3, batch_size=5)  # chunks cross steps
    assert torch.allclose(first, chunked, rtol=1e-12)
    generator = torch.Generator().manual_seed(3)
    draws = torch.stack([torch.randn(x.shape, generator=generator, dtype=DOUBLE) * 0.1
                         for _ in range(4)])
    given = metrics.local_lipschitz_estimate(model, x, y, a, explain=saliency, draws=draws)
    assert torch.allclose(first, given, rtol=1e-12)
    # the whole noise tensor is drawn step by step, so batch_size cannot change it
    source = metrics.NoiseDraws(x.shape, 4, "gaussian", 0.0, 0.1,
                                torch.Generator().manual_seed(3))
    assert torch.allclose(torch.cat([source.rows(0, 7), source.rows(7, 24)]),
                          draws.flatten(0, 1))


def test_nan_when_prediction_changes(cnn):
    model, x, y, a = cnn
    big = metrics.local_lipschitz_estimate(model, x, y, a, explain=saliency, nr_samples=3,
                                           perturb_std=100.0, nan_when_prediction_changes=True)
    assert big.isnan().any()
    small = metrics.local_lipschitz_estimate(model, x, y, a, explain=saliency, nr_samples=3,
                                             perturb_std=1e-9, nan_when_prediction_changes=True)
    assert not small.isnan().any()


# --- inputs: numpy, layouts, errors ---------------------------------------------------------

def test_numpy_inputs_and_one_channel_maps(cnn):
    model, x, y, a = cnn
    model32 = TinyCNN().eval()
    x32 = x.float()
    with torch.no_grad():
        y32 = model32(x32).argmax(1)
    a32 = saliency(model32, x32, y32)
    from_torch = metrics.faithfulness_correlation(model32, x32, y32, a32, nr_runs=5)
    from_numpy = metrics.faithfulness_correlation(model32, x32.numpy(), y32.numpy(),
                                                  a32[:, None].numpy(), nr_runs=5)
    assert torch.equal(from_torch, from_numpy)
    masks = square_mask(6).numpy().astype(np.float32)[:, None]
    assert torch.equal(metrics.pointing_game(None, None, None, a.numpy(), masks),
                       metrics.pointing_game(None, None, None, a, square_mask(6)))
    assert metrics.sparseness(None, None, None, a.tolist()).shape == (6,)


def test_clear_errors(cnn):
    model, x, y, a = cnn
    masks = square_mask(6)
    bad = a.clone()
    bad[2, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match=r"NaN or Inf \(samples \[2\]\)"):
        metrics.sparseness(model, x, y, bad)
    bad[2, 0, 0] = float("inf")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        metrics.faithfulness_correlation(model, x, y, bad)
    with pytest.raises(InvalidInputError, match="spatial size"):
        metrics.pointing_game(model, x, y, a[:, :8], masks)
    with pytest.raises(InvalidInputError, match="hold 5 maps but x holds 6"):
        metrics.pointing_game(model, x, y, a[:5], masks)
    with pytest.raises(InvalidInputError, match="channels"):
        metrics.sparseness(model, x, y, torch.zeros(6, 2, 16, 16))
    with pytest.raises(InvalidInputError, match="binary"):
        metrics.pointing_game(model, x, y, a, masks * 0.5)
    with pytest.raises(InvalidInputError, match="masks have shape"):
        metrics.attribution_localisation(model, x, y, a, masks[:, :8])
    with pytest.raises(InvalidInputError, match="needs masks"):
        metrics.pointing_game(model, x, y, a)
    with pytest.raises(InvalidInputError, match="explain="):
        metrics.local_lipschitz_estimate(model, x, y, a)
    with pytest.raises(InvalidInputError, match=r"\(N, C, H, W\)"):
        metrics.faithfulness_correlation(model, x[0], y, a)
    with pytest.raises(InvalidInputError, match="subset_size"):
        metrics.faithfulness_correlation(model, x, y, a, subset_size=256)
    with pytest.raises(InvalidTargetError, match="classes >="):
        metrics.faithfulness_correlation(model, x, torch.full((6,), 9), a, nr_runs=3)
    with pytest.raises(InvalidTargetError, match="one class per sample"):
        metrics.deletion(model, x, y[:3], a)
    with pytest.raises(InvalidInputError, match="model's parameters"):
        metrics.deletion(model, x.float(), y, a)
    with pytest.raises(InvalidInputError, match="baseline"):
        metrics.deletion(model, x, y, a, baseline="grey")
    with pytest.raises(InvalidInputError, match="explain returned maps of shape"):
        metrics.max_sensitivity(model, x, y, a, nr_samples=2, explain=lambda m, xx, yy: srdxai
                                .explain(m, xx, yy, "saliency", channel_reduce="none"))
    with pytest.raises(InvalidInputError, match="permutations"):
        metrics.sensitivity_n(model, x, y, a, draws=torch.zeros(6, 3, 256, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="multiple of 4"):
        metrics.gae(model, x[:5], y[:5], explain=saliency)
    with pytest.raises(InvalidTargetError, match="outputs"):
        metrics.gae(model, x[:4], torch.full((4,), 9), explain=saliency)


def test_predicted_class_when_y_is_none_and_progress_bar(cnn):
    model, x, y, a = cnn
    assert torch.equal(metrics.deletion(model, x, None, a, progress=True).curve,
                       metrics.deletion(model, x, y, a).curve)


# --- GAE ------------------------------------------------------------------------------------

def colour_images(colours: list[int], size: int = 8) -> torch.Tensor:
    """One image per class: its class channel 1 plus a little noise, the others 0."""
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(len(colours), 3, size, size, dtype=DOUBLE)
    for i, c in enumerate(colours):
        x[i, c] = 1.0 + 0.05 * torch.rand(size, size, generator=generator, dtype=DOUBLE)
    return x


def colour_oracle(model, x, targets):
    """The perfect map: intensity of the target colour."""
    return x[torch.arange(x.shape[0]), targets]


def test_make_mosaics_groups_consecutive_images():
    tiles = torch.arange(8, dtype=DOUBLE).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    mosaics = metrics.make_mosaics(tiles)
    assert mosaics.shape == (2, 1, 4, 4)
    assert mosaics[1, 0, ::2, ::2].tolist() == [[4, 5], [6, 7]]


def test_gae_contrastiveness_is_aligned_with_the_groups_for_batch_16():
    """With the reference's mosaic/label misalignment (any batch other than 4) the oracle's
    mosaic map would be scored against other groups' tiles; here it scores 1 in every group."""
    colours = [0, 1, 2, 0, 1, 1, 2, 0, 2, 0, 1, 2, 0, 0, 1, 2]
    x = colour_images(colours)
    y = torch.tensor(colours)
    model = ColourNet()
    result = metrics.gae(model, x, y, explain=colour_oracle, seed=0)
    assert result.gae.shape == (4,)
    assert (result.positive_indices // 4 == torch.arange(4)).all()
    assert torch.allclose(result.contrastiveness, torch.ones(4, dtype=DOUBLE))
    assert (y[result.positive_indices] == model(x[result.positive_indices]).argmax(1)).all()
    # A uniform map scores the mean of the score map S (the tiles' relative probabilities).
    uniform = metrics.gae(model, x, y, explain=lambda m, xx, t: torch.ones_like(xx[:, 0]),
                          draws=result.positive_tiles)
    with torch.no_grad():
        probabilities = model(x[result.positive_indices]).softmax(1)
    tile_p = probabilities.gather(1, y.view(4, 4))
    own = tile_p.gather(1, result.positive_tiles[:, None])
    tile_scores = 2 * tile_p / own - 1  # (4 groups, 4 tiles), each tile 4x4 px of the 8x8
    expected = (tile_scores.sum(1) * 16 - tile_scores.sum(1) + 4) / 64  # centre 2x2 := 1
    assert torch.allclose(uniform.contrastiveness, expected.clamp_min(0))


def test_gae_groups_are_independent_and_draws_reproduce(cnn):
    model, x, y, _ = cnn
    x8, y8 = torch.cat([x, x[:2]]), torch.cat([y, y[:2]])
    whole = metrics.gae(model, x8, y8, explain=saliency, num_masking_steps=4, seed=1)
    again = metrics.gae(model, x8, y8, explain=saliency, num_masking_steps=4, seed=1,
                        batch_size=2)
    first = metrics.gae(model, x8[:4], y8[:4], explain=saliency, num_masking_steps=4,
                        draws=whole.positive_tiles[:1])
    second = metrics.gae(model, x8[4:], y8[4:], explain=saliency, num_masking_steps=4,
                         draws=whole.positive_tiles[1:])
    for field in ("gae", "local_consistency", "faithfulness", "robustness", "contrastiveness"):
        joined = torch.cat([getattr(first, field), getattr(second, field)])
        assert torch.allclose(getattr(whole, field), joined, atol=1e-12), field
        assert torch.allclose(getattr(whole, field), getattr(again, field), atol=1e-12), field
    assert ((whole.gae >= 0) & (whole.gae <= 1)).all()
    assert ((whole.faithfulness.abs() <= 1) & (whole.robustness.abs() <= 1)).all()


def slow_gae_group(model, x4, y4, tile, explain, steps):
    """GAE of one group of four, written out step by step from docs/metrics.md."""
    h, w = x4.shape[-2:]
    small = F.interpolate(x4, size=(h // 2, w // 2))
    mosaic = torch.cat([torch.cat([small[0], small[1]], -1),
                        torch.cat([small[2], small[3]], -1)], -2)[None]
    with torch.no_grad():
        logits = model(x4)
    positive = x4[tile:tile + 1]
    target = logits.argmax(1)[tile:tile + 1]

    def positive_map(maps):
        maps = maps if maps.dim() == 4 else maps[:, None]
        r = maps.clamp_min(0)
        return r / (r.max() + 1e-9)

    def distance(a, b):
        return (a - b).abs().sum() / (a.abs().sum() + b.abs().sum() + 1e-9)

    sequences = {}
    for order in ("morf", "lerf"):
        current, xs, outs, impacts = positive.clone(), [], [], []
        for p in torch.linspace(1 / steps, 1, steps):
            leaf = current.clone().requires_grad_(True)
            out = model(leaf)[0, target[0]]
            (grad,) = torch.autograd.grad(out, leaf)
            g = (leaf.detach() * grad).abs()
            g = g / (g.sum() + 1e-9)
            xs.append(current)
            outs.append(out.detach())
            impacts.append(g)
            if p < 1:
                k = int(p * g.numel())
                chosen = g.flatten().topk(k, largest=order == "morf").indices
                current = current.flatten().clone()
                current[chosen] = 0.0
                current = current.view_as(positive)
        sequences[order] = (xs, outs, sum(impacts))
    lerf_sum, morf_sum = sequences["lerf"][2], sequences["morf"][2]
    cim = torch.sign(lerf_sum / (lerf_sum.abs().sum() + 1e-9)
                     - morf_sum / (morf_sum.abs().sum() + 1e-9))
    r = positive_map(explain(model, positive, target))
    faithfulness = (r * cim).sum() / (r.expand_as(cim).sum() + 1e-9)
    map_changes, output_changes = [], []
    o0 = sequences["morf"][1][0]
    for s in range(1, steps):
        r_morf = positive_map(explain(model, sequences["morf"][0][s], target))
        r_lerf = positive_map(explain(model, sequences["lerf"][0][s], target))
        map_changes.append(distance(r, r_morf) - distance(r, r_lerf))
        output_changes.append(sequences["lerf"][1][s] / (o0 + 1e-9)
                              - sequences["morf"][1][s] / (o0 + 1e-9))
    robustness = 1 - 2 * distance(torch.stack(map_changes), torch.stack(output_changes))
    probabilities = logits[tile].softmax(0)
    score = torch.empty(1, 1, 2 * (h // 2), 2 * (w // 2), dtype=x4.dtype)
    for j, (top, left) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        value = 2 * probabilities[y4[j]] / probabilities[y4[tile]] - 1
        score[..., top * (h // 2):(top + 1) * (h // 2), left * (w // 2):(left + 1) * (w // 2)] = (
            value)
    score[..., h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1] = 1.0
    r_mosaic = positive_map(explain(model, mosaic, target))
    contrastiveness = ((r_mosaic * score).sum() / (r_mosaic.sum() + 1e-9)).clamp_min(0)
    local_consistency = (faithfulness + robustness).clamp_min(0) / 2
    return local_consistency * contrastiveness, faithfulness, robustness, contrastiveness


@pytest.mark.parametrize("explain", [saliency, gradient_x_input])
def test_gae_matches_the_step_by_step_definition(cnn, explain):
    model, x, y, _ = cnn
    x4, y4 = x[:4], torch.tensor([1, 3, 0, 2])
    result = metrics.gae(model, x4, y4, explain=explain, num_masking_steps=5, seed=2)
    tile = int(result.positive_tiles[0])
    gae, faithfulness, robustness, contrastiveness = slow_gae_group(model, x4, y4, tile,
                                                                    explain, 5)
    assert result.faithfulness.item() == pytest.approx(faithfulness.item(), abs=1e-9)
    assert result.robustness.item() == pytest.approx(robustness.item(), abs=1e-9)
    assert result.contrastiveness.item() == pytest.approx(contrastiveness.item(), abs=1e-9)
    assert result.gae.item() == pytest.approx(gae.item(), abs=1e-9)


def test_blur_substrate_is_rises_scipy_filtered_delta():
    """RISE: gaussian_filter(11x11 delta, sigma 5) with scipy's reflect mode as the kernel of a
    zero-padded conv2d; the reflected tails make it flatter than a truncated Gaussian."""
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    from srdxai.metrics.common import baseline_values

    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    kernel = scipy_ndimage.gaussian_filter(delta, 5)
    x = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
    weight = torch.from_numpy(kernel).expand(3, 1, 11, 11)
    expected = F.conv2d(x, weight, padding=5, groups=3)
    assert torch.allclose(baseline_values("blur", x), expected, atol=1e-12)
    truncated = np.exp(-((np.arange(11) - 5) ** 2) / 50.0)
    truncated = np.outer(truncated, truncated) / np.outer(truncated, truncated).sum()
    assert np.abs(truncated - kernel).max() > 1e-3  # the old substrate differed


def test_max_sensitivity_keeps_an_infinite_value_infinite():
    """A draw whose relative change is infinite stays inf (torch.nan_to_num would make it
    1.8e308); NaN draws are skipped as before."""
    from srdxai.metrics.robustness import _nanmax

    values = torch.tensor([[1.0, math.nan, math.nan], [math.inf, 2.0, math.nan]],
                          dtype=torch.float64)
    out = _nanmax(values)
    assert out[0] == math.inf and out[1] == 2.0 and math.isnan(out[2])


@pytest.mark.parametrize("held", [1, 7, 64])
def test_scores_are_the_same_whatever_logits_are_held_together(cnn, monkeypatch, held):
    # scores_in_batches checks and scores the logits of consecutive chunks together, up to
    # _PENDING_ROWS rows: blocks of 1, 7 (ending inside chunks) or 64 rows give the scores of
    # the default, to the bit
    from srdxai.metrics import common

    model, x, y, a = cnn

    def run():
        return (metrics.pixel_flipping(model, x, y, a, features_in_step=9, batch_size=5).curve,
                metrics.faithfulness_correlation(model, x, y, a, nr_runs=6, subset_size=10,
                                                 batch_size=4),
                metrics.road(model, x, y, a, percentages=[10, 50], batch_size=3))

    expected = run()
    monkeypatch.setattr(common, "_PENDING_ROWS", held)
    for got, want in zip(run(), expected, strict=True):
        got = got.auc if hasattr(got, "auc") else got
        want = want.auc if hasattr(want, "auc") else want
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
