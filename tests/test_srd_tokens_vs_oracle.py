"""SRD on token vectors (``srd_tokens``) equals the independent slow reference
(``srd_tokens_oracle.py``, written from the definition with loops over tokens, heads and pixels,
without reading the engine or ``methods/srd_tokens.py``), plus self-checks of that oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import srd_tokens_oracle as ora
import srdxai
from srdxai.models import zoo

DT = torch.float64


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    """Non-trivial LayerNorm weights / biases, signed Linear / Conv biases, and a class token and
    position embedding large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(-1.0, 1.5, generator=g)
                mod.bias.uniform_(-0.3, 0.3, generator=g)
            elif isinstance(mod, nn.Linear | nn.Conv2d) and mod.bias is not None:
                mod.bias.uniform_(-0.2, 0.2, generator=g)
        m.cls_token.normal_(0.0, 0.5, generator=g)
        m.pos_embed.normal_(0.0, 0.3, generator=g)
    return m.double().eval()


def _case(activation: str, size: int, seed: int = 7):
    torch.manual_seed(0)
    model = _randomize(zoo.small_vit(num_classes=4, activation=activation, image_size=size),
                       seed=seed)
    x = torch.randn(2, 3, size, size, dtype=DT, generator=torch.Generator().manual_seed(11))
    return model, x


# --------------------------------------------------------------------------------------------
# oracle self-checks
# --------------------------------------------------------------------------------------------


def test_sharing_ratio_of_zero_vector_is_zero():
    assert ora.sharing_ratio([1.0, 2.0], [0.0, 0.0]) == 0.0
    assert ora.sharing_ratio([1.0, 1.0], [2.0, 0.0]) == pytest.approx(0.5)


def test_patch_embed_kernel_by_hand():
    """One token of 2 pixels (1 x 2 patch), 1 input channel, D = 2.

    c0 = (1, 0) * 3 = (3, 0), c1 = (0, 2) * 1 = (0, 2), b = (1, 1), z = (4, 3), ||z||^2 = 25.
    Bias shares by norms 3 : 2: b0 = (0.6, 0.6), b1 = (0.4, 0.4).
    mu0 = <(3.6, 0.6), (4, 3)> / 25 = 16.2 / 25 = 0.648, mu1 = <(0.4, 2.4), (4, 3)> / 25 = 0.352.
    """
    weight = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]], dtype=DT)  # (D=2, C=1, 1, 2)
    bias = torch.tensor([1.0, 1.0], dtype=DT)
    x = torch.tensor([[[3.0, 1.0]]], dtype=DT)                         # (C=1, H=1, W=2)
    Rp, sums = ora.patch_embed_kernel(x, weight, bias, np.array([10.0]))
    np.testing.assert_allclose(Rp, [[6.48, 3.52]], rtol=1e-12)
    np.testing.assert_allclose(sums, [1.0], rtol=1e-12)
    # without a bias share the ratios are 12/25 and 6/25, and no longer sum to 1
    Rn, sums_n = ora.patch_embed_kernel(x, weight, bias, np.array([10.0]), bias_split="none")
    np.testing.assert_allclose(Rn, [[4.8, 2.4]], rtol=1e-12)
    np.testing.assert_allclose(sums_n, [18 / 25], rtol=1e-12)


def test_patch_embed_kernel_zero_contributions_split_bias_evenly():
    weight = torch.ones(2, 1, 1, 2, dtype=DT)
    Rp, sums = ora.patch_embed_kernel(torch.zeros(1, 1, 2, dtype=DT), weight,
                                      torch.tensor([1.0, -2.0], dtype=DT), np.array([4.0]))
    np.testing.assert_allclose(Rp, [[2.0, 2.0]])
    np.testing.assert_allclose(sums, [1.0])


def test_residual_kernel_by_hand():
    """a = (1, 0), b = (1, 2): z = (2, 2), mu_a = 2/8, mu_b = 6/8."""
    Ra, Rb, sums = ora.residual_kernel(np.array([[1.0, 0.0], [0.0, 0.0]]),
                                       np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([8.0, 5.0]))
    np.testing.assert_allclose(Ra, [2.0, 0.0])
    np.testing.assert_allclose(Rb, [6.0, 0.0])
    assert sums[0] == pytest.approx(1.0) and np.isnan(sums[1])  # z = 0: no ratio, no relevance


def test_attention_value_kernel_by_hand():
    """A = [[.5, .5], [.25, .75]], v = I: o0 = (.5, .5), o1 = (.25, .75).
    mu_{0->0} = mu_{1->0} = .5; mu_{0->1} = .0625/.625 = .1, mu_{1->1} = .5625/.625 = .9.
    R_o = (4, 10): R_v = (.5*4 + .1*10, .5*4 + .9*10) = (3, 11)."""
    A = np.array([[0.5, 0.5], [0.25, 0.75]])
    Rv, sums = ora.attention_value_kernel(A, np.eye(2), np.array([4.0, 10.0]))
    np.testing.assert_allclose(Rv, [3.0, 11.0], rtol=1e-12)
    np.testing.assert_allclose(sums, [1.0, 1.0], rtol=1e-12)


@pytest.mark.parametrize("activation,size", [("gelu", 16), ("relu", 32)])
def test_oracle_forward_mirrors_the_model(activation, size):
    model, x = _case(activation, size)
    rec = ora.vit_forward(model, x)
    with torch.no_grad():
        np.testing.assert_allclose(rec["tokens"], model.patch_embed(x).numpy(), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(rec["logits"], model(x).numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation,size", [("gelu", 16), ("relu", 32)])
def test_oracle_conservation_and_ratio_sums(activation, size):
    model, x = _case(activation, size)
    tr = ora.srd_tokens_trace(model, x, [1, 3], check=True)
    y = tr["logit"]
    np.testing.assert_allclose(y, [tr["logits"][0, 1], tr["logits"][1, 3]])
    # every block's input tokens carry the whole logit (residual and attention conserve)
    np.testing.assert_allclose(tr["block_input_sums"], np.repeat(y[:, None], 5, 1), rtol=1e-10)
    # the class token takes a real share at the embedding, the pixels get the rest
    assert np.all(np.abs(tr["cls_share"]) > 1e-6 * np.abs(y))
    np.testing.assert_allclose(tr["embed_token_sums"], y - tr["cls_share"], rtol=1e-10)
    np.testing.assert_allclose(tr["map"].sum((1, 2)).numpy(), y - tr["cls_share"], rtol=1e-10)
    assert set(tr["mu_errors"]) == {"residual_mlp", "residual_attn", "attention", "patch_embed"}
    assert max(tr["mu_errors"].values()) < 1e-12


# --------------------------------------------------------------------------------------------
# the library against the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_library_equals_the_slow_reference(activation, size):
    model, x = _case(activation, size)
    target = [1, 3]
    expected = ora.srd_tokens_reference(model, x, target)
    got = srdxai.explain(model, x, target, "srd_tokens")
    assert got.shape == (2, size, size)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got.to(DT), expected, rtol=1e-6,
                               atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("variant", [{"bias_split": "none"}, {"head_split": "projection"}])
def test_comparison_tells_apart_other_readings(variant):
    """The comparison above is sharp enough to reject a plausible misreading of the rule."""
    model, x = _case("gelu", 16)
    wrong = ora.srd_tokens_trace(model, x, [1, 3], check=False, **variant)["map"]
    got = srdxai.explain(model, x, [1, 3], "srd_tokens").to(DT)
    assert (got - wrong).abs().max() > 1e-3 * float(wrong.abs().max())
