"""Self-checks of the token-SRD oracle (tests/srd_token_oracle.py), independent of srdxai's
implementation: its forward equals the models' own, the pixel map conserves the target logit for
all three variants (class token, token mean, class + distillation tokens) and two activations,
prefix tokens receive nothing, the distilled head splits as defined, batches are per sample, a
no-block model agrees with a vectorized closed form, and the sharing rule gives hand-derived
numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import srd_token_oracle as ora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)

VARIANTS = list(ora.VARIANTS)


# --------------------------------------------------------------------------- the rule by hand


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def test_shares_residual_by_hand() -> None:
    # a = (1, 0), b = (1, 2): y = (2, 2), ||y||^2 = 8, <a, y> = 2, <b, y> = 6
    a, b = _t(1, 0), _t(1, 2)
    assert ora.shares(a + b, [a, b], [True, True]) == pytest.approx([0.25, 0.75], abs=1e-15)


def test_shares_constant_term_by_hand() -> None:
    # a parameter row (a constant) next to an image-dependent branch: all goes to the branch
    a, b = _t(1, 0), _t(1, 2)
    assert ora.shares(a + b, [a, b], [False, True]) == pytest.approx([0.0, 1.0], abs=1e-15)
    assert ora.shares(a + b, [a, b], [True, False]) == pytest.approx([1.0, 0.0], abs=1e-15)
    # neither depends on the image: y is a constant and passes nothing
    assert ora.shares(a + b, [a, b], [False, False]) == [0.0, 0.0]


def test_shares_attention_constant_value_by_hand() -> None:
    # c1 = (3, 0), c2 = (0, 4) image-dependent, c3 = (1, 1) constant (a prefix value vector).
    # ||c1|| = 3, ||c2|| = 4: beta1 = 3/7 c3, beta2 = 4/7 c3; y = (4, 5), ||y||^2 = 41
    # mu1 = <(3 + 3/7, 3/7), (4, 5)> / 41 = (12 + 27/7) / 41 = 111/287
    # mu2 = <(4/7, 4 + 4/7), (4, 5)> / 41 = (20 + 36/7) / 41 = 176/287
    c1, c2, c3 = _t(3, 0), _t(0, 4), _t(1, 1)
    mu = ora.shares(c1 + c2 + c3, [c1, c2, c3], [True, True, False])
    assert mu == pytest.approx([111 / 287, 176 / 287, 0.0], abs=1e-15)


def test_shares_concat_and_bias_by_hand() -> None:
    # heads (1, 2) and (2,) concatenated: ||y||^2 = 9, shares 5/9 and 4/9
    y = _t(1, 2, 2)
    mu = ora.shares(y, [_t(1, 2, 0), _t(0, 0, 2)], [True, True])
    assert mu == pytest.approx([5 / 9, 4 / 9], abs=1e-15)
    # bias split by ||c||: c1 = (1, 0), c2 = (0, 3), bias (4, 4): beta1 = (1, 1), beta2 = (3, 3)
    # y = (5, 7), ||y||^2 = 74; mu1 = <(2, 1), y>/74 = 17/74, mu2 = <(3, 6), y>/74 = 57/74
    mu = ora.shares(_t(5, 7), [_t(1, 0), _t(0, 3)], [True, True], bias=_t(4, 4))
    assert mu == pytest.approx([17 / 74, 57 / 74], abs=1e-15)
    # all contributions 0: the bias is split evenly; a zero output passes nothing
    mu = ora.shares(_t(2, 0), [_t(0, 0), _t(0, 0)], [True, True], bias=_t(2, 0))
    assert mu == pytest.approx([0.5, 0.5], abs=1e-15)
    assert ora.shares(_t(0, 0), [_t(1, 0), _t(-1, 0)], [True, True]) == [0.0, 0.0]


def test_shares_rejects_incomplete_decomposition() -> None:
    with pytest.raises(AssertionError):
        ora.shares(_t(1, 1), [_t(1, 0)], [True])


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_reproduces_model(variant: str) -> None:
    model = ora.tiny_token_vit(variant, seed=2)
    x = ora.tiny_input(seed=3)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(ora.oracle_logits(model, x), ref, rtol=1e-12, atol=1e-12)
    # a float32 model: the oracle still computes in float64 from its parameters
    model32 = model.float()
    with torch.no_grad():
        ref32 = model32(x.float()).double()
    assert torch.allclose(ora.oracle_logits(model32, x.float()), ref32, rtol=1e-4, atol=1e-5)


def test_variants_shapes() -> None:
    mean = ora.tiny_token_vit("mean")
    dist = ora.tiny_token_vit("distilled")
    assert not hasattr(mean, "cls_token") and mean.pos_embed.shape[1] == 4
    assert dist.pos_embed.shape[1] == 6 and dist.dist_token.shape == (1, 1, 8)
    assert dist.head_dist.out_features == dist.head.out_features == 5


# --------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_conservation(variant: str, activation: str, seed: int) -> None:
    """The map sums to the target logit per sample; nothing is lost and the prefix rows of the
    embedding (parameters) get exactly nothing."""
    model = ora.tiny_token_vit(variant, activation, seed=seed)
    x = ora.tiny_input(seed=seed + 10)
    with torch.no_grad():
        logits = model(x)
    for target in (0, 3):
        trace = ora.srd_token_oracle_trace(model, x, target)
        rmap = ora.srd_token_oracle(model, x, target)
        assert rmap.shape == (2, 16, 16) and rmap.dtype == torch.float64
        for n, s in enumerate(trace):
            want = float(logits[n, target])
            assert abs(float(s["pixel"].sum()) - want) <= 1e-9 * max(abs(want), 1e-3)
            assert s["lost"] <= 1e-12 * max(abs(want), 1.0)
            assert all(r == 0.0 for r in s["prefix"])
            # every layer of the residual stream carries the whole logit
            for layer in s["stream"]:
                assert math.isclose(sum(layer), want, rel_tol=1e-9, abs_tol=1e-12)
            assert torch.equal(rmap[n], s["pixel"])


def test_distilled_seed_splits_by_head() -> None:
    model = ora.tiny_token_vit("distilled", seed=4)
    x = ora.tiny_input(seed=5, n=1)
    with torch.no_grad():
        n1 = model.norm(model.blocks(torch.cat(
            [model.cls_token, model.dist_token, model.patch_embed(x)], 1) + model.pos_embed))
        a, b = model.head(n1[:, 0])[0, 2], model.head_dist(n1[:, 1])[0, 2]
    final = ora.srd_token_oracle_trace(model, x, 2)[0]["stream"][-1]
    assert final[0] == pytest.approx(float(a) / 2, rel=1e-12)
    assert final[1] == pytest.approx(float(b) / 2, rel=1e-12)
    assert all(r == 0.0 for r in final[2:])


def test_batch_is_per_sample() -> None:
    model = ora.tiny_token_vit("vit", seed=6)
    x = ora.tiny_input(seed=7, n=3)
    full = ora.srd_token_oracle(model, x, 1)
    for n in range(3):
        assert torch.equal(full[n], ora.srd_token_oracle(model, x[n:n + 1], 1)[0])


# --------------------------------------------------------------------------- closed form


def test_no_block_mean_model_matches_closed_form() -> None:
    """Without blocks a TokenMeanViT is patch conv, + pos, LayerNorm, mean, head: the map is
    logit * mu_t(mean) * mu_p(conv), recomputed here vectorized (unfold, no loops)."""
    model = ora.tiny_token_vit("mean", seed=8, depth=0)
    x = ora.tiny_input(seed=9)
    k = 4
    conv = model.patch_embed.proj
    with torch.no_grad():
        e = model.patch_embed(x)                                # (N, T, D)
        normed = model.norm(e + model.pos_embed)
        pooled = normed.mean(1)
        logit = model.head(pooled)[:, k]
        mu_t = (normed / normed.shape[1] * pooled[:, None]).sum(-1) \
            / (pooled * pooled).sum(-1, keepdim=True)            # (N, T)
        cols = F.unfold(x, 8, stride=8)                          # (N, C*64, T)
        cols = cols.view(x.shape[0], 3, 64, -1)                  # (N, C, pixel, T)
        w = conv.weight.view(conv.out_channels, 3, 64)           # (D, C, pixel)
        c = torch.einsum("dcp,ncpt->ntpd", w, cols)              # c_{p->t}
        norms = c.norm(dim=-1)
        beta = conv.bias * (norms / norms.sum(-1, keepdim=True))[..., None]
        mu_p = ((c + beta) * e[:, :, None]).sum(-1) / (e * e).sum(-1)[..., None]
        r = logit[:, None, None] * mu_t[..., None] * mu_p       # (N, T, pixel)
        want = F.fold(r.permute(0, 2, 1), (16, 16), 8, stride=8)[:, 0]
    got = ora.srd_token_oracle(model, x, k)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got.sum((1, 2)), logit, rtol=1e-10)
