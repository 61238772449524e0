"""Self-checks of the slow absLRP oracle (tests/abslrp_oracle.py), independent of srdxai's engine.

Every kernel of the oracle (explicit loops) is compared with a second, independent way of
computing the same rule: a hand calculation, a closed form, an im2col reduction, or a generic
kernel built from ``torch.autograd`` (``R_x = N1(x * J^T g + |x| * J_abs^T g)`` with the
Jacobian-vector products taken by autograd on ``f`` and on ``f_abs``). The model-level walks are
compared with independent autograd-kernel walks written here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from . import abslrp_oracle as ora  # type: ignore[no-redef]
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import abslrp_oracle as ora  # type: ignore[no-redef]

DT = torch.float64
EPS = 1e-9


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=_gen(seed))


def _rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, dtype=DT, generator=_gen(seed))


def _n1(v: torch.Tensor) -> torch.Tensor:
    """N1 written independently of the oracle."""
    mass = v.abs().flatten(1).sum(1) + EPS
    return v / mass.reshape(-1, *([1] * (v.dim() - 1)))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a.to(DT), b.to(DT), rtol=rtol, atol=atol)


def autograd_kernel(f, f_abs, inputs, R_y, divide: bool = True) -> list[torch.Tensor]:
    """Generic absLRP kernel from autograd: ``N1(x_i * J_i^T g + |x_i| * J_abs,i^T g)``."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = f(*xs)
    g = R_y / (y.detach().abs() + EPS) if divide else R_y
    grads = torch.autograd.grad(y, xs, g, allow_unused=True)
    xa = [t.detach().abs().requires_grad_(True) for t in inputs]
    ya = f_abs(*xa)
    grads_a = torch.autograd.grad(ya, xa, g, allow_unused=True)
    out = []
    for x, gr, ga in zip(inputs, grads, grads_a, strict=True):
        gr = torch.zeros_like(x) if gr is None else gr
        ga = torch.zeros_like(x) if ga is None else ga
        out.append(_n1(x * gr + x.abs() * ga))
    return out


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------


def test_linear_hand_example() -> None:
    """W = [[2, -1], [-5, 6]], x = [1, 1], no bias: z = [2 - 1, -5 + 6] = [1, 1].

    R_y = [0.5, 0.5], g = R_y / |z| = [0.5, 0.5]. Unnormalised
    R_x[i] = sum_j (x_i W_ji + |x_i| |W_ji|) g_j = sum_j 2 (W_ji)^+ g_j (x = 1):
      i = 0: j = 0: 2*2*0.5 = 2;  j = 1: W = -5 -> 0.      total 2
      i = 1: j = 0: W = -1 -> 0;  j = 1: 2*6*0.5 = 6.      total 6
    N1: [2, 6] / 8 = [0.25, 0.75] (neuron 1 weighted 3x although both outputs are 1).
    """
    W = torch.tensor([[2.0, -1.0], [-5.0, 6.0]], dtype=DT)
    x = torch.tensor([[1.0, 1.0]], dtype=DT)
    R = torch.tensor([[0.5, 0.5]], dtype=DT)
    got = ora.linear_kernel(x, W, None, R)
    expected = torch.tensor([[2.0, 6.0]], dtype=DT) / (8.0 + EPS)
    _close(got, expected, rtol=1e-12)
    _close(got, torch.tensor([[0.25, 0.75]], dtype=DT), rtol=1e-8)


@pytest.mark.parametrize("signed_R", [False, True])
def test_linear_closed_form(signed_R: bool) -> None:
    """``R_x[i] = N1( 2 sum_j (x_i W_ji)^+ R_j / (|z_j| + eps) )``."""
    x = _randn(3, 7, seed=1)
    W = _randn(5, 7, seed=2)
    b = _randn(5, seed=3)
    R = _randn(3, 5, seed=4) if signed_R else _rand(3, 5, seed=4)
    got = ora.linear_kernel(x, W, b, R)
    z = x @ W.T + b
    expected = torch.zeros_like(x)
    for n in range(3):
        for i in range(7):
            expected[n, i] = sum(2 * max(float(x[n, i] * W[j, i]), 0.0) * R[n, j]
                                 / (abs(float(z[n, j])) + EPS) for j in range(5))
    _close(got, _n1(expected))


def test_linear_vs_autograd_token_input() -> None:
    """Linear on ``(N, T, D)`` (as in the ViT), signed relevance."""
    x = _randn(2, 4, 6, seed=5)
    W = _randn(3, 6, seed=6)
    b = _randn(3, seed=7)
    R = _randn(2, 4, 3, seed=8)
    got = ora.linear_kernel(x, W, b, R)
    (ref,) = autograd_kernel(lambda t: F.linear(t, W, b), lambda t: F.linear(t, W.abs(), b.abs()),
                             [x], R)
    _close(got, ref)


def test_linear_bias_only_enters_through_denominator() -> None:
    """|b| in f_abs does not change the Jacobian; b changes g = R/|z| only."""
    x = _randn(1, 4, seed=9)
    W = _randn(2, 4, seed=10)
    R = torch.tensor([[1.0, 0.0]], dtype=DT)   # only output 0: its g is a common factor
    b1 = torch.tensor([0.3, 0.7], dtype=DT)
    b2 = torch.tensor([-5.0, 9.0], dtype=DT)
    _close(ora.linear_kernel(x, W, b1, R), ora.linear_kernel(x, W, b2, R), rtol=1e-6)
    R2 = torch.tensor([[1.0, 1.0]], dtype=DT)  # two outputs: the ratio of g's matters
    assert not torch.allclose(ora.linear_kernel(x, W, b1, R2), ora.linear_kernel(x, W, b2, R2))


def test_linear_no_positive_contribution_gives_zero_map() -> None:
    """x >= 0 (after a ReLU) and W_t <= 0: every (x_i W_ti)^+ is 0, so R_x = 0 (mass 0, not 1)."""
    x = torch.tensor([[0.5, 0.0, 2.0]], dtype=DT)
    W = torch.tensor([[-1.0, 2.0, -0.5], [1.0, 1.0, 1.0]], dtype=DT)
    R = torch.tensor([[1.0, 0.0]], dtype=DT)
    _close(ora.linear_kernel(x, W, None, R), torch.zeros(1, 3, dtype=DT))


# ---------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------

CONV_CASES = [
    # (cin, cout, k, stride, padding, dilation, groups, hw)
    (3, 4, (3, 3), 1, 1, 1, 1, (6, 7)),
    (3, 4, (3, 2), 2, (1, 0), 1, 1, (7, 6)),
    (4, 6, (3, 3), 2, 1, 1, 2, (6, 6)),
    (4, 4, (3, 3), 1, 2, 2, 4, (7, 5)),     # depthwise, dilated
    (3, 5, (4, 4), 4, 0, 1, 1, (8, 8)),     # patch embedding
]


def _conv_setup(case, seed):
    cin, cout, k, stride, padding, dilation, groups, hw = case
    x = _randn(2, cin, *hw, seed=seed)
    W = _randn(cout, cin // groups, *k, seed=seed + 1)
    b = _randn(cout, seed=seed + 2)
    y = F.conv2d(x, W, b, stride, padding, dilation, groups)
    R = _randn(*y.shape, seed=seed + 3)
    return x, W, b, R, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_equals_linear_kernel_on_im2col(case) -> None:
    """Conv = Linear on unfolded patches (block-diagonal weight for groups); fold sums the
    patch relevances back (padding cropped). N1 is scale invariant, so renormalise after fold."""
    x, W, b, R, kw = _conv_setup(case, seed=20)
    got = ora.conv2d_kernel(x, W, b, R, **kw)
    cin, cout, k, groups = x.shape[1], W.shape[0], W.shape[-2:], kw["groups"]
    cols = F.unfold(x, k, dilation=kw["dilation"], padding=kw["padding"], stride=kw["stride"])
    kk = k[0] * k[1]
    dense = torch.zeros(cout, cin * kk, dtype=DT)   # unfold order: (channel, ky, kx)
    cg, og = cin // groups, cout // groups
    for co in range(cout):
        grp = co // og
        dense[co, grp * cg * kk:(grp + 1) * cg * kk] = W[co].reshape(-1)
    L = cols.shape[-1]
    r_cols = ora.linear_kernel(cols.transpose(1, 2), dense, b, R.flatten(2).transpose(1, 2))
    assert r_cols.shape == (x.shape[0], L, cin * kk)
    folded = F.fold(r_cols.transpose(1, 2), x.shape[-2:], k, dilation=kw["dilation"],
                    padding=kw["padding"], stride=kw["stride"])
    _close(got, _n1(folded), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_vs_autograd(case) -> None:
    x, W, b, R, kw = _conv_setup(case, seed=30)
    got = ora.conv2d_kernel(x, W, b, R, **kw)
    (ref,) = autograd_kernel(lambda t: F.conv2d(t, W, b, **kw),
                             lambda t: F.conv2d(t, W.abs(), b.abs(), **kw), [x], R)
    _close(got, ref)


def test_conv_padding_gets_nothing_and_border_not_double_counted() -> None:
    """1x1 input, 3x3 kernel, padding 1: only the centre tap sees x, so the result is
    N1(2 (x w_centre)^+ R / |y|) = sign of that product (one entry)."""
    x = torch.tensor([[[[2.0]]]], dtype=DT)
    W = _randn(1, 1, 3, 3, seed=40)
    W[0, 0, 1, 1] = 1.5
    R = torch.tensor([[[[0.7]]]], dtype=DT)
    got = ora.conv2d_kernel(x, W, None, R, padding=1)
    _close(got, torch.ones(1, 1, 1, 1, dtype=DT), rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# Matmul (bilinear)
# ---------------------------------------------------------------------------------------------


def test_matmul_each_side_equals_linear_kernel_with_other_fixed() -> None:
    """a's side: with b fixed, y[t, :] = a[t, :] @ b is a Linear with weight W = b^T, and its
    f_abs uses |W| = |b|^T -- exactly the matmul's f_abs = |a| @ |b| differentiated w.r.t. |a|.
    So R_a equals the linear kernel (heads stacked with a block-diagonal weight, so N1 runs over
    all heads of a sample). b's side likewise via y^T = b^T a^T (weight a)."""
    N, H, T, K, S = 2, 3, 4, 5, 3
    a = _randn(N, H, T, K, seed=50)
    b = _randn(N, H, K, S, seed=51)
    R = _randn(N, H, T, S, seed=52)
    Ra, Rb = ora.matmul_kernel(a, b, R)
    for n in range(N):
        # a side: rows t, input features (h, k), outputs (h, s)
        Wa = torch.zeros(H * S, H * K, dtype=DT)
        for h in range(H):
            Wa[h * S:(h + 1) * S, h * K:(h + 1) * K] = b[n, h].T
        xa = a[n].permute(1, 0, 2).reshape(1, T, H * K)
        ra = ora.linear_kernel(xa, Wa, None, R[n].permute(1, 0, 2).reshape(1, T, H * S))
        _close(Ra[n], ra.reshape(T, H, K).permute(1, 0, 2), rtol=1e-9)
        # b side: rows s, input features (h, k), outputs (h, t), weight a
        Wb = torch.zeros(H * T, H * K, dtype=DT)
        for h in range(H):
            Wb[h * T:(h + 1) * T, h * K:(h + 1) * K] = a[n, h]
        xb = b[n].permute(2, 0, 1).reshape(1, S, H * K)
        rb = ora.linear_kernel(xb, Wb, None, R[n].permute(2, 0, 1).reshape(1, S, H * T))
        _close(Rb[n], rb.reshape(S, H, K).permute(1, 2, 0), rtol=1e-9)


def test_matmul_vs_autograd() -> None:
    a = _randn(2, 2, 3, 4, seed=55)
    b = _randn(2, 2, 4, 5, seed=56)
    R = _randn(2, 2, 3, 5, seed=57)
    Ra, Rb = ora.matmul_kernel(a, b, R)
    ra, rb = autograd_kernel(lambda p, q: p @ q, lambda p, q: p @ q, [a, b], R)
    _close(Ra, ra)
    _close(Rb, rb)


def test_matmul_positive_scale_of_a_changes_nothing() -> None:
    """Why ``q * scale`` may pass relevance through: a positive factor on a cancels in N1."""
    a = _randn(1, 2, 3, 4, seed=58)
    b = _randn(1, 2, 4, 3, seed=59)
    R = _rand(1, 2, 3, 3, seed=60)
    r1 = ora.matmul_kernel(a, b, R)
    r2 = ora.matmul_kernel(a * 0.5, b, R)   # equal up to the 1e-9 stabiliser in g
    _close(r1[0], r2[0], rtol=1e-6, atol=1e-10)
    _close(r1[1], r2[1], rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Softmax, LayerNorm, BatchNorm, activations
# ---------------------------------------------------------------------------------------------


def _softmax_detached(t: torch.Tensor) -> torch.Tensor:
    m = t.max(dim=-1, keepdim=True).values.detach()
    e = torch.exp(t - m)
    return e / e.sum(dim=-1, keepdim=True).detach()


def test_softmax_vs_autograd_jacobian() -> None:
    x = 2 * _randn(2, 3, 4, 5, seed=61)
    R = _randn(2, 3, 4, 5, seed=62)
    got = ora.softmax_kernel(x, R)
    (ref,) = autograd_kernel(_softmax_detached, _softmax_detached, [x], R)
    _close(got, ref)
    # the detached Jacobian is diag(y): check autograd agrees on one row
    row = x[0, 0, 0].clone().requires_grad_(True)
    jac = torch.autograd.functional.jacobian(_softmax_detached, row)
    _close(jac, torch.diag(torch.softmax(x[0, 0, 0], -1)), rtol=1e-12)


def test_softmax_can_turn_positive_relevance_negative() -> None:
    """x = [-1, -5], R_y = [1, 0]: R_x0 ~ (x0 y0 + |x0| y_abs0) / y0 with y0 ~ 0.982 and
    y_abs0 = softmax([1, 5])_0 ~ 0.018, i.e. ~ -0.98 < 0. (So ViT R_pos maps may have negative
    entries; the non-negativity test below excludes softmax.)"""
    x = torch.tensor([[-1.0, -5.0]], dtype=DT)
    R = torch.tensor([[1.0, 0.0]], dtype=DT)
    got = ora.softmax_kernel(x, R)
    y0 = math.exp(-1) / (math.exp(-1) + math.exp(-5))
    ya0 = math.exp(1) / (math.exp(1) + math.exp(5))
    raw = (-1.0 * y0 + 1.0 * ya0) / (y0 + EPS)
    _close(got, torch.tensor([[raw / (abs(raw) + EPS), 0.0]], dtype=DT), rtol=1e-9)
    assert got[0, 0] < 0


def _ln_detached(gamma, beta, eps):
    def f(t):
        mu = t.mean(-1, keepdim=True).detach()
        var = t.var(-1, unbiased=False, keepdim=True).detach()
        return (t - mu) / torch.sqrt(var + eps) * gamma + beta
    return f


def test_layernorm_vs_autograd_jacobian() -> None:
    D, eps = 6, 1e-6
    x = _randn(2, 3, D, seed=63) + 0.5
    gamma = _randn(D, seed=64)
    beta = _randn(D, seed=65)
    R = _randn(2, 3, D, seed=66)
    got = ora.layernorm_kernel(x, gamma, beta, R, eps)
    f = _ln_detached(gamma, beta, eps)
    f_abs = _ln_detached(gamma.abs(), beta.abs(), eps)   # own statistics of |x|
    (ref,) = autograd_kernel(f, f_abs, [x], R)
    _close(got, ref)
    # forward agrees with torch's LayerNorm, and the Jacobian is diagonal gamma / sigma
    _close(f(x), F.layer_norm(x, (D,), gamma, beta, eps), rtol=1e-12)
    row = x[0, 0].clone()
    jac = torch.autograd.functional.jacobian(f, row)
    sigma = torch.sqrt(row.var(unbiased=False) + eps)
    _close(jac, torch.diag(gamma / sigma), rtol=1e-12)


def test_batchnorm_vs_autograd() -> None:
    C = 4
    x = _randn(2, C, 3, 5, seed=67)
    mean, var = _randn(C, seed=68), 0.5 + _rand(C, seed=69)
    gamma = _randn(C, seed=70)
    beta = _randn(C, seed=71)
    R = _randn(2, C, 3, 5, seed=72)
    got = ora.batchnorm2d_kernel(x, gamma, beta, mean, var, R, 1e-5)
    (ref,) = autograd_kernel(
        lambda t: F.batch_norm(t, mean, var, gamma, beta, False, 0.0, 1e-5),
        lambda t: F.batch_norm(t, mean, var, gamma.abs(), beta.abs(), False, 0.0, 1e-5),
        [x], R)
    _close(got, ref)


ACTS = {
    "relu": (nn.ReLU(), {}),
    "relu6": (nn.ReLU6(), {}),
    "leaky_relu": (nn.LeakyReLU(0.01), {"negative_slope": 0.01}),
    "elu": (nn.ELU(), {}),
    "silu": (nn.SiLU(), {}),
    "gelu": (nn.GELU(), {}),
    "tanh": (nn.Tanh(), {}),
    "sigmoid": (nn.Sigmoid(), {}),
    "hardswish": (nn.Hardswish(), {}),
}


@pytest.mark.parametrize("kind", list(ACTS))
def test_activation_vs_autograd(kind: str) -> None:
    module, kw = ACTS[kind]
    x = 4 * _randn(2, 3, 4, 5, seed=73)        # covers both sides of 0, beyond +-3 and 6
    R = _randn(2, 3, 4, 5, seed=74)
    got = ora.activation_kernel(x, R, kind, **kw)
    (ref,) = autograd_kernel(module, module, [x], R)
    _close(got, ref, rtol=1e-8)


def test_relu_zero_output_with_zero_relevance_gives_zero() -> None:
    """ReLU at x < 0: |x| a'(|x|) = |x| != 0, but g = R_y / 1e-9 is 0 where R_y is 0 (as it is
    after any kernel, since the output value there is 0)."""
    x = torch.tensor([[-2.0, 3.0, 0.0]], dtype=DT)
    R = torch.tensor([[0.0, 1.0, 0.0]], dtype=DT)
    _close(ora.activation_kernel(x, R, "relu"), torch.tensor([[0.0, 1.0, 0.0]], dtype=DT),
           rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# Pooling, additions, mean
# ---------------------------------------------------------------------------------------------

POOL_CASES = [((2, 2), None, 0, 1), ((3, 3), 2, 1, 1), ((2, 3), (1, 2), (1, 1), 1),
              ((2, 2), 1, 0, 2)]


@pytest.mark.parametrize("k,stride,pad,dil", POOL_CASES)
def test_maxpool_vs_autograd_no_division(k, stride, pad, dil) -> None:
    x = _randn(2, 3, 7, 6, seed=75)
    pool = nn.MaxPool2d(k, stride, pad, dil)
    R = _randn(*pool(x).shape, seed=76)
    got = ora.maxpool2d_kernel(x, R, k, stride, pad, dil)
    (ref,) = autograd_kernel(pool, pool, [x], R, divide=False)
    _close(got, ref)


def test_maxpool_first_max_on_ties_and_abs_route() -> None:
    """Window [[-3, 1], [1, 3]] (one 2x2 window): in x the max 3 is at (1,1); in |x| the values
    are [[3, 1], [1, 3]], the first max is (0,0). R_y = 1:
    raw = x * route_x + |x| * route_|x| = 3 at (1,1) and |-3| = 3 at (0,0); N1 -> 0.5 each."""
    x = torch.tensor([[[[-3.0, 1.0], [1.0, 3.0]]]], dtype=DT)
    R = torch.ones(1, 1, 1, 1, dtype=DT)
    got = ora.maxpool2d_kernel(x, R, 2)
    _close(got, torch.tensor([[[[3.0, 0.0], [0.0, 3.0]]]], dtype=DT) / (6.0 + EPS), rtol=1e-12)
    # tie in x itself: [[2, 2], [0, 0]] -> route to (0,0) in both x and |x|
    x2 = torch.tensor([[[[2.0, 2.0], [0.0, -1.0]]]], dtype=DT)
    got2 = ora.maxpool2d_kernel(x2, R, 2)
    _close(got2, torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=DT), rtol=1e-8)


@pytest.mark.parametrize("k,stride,pad,cip", [(2, None, 0, True), (3, 2, 1, True),
                                              (3, 2, 1, False), ((2, 3), 1, (1, 1), True)])
def test_avgpool_vs_autograd(k, stride, pad, cip) -> None:
    x = _randn(2, 3, 7, 6, seed=77)
    pool = nn.AvgPool2d(k, stride, pad, count_include_pad=cip)
    R = _randn(*pool(x).shape, seed=78)
    got = ora.avgpool2d_kernel(x, R, k, stride, pad, cip)
    (ref,) = autograd_kernel(pool, pool, [x], R)
    _close(got, ref)


@pytest.mark.parametrize("out", [(1, 1), (2, 3), (3, 2)])
def test_adaptive_avgpool_vs_autograd(out) -> None:
    x = _randn(2, 3, 5, 7, seed=79)
    pool = nn.AdaptiveAvgPool2d(out)
    R = _randn(2, 3, *out, seed=80)
    got = ora.adaptive_avgpool2d_kernel(x, R)
    (ref,) = autograd_kernel(pool, pool, [x], R)
    _close(got, ref)


def test_global_avgpool_closed_form() -> None:
    """GAP: R_x = N1((x + |x|) / n * R / |mean|) = N1(x^+ * R_c / |mean_c|) per channel."""
    x = _randn(1, 2, 3, 3, seed=81)
    R = torch.tensor([[[[0.25]], [[0.75]]]], dtype=DT)
    got = ora.adaptive_avgpool2d_kernel(x, R)
    mean = x.mean(dim=(2, 3), keepdim=True)
    _close(got, _n1(x.clamp(min=0) * R / mean.abs()), rtol=1e-8)


def test_mean_kernel_vs_autograd() -> None:
    x = _randn(2, 5, 4, seed=82)
    R = _randn(2, 4, seed=83)
    got = ora.mean_kernel(x, R, 1)
    (ref,) = autograd_kernel(lambda t: t.mean(1), lambda t: t.mean(1), [x], R)
    _close(got, ref)


def test_add_kernels_vs_autograd_and_closed_form() -> None:
    a = _randn(2, 3, 4, seed=84)
    b = _randn(2, 3, 4, seed=85)
    p = _randn(1, 3, 4, seed=86)
    R = _randn(2, 3, 4, seed=87)
    Ra, Rb = ora.add_kernel(a, b, R)
    ra, rb = autograd_kernel(lambda u, v: u + v, lambda u, v: u + v, [a, b], R)
    _close(Ra, ra)
    _close(Rb, rb)
    g = R / ((a + b).abs() + EPS)
    _close(Ra, _n1(2 * a.clamp(min=0) * g))
    _close(Rb, _n1(2 * b.clamp(min=0) * g))
    Rx = ora.param_add_kernel(a, p, R)
    (rx,) = autograd_kernel(lambda u: u + p, lambda u: u + p.abs(), [a], R)
    _close(Rx, rx)


# ---------------------------------------------------------------------------------------------
# Sign and mass properties of every kernel
# ---------------------------------------------------------------------------------------------


def _kernel_calls(seed: int, positive: bool):
    """(name, list of input relevances) for each kernel on random signed data."""
    def rel(*shape, s):
        return _rand(*shape, seed=s) if positive else _randn(*shape, seed=s)
    x4 = _randn(2, 3, 6, 6, seed=seed)
    x3 = _randn(2, 4, 5, seed=seed + 1)
    W = _randn(4, 3, 3, 3, seed=seed + 2)
    out = []
    out.append(("linear", [ora.linear_kernel(x3, _randn(6, 5, seed=seed + 3),
                                             _randn(6, seed=seed + 4), rel(2, 4, 6, s=1))]))
    out.append(("conv", [ora.conv2d_kernel(x4, W, _randn(4, seed=seed + 5), rel(2, 4, 3, 3, s=2),
                                           stride=2, padding=1)]))
    out.append(("bn", [ora.batchnorm2d_kernel(x4, _randn(3, seed=seed + 6),
                                              _randn(3, seed=seed + 7), _randn(3, seed=seed + 8),
                                              1 + _rand(3, seed=seed + 9), rel(2, 3, 6, 6, s=3))]))
    out.append(("ln", [ora.layernorm_kernel(x3, _randn(5, seed=seed + 10),
                                            _randn(5, seed=seed + 11), rel(2, 4, 5, s=4))]))
    for kind in ("relu", "gelu", "elu", "silu", "tanh", "leaky_relu", "relu6"):
        out.append((kind, [ora.activation_kernel(x4, rel(2, 3, 6, 6, s=5), kind)]))
    out.append(("maxpool", [ora.maxpool2d_kernel(x4, rel(2, 3, 3, 3, s=6), 3, 2, 1)]))
    out.append(("avgpool", [ora.avgpool2d_kernel(x4, rel(2, 3, 3, 3, s=7), 2)]))
    out.append(("gap", [ora.adaptive_avgpool2d_kernel(x4, rel(2, 3, 1, 1, s=8))]))
    out.append(("mean", [ora.mean_kernel(x3, rel(2, 5, s=9), 1)]))
    out.append(("add", list(ora.add_kernel(x3, _randn(2, 4, 5, seed=seed + 12),
                                           rel(2, 4, 5, s=10)))))
    out.append(("param_add", [ora.param_add_kernel(x3, _randn(1, 4, 5, seed=seed + 13),
                                                   rel(2, 4, 5, s=11))]))
    out.append(("matmul", list(ora.matmul_kernel(_randn(2, 2, 3, 4, seed=seed + 14),
                                                 _randn(2, 2, 4, 3, seed=seed + 15),
                                                 rel(2, 2, 3, 3, s=12)))))
    out.append(("softmax", [ora.softmax_kernel(x3, rel(2, 4, 5, s=13))]))
    return out


@pytest.mark.parametrize("positive", [True, False])
def test_every_kernel_has_unit_mass_per_sample(positive: bool) -> None:
    for name, rels in _kernel_calls(seed=100, positive=positive):
        for r in rels:
            assert r.dtype == DT, name
            _close(r.abs().flatten(1).sum(1), torch.ones(r.shape[0], dtype=DT), rtol=1e-7)


def test_non_negative_relevance_stays_non_negative() -> None:
    """Linear-type layers give 2 (x w)^+ g >= 0; activations x a'(x) + |x| a'(|x|) >= 0 for the
    listed ones; LN: sigma_abs <= sigma so |x||gamma|/sigma_abs >= |x gamma|/sigma. Softmax is
    the exception (see test_softmax_can_turn_positive_relevance_negative)."""
    for name, rels in _kernel_calls(seed=200, positive=True):
        if name == "softmax":
            continue
        for r in rels:
            assert (r >= 0).all(), name
            assert (r > 0).any(), name


def test_n1() -> None:
    v = torch.tensor([[1.0, -3.0], [0.0, 0.0]], dtype=DT)
    _close(ora.n1(v), torch.tensor([[1 / (4 + EPS), -3 / (4 + EPS)], [0.0, 0.0]], dtype=DT),
           rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# Model level: independent autograd-kernel walks
# ---------------------------------------------------------------------------------------------


def _abs_params(m: nn.Module) -> nn.Module:
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        for p in m2.parameters():
            p.abs_()
    return m2


def _module_backward(m: nn.Module, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """One leaf module's relevance with the generic autograd kernel."""
    if isinstance(m, (nn.Flatten,)):
        return R.reshape(x.shape)
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return R
    divide = not isinstance(m, nn.MaxPool2d)
    return autograd_kernel(m, _abs_params(m), [x], R, divide=divide)[0]


def _flat_leaves(m: nn.Module) -> list[nn.Module]:
    if isinstance(m, nn.Sequential):
        return [leaf for c in m for leaf in _flat_leaves(c)]
    return [m]


def _chain_walk(mods: list[nn.Module], x: torch.Tensor, R_out: torch.Tensor) -> torch.Tensor:
    inputs = []
    with torch.no_grad():
        for m in mods:
            inputs.append(x)
            x = m(x)
    R = R_out
    for m, xin in zip(reversed(mods), reversed(inputs), strict=True):
        R = _module_backward(m, xin, R)
    return R


def _clrp(n: int, c: int, target: torch.Tensor):
    pos = F.one_hot(target, c).to(DT)
    return pos, (1 - pos) / (c - 1)


def _seq_model(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), copy.deepcopy(act),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), copy.deepcopy(act)),
        nn.AvgPool2d(2, 1),
        nn.Conv2d(4, 5, 1), copy.deepcopy(act),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Dropout(0.5), nn.Linear(5, 4),
    ).double().eval()
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.copy_(_randn(4, seed=300))
        bn.running_var.copy_(0.5 + _rand(4, seed=301))
        bn.weight.copy_(_randn(4, seed=302))
        bn.bias.copy_(_randn(4, seed=303))
    return m


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.LeakyReLU(0.01), nn.Tanh()],
                         ids=["relu", "gelu", "leaky_relu", "tanh"])
def test_sequential_matches_autograd_walk(act: nn.Module) -> None:
    m = _seq_model(act)
    x = _randn(2, 3, 8, 8, seed=310)
    target = torch.tensor([1, 3])
    got = ora.abslrp_reference(m, x, target)
    pos, neg = _clrp(2, 4, target)
    mods = _flat_leaves(m)
    expected = _chain_walk(mods, x, pos) - _chain_walk(mods, x, neg)
    assert got.shape == x.shape
    _close(got, expected, rtol=1e-7, atol=1e-12)
    only_pos = ora.abslrp_reference(m, x, target, contrastive=False)
    _close(only_pos, _chain_walk(mods, x, pos), rtol=1e-7, atol=1e-12)
    _close(only_pos.abs().flatten(1).sum(1), torch.ones(2, dtype=DT), rtol=1e-7)


def test_flatten_linear_model_closed_form_and_int_target() -> None:
    """Sequential(Flatten, Linear): R_pos[i] = N1(2 (x_i W_ti)^+ / |z_t|) and R_neg likewise
    with the other classes' 1/(C-1) weights; an int target applies to every sample."""
    torch.manual_seed(1)
    lin = nn.Linear(12, 3).double()
    m = nn.Sequential(nn.Flatten(), lin).eval()
    x = _randn(2, 3, 2, 2, seed=320)
    got = ora.abslrp_reference(m, x, 2)
    W, b = lin.weight.detach(), lin.bias.detach()
    xf = x.flatten(1)
    z = xf @ W.T + b
    contrib = 2 * (xf[:, None, :] * W[None]).clamp(min=0) / z.abs()[:, :, None]   # (N, C, I)
    r_pos = _n1(contrib[:, 2])
    r_neg = _n1(0.5 * (contrib[:, 0] + contrib[:, 1]))
    _close(got, (r_pos - r_neg).reshape(x.shape), rtol=1e-8, atol=1e-13)


def _zoo():
    return pytest.importorskip("srdxai.models.zoo")


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, dtype=DT, generator=g) * 0.3)
                mod.running_var.copy_(0.5 + torch.rand(c, dtype=DT, generator=g))
                mod.weight.copy_(torch.randn(c, dtype=DT, generator=g))
                mod.bias.copy_(torch.randn(c, dtype=DT, generator=g) * 0.3)


def _resnet_walk(model: nn.Module, x: torch.Tensor, R_out: torch.Tensor) -> torch.Tensor:
    """SmallResNet with autograd kernels: the stem and head as chains; each BasicBlock as
    main chain + shortcut (identity or downsample chain) joined by the two-input add kernel."""
    with torch.no_grad():
        stem_in = x
        h = model.act(model.bn1(model.conv1(x)))
        block_io = []
        for k in range(model.depth):
            blk = getattr(model, f"layer{k + 1}")
            block_io.append((blk, h))
            h = blk(h)
    head = [model.avgpool, nn.Flatten(), model.fc]
    R = _chain_walk(head, h, R_out)
    for blk, xin in reversed(block_io):
        main = [blk.conv1, blk.bn1, blk.act1, blk.conv2, blk.bn2]
        short = [] if blk.downsample is None else list(blk.downsample)
        with torch.no_grad():
            a = nn.Sequential(*main)(xin)
            b = nn.Sequential(*short)(xin) if short else xin
        R_s = _module_backward(blk.act2, a + b, R)
        R_a, R_b = autograd_kernel(lambda u, v: u + v, lambda u, v: u + v, [a, b], R_s)
        R = _chain_walk(main, xin, R_a) + (_chain_walk(short, xin, R_b) if short else R_b)
    return _chain_walk([model.conv1, model.bn1, model.act], stem_in, R)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_small_resnet_matches_autograd_walk(act: str) -> None:
    zoo = _zoo()
    torch.manual_seed(2)
    model = zoo.SmallResNet(num_classes=4, activation=act, widths=(4, 6, 6)).double().eval()
    _randomize_bn(model, 330)
    x = _randn(2, 3, 12, 12, seed=331)
    target = torch.tensor([1, 2])   # (class 0 has fc weights <= 0 on every live channel here)
    got = ora.abslrp_reference(model, x, target)
    pos, neg = _clrp(2, 4, target)
    expected = _resnet_walk(model, x, pos) - _resnet_walk(model, x, neg)
    _close(got, expected, rtol=1e-7, atol=1e-12)
    r_pos = ora.abslrp_reference(model, x, target, contrastive=False)
    if act == "relu":
        assert (r_pos >= 0).all()
    _close(r_pos.abs().flatten(1).sum(1), torch.ones(2, dtype=DT), rtol=1e-7)


def test_small_vgg_matches_autograd_walk() -> None:
    zoo = _zoo()
    torch.manual_seed(3)
    model = zoo.SmallVGG(num_classes=4, activation="elu", widths=(3, 4, 4, 5),
                         input_size=16).double().eval()
    x = _randn(2, 3, 16, 16, seed=340)
    target = torch.tensor([3, 1])
    got = ora.abslrp_reference(model, x, target)
    pos, neg = _clrp(2, 4, target)
    mods = _flat_leaves(model.features) + [nn.Flatten()] + _flat_leaves(model.classifier)
    expected = _chain_walk(mods, x, pos) - _chain_walk(mods, x, neg)
    _close(got, expected, rtol=1e-7, atol=1e-12)


def _vit_walk(model: nn.Module, x: torch.Tensor, R_out: torch.Tensor) -> torch.Tensor:
    """The ViT with autograd kernels, written independently of the oracle's tape."""
    n = x.shape[0]
    with torch.no_grad():
        tok = model.patch_embed.proj(x)                       # (N, D, h, w)
        seq = tok.flatten(2).transpose(1, 2)
        cat = torch.cat([model.cls_token.expand(n, -1, -1), seq], 1)
        z0 = cat + model.pos_embed
        saved = []
        z = z0
        for blk in model.blocks:
            saved.append(z)
            z = blk(z)
        zf = z
    # head, class token selection, final norm
    with torch.no_grad():
        cls = model.norm(zf)[:, 0]
    R_cls = _module_backward(model.head, cls, R_out)
    R_norm_out = torch.zeros_like(zf)
    R_norm_out[:, 0] = R_cls
    R = _ln_kernel(model.norm, zf, R_norm_out)
    for blk, zin in zip(reversed(list(model.blocks)), reversed(saved), strict=True):
        R = _block_walk(blk, zin, R)
    # + pos_embed (parameter add), drop class token share, undo flatten/transpose, conv
    pos = model.pos_embed.detach()
    (R_cat,) = autograd_kernel(lambda u: u + pos, lambda u: u + pos.abs(), [cat], R)
    R_seq = R_cat[:, 1:]
    R_tok = R_seq.transpose(1, 2).reshape(tok.shape)
    return _module_backward(model.patch_embed.proj, x, R_tok)


def _ln_kernel(ln: nn.LayerNorm, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    w, b = ln.weight.detach(), ln.bias.detach()
    return autograd_kernel(_ln_detached(w, b, ln.eps), _ln_detached(w.abs(), b.abs(), ln.eps),
                           [x], R)[0]


def _block_walk(blk: nn.Module, z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    attn = blk.attn
    n, t, d = z.shape
    H = attn.heads
    with torch.no_grad():
        a_in = blk.norm1(z)
        qkv = attn.qkv(a_in)
        q, k, v = qkv.reshape(n, t, 3, H, d // H).permute(2, 0, 3, 1, 4)
        qs = q * attn.scale
        kt = k.transpose(-2, -1)
        scores = qs @ kt
        p = torch.softmax(scores, -1)
        o = p @ v
        o_flat = o.transpose(1, 2).reshape(n, t, d)
        z1 = z + attn.proj(o_flat)
        m_in = blk.norm2(z1)
        h1 = blk.mlp.fc1(m_in)
        h2 = blk.mlp.act(h1)
        branch2 = blk.mlp.fc2(h2)
        branch1 = attn.proj(o_flat)
    # second residual: z2 = z1 + mlp(norm2(z1))
    R_z1, R_b2 = autograd_kernel(lambda u, w: u + w, lambda u, w: u + w, [z1, branch2], R)
    R_m = _chain_walk([blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2], m_in, R_b2)
    R_z1 = R_z1 + _ln_kernel(blk.norm2, z1, R_m)
    # first residual: z1 = z + attn(norm1(z))
    R_z, R_b1 = autograd_kernel(lambda u, w: u + w, lambda u, w: u + w, [z, branch1], R_z1)
    R_o_flat = _module_backward(attn.proj, o_flat, R_b1)
    R_o = R_o_flat.reshape(n, t, H, d // H).transpose(1, 2)
    R_p, R_v = autograd_kernel(lambda u, w: u @ w, lambda u, w: u @ w, [p, v], R_o)
    (R_scores,) = autograd_kernel(_softmax_detached, _softmax_detached, [scores], R_p)
    R_qs, R_kt = autograd_kernel(lambda u, w: u @ w, lambda u, w: u @ w, [qs, kt], R_scores)
    R_q, R_k = R_qs, R_kt.transpose(-2, -1)           # scale and transpose pass through
    R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(n, t, 3 * d)
    R_a_in = _module_backward(attn.qkv, a_in, R_qkv)
    return R_z + _ln_kernel(blk.norm1, z, R_a_in)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_vit_matches_autograd_walk(act: str) -> None:
    zoo = _zoo()
    torch.manual_seed(4)
    model = zoo.VisionTransformer(image_size=8, patch=4, num_classes=5, dim=8, depth=2, heads=2,
                                  mlp_ratio=2.0, activation=act).double().eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name:   # non-trivial LayerNorm affine parameters
                prm.copy_(torch.randn(prm.shape, dtype=DT, generator=_gen(len(name))))
            if name.endswith("bias"):
                prm.add_(0.2 * torch.randn(prm.shape, dtype=DT, generator=_gen(7 * len(name))))
    x = _randn(2, 3, 8, 8, seed=350)
    target = torch.tensor([4, 0])
    got = ora.abslrp_reference(model, x, target)
    pos, neg = _clrp(2, 5, target)
    expected = _vit_walk(model, x, pos) - _vit_walk(model, x, neg)
    assert got.shape == x.shape
    _close(got, expected, rtol=1e-6, atol=1e-12)
    r_pos = ora.abslrp_reference(model, x, target, contrastive=False)
    _close(r_pos.abs().flatten(1).sum(1), torch.ones(2, dtype=DT), rtol=1e-7)


def test_small_vit_runs_and_matches_propagate() -> None:
    """small_vit at 16x16: contrastive = propagate(onehot) - propagate(uniform others)."""
    zoo = _zoo()
    torch.manual_seed(5)
    model = zoo.small_vit(num_classes=4, image_size=16).double().eval()
    x = _randn(1, 3, 16, 16, seed=360)
    got = ora.abslrp_reference(model, x, 1)
    pos = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=DT)
    neg = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=DT) / 3
    _close(got, ora.abslrp_propagate(model, x, pos) - ora.abslrp_propagate(model, x, neg),
           rtol=1e-12, atol=1e-15)
    assert got.abs().sum() > 0


def test_mirror_detects_a_wrong_model() -> None:
    """The oracle refuses a model whose forward it does not mirror (here: an extra op)."""
    zoo = _zoo()

    class Odd(zoo.SmallVGG):
        def forward(self, x):
            return super().forward(x) * 2.0

    torch.manual_seed(6)
    model = Odd(num_classes=3, widths=(2, 2, 2, 2), input_size=16).double().eval()
    with pytest.raises(AssertionError, match="mirrored forward"):
        ora.abslrp_reference(model, _randn(1, 3, 16, 16, seed=370), 0)
