"""Slow, independent reference implementation ("oracle") of LRP on a small vision transformer.

Written from the rules' definitions only (never from ``srdxai.engine`` or ``srdxai.methods``),
so that the engine and this oracle cannot share a mistake. The oracle re-runs the model's
forward pass in its own code (linear layers as ``x @ W^T + b``, the convolution as an im2col
product, LayerNorm / softmax / GELU written out), keeps every intermediate tensor, and walks
backwards applying one elementary rule per op. Everything runs in the dtype of the input ``x``
(pass float64 for a reference; the parameters are cast, the model is never modified).

Rules (relevance form; ``R`` of a tensor has its shape)
-------------------------------------------------------
Stabiliser ``s(z) = z + eps * sign(z)`` with ``sign(0) = +1``; ``eps`` is ``epsilon`` for the
epsilon layer rule and ``stabilizer`` everywhere else.

* seed: ``R_logits = onehot(target) * logits``.
* dense / conv layer ``y = W x + b`` (``conv_rule`` for the patch embedding, ``dense_rule`` for
  qkv, proj, fc1, fc2 and the head):

  - ``epsilon``: ``R_x = x * J_W^T (R / s(y))`` (``y`` includes the bias);
  - ``zplus``: ``z = W+ x+ + b+ + W- x-``, ``g = R / s(z)``,
    ``R_x = x+ * J_{W+}^T g + x- * J_{W-}^T g``;
  - ``gamma``: ``W_p = W + gamma W+``, ``W_n = W + gamma W-`` (biases alike),
    ``R_p = R [y > 0]``, ``R_n = R [y < 0]``, ``z_p = W_p x+ + b_p + W_n x-``,
    ``z_n = W_n x+ + b_n + W_p x-``, ``g_p = R_p / s(z_p)``, ``g_n = R_n / s(z_n)``,
    ``R_x = x+ (J_{W_p}^T g_p + J_{W_n}^T g_n) + x- (J_{W_n}^T g_p + J_{W_p}^T g_n)``.
* LayerNorm with ``sigma`` frozen at its forward value (the mean is not frozen):
  ``R_x = x * J^T (R / s(y))``.
* softmax: ``R_x = x * J^T (R / s(y))`` with the true softmax Jacobian.
* product of two input-dependent tensors (``a @ b`` or ``a * b``), the uniform rule:
  ``R_a = 0.5 a J_a^T (R / s(y))``, ``R_b = 0.5 b J_b^T (R / s(y))``.
* residual sum ``y = a + b``: ``R_a = a R / s(y)``, ``R_b = b R / s(y)``.
* sum with a constant ``y = x + c`` (position embedding): ``R_x = x R / s(y)``.
* GELU and multiplication by a constant (``q * scale``): ``R_x = R``.
* mean over tokens: ``R_x = x * J^T (R / s(y))``.
* moves (reshape, permute, transpose, ``x[:, 0]``, ``torch.cat``) move the relevance with the
  values; the (constant) cls token's share at the concatenation is dropped.

AttnLRP (gradient form, :func:`reference_attnlrp`): ``g = onehot(target)`` at the logits, true
gradients through dense / conv layers, sums, the mean, scalings and moves, the gradient of the
frozen-sigma LayerNorm, the true softmax gradient, half of the true gradient for each operand of
a product of two input-dependent tensors, ``g_x = g_y * gelu(x) / x`` through GELU; the map is
``x * g`` at the input. Its per-op Jacobian-vector products are taken by ``torch.autograd`` on one
elementary op at a time (a route independent of the hand-written transposes of the relevance
walk). In the limit ``epsilon, stabilizer -> 0`` with ``conv_rule = dense_rule = "epsilon"``,
``R_y / y`` plays the role of ``g`` and both maps coincide.

Public API
----------
Model::

    TinyViT(num_classes=5, dim=16, num_heads=2, depth=2, img_size=16, patch_size=4,
            in_chans=3, pool="cls", cls_token=True, seed=0, noise=0.2)

Kernels (relevance form)::

    stabilize(z, eps)
    linear_rule(x, weight, bias, R, rule="epsilon", epsilon=1e-6, stabilizer=1e-6, gamma=0.25)
    conv2d_rule(x, weight, bias, R, rule="zplus", epsilon=1e-6, stabilizer=1e-6, gamma=0.25,
                stride=1, padding=0)
    layernorm_rule(x, weight, bias, R, ln_eps=1e-5, stabilizer=1e-6)
    softmax_rule(x, R, stabilizer=1e-6)                      # over the last dim
    matmul_rule(a, b, R, stabilizer=1e-6) -> (R_a, R_b)
    mul_rule(a, b, R, stabilizer=1e-6) -> (R_a, R_b)
    add_rule(a, b, R, stabilizer=1e-6) -> (R_a, R_b)
    add_const_rule(x, c, R, stabilizer=1e-6)
    mean_rule(x, R, dim, stabilizer=1e-6)

Model level::

    oracle_forward(model, x) -> dict of every intermediate ("logits" among them)
    reference_relevance(model, x, target, conv_rule="zplus", dense_rule="epsilon",
                        epsilon=1e-6, stabilizer=1e-6, gamma=0.25, return_trace=False)
    reference_attnlrp(model, x, target)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LAYER_RULES",
    "TinyViT",
    "stabilize",
    "linear_rule",
    "conv2d_rule",
    "layernorm_rule",
    "softmax_rule",
    "matmul_rule",
    "mul_rule",
    "add_rule",
    "add_const_rule",
    "mean_rule",
    "oracle_forward",
    "reference_relevance",
    "reference_attnlrp",
]

LAYER_RULES = ("epsilon", "zplus", "gamma")

Target = int | Sequence[int] | torch.Tensor


# ==============================================================================================
# Model
# ==============================================================================================


class Attention(nn.Module):
    """Multi-head self-attention, written out explicitly."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * self.scale) @ k.transpose(-2, -1)
        a = scores.softmax(-1)
        out = (a @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyViT(nn.Module):
    """A tiny ViT: 4x4 patches of a 16x16 image (16 tokens), cls token, 2 pre-norm blocks.

    ``pool="cls"`` classifies from ``x[:, 0]`` after the final LayerNorm, ``pool="mean"`` from
    ``x.mean(1)`` (all tokens, the cls token included when there is one). ``cls_token=False``
    drops the cls token (then ``pool`` must be ``"mean"``). The weights are drawn from
    ``seed`` (the global RNG is left untouched); every bias, the LayerNorm affine parameters,
    the cls token and the position embedding get non-trivial random values (scale ``noise``).
    The model is returned in eval mode.
    """

    def __init__(self, num_classes: int = 5, dim: int = 16, num_heads: int = 2, depth: int = 2,
                 img_size: int = 16, patch_size: int = 4, in_chans: int = 3,
                 pool: str = "cls", cls_token: bool = True, seed: int = 0, noise: float = 0.2):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {pool!r}")
        if pool == "cls" and not cls_token:
            raise ValueError("pool='cls' needs the cls token")
        self.pool = pool
        n_tokens = (img_size // patch_size) ** 2 + (1 if cls_token else 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
            self.pos = nn.Parameter(torch.zeros(1, n_tokens, dim))
            self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)
        gen = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.bias is not None:
                    mod.bias.add_(noise * torch.randn(mod.bias.shape, generator=gen))
                elif isinstance(mod, nn.LayerNorm):
                    mod.weight.add_(noise * torch.randn(mod.weight.shape, generator=gen))
                    mod.bias.add_(noise * torch.randn(mod.bias.shape, generator=gen))
            if self.cls_token is not None:
                self.cls_token.copy_(2.5 * noise * torch.randn(self.cls_token.shape,
                                                               generator=gen))
            self.pos.copy_(1.5 * noise * torch.randn(self.pos.shape, generator=gen))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)
        t = t.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.pos
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        t = t[:, 0] if self.pool == "cls" else t.mean(1)
        return self.head(t)


# ==============================================================================================
# Elementary rules (relevance form)
# ==============================================================================================


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``."""
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign


def _linear_fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.transpose(0, 1)
    return y if b is None else y + b


def _linear_T(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``J_W^T g`` of the bias-free map ``x -> x W^T``."""
    return g @ w


def _layer_rule(x: torch.Tensor, R: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, fwd: Callable, fwd_T: Callable, rule: str,
                epsilon: float, stabilizer: float, gamma: float) -> torch.Tensor:
    """One of the three layer rules for a linear map ``fwd(x, W, b)`` with transpose
    ``fwd_T(g, W)`` (of the bias-free map)."""
    if rule == "epsilon":
        y = fwd(x, weight, bias)
        return x * fwd_T(R / stabilize(y, epsilon), weight)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    if rule == "zplus":
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        bp = None if bias is None else bias.clamp(min=0)
        z = fwd(xp, wp, bp) + fwd(xn, wn, None)
        g = R / stabilize(z, stabilizer)
        return xp * fwd_T(g, wp) + xn * fwd_T(g, wn)
    if rule == "gamma":
        w_p = weight + gamma * weight.clamp(min=0)
        w_n = weight + gamma * weight.clamp(max=0)
        b_p = None if bias is None else bias + gamma * bias.clamp(min=0)
        b_n = None if bias is None else bias + gamma * bias.clamp(max=0)
        y = fwd(x, weight, bias)
        R_p = R * (y > 0).to(R.dtype)
        R_n = R * (y < 0).to(R.dtype)
        z_p = fwd(xp, w_p, b_p) + fwd(xn, w_n, None)
        z_n = fwd(xp, w_n, b_n) + fwd(xn, w_p, None)
        g_p = R_p / stabilize(z_p, stabilizer)
        g_n = R_n / stabilize(z_n, stabilizer)
        return (xp * (fwd_T(g_p, w_p) + fwd_T(g_n, w_n))
                + xn * (fwd_T(g_p, w_n) + fwd_T(g_n, w_p)))
    raise ValueError(f"unknown layer rule {rule!r}; expected one of {LAYER_RULES}")


def linear_rule(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                R: torch.Tensor, rule: str = "epsilon", epsilon: float = 1e-6,
                stabilizer: float = 1e-6, gamma: float = 0.25) -> torch.Tensor:
    """Layer rule for ``y = x W^T + b`` on the last dim of ``x`` (any leading dims)."""
    return _layer_rule(x, R, weight, bias, _linear_fwd, _linear_T, rule, epsilon, stabilizer,
                       gamma)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv2d_rule(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                R: torch.Tensor, rule: str = "zplus", epsilon: float = 1e-6,
                stabilizer: float = 1e-6, gamma: float = 0.25, stride=1, padding=0
                ) -> torch.Tensor:
    """Layer rule for a Conv2d (groups 1, dilation 1, zero padding), as an im2col product:
    ``y = W_mat @ cols(x) + b`` and ``J^T g = fold(W_mat^T @ g)``."""
    N, C, H, W = x.shape
    Co, Cw, kh, kw = weight.shape
    assert Cw == C, (x.shape, weight.shape)
    st, pd = _pair(stride), _pair(padding)
    Ho = (H + 2 * pd[0] - kh) // st[0] + 1
    Wo = (W + 2 * pd[1] - kw) // st[1] + 1

    def fwd(xx, ww, bb):
        cols = F.unfold(xx, (kh, kw), padding=pd, stride=st)          # (N, C*kh*kw, L)
        y = ww.reshape(Co, -1) @ cols                                  # (N, Co, L)
        if bb is not None:
            y = y + bb[:, None]
        return y.reshape(N, Co, Ho, Wo)

    def fwd_T(g, ww):
        cols = ww.reshape(Co, -1).transpose(0, 1) @ g.reshape(N, Co, Ho * Wo)
        return F.fold(cols, (H, W), (kh, kw), padding=pd, stride=st)

    return _layer_rule(x, R, weight, bias, fwd, fwd_T, rule, epsilon, stabilizer, gamma)


def _ln_parts(x: torch.Tensor, weight, bias, ln_eps: float):
    D = x.shape[-1]
    w = torch.ones(D, dtype=x.dtype) if weight is None else weight
    b = torch.zeros(D, dtype=x.dtype) if bias is None else bias
    mu = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + ln_eps)
    return w, b, mu, sigma


def _layernorm_fwd(x, weight, bias, ln_eps):
    w, b, mu, sigma = _ln_parts(x, weight, bias, ln_eps)
    return (x - mu) / sigma * w + b


def layernorm_rule(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   R: torch.Tensor, ln_eps: float = 1e-5, stabilizer: float = 1e-6
                   ) -> torch.Tensor:
    """LayerNorm over the last dim with sigma frozen: ``J^T v = c(v * w / sigma)`` where ``c``
    (centering, symmetric) subtracts the mean over the last dim."""
    w, b, mu, sigma = _ln_parts(x, weight, bias, ln_eps)
    y = (x - mu) / sigma * w + b
    u = R / stabilize(y, stabilizer) * w / sigma
    return x * (u - u.mean(-1, keepdim=True))


def _softmax_fwd(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def softmax_rule(x: torch.Tensor, R: torch.Tensor, stabilizer: float = 1e-6) -> torch.Tensor:
    """Softmax over the last dim: ``J = diag(y) - y y^T`` (symmetric), so
    ``J^T v = y * (v - <y, v>)``."""
    y = _softmax_fwd(x)
    v = R / stabilize(y, stabilizer)
    return x * y * (v - (y * v).sum(-1, keepdim=True))


def matmul_rule(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor, stabilizer: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform rule for ``y = a @ b`` (same batch dims): ``J_a^T v = v b^T``,
    ``J_b^T v = a^T v``."""
    y = a @ b
    v = R / stabilize(y, stabilizer)
    return 0.5 * a * (v @ b.transpose(-2, -1)), 0.5 * b * (a.transpose(-2, -1) @ v)


def mul_rule(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor, stabilizer: float = 1e-6
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform rule for the elementwise ``y = a * b`` (same shapes)."""
    assert a.shape == b.shape == R.shape, (a.shape, b.shape, R.shape)
    y = a * b
    v = R / stabilize(y, stabilizer)
    return 0.5 * a * (b * v), 0.5 * b * (a * v)


def add_rule(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor, stabilizer: float = 1e-6
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of two input-dependent tensors of the same shape."""
    assert a.shape == b.shape == R.shape, (a.shape, b.shape, R.shape)
    v = R / stabilize(a + b, stabilizer)
    return a * v, b * v


def add_const_rule(x: torch.Tensor, c: torch.Tensor, R: torch.Tensor, stabilizer: float = 1e-6
                   ) -> torch.Tensor:
    """``y = x + c`` with ``c`` constant (broadcast onto ``x``): the constant keeps its share."""
    y = x + c
    assert y.shape == x.shape, (x.shape, c.shape)
    return x * R / stabilize(y, stabilizer)


def mean_rule(x: torch.Tensor, R: torch.Tensor, dim: int, stabilizer: float = 1e-6
              ) -> torch.Tensor:
    """``y = x.mean(dim)``: ``J^T v`` spreads ``v / n`` over the reduced dim."""
    y = x.mean(dim)
    v = R / stabilize(y, stabilizer)
    return x * v.unsqueeze(dim) / x.shape[dim]


# ==============================================================================================
# Forward pass, by hand
# ==============================================================================================


def _gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    raise ValueError(approximate)


def _p(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype=dtype).clone()


def _check_model(model: nn.Module) -> None:
    conv = model.patch_embed
    if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and _pair(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)):
        raise TypeError("patch_embed must be a plain Conv2d")
    for blk in model.blocks:
        if not isinstance(blk.mlp.act, nn.GELU):
            raise TypeError("the MLP activation must be nn.GELU")


def oracle_forward(model: nn.Module, x: torch.Tensor) -> dict:
    """Re-run ``model`` (a :class:`TinyViT` or a structural twin) by hand in ``x.dtype``.

    Returns a dict with the parameters used (``"params"``) and every intermediate tensor:
    ``input, conv_out, tokens, x_cat, x0, blocks (list of dicts), x_last, xn, pooled, logits``.
    """
    _check_model(model)
    dt = x.dtype
    x = x.detach()
    B = x.shape[0]
    tr: dict = {"input": x, "dtype": dt}
    conv = model.patch_embed
    cw, cb = _p(conv.weight, dt), _p(conv.bias, dt)
    Co, _, kh, kw = cw.shape
    st, pd = _pair(conv.stride), _pair(conv.padding)
    H, W = x.shape[-2:]
    Ho = (H + 2 * pd[0] - kh) // st[0] + 1
    Wo = (W + 2 * pd[1] - kw) // st[1] + 1
    cols = F.unfold(x, (kh, kw), padding=pd, stride=st)
    conv_out = cw.reshape(Co, -1) @ cols
    if cb is not None:
        conv_out = conv_out + cb[:, None]
    conv_out = conv_out.reshape(B, Co, Ho, Wo)
    tr.update(conv_w=cw, conv_b=cb, conv_stride=st, conv_padding=pd, conv_out=conv_out)
    tokens = conv_out.flatten(2).transpose(1, 2)                 # (B, T, D)
    tr["tokens"] = tokens
    has_cls = getattr(model, "cls_token", None) is not None
    tr["has_cls"] = has_cls
    if has_cls:
        cls = _p(model.cls_token, dt).expand(B, -1, -1)
        x_cat = torch.cat([cls, tokens], dim=1)
    else:
        x_cat = tokens
    tr["x_cat"] = x_cat
    pos = _p(model.pos, dt)
    tr["pos"] = pos
    t = x_cat + pos
    tr["x0"] = t
    blocks = []
    for blk in model.blocks:
        rec: dict = {"x_in": t}
        ln1, attn, ln2, mlp = blk.ln1, blk.attn, blk.ln2, blk.mlp
        rec["ln1"] = (_p(ln1.weight, dt), _p(ln1.bias, dt), float(ln1.eps))
        h1 = _layernorm_fwd(t, *rec["ln1"])
        rec["h1"] = h1
        rec["qkv_p"] = (_p(attn.qkv.weight, dt), _p(attn.qkv.bias, dt))
        qkv = _linear_fwd(h1, *rec["qkv_p"])
        Bq, T, D3 = qkv.shape
        D = D3 // 3
        nh = int(attn.num_heads)
        hd = D // nh
        rec.update(qkv=qkv, T=T, D=D, nh=nh, hd=hd, scale=float(attn.scale))
        q5 = qkv.reshape(Bq, T, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = q5[0], q5[1], q5[2]
        qs = q * rec["scale"]
        kT = k.transpose(-2, -1)
        scores = qs @ kT
        a = _softmax_fwd(scores)
        ctx = a @ v
        merged = ctx.transpose(1, 2).reshape(Bq, T, D)
        rec.update(q=q, k=k, v=v, qs=qs, kT=kT, scores=scores, attn=a, ctx=ctx, merged=merged)
        rec["proj_p"] = (_p(attn.proj.weight, dt), _p(attn.proj.bias, dt))
        o = _linear_fwd(merged, *rec["proj_p"])
        x_mid = t + o
        rec.update(o=o, x_mid=x_mid)
        rec["ln2"] = (_p(ln2.weight, dt), _p(ln2.bias, dt), float(ln2.eps))
        h2 = _layernorm_fwd(x_mid, *rec["ln2"])
        rec["fc1_p"] = (_p(mlp.fc1.weight, dt), _p(mlp.fc1.bias, dt))
        f1 = _linear_fwd(h2, *rec["fc1_p"])
        rec["gelu_approx"] = mlp.act.approximate
        f2 = _gelu(f1, rec["gelu_approx"])
        rec["fc2_p"] = (_p(mlp.fc2.weight, dt), _p(mlp.fc2.bias, dt))
        m = _linear_fwd(f2, *rec["fc2_p"])
        t = x_mid + m
        rec.update(h2=h2, f1=f1, f2=f2, m=m, x_out=t)
        blocks.append(rec)
    tr["blocks"] = blocks
    tr["x_last"] = t
    nrm = model.norm
    tr["norm"] = (_p(nrm.weight, dt), _p(nrm.bias, dt), float(nrm.eps))
    xn = _layernorm_fwd(t, *tr["norm"])
    tr["xn"] = xn
    pool = model.pool
    if pool == "cls":
        assert has_cls
        pooled = xn[:, 0]
    elif pool == "mean":
        pooled = xn.mean(1)
    else:
        raise ValueError(pool)
    tr["pool"] = pool
    tr["pooled"] = pooled
    tr["head_p"] = (_p(model.head.weight, dt), _p(model.head.bias, dt))
    tr["logits"] = _linear_fwd(pooled, *tr["head_p"])
    return tr


def _targets(target: Target, n: int) -> torch.Tensor:
    if isinstance(target, numbers.Integral):
        t = torch.full((n,), int(target), dtype=torch.long)
    else:
        t = torch.as_tensor(target).to(torch.long).reshape(-1)
        if t.numel() == 1 and n > 1:
            t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"target must be one class per sample ({n}), got shape {tuple(t.shape)}")
    return t


def _onehot(target: Target, logits: torch.Tensor) -> torch.Tensor:
    t = _targets(target, logits.shape[0])
    return F.one_hot(t, logits.shape[1]).to(logits.dtype)


# ==============================================================================================
# Relevance walk
# ==============================================================================================


def reference_relevance(model: nn.Module, x: torch.Tensor, target: Target,
                        conv_rule: str = "zplus", dense_rule: str = "epsilon",
                        epsilon: float = 1e-6, stabilizer: float = 1e-6, gamma: float = 0.25,
                        return_trace: bool = False):
    """Input relevance ``(N, C, H, W)`` (dtype of ``x``) of ``target`` by the rules of the
    module docstring. With ``return_trace=True`` also returns a dict of the relevance at the
    named intermediate tensors (``"logits"``, ``"pooled"``, ``"xn"``, ``"x_last"``,
    ``"blocks.{i}.{name}"``, ``"x0"``, ``"x_cat"``, ``"tokens"``, ``"conv_out"``, ``"input"``).
    """
    for r in (conv_rule, dense_rule):
        if r not in LAYER_RULES:
            raise ValueError(f"unknown layer rule {r!r}; expected one of {LAYER_RULES}")
    tr = oracle_forward(model, x)
    st = stabilizer
    rel: dict = {}

    def dense(inp, params, R):
        w, b = params
        return linear_rule(inp, w, b, R, rule=dense_rule, epsilon=epsilon, stabilizer=st,
                           gamma=gamma)

    # seed and head
    logits = tr["logits"]
    R = _onehot(target, logits) * logits
    rel["logits"] = R
    R = dense(tr["pooled"], tr["head_p"], R)
    rel["pooled"] = R
    xn = tr["xn"]
    if tr["pool"] == "cls":
        R_xn = torch.zeros_like(xn)
        R_xn[:, 0] = R
    else:
        R_xn = mean_rule(xn, R, 1, st)
    rel["xn"] = R_xn
    R = layernorm_rule(tr["x_last"], tr["norm"][0], tr["norm"][1], R_xn, tr["norm"][2], st)
    rel["x_last"] = R

    for i in range(len(tr["blocks"]) - 1, -1, -1):
        rec = tr["blocks"][i]
        pre = f"blocks.{i}."
        rel[pre + "x_out"] = R
        # x_out = x_mid + m
        R_mid_res, R_m = add_rule(rec["x_mid"], rec["m"], R, st)
        rel[pre + "m"] = R_m
        R_f2 = dense(rec["f2"], rec["fc2_p"], R_m)
        rel[pre + "f2"] = R_f2
        R_f1 = R_f2                                            # GELU: identity
        rel[pre + "f1"] = R_f1
        R_h2 = dense(rec["h2"], rec["fc1_p"], R_f1)
        rel[pre + "h2"] = R_h2
        w, b, e = rec["ln2"]
        R_mid = R_mid_res + layernorm_rule(rec["x_mid"], w, b, R_h2, e, st)
        rel[pre + "x_mid"] = R_mid
        # x_mid = x_in + o
        R_in_res, R_o = add_rule(rec["x_in"], rec["o"], R_mid, st)
        rel[pre + "o"] = R_o
        R_merged = dense(rec["merged"], rec["proj_p"], R_o)
        rel[pre + "merged"] = R_merged
        Bq, T, D, nh, hd = R_merged.shape[0], rec["T"], rec["D"], rec["nh"], rec["hd"]
        R_ctx = R_merged.reshape(Bq, T, nh, hd).transpose(1, 2)
        rel[pre + "ctx"] = R_ctx
        R_attn, R_v = matmul_rule(rec["attn"], rec["v"], R_ctx, st)
        rel[pre + "attn"] = R_attn
        R_scores = softmax_rule(rec["scores"], R_attn, st)
        rel[pre + "scores"] = R_scores
        R_qs, R_kT = matmul_rule(rec["qs"], rec["kT"], R_scores, st)
        R_q = R_qs                                             # constant scale: identity
        R_k = R_kT.transpose(-2, -1)
        rel[pre + "q"], rel[pre + "k"], rel[pre + "v"] = R_q, R_k, R_v
        # inverse of reshape(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)
        R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(Bq, T, 3 * D)
        rel[pre + "qkv"] = R_qkv
        R_h1 = dense(rec["h1"], rec["qkv_p"], R_qkv)
        rel[pre + "h1"] = R_h1
        w, b, e = rec["ln1"]
        R = R_in_res + layernorm_rule(rec["x_in"], w, b, R_h1, e, st)
        rel[pre + "x_in"] = R

    rel["x0"] = R
    R = add_const_rule(tr["x_cat"], tr["pos"], R, st)
    rel["x_cat"] = R
    R_tok = R[:, 1:] if tr["has_cls"] else R                  # the cls token's share is dropped
    rel["tokens"] = R_tok
    Bc, Co, Ho, Wo = tr["conv_out"].shape
    R_conv = R_tok.transpose(1, 2).reshape(Bc, Co, Ho, Wo)
    rel["conv_out"] = R_conv
    R_in = conv2d_rule(tr["input"], tr["conv_w"], tr["conv_b"], R_conv, rule=conv_rule,
                       epsilon=epsilon, stabilizer=st, gamma=gamma, stride=tr["conv_stride"],
                       padding=tr["conv_padding"])
    rel["input"] = R_in
    return (R_in, rel) if return_trace else R_in


# ==============================================================================================
# AttnLRP, gradient form (one autograd VJP per elementary op)
# ==============================================================================================


def _vjp(fn: Callable, inputs: Sequence[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        out = fn(*ins)
        grads = torch.autograd.grad(out, ins, g, allow_unused=True)
    return [torch.zeros_like(i) if gr is None else gr.detach()
            for i, gr in zip(ins, grads, strict=True)]


def _ln_frozen_vjp(x, params, g):
    w, b, e = params
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + e).detach()
    return _vjp(lambda t: (t - t.mean(-1, keepdim=True)) / sigma * w + b, [x], g)[0]


def _gelu_ratio(x: torch.Tensor, approximate: str) -> torch.Tensor:
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.full_like(x, 0.5), F.gelu(safe, approximate=approximate)
                       / safe)


def reference_attnlrp(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """AttnLRP map ``x * g`` (``(N, C, H, W)``, dtype of ``x``) in its gradient form."""
    tr = oracle_forward(model, x)
    logits = tr["logits"]
    g = _onehot(target, logits)
    hw, hb = tr["head_p"]
    g = _vjp(lambda p: F.linear(p, hw, hb), [tr["pooled"]], g)[0]
    if tr["pool"] == "cls":
        g = _vjp(lambda t: t[:, 0], [tr["xn"]], g)[0]
    else:
        g = _vjp(lambda t: t.mean(1), [tr["xn"]], g)[0]
    g = _ln_frozen_vjp(tr["x_last"], tr["norm"], g)

    for rec in reversed(tr["blocks"]):
        g_mid = g                                   # x_out = x_mid + m: true gradient
        g_m = g
        w2, b2 = rec["fc2_p"]
        g_f2 = _vjp(lambda t, w2=w2, b2=b2: F.linear(t, w2, b2), [rec["f2"]], g_m)[0]
        g_f1 = g_f2 * _gelu_ratio(rec["f1"], rec["gelu_approx"])
        w1, b1 = rec["fc1_p"]
        g_h2 = _vjp(lambda t, w1=w1, b1=b1: F.linear(t, w1, b1), [rec["h2"]], g_f1)[0]
        g_mid = g_mid + _ln_frozen_vjp(rec["x_mid"], rec["ln2"], g_h2)
        g_in = g_mid                                # x_mid = x_in + o
        wp, bp = rec["proj_p"]
        g_merged = _vjp(lambda t, wp=wp, bp=bp: F.linear(t, wp, bp), [rec["merged"]], g_mid)[0]
        Bq, T, D = rec["merged"].shape
        g_ctx = _vjp(lambda t, Bq=Bq, T=T, D=D: t.transpose(1, 2).reshape(Bq, T, D),
                     [rec["ctx"]], g_merged)[0]
        g_a, g_v = _vjp(torch.matmul, [rec["attn"], rec["v"]], g_ctx)
        g_a, g_v = 0.5 * g_a, 0.5 * g_v
        g_scores = _vjp(lambda s: torch.softmax(s, dim=-1), [rec["scores"]], g_a)[0]
        g_qs, g_kT = _vjp(torch.matmul, [rec["qs"], rec["kT"]], g_scores)
        g_qs, g_kT = 0.5 * g_qs, 0.5 * g_kT
        sc = rec["scale"]
        g_q = _vjp(lambda t, sc=sc: t * sc, [rec["q"]], g_qs)[0]
        g_k = _vjp(lambda t: t.transpose(-2, -1), [rec["k"]], g_kT)[0]
        nh, hd = rec["nh"], rec["hd"]

        def split(t, Bq=Bq, T=T, nh=nh, hd=hd):
            s = t.reshape(Bq, T, 3, nh, hd).permute(2, 0, 3, 1, 4)
            return s[0], s[1], s[2]

        with torch.enable_grad():
            qkv_leaf = rec["qkv"].detach().clone().requires_grad_(True)
            q_, k_, v_ = split(qkv_leaf)
            g_qkv = torch.autograd.grad((q_, k_, v_), qkv_leaf, (g_q, g_k, g_v))[0].detach()
        wq, bq = rec["qkv_p"]
        g_h1 = _vjp(lambda t, wq=wq, bq=bq: F.linear(t, wq, bq), [rec["h1"]], g_qkv)[0]
        g = g_in + _ln_frozen_vjp(rec["x_in"], rec["ln1"], g_h1)

    # x0 = x_cat + pos: true gradient; drop the cls token's gradient
    g_tok = g[:, 1:] if tr["has_cls"] else g
    g_conv = _vjp(lambda t: t.flatten(2).transpose(1, 2), [tr["conv_out"]], g_tok)[0]
    cw, cb = tr["conv_w"], tr["conv_b"]
    g_in = _vjp(lambda t: F.conv2d(t, cw, cb, stride=tr["conv_stride"],
                                   padding=tr["conv_padding"]), [tr["input"]], g_conv)[0]
    return tr["input"] * g_in
