"""Self-checks of the SRD oracle for operations beyond plain CNNs (tests/srd_oracle_ops.py),
independent of the engine: brute forward checks, conservation, ERF sums, gate branches, a
hand-computed toy, interpolation / adaptive-pool weights against torch, agreement with the
plain-CNN oracle (tests/srd_oracle.py) on a model both describe, and the sum layers (residual
sums as identity PFV layers): their names, that they change nothing where a sum feeds an
activation, and what they change on a residual stream without activations (StreamNet)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

try:
    from . import small_models as sm  # type: ignore[no-redef]
    from . import srd_oracle_ops as so  # type: ignore[no-redef]
    from .srd_oracle import srd_oracle  # type: ignore[no-redef]
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import small_models as sm  # type: ignore[no-redef]
    import srd_oracle_ops as so  # type: ignore[no-redef]
    from srd_oracle import srd_oracle  # type: ignore[no-redef]

MODELS = list(so.OPS_MODEL_CLASSES)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


@pytest.mark.parametrize("name", MODELS)
def test_forward_brute(name: str) -> None:
    """Recomputed pre-activations / PFV layers / logits equal the model's own forward (hooks),
    every node recomputed from its components equals the torch op, and at every block output
    position the path vectors (contributions + bias shares) add up to z(q)."""
    model = so.build_ops_model(name, seed=3)
    x = so.ops_input(name, seed=1)
    counts = so.check_forward(model, x)
    assert counts["nodes"] > 0 and counts["positions"] > 0


def test_forward_brute_non_relu_and_no_spatial_cat() -> None:
    so.check_forward(so.build_ops_model("GateNet", act="silu", seed=4), so.ops_input("GateNet", 2))
    m = so.build_ops_model("SliceNet", act="gelu", seed=4, spatial_cat=False)
    so.check_forward(m, so.ops_input("SliceNet", 2))


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "gelu"])
@pytest.mark.parametrize("name", MODELS)
def test_conservation(name: str, act: str) -> None:
    """The logit-seeded pixel map sums to the target logit per sample; no relevance dropped."""
    model = so.build_ops_model(name, act=act, seed=11)
    x = so.ops_input(name, seed=5)
    target = torch.tensor([1, 3])
    stats: dict[str, int] = {}
    rel = so.srd_oracle_ops_relevance(model, x, target, stats=stats)
    rmap = rel["input"]
    assert rmap.shape == (x.shape[0], x.shape[2], x.shape[3]) and rmap.dtype == torch.float64
    assert stats["dropped"] == 0
    with torch.no_grad():
        logits = model(x)[torch.arange(2), target]
    torch.testing.assert_close(rmap.sum(dim=(1, 2)), logits, rtol=1e-9, atol=1e-12)
    assert rmap.abs().sum() > 0
    torch.testing.assert_close(so.srd_oracle_ops(model, x, target), rmap, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_contrastive_map_sums_to_zero(name: str) -> None:
    model = so.build_ops_model(name, seed=2)
    x = so.ops_input(name, seed=3)
    rmap = so.srd_oracle_ops(model, x, 0, contrastive=True)
    layer, seed = so.ops_logit_seed(model, x, 0)
    scale = float(seed.abs().sum())
    assert rmap.sum(dim=(1, 2)).abs().max().item() < 1e-9 * scale
    same = so.srd_oracle_ops_layer_seed(model, x, layer, seed - seed.mean((1, 2), keepdim=True))
    torch.testing.assert_close(rmap, same, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", MODELS)
def test_erf_of_one_hot_sums_to_one(name: str) -> None:
    """Every PFV layer, two positions (one per batch row of a duplicated input): the ERF sums to
    1 (no z(q) = 0 is met, asserted)."""
    model = so.build_ops_model(name, act="relu", seed=6)
    x1 = so.ops_input(name, seed=7)[:1]
    x = torch.cat([x1, x1], 0)
    for layer, (_, h, w) in so.pfv_layers(model, x).items():
        if layer == "input":
            continue
        seed = torch.zeros(2, h, w, dtype=torch.float64)
        seed[0, h // 2, w - 1] = 1.0
        seed[1, 0, 0] = 1.0
        stats: dict[str, int] = {}
        erf = so.srd_oracle_ops_relevance(model, x, seeds={layer: seed}, stats=stats)["input"]
        assert stats["dropped"] == 0, layer
        torch.testing.assert_close(
            erf.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-9
        )
        assert erf[0].abs().sum() > 0, layer


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_gate_branches_get_exactly_zero_relevance(act: str) -> None:
    """The gate is a constant weight: its sigmoid PFV layers (and se_act, which only feeds the
    SE gate) receive exactly 0; the signal layers receive relevance."""
    model = so.build_ops_model("GateNet", act=act, seed=8)
    x = so.ops_input("GateNet", seed=9)
    rel = so.srd_oracle_ops_relevance(model, x, [0, 2])
    for layer in so.GATE_BRANCH_LAYERS["GateNet"]:
        assert torch.equal(rel[layer], torch.zeros_like(rel[layer])), layer
    for layer in ("act1", "act2", "act4", "act5", "input"):
        assert rel[layer].abs().sum() > 0, layer
    # and in the toy
    m = so.build_ops_model("TinyCatGateNet", seed=1, num_classes=1)
    r = so.srd_oracle_ops_relevance(m, torch.randn(1, 1, 3, 4, dtype=torch.float64), 0)
    assert torch.equal(r["sig"], torch.zeros_like(r["sig"]))


def test_hand_computed_cat_gate_toy() -> None:
    """x = (1, -2) (1 channel, 1x2). Gate g_i = σ(0.5·x_i + 0.1), t = x·g.
    conv over cat([x, t]) with kernel (1, 2): ch0 weights (1, 0.5), ch1 weights (3, -1), bias 0.45.
    One output position q, four paths (all start at input positions):
    x0·1 = 1, x1·0.5 = -1, t0·3 = 3·g0, t1·(-1) = 2·g1. The bias is split over all four by |c|.
    ReLU, head 1.5·v - 0.2 (one position: R(q) = logit)."""
    m = so.TinyCatGateNet("relu").double().eval()
    with torch.no_grad():
        m.gconv.weight.fill_(0.5)
        m.gconv.bias.fill_(0.1)
        m.conv.weight.copy_(torch.tensor([[[[1.0, 0.5]], [[3.0, -1.0]]]], dtype=torch.float64))
        m.conv.bias.fill_(0.45)
        m.fc.weight.fill_(1.5)
        m.fc.bias.fill_(-0.2)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64).reshape(1, 1, 1, 2)

    def sig(a: float) -> float:
        return 1.0 / (1.0 + math.exp(-a))

    g0, g1 = sig(0.5 * 1 + 0.1), sig(0.5 * -2 + 0.1)
    c = [1.0, -1.0, 3.0 * g0, 2.0 * g1]  # paths: x0 direct, x1 direct, x0 gated, x1 gated
    tot = sum(abs(v) for v in c)
    b = [0.45 * abs(v) / tot for v in c]
    z = sum(c) + 0.45
    assert z > 0
    logit = 1.5 * z - 0.2
    mu = [(ci + bi) / z for ci, bi in zip(c, b, strict=True)]
    expected = torch.tensor([(mu[0] + mu[2]) * logit, (mu[1] + mu[3]) * logit], dtype=torch.float64)
    got = so.srd_oracle_ops(m, x, 0)
    torch.testing.assert_close(got[0, 0], expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert abs(float(m(x)[0, 0]) - logit) < 1e-12
    assert abs(float(got.sum()) - logit) < 1e-12


def test_even_split_where_all_norms_are_zero() -> None:
    """A zero region of the input: conv1's bias at positions whose whole window is zero is split
    evenly; conservation still holds and the zero pixels receive relevance through it."""
    model = so.build_ops_model("CatNet", seed=12)
    x = so.ops_input("CatNet", seed=13)
    x[:, :, 2:7, 1:6] = 0.0
    stats: dict[str, int] = {}
    rel = so.srd_oracle_ops_relevance(model, x, [2, 0], stats=stats)
    assert stats["even_splits"] >= 2 * 9  # conv1: the 3x3 interior of the 5x5 zero square
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor([2, 0])]
    torch.testing.assert_close(rel["input"].sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
    assert (rel["input"][:, 3:6, 2:5].abs() > 0).all()


@pytest.mark.parametrize(
    "size,kw",
    [
        ((4, 5), {"scale_factor": 2, "mode": "nearest"}),
        ((5, 7), {"size": (7, 9), "mode": "nearest"}),
        ((5, 7), {"size": (3, 4), "mode": "nearest"}),
        ((5, 7), {"size": (7, 9), "mode": "nearest-exact"}),
        ((5, 7), {"size": (7, 9), "mode": "bilinear", "align_corners": False}),
        ((5, 7), {"size": (7, 9), "mode": "bilinear", "align_corners": True}),
        ((8, 10), {"size": (5, 7), "mode": "bilinear", "align_corners": False}),
        ((8, 10), {"size": (5, 7), "mode": "bilinear", "align_corners": True}),
        ((4, 5), {"scale_factor": 2, "mode": "bilinear", "align_corners": False}),
        ((4, 6), {"scale_factor": 1.5, "mode": "bilinear", "align_corners": False}),
        ((3, 1), {"size": (1, 4), "mode": "bilinear", "align_corners": True}),
    ],
)
def test_interpolation_components_match_torch(size, kw) -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    node = so._InterpNode(so._Leaf("v", v), **kw)
    mode = kw["mode"]
    torch_kw = {k: a for k, a in kw.items() if k != "mode"}
    ref = F.interpolate(v, mode=mode, **torch_kw)
    assert torch.equal(node.ref, ref)
    out = torch.zeros_like(ref)
    for n in range(2):
        for ui in range(ref.shape[2]):
            for uj in range(ref.shape[3]):
                srcs = node.sources((ui, uj))
                assert 1 <= len(srcs) <= 4
                for i, off, p in srcs:
                    out[n, :, ui, uj] += node.apply(n, i, off, p, (ui, uj), v[n, :, p[0], p[1]])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)


def test_adaptive_windows_match_torch() -> None:
    g = torch.Generator().manual_seed(1)
    cases = [((5, 4), (3, 7)), ((8, 10), (5, 4)), ((7, 3), (4, 3)), ((4, 4), (7, 7))]
    for (h, w), (oh, ow) in cases:
        v = torch.randn(1, 2, h, w, generator=g, dtype=torch.float64)
        wins = (so.adaptive_windows(h, oh), so.adaptive_windows(w, ow))
        ref = F.adaptive_avg_pool2d(v, (oh, ow))
        for i in range(oh):
            for j in range(ow):
                block = v[0, :, wins[0][i]][:, :, wins[1][j]]
                torch.testing.assert_close(
                    block.mean((1, 2)), ref[0, :, i, j], rtol=1e-12, atol=1e-13
                )
    assert so.adaptive_windows(5, 3) == [[0, 1], [1, 2, 3], [3, 4]]
    assert so.adaptive_windows(4, 7) == [[0], [0, 1], [1], [1, 2], [2], [2, 3], [3]]


def test_agrees_with_plain_cnn_oracle_on_resnetlike() -> None:
    """The general DAG machinery reproduces tests/srd_oracle.py on small_models.ResNetLike
    (conv+BN fusion, identity and downsample shortcuts)."""
    model = sm.build_model("ResNetLike", act="silu", seed=3)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        so.srd_oracle_ops(model, x, [1, 4]), srd_oracle(model, x, [1, 4]), rtol=1e-12, atol=1e-12
    )


def test_float32_model_is_handled_in_float64() -> None:
    model = so.build_ops_model("UpsampleNet", seed=4)
    x = so.ops_input("UpsampleNet", seed=3)
    torch.testing.assert_close(
        so.srd_oracle_ops(model.float(), x.float(), 1),
        so.srd_oracle_ops(so.build_ops_model("UpsampleNet", seed=4), x.float().double(), 1),
        rtol=1e-12,
        atol=1e-12,
    )


def test_layer_names_and_errors() -> None:
    model = so.build_ops_model("GateNet", seed=0)
    x = so.ops_input("GateNet")
    layers = so.pfv_layers(model, x)
    assert list(layers) == [
        "input",
        "act1",
        "se_act",
        "se_sig",
        "act2",
        "sp_sig",
        "silu_sig",
        "act4",
        "cb_sig",
        "act5",
    ]
    assert layers["se_sig"] == (6, 1, 1) and layers["cb_sig"] == (1, 8, 8)
    with pytest.raises(KeyError):
        so.srd_oracle_ops_layer_seed(model, x, "conv1", torch.zeros(2, 8, 8))
    with pytest.raises(ValueError):
        so.srd_oracle_ops_layer_seed(model, x, "act1", torch.zeros(2, 4, 4))
    with pytest.raises(TypeError):
        so.srd_oracle_ops(sm.build_model("PlainNet"), torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ValueError):
        so.build_ops_model("GateNet", act="sigmoid")


# ----------------------------------------------------------------------------------------------
# GroupNorm / LayerNorm with fixed statistics (NormNet, ConvNeXtLike, TinyNormNet)
# ----------------------------------------------------------------------------------------------


def test_norm_models_layer_names_and_random_norm_params() -> None:
    m = so.build_ops_model("NormNet", seed=0)
    x = so.ops_input("NormNet")
    assert so.pfv_layers(m, x) == {"input": (3, 8, 10), "act1": (6, 8, 10), "act2": (8, 8, 10)}
    c = so.build_ops_model("ConvNeXtLike", seed=0)
    xc = so.ops_input("ConvNeXtLike")
    assert so.pfv_layers(c, xc) == {
        "input": (3, 8, 8),
        "act": (16, 4, 4),
        "sum": (8, 4, 4),
        "act_out": (8, 4, 4),
    }
    assert so.pfv_layers(c, xc, sum_layers=False) == {
        "input": (3, 8, 8),
        "act": (16, 4, 4),
        "act_out": (8, 4, 4),
    }
    assert isinstance(c.act, torch.nn.GELU) and isinstance(c.act_out, torch.nn.ReLU)
    # non-trivial affine parameters of every norm, non-zero biases, random layer scale
    for mod in (m.gn1, m.ln2, c.stem_norm, c.norm, c.head_norm):
        assert (mod.weight - 1).abs().min() > 0 and mod.bias.abs().min() > 0
    for mod in (m.conv1, m.conv2, c.stem, c.dwconv, c.pwconv1, c.pwconv2, c.fc):
        assert mod.bias.abs().min() > 0
    assert c.gamma.abs().min() > 0 and c.gamma.std() > 0


@pytest.mark.parametrize("act,block_act", [("relu", "relu"), ("gelu", "gelu"), ("silu", "relu")])
def test_convnext_block_act_conservation_and_brute(act: str, block_act: str) -> None:
    """The block activation of ConvNeXtLike is configurable too: brute forward check and
    conservation to 1e-9 with it."""
    model = so.build_ops_model("ConvNeXtLike", act=act, seed=13, block_act=block_act)
    x = so.ops_input("ConvNeXtLike", seed=14)
    so.check_forward(model, x)
    target = torch.tensor([2, 0])
    stats: dict[str, int] = {}
    rel = so.srd_oracle_ops_relevance(model, x, target, stats=stats)
    assert stats["dropped"] == 0
    with torch.no_grad():
        logits = model(x)[torch.arange(2), target]
    torch.testing.assert_close(rel["input"].sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
    # every PFV layer conserves what its seed gave it (one-block chain: act_out -> act -> input)
    torch.testing.assert_close(rel["act_out"].sum((1, 2)), logits, rtol=1e-9, atol=1e-12)


def test_norm_nodes_reproduce_torch() -> None:
    """Each norm node recomputed from its components (scale γ/σ on the input vector at the same
    position, plus the per-sample / per-position bias β − γµ/σ) equals torch's GroupNorm
    (several group counts), LayerNorm2d and the channels-last nn.LayerNorm; the GroupNorm scale
    is constant over positions, the LayerNorm scale is not."""
    g = torch.Generator().manual_seed(5)
    v = 1.5 * torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64) + 0.7
    leaf = so._Leaf("v", v)
    mods = [torch.nn.GroupNorm(k, 6).double() for k in (1, 2, 3, 6)]
    mods += [so.LayerNorm2d(6, eps=1e-5).double(), torch.nn.LayerNorm(6).double()]
    for mod in mods:
        so.randomize_norms(mod, 3)
        cl = isinstance(mod, torch.nn.LayerNorm)
        node = so._NormNode(leaf, mod, channels_last=cl)
        with torch.no_grad():
            ref = mod(v.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if cl else mod(v)
        torch.testing.assert_close(node.ref, ref, rtol=0, atol=0)
        out = torch.zeros_like(ref)
        for n in range(2):
            for i in range(3):
                for j in range(4):
                    ((k, off, p),) = node.sources((i, j))
                    assert k == 0 and p == (i, j)
                    out[n, :, i, j] = node.apply(n, 0, off, p, (i, j), v[n, :, i, j])
                    out[n, :, i, j] += node.bias_at(n, (i, j))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        per_pos = (node.scale - node.scale[:, :, :1, :1]).abs().max()
        if isinstance(mod, torch.nn.GroupNorm):
            assert per_pos == 0
        else:
            assert per_pos > 1e-3
        assert (node.scale[0] - node.scale[1]).abs().max() > 1e-3  # per sample


def test_hand_computed_layernorm_toy() -> None:
    """TinyNormNet, x (1, 3, 1, 2): conv (kernel (1, 2), bias b) -> LayerNorm2d (γ, β, ε=1e-5)
    -> ReLU -> Linear(3, 1). Two paths k = 0, 1 with c_k = W_k x_k. The conv bias is split by
    ||c_k|| (at the conv output: no fusion); the LayerNorm fixes µ, σ of y = c_0 + c_1 + b,
    scales by s = γ/σ and splits its bias β − γµ/σ by ||s ⊙ c_k|| (measured after the scale);
    the conv shares are carried through s. One output position: R(q) = logit."""
    W0 = [[1.0, -0.5, 0.25], [0.3, 0.8, -1.2], [-0.7, 0.2, 0.6]]
    W1 = [[0.4, 1.1, -0.3], [-0.9, 0.5, 0.2], [0.1, -0.6, 1.3]]
    b = [0.35, -0.2, 0.5]
    gam = [1.3, -0.6, 0.9]
    bet = [0.2, -0.4, 0.7]
    fw, fb = [0.8, -1.1, 0.5], 0.15
    x0, x1 = [0.9, -1.4, 0.3], [-0.2, 0.7, 1.6]
    eps = 1e-5

    m = so.TinyNormNet("relu").double().eval()
    with torch.no_grad():
        f64 = torch.float64
        w = torch.stack([torch.tensor(W0, dtype=f64), torch.tensor(W1, dtype=f64)], -1)
        m.conv.weight.copy_(w[:, :, None, :])
        m.conv.bias.copy_(torch.tensor(b, dtype=f64))
        m.ln.weight.copy_(torch.tensor(gam, dtype=f64))
        m.ln.bias.copy_(torch.tensor(bet, dtype=f64))
        m.fc.weight.copy_(torch.tensor([fw], dtype=f64))
        m.fc.bias.fill_(fb)
    x = torch.tensor([x0, x1], dtype=torch.float64).T.reshape(1, 3, 1, 2)

    def mv(A, v):
        return [sum(a * e for a, e in zip(row, v, strict=True)) for row in A]

    def norm(v):
        return math.sqrt(sum(e * e for e in v))

    def dot(a, c):
        return sum(e * f for e, f in zip(a, c, strict=True))

    def solve(measure_after_scale: bool) -> list[float]:
        c = [mv(W0, x0), mv(W1, x1)]
        nc = [norm(ck) for ck in c]
        bk = [[bi * nk / sum(nc) for bi in b] for nk in nc]
        y = [c[0][i] + c[1][i] + b[i] for i in range(3)]
        mu = sum(y) / 3
        sig = math.sqrt(sum((e - mu) ** 2 for e in y) / 3 + eps)
        s = [gi / sig for gi in gam]
        shift = [bet[i] - gam[i] * mu / sig for i in range(3)]
        sc = [[s[i] * ck[i] for i in range(3)] for ck in c]
        ns = [norm(v) for v in sc] if measure_after_scale else nc
        P = [
            [sc[k][i] + s[i] * bk[k][i] + shift[i] * ns[k] / sum(ns) for i in range(3)]
            for k in range(2)
        ]
        z = [P[0][i] + P[1][i] for i in range(3)]
        logit = dot(fw, [max(e, 0.0) for e in z]) + fb
        zz = dot(z, z)
        return [dot(P[k], z) / zz * logit for k in range(2)] + [logit]

    r0, r1, logit = solve(True)
    with torch.no_grad():
        assert abs(float(m(x)[0, 0]) - logit) < 1e-12
    got = so.srd_oracle_ops(m, x, 0)
    torch.testing.assert_close(
        got[0, 0], torch.tensor([r0, r1], dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    # the toy discriminates: measuring the norm split before the scale gives another map
    a0, a1, _ = solve(False)
    assert abs(a0 - r0) > 1e-4 and abs(a1 - r1) > 1e-4
    so.check_forward(m, x)


def test_head_layernorm_seed() -> None:
    """ConvNeXtLike's head GAP -> LayerNorm -> Linear with the LayerNorm statistics fixed per
    sample: position q's seed is fc(γ ⊙ (v(q) − µ)/σ + β) / n with µ, σ those of the pooled
    vector (head biases split evenly), and the seed sums to the logit."""
    model = so.build_ops_model("ConvNeXtLike", seed=21)
    x = so.ops_input("ConvNeXtLike", seed=22)
    layer, seed = so.ops_logit_seed(model, x, [3, 1])
    assert layer == "act_out"
    with torch.no_grad():
        h = model.stem_norm(model.stem(x))
        t = model.dwconv(h).permute(0, 2, 3, 1)
        t = model.pwconv2(model.act(model.pwconv1(model.norm(t)))) * model.gamma
        v = model.act_out(h + t.permute(0, 3, 1, 2))  # (N, 8, 4, 4)
        pooled = v.mean((2, 3))
        var, mu = torch.var_mean(pooled, dim=1, unbiased=False, keepdim=True)
        sig = torch.sqrt(var + model.head_norm.eps)
        ln = model.head_norm
        per_pos = (v - mu[:, :, None, None]) / sig[:, :, None, None]
        per_pos = per_pos * ln.weight[:, None, None] + ln.bias[:, None, None]
        out = torch.einsum("kc,nchw->nkhw", model.fc.weight, per_pos)
        out = (out + model.fc.bias[None, :, None, None]) / 16
        expected = out[torch.arange(2), torch.tensor([3, 1])]
        logits = model(x)[torch.arange(2), torch.tensor([3, 1])]
    torch.testing.assert_close(seed, expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(seed.sum((1, 2)), logits, rtol=1e-12, atol=1e-13)


def test_convnext_shortcut_and_block_paths() -> None:
    """The stem output is not a PFV layer: act's block starts at the input (through stem conv,
    stem LayerNorm2d, depthwise conv, LayerNorm, pwconv1), and act_out's block has the input
    (through stem, stem_norm) and act (through pwconv2, gamma) as leaves; relevance seeded at
    act_out reaches the input both directly and through act."""
    model = so.build_ops_model("ConvNeXtLike", seed=23)
    x = so.ops_input("ConvNeXtLike", seed=24)
    g = so._build_graph(model, x, sum_layers=False)
    assert [b.out_layer for b in g.blocks] == ["act", "act_out"]
    memo = so._PathMemo()
    leaves_act = {p[0] for p in memo.paths(g.blocks[0].root, (1, 2))}
    leaves_out = {p[0] for p in memo.paths(g.blocks[1].root, (1, 2))}
    assert leaves_act == {"input"} and leaves_out == {"input", "act"}
    # act at (1, 2): 4x4 map, 7x7 depthwise with padding 3 reads all 16 stem positions, each
    # from 4 input positions (2x2 stride-2 stem): 64 paths; act_out: 4 (shortcut) + 1 (act)
    assert len(memo.paths(g.blocks[0].root, (1, 2))) == 64
    assert len(memo.paths(g.blocks[1].root, (1, 2))) == 5
    # with sum layers the sum takes act_out's old block; act_out's block is the identity on it
    gs = so._build_graph(model, x)
    assert [(b.out_layer, b.is_sum) for b in gs.blocks] == [
        ("act", False),
        ("sum", True),
        ("act_out", False),
    ]
    memo = so._PathMemo()
    assert len(memo.paths(gs.blocks[0].root, (1, 2))) == 64
    assert {p[0] for p in memo.paths(gs.blocks[1].root, (1, 2))} == {"input", "act"}
    assert len(memo.paths(gs.blocks[1].root, (1, 2))) == 5
    assert memo.paths(gs.blocks[2].root, (1, 2)) == [("sum", (1, 2), ())]
    seed = torch.zeros(2, 4, 4, dtype=torch.float64)
    seed[:, 1, 2] = 1.0
    rel = so.srd_oracle_ops_relevance(model, x, seeds={"act_out": seed})
    through_act = rel["act"].sum((1, 2))
    torch.testing.assert_close(
        rel["input"].sum((1, 2)), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert (through_act.abs() > 1e-3).all() and ((1 - through_act).abs() > 1e-3).all()
    assert (rel["act"][:, 1, 2] == rel["act"].sum((1, 2))).all()  # pointwise: only q itself


def test_norm_even_split_where_all_norms_are_zero() -> None:
    """A zero square in NormNet's input: at the 3x3 interior of the 5x5 square conv1's paths all
    have zero contributions, so conv1's bias and gn1's bias are both split evenly there (2 entry
    ops x 9 positions x 2 samples); conservation still holds."""
    model = so.build_ops_model("NormNet", seed=12)
    x = so.ops_input("NormNet", seed=13)
    x[:, :, 2:7, 1:6] = 0.0
    stats: dict[str, int] = {}
    rel = so.srd_oracle_ops_relevance(model, x, [2, 0], stats=stats)
    assert stats["even_splits"] >= 2 * 9 * 2
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor([2, 0])]
    torch.testing.assert_close(rel["input"].sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
    assert (rel["input"][:, 3:6, 2:5].abs() > 0).all()


# ----------------------------------------------------------------------------------------------
# Sum layers: every sum of two input-dependent tensors is a PFV layer (identity activation)
# ----------------------------------------------------------------------------------------------

# the models of OPS_MODEL_CLASSES (and ResNetLike) whose sums each feed an activation directly
SUMS_BEFORE_ACT = {
    "SliceNet": ["sum"],
    "UpsampleNet": ["sum"],
    "ConvNeXtLike": ["sum"],
    "ResNetLike": ["layer1:sum", "layer2:sum"],
}
STREAM_SUMS = ["blocks.0:sum", "blocks.1:sum", "blocks2.0:sum"]


def _model_and_input(name: str, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "ResNetLike":
        model = sm.build_model("ResNetLike", act="silu", seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        return model, torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g)
    return so.build_ops_model(name, seed=seed), so.ops_input(name, seed=seed + 1)


def test_sum_layer_names_follow_the_modules_forward() -> None:
    """The torch-function mode of the graph build names the sums by the module whose forward did
    them: one sum -> "<module>:sum", several -> "@0", "@1", ... in forward order, the top level
    -> "sum"; sums with a constant, a parameter or a scalar are not sums of two input-dependent
    tensors; torch.add, +, += and Tensor.add all count."""

    class Inner(torch.nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.add(h, 2 * h)

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, 1, 1))
            self.inner = torch.nn.Sequential(Inner(), Inner())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + 1.0  # scalar
            h = h + self.w  # parameter
            h = h + torch.ones_like(h)  # constant: does not depend on the input
            h = h + x  # sum@0
            h = self.inner(h)  # inner.0:sum, inner.1:sum
            h += x * 0.5  # sum@1
            return h.add(x)  # sum@2

    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    m = Outer().double()
    out, _, sums = so._hooked_forward(m, x, [])
    assert list(sums) == ["sum@0", "inner.0:sum", "inner.1:sum", "sum@1", "sum@2"]
    h = x + 1.0 + 1.0 + 1.0 + x
    torch.testing.assert_close(sums["sum@0"], h, rtol=0, atol=0)
    h1 = h + 2 * h
    torch.testing.assert_close(sums["inner.1:sum"], h1 + 2 * h1, rtol=0, atol=0)
    torch.testing.assert_close(sums["sum@2"], out, rtol=0, atol=0)
    assert so.sum_layer_names(["a", "", "a", "b"]) == ["a:sum@0", "sum", "a:sum@1", "b:sum"]


def test_streamnet_layers_and_parameters() -> None:
    model = so.build_ops_model("StreamNet", seed=0)
    x = so.ops_input("StreamNet")
    assert so.pfv_layers(model, x) == {
        "input": (3, 8, 8),
        "blocks.0.act": (16, 4, 4),
        "blocks.0:sum": (8, 4, 4),
        "blocks.1.act": (16, 4, 4),
        "blocks.1:sum": (8, 4, 4),
        "blocks2.0.act": (16, 2, 2),
        "blocks2.0:sum": (8, 2, 2),
    }
    assert list(so.pfv_layers(model, x)) == [
        "input",
        "blocks.0.act",
        "blocks.0:sum",
        "blocks.1.act",
        "blocks.1:sum",
        "blocks2.0.act",
        "blocks2.0:sum",
    ]  # forward order
    assert list(so.pfv_layers(model, x, sum_layers=False)) == [
        "input",
        "blocks.0.act",
        "blocks.1.act",
        "blocks2.0.act",
    ]
    assert list(so.sum_layers_of(model, x)) == STREAM_SUMS
    mods = dict(model.named_modules())
    for b in ("blocks.0", "blocks.1", "blocks2.0"):
        assert isinstance(mods[b], so.StreamBlock) and isinstance(mods[b + ".act"], torch.nn.ReLU)
        assert mods[b].gamma.abs().min() > 0 and mods[b].gamma.std() > 0
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            assert mod.bias.abs().min() > 0
        if isinstance(mod, (torch.nn.LayerNorm, so.LayerNorm2d)):
            assert (mod.weight - 1).abs().min() > 0 and mod.bias.abs().min() > 0
    # no activation anywhere on the stream: the activations are exactly the three block ones
    acts = [k for k, m in model.named_modules() if isinstance(m, sm.ACTIVATION_TYPES)]
    assert acts == ["blocks.0.act", "blocks.1.act", "blocks2.0.act"]
    layer, seed = so.ops_logit_seed(model, x, 1)
    assert layer == "blocks2.0:sum" and seed.shape == (2, 2, 2)


@pytest.mark.parametrize("sum_layers", [True, False])
def test_streamnet_forward_brute(sum_layers: bool) -> None:
    """Both definitions: the recomputed blocks, sums and logits equal the model's forward, every
    node recomputed from its components equals the torch op, and the path vectors add up to z(q)
    at every block output position (and, without sum layers, at every head input position)."""
    model = so.build_ops_model("StreamNet", act="gelu", seed=3)
    x = so.ops_input("StreamNet", seed=1)
    counts = so.check_forward(model, x, sum_layers=sum_layers)
    # blocks' output positions: 3 acts (16+16+4) + 3 sums (16+16+4) with sum layers, x 2 samples;
    # without: 3 acts + the head input (4)
    assert counts["positions"] == (144 if sum_layers else 80)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_streamnet_conservation_and_the_definitions_differ(act: str) -> None:
    """Both definitions conserve (the pixel map sums to the target logit, 1e-9 relative), but
    they give different maps: on a stream without activations the sum layers change which
    paths the biases and the relevance take. With sum layers every sum layer is a cut of the
    graph: each carries the whole logit; without them the block activations are bypassed by the
    stream, so no layer but the input does."""
    model = so.build_ops_model("StreamNet", act=act, seed=11)
    x = so.ops_input("StreamNet", seed=5)
    target = torch.tensor([1, 3])
    with torch.no_grad():
        logits = model(x)[torch.arange(2), target]
    rels = {}
    for sum_layers in (True, False):
        stats: dict[str, int] = {}
        rel = so.srd_oracle_ops_relevance(model, x, target, stats=stats, sum_layers=sum_layers)
        assert stats == {"dropped": 0, "even_splits": 0}
        torch.testing.assert_close(rel["input"].sum((1, 2)), logits, rtol=1e-9, atol=0)
        rels[sum_layers] = rel
    for layer in STREAM_SUMS:
        torch.testing.assert_close(rels[True][layer].sum((1, 2)), logits, rtol=1e-9, atol=0)
    a, b = rels[True]["input"], rels[False]["input"]
    rel_l1 = float((a - b).abs().sum() / a.abs().sum())
    assert rel_l1 > 0.05, rel_l1
    for layer in ("blocks.0.act", "blocks.1.act", "blocks2.0.act"):
        assert (rels[True][layer] - rels[False][layer]).abs().max() > 1e-3, layer


def test_streamnet_seeding_a_sum_layer_with_its_own_relevance_gives_the_map() -> None:
    """Every path from the head to the input runs through each sum layer: seeding a sum layer
    with its own relevance (of the logit seed, and of the contrastive seed) gives the same pixel
    map (1e-12), as does seeding the head layer with the logit seed map."""
    model = so.build_ops_model("StreamNet", act="silu", seed=2)
    x = so.ops_input("StreamNet", seed=3)
    for contrastive in (False, True):
        rel = so.srd_oracle_ops_relevance(model, x, [0, 2], contrastive=contrastive)
        for layer in STREAM_SUMS:
            got = so.srd_oracle_ops_layer_seed(model, x, layer, rel[layer])
            torch.testing.assert_close(got, rel["input"], rtol=1e-12, atol=1e-13)
    layer, seed = so.ops_logit_seed(model, x, [0, 2])
    rel = so.srd_oracle_ops_relevance(model, x, [0, 2])
    torch.testing.assert_close(rel[layer], seed, rtol=0, atol=0)
    # the head seen as a block of its own (GAP -> target row, head bias split evenly over its
    # paths; what sum_layers=False uses on StreamNet) is the same as the logit seed map
    g = so._build_graph(model, x)
    assert g.head_root is None
    for k, v in so._logit_block_relevance(g, [0, 2]).items():
        torch.testing.assert_close(v, rel[k], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("sum_layers", [True, False])
def test_streamnet_batch_is_per_sample(sum_layers: bool) -> None:
    model = so.build_ops_model("StreamNet", seed=7)
    x = so.ops_input("StreamNet", seed=8, shape=(3, 3, 8, 8))
    target = [3, 0, 2]
    batch = so.srd_oracle_ops(model, x, target, sum_layers=sum_layers)
    for n in range(3):
        one = so.srd_oracle_ops(model, x[n : n + 1], target[n], sum_layers=sum_layers)
        torch.testing.assert_close(batch[n : n + 1], one, rtol=1e-12, atol=1e-13)


def test_streamnet_without_sum_layers_has_no_seed_map() -> None:
    model = so.build_ops_model("StreamNet", seed=0)
    x = so.ops_input("StreamNet")
    with pytest.raises(ValueError):
        so.ops_logit_seed(model, x, 0, sum_layers=False)
    with pytest.raises(ValueError):
        so.srd_oracle_ops(model, x, 0, contrastive=True, sum_layers=False)
    with pytest.raises(KeyError):
        so.srd_oracle_ops_layer_seed(
            model, x, "blocks.0:sum", torch.zeros(2, 4, 4), sum_layers=False
        )


@pytest.mark.parametrize("name", [n for n in MODELS if n != "StreamNet"] + ["ResNetLike"])
def test_sum_layers_change_nothing_where_a_sum_feeds_an_activation(name: str) -> None:
    """Every sum of these models feeds an activation directly: the sum layer's z is that
    activation's z, so relevance projected on it twice is the same. The two definitions give the
    same relevance on every common layer (1e-12), logit seeded and contrastive, and the PFV
    layers differ by exactly the sum layers (none for the models without sums)."""
    model, x = _model_and_input(name, seed=4)
    new = so.pfv_layers(model, x)
    old = so.pfv_layers(model, x, sum_layers=False)
    sums = SUMS_BEFORE_ACT.get(name, [])
    assert list(so.sum_layers_of(model, x)) == sums
    if not sums:
        assert new == old
        return
    assert [k for k in new if k not in old] == sums and all(k in new for k in old)
    for contrastive in (False, True):
        a = so.srd_oracle_ops_relevance(model, x, [1, 0], contrastive=contrastive)
        b = so.srd_oracle_ops_relevance(model, x, [1, 0], contrastive=contrastive, sum_layers=False)
        for k in old:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-13)
    for k in sums:  # the sum layer holds what the activation after it holds
        act = list(new)[list(new).index(k) + 1]
        torch.testing.assert_close(a[k], a[act], rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# Channel permutations (ShuffleNet's channel shuffle): one component per position
# ----------------------------------------------------------------------------------------------


def test_channel_shuffle_permutation_matches_the_models_view_transpose_view() -> None:
    """The oracle's permutation from the shuffle's definition equals what torchvision's
    view / transpose / view does to an index tensor (several channel and group counts); the
    permutation node recomputed from its one component per position equals the torch op; an
    operation that moves positions or drops channels is not taken for a permutation."""
    assert so.shuffle_permutation(6, 2) == [0, 3, 1, 4, 2, 5]
    assert so.shuffle_permutation(6, 3) == [0, 2, 4, 1, 3, 5]
    for c, groups in [(4, 2), (6, 2), (6, 3), (12, 4), (16, 2), (5, 1), (5, 5)]:
        perm = so.permutation_of(lambda t, k=groups: so.channel_shuffle(t, k), (1, c, 2, 3))
        assert perm == so.shuffle_permutation(c, groups), (c, groups)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    node = so._shuffle_node(so._Leaf("v", v), 3)
    assert torch.equal(node.ref, so.channel_shuffle(v, 3))
    out = torch.zeros_like(v)
    for n in range(2):
        for ui in range(3):
            for uj in range(4):
                [(i, off, p)] = node.sources((ui, uj))
                assert p == (ui, uj)
                vec = node.apply(n, i, off, p, (ui, uj), v[n, :, ui, uj])
                # the same entries reordered: the same norm
                assert torch.equal(vec.sort().values, v[n, :, ui, uj].sort().values)
                out[n, :, ui, uj] = vec
    assert torch.equal(out, node.ref)
    assert node.bias is None
    with pytest.raises(AssertionError):
        so.permutation_of(lambda t: t.flip(3), (1, 4, 2, 3))  # moves positions
    with pytest.raises(AssertionError):
        so.permutation_of(lambda t: t[:, [0, 0, 1, 2]], (1, 4, 2, 3))  # not a permutation
    with pytest.raises(AssertionError):  # the op does not perform the stated permutation
        so._ChannelPermNode(
            so._Leaf("v", v), [0, 1, 2, 3, 4, 5], lambda t: so.channel_shuffle(t, 2)
        )


def test_shufflenet_layers_and_paths() -> None:
    """ShuffleNet's PFV layers (no sums: the units concatenate) and the paths of each block at
    one position: a shuffle is one path, so the stride-1 unit's branch reads the second half of
    the downsampling unit's shuffled output through one path per concatenated input (2), and
    act_last's 1x1 conv has exactly one path per concatenated input of the two units (3)."""
    model = so.build_ops_model("ShuffleNet", seed=0)
    x = so.ops_input("ShuffleNet")
    assert so.pfv_layers(model, x) == {
        "input": (3, 8, 8),
        "act1": (8, 8, 8),
        "down.branch1.act": (8, 4, 4),
        "down.branch2.act1": (8, 8, 8),
        "down.branch2.act2": (8, 4, 4),
        "unit.branch2.act1": (8, 4, 4),
        "unit.branch2.act2": (8, 4, 4),
        "act_last": (16, 4, 4),
    }
    assert so.sum_layers_of(model, x) == {}
    g = so._build_graph(model, x)
    memo = so._PathMemo()
    paths = {b.out_layer: memo.paths(b.root, (1, 2)) for b in g.blocks}
    assert {k: len(v) for k, v in paths.items()} == {
        "act1": 9,
        "down.branch1.act": 9,
        "down.branch2.act1": 1,
        "down.branch2.act2": 9,
        "unit.branch2.act1": 2,
        "unit.branch2.act2": 9,
        "act_last": 3,
    }
    assert [p[0] for p in paths["act_last"]] == [
        "down.branch1.act",
        "down.branch2.act2",
        "unit.branch2.act2",
    ]
    assert [p[0] for p in paths["unit.branch2.act1"]] == ["down.branch1.act", "down.branch2.act2"]
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            assert mod.bias is not None and mod.bias.abs().min() > 0


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_channel_shuffle_folds_into_the_next_conv(act: str) -> None:
    """docs/srd.md, "Channel permutations": SRD of a model with a channel shuffle before a
    convolution equals SRD of the model without it whose convolution has the permutation folded
    into its input channels. With out[:, j] = in[:, perm[j]], conv2 reads
    Σ_j W[:, j] in[perm[j]] = Σ_c W[:, perm⁻¹[c]] in[c]: the folded weight is W[:, perm⁻¹]
    (W[:, perm] computes another function: perm is not an involution for 6 channels, 2 groups).
    Same logits (1e-12), same relevance of every PFV layer (1e-10), logit-seeded and
    contrastive. Writing the permutation as a concatenation of single-channel slices computes the
    same function but gives one path per channel (and splits conv2's bias by the channels'
    separate norms): a different map, that still conserves."""
    shuffled = so.build_ops_model("TinyShuffleNet", act=act, seed=5)
    folded = so.build_ops_model("TinyShuffleNet", act=act, seed=5, shuffle="none")
    sliced = so.build_ops_model("TinyShuffleNet", act=act, seed=5, shuffle="slices")
    for a, b in zip(shuffled.state_dict().values(), folded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    perm = so.shuffle_permutation(6, 2)
    inv = [perm.index(c) for c in range(6)]
    assert perm != inv
    x = so.ops_input("TinyShuffleNet", seed=6, shape=(2, 3, 5, 6))
    w = shuffled.conv2.weight.detach().clone()
    with torch.no_grad():
        folded.conv2.weight.copy_(w[:, perm])
        assert (folded(x) - shuffled(x)).abs().max() > 1e-3  # the wrong way round
        folded.conv2.weight.copy_(w[:, inv])
        torch.testing.assert_close(folded(x), shuffled(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sliced(x), shuffled(x), rtol=1e-12, atol=1e-12)
    target = [1, 3]
    for contrastive in (False, True):
        a = so.srd_oracle_ops_relevance(shuffled, x, target, contrastive=contrastive)
        b = so.srd_oracle_ops_relevance(folded, x, target, contrastive=contrastive)
        assert list(a) == list(b) == ["input", "act1", "act2"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-10)
    rel = so.srd_oracle_ops_relevance(shuffled, x, target)
    rs = so.srd_oracle_ops_relevance(sliced, x, target)
    with torch.no_grad():
        logits = shuffled(x)[torch.arange(2), torch.tensor(target)]
    torch.testing.assert_close(rs["input"].sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rel["input"].sum((1, 2)), logits, rtol=1e-9, atol=1e-12)
    diff = float((rs["act1"] - rel["act1"]).abs().sum() / rel["act1"].abs().sum())
    assert diff > 1e-3, diff
    # one path per conv offset through the shuffle, one per (offset, channel) through the slices
    g, gs = so._build_graph(shuffled, x), so._build_graph(sliced, x)
    memo = so._PathMemo()
    assert len(memo.paths(g.blocks[1].root, (2, 3))) == 9
    assert len(memo.paths(gs.blocks[1].root, (2, 3))) == 9 * 6
