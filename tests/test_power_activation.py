"""A power with a number for exponent is an elementwise activation (StarReLU,
``s * relu(x) ** 2 + b``, in the MetaFormers: PoolFormerV2, ConvFormer, CAFormer); every
method refused it until December 2026. Every way of writing it gives the same map; a tensor
exponent or a tensor raised to a traced power stays refused by the relevance methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import UnsupportedOperationError

pytestmark = pytest.mark.usefixtures("float64_default")

WRITINGS = {
    "operator": lambda t: t ** 2,
    "method": lambda t: t.pow(2),
    "function": lambda t: torch.pow(t, 2),
    "square": torch.square,
}


class StarReLUNet(nn.Module):
    """A CNN whose activations are StarReLU, a residual block, a pooled head; ``tokens``: an
    attention over the positions too (SRD on token vectors, the transformer rules)."""

    def __init__(self, power=WRITINGS["operator"], tokens: bool = False):
        super().__init__()
        self.power, self.tokens = power, tokens
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.scale, self.shift = nn.Parameter(torch.tensor(0.8)), nn.Parameter(torch.tensor(-0.1))
        self.head = nn.Linear(6, 4)

    def star(self, x):
        return self.scale * self.power(F.relu(x)) + self.shift

    def forward(self, x):
        x = self.star(self.conv1(x))
        if self.tokens:
            t = x.flatten(2).transpose(1, 2)
            x = x + F.scaled_dot_product_attention(t, t, t).transpose(1, 2).reshape(x.shape)
        x = x + self.conv2(self.star(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _model(power=WRITINGS["operator"], tokens: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = StarReLUNet(power, tokens).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


@pytest.mark.parametrize("tokens", [False, True], ids=["cnn", "tokens"])
def test_srd_conserves_through_a_power(tokens):
    model, x = _model(tokens=tokens), _x()
    srd = srdxai.SRD(model, seed="logit").attribute(x, [1, 3])
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor([1, 3])]
    torch.testing.assert_close(srd.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["srd", "lrp_epsilon_plus", "abslrp", "attnlrp",
                                    "gradient_x_input", "deeplift_rescale", "gradcam"])
@pytest.mark.parametrize("writing", ["method", "function", "square"])
def test_every_writing_gives_the_same_map(method, writing):
    x = _x()
    expected = srdxai.explain(_model(), x, [1, 3], method)
    got = srdxai.explain(_model(WRITINGS[writing]), x, [1, 3], method)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_the_gradient_is_the_true_one():
    model, x = _model(), _x()
    leaf = x.clone().requires_grad_(True)
    model(leaf)[:, 1].sum().backward()
    expected = (leaf.grad * x).sum(1)
    torch.testing.assert_close(srdxai.explain(model, x, 1, "gradient_x_input"), expected,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("power", [lambda t: 2 ** t, lambda t: t ** t.detach().abs()],
                         ids=["number-base", "tensor-exponent"])
@pytest.mark.parametrize("method", ["srd", "abslrp"])
def test_other_powers_are_refused(power, method):
    with pytest.raises(UnsupportedOperationError, match="pow"):
        srdxai.explain(_model(power), _x(), 1, method)
