"""Slow, independent reference implementation ("oracle") of SRD on token vectors (ViT).

Written from the definition only (not from srdxai's engine or ``methods/srd_tokens.py``), so
that the library and this oracle cannot share a mistake. Everything is float64 numpy; the
forward and the backward are explicit Python loops over samples, tokens, heads and pixels (only
the sum over one vector's channels is a vector expression). Use tiny models and inputs.

Definition
----------
Relevance is one scalar per pointwise feature vector (PFV): a token's hidden vector at every
tensor of the ViT, each head's output vector of the attention product, and each input pixel's
RGB vector. For an output vector ``z(t)`` made of source parts ``c_{s->t}`` (plus bias shares
``b_{s->t}``) with ``sum_s (c + b) = z(t)``::

    mu_{s->t} = <c_{s->t} + b_{s->t}, z(t)> / ||z(t)||^2      (0 where z(t) = 0)
    R(s)      = sum_t mu_{s->t} R(t)

Per operation of srdxai's ``VisionTransformer`` (forward mirrored here step by step):

* head Linear on the class token of the final LayerNorm output: the seed, ``R = y_c`` at that
  class-token vector, 0 at every other token;
* per-token operations (LayerNorm, Linear qkv / proj / fc1 / fc2, the activation, ``q * scale``,
  ``+ pos_embed``): one source, ``mu = 1``; the qkv output vector of token ``t`` gets the sum of
  the relevances of its q, k and v parts, and q and k get none, so token ``t`` keeps
  ``sum_h R(v_h(t))``;
* residual ``z = a + b``: per token ``mu_a = <a, z>/||z||^2``, ``mu_b = <b, z>/||z||^2``;
* attention, per head: ``o_h(t) = sum_s A_h(t, s) v_h(s)``; ``mu_{s->t} = A_h(t, s)
  <v_h(s), o_h(t)> / ||o_h(t)||^2``; ``R(o_h(t)) = R(token t after proj) / heads`` (the
  token's relevance is spread evenly over its ``D`` entries, a head's vector owns ``D/heads``
  of them); queries, keys and attention weights get nothing;
* ``cat([cls, patches])``: the class token's row is a parameter, its relevance is dropped
  (:func:`srd_tokens_trace` reports it as ``cls_share``);
* patch embedding (Conv2d, kernel = stride, no padding): ``c_p = W_{k(p)} x(p)`` for the pixels
  ``p`` of the token's patch, bias share ``b_p = b ||c_p|| / sum_p' ||c_p'||`` (L2 over output
  channels; split evenly if every ``c_p`` is 0), ``R(p) = mu_p R(token)``.

The result is the (N, H, W) pixel map; it sums to ``y_c - cls_share`` per sample.

Public API
----------
Kernels (numpy / torch in, float64 numpy out)::

    sharing_ratio(part, z) -> float
    residual_kernel(a, b, R_z) -> (R_a, R_b, mu_sums)          # (T, D), (T, D), (T,)
    attention_value_kernel(A, v, R_o) -> (R_v, mu_sums)         # (T, T), (T, d), (T,)
    patch_embed_kernel(x, weight, bias, R_tokens, bias_split="norm") -> (R_pixels, mu_sums)
        # x (C, H, W), weight (D, C, ph, pw), bias (D,) or None, R_tokens (T,)

Model level::

    vit_forward(model, x) -> dict of recorded tensors (numpy, float64)
    srd_tokens_trace(model, x, target, check=True, bias_split="norm", head_split="even")
        keys: "map" (N, H, W) torch float64, "logits" (N, K), "logit" (N,) target logit,
        "cls_share" (N,), "block_input_sums" (N, depth + 1), "embed_token_sums" (N,),
        "mu_errors" {operation: max |sum mu - 1| over output vectors with z != 0}
    srd_tokens_reference(model, x, target) -> (N, H, W) torch float64

``model`` is srdxai's ``VisionTransformer`` (recognised by attribute names: ``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks[i].norm1 / attn.qkv / attn.proj / attn.heads /
attn.scale / norm2 / mlp.fc1 / mlp.act / mlp.fc2``, ``norm``, ``head``); this module never
imports srdxai.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "MU_TOL",
    "sharing_ratio",
    "residual_kernel",
    "attention_value_kernel",
    "patch_embed_kernel",
    "vit_forward",
    "srd_tokens_trace",
    "srd_tokens_reference",
]

#: Tolerance of the in-oracle assertion that the sharing ratios of every output vector sum to 1.
MU_TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy().copy()
    return np.array(t, dtype=np.float64)


def sharing_ratio(part, z) -> float:
    """``<part, z> / ||z||^2``, or 0 when ``z`` is the zero vector."""
    part = np.asarray(part, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    zz = float(np.dot(z, z))
    if zz == 0.0:
        return 0.0
    return float(np.dot(part, z)) / zz


def _targets(target, n: int, logits: np.ndarray) -> list[int]:
    if target is None:
        return [int(np.argmax(logits[i])) for i in range(n)]
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    if isinstance(target, (int, np.integer)):
        return [int(target)] * n
    target = [int(t) for t in target]
    assert len(target) == n, (target, n)
    return target


# --- per-vector forward pieces (explicit, one vector at a time) --------------------------------


def _linear_vec(x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    out = np.empty(W.shape[0])
    for j in range(W.shape[0]):
        out[j] = float(np.dot(W[j], x)) + (0.0 if b is None else b[j])
    return out


def _layernorm_vec(x: np.ndarray, w, b, eps: float) -> np.ndarray:
    D = x.shape[0]
    mean = x.sum() / D
    var = ((x - mean) ** 2).sum() / D
    y = (x - mean) / math.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def _activation_vec(x: np.ndarray, act) -> np.ndarray:
    name = type(act).__name__
    out = np.empty_like(x)
    for i, v in enumerate(x):
        v = float(v)
        if name == "ReLU":
            out[i] = v if v > 0 else 0.0
        elif name == "GELU":
            if getattr(act, "approximate", "none") == "tanh":
                out[i] = 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
            else:
                out[i] = 0.5 * v * (1 + math.erf(v / math.sqrt(2)))
        elif name == "ELU":
            a = float(act.alpha)
            out[i] = v if v > 0 else a * math.expm1(v)
        elif name == "LeakyReLU":
            out[i] = v if v >= 0 else float(act.negative_slope) * v
        elif name == "SiLU":
            out[i] = v / (1 + math.exp(-v))
        elif name == "Tanh":
            out[i] = math.tanh(v)
        else:
            raise NotImplementedError(f"activation {name}")
    return out


def _softmax_row(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max())
    return e / e.sum()


def _ln_params(ln):
    w = None if ln.weight is None else _np(ln.weight)
    b = None if ln.bias is None else _np(ln.bias)
    return w, b, float(ln.eps)


def _lin_params(lin):
    return _np(lin.weight), (None if lin.bias is None else _np(lin.bias))


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


def residual_kernel(a, b, R_z):
    """``z = a + b`` per token (``a``, ``b`` of shape (T, D), ``R_z`` of shape (T,)).

    Returns ``(R_a, R_b, mu_sums)`` with ``R_a[t] = <a(t), z(t)>/||z(t)||^2 R_z[t]`` (same for
    ``b``) and ``mu_sums[t] = mu_a + mu_b`` (nan where ``z(t) = 0``).
    """
    A, B, Rz = _np(a), _np(b), _np(R_z)
    T = A.shape[0]
    Ra, Rb, sums = np.zeros(T), np.zeros(T), np.full(T, np.nan)
    for t in range(T):
        z = A[t] + B[t]
        mu_a = sharing_ratio(A[t], z)
        mu_b = sharing_ratio(B[t], z)
        Ra[t] = mu_a * Rz[t]
        Rb[t] = mu_b * Rz[t]
        if np.dot(z, z) > 0:
            sums[t] = mu_a + mu_b
    return Ra, Rb, sums


def attention_value_kernel(A, v, R_o):
    """One head: ``o(t) = sum_s A(t, s) v(s)`` (``A`` (T, T), ``v`` (T, d), ``R_o`` (T,)).

    Returns ``(R_v, mu_sums)``: ``R_v[s] = sum_t A(t,s) <v(s), o(t)>/||o(t)||^2 R_o[t]`` and,
    per output ``t``, ``sum_s mu_{s->t}`` (nan where ``o(t) = 0``).
    """
    Am, V, Ro = _np(A), _np(v), _np(R_o)
    T, S = Am.shape
    Rv, sums = np.zeros(S), np.full(T, np.nan)
    for t in range(T):
        o = np.zeros(V.shape[1])
        for s in range(S):
            o = o + Am[t, s] * V[s]
        total = 0.0
        for s in range(S):
            mu = sharing_ratio(Am[t, s] * V[s], o)
            Rv[s] += mu * Ro[t]
            total += mu
        if np.dot(o, o) > 0:
            sums[t] = total
    return Rv, sums


def _patch_contributions(X, Wt, b, i, j, bias_split="norm"):
    """Contributions ``[(row, col, c_p)]`` and bias shares of the patch at grid cell (i, j).

    ``bias_split="none"`` (a deliberately wrong variant, only for tests that check the
    comparison can tell the difference) gives every pixel a zero bias share.
    """
    D, C, ph, pw = Wt.shape
    contribs = []
    for u in range(ph):
        for w in range(pw):
            row, col = i * ph + u, j * pw + w
            c = np.zeros(D)
            for ci in range(C):
                c = c + Wt[:, ci, u, w] * X[ci, row, col]
            contribs.append((row, col, c))
    if bias_split == "none":
        return contribs, [np.zeros_like(b) for _ in contribs]
    assert bias_split == "norm", bias_split
    norms = [float(np.sqrt(np.dot(c, c))) for _, _, c in contribs]
    total = sum(norms)
    if total > 0:
        shares = [b * (nrm / total) for nrm in norms]
    else:  # every contribution is 0: the bias is all of z; split it evenly
        shares = [b / len(contribs) for _ in contribs]
    return contribs, shares


def patch_embed_kernel(x, weight, bias, R_tokens, bias_split="norm"):
    """Patch embedding of one sample: ``x`` (C, H, W), ``weight`` (D, C, ph, pw) with stride =
    kernel, ``bias`` (D,) or None, ``R_tokens`` (T,) in row-major grid order.

    Returns ``(R_pixels (H, W), mu_sums (T,))``; pixels outside every patch get 0.
    """
    X, Wt = _np(x), _np(weight)
    D, C, ph, pw = Wt.shape
    _, H, W = X.shape
    b = np.zeros(D) if bias is None else _np(bias)
    Rt = _np(R_tokens)
    gh, gw = H // ph, W // pw
    assert Rt.shape == (gh * gw,), (Rt.shape, gh, gw)
    Rp = np.zeros((H, W))
    sums = np.full(gh * gw, np.nan)
    for i in range(gh):
        for j in range(gw):
            t = i * gw + j
            contribs, shares = _patch_contributions(X, Wt, b, i, j, bias_split)
            z = b.copy()
            for _, _, c in contribs:
                z = z + c
            total = 0.0
            for (row, col, c), bs in zip(contribs, shares, strict=True):
                mu = sharing_ratio(c + bs, z)
                Rp[row, col] += mu * Rt[t]
                total += mu
            if np.dot(z, z) > 0:
                sums[t] = total
    return Rp, sums


# ---------------------------------------------------------------------------------------------
# model level
# ---------------------------------------------------------------------------------------------


def vit_forward(model, x) -> dict:
    """Mirror of ``VisionTransformer.forward`` in float64 loops; records every tensor needed.

    Returns a dict: ``x`` (N, C, H, W), ``tokens`` (N, T, D) patch embedding output,
    ``h0`` (N, T+1, D) after ``cat`` and ``+ pos_embed``, ``blocks``: per block a dict with
    ``x_in``, ``attn_out`` (after proj), ``x_mid``, ``mlp_out``, ``x_out`` (N, T+1, D),
    ``A`` (N, heads, T+1, T+1), ``v`` (N, heads, T+1, d); ``logits`` (N, K).
    """
    X = _np(x)
    N, C, H, W = X.shape
    conv = model.patch_embed.proj
    Wc = _np(conv.weight)
    bc = np.zeros(Wc.shape[0]) if conv.bias is None else _np(conv.bias)
    D, _, ph, pw = Wc.shape
    assert tuple(conv.stride) == (ph, pw) and tuple(conv.padding) == (0, 0), "kernel != stride"
    gh, gw = H // ph, W // pw
    T = gh * gw
    tokens = np.zeros((N, T, D))
    for n in range(N):
        for i in range(gh):
            for j in range(gw):
                z = bc.copy()
                for u in range(ph):
                    for w in range(pw):
                        for ci in range(C):
                            z = z + Wc[:, ci, u, w] * X[n, ci, i * ph + u, j * pw + w]
                tokens[n, i * gw + j] = z
    cls = _np(model.cls_token).reshape(D)
    pos = _np(model.pos_embed).reshape(T + 1, D)
    h = np.zeros((N, T + 1, D))
    for n in range(N):
        h[n, 0] = cls + pos[0]
        for t in range(T):
            h[n, t + 1] = tokens[n, t] + pos[t + 1]
    rec = {"x": X, "tokens": tokens, "h0": h.copy(), "blocks": []}
    for blk in model.blocks:
        heads = int(blk.attn.heads)
        scale = float(blk.attn.scale)
        d = D // heads
        w1, b1, e1 = _ln_params(blk.norm1)
        Wqkv, bqkv = _lin_params(blk.attn.qkv)
        Wp, bp = _lin_params(blk.attn.proj)
        w2, b2, e2 = _ln_params(blk.norm2)
        Wf1, bf1 = _lin_params(blk.mlp.fc1)
        Wf2, bf2 = _lin_params(blk.mlp.fc2)
        act = blk.mlp.act
        L = T + 1
        attn_out = np.zeros((N, L, D))
        A_all = np.zeros((N, heads, L, L))
        v_all = np.zeros((N, heads, L, d))
        for n in range(N):
            q = np.zeros((heads, L, d))
            k = np.zeros((heads, L, d))
            v = np.zeros((heads, L, d))
            for t in range(L):
                qkv = _linear_vec(_layernorm_vec(h[n, t], w1, b1, e1), Wqkv, bqkv)
                # reshape(n, t, 3, heads, d): channel = which * D + head * d + e
                for hh in range(heads):
                    q[hh, t] = qkv[0 * D + hh * d:0 * D + (hh + 1) * d]
                    k[hh, t] = qkv[1 * D + hh * d:1 * D + (hh + 1) * d]
                    v[hh, t] = qkv[2 * D + hh * d:2 * D + (hh + 1) * d]
            concat = np.zeros((L, D))
            for hh in range(heads):
                for t in range(L):
                    qs = q[hh, t] * scale
                    scores = np.array([float(np.dot(qs, k[hh, s])) for s in range(L)])
                    A_all[n, hh, t] = _softmax_row(scores)
                    o = np.zeros(d)
                    for s in range(L):
                        o = o + A_all[n, hh, t, s] * v[hh, s]
                    concat[t, hh * d:(hh + 1) * d] = o  # transpose(1, 2).reshape(n, t, D)
            v_all[n] = v
            for t in range(L):
                attn_out[n, t] = _linear_vec(concat[t], Wp, bp)
        x_mid = h + attn_out
        mlp_out = np.zeros((N, L, D))
        for n in range(N):
            for t in range(L):
                a = _layernorm_vec(x_mid[n, t], w2, b2, e2)
                mlp_out[n, t] = _linear_vec(_activation_vec(_linear_vec(a, Wf1, bf1), act),
                                            Wf2, bf2)
        x_out = x_mid + mlp_out
        rec["blocks"].append({"x_in": h, "attn_out": attn_out, "x_mid": x_mid,
                              "mlp_out": mlp_out, "x_out": x_out, "A": A_all, "v": v_all,
                              "heads": heads})
        h = x_out
    wn, bn, en = _ln_params(model.norm)
    Wh, bh = _lin_params(model.head)
    logits = np.zeros((N, Wh.shape[0]))
    for n in range(N):
        logits[n] = _linear_vec(_layernorm_vec(h[n, 0], wn, bn, en), Wh, bh)
    rec["logits"] = logits
    return rec


def _check_mu(name: str, sums: np.ndarray, errors: dict, check: bool) -> None:
    finite = sums[np.isfinite(sums)]
    err = float(np.abs(finite - 1.0).max()) if finite.size else 0.0
    errors[name] = max(errors.get(name, 0.0), err)
    if check:
        assert err <= MU_TOL, f"{name}: sharing ratios sum to 1 +- {err}"


def srd_tokens_trace(model, x, target, check: bool = True, bias_split: str = "norm",
                     head_split: str = "even") -> dict:
    """SRD on token vectors with every intermediate quantity (see the module docstring).

    ``check`` asserts that the sharing ratios of every output vector sum to 1 (``MU_TOL``).
    Two alternative readings, for discrimination tests only: ``bias_split="none"`` (no bias
    share at the patch embedding) and ``head_split="projection"`` (head ``h`` gets
    ``<o_h(t), out(t)|_h> / ||out(t)||^2`` of the token's relevance, the projection share of its
    slice of the concatenated vector, instead of ``1/heads``).
    """
    rec = vit_forward(model, x)
    X = rec["x"]
    N, _, H, W = X.shape
    logits = rec["logits"]
    tgt = _targets(target, N, logits)
    L = rec["h0"].shape[1]
    depth = len(rec["blocks"])
    errors: dict[str, float] = {}
    block_input_sums = np.zeros((N, depth + 1))
    out_map = np.zeros((N, H, W))
    cls_share = np.zeros(N)
    embed_sums = np.zeros(N)
    y = np.zeros(N)
    conv = model.patch_embed.proj
    for n in range(N):
        y[n] = logits[n, tgt[n]]
        # head on the class token, final LayerNorm (per token, mu = 1): seed at token 0
        R = np.zeros(L)
        R[0] = y[n]
        block_input_sums[n, depth] = R.sum()
        for bi in range(depth - 1, -1, -1):
            blk = rec["blocks"][bi]
            heads = blk["heads"]
            # x_out = x_mid + mlp_out
            R_mid, R_mlp, s = residual_kernel(blk["x_mid"][n], blk["mlp_out"][n], R)
            _check_mu("residual_mlp", s, errors, check)
            # mlp_out <- fc2 <- act <- fc1 <- norm2 <- x_mid : per token, mu = 1
            R_mid = R_mid + R_mlp
            # x_mid = x_in + attn_out
            R_in, R_attn, s = residual_kernel(blk["x_in"][n], blk["attn_out"][n], R_mid)
            _check_mu("residual_attn", s, errors, check)
            # proj (per token, mu = 1), then the concatenated heads: R / heads per head
            R_qkv = np.zeros(L)
            for hh in range(heads):
                if head_split == "even":
                    R_o = R_attn / heads
                else:
                    assert head_split == "projection", head_split
                    R_o = np.zeros(L)
                    for t in range(L):
                        cat_t = np.concatenate([blk["A"][n, g2, t] @ blk["v"][n, g2]
                                                for g2 in range(heads)])
                        d = cat_t.shape[0] // heads
                        part = np.zeros_like(cat_t)
                        part[hh * d:(hh + 1) * d] = cat_t[hh * d:(hh + 1) * d]
                        R_o[t] = sharing_ratio(part, cat_t) * R_attn[t]
                R_v, s = attention_value_kernel(blk["A"][n, hh], blk["v"][n, hh], R_o)
                _check_mu("attention", s, errors, check)
                R_qkv = R_qkv + R_v  # q and k parts get 0
            # qkv Linear <- norm1 <- x_in : per token, mu = 1
            R = R_in + R_qkv
            block_input_sums[n, bi] = R.sum()
        # h0 = cat([cls, tokens]) + pos_embed: per token, mu = 1; the class row is dropped
        cls_share[n] = R[0]
        R_tok = R[1:]
        embed_sums[n] = R_tok.sum()
        Rp, s = patch_embed_kernel(X[n], conv.weight, conv.bias, R_tok, bias_split)
        _check_mu("patch_embed", s, errors, check and bias_split == "norm")
        out_map[n] = Rp
    return {
        "map": torch.from_numpy(out_map),
        "logits": logits,
        "target": tgt,
        "logit": y,
        "cls_share": cls_share,
        "block_input_sums": block_input_sums,
        "embed_token_sums": embed_sums,
        "mu_errors": errors,
    }


def srd_tokens_reference(model, x, target) -> torch.Tensor:
    """The (N, H, W) float64 pixel relevance map of SRD on token vectors."""
    return srd_tokens_trace(model, x, target)["map"]
