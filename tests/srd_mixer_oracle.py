"""Slow, independent reference ("oracle") of SRD (Sharing Ratio Decomposition) on token vectors
for token-mixing MLP architectures: tiny MLP-Mixer, ResMLP and gMLP models defined here.

Written from the definition only: nothing under ``srdxai/engine`` or ``srdxai/methods`` was read,
so this file cannot share a mistake with the implementation it checks. The only code reused is
the sharing rule :func:`srd_token_oracle.shares` (and its ``Stats`` / ``pass_relevance`` /
``layer_norm`` / ``linear`` helpers) of the token oracle (``tests/srd_token_oracle.py``), which is
written from the same definition and self-checked on its own. The forward pass is recomputed per
sample in float64 from the model's parameters (no hooks, no autograd), and the relevance is
pushed back with explicit Python loops over tokens, sources and pixels; only expressions on one
vector's own channels (a per-token Linear, a LayerNorm, a GELU) are vector expressions. Slow; use
the tiny models of this file (16 x 16 images, patch 4, 16 tokens, 8 channels).

Definition
----------
A pointwise feature vector (PFV) is one token's feature vector (its C channels; D channels for
the halves ``u`` / ``v`` of gMLP's gate and the vectors of its spatial projection; C channels for
the Ht hidden tokens of the Mixer's token MLP), and at the input one pixel's RGB vector.
Relevance is one number per PFV. For an operation's output vector ``y(t)`` built from sources
``s``::

    y(t)      = sum_s c_{s->t} + constant
    mu_{s->t} = <c_{s->t} + beta_{s->t}, y(t)> / ||y(t)||^2        (0 when y(t) = 0)
    R(s)      = sum_t mu_{s->t} R(t)

where the constant term (a bias) is split among the sources of ``y(t)`` in proportion to
``||c_{s->t}||`` (evenly if all those norms are 0). Per operation:

* head ``Linear(C, classes)``: ``R(logit vector)`` is the target logit; one source (the pooled
  vector), ``mu = 1``;
* token mean ``y = (1/T) sum_t x(t)``: sources ``x(t)``, ``c_t = x(t) / T``, no bias;
* LayerNorm, Affine (``alpha * x + beta``), GELU, layer scale (a per-channel multiply), a Linear
  on the channels of one token: one source, ``mu = 1`` (the relevance passes unchanged);
* residual ``y(t) = a(t) + b(t)``: two sources per token, ``c = a(t), b(t)``, no bias;
* token-mixing Linear (weight ``W`` (T_out x T_in), bias ``b``, applied along the token axis
  between two transposes): ``y(t) = sum_s W[t, s] x(s) + b[t] * ones``; the sources are the input
  token vectors, ``c_{s->t} = W[t, s] x(s)``, and the constant ``b[t] * ones`` is split by
  ``||c_{s->t}|| = |W[t, s]| ||x(s)||``. The Mixer's hidden tokens (between its two token
  Linears) are PFVs, and the GELU between them is one source per vector;
* gMLP's gate ``g(t) = u(t) * v(t)``: ``u`` is a gate, a constant weight; ``v(t)`` is the one
  source of ``g(t)`` (``mu = 1``), ``u``'s branch gets nothing; the split
  ``u, v = h.chunk(2, -1)`` gives ``R(h(t)) = R(u(t)) + R(v(t)) = R(v(t))``;
* patch embedding (``Conv2d(3, C, 4, stride=4)``): the sources of token ``t`` are the pixels
  ``p`` of its patch, ``c_{p->t} = W[:, :, i, j] x(p)`` (``(i, j)``: p's offset in the patch),
  the bias split by ``||c_{p->t}||``; token ``t`` is patch ``t`` in row-major order
  (``flatten(2).transpose(1, 2)``).

Every set of ratios sums to 1 wherever ``y(t) != 0``, so every cut through the network carries
exactly the target logit and the (N, H, W) pixel map sums to it (conservation).

Resolved choices: a one-source operation passes its relevance unchanged, also where its output
vector happens to be 0 (the brief's ``mu = 1``; with random parameters it never is); a
many-source operation (residual, token mean, token mixing, patch embedding) whose output vector
is 0 passes nothing (counted in ``lost``; never happens with these models either).

Public API
----------
:func:`srd_mixer_oracle` (the (N, H, W) map), :func:`srd_mixer_oracle_trace` (per sample:
logits, forward block outputs, relevance at every cut, the gate's halves),
:func:`oracle_mixer_logits` (the recomputed forward), :func:`token_mixing_shares` (the ratios of
one token-mixing output token, for hand checks), the models :class:`TinyMixer`,
:class:`TinyResMLP`, :class:`TinyGMLP` (with :class:`Affine`, :class:`Mlp`,
:class:`SpatialGatingUnit` and the blocks), and the builders :func:`tiny_mixer_model` /
:func:`tiny_mixer_input`. ``mutation=`` (one of :data:`MUTATIONS`)
computes the map under a deliberately wrong rule; it exists only for the mutation self-check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import srd_token_oracle as tok

__all__ = [
    "KINDS",
    "MUTATIONS",
    "Affine",
    "GMLPBlock",
    "MixerBlock",
    "Mlp",
    "ResMLPBlock",
    "SpatialGatingUnit",
    "TinyGMLP",
    "TinyMixer",
    "TinyResMLP",
    "oracle_mixer_logits",
    "srd_mixer_oracle",
    "srd_mixer_oracle_trace",
    "tiny_mixer_input",
    "tiny_mixer_model",
    "token_mixing_shares",
]

DT = torch.float64

IMAGE = 16     # image side
PATCH = 4      # patch side (stride = kernel)
TOKENS = (IMAGE // PATCH) ** 2
DIM = 8        # C
TOKEN_HIDDEN = 12   # Ht (Mixer's token MLP)
CHANNEL_HIDDEN = 16  # Hc (channel MLPs)
GATE_DIM = 8   # D (gMLP)
CLASSES = 5

KINDS = ("mixer", "resmlp", "gmlp")

#: Deliberately wrong rules (never the definition), for the mutation self-check; both conserve
#: the logit, so only a comparison of maps tells them apart: ``mixing_bias_even``: every
#: token-mixing Linear's bias split evenly over its sources instead of by ``||c_{s->t}||``;
#: ``gate_to_u``: gMLP's gate treated the other way round (``u`` the source, ``v`` the gate).
MUTATIONS = ("mixing_bias_even", "gate_to_u")


# --------------------------------------------------------------------------- the models


class Affine(nn.Module):
    """ResMLP's per-channel affine map ``alpha * x + beta`` (timm's ``Affine``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class Mlp(nn.Module):
    """``Linear(in, hidden) -> GELU -> Linear(hidden, in)`` on the last axis."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """MLP-Mixer block: a token MLP across the tokens, then a channel MLP, both pre-norm and
    residual."""

    def __init__(self, dim: int, tokens: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channel_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class ResMLPBlock(nn.Module):
    """ResMLP block: Affine, a single token-mixing Linear, layer scale; then Affine, channel
    MLP, layer scale; both residual."""

    def __init__(self, dim: int, tokens: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = Affine(dim)
        self.linear_tokens = nn.Linear(tokens, tokens)
        self.norm2 = Affine(dim)
        self.mlp_channels = Mlp(dim, channel_hidden)
        self.ls1 = nn.Parameter(torch.ones(dim))
        self.ls2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ls2 * self.mlp_channels(self.norm2(x))


class SpatialGatingUnit(nn.Module):
    """gMLP's spatial gating unit: ``u, v = h.chunk(2, -1)``, ``v`` normalised and mixed
    across the tokens by ``proj_t``, output ``u * v``."""

    def __init__(self, gate_dim: int, tokens: int) -> None:
        super().__init__()
        self.norm_v = nn.LayerNorm(gate_dim)
        self.proj_t = nn.Linear(tokens, tokens)

    def forward(self, h: Tensor) -> Tensor:
        u, v = h.chunk(2, dim=-1)
        v = self.norm_v(v)
        v = self.proj_t(v.transpose(-1, -2)).transpose(-1, -2)
        return u * v


class GMLPBlock(nn.Module):
    """gMLP block: ``x + proj_out(sgu(gelu(proj_in(norm(x)))))``."""

    def __init__(self, dim: int, tokens: int, gate_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * gate_dim)
        self.act = nn.GELU()
        self.sgu = SpatialGatingUnit(gate_dim, tokens)
        self.proj_out = nn.Linear(gate_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.sgu(self.act(self.proj_in(self.norm(x)))))


class _TinyTokenMLP(nn.Module):
    """Patch embedding, blocks, final norm, token mean, head (no class token)."""

    kind = ""

    def __init__(self, blocks: list[nn.Module], norm: nn.Module, dim: int, classes: int
                 ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


class TinyMixer(_TinyTokenMLP):
    """A tiny MLP-Mixer."""

    kind = "mixer"

    def __init__(self, depth: int = 2, dim: int = DIM, classes: int = CLASSES) -> None:
        super().__init__([MixerBlock(dim, TOKENS, TOKEN_HIDDEN, CHANNEL_HIDDEN)
                          for _ in range(depth)], nn.LayerNorm(dim), dim, classes)


class TinyResMLP(_TinyTokenMLP):
    """A tiny ResMLP."""

    kind = "resmlp"

    def __init__(self, depth: int = 2, dim: int = DIM, classes: int = CLASSES) -> None:
        super().__init__([ResMLPBlock(dim, TOKENS, CHANNEL_HIDDEN) for _ in range(depth)],
                         Affine(dim), dim, classes)


class TinyGMLP(_TinyTokenMLP):
    """A tiny gMLP."""

    kind = "gmlp"

    def __init__(self, depth: int = 2, dim: int = DIM, classes: int = CLASSES) -> None:
        super().__init__([GMLPBlock(dim, TOKENS, GATE_DIM) for _ in range(depth)],
                         nn.LayerNorm(dim), dim, classes)


_MODELS: dict[str, type[_TinyTokenMLP]] = {
    "mixer": TinyMixer, "resmlp": TinyResMLP, "gmlp": TinyGMLP}


def tiny_mixer_model(kind: str, seed: int = 0, depth: int = 2) -> _TinyTokenMLP:
    """A tiny float64 eval-mode model of ``kind`` ("mixer", "resmlp" or "gmlp") with every
    parameter drawn (seeded) at a scale where it matters: weights ~ N(0, 1/fan_in), biases and
    norm / Affine shifts ~ N(0, 0.5^2), norm / Affine gains ~ U(0.5, 1.5), layer scales
    ~ U(0.3, 0.7). No bias or affine parameter is left at 0 or 1."""
    if kind not in _MODELS:
        raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    torch.manual_seed(seed)
    model = _MODELS[kind](depth=depth).to(DT)
    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if leaf.startswith("ls"):
                p.uniform_(0.3, 0.7, generator=g)
            elif leaf == "alpha" or (leaf == "weight" and isinstance(owner, nn.LayerNorm)):
                p.uniform_(0.5, 1.5, generator=g)
            elif leaf == "weight":
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:  # biases, Affine beta
                p.normal_(0.0, 0.5, generator=g)
    return model.eval()


def tiny_mixer_input(seed: int = 0, n: int = 2) -> Tensor:
    """``n`` float64 images (n, 3, 16, 16), N(0, 1)."""
    return torch.randn(n, 3, IMAGE, IMAGE, dtype=DT,
                       generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- per-vector ops


def _d(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def _gelu(v: Tensor) -> Tensor:
    """Exact (erf) GELU, as ``nn.GELU()``, on one vector."""
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def _affine(aff: Affine, v: Tensor) -> Tensor:
    return _d(aff.alpha).reshape(-1) * v + _d(aff.beta).reshape(-1)


def _norm(module: nn.Module, v: Tensor) -> Tensor:
    if isinstance(module, nn.LayerNorm):
        return tok.layer_norm(module, v)
    if isinstance(module, Affine):
        return _affine(module, v)
    raise TypeError(f"unknown norm {type(module).__name__}")


def _channel_mlp(mlp: Mlp, v: Tensor) -> Tensor:
    return tok.linear(mlp.fc2, _gelu(tok.linear(mlp.fc1, v)))


def _mix(layer: nn.Linear, xs: list[Tensor]) -> list[Tensor]:
    """A Linear along the token axis: ``y(t) = sum_s W[t, s] x(s) + b[t]``, token by token."""
    w, b = _d(layer.weight), _d(layer.bias)
    out = []
    for t in range(w.shape[0]):
        y = b[t] * torch.ones_like(xs[0])
        for s in range(w.shape[1]):
            y = y + w[t, s] * xs[s]
        out.append(y)
    return out


# --------------------------------------------------------------------------- the token-mixing rule


def _even_bias_shares(y: Tensor, contributions: list[Tensor], bias: Tensor) -> list[float]:
    """The ``mixing_bias_even`` mutation: the bias split evenly, whatever the norms."""
    yy = float((y * y).sum())
    if yy == 0.0:
        return [0.0] * len(contributions)
    k = len(contributions)
    return [float(((c + bias / k) * y).sum()) / yy for c in contributions]


def token_mixing_shares(weight: Tensor, bias: Tensor | None, x_tokens: Tensor | Sequence[Tensor],
                        t: int, *, even_bias: bool = False) -> list[float]:
    """Sharing ratios ``mu_{s->t}`` (one per input token ``s``) of output token ``t`` of a
    token-mixing Linear with ``weight`` (T_out, T_in) and ``bias`` (T_out,) or None, on the
    input token vectors ``x_tokens`` ((T_in, C) or a list of (C,)).

    ``c_{s->t} = W[t, s] x(s)``; the constant ``b[t] * ones(C)`` is split by ``||c_{s->t}||``
    (evenly if all are 0; ``even_bias=True`` always evenly: the mutation, not the definition).
    """
    w = _d(weight)
    xs = [_d(v) for v in x_tokens]
    assert len(xs) == w.shape[1], "one input token per weight column"
    const = torch.zeros_like(xs[0]) if bias is None else float(_d(bias)[t]) * torch.ones_like(
        xs[0])
    contributions = [w[t, s] * xs[s] for s in range(w.shape[1])]
    y = const.clone()
    for c in contributions:
        y = y + c
    if even_bias:
        return _even_bias_shares(y, contributions, const)
    return tok.shares(y, contributions, [True] * len(contributions), const)


def _mix_backward(layer: nn.Linear, xs: list[Tensor], r_out: list[float], stats: tok.Stats,
                  even_bias: bool) -> list[float]:
    """``R(x(s)) = sum_t mu_{s->t} R(y(t))`` for a token-mixing Linear."""
    w, b = _d(layer.weight), _d(layer.bias)
    r_in = [0.0] * w.shape[1]
    for t in range(w.shape[0]):
        mu = token_mixing_shares(w, b, xs, t, even_bias=even_bias)
        for s, r in enumerate(tok.pass_relevance(mu, r_out[t], stats)):
            r_in[s] += r
    return r_in


def _residual_backward(x: list[Tensor], branch: list[Tensor], y: list[Tensor],
                       r_out: list[float], stats: tok.Stats) -> tuple[list[float], list[float]]:
    """``y(t) = x(t) + branch(t)``: two sources per token, no bias."""
    r_x, r_b = [], []
    for t in range(len(y)):
        mu = tok.shares(y[t], [x[t], branch[t]], [True, True])
        a, b = tok.pass_relevance(mu, r_out[t], stats)
        r_x.append(a)
        r_b.append(b)
    return r_x, r_b


# --------------------------------------------------------------------------- forward records


@dataclass
class _MixerRec:
    x: list[Tensor]       # block input per token (C,)
    n1: list[Tensor]      # norm1 output per token
    hid: list[Tensor]     # hidden tokens (Ht of them, (C,) each), before the GELU
    act: list[Tensor]     # after the GELU
    m: list[Tensor]       # token-MLP output per token
    x1: list[Tensor]      # after the first residual
    f: list[Tensor]       # channel-MLP output per token
    x2: list[Tensor]      # block output


@dataclass
class _ResRec:
    x: list[Tensor]
    a1: list[Tensor]      # norm1 (Affine) output
    lt: list[Tensor]      # linear_tokens output per token
    m: list[Tensor]       # ls1 * lt
    x1: list[Tensor]
    f: list[Tensor]       # ls2 * mlp_channels(norm2(x1))
    x2: list[Tensor]


@dataclass
class _GateRec:
    x: list[Tensor]
    h: list[Tensor]       # gelu(proj_in(norm(x))) per token (2D,)
    u: list[Tensor]       # first half (D,)
    v: list[Tensor]       # second half (D,)
    vn: list[Tensor]      # norm_v(v)
    vm: list[Tensor]      # proj_t along the tokens
    g: list[Tensor]       # u * vm
    o: list[Tensor]       # proj_out(g)
    x1: list[Tensor]      # block output


_Rec = _MixerRec | _ResRec | _GateRec


@dataclass
class _Forward:
    kind: str
    patch_contrib: list[list[Tensor]]        # per token: c_{p->t} of its pixels
    patch_pixels: list[list[tuple[int, int]]]  # (row, col) of those pixels
    embed: list[Tensor]                      # patch-embedding output per token (C,)
    blocks: list[_Rec] = field(default_factory=list)
    normed: list[Tensor] = field(default_factory=list)  # final norm output per token
    pooled: Tensor | None = None
    logits: Tensor | None = None


def _mixer_block(blk: MixerBlock, x: list[Tensor]) -> _MixerRec:
    n1 = [tok.layer_norm(blk.norm1, v) for v in x]
    hid = _mix(blk.mlp_tokens.fc1, n1)
    act = [_gelu(v) for v in hid]
    m = _mix(blk.mlp_tokens.fc2, act)
    x1 = [x[t] + m[t] for t in range(len(x))]
    f = [_channel_mlp(blk.mlp_channels, tok.layer_norm(blk.norm2, v)) for v in x1]
    x2 = [x1[t] + f[t] for t in range(len(x))]
    return _MixerRec(x, n1, hid, act, m, x1, f, x2)


def _resmlp_block(blk: ResMLPBlock, x: list[Tensor]) -> _ResRec:
    ls1, ls2 = _d(blk.ls1), _d(blk.ls2)
    a1 = [_affine(blk.norm1, v) for v in x]
    lt = _mix(blk.linear_tokens, a1)
    m = [ls1 * v for v in lt]
    x1 = [x[t] + m[t] for t in range(len(x))]
    f = [ls2 * _channel_mlp(blk.mlp_channels, _affine(blk.norm2, v)) for v in x1]
    x2 = [x1[t] + f[t] for t in range(len(x))]
    return _ResRec(x, a1, lt, m, x1, f, x2)


def _gmlp_block(blk: GMLPBlock, x: list[Tensor]) -> _GateRec:
    h = [_gelu(tok.linear(blk.proj_in, tok.layer_norm(blk.norm, v))) for v in x]
    d = h[0].shape[0] // 2
    u = [v[:d] for v in h]
    v = [w[d:] for w in h]
    vn = [tok.layer_norm(blk.sgu.norm_v, w) for w in v]
    vm = _mix(blk.sgu.proj_t, vn)
    g = [u[t] * vm[t] for t in range(len(x))]
    o = [tok.linear(blk.proj_out, w) for w in g]
    x1 = [x[t] + o[t] for t in range(len(x))]
    return _GateRec(x, h, u, v, vn, vm, g, o, x1)


def _block_output(rec: _Rec) -> list[Tensor]:
    return rec.x1 if isinstance(rec, _GateRec) else rec.x2


def _forward_sample(model: nn.Module, x: Tensor) -> _Forward:
    kind = getattr(model, "kind", "")
    if kind not in KINDS:
        raise TypeError(f"srd_mixer_oracle does not know {type(model).__name__}")
    conv = model.patch_embed
    w, b = _d(conv.weight), _d(conv.bias)
    p_sz = conv.kernel_size[0]
    assert conv.stride == conv.kernel_size and conv.padding == (0, 0)
    rows, cols = x.shape[-2] // p_sz, x.shape[-1] // p_sz

    contribs, pixels, embed = [], [], []
    for r in range(rows):          # token index t = r * cols + c (flatten(2), row-major)
        for c in range(cols):
            cs, px = [], []
            for i in range(p_sz):
                for j in range(p_sz):
                    hh, ww = r * p_sz + i, c * p_sz + j
                    cs.append(w[:, :, i, j] @ x[:, hh, ww])
                    px.append((hh, ww))
            e = b.clone()
            for v in cs:
                e = e + v
            contribs.append(cs)
            pixels.append(px)
            embed.append(e)
    fw = _Forward(kind, contribs, pixels, embed)

    tokens = embed
    for blk in model.blocks:
        if kind == "mixer":
            rec: _Rec = _mixer_block(blk, tokens)
        elif kind == "resmlp":
            rec = _resmlp_block(blk, tokens)
        else:
            rec = _gmlp_block(blk, tokens)
        fw.blocks.append(rec)
        tokens = _block_output(rec)

    fw.normed = [_norm(model.norm, v) for v in tokens]
    pooled = torch.zeros_like(fw.normed[0])
    for v in fw.normed:
        pooled = pooled + v / len(fw.normed)
    fw.pooled = pooled
    fw.logits = tok.linear(model.head, pooled)
    return fw


# --------------------------------------------------------------------------- relevance


def _block_backward(rec: _Rec, r_out: list[float], stats: tok.Stats, mutation: str | None,
                    blk: nn.Module, gate: list[dict] | None) -> list[float]:
    even = mutation == "mixing_bias_even"
    n_tok = len(rec.x)
    if isinstance(rec, _MixerRec):
        r_x1, r_f = _residual_backward(rec.x1, rec.f, rec.x2, r_out, stats)
        # channel MLP (fc2, GELU, fc1) and norm2: one source each
        r_x1 = [r_x1[t] + r_f[t] for t in range(n_tok)]
        r_x, r_m = _residual_backward(rec.x, rec.m, rec.x1, r_x1, stats)
        r_act = _mix_backward(blk.mlp_tokens.fc2, rec.act, r_m, stats, even)
        r_hid = list(r_act)  # GELU: one source per hidden token
        r_n1 = _mix_backward(blk.mlp_tokens.fc1, rec.n1, r_hid, stats, even)
        return [r_x[t] + r_n1[t] for t in range(n_tok)]  # norm1: one source
    if isinstance(rec, _ResRec):
        r_x1, r_f = _residual_backward(rec.x1, rec.f, rec.x2, r_out, stats)
        # ls2, channel MLP, Affine norm2: one source each
        r_x1 = [r_x1[t] + r_f[t] for t in range(n_tok)]
        r_x, r_m = _residual_backward(rec.x, rec.m, rec.x1, r_x1, stats)
        r_lt = list(r_m)  # ls1: one source
        r_a1 = _mix_backward(blk.linear_tokens, rec.a1, r_lt, stats, even)
        return [r_x[t] + r_a1[t] for t in range(n_tok)]  # Affine norm1: one source
    # gMLP
    r_x, r_o = _residual_backward(rec.x, rec.o, rec.x1, r_out, stats)
    r_g = list(r_o)  # proj_out: one source
    if mutation == "gate_to_u":
        r_u, r_vm = list(r_g), [0.0] * n_tok
    else:
        r_u, r_vm = [0.0] * n_tok, list(r_g)  # u is a constant weight, v the one source
    r_vn = _mix_backward(blk.sgu.proj_t, rec.vn, r_vm, stats, even)
    r_v = list(r_vn)  # norm_v: one source
    r_h = [r_u[t] + r_v[t] for t in range(n_tok)]  # chunk: both halves belong to h(t)
    if gate is not None:
        gate.insert(0, {"u": list(r_u), "v": list(r_v), "g": list(r_g)})
    # GELU, proj_in, norm: one source each
    return [r_x[t] + r_h[t] for t in range(n_tok)]


def _targets(target: int | Tensor | Sequence[int], n: int) -> list[int]:
    if isinstance(target, int):
        return [target] * n
    values = [int(v) for v in (target.reshape(-1).tolist() if isinstance(target, Tensor)
                               else target)]
    if len(values) == 1:
        return values * n
    assert len(values) == n, "one target per sample"
    return values


def srd_mixer_oracle_trace(model: nn.Module, x: Tensor, target: int | Tensor | Sequence[int],
                           *, mutation: str | None = None) -> list[dict]:
    """Per sample a dict: ``logits`` (classes,), ``pixel`` (H, W) map, ``blocks`` (each
    block's output tokens, a list of (C,)), ``stream`` (relevance per token at each block input,
    then at the final norm's input; ``stream[0]`` is the patch embedding's output), ``pooled``
    (the pooled vector's relevance), ``gate`` (gMLP: per block ``u``, ``v`` (relevance per token
    of h's two halves) and ``g`` (of the gate's output)), ``lost`` (|relevance| not passed on)."""
    if mutation is not None and mutation not in MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r}")
    x = x.detach().to(DT)
    targets = _targets(target, x.shape[0])
    out = []
    for n in range(x.shape[0]):
        fw = _forward_sample(model, x[n])
        stats = tok.Stats()
        n_tok = len(fw.normed)
        assert fw.logits is not None and fw.pooled is not None
        logit = float(fw.logits[targets[n]])
        # head: one source, the pooled vector takes the target logit (and the head's bias)
        r_pooled = logit
        # token mean: c_t = x(t) / T, no bias
        parts = [v / n_tok for v in fw.normed]
        r = tok.pass_relevance(tok.shares(fw.pooled, parts, [True] * n_tok), r_pooled, stats)
        # final norm: one source per token
        stream = [list(r)]
        gate: list[dict] = []
        for rec, blk in zip(reversed(fw.blocks), reversed(list(model.blocks)), strict=True):
            r = _block_backward(rec, r, stats, mutation, blk, gate)
            stream.insert(0, list(r))
        # patch embedding: pixels of the patch, bias split by ||c_{p->t}||
        pixel = torch.zeros(x.shape[-2], x.shape[-1], dtype=DT)
        bias = _d(model.patch_embed.bias)
        for t, r_t in enumerate(r):
            cs = fw.patch_contrib[t]
            mu = tok.shares(fw.embed[t], cs, [True] * len(cs), bias)
            for (hh, ww), r_p in zip(fw.patch_pixels[t], tok.pass_relevance(mu, r_t, stats),
                                     strict=True):
                pixel[hh, ww] += r_p
        out.append({"logits": fw.logits, "pixel": pixel,
                    "blocks": [_block_output(rec) for rec in fw.blocks], "stream": stream,
                    "pooled": r_pooled, "gate": gate, "lost": stats.lost})
    return out


def srd_mixer_oracle(model: nn.Module, x: Tensor, target: int | Tensor | Sequence[int], *,
                     mutation: str | None = None) -> Tensor:
    """SRD pixel map (N, H, W), float64, of the target logit (one class for all samples, or one
    per sample) for each sample of ``x``."""
    return torch.stack([s["pixel"] for s in
                        srd_mixer_oracle_trace(model, x, target, mutation=mutation)])


def oracle_mixer_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The oracle's own float64 forward, (N, classes)."""
    x = x.detach().to(DT)
    return torch.stack([_forward_sample(model, x[n]).logits for n in range(x.shape[0])])
