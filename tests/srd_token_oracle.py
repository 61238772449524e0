"""Slow, independent reference ("oracle") of SRD (Sharing Ratio Decomposition) on token vectors
for srdxai's :class:`~srdxai.models.zoo.VisionTransformer` and two variants defined here.

Written from the definition only: nothing under ``srdxai/engine`` or ``srdxai/methods`` was read,
so this file cannot share a mistake with the implementation it checks. The forward pass is
recomputed per sample in float64 from the model's parameters (no hooks), and the relevance is
pushed back with explicit Python loops over tokens, heads, sources and pixels; only sums over one
vector's own channels are vector expressions. Use tiny models (16 x 16 images, patch 8).

Definition
----------
A pointwise feature vector (PFV) is a token's feature vector (last dim), inside attention one
head's vector (per head and token), and at the input one pixel's RGB vector; relevance is one
number per PFV. For an operation's output vector ``y(t)`` built from sources ``s``::

    y(t)      = sum_s c_{s->t} + constant
    mu_{s->t} = <c_{s->t} + beta_{s->t}, y(t)> / ||y(t)||^2        (0 when y(t) = 0)
    R(s)      = sum_t mu_{s->t} R(t)

``constant`` is the bias plus the contributions of sources that do not depend on the image; it is
split among the image-dependent sources of ``y(t)`` in proportion to ``||c_{s->t}||`` (evenly if
all those norms are 0), so the shares of the image-dependent sources sum to 1 and a source that
does not depend on the image receives nothing. Per operation:

* Linear, LayerNorm, activation, ``+ pos_embed``, ``q * scale``: one source, ``mu = 1``.
* residual ``y = a + b``: two sources per token (constant-term rule for a parameter row).
* attention, per head: ``o_h(t) = sum_s A_h(t, s) v_h(s)``; sources ``v_h(s)``, ``A`` are
  weights (queries, keys and the softmax get nothing).
* concatenation of the heads before ``proj``: ``mu_h = ||o_h(t)||^2 / ||o(t)||^2``; the qkv
  output of a token gets what reached its v parts, summed over heads.
* token mean (:class:`TokenMeanViT`): ``c_t = x(t) / T``.
* head: the target logit is the explained quantity; :class:`DistilledViT` gives ``a_k / 2`` to
  the class token and ``b_k / 2`` to the distillation token.
* patch embedding: ``c_{p->t} = W[:, :, i, j] x(p)`` for the pixels of the patch, bias split by
  ``||c_{p->t}||``.

Prefix tokens (class, distillation) are parameters; with the constant-term rule they receive
exactly nothing, so the pixel map sums to the target logit (conservation).

Public API
----------
:func:`srd_token_oracle` (the (N, H, W) map), :func:`srd_token_oracle_trace` (per-sample
intermediates and relevances), :func:`oracle_logits` (the recomputed forward), :func:`shares`
(the sharing-ratio rule, for hand checks), the variants :class:`TokenMeanViT` and
:class:`DistilledViT`, and :func:`tiny_token_vit` / :func:`tiny_input` to build test cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from srdxai.models.zoo import VisionTransformer

__all__ = [
    "DistilledViT",
    "TokenMeanViT",
    "VARIANTS",
    "oracle_logits",
    "shares",
    "srd_token_oracle",
    "srd_token_oracle_trace",
    "tiny_input",
    "tiny_token_vit",
]

DT = torch.float64


# --------------------------------------------------------------------------- model variants


class TokenMeanViT(VisionTransformer):
    """No class token: the head reads the mean over all tokens after the final LayerNorm."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        dim = self.pos_embed.shape[-1]
        tokens = (self.image_size // self.patch) ** 2
        del self.cls_token  # no prefix token at all, so nothing may look one up
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


class DistilledViT(VisionTransformer):
    """DeiT-distilled layout: class and distillation tokens in front, ``head`` on token 0 and
    ``head_dist`` on token 1, output the mean of the two heads (DeiT's eval-mode output)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        dim = self.pos_embed.shape[-1]
        tokens = (self.image_size // self.patch) ** 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 2, dim) * 0.02)
        self.head_dist = nn.Linear(dim, self.head.out_features)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x)
        n = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1),
                       tokens], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


VARIANTS: dict[str, type[VisionTransformer]] = {
    "vit": VisionTransformer, "mean": TokenMeanViT, "distilled": DistilledViT}


def tiny_token_vit(variant: str = "vit", activation: str = "gelu", seed: int = 0, *,
                   dim: int = 8, depth: int = 2, heads: int = 2, num_classes: int = 5,
                   image_size: int = 16, patch: int = 8, dtype: torch.dtype = DT
                   ) -> VisionTransformer:
    """A tiny model of ``variant`` with every parameter drawn at a scale where it matters.

    The default init leaves the class token, position embedding and biases near 0 and
    LayerNorm at identity, which would hide mistakes in the constant-term and bias rules.
    """
    torch.manual_seed(seed)
    model = VARIANTS[variant](image_size=image_size, patch=patch, num_classes=num_classes,
                              dim=dim, depth=depth, heads=heads, mlp_ratio=2.0,
                              activation=activation)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name == "norm.weight":
                p.uniform_(0.5, 1.5, generator=g)
            elif p.dim() >= 2 and not name.endswith(("_token", "pos_embed")):
                # weights: roughly unit gain so activations neither vanish nor explode
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.normal_(0.0, 0.5, generator=g)
    return model.to(dtype).eval()


def tiny_input(seed: int = 0, n: int = 2, image_size: int = 16, dtype: torch.dtype = DT
               ) -> Tensor:
    return torch.randn(n, 3, image_size, image_size, dtype=dtype,
                       generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the sharing rule


def shares(y: Tensor, contributions: list[Tensor], dependent: list[bool],
           bias: Tensor | None = None, *, check: bool = True) -> list[float]:
    """Sharing ratios ``mu_s`` of one output vector ``y = sum_s contributions[s] + bias``.

    Sources with ``dependent[s]`` False do not depend on the image: their contribution joins
    the bias as the constant term, and they get ``mu = 0``. The constant term is split among the
    dependent sources in proportion to ``||c_s||`` (evenly if all are 0). A zero ``y`` passes
    nothing; so does a ``y`` without dependent sources (it is a constant).
    """
    if check:
        # the decomposition must be complete, else the ratios cannot sum to 1
        total = torch.zeros_like(y) if bias is None else bias.clone()
        for c in contributions:
            total = total + c
        scale = max(1.0, float(y.abs().max()))
        assert float((total - y).abs().max()) <= 1e-9 * scale, "incomplete decomposition"
    yy = float((y * y).sum())
    dep = [i for i, d in enumerate(dependent) if d]
    mu = [0.0] * len(contributions)
    if yy == 0.0 or not dep:
        return mu
    const = torch.zeros_like(y) if bias is None else bias.clone()
    for i, c in enumerate(contributions):
        if not dependent[i]:
            const = const + c
    norms = [float(contributions[i].norm()) for i in dep]
    norm_sum = sum(norms)
    for i, n in zip(dep, norms, strict=True):
        frac = n / norm_sum if norm_sum > 0 else 1.0 / len(dep)
        beta = const * frac
        mu[i] = float(((contributions[i] + beta) * y).sum()) / yy
    return mu


# --------------------------------------------------------------------------- forward (per sample)


def _d(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def linear(layer: nn.Linear, v: Tensor) -> Tensor:
    return _d(layer.weight) @ v + _d(layer.bias)


def layer_norm(ln: nn.LayerNorm, v: Tensor) -> Tensor:
    mean = v.mean()
    var = ((v - mean) ** 2).mean()  # biased variance, as LayerNorm uses
    return (v - mean) / math.sqrt(float(var) + ln.eps) * _d(ln.weight) + _d(ln.bias)


def _kind(model: nn.Module) -> str:
    # subclasses first: both variants are VisionTransformers too
    if isinstance(model, TokenMeanViT):
        return "mean"
    if isinstance(model, DistilledViT):
        return "distilled"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise TypeError(f"srd_token_oracle does not know {type(model).__name__}")


@dataclass
class _BlockRec:
    x: list[Tensor]              # block input per token (D,)
    dep_x: list[bool]            # whether x(t) depends on the image
    v: list[list[Tensor]]        # v[h][t] (dh,)
    attn: list[list[list[float]]]  # attn[h][t][s]
    o: list[list[Tensor]]        # head outputs o[h][t] (dh,)
    dep_o: list[bool]            # per token (the same for all heads)
    p: list[Tensor]              # proj output per token
    x1: list[Tensor]             # after the attention residual
    f: list[Tensor]              # mlp output per token
    x2: list[Tensor]             # block output per token


@dataclass
class _Forward:
    kind: str
    n_prefix: int
    patch_contrib: list[list[Tensor]]  # per patch token: c_{p->t} in pixel order (i, j)
    patch_pixels: list[list[tuple[int, int]]]  # the (row, col) of those pixels
    embed: list[Tensor]                # conv output per patch token (D,)
    blocks: list[_BlockRec] = field(default_factory=list)
    normed: list[Tensor] = field(default_factory=list)  # after the final LayerNorm
    pooled: Tensor | None = None       # TokenMeanViT: mean over tokens
    head_out: Tensor | None = None     # head(x0) (vit, distilled) or head(pooled) (mean)
    dist_out: Tensor | None = None     # DistilledViT: head_dist(x1)
    logits: Tensor | None = None


def _forward_sample(model: VisionTransformer, x: Tensor) -> _Forward:
    kind = _kind(model)
    conv = model.patch_embed.proj
    w, b = _d(conv.weight), _d(conv.bias)
    p_sz = model.patch
    c_in, side = x.shape[0], x.shape[-1] // p_sz

    # patch embedding, pixel by pixel: token index = row-major patch index (flatten(2))
    contribs, pixels, embed = [], [], []
    for r in range(side):
        for c in range(side):
            cs, px = [], []
            for i in range(p_sz):
                for j in range(p_sz):
                    hh, ww = r * p_sz + i, c * p_sz + j
                    cs.append(w[:, :, i, j] @ x[:, hh, ww])
                    px.append((hh, ww))
            assert len(cs) == p_sz * p_sz and w.shape[1] == c_in
            contribs.append(cs)
            pixels.append(px)
            e = b.clone()
            for v in cs:
                e = e + v
            embed.append(e)

    prefix = []
    if kind in ("vit", "distilled"):
        prefix.append(_d(model.cls_token)[0, 0])
    if kind == "distilled":
        prefix.append(_d(model.dist_token)[0, 0])
    pos = _d(model.pos_embed)[0]
    tokens = [v + pos[t] for t, v in enumerate(prefix + embed)]
    dep = [False] * len(prefix) + [True] * len(embed)
    fw = _Forward(kind, len(prefix), contribs, pixels, embed)

    for blk in model.blocks:
        rec, tokens, dep = block_forward(blk, tokens, dep)
        fw.blocks.append(rec)

    fw.normed = [layer_norm(model.norm, v) for v in tokens]
    if kind == "vit":
        fw.head_out = linear(model.head, fw.normed[0])
        fw.logits = fw.head_out
    elif kind == "mean":
        pooled = torch.zeros_like(fw.normed[0])
        for v in fw.normed:
            pooled = pooled + v / len(fw.normed)
        fw.pooled = pooled
        fw.head_out = linear(model.head, pooled)
        fw.logits = fw.head_out
    else:
        fw.head_out = linear(model.head, fw.normed[0])
        fw.dist_out = linear(model.head_dist, fw.normed[1])
        fw.logits = (fw.head_out + fw.dist_out) / 2
    return fw


def block_forward(blk: nn.Module, x: list[Tensor], dep_x: list[bool]
                   ) -> tuple[_BlockRec, list[Tensor], list[bool]]:
    att = blk.attn
    n_tok, dim = len(x), x[0].shape[0]
    heads = att.heads
    dh = dim // heads
    n1 = [layer_norm(blk.norm1, v) for v in x]
    qkv = [linear(att.qkv, v) for v in n1]
    # zoo reshapes qkv to (3, heads, dh): q, k, v blocks of D, each head dh consecutive
    q = [[qkv[t][0 * dim + h * dh:0 * dim + (h + 1) * dh] for t in range(n_tok)]
         for h in range(heads)]
    k = [[qkv[t][1 * dim + h * dh:1 * dim + (h + 1) * dh] for t in range(n_tok)]
         for h in range(heads)]
    v = [[qkv[t][2 * dim + h * dh:2 * dim + (h + 1) * dh] for t in range(n_tok)]
         for h in range(heads)]
    attn, o = [], []
    for h in range(heads):
        a_h, o_h = [], []
        for t in range(n_tok):
            scores = [float(((q[h][t] * att.scale) * k[h][s]).sum()) for s in range(n_tok)]
            m = max(scores)
            ex = [math.exp(sc - m) for sc in scores]
            z = sum(ex)
            row = [e / z for e in ex]
            out = torch.zeros(dh, dtype=DT)
            for s in range(n_tok):
                out = out + row[s] * v[h][s]
            a_h.append(row)
            o_h.append(out)
        attn.append(a_h)
        o.append(o_h)
    # keys of image-dependent tokens make every softmax row depend on the image
    dep_o = [any(dep_x)] * n_tok
    p = [linear(att.proj, torch.cat([o[h][t] for h in range(heads)])) for t in range(n_tok)]
    x1 = [x[t] + p[t] for t in range(n_tok)]
    dep_x1 = [dep_x[t] or dep_o[t] for t in range(n_tok)]
    f = [linear(blk.mlp.fc2, blk.mlp.act(linear(blk.mlp.fc1, layer_norm(blk.norm2, v))))
         for v in x1]
    x2 = [x1[t] + f[t] for t in range(n_tok)]
    rec = _BlockRec(x, list(dep_x), v, attn, o, dep_o, p, x1, f, x2)
    return rec, x2, dep_x1


# --------------------------------------------------------------------------- relevance


@dataclass
class Stats:
    lost: float = 0.0  # |relevance| that reached a vector with no way back to the image


def pass_relevance(mu: list[float], r: float, stats: Stats) -> list[float]:
    """Relevance ``r`` of one output vector shared by ``mu``; record anything not passed."""
    out = [m * r for m in mu]
    stats.lost += abs(r - sum(out)) if r != 0.0 else 0.0
    return out


def block_backward(rec: _BlockRec, r_out: list[float], stats: Stats) -> list[float]:
    n_tok = len(rec.x)
    heads = len(rec.o)
    dep_x1 = [rec.dep_x[t] or rec.dep_o[t] for t in range(n_tok)]

    # x2 = x1 + mlp(norm2(x1)); the mlp output depends on the image iff x1 does
    r_x1 = [0.0] * n_tok
    for t in range(n_tok):
        mu = shares(rec.x2[t], [rec.x1[t], rec.f[t]], [dep_x1[t], dep_x1[t]])
        r_skip, r_mlp = pass_relevance(mu, r_out[t], stats)
        # fc2, activation, fc1, norm2: one source each, so r_mlp reaches x1(t) unchanged
        r_x1[t] = r_skip + r_mlp

    # x1 = x + proj(o)
    r_x = [0.0] * n_tok
    r_p = [0.0] * n_tok
    for t in range(n_tok):
        mu = shares(rec.x1[t], [rec.x[t], rec.p[t]], [rec.dep_x[t], rec.dep_o[t]])
        r_x[t], r_p[t] = pass_relevance(mu, r_x1[t], stats)

    # proj: one source; then the concatenation of the heads, each head in its own slots
    r_o = [[0.0] * n_tok for _ in range(heads)]
    for t in range(n_tok):
        y = torch.cat([rec.o[h][t] for h in range(heads)])
        parts = []
        for h in range(heads):
            padded = torch.zeros_like(y)
            dh = rec.o[h][t].shape[0]
            padded[h * dh:(h + 1) * dh] = rec.o[h][t]
            parts.append(padded)
        mu = shares(y, parts, [rec.dep_o[t]] * heads)
        for h, r in enumerate(pass_relevance(mu, r_p[t], stats)):
            r_o[h][t] = r

    # attention per head: sources are the value vectors, A are weights
    r_v = [[0.0] * n_tok for _ in range(heads)]
    for h in range(heads):
        for t in range(n_tok):
            parts = [rec.attn[h][t][s] * rec.v[h][s] for s in range(n_tok)]
            mu = shares(rec.o[h][t], parts, rec.dep_x)
            for s, r in enumerate(pass_relevance(mu, r_o[h][t], stats)):
                r_v[h][s] += r

    # qkv output: only its v parts hold relevance, summed per token; qkv Linear and norm1 are
    # one-source, so it reaches x(t), adding to what the skip branch gave it
    for t in range(n_tok):
        for h in range(heads):
            r_x[t] += r_v[h][t]
    return r_x


def srd_token_oracle_trace(model: VisionTransformer, x: Tensor, target: int) -> list[dict]:
    """Per sample: ``logits``, ``pixel`` (H, W) map, ``stream`` (relevance per token at each
    block input, then at the final LayerNorm input), ``prefix`` (relevance left on the prefix
    rows of the embedding, 0 by construction), ``embed`` (per patch token) and ``lost``."""
    x = x.detach().to(DT)
    out = []
    for n in range(x.shape[0]):
        fw = _forward_sample(model, x[n])
        stats = Stats()
        n_tok = len(fw.normed)

        # seed at the final LayerNorm output, then through that LayerNorm (one source)
        r = [0.0] * n_tok
        logit = float(fw.logits[target])
        if fw.kind == "vit":
            r[0] = logit  # head Linear: one source, the selected class token
        elif fw.kind == "mean":
            parts = [v / n_tok for v in fw.normed]
            r = pass_relevance(shares(fw.pooled, parts, [True] * n_tok), logit, stats)
        else:
            # the explained scalar is the target logit itself: each head's part of it
            r[0] = float(fw.head_out[target]) / 2
            r[1] = float(fw.dist_out[target]) / 2

        stream = [list(r)]
        for rec in reversed(fw.blocks):
            r = block_backward(rec, r, stats)
            stream.insert(0, list(r))

        # + pos_embed is one source; the prefix rows are parameters (cannot reach the image)
        prefix = r[:fw.n_prefix]
        embed = r[fw.n_prefix:]
        stats.lost += sum(abs(v) for v in prefix)

        pixel = torch.zeros(x.shape[-2], x.shape[-1], dtype=DT)
        bias = _d(model.patch_embed.proj.bias)
        for t, r_t in enumerate(embed):
            cs = fw.patch_contrib[t]
            mu = shares(fw.embed[t], cs, [True] * len(cs), bias)
            passed = pass_relevance(mu, r_t, stats)
            for (hh, ww), r_p in zip(fw.patch_pixels[t], passed, strict=True):
                pixel[hh, ww] += r_p
        out.append({"logits": fw.logits, "pixel": pixel, "stream": stream, "prefix": prefix,
                    "embed": embed, "lost": stats.lost})
    return out


def srd_token_oracle(model: VisionTransformer, x: Tensor, target: int) -> Tensor:
    """SRD pixel map (N, H, W), float64, of ``target``'s logit for each sample of ``x``."""
    return torch.stack([s["pixel"] for s in srd_token_oracle_trace(model, x, target)])


def oracle_logits(model: VisionTransformer, x: Tensor) -> Tensor:
    """The oracle's own float64 forward, (N, classes)."""
    x = x.detach().to(DT)
    return torch.stack([_forward_sample(model, x[n]).logits for n in range(x.shape[0])])
