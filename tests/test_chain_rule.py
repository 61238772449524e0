"""The modified-chain-rule family against Captum, and Ancona et al.'s equivalences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srdxai
from srdxai.errors import UnsupportedOperationError

captum_attr = pytest.importorskip("captum.attr", reason="captum is a test dependency")


class ReluNet(nn.Module):
    """ReLU modules (Captum hooks modules), biases, BN, max-pool, a residual add."""

    def __init__(self, pool: bool = True, bias: bool = True, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.act1 = act()
        self.pool = nn.MaxPool2d(2) if pool else nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=bias)
        self.act2 = act()
        self.conv3 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=bias)
        self.act3 = act()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        h = self.pool(self.act1(self.conv1(x)))
        h = self.act2(self.conv2(h)) + h
        h = self.act3(self.conv3(h))
        return self.fc(self.gap(h).flatten(1))


def make(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return ReluNet(**kw).double().eval()


def inputs(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 10, generator=g, dtype=torch.float64)


TARGETS = [0, 3, 4]


def close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = theirs.abs().max().clamp_min(1e-12)
    err = ((ours - theirs).abs().max() / scale).item()
    assert err < rtol, f"max relative difference {err:.3e}"


def test_saliency_and_input_x_gradient_match_captum():
    model, x = make(), inputs()
    theirs = captum_attr.Saliency(model).attribute(x, target=TARGETS, abs=True)
    close(srdxai.explain(model, x, TARGETS, "saliency", channel_reduce="none"), theirs)
    close(srdxai.explain(model, x, TARGETS, "saliency"), theirs.amax(1))
    theirs = captum_attr.InputXGradient(model).attribute(x, target=TARGETS)
    close(srdxai.explain(model, x, TARGETS, "gradient_x_input", channel_reduce="none"), theirs)
    close(srdxai.explain(model, x, TARGETS, "gradient_x_input"), theirs.sum(1))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right", "riemann_trapezoid"])
def test_integrated_gradients_matches_captum(method):
    model, x = make(), inputs()
    base = torch.full_like(x, 0.1)
    theirs = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=base, target=TARGETS, n_steps=16, method=method)
    ours = srdxai.explain(model, x, TARGETS, "integrated_gradients", steps=16, baseline=base,
                          integration=method, channel_reduce="none", internal_batch_size=7)
    if method == "riemann_trapezoid":
        # Intended difference: Captum's trapezoid uses linspace(0, 1, n) nodes with step 1/n
        # (weights summing to (n-1)/n); ours uses the proper step 1/(n-1), so completeness holds.
        ours = ours * 15 / 16
    close(ours, theirs)


def test_smoothgrad_matches_captum_noise_tunnel_with_the_same_noise(monkeypatch):
    model, x = make(), inputs()
    samples, stdev = 4, 0.3
    g = torch.Generator().manual_seed(5)
    captum_noise = torch.randn((x.shape[0] * samples, *x.shape[1:]), generator=g,
                               dtype=x.dtype) * stdev
    monkeypatch.setattr(torch, "normal", lambda mean, std: captum_noise.clone())
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=TARGETS, abs=False)
    monkeypatch.undo()
    # Captum lays the copies out sample-major per input (x0 x0 x0 x0 x1 ...)
    ours_noise = captum_noise.view(x.shape[0], samples, *x.shape[1:]).transpose(0, 1)
    ours = srdxai.explain(model, x, TARGETS, "smoothgrad", samples=samples, noise=ours_noise,
                          channel_reduce="none")
    close(ours, theirs)


def test_smoothgrad_seeded_noise_is_reproducible_and_scaled():
    model, x = make(), inputs()
    a = srdxai.explain(model, x, TARGETS, "smoothgrad", samples=6, seed=3)
    b = srdxai.explain(model, x, TARGETS, "smoothgrad", samples=6, seed=3)
    c = srdxai.explain(model, x, TARGETS, "smoothgrad", samples=6, seed=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    plain = srdxai.explain(model, x, TARGETS, "gradient")
    tiny = srdxai.explain(model, x, TARGETS, "smoothgrad", samples=3, stdev=1e-9)
    torch.testing.assert_close(tiny, plain, rtol=1e-6, atol=1e-9)


def test_guided_backprop_matches_captum():
    model, x = make(), inputs()
    theirs = captum_attr.GuidedBackprop(model).attribute(x, target=TARGETS)
    close(srdxai.explain(model, x, TARGETS, "guided_backprop", channel_reduce="none"), theirs)


def test_deeplift_rescale_matches_captum_without_maxpool():
    # Captum also applies a rescale rule inside max-pooling; Ancona's chain-rule DeepLIFT (ours)
    # keeps max-pool's ordinary gradient, so the comparison uses average pooling.
    model, x = make(pool=False), inputs()
    base = torch.full_like(x, -0.2)
    theirs = captum_attr.DeepLift(model).attribute(x, baselines=base, target=TARGETS)
    ours = srdxai.explain(model, x, TARGETS, "deeplift_rescale", baseline=base,
                          channel_reduce="none")
    close(ours, theirs)


# --- Ancona et al.'s equivalences -----------------------------------------------------------

def test_epsilon_lrp_equals_gradient_x_input_on_relu_networks():
    model, x = make(), inputs()
    lrp = srdxai.explain(model, x, TARGETS, "epsilon_lrp", epsilon=1e-12)
    gxi = srdxai.explain(model, x, TARGETS, "gradient_x_input")
    close(lrp, gxi, rtol=1e-9)
    # and not on a network with another activation
    soft = make(act=nn.Softplus)
    assert not torch.allclose(srdxai.explain(soft, x, TARGETS, "epsilon_lrp", epsilon=1e-12),
                              srdxai.explain(soft, x, TARGETS, "gradient_x_input"))


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_deeplift_zero_baseline_equals_epsilon_lrp_without_biases(act):
    model, x = make(bias=False, act=act), inputs()
    dl = srdxai.explain(model, x, TARGETS, "deeplift_rescale")
    lrp = srdxai.explain(model, x, TARGETS, "epsilon_lrp", epsilon=1e-12)
    close(dl, lrp, rtol=1e-7)
    with_bias = make(bias=True, act=act)
    assert not torch.allclose(srdxai.explain(with_bias, x, TARGETS, "deeplift_rescale"),
                              srdxai.explain(with_bias, x, TARGETS, "epsilon_lrp",
                                             epsilon=1e-12))


def test_integrated_gradients_completeness_as_steps_grow():
    model, x = make(act=nn.Softplus), inputs()
    gap = (model(x) - model(torch.zeros_like(x)))[torch.arange(3), TARGETS].detach()
    errors = []
    for steps in (4, 16, 64):
        ig = srdxai.explain(model, x, TARGETS, "integrated_gradients", steps=steps,
                            integration="riemann_middle")
        errors.append((ig.sum((1, 2)) - gap).abs().max().item())
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-3 * gap.abs().max().item()


@pytest.mark.parametrize("window, stride", [(1, 1), (3, 2), ((2, 4), (2, 3))])
def test_occlusion_matches_captum(window, stride):
    model, x = make(), inputs()
    w = (window, window) if isinstance(window, int) else window
    s = (stride, stride) if isinstance(stride, int) else stride
    theirs = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, *w), strides=(3, *s), baselines=0.25, target=TARGETS,
        perturbations_per_eval=16)
    ours = srdxai.explain(model, x, TARGETS, "occlusion", window=window, stride=stride,
                          baseline=0.25, internal_batch_size=20)
    # Captum spreads the window's drop over all channels of the window; ours is per pixel.
    close(ours, theirs[:, 0])
    torch.testing.assert_close(theirs[:, 0], theirs[:, 2])


def test_occlusion_1_is_sensitivity_1():
    model, x = make(), inputs(1)
    ours = srdxai.explain(model, x, 2, "occlusion", window=1)
    y = model(x)[0, 2]
    x2 = x.clone()
    x2[0, :, 4, 7] = 0
    torch.testing.assert_close(ours[0, 4, 7], (y - model(x2)[0, 2]).detach())


def test_gradcam_matches_captum_layer_gradcam():
    model, x = make(), inputs()
    theirs = captum_attr.LayerGradCam(model, model.act3).attribute(x, target=TARGETS)
    theirs = torch.nn.functional.interpolate(theirs.clamp_min(0), size=x.shape[2:],
                                             mode="bilinear", align_corners=False)[:, 0]
    ours = srdxai.explain(model, x, TARGETS, "gradcam", layer="act3")
    close(ours, theirs)
    assert (ours >= 0).all()


@pytest.mark.parametrize("options, message", [
    ({"method": "integrated_gradients", "steps": 2.5}, "steps must be an int"),
    ({"method": "smoothgrad", "noise_level": float("nan")}, "noise_level must be a finite"),
    ({"method": "smoothgrad", "stdev": -1.0}, "stdev must be a finite number >= 0"),
    ({"method": "smoothgrad", "samples": 2.0}, "samples must be an int"),
    ({"method": ["srd"]}, "method must be a method's name"),
])
def test_options_that_make_no_sense_are_clear_errors(options, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    with pytest.raises(srdxai.SrdxaiError, match=message):
        srdxai.explain(model, torch.randn(1, 3, 8, 8), 0, **options)


class _FoldsPatchesIntoTheBatch(nn.Module):
    """MobileViT / Swin style: 2x2 patches folded into the batch, processed, unfolded."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        n, _, h, w = x.shape
        h1 = torch.relu(self.conv1(x))
        p = h1.reshape(n, 4, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
        p = p.reshape(n * 4, 4, h // 2, w // 2)  # patches in the batch dimension
        p = torch.relu(self.conv2(p))
        back = p.reshape(n, 2, 2, 4, h // 2, w // 2).permute(0, 3, 1, 4, 2, 5)
        return self.fc(back.reshape(n, 4, h, w).mean((2, 3)))


def test_deeplift_on_a_model_that_folds_patches_into_the_batch():
    """The baseline runs in a pass of its own, paired activation by activation: models that
    fold other dimensions into the batch are explained (they used to be refused), with
    DeepLIFT's summation to delta and batch = per sample."""
    torch.manual_seed(0)
    model = _FoldsPatchesIntoTheBatch().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    base = 0.3 * torch.randn(1, 3, 8, 8, dtype=torch.float64)
    target = [0, 2, 1]
    dl = srdxai.explain(model, x, target, "deeplift_rescale", baseline=base)
    delta = model(x) - model(base.expand_as(x))
    torch.testing.assert_close(dl.sum((1, 2)), delta[torch.arange(3), torch.tensor(target)],
                               rtol=1e-9, atol=1e-12)
    single = torch.cat([srdxai.explain(model, x[i:i + 1], target[i], "deeplift_rescale",
                                       baseline=base) for i in range(3)])
    torch.testing.assert_close(dl, single, rtol=1e-10, atol=1e-12)


class _InputDependentControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if float(x.abs().sum()) > 0:  # the zero baseline skips this activation
            h = torch.tanh(h)
        return self.fc(h.mean((2, 3)))


def test_deeplift_refuses_passes_that_run_different_activations():
    model = _InputDependentControlFlow().eval()
    with pytest.raises(UnsupportedOperationError, match="control flow depends on its input"):
        srdxai.explain(model, torch.randn(1, 3, 6, 6), 0, "deeplift_rescale")
