"""Fast self-checks of the slow SRD oracle (tests/srd_oracle.py), independent of the engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

try:
    from . import small_models as sm  # type: ignore[no-redef]
    from .srd_oracle import srd_logit_seed, srd_oracle, srd_oracle_layer_seed  # type: ignore[no-redef]
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import small_models as sm  # type: ignore[no-redef]
    from srd_oracle import srd_logit_seed, srd_oracle, srd_oracle_layer_seed  # type: ignore[no-redef]

MODELS = list(sm.MODEL_CLASSES)


def _x(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Deterministic float64 input batch (n, 3, h, w)."""
    return torch.randn(
        n, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------------------------------------
# Conservation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", sm.ACTIVATIONS)
@pytest.mark.parametrize("name", MODELS)
def test_conservation_every_model_and_activation(name: str, act: str) -> None:
    """Without the contrastive step the pixel map sums to the target logit, per sample."""
    model = sm.build_model(name, act, seed=11)
    x = _x(2, 9, 11, seed=1)
    target = torch.tensor([1, 4])
    rmap = srd_oracle(model, x, target)
    assert rmap.shape == (2, 9, 11) and rmap.dtype == torch.float64
    with torch.no_grad():
        logits = model(x)[torch.arange(2), target]
    torch.testing.assert_close(rmap.sum(dim=(1, 2)), logits, rtol=1e-10, atol=1e-12)
    assert rmap.abs().sum() > 0


@pytest.mark.parametrize("hw", [(13, 17), (16, 16)])
@pytest.mark.parametrize("name", MODELS)
def test_conservation_other_sizes(name: str, hw: tuple[int, int]) -> None:
    """Non-square and even-sized inputs; an int target applies to every row."""
    model = sm.build_model(name, "leaky_relu", seed=3)
    x = _x(2, *hw, seed=2)
    rmap = srd_oracle(model, x, 2)
    with torch.no_grad():
        logits = model(x)[:, 2]
    assert rmap.shape == (2, *hw)
    torch.testing.assert_close(rmap.sum(dim=(1, 2)), logits, rtol=1e-10, atol=1e-12)


def test_float32_model_is_handled_in_float64() -> None:
    """A float32 model gives the same map as its float64 copy (the oracle uses a float64 copy)."""
    model64 = sm.build_model("PoolNet", "silu", seed=4)
    model32 = copy.deepcopy(model64).float()
    x = _x(1, 9, 11, seed=3)
    torch.testing.assert_close(srd_oracle(model32, x.float(), 0), srd_oracle(model64, x, 0))


# ---------------------------------------------------------------------------------------------
# Hand-computed toy cases: conv (1 -> 2 channels, kernel 1x2, bias) -> ReLU -> GAP -> Linear
# ---------------------------------------------------------------------------------------------


def _toy(x_row: list[float]) -> tuple[nn.Module, torch.Tensor]:
    """Toy with offset-0 weights a = (1, 2), offset-1 weights d = (1, -1), conv bias (0.5, 1),
    head w = (1, -1), head bias 0.2, on the 1x3 single-channel image ``x_row``."""
    m = sm.TinyConvNet("relu", in_ch=1, out_ch=2, kernel=(1, 2)).double().eval()
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([[[[1.0, 1.0]]], [[[2.0, -1.0]]]], dtype=torch.float64))
        m.conv.bias.copy_(torch.tensor([0.5, 1.0], dtype=torch.float64))
        m.fc.weight.copy_(torch.tensor([[1.0, -1.0]], dtype=torch.float64))
        m.fc.bias.copy_(torch.tensor([0.2], dtype=torch.float64))
    return m, torch.tensor(x_row, dtype=torch.float64).reshape(1, 1, 1, 3)


def _dot(u: tuple[float, float], v: tuple[float, float]) -> float:
    return u[0] * v[0] + u[1] * v[1]


def test_hand_computed_toy() -> None:
    """x = (1, 2, 3). Output q0 sees x0 (offset 0) and x1 (offset 1), q1 sees x1 and x2.

    q0: c_00 = a*1 = (1, 2), c_01 = d*2 = (2, -2); norms √5, √8; z0 = (3.5, 1).
    q1: c_10 = a*2 = (2, 4), c_11 = d*3 = (3, -3); norms √20, √18; z1 = (5.5, 2).
    ReLU keeps both; logit = ((3.5-1) + (5.5-2))/2 + 0.2 = 3.2; R(q0) = 2.7/2, R(q1) = 3.7/2.
    """
    m, x = _toy([1.0, 2.0, 3.0])
    b = (0.5, 1.0)

    def mu(c: tuple[float, float], frac: float, z: tuple[float, float]) -> float:
        return (_dot(c, z) + frac * _dot(b, z)) / _dot(z, z)

    z0, z1 = (3.5, 1.0), (5.5, 2.0)
    f00 = math.sqrt(5) / (math.sqrt(5) + math.sqrt(8))
    f10 = math.sqrt(20) / (math.sqrt(20) + math.sqrt(18))
    r0, r1 = 2.7 / 2, 3.7 / 2
    expected = [
        mu((1, 2), f00, z0) * r0,
        mu((2, -2), 1 - f00, z0) * r0 + mu((2, 4), f10, z1) * r1,
        mu((3, -3), 1 - f10, z1) * r1,
    ]
    got = srd_oracle(m, x, 0)
    assert got.shape == (1, 1, 3)
    torch.testing.assert_close(
        got[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert abs(sum(expected) - 3.2) < 1e-12
    # literal values, worked out on paper from the formulas above
    torch.testing.assert_close(
        got[0, 0],
        torch.tensor([0.6840858, 1.8238545, 0.6920597], dtype=torch.float64),
        rtol=0,
        atol=1e-6,
    )


def test_hand_computed_toy_zero_norm_fallback() -> None:
    """x = (0, 0, 3): at q0 both contributions are 0, so the bias is split evenly (µ = 1/2 each);
    at q1 only x2 contributes, so it takes the whole bias (µ_{x1->q1} = 0, µ_{x2->q1} = 1).
    z0 = (0.5, 1), z1 = (3.5, -2) -> v1 = (3.5, 0); logit = ((0.5-1) + 3.5)/2 + 0.2 = 1.7;
    R(q0) = -0.3/2 = -0.15, R(q1) = 3.7/2 = 1.85; map = (-0.075, -0.075, 1.85)."""
    m, x = _toy([0.0, 0.0, 3.0])
    got = srd_oracle(m, x, 0)
    torch.testing.assert_close(
        got[0, 0], torch.tensor([-0.075, -0.075, 1.85], dtype=torch.float64), rtol=1e-12, atol=1e-12
    )


def test_hand_computed_maxpool_conv_pairs() -> None:
    """MaxPool (1x2, stride 1) -> conv1x1 W = (1, -2), bias 0.5 -> LeakyReLU(0.1) -> GAP -> 2·v + 1.

    x ch0 = (1, 0.5, 3), ch1 = (0, 2, 1). Pool u0: ch0 argmax x0, ch1 argmax x1;
    u1: ch0 argmax x2, ch1 argmax x1. Paths (pool offset) with masked contributions:
    r0: x0 -> (1, 0)·W = 1, x1 -> (0, 2)·W = -4; norms 1, 4 -> shares 0.1, 0.4; z0 = -2.5.
    r1: x1 -> (0, 2)·W = -4, x2 -> (3, 0)·W = 3; norms 4, 3 -> shares 2/7, 1.5/7; z1 = -0.5.
    v = (-0.25, -0.05); logit = 2·(-0.15) + 1 = 0.7; R(r0) = 0.5/2 = 0.25, R(r1) = 0.9/2 = 0.45.
    µ: x0->r0 = 1.1/-2.5 = -0.44; x1->r0 = -3.6/-2.5 = 1.44; x1->r1 = (-4 + 2/7)/-0.5 = 52/7;
    x2->r1 = (3 + 1.5/7)/-0.5 = -45/7. Map = (-0.11, 0.36 + 0.45·52/7, -0.45·45/7)."""
    m = sm.TinyPoolNet("leaky_relu", in_ch=2).double().eval()
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([1.0, -2.0], dtype=torch.float64).reshape(1, 2, 1, 1))
        m.conv.bias.fill_(0.5)
        m.fc.weight.fill_(2.0)
        m.fc.bias.fill_(1.0)
    x = torch.tensor([[1.0, 0.5, 3.0], [0.0, 2.0, 1.0]], dtype=torch.float64).reshape(1, 2, 1, 3)
    got = srd_oracle(m, x, 0)
    expected = torch.tensor([-0.11, 0.36 + 0.45 * 52 / 7, -0.45 * 45 / 7], dtype=torch.float64)
    torch.testing.assert_close(got[0, 0], expected, rtol=1e-12, atol=1e-12)
    assert abs(float(expected.sum()) - 0.7) < 1e-12


def test_hand_computed_residual_identity_gets_no_bias() -> None:
    """z = conv(x) + x, 1 channel, kernel (k0, k1, k2) = (1, -1, 2), padding 1, bias 0.6, ReLU,
    head 1.5·v - 0.3, x = (1, 2, -1). Conv paths (bias shared by |c| among them only):
    q0: x0·k1 = -1, x1·k2 = 4 -> shares 0.12, 0.48; identity x0 = 1; z0 = 4.6.
    q1: x0·k0 = 1, x1·k1 = -2, x2·k2 = -2 -> shares 0.12, 0.24, 0.24; identity 2; z1 = -0.4.
    q2: x1·k0 = 2, x2·k1 = 1 -> shares 0.4, 0.2; identity -1; z2 = 2.6.
    v = (4.6, 0, 2.6); logit = 1.5·2.4 - 0.3 = 3.3; R = (2.2, -0.1, 1.2).
    R(x0) = (0.12/4.6)·2.2 + (1.12/-0.4)·(-0.1)
    R(x1) = (4.48/4.6)·2.2 + (0.24/-0.4)·(-0.1) + (2.4/2.6)·1.2
    R(x2) = (-1.76/-0.4)·(-0.1) + (0.2/2.6)·1.2"""
    m = sm.TinyResNet("relu").double().eval()
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64).reshape(1, 1, 1, 3))
        m.conv.bias.fill_(0.6)
        m.fc.weight.fill_(1.5)
        m.fc.bias.fill_(-0.3)
    x = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64).reshape(1, 1, 1, 3)
    got = srd_oracle(m, x, 0)
    expected = torch.tensor(
        [
            0.12 / 4.6 * 2.2 + 1.12 / -0.4 * -0.1,
            4.48 / 4.6 * 2.2 + 0.24 / -0.4 * -0.1 + 2.4 / 2.6 * 1.2,
            -1.76 / -0.4 * -0.1 + 0.2 / 2.6 * 1.2,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got[0, 0], expected, rtol=1e-12, atol=1e-12)
    assert abs(float(expected.sum()) - 3.3) < 1e-12


# ---------------------------------------------------------------------------------------------
# Seeds, contrastive, ERF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_contrastive_is_mean_subtracted_seed(name: str) -> None:
    """contrastive=True equals seeding the last PFV layer with the logit seed minus its own
    per-sample mean; the map then sums to 0 per sample."""
    model = sm.build_model(name, "elu", seed=7)
    x = _x(2, 9, 11, seed=5)
    target = [3, 0]
    cont = srd_oracle(model, x, target, contrastive=True)
    layer, seed = srd_logit_seed(model, x, target)
    via_layer = srd_oracle_layer_seed(model, x, layer, seed - seed.mean(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(cont, via_layer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        cont.sum(dim=(1, 2)), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12
    )
    via_flag = srd_oracle_layer_seed(model, x, layer, seed, contrastive=True)
    torch.testing.assert_close(cont, via_flag, rtol=1e-12, atol=1e-12)
    plain = srd_oracle(model, x, target)
    torch.testing.assert_close(
        plain, srd_oracle_layer_seed(model, x, layer, seed), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    "name,layer", [("PoolNet", "act4"), ("ResNetLike", "layer1.act2"), ("DepthwiseNet", "act3")]
)
def test_erfs_sum_to_one_and_compose_linearly(name: str, layer: str) -> None:
    """Each one-hot ERF sums to 1 (Σ_p µ_{p→q} = 1 where z(q) ≠ 0), and a seed map's pixel map
    is the seed-weighted sum of the ERFs (linearity)."""
    model = sm.build_model(name, "tanh", seed=9)
    x = _x(1, 9, 11, seed=6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        feats = dict(model.named_modules())
        store: dict[str, torch.Tensor] = {}
        h = feats[layer].register_forward_hook(lambda mod, i, o: store.__setitem__("v", o))
        model(x)
        h.remove()
    _, _, hh, ww = store["v"].shape
    seed = torch.randn(1, hh, ww, dtype=torch.float64, generator=g)
    total = torch.zeros(1, 9, 11, dtype=torch.float64)
    for i in range(hh):
        for j in range(ww):
            if (i * ww + j) % 3 and hh * ww > 12:  # a subset keeps the test fast
                seed[0, i, j] = 0.0
                continue
            onehot = torch.zeros(1, hh, ww, dtype=torch.float64)
            onehot[0, i, j] = 1.0
            erf = srd_oracle_layer_seed(model, x, layer, onehot)
            torch.testing.assert_close(
                erf.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12
            )
            total += seed[0, i, j] * erf
    torch.testing.assert_close(
        srd_oracle_layer_seed(model, x, layer, seed), total, rtol=1e-10, atol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# Geometry cross-check on bias-free models
# ---------------------------------------------------------------------------------------------


class _Rank1(torch.autograd.Function):
    """Identity on v in the forward; backward g -> z <v, g> / ||z||² per position (0 at z = 0)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, v)
        return v.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        z, v = ctx.saved_tensors
        zz = (z * z).sum(1, keepdim=True)
        s = (v * g).sum(1, keepdim=True)
        out = torch.where(
            zz > 0, z * s / torch.where(zz > 0, zz, torch.ones_like(zz)), torch.zeros_like(z)
        )
        return out, None


class _Wrapped(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.inner = act

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _Rank1.apply(z, self.inner(z))




@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("name", MODELS)
def test_bias_free_models_match_rank1_chain_rule(name: str, act: str) -> None:
    """With every bias zero (conv/linear biases, BN β and running mean), SRD has no bias shares
    and equals a chain rule with the rank-1 map at each activation. This checks the oracle's path
    geometry (strides, padding, dilation, groups, max-pool routing, avg-pool, residuals) against
    autograd; the engine is not involved."""
    model = sm.build_model(name, act, seed=13)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.zero_()
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.zero_()
                mod.running_mean.zero_()
    x = _x(1, 9, 11, seed=8)
    oracle = srd_oracle(model, x, 1)

    ref = copy.deepcopy(model)
    for qual, mod in list(ref.named_modules()):
        if isinstance(mod, sm.ACTIVATION_TYPES):
            parent_name, _, attr = qual.rpartition(".")
            parent = ref.get_submodule(parent_name) if parent_name else ref
            setattr(parent, attr, _Wrapped(mod))
    xr = x.clone().requires_grad_(True)
    ref(xr)[0, 1].backward()
    expected = (xr * xr.grad).sum(1).detach()
    torch.testing.assert_close(oracle, expected, rtol=1e-9, atol=1e-12)
