"""The fidelity protocol's options (Spearman, fractional subsets, grid cells), MuFidelity and the
absolute-value SmoothGrad: known answers and slow loop oracles written from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai import metrics
from srdxai.errors import InvalidInputError
from srdxai.metrics.common import average_ranks, spearman


class Linear(nn.Module):
    """f_k(x) = sum(w_k * x): removing a set S to a zero baseline drops f_y by sum_S w_y * x,
    which is exactly gradient x input summed over S."""

    def __init__(self, shape: tuple[int, int, int], classes: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, *shape, generator=torch.Generator()
                                          .manual_seed(1), dtype=torch.float64))

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.w)


@pytest.fixture
def linear_case():
    x = torch.randn(3, 2, 12, 10, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    model = Linear(tuple(x.shape[1:]))
    y = torch.tensor([0, 2, 1])
    exact = x * model.w.detach()[y]  # per element
    return model, x, y, exact.sum(1)  # pixel map


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3)).eval()


def test_spearman_and_average_ranks_equal_scipy_with_ties():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (5, 17), generator=g).double()
    b = torch.randn(5, 17, generator=g)
    assert np.allclose(average_ranks(a).numpy(), scipy.stats.rankdata(a.numpy(), axis=1))
    expected = [scipy.stats.spearmanr(a[i], b[i])[0] for i in range(5)]
    assert np.allclose(spearman(a, b).numpy(), expected)
    assert torch.isnan(spearman(torch.ones(1, 5), b[:1, :5])).all()


def test_average_ranks_on_a_cpu_are_the_torch_ranks_to_the_bit():
    # the CPU path (keyed sort, numpy groups) gives exactly the values of the torch path
    # (sort, index_add, scatter) and scipy's: ties of both signs and zeros, infinities, one
    # value, float32 input, 1-D and 3-D shapes; NaN (each its own group, above everything)
    # the same but in index order, where the torch path's unstable sort orders them as it
    # happens to (scipy gives NaN for the whole row)
    from srdxai.metrics.common import _average_ranks_torch

    g = torch.Generator().manual_seed(4)
    cases = [torch.randn(6, 50, generator=g, dtype=torch.float64),
             torch.randint(-3, 4, (6, 50), generator=g).double() * 0.5,
             torch.tensor([[0.0, -0.0, 1.0, -0.0, math.inf, -math.inf, 1.0, 0.0]]),
             torch.full((3, 9), 2.0),
             torch.randn(4, 30, generator=g).index_fill_(1, torch.tensor([3, 8, 20]), math.nan),
             torch.randint(0, 3, (40,), generator=g).float(),
             torch.randint(0, 5, (2, 3, 33), generator=g).double()]
    for a in cases:
        got = average_ranks(a)
        want = _average_ranks_torch(a.to(torch.float64))
        assert got.shape == a.shape and got.dtype == torch.float64
        nan = torch.isnan(a)
        assert torch.equal(got[~nan], want[~nan]), a
        if not nan.any():
            assert np.array_equal(got.numpy(), scipy.stats.rankdata(a.numpy(), axis=-1))
        for row, row_nan in zip(got.reshape(-1, a.shape[-1]), nan.reshape(-1, a.shape[-1]),
                                strict=True):
            top = torch.arange(a.shape[-1] - int(row_nan.sum()), a.shape[-1]) + 1.0
            assert torch.equal(row[row_nan], top.double())


@pytest.mark.parametrize("correlation", ["pearson", "spearman"])
@pytest.mark.parametrize("cell", [1, 3])
def test_exact_map_scores_one_and_its_negative_minus_one(linear_case, correlation, cell):
    model, x, y, exact = linear_case
    kw = dict(nr_runs=12, subset_size=5 if cell == 1 else 3, baseline=0.0, normalise=None,
              correlation=correlation, cell=cell)
    assert np.allclose(metrics.faithfulness_correlation(model, x, y, exact, **kw), 1.0)
    assert np.allclose(metrics.faithfulness_correlation(model, x, y, -exact, **kw), -1.0)


def test_fractional_subset_size_is_the_rounded_count(linear_case):
    model, x, y, exact = linear_case
    noisy = exact + torch.randn_like(exact)
    by_count = metrics.faithfulness_correlation(model, x, y, noisy, nr_runs=9, subset_size=12)
    by_fraction = metrics.faithfulness_correlation(model, x, y, noisy, nr_runs=9,
                                                   subset_size=0.1)  # 0.1 * 120 pixels
    assert torch.equal(by_count, by_fraction)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(InvalidInputError, match="fractional subset_size"):
            metrics.faithfulness_correlation(model, x, y, noisy, subset_size=bad)
    with pytest.raises(InvalidInputError, match="correlation"):
        metrics.faithfulness_correlation(model, x, y, noisy, correlation="kendall")


def test_grid_cells_equal_a_loop_over_runs():
    """Cells of 4 px on a 14 x 13 image (edge cells smaller), element map, 'mean' baseline:
    a loop over samples and runs, from the definition."""
    model = small_cnn().double()
    x = torch.randn(2, 3, 14, 13, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    y = torch.tensor([1, 2])
    a = torch.randn(2, 3, 14, 13, generator=torch.Generator().manual_seed(6),
                    dtype=torch.float64)
    cell_rows, cell_cols = 4, 4  # ceil(14 / 4) x ceil(13 / 4) cells
    draws = torch.stack([torch.stack([torch.randperm(16, generator=torch.Generator()
                                                     .manual_seed(10 * s + r))[:5]
                                      for r in range(7)]) for s in range(2)])
    got = metrics.faithfulness_correlation(model, x, y, a, draws=draws, cell=4,
                                           baseline="mean", normalise=None)
    expected = []
    with torch.no_grad():
        for s in range(2):
            clean = model(x[s:s + 1])[0, y[s]]
            sums, drops = [], []
            for r in range(7):
                hole = torch.zeros(14, 13, dtype=torch.bool)
                for c in draws[s, r].tolist():
                    row, col = divmod(c, cell_cols)
                    hole[4 * row:4 * row + 4, 4 * col:4 * col + 4] = True
                assert row < cell_rows
                perturbed = x[s].clone()
                perturbed[:, hole] = x[s].mean()
                drops.append(float(clean - model(perturbed[None])[0, y[s]]))
                sums.append(float(a[s][:, hole].sum()))
            expected.append(np.corrcoef(sums, drops)[0, 1])
    assert np.allclose(got.numpy(), expected, atol=1e-10)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # sample 2, on purpose
def test_mu_fidelity_equals_a_loop_from_xpliques_definition():
    model = small_cnn()
    x = torch.randn(3, 3, 20, 23, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 1, 2])
    a = torch.randn(3, 20, 23, generator=torch.Generator().manual_seed(8))
    a[2] = 0.0  # constant sums: xplique scores 0
    draws = torch.rand(11, 9, 9, generator=torch.Generator().manual_seed(9)) < 0.2
    got = metrics.mu_fidelity(model, x, y, a, draws=draws, baseline=0.0)
    # upsampling the cell masks as TF's nearest resize with half-pixel centres does
    holes = F.interpolate(draws[:, None].float(), size=(20, 23), mode="nearest-exact")[:, 0] > 0
    expected = []
    with torch.no_grad():
        for s in range(3):
            clean = float(model(x[s:s + 1])[0, y[s]])
            drops = [clean - float(model(torch.where(h, 0.0, x[s])[None])[0, y[s]])
                     for h in holes]
            sums = [float(a[s][h].sum()) for h in holes]
            rho = scipy.stats.spearmanr(drops, sums)[0]
            expected.append(0.0 if np.isnan(rho) else rho)
    assert np.allclose(got.numpy(), expected, atol=1e-6)
    assert got[2] == 0.0


def test_mu_fidelity_known_answer_and_options(linear_case):
    model, x, y, exact = linear_case
    score = metrics.mu_fidelity(model, x, y, exact, nr_samples=40, grid_size=4, seed=2)
    assert np.allclose(score.numpy(), 1.0)
    noisy = exact + 3 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(3),
                                    dtype=exact.dtype)
    first = metrics.mu_fidelity(model, x, y, noisy, nr_samples=40, seed=2)
    assert (first < 0.999).all()  # the noise shows
    assert torch.equal(first, metrics.mu_fidelity(model, x, y, noisy, nr_samples=40, seed=2))
    assert not torch.equal(first, metrics.mu_fidelity(model, x, y, noisy, nr_samples=40,
                                                      seed=3))
    with pytest.raises(InvalidInputError, match="subset_fraction"):
        metrics.mu_fidelity(model, x, y, exact, subset_fraction=1.0)
    with pytest.raises(InvalidInputError, match="draws must have shape"):
        metrics.mu_fidelity(model, x, y, exact, draws=torch.zeros(5, 3, 3, dtype=torch.bool))


def test_absolute_smoothgrad_is_the_mean_absolute_gradient():
    """Captum's NoiseTunnel(Saliency): |gradient| at each noisy copy, averaged (per element),
    then summed over channels here."""
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([2, 0])
    noise = torch.randn(5, 2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    got = srdxai.explain(model, x, y, "smoothgrad", samples=5, noise=noise, absolute=True)
    total = torch.zeros_like(x)
    for k in range(5):
        point = (x + noise[k]).requires_grad_(True)
        model(point).gather(1, y[:, None]).sum().backward()
        total += point.grad.abs()
    assert torch.allclose(got, (total / 5).sum(1), atol=1e-6)
    signed = srdxai.explain(model, x, y, "smoothgrad", samples=5, noise=noise)
    assert (got >= 0).all() and (signed < 0).any()


# --- the protocol as configuration (srdxai.experiments.protocol) ------------------------------

def test_protocol_validates_and_describes_its_choices():
    from srdxai.experiments.protocol import FidelityProtocol, Protocol, parse_variants

    assert FidelityProtocol().describe() == (
        "black baseline, signed maps, subsets of 224 features (at most a quarter of them), "
        "Pearson, pixels")
    for bad in ({"baseline": "white"}, {"correlation": "kendall"}, {"subset": 1.0},
                {"subset": 0}, {"grid": 1}, {"runs": 1}):
        with pytest.raises(InvalidInputError):
            FidelityProtocol(**bad)
    with pytest.raises(InvalidInputError, match="unknown fidelity variant"):
        Protocol(variants=("abs", "kendall"))
    with pytest.raises(InvalidInputError, match="unknown fidelity variant"):
        parse_variants("abs,nope")
    assert parse_variants("none") == () and parse_variants("abs, spearman") == ("abs",
                                                                                  "spearman")
    stored = Protocol(variants=("abs",), pointing_tolerance=9, stability_draws=60).public()
    assert Protocol.from_dict(stored) == Protocol(variants=("abs",), pointing_tolerance=9,
                                                  stability_draws=60)
    assert Protocol().draws(quick=True) == 10 and Protocol().draws(quick=False) == 50


def test_protocol_scales_to_the_image_and_shares_forward_passes():
    from srdxai.experiments.protocol import FidelityProtocol, Protocol, pixels_at

    assert pixels_at(15, 224) == 15 and pixels_at(15, 64) == 4
    small = FidelityProtocol().options(16, 16, quick=True)
    assert small["subset_size"] == 64 and small["nr_runs"] == 50  # capped at a quarter
    grid = FidelityProtocol(grid=14, subset=0.1).options(64, 64, quick=False)
    assert grid["cell"] == 5 and grid["nr_runs"] == 100
    groups = Protocol().fidelity_groups(64, 64, quick=True)
    first = groups[0][1]
    assert set(first) == {"fidelity", "fidelity[abs]", "fidelity[spearman]"}
    assert sum(len(g[1]) for g in groups) == 1 + len(Protocol().variants)


def test_readings_share_draws_and_equal_separate_calls():
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    a = srdxai.explain(model, x, y, "gradient_x_input")
    together = metrics.faithfulness_correlations(
        model, x, y, a, nr_runs=10, subset_size=20, seed=4,
        readings={"plain": {}, "abs": {"abs": True}, "rank": {"correlation": "spearman"}})
    for name, options in (("plain", {}), ("abs", {"abs": True}),
                          ("rank", {"correlation": "spearman"})):
        alone = metrics.faithfulness_correlation(model, x, y, a, nr_runs=10, subset_size=20,
                                                 seed=4, **options)
        assert torch.allclose(together[name], alone, equal_nan=True)
    with pytest.raises(InvalidInputError, match="may set only"):
        metrics.faithfulness_correlations(model, x, y, a, readings={"bad": {"baseline": 0}})


# --- monotonicity and completeness --------------------------------------------------------------

class PositiveLinear(nn.Module):
    """f_k(x) = sum(w_k * x) with w > 0: on a positive input every feature put back raises it."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        w = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64) + 0.1
        w[1] *= sign
        self.w = nn.Parameter(w)

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.w)


def test_monotonicity_known_answers():
    x = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(8),
                   dtype=torch.float64) + 0.5
    model = PositiveLinear(sign=-1.0)  # class 0 rises with every feature, class 1 falls
    a = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = metrics.monotonicity(model, x, torch.tensor([0, 1]), a, baseline=0.0)
    assert got.tolist() == [1.0, 0.0]
    one_step = metrics.monotonicity(model, x, torch.tensor([0, 1]), a, baseline=0.0,
                                    features_in_step=30)  # a single point: nothing can fall
    assert one_step.tolist() == [1.0, 1.0]


def test_monotonicity_orders_features_from_least_to_most_important():
    """f = x_0 - x_1 on a positive image: putting x_1 back lowers f, x_0 raises it; with
    features_in_step=2 over 4 pixels the curve is monotone only when x_1 comes in the first
    step, i.e. when the map ranks x_1 among the least important."""
    class TwoPixels(nn.Module):
        def forward(self, x):
            flat = x.sum(1).flatten(1)
            return torch.stack([flat[:, 0] - flat[:, 1], -flat[:, 0]], 1)

    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    low_first = torch.tensor([[[3.0, 0.0], [2.0, 1.0]]], dtype=torch.float64)  # x_1 least
    high_first = torch.tensor([[[0.0, 3.0], [1.0, 2.0]]], dtype=torch.float64)  # x_1 most
    kw = dict(baseline=0.0, features_in_step=2, abs=False, normalise=None)
    assert metrics.monotonicity(TwoPixels(), x, 0, low_first, **kw).tolist() == [1.0]
    assert metrics.monotonicity(TwoPixels(), x, 0, high_first, **kw).tolist() == [0.0]


def test_completeness_gap_of_exact_and_inexact_maps():
    model = Linear((2, 6, 5))
    x = torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    exact = (x * model.w.detach()[y]).sum(1)  # gradient x input of a bias-free linear model
    assert torch.allclose(metrics.completeness(model, x, y, exact, baseline=0.0),
                          torch.zeros(3, dtype=torch.float64), atol=1e-12)
    half = metrics.completeness(model, x, y, exact / 2, baseline=0.0)
    assert torch.allclose(half, torch.full((3,), 0.5, dtype=torch.float64))
    absolute = metrics.completeness(model, x, y, exact / 2, baseline=0.0, relative=False)
    assert torch.allclose(absolute, exact.flatten(1).sum(1).abs() / 2)
    same = metrics.completeness(model, torch.zeros_like(x), y, exact, baseline=0.0)
    assert torch.isnan(same).all()  # no output change to explain
