"""Self-checks of the slow LRP-on-transformers oracle (tests/lrp_transformer_oracle.py).

Independent of srdxai. Each rule kernel of the oracle is compared with a second way of computing
it: the textbook per-neuron contribution form with explicit Python loops (dense / conv layer
rules), or ``x * J^T (R / s(y))`` with the Jacobian-vector product taken by autograd on the
single op (LayerNorm with frozen sigma, softmax, products, mean); plus local conservation
properties. At model level: the hand-written forward equals the model's, the epsilon limit of
the relevance walk equals AttnLRP (gradient form), and AttnLRP equals a whole-network modified
gradient written here independently; batch / target / dtype handling; the model is untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

try:
    from . import lrp_transformer_oracle as ora  # type: ignore[no-redef]
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import lrp_transformer_oracle as ora  # type: ignore[no-redef]

DT = torch.float64
CONFIGS = [("cls", True), ("mean", True), ("mean", False)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _image(n: int = 2, seed: int = 1) -> torch.Tensor:
    return _randn(n, 3, 16, 16, seed=seed)


# ==============================================================================================
# The model
# ==============================================================================================


def test_model_is_deterministic_eval_with_nontrivial_biases():
    rng = torch.get_rng_state()
    a, b = ora.TinyViT(seed=3), ora.TinyViT(seed=3)
    assert torch.equal(rng, torch.get_rng_state()), "building the model moved the global RNG"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    other = ora.TinyViT(seed=4).state_dict().values()
    assert not any(torch.equal(va, vc)
                   for va, vc in zip(a.state_dict().values(), other, strict=True))
    assert not a.training and not any(m.training for m in a.modules())
    biases = [p for n, p in a.named_parameters() if n.endswith("bias")]
    assert len(biases) == 1 + 2 * 6 + 1 + 1  # conv, 2 x (ln1, qkv, proj, ln2, fc1, fc2), norm, head
    for p in biases:
        assert p.abs().min() > 0 and p.std() > 0.05
    assert a.cls_token.shape == (1, 1, 16) and a.pos.shape == (1, 17, 16)
    assert a.pos.std() > 0.1 and a.cls_token.std() > 0.1
    assert a(torch.randn(4, 3, 16, 16)).shape == (4, 5)
    assert ora.TinyViT(pool="mean", cls_token=False).pos.shape == (1, 16, 16)
    with pytest.raises(ValueError):
        ora.TinyViT(pool="cls", cls_token=False)
    with pytest.raises(ValueError):
        ora.TinyViT(pool="max")


@pytest.mark.parametrize("pool,cls", CONFIGS)
def test_oracle_forward_matches_model(pool, cls):
    model = ora.TinyViT(pool=pool, cls_token=cls)
    x = _image(3)
    tr = ora.oracle_forward(model, x)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x)
        ref32 = model(x.float())
    assert tr["logits"].dtype == DT
    assert torch.allclose(tr["logits"], ref64, rtol=0, atol=1e-12)
    assert torch.allclose(tr["logits"].float(), ref32, rtol=1e-4, atol=1e-5)
    assert ref64.abs().max() > 0.1  # not a degenerate model
    n_tok = 17 if cls else 16
    assert tr["x0"].shape == (3, n_tok, 16)
    assert tr["blocks"][0]["attn"].shape == (3, 2, n_tok, n_tok)
    assert torch.allclose(tr["blocks"][1]["attn"].sum(-1), torch.ones(3, 2, n_tok, dtype=DT))


# ==============================================================================================
# Layer rules vs. the textbook contribution form with loops
# ==============================================================================================


def _stab(z: float, eps: float) -> float:
    return z + eps if z >= 0 else z - eps


def _loop_layer_rule(xs, conns, biases, R, rule, epsilon, stabilizer, gamma):
    """``xs``: input values; ``conns[j]``: list of ``(input index, weight)`` of output ``j``;
    per-neuron contributions ``c_ij`` and denominators ``z_j`` as in the LRP papers."""
    out = [0.0] * len(xs)
    for j, terms in enumerate(conns):
        b = biases[j]
        if rule == "epsilon":
            c = [(i, xs[i] * w) for i, w in terms]
            z = sum(v for _, v in c) + b
            for i, v in c:
                out[i] += v / _stab(z, epsilon) * R[j]
        elif rule == "zplus":
            c = [(i, max(xs[i], 0.0) * max(w, 0.0) + min(xs[i], 0.0) * min(w, 0.0))
                 for i, w in terms]
            z = sum(v for _, v in c) + max(b, 0.0)
            for i, v in c:
                out[i] += v / _stab(z, stabilizer) * R[j]
        elif rule == "gamma":
            y = sum(xs[i] * w for i, w in terms) + b
            cp, cn = [], []
            for i, w in terms:
                wp, wn = w + gamma * max(w, 0.0), w + gamma * min(w, 0.0)
                xp, xn = max(xs[i], 0.0), min(xs[i], 0.0)
                cp.append((i, xp * wp + xn * wn))
                cn.append((i, xp * wn + xn * wp))
            if y > 0:
                z = sum(v for _, v in cp) + b + gamma * max(b, 0.0)
                for i, v in cp:
                    out[i] += v / _stab(z, stabilizer) * R[j]
            elif y < 0:
                z = sum(v for _, v in cn) + b + gamma * min(b, 0.0)
                for i, v in cn:
                    out[i] += v / _stab(z, stabilizer) * R[j]
        else:
            raise ValueError(rule)
    return out


# distinct, large stabilisers so that using the wrong one (or none) shows
EPS_KW = {"epsilon": 0.05, "stabilizer": 0.01, "gamma": 0.3}


@pytest.mark.parametrize("rule", ora.LAYER_RULES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_rule_matches_loops(rule, with_bias):
    x = _randn(2, 3, 5, seed=1)            # leading dims (N, T)
    w = _randn(4, 5, seed=2)
    b = 0.5 * _randn(4, seed=3) if with_bias else None
    R = _randn(2, 3, 4, seed=4)
    got = ora.linear_rule(x, w, b, R, rule=rule, **EPS_KW)
    assert got.shape == x.shape
    for n in range(2):
        for t in range(3):
            conns = [[(i, float(w[j, i])) for i in range(5)] for j in range(4)]
            bias = [0.0] * 4 if b is None else b.tolist()
            ref = _loop_layer_rule(x[n, t].tolist(), conns, bias, R[n, t].tolist(), rule,
                                   **EPS_KW)
            assert torch.allclose(got[n, t], torch.tensor(ref, dtype=DT), rtol=1e-10,
                                  atol=1e-12), (n, t)


@pytest.mark.parametrize("rule", ora.LAYER_RULES)
@pytest.mark.parametrize("geom", [(3, 8, 4, 4, 0), (2, 5, 3, 2, 1)])
def test_conv2d_rule_matches_loops(rule, geom):
    C, H, k, s, p = geom
    Co = 3
    x = _randn(2, C, H, H, seed=5)
    w = _randn(Co, C, k, k, seed=6)
    b = 0.5 * _randn(Co, seed=7)
    Ho = (H + 2 * p - k) // s + 1
    R = _randn(2, Co, Ho, Ho, seed=8)
    got = ora.conv2d_rule(x, w, b, R, rule=rule, stride=s, padding=p, **EPS_KW)
    assert got.shape == x.shape
    assert F.conv2d(x, w, b, stride=s, padding=p).shape[-2:] == (Ho, Ho)

    def idx(c, i, j):
        return (c * H + i) * H + j

    for n in range(2):
        conns, bias, Rs = [], [], []
        for o in range(Co):
            for oh in range(Ho):
                for ow in range(Ho):
                    terms = []
                    for c in range(C):
                        for a in range(k):
                            for bb in range(k):
                                ih, iw = oh * s - p + a, ow * s - p + bb
                                if 0 <= ih < H and 0 <= iw < H:
                                    terms.append((idx(c, ih, iw), float(w[o, c, a, bb])))
                    conns.append(terms)
                    bias.append(float(b[o]))
                    Rs.append(float(R[n, o, oh, ow]))
        ref = _loop_layer_rule(x[n].flatten().tolist(), conns, bias, Rs, rule, **EPS_KW)
        assert torch.allclose(got[n].flatten(), torch.tensor(ref, dtype=DT), rtol=1e-10,
                              atol=1e-12), n


def test_gamma_rule_limits():
    x = _randn(3, 6, seed=11)
    w, b = _randn(5, 6, seed=12), 0.3 * _randn(5, seed=13)
    R = _randn(3, 5, seed=14)
    # gamma = 0 is the epsilon rule (same stabiliser; no output is exactly 0)
    g0 = ora.linear_rule(x, w, b, R, rule="gamma", gamma=0.0, stabilizer=1e-3)
    e = ora.linear_rule(x, w, b, R, rule="epsilon", epsilon=1e-3)
    assert _rel_err(g0, e) < 1e-12
    # gamma -> infinity on x >= 0 with relevance only at positive outputs: the z+ rule
    xp = x.abs()
    Rp = R * (xp @ w.T + b > 0)
    assert Rp.abs().sum() > 0
    gi = ora.linear_rule(xp, w, b, Rp, rule="gamma", gamma=1e8, stabilizer=1e-12)
    zp = ora.linear_rule(xp, w, b, Rp, rule="zplus", stabilizer=1e-12)
    assert _rel_err(gi, zp) < 1e-6
    # an output that is exactly 0 is neither positive nor negative: gamma drops its relevance
    # (while epsilon divides by s(0) = +eps)
    x0 = torch.tensor([[1.0, 2.0]], dtype=DT)
    w0 = torch.tensor([[2.0, -1.0], [1.0, 1.0]], dtype=DT)
    b0 = torch.tensor([0.0, 0.5], dtype=DT)
    R0 = torch.tensor([[1.0, 0.0]], dtype=DT)
    assert torch.equal(ora.linear_rule(x0, w0, b0, R0, rule="gamma"), torch.zeros(1, 2, dtype=DT))
    Re = ora.linear_rule(x0, w0, b0, R0, rule="epsilon", epsilon=0.5)
    assert torch.allclose(Re, torch.tensor([[4.0, -4.0]], dtype=DT))
    with pytest.raises(ValueError):
        ora.linear_rule(x, w, b, R, rule="alpha")


def test_stabilize_sign_of_zero_is_plus():
    z = torch.tensor([-2.0, 0.0, 3.0], dtype=DT)
    assert ora.stabilize(z, 0.5).tolist() == [-2.5, 0.5, 3.5]


# ==============================================================================================
# Non-layer rules vs. a single-op autograd VJP
# ==============================================================================================


def _vjp_rule(fn, inputs, R, stabilizer):
    """``x_i * J_i^T (R / s(y))`` by autograd on the one op ``fn``."""
    ins = [t.clone().requires_grad_(True) for t in inputs]
    y = fn(*ins)
    gs = torch.autograd.grad(y, ins, R / ora.stabilize(y.detach(), stabilizer))
    return [t.detach() * g for t, g in zip(ins, gs, strict=True)]


def test_layernorm_rule_matches_autograd():
    x = _randn(2, 7, 16, seed=21)
    w, b = 1 + 0.3 * _randn(16, seed=22), 0.3 * _randn(16, seed=23)
    R = _randn(2, 7, 16, seed=24)
    got = ora.layernorm_rule(x, w, b, R, ln_eps=1e-5, stabilizer=0.01)
    sigma = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    ref = _vjp_rule(lambda t: (t - t.mean(-1, keepdim=True)) / sigma * w + b, [x], R, 0.01)[0]
    assert _rel_err(got, ref) < 1e-12
    # frozen sigma is not the true LayerNorm gradient (which would also move sigma)
    true = _vjp_rule(lambda t: F.layer_norm(t, (16,), w, b, 1e-5), [x], R, 0.01)[0]
    assert _rel_err(true, ref) > 1e-3
    # no affine parameters = unit weight, zero bias
    assert torch.allclose(ora.layernorm_rule(x, None, None, R),
                          ora.layernorm_rule(x, torch.ones(16, dtype=DT),
                                             torch.zeros(16, dtype=DT), R))


def test_softmax_rule_matches_autograd():
    x = 2 * _randn(2, 2, 5, 5, seed=31)
    R = _randn(2, 2, 5, 5, seed=32)
    got = ora.softmax_rule(x, R, stabilizer=0.01)
    ref = _vjp_rule(lambda t: torch.softmax(t, -1), [x], R, 0.01)[0]
    assert _rel_err(got, ref) < 1e-12


def test_product_rules_match_autograd():
    a, b = _randn(2, 2, 5, 4, seed=41), _randn(2, 2, 4, 6, seed=42)
    R = _randn(2, 2, 5, 6, seed=43)
    Ra, Rb = ora.matmul_rule(a, b, R, stabilizer=0.01)
    ra, rb = _vjp_rule(torch.matmul, [a, b], R, 0.01)
    assert _rel_err(Ra, 0.5 * ra) < 1e-12 and _rel_err(Rb, 0.5 * rb) < 1e-12
    c = _randn(2, 5, 4, seed=44)
    R2 = _randn(2, 5, 4, seed=45)
    Ra, Rc = ora.mul_rule(c, a[:, 0], R2, stabilizer=0.01)
    ra, rc = _vjp_rule(torch.mul, [c, a[:, 0]], R2, 0.01)
    assert _rel_err(Ra, 0.5 * ra) < 1e-12 and _rel_err(Rc, 0.5 * rc) < 1e-12


def test_mean_and_sum_rules_match_autograd():
    x = _randn(3, 7, 4, seed=51)
    R = _randn(3, 4, seed=52)
    got = ora.mean_rule(x, R, 1, stabilizer=0.01)
    assert _rel_err(got, _vjp_rule(lambda t: t.mean(1), [x], R, 0.01)[0]) < 1e-12
    y = _randn(3, 7, 4, seed=53)
    R3 = _randn(3, 7, 4, seed=54)
    Ra, Rb = ora.add_rule(x, y, R3, stabilizer=0.01)
    ra, rb = _vjp_rule(torch.add, [x, y], R3, 0.01)
    assert _rel_err(Ra, ra) < 1e-12 and _rel_err(Rb, rb) < 1e-12
    c = _randn(1, 7, 4, seed=55)
    got = ora.add_const_rule(x, c, R3, stabilizer=0.01)
    assert _rel_err(got, _vjp_rule(lambda t: t + c, [x], R3, 0.01)[0]) < 1e-12


# ==============================================================================================
# Local conservation of single rules
# ==============================================================================================

TINY = 1e-12


def _close_sum(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    assert abs(float(a.sum() - b.sum())) <= tol * float(b.abs().sum()), (a.sum(), b.sum())


def test_layer_rules_conserve_without_bias():
    x, w, R = _randn(4, 6, seed=61), _randn(5, 6, seed=62), _randn(4, 5, seed=63)
    _close_sum(ora.linear_rule(x, w, None, R, rule="epsilon", epsilon=TINY), R)
    _close_sum(ora.linear_rule(x, w, None, R, rule="gamma", gamma=0.7, stabilizer=TINY), R)
    xp = x.abs()
    _close_sum(ora.linear_rule(xp, w, None, R, rule="zplus", stabilizer=TINY), R)
    # z+ on mixed-sign inputs still conserves (x- pairs with W-, the denominators match)
    _close_sum(ora.linear_rule(x, w, None, R, rule="zplus", stabilizer=TINY), R)
    # a bias keeps a share: epsilon does not conserve then
    b = _randn(5, seed=64)
    Rx = ora.linear_rule(x, w, b, R, rule="epsilon", epsilon=TINY)
    assert abs(float(Rx.sum() - R.sum())) > 1e-3
    assert torch.allclose(Rx.sum(), (R * (x @ w.T) / (x @ w.T + b)).sum())
    xi = _randn(2, 3, 8, 8, seed=65)
    wc, Rc = _randn(4, 3, 4, 4, seed=66), _randn(2, 4, 2, 2, seed=67)
    for rule in ora.LAYER_RULES:
        _close_sum(ora.conv2d_rule(xi.abs(), wc, None, Rc, rule=rule, epsilon=TINY,
                                   stabilizer=TINY, stride=4), Rc)


def test_other_rules_conserve():
    a, b = _randn(2, 2, 5, 4, seed=71), _randn(2, 2, 4, 6, seed=72)
    R = _randn(2, 2, 5, 6, seed=73)
    Ra, Rb = ora.matmul_rule(a, b, R, stabilizer=TINY)
    _close_sum(Ra, 0.5 * R)                   # each operand gets half
    _close_sum(Rb, 0.5 * R)
    c, d, R2 = _randn(3, 4, seed=74), _randn(3, 4, seed=75), _randn(3, 4, seed=76)
    Rc, Rd = ora.mul_rule(c, d, R2, stabilizer=TINY)
    assert torch.allclose(Rc, 0.5 * R2) and torch.allclose(Rd, 0.5 * R2)
    Rc, Rd = ora.add_rule(c, d, R2, stabilizer=TINY)
    assert torch.allclose(Rc + Rd, R2)
    assert torch.allclose(ora.add_const_rule(c, torch.zeros(4, dtype=DT), R2, TINY), R2)
    x = _randn(2, 6, 16, seed=77)
    R3 = _randn(2, 6, 16, seed=78)
    w = 1 + 0.3 * _randn(16, seed=79)
    Rl = ora.layernorm_rule(x, w, torch.zeros(16, dtype=DT), R3, stabilizer=TINY)
    assert torch.allclose(Rl.sum(-1), R3.sum(-1), rtol=1e-9, atol=1e-12)  # per token
    Rl_b = ora.layernorm_rule(x, w, 0.5 * _randn(16, seed=80), R3, stabilizer=TINY)
    assert not torch.allclose(Rl_b.sum(-1), R3.sum(-1), atol=1e-3)
    Rm = ora.mean_rule(x, R3[:, 0], 1, stabilizer=TINY)
    assert torch.allclose(Rm.sum(1), R3[:, 0])
    # softmax does not conserve: sum R_x = sum R - (sum R) * sum(x y) per row ...
    s = _randn(2, 5, seed=81)
    Rs_in = _randn(2, 5, seed=82)
    Rs = ora.softmax_rule(s, Rs_in, stabilizer=TINY)
    y = torch.softmax(s, -1)
    expected = (s * Rs_in).sum(-1) - Rs_in.sum(-1) * (s * y).sum(-1)
    assert torch.allclose(Rs.sum(-1), expected)
    # ... and its total does not move under a shift of the scores when sum R = 0
    Rz = Rs_in - Rs_in.mean(-1, keepdim=True)
    assert torch.allclose(ora.softmax_rule(s + 3.0, Rz, TINY).sum(-1),
                          ora.softmax_rule(s, Rz, TINY).sum(-1))


# ==============================================================================================
# Model level
# ==============================================================================================


def _modgrad_attnlrp(model, x, target):
    """AttnLRP as one autograd pass through a modified forward written here (not the oracle's):
    frozen LayerNorm sigma, half gradient through products of two input-dependent tensors,
    GELU as ``x * (gelu(x) / x).detach()``."""
    m = copy.deepcopy(model).to(x.dtype)
    x = x.clone().requires_grad_(True)

    def ln(t, mod):
        sd = (t.var(-1, unbiased=False, keepdim=True) + mod.eps).sqrt().detach()
        return (t - t.mean(-1, keepdim=True)) / sd * mod.weight + mod.bias

    def half(y):
        return 0.5 * y + 0.5 * y.detach()

    with torch.enable_grad():
        B = x.shape[0]
        t = F.conv2d(x, m.patch_embed.weight, m.patch_embed.bias, stride=4)
        t = t.reshape(B, t.shape[1], -1).permute(0, 2, 1)
        if m.cls_token is not None:
            t = torch.cat([m.cls_token.detach().expand(B, 1, -1), t], 1)
        t = t + m.pos.detach()
        for blk in m.blocks:
            D, H = t.shape[-1], blk.attn.num_heads
            h = ln(t, blk.ln1)
            q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).chunk(3, -1)
            q, k, v = (u.reshape(B, -1, H, D // H).transpose(1, 2) for u in (q, k, v))
            s = half(torch.einsum("bhtd,bhsd->bhts", q * blk.attn.scale, k))
            a = torch.softmax(s, -1)
            o = half(torch.einsum("bhts,bhsd->bhtd", a, v)).transpose(1, 2).reshape(B, -1, D)
            t = t + F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias)
            f = F.linear(ln(t, blk.ln2), blk.mlp.fc1.weight, blk.mlp.fc1.bias)
            f = f * (F.gelu(f) / f).detach()
            t = t + F.linear(f, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        t = ln(t, m.norm)
        t = t[:, 0] if m.pool == "cls" else t.mean(1)
        logits = F.linear(t, m.head.weight, m.head.bias)
        with torch.no_grad():
            assert torch.allclose(logits, m(x), rtol=0, atol=1e-12)
        sel = logits.gather(1, torch.as_tensor(target).reshape(-1, 1).expand(B, 1))
        (g,) = torch.autograd.grad(sel.sum(), x)
    return (x * g).detach()


@pytest.mark.parametrize("pool,cls", CONFIGS)
def test_epsilon_limit_equals_attnlrp_and_modified_gradient(pool, cls):
    model = ora.TinyViT(pool=pool, cls_token=cls, seed=1)
    x = _image(2, seed=2)
    target = torch.tensor([1, 3])
    A = ora.reference_attnlrp(model, x, target)
    assert A.shape == x.shape and A.dtype == DT
    R = ora.reference_relevance(model, x, target, conv_rule="epsilon", dense_rule="epsilon",
                                epsilon=1e-12, stabilizer=1e-12)
    assert _rel_err(R, A) < 1e-6
    assert _rel_err(A, _modgrad_attnlrp(model, x, target)) < 1e-10
    # a real stabiliser moves it away (the check is not vacuous)
    R_big = ora.reference_relevance(model, x, target, conv_rule="epsilon",
                                    dense_rule="epsilon", epsilon=0.1, stabilizer=0.1)
    assert _rel_err(R_big, A) > 1e-3


def test_rule_dispatch_through_the_trace():
    model = ora.TinyViT(seed=2)
    x = _image(2, seed=3)
    outs = {}
    for conv_rule in ora.LAYER_RULES:
        R, rel = ora.reference_relevance(model, x, 4, conv_rule=conv_rule, dense_rule="gamma",
                                         stabilizer=1e-4, return_trace=True)
        outs[conv_rule] = (R, rel)
        tr = ora.oracle_forward(model, x)
        # the conv rule acts only on the patch embedding, which gets exactly conv2d_rule
        assert torch.equal(rel["conv_out"], outs[ora.LAYER_RULES[0]][1]["conv_out"])
        ref_in = ora.conv2d_rule(x, tr["conv_w"], tr["conv_b"], rel["conv_out"], rule=conv_rule,
                                 stabilizer=1e-4, stride=4)
        assert torch.allclose(R, ref_in, rtol=1e-12, atol=1e-15)
        # the head gets the dense rule; the seed is onehot * logits
        seed = torch.zeros_like(tr["logits"])
        seed[:, 4] = tr["logits"][:, 4]
        assert torch.equal(rel["logits"], seed)
        assert torch.allclose(rel["pooled"], ora.linear_rule(
            tr["pooled"], *tr["head_p"], seed, rule="gamma", stabilizer=1e-4))
        # the cls token's share is dropped, the rest moves with the values
        assert torch.equal(rel["tokens"], rel["x_cat"][:, 1:])
        assert torch.equal(rel["conv_out"].flatten(2).transpose(1, 2), rel["tokens"])
        assert rel["x_cat"][:, 0].abs().sum() > 0
        # pool cls: only the cls position of the last LayerNorm output gets relevance
        assert rel["xn"][:, 1:].abs().sum() == 0
    assert _rel_err(outs["zplus"][0], outs["epsilon"][0]) > 1e-2
    # dense gamma with gamma = 0 is dense epsilon (same stabiliser)
    R_g0 = ora.reference_relevance(model, x, 4, dense_rule="gamma", gamma=0.0, stabilizer=1e-4)
    R_e = ora.reference_relevance(model, x, 4, dense_rule="epsilon", epsilon=1e-4,
                                  stabilizer=1e-4)
    assert _rel_err(R_g0, R_e) < 1e-10
    # epsilon is used by the epsilon layer rule only
    assert torch.equal(ora.reference_relevance(model, x, 4, conv_rule="zplus",
                                               dense_rule="zplus", epsilon=0.5),
                       ora.reference_relevance(model, x, 4, conv_rule="zplus",
                                               dense_rule="zplus", epsilon=1e-9))
    with pytest.raises(ValueError):
        ora.reference_relevance(model, x, 4, dense_rule="alpha1beta0")


@pytest.mark.parametrize("conv_rule,dense_rule", [("zplus", "epsilon"), ("gamma", "gamma"),
                                                  ("epsilon", "zplus")])
def test_batch_equals_per_sample(conv_rule, dense_rule):
    model = ora.TinyViT(pool="mean", seed=5)
    x = _image(3, seed=6)
    target = torch.tensor([0, 2, 4])
    R = ora.reference_relevance(model, x, target, conv_rule=conv_rule, dense_rule=dense_rule)
    A = ora.reference_attnlrp(model, x, target)
    for i in range(3):
        Ri = ora.reference_relevance(model, x[i:i + 1], int(target[i]), conv_rule=conv_rule,
                                     dense_rule=dense_rule)
        assert torch.allclose(R[i:i + 1], Ri, rtol=1e-10, atol=1e-14), i
        Ai = ora.reference_attnlrp(model, x[i:i + 1], target[i:i + 1])
        assert torch.allclose(A[i:i + 1], Ai, rtol=1e-10, atol=1e-14), i


def test_targets_shapes_dtypes_and_model_untouched():
    model = ora.TinyViT(seed=7)
    state = copy.deepcopy(model.state_dict())
    x = _image(2, seed=8)
    with torch.no_grad():
        before = model(x.float())
    R_int = ora.reference_relevance(model, x, 3)
    assert R_int.shape == (2, 3, 16, 16) and R_int.dtype == DT
    assert torch.isfinite(R_int).all() and R_int.abs().sum() > 0
    for t in ([3, 3], torch.tensor([3, 3]), torch.tensor(3), (3, 3)):
        assert torch.equal(ora.reference_relevance(model, x, t), R_int)
    R_mix = ora.reference_relevance(model, x, [3, 1])
    assert torch.equal(R_mix[0], R_int[0]) and not torch.allclose(R_mix[1], R_int[1])
    with pytest.raises(ValueError):
        ora.reference_relevance(model, x, [1, 2, 3])
    # float32 input: float32 output, close to the float64 reference
    R32 = ora.reference_relevance(model, x.float(), 3)
    assert R32.dtype == torch.float32
    assert _rel_err(R32.double(), R_int) < 1e-3
    A = ora.reference_attnlrp(model, x, 3)
    assert A.shape == x.shape and torch.isfinite(A).all()
    # the model is untouched: parameters, dtype, mode, output
    with torch.no_grad():
        after = model(x.float())
    assert torch.equal(before, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == torch.float32, k
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
