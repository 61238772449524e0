"""srdxai.metrics.similarity: SSIM against scikit-image, Pearson against numpy, MSE by hand,
normalise_map, per-sample independence and input errors. Small maps; runs in about a second."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from srdxai.errors import InvalidInputError
from srdxai.metrics.similarity import mse, normalise_map, pearson, ssim

DOUBLE = torch.float64


def pair(shape: tuple[int, ...], seed: int = 0, noise: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Two related maps (b = a + noise, with per-sample offsets and scales) so SSIM and Pearson
    land well inside (0, 1) rather than at a trivial value."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=DOUBLE)
    b = a + noise * torch.randn(shape, generator=g, dtype=DOUBLE)
    scale = torch.linspace(0.5, 3.0, shape[0], dtype=DOUBLE).reshape(-1, *[1] * (len(shape) - 1))
    return a * scale, b * scale - 0.3


def skimage_ssim(a: torch.Tensor, b: torch.Tensor, data_range, gaussian: bool,
                 win_size: int = 7) -> np.ndarray:
    """The oracle, one sample at a time; data_range None -> max(a, b) - min(a, b) per sample."""
    out = []
    for i in range(a.shape[0]):
        x, y = a[i].numpy(), b[i].numpy()
        if data_range is None:
            r = max(x.max(), y.max()) - min(x.min(), y.min())
        elif np.ndim(data_range):
            r = float(data_range[i])
        else:
            r = float(data_range)
        kwargs = dict(data_range=r, channel_axis=0 if a.dim() == 4 else None)
        if gaussian:
            kwargs.update(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        else:
            kwargs.update(win_size=win_size)
        out.append(structural_similarity(x, y, **kwargs))
    return np.array(out)


# --- SSIM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 7, 7), (2, 16, 16), (3, 13, 19), (2, 24, 11)])
def test_ssim_uniform_matches_skimage(shape):
    a, b = pair(shape)
    got = ssim(a, b)
    assert got.dtype == DOUBLE and got.shape == (shape[0],)
    want = skimage_ssim(a, b, None, gaussian=False)
    assert want.max() < 0.9 and np.ptp(want) > 0.1  # non-trivial, differing scores
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("win_size", [3, 5, 9])
def test_ssim_win_size_matches_skimage(win_size):
    a, b = pair((2, 15, 12), seed=1)
    np.testing.assert_allclose(ssim(a, b, win_size=win_size).numpy(),
                               skimage_ssim(a, b, None, False, win_size), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 11, 11), (3, 20, 17), (2, 32, 32)])
def test_ssim_gaussian_matches_skimage(shape):
    a, b = pair(shape, seed=2)
    got = ssim(a, b, gaussian=True)
    want = skimage_ssim(a, b, None, gaussian=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    # The Gaussian variant is a different measure: the test can tell them apart.
    assert np.abs(ssim(a, b).numpy() - want).max() > 1e-3


@pytest.mark.parametrize("gaussian", [False, True])
def test_ssim_channels_match_skimage_channel_axis(gaussian):
    a, b = pair((2, 3, 14, 13), seed=3)
    got = ssim(a, b, gaussian=gaussian)
    want = skimage_ssim(a, b, None, gaussian)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("gaussian", [False, True])
def test_ssim_explicit_data_range(gaussian):
    a, b = pair((3, 2, 12, 16), seed=4)
    for r in (1.0, 7.5):
        np.testing.assert_allclose(ssim(a, b, data_range=r, gaussian=gaussian).numpy(),
                                   skimage_ssim(a, b, r, gaussian), rtol=0, atol=1e-6)
    per_sample = [0.7, 2.0, 11.0]
    for given in (per_sample, torch.tensor(per_sample), np.array(per_sample)):
        np.testing.assert_allclose(
            ssim(a, b, data_range=given, gaussian=gaussian).numpy(),
            skimage_ssim(a, b, per_sample, gaussian), rtol=0, atol=1e-6)
    # data_range matters: the explicit and default ranges give different scores.
    assert (ssim(a, b, data_range=1.0) - ssim(a, b)).abs().max() > 1e-3


def test_ssim_identical_maps_give_one():
    a, _ = pair((3, 2, 12, 13), seed=5)
    for kwargs in ({}, {"gaussian": True}, {"data_range": 2.0}):
        torch.testing.assert_close(ssim(a, a.clone(), **kwargs), torch.ones(3, dtype=DOUBLE),
                                   rtol=0, atol=1e-12)
    # Identical constant maps: data range 0 with data_range=None; defined as 1, not 0/0.
    const = torch.full((2, 8, 8), 0.25, dtype=DOUBLE)
    assert torch.equal(ssim(const, const.clone()), torch.ones(2, dtype=DOUBLE))
    # Different constants: a finite score below 1.
    score = ssim(const, const + 1)
    assert torch.isfinite(score).all() and (score < 1).all()


def test_ssim_float32_input_computed_in_float64():
    a, b = pair((2, 12, 12), seed=6)
    a32, b32 = a.float(), b.float()
    got = ssim(a32, b32)
    assert got.dtype == DOUBLE
    want = skimage_ssim(a32.double(), b32.double(), None, False)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_ssim_bad_options():
    a, b = pair((2, 10, 10))
    for win_size in (4, 1, 0, 2.0, True):
        with pytest.raises(InvalidInputError, match="win_size"):
            ssim(a, b, win_size=win_size)
    with pytest.raises(InvalidInputError, match="smaller than the SSIM window"):
        ssim(a, b, win_size=11)
    with pytest.raises(InvalidInputError, match="smaller than the SSIM window"):
        ssim(a, b, gaussian=True)  # 11 x 11 window on 10 x 10 maps
    with pytest.raises(InvalidInputError, match="sigma"):
        ssim(a, b, gaussian=True, sigma=-1.0)
    for bad in (0.0, -1.0, math.inf, [1.0, 2.0, 3.0], [1.0, 0.0], "wide", True):
        with pytest.raises(InvalidInputError, match="data_range"):
            ssim(a, b, data_range=bad)
    with pytest.raises(InvalidInputError, match="K1"):
        ssim(a, b, K1=-0.01)


# --- Pearson and MSE ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 9, 7), (3, 2, 5, 6)])
def test_pearson_matches_numpy_corrcoef(shape):
    a, b = pair(shape, seed=7)
    got = pearson(a, b)
    assert got.dtype == DOUBLE and got.shape == (shape[0],)
    want = [np.corrcoef(a[i].numpy().ravel(), b[i].numpy().ravel())[0, 1]
            for i in range(shape[0])]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(pearson(a, -2 * a + 1), -torch.ones(shape[0], dtype=DOUBLE))


def test_pearson_nan_for_constant_maps_only():
    a, b = pair((3, 6, 6), seed=8)
    a[1] = 0.1  # constant (0.1 is not exact in binary: centring leaves rounding noise)
    b[2] = 0.0
    got = pearson(a, b)
    assert torch.isnan(got[1]) and torch.isnan(got[2]) and torch.isfinite(got[0])


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 4)])
def test_mse_by_hand(shape):
    a, b = pair(shape, seed=9)
    got = mse(a, b)
    assert got.dtype == DOUBLE and got.shape == (shape[0],)
    for i in range(shape[0]):
        d = (a[i] - b[i]).numpy().ravel()
        assert got[i].item() == pytest.approx(sum(float(v) ** 2 for v in d) / d.size, abs=1e-14)
    tiny = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert mse(tiny, torch.zeros_like(tiny)).item() == pytest.approx((0 + 1 + 4 + 9) / 4)
    assert torch.equal(mse(a, a), torch.zeros(shape[0], dtype=DOUBLE))


# --- normalise_map -----------------------------------------------------------------------------

def test_normalise_sum_abs():
    a, _ = pair((3, 2, 5, 4), seed=10)
    a = a - 0.5  # signed values
    out = normalise_map(a)
    assert out.shape == (3, 5, 4) and out.dtype == DOUBLE
    torch.testing.assert_close(out.sum((1, 2)), torch.ones(3, dtype=DOUBLE))
    summed = a.abs().sum(1)
    torch.testing.assert_close(out, summed / summed.sum((1, 2), keepdim=True))
    three_d = normalise_map(a[:, 0])
    assert three_d.shape == (3, 5, 4)
    torch.testing.assert_close(three_d.sum((1, 2)), torch.ones(3, dtype=DOUBLE))
    assert (three_d >= 0).all()


def test_normalise_max_abs_and_none():
    a, _ = pair((2, 3, 4, 4), seed=11)
    a = a - 0.5
    out = normalise_map(a, mode="max_abs")
    summed = a.abs().sum(1)
    torch.testing.assert_close(out, summed / summed.amax((1, 2), keepdim=True))
    torch.testing.assert_close(out.amax((1, 2)), torch.ones(2, dtype=DOUBLE))
    same = normalise_map(a.float(), mode=None)
    assert same.shape == a.shape and same.dtype == DOUBLE
    assert torch.equal(same, a.float().double())


@pytest.mark.parametrize("mode", ["sum_abs", "max_abs"])
def test_normalise_all_zero_map_stays_zero(mode):
    a, _ = pair((3, 5, 5), seed=12)
    a[1] = 0.0
    out = normalise_map(a, mode=mode)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(5, 5, dtype=DOUBLE))
    assert out[0].sum() > 0


def test_normalise_then_mse_is_differentiable():
    a, b = pair((2, 6, 6), seed=13)
    a.requires_grad_(True)
    loss = mse(normalise_map(a), normalise_map(b)).sum()
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


# --- per-sample independence -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 12, 13), (3, 2, 11, 12)])
def test_batch_equals_samples_one_by_one(shape):
    a, b = pair(shape, seed=14)
    a[2] *= 100.0  # a wildly different sample must not change the others' scores
    measures = {
        "ssim": ssim,
        "ssim_gaussian": lambda x, y: ssim(x, y, gaussian=True),
        "pearson": pearson,
        "mse": mse,
        "normalised_mse": lambda x, y: mse(normalise_map(x), normalise_map(y)),
    }
    for name, measure in measures.items():
        batch = measure(a, b)
        singles = torch.cat([measure(a[i:i + 1], b[i:i + 1]) for i in range(shape[0])])
        torch.testing.assert_close(batch, singles, rtol=0, atol=1e-12, msg=name)
    for mode in ("sum_abs", "max_abs"):
        batch = normalise_map(a, mode=mode)
        singles = torch.cat([normalise_map(a[i:i + 1], mode=mode) for i in range(shape[0])])
        torch.testing.assert_close(batch, singles, rtol=0, atol=1e-15)


# --- input errors ------------------------------------------------------------------------------

PAIRWISE = [ssim, pearson, mse]


@pytest.mark.parametrize("measure", PAIRWISE)
def test_pairwise_errors(measure):
    a, b = pair((2, 8, 8))
    with pytest.raises(InvalidInputError, match="same shape"):
        measure(a, b[:, :7])
    with pytest.raises(InvalidInputError, match="same shape"):
        measure(a, b[:1])
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        measure(a.numpy(), b)
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        measure(a, b.tolist())
    with pytest.raises(InvalidInputError, match=r"\(N, H, W\)"):
        measure(a[:, 0], b[:, 0])  # (N, W): one dimension per map
    with pytest.raises(InvalidInputError, match=r"\(N, H, W\)"):
        measure(a[None, None], b[None, None])  # 5-D
    with pytest.raises(InvalidInputError, match="floating point"):
        measure(a.long(), b.long())
    with pytest.raises(InvalidInputError, match="empty"):
        measure(a[:0], b[:0])
    for bad in (math.nan, math.inf, -math.inf):
        c = b.clone()
        c[1, 3, 3] = bad
        with pytest.raises(InvalidInputError, match=r"NaN or Inf \(samples \[1\]\)"):
            measure(a, c)


def test_normalise_errors():
    a, _ = pair((2, 8, 8))
    with pytest.raises(InvalidInputError, match="mode"):
        normalise_map(a, mode="l2")
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        normalise_map(a.numpy())
    with pytest.raises(InvalidInputError, match=r"\(N, H, W\)"):
        normalise_map(a[0, 0])
    a[0, 0, 0] = math.nan
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        normalise_map(a)
