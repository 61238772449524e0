"""Slow, independent reference implementation ("oracle") of the absLRP relevance rule.

Written from the rule's definition only (not from srdxai's engine or methods), so that the
engine and this oracle cannot share a mistake. Everything is float64, and the kernels are
explicit Python loops over output positions (only the sum over one neuron's inputs is a
vector expression). Use tiny models and inputs.

Definition
----------
``N1(v) = v / (sum over all non-batch entries of |v| + 1e-9)``, per sample.

For a layer ``y = f(x_1, ..., x_n; theta)``:

    g       = R_y / (|y| + 1e-9)
    R_{x_i} = N1( x_i * [J_{f,i}^T g] + |x_i| * [J_{fabs,i}^T g] )

where ``f_abs`` is the layer with every parameter replaced by its absolute value, evaluated at
``(|x_1|, ..., |x_n|)``. Each input is normalised separately; relevances arriving at a tensor
from several consumers are summed (no renormalisation). MaxPool does not divide by ``|y|``.
Reshapes, permutes, transposes, concatenation with the class token (its share is dropped),
selection of the class token, eval dropout and multiplication by a Python number pass the
relevance through unchanged.

Output relevance (CLRP): ``R_pos = onehot(t)``, ``R_neg = (1 - onehot(t)) / (C - 1)``; each is
propagated to the input independently and :func:`abslrp_reference` returns
``R_pos_input - R_neg_input`` (shape ``(N, C_in, H, W)``, no channel sum, no max-normalisation).

Public API
----------
Kernels (torch tensors in, float64 torch tensors out, batch dimension first)::

    n1(v)
    linear_kernel(x, weight, bias, R_y)
    conv2d_kernel(x, weight, bias, R_y, stride=1, padding=0, dilation=1, groups=1)
    batchnorm2d_kernel(x, weight, bias, running_mean, running_var, R_y, eps=1e-5)
    layernorm_kernel(x, weight, bias, R_y, eps=1e-5)
    activation_kernel(x, R_y, kind, negative_slope=0.01, alpha=1.0)
    softmax_kernel(x, R_y)
    matmul_kernel(a, b, R_y) -> (R_a, R_b)
    add_kernel(a, b, R_y) -> (R_a, R_b)
    param_add_kernel(x, p, R_y)
    maxpool2d_kernel(x, R_y, kernel_size, stride=None, padding=0, dilation=1)
    avgpool2d_kernel(x, R_y, kernel_size, stride=None, padding=0, count_include_pad=True,
                     divisor_override=None)
    adaptive_avgpool2d_kernel(x, R_y)
    mean_kernel(x, R_y, dim)

Model level::

    clrp_output_relevance(num_classes, target, n) -> (R_pos, R_neg)
    abslrp_propagate(model, x, R_out) -> R_input
    abslrp_reference(model, x, target, contrastive=True) -> R_input

Supported models: ``nn.Sequential`` (nested allowed) of Conv2d / BatchNorm2d / activations
(ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU(exact), Tanh, Sigmoid, Hardswish) / MaxPool2d /
AvgPool2d / AdaptiveAvgPool2d / Flatten / Linear / Dropout / Identity, and srdxai's
``SmallVGG``, ``SmallResNet`` (with ``BasicBlock``) and ``VisionTransformer`` (recognised by
class name and structure, so this module never imports srdxai).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "STAB",
    "ACTIVATION_KINDS",
    "n1",
    "linear_kernel",
    "conv2d_kernel",
    "batchnorm2d_kernel",
    "layernorm_kernel",
    "activation_kernel",
    "softmax_kernel",
    "matmul_kernel",
    "add_kernel",
    "param_add_kernel",
    "maxpool2d_kernel",
    "avgpool2d_kernel",
    "adaptive_avgpool2d_kernel",
    "mean_kernel",
    "clrp_output_relevance",
    "abslrp_propagate",
    "abslrp_reference",
]

#: The only stabiliser of the rule: in ``N1`` and in ``g = R_y / (|y| + STAB)``.
STAB = 1e-9


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _np(t) -> np.ndarray:
    """A float64 numpy copy of a tensor / array / number."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy().copy()
    return np.array(t, dtype=np.float64)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _n1_np(v: np.ndarray) -> np.ndarray:
    """N1 per sample (axis 0) over every other axis."""
    n = v.shape[0]
    mass = np.zeros(n)
    for s in range(n):
        mass[s] = np.abs(v[s]).sum()
    out = np.empty_like(v)
    for s in range(n):
        out[s] = v[s] / (mass[s] + STAB)
    return out


def n1(v: torch.Tensor) -> torch.Tensor:
    """``v / (sum_{non-batch} |v| + 1e-9)`` per sample, float64."""
    return _t(_n1_np(_np(v)))


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        assert len(v) == 2, v
        return int(v[0]), int(v[1])
    return int(v), int(v)


# ---------------------------------------------------------------------------------------------
# per-layer kernels
# ---------------------------------------------------------------------------------------------


def linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  R_y: torch.Tensor) -> torch.Tensor:
    """Linear ``y = x W^T + b`` on the last dim of ``x`` (shape ``(N, ..., I)``).

    ``R_x[i] = N1( sum_j (x_i W_ji + |x_i| |W_ji|) * R_j / (|y_j| + 1e-9) )`` per row.
    """
    X = _np(x)
    W = _np(weight)
    J, I = W.shape  # noqa: E741
    b = np.zeros(J) if bias is None else _np(bias)
    Ry = _np(R_y)
    assert X.shape[-1] == I and Ry.shape == X.shape[:-1] + (J,), (X.shape, W.shape, Ry.shape)
    out = np.zeros_like(X)
    for row in np.ndindex(X.shape[:-1]):
        xr = X[row]
        for j in range(J):
            y = float(np.dot(xr, W[j])) + b[j]
            g = Ry[row + (j,)] / (abs(y) + STAB)
            out[row] += (xr * W[j] + np.abs(xr) * np.abs(W[j])) * g
    return _t(_n1_np(out))


def conv2d_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  R_y: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1
                  ) -> torch.Tensor:
    """Conv2d (zero padding, any stride/dilation/groups), ``x`` of shape ``(N, C, H, W)``.

    For every output ``(n, co, oy, ox)``: the input positions it sees through each kernel
    offset ``(ky, kx)`` (in its channel group) receive ``(x W + |x| |W|) * R_y / (|y| + 1e-9)``.
    Padded positions contribute nothing (their value is 0 and they are cropped away).
    """
    X = _np(x)
    Wt = _np(weight)
    N, C, H, Wd = X.shape
    Co, Cg, kh, kw = Wt.shape
    assert C == Cg * groups and Co % groups == 0, (X.shape, Wt.shape, groups)
    b = np.zeros(Co) if bias is None else _np(bias)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    Ry = _np(R_y)
    assert Ry.shape == (N, Co, Ho, Wo), (Ry.shape, (N, Co, Ho, Wo))
    Xp = np.zeros((N, C, H + 2 * ph, Wd + 2 * pw))
    Xp[:, :, ph:ph + H, pw:pw + Wd] = X
    out_p = np.zeros_like(Xp)
    co_per_group = Co // groups
    for n in range(N):
        for co in range(Co):
            grp = co // co_per_group
            chans = np.arange(grp * Cg, (grp + 1) * Cg)
            w = Wt[co]                       # (Cg, kh, kw)
            for oy in range(Ho):
                for ox in range(Wo):
                    rows = oy * sh + dh * np.arange(kh)
                    cols = ox * sw + dw * np.arange(kw)
                    idx = np.ix_(chans, rows, cols)
                    patch = Xp[n][idx]       # (Cg, kh, kw): what output (co, oy, ox) sees
                    y = float((patch * w).sum()) + b[co]
                    g = Ry[n, co, oy, ox] / (abs(y) + STAB)
                    out_p[n][idx] += (patch * w + np.abs(patch) * np.abs(w)) * g
    out = out_p[:, :, ph:ph + H, pw:pw + Wd]
    return _t(_n1_np(out))


def batchnorm2d_kernel(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       running_mean: torch.Tensor, running_var: torch.Tensor,
                       R_y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Eval BatchNorm2d ``y = (x - mu) / sqrt(var + eps) * gamma + beta`` (elementwise).

    ``f_abs`` uses ``|gamma|``, ``|beta|`` and the same running statistics, so
    ``R_x = N1( (x * gamma + |x| * |gamma|) / sqrt(var + eps) * R_y / (|y| + 1e-9) )``.
    """
    X = _np(x)
    N, C, H, W = X.shape
    gamma = np.ones(C) if weight is None else _np(weight)
    beta = np.zeros(C) if bias is None else _np(bias)
    mu = _np(running_mean)
    var = _np(running_var)
    Ry = _np(R_y)
    assert Ry.shape == X.shape
    out = np.zeros_like(X)
    for n in range(N):
        for c in range(C):
            s = math.sqrt(var[c] + eps)
            xc = X[n, c]
            y = (xc - mu[c]) / s * gamma[c] + beta[c]
            g = Ry[n, c] / (np.abs(y) + STAB)
            jac = gamma[c] / s               # dy/dx
            jac_abs = abs(gamma[c]) / s      # d f_abs / d|x|
            out[n, c] = (xc * jac + np.abs(xc) * jac_abs) * g
    return _t(_n1_np(out))


def layernorm_kernel(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     R_y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim with detached mean / biased variance.

    ``J = gamma / sigma`` (diagonal); ``f_abs`` normalises ``|x|`` with its own detached
    statistics ``sigma_abs`` and uses ``|gamma|``, ``|beta|``: ``J_abs = |gamma| / sigma_abs``.
    """
    X = _np(x)
    D = X.shape[-1]
    gamma = np.ones(D) if weight is None else _np(weight)
    beta = np.zeros(D) if bias is None else _np(bias)
    Ry = _np(R_y)
    assert Ry.shape == X.shape
    out = np.zeros_like(X)
    for row in np.ndindex(X.shape[:-1]):
        xr = X[row]
        mu = xr.sum() / D
        var = ((xr - mu) ** 2).sum() / D
        sigma = math.sqrt(var + eps)
        xa = np.abs(xr)
        mu_a = xa.sum() / D
        var_a = ((xa - mu_a) ** 2).sum() / D
        sigma_a = math.sqrt(var_a + eps)
        y = (xr - mu) / sigma * gamma + beta
        g = Ry[row] / (np.abs(y) + STAB)
        out[row] = (xr * gamma / sigma + xa * np.abs(gamma) / sigma_a) * g
    return _t(_n1_np(out))


def _phi_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _act_value_and_slope(kind: str, z: float, negative_slope: float, alpha: float
                         ) -> tuple[float, float]:
    """``(a(z), a'(z))`` for a scalar ``z``, written out by hand."""
    if kind == "relu":
        return (z if z > 0 else 0.0), (1.0 if z > 0 else 0.0)
    if kind == "relu6":
        return min(max(z, 0.0), 6.0), (1.0 if 0.0 < z < 6.0 else 0.0)
    if kind == "leaky_relu":
        return (z if z > 0 else negative_slope * z), (1.0 if z > 0 else negative_slope)
    if kind == "elu":
        if z > 0:
            return z, 1.0
        return alpha * (math.exp(z) - 1.0), alpha * math.exp(z)
    if kind == "silu":
        s = _sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    if kind == "gelu":
        cdf = _phi_cdf(z)
        pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + z * pdf
    if kind == "tanh":
        t = math.tanh(z)
        return t, 1.0 - t * t
    if kind == "sigmoid":
        s = _sigmoid(z)
        return s, s * (1.0 - s)
    if kind == "hardswish":
        if z <= -3.0:
            return 0.0, 0.0
        if z >= 3.0:
            return z, 1.0
        return z * (z + 3.0) / 6.0, (2.0 * z + 3.0) / 6.0
    raise ValueError(f"unknown activation {kind!r}")


ACTIVATION_KINDS = ("relu", "relu6", "leaky_relu", "elu", "silu", "gelu", "tanh", "sigmoid",
                    "hardswish")


def activation_kernel(x: torch.Tensor, R_y: torch.Tensor, kind: str,
                      negative_slope: float = 0.01, alpha: float = 1.0) -> torch.Tensor:
    """Elementwise activation ``a``:
    ``R_x = N1( (x a'(x) + |x| a'(|x|)) * R_y / (|a(x)| + 1e-9) )``.

    ``kind`` is one of :data:`ACTIVATION_KINDS`; ``a'(0) = 0`` for ReLU.
    """
    X = _np(x)
    Ry = _np(R_y)
    assert Ry.shape == X.shape
    out = np.zeros_like(X)
    for idx in np.ndindex(X.shape):
        z = float(X[idx])
        y, d = _act_value_and_slope(kind, z, negative_slope, alpha)
        _, d_abs = _act_value_and_slope(kind, abs(z), negative_slope, alpha)
        g = Ry[idx] / (abs(y) + STAB)
        out[idx] = (z * d + abs(z) * d_abs) * g
    return _t(_n1_np(out))


def softmax_kernel(x: torch.Tensor, R_y: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with max and denominator as constants.

    ``J = diag(y)``, ``J_abs = diag(softmax(|x|))``;
    ``R_x = N1( (x * y + |x| * y_abs) * R_y / (|y| + 1e-9) )``.
    """
    X = _np(x)
    Ry = _np(R_y)
    assert Ry.shape == X.shape
    out = np.zeros_like(X)
    for row in np.ndindex(X.shape[:-1]):
        xr = X[row]
        e = np.exp(xr - xr.max())
        y = e / e.sum()
        xa = np.abs(xr)
        ea = np.exp(xa - xa.max())
        y_abs = ea / ea.sum()
        g = Ry[row] / (np.abs(y) + STAB)
        out[row] = (xr * y + xa * y_abs) * g
    return _t(_n1_np(out))


def matmul_kernel(a: torch.Tensor, b: torch.Tensor, R_y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = a @ b`` of two image-dependent tensors, ``a: (N, ..., T, K)``, ``b: (N, ..., K, S)``
    (same leading dims). ``f_abs = |a| @ |b|``. For every output ``(t, s)`` the pair terms
    ``a_tk b_ks + |a_tk| |b_ks|`` (times ``g_ts``) go to ``a_tk`` and to ``b_ks``; each side is
    then normalised per sample over all its non-batch dims (heads included)."""
    A = _np(a)
    B = _np(b)
    Ry = _np(R_y)
    assert A.shape[:-2] == B.shape[:-2] and A.shape[-1] == B.shape[-2], (A.shape, B.shape)
    T, K = A.shape[-2:]
    S = B.shape[-1]
    assert Ry.shape == A.shape[:-2] + (T, S)
    Ra = np.zeros_like(A)
    Rb = np.zeros_like(B)
    for lead in np.ndindex(A.shape[:-2]):
        Am = A[lead]
        Bm = B[lead]
        for t in range(T):
            for s in range(S):
                y = float(np.dot(Am[t], Bm[:, s]))
                g = Ry[lead + (t, s)] / (abs(y) + STAB)
                pair = (Am[t] * Bm[:, s] + np.abs(Am[t]) * np.abs(Bm[:, s])) * g   # over k
                Ra[lead + (t,)] += pair
                Rb[lead][:, s] += pair
    return _t(_n1_np(Ra)), _t(_n1_np(Rb))


def add_kernel(a: torch.Tensor, b: torch.Tensor, R_y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = a + b`` (both image-dependent): ``R_a = N1((a + |a|) g)``, ``R_b = N1((b + |b|) g)``,
    ``g = R_y / (|y| + 1e-9)``."""
    A = _np(a)
    B = _np(b)
    Ry = _np(R_y)
    assert A.shape == B.shape == Ry.shape
    Ra = np.zeros_like(A)
    Rb = np.zeros_like(B)
    for idx in np.ndindex(A.shape):
        g = Ry[idx] / (abs(A[idx] + B[idx]) + STAB)
        Ra[idx] = (A[idx] + abs(A[idx])) * g
        Rb[idx] = (B[idx] + abs(B[idx])) * g
    return _t(_n1_np(Ra)), _t(_n1_np(Rb))


def param_add_kernel(x: torch.Tensor, p: torch.Tensor, R_y: torch.Tensor) -> torch.Tensor:
    """``y = x + p`` with ``p`` a parameter (broadcast to ``x``): ``R_x = N1((x + |x|) g)``;
    the parameter gets nothing."""
    X = _np(x)
    P = np.broadcast_to(_np(p), X.shape)
    Ry = _np(R_y)
    assert Ry.shape == X.shape
    out = np.zeros_like(X)
    for idx in np.ndindex(X.shape):
        g = Ry[idx] / (abs(X[idx] + P[idx]) + STAB)
        out[idx] = (X[idx] + abs(X[idx])) * g
    return _t(_n1_np(out))


def _window_positions(o: int, stride: int, padding: int, dilation: int, k: int, size: int
                      ) -> list[int]:
    """Input coordinates (inside the unpadded input) covered by window ``o``."""
    start = o * stride - padding
    return [start + dilation * u for u in range(k) if 0 <= start + dilation * u < size]


def maxpool2d_kernel(x: torch.Tensor, R_y: torch.Tensor, kernel_size, stride=None, padding=0,
                     dilation=1) -> torch.Tensor:
    """MaxPool2d, NO division by ``|y|``:
    ``R_x = N1( x * route_x^T(R_y) + |x| * route_|x|^T(R_y) )``.

    ``route_v`` sends each output's relevance to the first (row-major) arg-max of its window
    in ``v``; padded positions never win.
    """
    X = _np(x)
    N, C, H, W = X.shape
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    Ry = _np(R_y)
    assert Ry.shape == (N, C, Ho, Wo), (Ry.shape, (N, C, Ho, Wo))
    Xa = np.abs(X)
    route = np.zeros_like(X)
    route_abs = np.zeros_like(X)
    for n in range(N):
        for c in range(C):
            for oy in range(Ho):
                rows = _window_positions(oy, sh, ph, dh, kh, H)
                for ox in range(Wo):
                    cols = _window_positions(ox, sw, pw, dw, kw, W)
                    for src, dst in ((X, route), (Xa, route_abs)):
                        best = None
                        best_val = -math.inf
                        for r in rows:
                            for q in cols:
                                if src[n, c, r, q] > best_val:   # strict: first max wins
                                    best_val = src[n, c, r, q]
                                    best = (r, q)
                        dst[n, c, best[0], best[1]] += Ry[n, c, oy, ox]
    return _t(_n1_np(X * route + Xa * route_abs))


def avgpool2d_kernel(x: torch.Tensor, R_y: torch.Tensor, kernel_size, stride=None, padding=0,
                     count_include_pad: bool = True, divisor_override: int | None = None
                     ) -> torch.Tensor:
    """AvgPool2d as a parameter-free linear layer with weights ``1/n`` (kernel with division)."""
    X = _np(x)
    N, C, H, W = X.shape
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    Ry = _np(R_y)
    assert Ry.shape == (N, C, Ho, Wo), (Ry.shape, (N, C, Ho, Wo))
    out = np.zeros_like(X)
    for n in range(N):
        for c in range(C):
            for oy in range(Ho):
                rows = _window_positions(oy, sh, ph, 1, kh, H)
                for ox in range(Wo):
                    cols = _window_positions(ox, sw, pw, 1, kw, W)
                    if divisor_override:
                        div = divisor_override
                    elif count_include_pad:
                        # torch counts padded cells inside the padded input only
                        y0, x0 = oy * sh - ph, ox * sw - pw
                        y1, x1 = min(y0 + kh, H + ph), min(x0 + kw, W + pw)
                        div = (y1 - y0) * (x1 - x0)
                    else:
                        div = len(rows) * len(cols)
                    y = sum(X[n, c, r, q] for r in rows for q in cols) / div
                    g = Ry[n, c, oy, ox] / (abs(y) + STAB)
                    for r in rows:
                        for q in cols:
                            v = X[n, c, r, q]
                            out[n, c, r, q] += (v + abs(v)) / div * g
    return _t(_n1_np(out))


def adaptive_avgpool2d_kernel(x: torch.Tensor, R_y: torch.Tensor) -> torch.Tensor:
    """AdaptiveAvgPool2d to ``R_y.shape[-2:]`` (bins ``[floor(o H / Ho), ceil((o+1) H / Ho))``)."""
    X = _np(x)
    N, C, H, W = X.shape
    Ry = _np(R_y)
    Ho, Wo = Ry.shape[-2:]
    assert Ry.shape == (N, C, Ho, Wo)
    out = np.zeros_like(X)
    for n in range(N):
        for c in range(C):
            for oy in range(Ho):
                rows = range((oy * H) // Ho, -((-(oy + 1) * H) // Ho))
                for ox in range(Wo):
                    cols = range((ox * W) // Wo, -((-(ox + 1) * W) // Wo))
                    div = len(rows) * len(cols)
                    y = sum(X[n, c, r, q] for r in rows for q in cols) / div
                    g = Ry[n, c, oy, ox] / (abs(y) + STAB)
                    for r in rows:
                        for q in cols:
                            v = X[n, c, r, q]
                            out[n, c, r, q] += (v + abs(v)) / div * g
    return _t(_n1_np(out))


def mean_kernel(x: torch.Tensor, R_y: torch.Tensor, dim: int) -> torch.Tensor:
    """``y = x.mean(dim)`` (e.g. over tokens; ``dim`` not the batch dim) as a weights-``1/n``
    linear layer."""
    X = _np(x)
    dim = dim % X.ndim
    assert dim != 0
    Xm = np.moveaxis(X, dim, -1)
    Ry = _np(R_y)
    assert Ry.shape == Xm.shape[:-1]
    n_in = Xm.shape[-1]
    out = np.zeros_like(Xm)
    for row in np.ndindex(Xm.shape[:-1]):
        y = Xm[row].sum() / n_in
        g = Ry[row] / (abs(y) + STAB)
        for i in range(n_in):
            v = Xm[row + (i,)]
            out[row + (i,)] = (v + abs(v)) / n_in * g
    return _t(_n1_np(np.moveaxis(out, -1, dim)))


# ---------------------------------------------------------------------------------------------
# model walking: a tape of the forward, then the backward with the kernels above
# ---------------------------------------------------------------------------------------------


class _Tape:
    """Forward record: node values and the ops between them, in forward order."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ops: list[tuple[str, tuple[int, ...], int, dict]] = []

    def node(self, value: torch.Tensor) -> int:
        self.values.append(value.detach())
        return len(self.values) - 1

    def op(self, kind: str, ins: Sequence[int], value: torch.Tensor, **info) -> int:
        out = self.node(value)
        self.ops.append((kind, tuple(ins), out, info))
        return out

    def v(self, i: int) -> torch.Tensor:
        return self.values[i]

    # pass-through ops -------------------------------------------------------------------
    def reshape(self, h: int, shape) -> int:
        return self.op("reshape", [h], self.v(h).reshape(shape))

    def permute(self, h: int, dims) -> int:
        return self.op("permute", [h], self.v(h).permute(*dims), dims=tuple(dims))

    def transpose(self, h: int, d0: int, d1: int) -> int:
        return self.op("transpose", [h], self.v(h).transpose(d0, d1), d0=d0, d1=d1)

    def select(self, h: int, dim: int, index: int) -> int:
        return self.op("select", [h], self.v(h).select(dim, index), dim=dim, index=index)

    def identity(self, h: int) -> int:
        return self.op("identity", [h], self.v(h))

    def scale(self, h: int, c: float) -> int:
        return self.op("identity", [h], self.v(h) * c)   # relevance passes unchanged

    def cat_param_first(self, param: torch.Tensor, h: int, dim: int) -> int:
        """``cat([param, h], dim)``: the parameter's share of the relevance is dropped."""
        val = torch.cat([param.detach(), self.v(h)], dim)
        return self.op("cat_param_first", [h], val, dim=dim, skip=param.shape[dim])

    # kernel ops ---------------------------------------------------------------------------
    def add(self, a: int, b: int) -> int:
        return self.op("add", [a, b], self.v(a) + self.v(b))

    def add_param(self, h: int, p: torch.Tensor) -> int:
        return self.op("add_param", [h], self.v(h) + p.detach(), p=p.detach())

    def matmul(self, a: int, b: int) -> int:
        return self.op("matmul", [a, b], self.v(a) @ self.v(b))

    def softmax(self, h: int) -> int:
        return self.op("softmax", [h], torch.softmax(self.v(h), dim=-1))


def _activation_info(m: nn.Module) -> dict | None:
    if isinstance(m, nn.ReLU):
        return {"act": "relu"}
    if isinstance(m, nn.ReLU6):
        return {"act": "relu6"}
    if isinstance(m, nn.LeakyReLU):
        return {"act": "leaky_relu", "negative_slope": float(m.negative_slope)}
    if isinstance(m, nn.ELU):
        return {"act": "elu", "alpha": float(m.alpha)}
    if isinstance(m, nn.SiLU):
        return {"act": "silu"}
    if isinstance(m, nn.GELU):
        if m.approximate != "none":
            raise NotImplementedError("only the exact (erf) GELU is supported")
        return {"act": "gelu"}
    if isinstance(m, nn.Tanh):
        return {"act": "tanh"}
    if isinstance(m, nn.Sigmoid):
        return {"act": "sigmoid"}
    if isinstance(m, nn.Hardswish):
        return {"act": "hardswish"}
    return None


def _fw_module(tape: _Tape, h: int, m: nn.Module) -> int:
    """Record ``m`` applied to node ``h``; return the output node."""
    x = tape.v(h)
    name = type(m).__name__
    if isinstance(m, nn.Sequential):
        for child in m:
            h = _fw_module(tape, h, child)
        return h
    if name == "BasicBlock" and hasattr(m, "conv1") and hasattr(m, "downsample"):
        return _fw_basic_block(tape, h, m)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise NotImplementedError("only numeric zero padding is supported")
        val = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return tape.op("conv2d", [h], val, m=m)
    if isinstance(m, nn.Linear):
        return tape.op("linear", [h], F.linear(x, m.weight, m.bias), m=m)
    if isinstance(m, nn.BatchNorm2d):
        if m.training or m.running_mean is None:
            raise NotImplementedError("BatchNorm2d must be in eval mode with running stats")
        val = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        return tape.op("batchnorm2d", [h], val, m=m)
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            raise NotImplementedError("LayerNorm over the last dim only")
        val = F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        return tape.op("layernorm", [h], val, m=m)
    info = _activation_info(m)
    if info is not None:
        return tape.op("activation", [h], m(x), **info)
    if isinstance(m, nn.MaxPool2d):
        if m.ceil_mode or m.return_indices:
            raise NotImplementedError("MaxPool2d with ceil_mode / return_indices")
        return tape.op("maxpool2d", [h], m(x), m=m)
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode:
            raise NotImplementedError("AvgPool2d with ceil_mode")
        return tape.op("avgpool2d", [h], m(x), m=m)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return tape.op("adaptive_avgpool2d", [h], m(x))
    if isinstance(m, nn.Flatten):
        return tape.reshape(h, m(x).shape)
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return tape.identity(h)
    raise NotImplementedError(f"abslrp oracle: unsupported module {name}")


def _fw_basic_block(tape: _Tape, h: int, m: nn.Module) -> int:
    """srdxai.models.zoo.BasicBlock: act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut)."""
    out = _fw_module(tape, h, m.conv1)
    out = _fw_module(tape, out, m.bn1)
    out = _fw_module(tape, out, m.act1)
    out = _fw_module(tape, out, m.conv2)
    out = _fw_module(tape, out, m.bn2)
    shortcut = h if m.downsample is None else _fw_module(tape, h, m.downsample)
    s = tape.add(out, shortcut)
    return _fw_module(tape, s, m.act2)


def _fw_small_resnet(tape: _Tape, h: int, m: nn.Module) -> int:
    h = _fw_module(tape, h, m.conv1)
    h = _fw_module(tape, h, m.bn1)
    h = _fw_module(tape, h, m.act)
    for k in range(m.depth):
        h = _fw_basic_block(tape, h, getattr(m, f"layer{k + 1}"))
    h = _fw_module(tape, h, m.avgpool)
    h = tape.reshape(h, tape.v(h).flatten(1).shape)
    return _fw_module(tape, h, m.fc)


def _fw_small_vgg(tape: _Tape, h: int, m: nn.Module) -> int:
    h = _fw_module(tape, h, m.features)
    h = tape.reshape(h, tape.v(h).flatten(1).shape)
    return _fw_module(tape, h, m.classifier)


def _fw_attention(tape: _Tape, h: int, m: nn.Module) -> int:
    n, t, d = tape.v(h).shape
    heads = m.heads
    qkv = _fw_module(tape, h, m.qkv)
    qkv = tape.reshape(qkv, (n, t, 3, heads, d // heads))
    qkv = tape.permute(qkv, (2, 0, 3, 1, 4))
    q = tape.select(qkv, 0, 0)
    k = tape.select(qkv, 0, 1)
    v = tape.select(qkv, 0, 2)
    qs = tape.scale(q, m.scale)
    kt = tape.transpose(k, -2, -1)
    scores = tape.matmul(qs, kt)
    attn = tape.softmax(scores)
    o = tape.matmul(attn, v)
    o = tape.transpose(o, 1, 2)
    o = tape.reshape(o, (n, t, d))
    return _fw_module(tape, o, m.proj)


def _fw_vit(tape: _Tape, h: int, m: nn.Module) -> int:
    x = tape.v(h)
    if tuple(x.shape[-2:]) != (m.image_size, m.image_size):
        raise ValueError(f"ViT takes {m.image_size}x{m.image_size} inputs")
    n = x.shape[0]
    tok = _fw_module(tape, h, m.patch_embed.proj)                       # (N, D, h, w)
    tok = tape.reshape(tok, tape.v(tok).flatten(2).shape)              # (N, D, T)
    tok = tape.transpose(tok, 1, 2)                                    # (N, T, D)
    z = tape.cat_param_first(m.cls_token.expand(n, -1, -1), tok, 1)    # (N, T+1, D)
    z = tape.add_param(z, m.pos_embed)
    for blk in m.blocks:
        a = _fw_module(tape, z, blk.norm1)
        a = _fw_attention(tape, a, blk.attn)
        z = tape.add(z, a)
        b = _fw_module(tape, z, blk.norm2)
        b = _fw_module(tape, b, blk.mlp.fc1)
        b = _fw_module(tape, b, blk.mlp.act)
        b = _fw_module(tape, b, blk.mlp.fc2)
        z = tape.add(z, b)
    z = _fw_module(tape, z, m.norm)
    z = tape.select(z, 1, 0)
    return _fw_module(tape, z, m.head)


def _record(model: nn.Module, x: torch.Tensor) -> tuple[_Tape, int, int]:
    tape = _Tape()
    h_in = tape.node(x)
    names = {c.__name__ for c in type(model).__mro__}   # subclasses too (forward is checked)
    if "SmallResNet" in names:
        out = _fw_small_resnet(tape, h_in, model)
    elif "SmallVGG" in names:
        out = _fw_small_vgg(tape, h_in, model)
    elif "VisionTransformer" in names:
        out = _fw_vit(tape, h_in, model)
    else:
        out = _fw_module(tape, h_in, model)
    with torch.no_grad():
        expected = model(x)
    got = tape.v(out)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-9, atol=1e-10):
        raise AssertionError("abslrp oracle: the mirrored forward does not reproduce model(x)")
    return tape, h_in, out


def _backward_op(kind: str, xs: list[torch.Tensor], Ry: torch.Tensor, info: dict
                 ) -> list[torch.Tensor]:
    x = xs[0]
    if kind == "linear":
        m = info["m"]
        return [linear_kernel(x, m.weight, m.bias, Ry)]
    if kind == "conv2d":
        m = info["m"]
        return [conv2d_kernel(x, m.weight, m.bias, Ry, m.stride, m.padding, m.dilation,
                              m.groups)]
    if kind == "batchnorm2d":
        m = info["m"]
        return [batchnorm2d_kernel(x, m.weight, m.bias, m.running_mean, m.running_var, Ry,
                                   m.eps)]
    if kind == "layernorm":
        m = info["m"]
        return [layernorm_kernel(x, m.weight, m.bias, Ry, m.eps)]
    if kind == "activation":
        return [activation_kernel(x, Ry, info["act"], info.get("negative_slope", 0.01),
                                  info.get("alpha", 1.0))]
    if kind == "maxpool2d":
        m = info["m"]
        return [maxpool2d_kernel(x, Ry, m.kernel_size, m.stride, m.padding, m.dilation)]
    if kind == "avgpool2d":
        m = info["m"]
        return [avgpool2d_kernel(x, Ry, m.kernel_size, m.stride, m.padding,
                                 m.count_include_pad, m.divisor_override)]
    if kind == "adaptive_avgpool2d":
        return [adaptive_avgpool2d_kernel(x, Ry)]
    if kind == "softmax":
        return [softmax_kernel(x, Ry)]
    if kind == "add":
        return list(add_kernel(xs[0], xs[1], Ry))
    if kind == "add_param":
        return [param_add_kernel(x, info["p"], Ry)]
    if kind == "matmul":
        return list(matmul_kernel(xs[0], xs[1], Ry))
    # pass-through
    if kind == "identity":
        return [Ry]
    if kind == "reshape":
        return [Ry.reshape(x.shape)]
    if kind == "permute":
        dims = info["dims"]
        inverse = [0] * len(dims)
        for pos, d in enumerate(dims):
            inverse[d] = pos
        return [Ry.permute(*inverse)]
    if kind == "transpose":
        return [Ry.transpose(info["d0"], info["d1"])]
    if kind == "select":
        full = torch.zeros(x.shape, dtype=torch.float64)
        full.select(info["dim"], info["index"]).copy_(Ry)
        return [full]
    if kind == "cat_param_first":
        dim, skip = info["dim"], info["skip"]
        return [Ry.narrow(dim, skip, Ry.shape[dim] - skip)]
    raise AssertionError(kind)


def _backward(tape: _Tape, h_in: int, h_out: int, R_out: torch.Tensor) -> torch.Tensor:
    R: dict[int, torch.Tensor] = {h_out: R_out.detach().to(torch.float64)}
    for kind, ins, out, info in reversed(tape.ops):
        if out not in R:
            continue
        Ry = R.pop(out)
        rel = _backward_op(kind, [tape.v(i) for i in ins], Ry, info)
        for i, r in zip(ins, rel, strict=True):
            assert r.shape == tape.v(i).shape, (kind, r.shape, tape.v(i).shape)
            R[i] = R[i] + r if i in R else r
    return R.get(h_in, torch.zeros(tape.v(h_in).shape, dtype=torch.float64))


def _prepare(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    model = copy.deepcopy(model).to(torch.float64).eval()
    return model, x.detach().to(torch.float64)


def clrp_output_relevance(num_classes: int, target, n: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``R_pos = onehot(t)`` and ``R_neg = (1 - onehot(t)) / (C - 1)``, both ``(n, C)``."""
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    assert t.numel() == n
    R_pos = torch.zeros(n, num_classes, dtype=torch.float64)
    for s in range(n):
        R_pos[s, int(t[s])] = 1.0
    R_neg = (1.0 - R_pos) / (num_classes - 1)
    return R_pos, R_neg


def abslrp_propagate(model: nn.Module, x: torch.Tensor, R_out: torch.Tensor) -> torch.Tensor:
    """Propagate an arbitrary output relevance ``R_out`` (shape of ``model(x)``) to the input
    with the absLRP kernels (a copy of ``model`` in float64 eval mode is used)."""
    model, x = _prepare(model, x)
    tape, h_in, h_out = _record(model, x)
    assert R_out.shape == tape.v(h_out).shape
    return _backward(tape, h_in, h_out, R_out)


def abslrp_reference(model: nn.Module, x: torch.Tensor, target, contrastive: bool = True
                     ) -> torch.Tensor:
    """absLRP input relevance ``(N, C_in, H, W)`` for class ``target`` (int or per-sample).

    ``contrastive=True``: ``R_pos_input - R_neg_input`` (CLRP); else ``R_pos_input`` only.
    """
    model, x = _prepare(model, x)
    tape, h_in, h_out = _record(model, x)
    n, c = tape.v(h_out).shape
    R_pos, R_neg = clrp_output_relevance(c, target, n)
    r_pos = _backward(tape, h_in, h_out, R_pos)
    if not contrastive:
        return r_pos
    return r_pos - _backward(tape, h_in, h_out, R_neg)
