"""``F.normalize`` (Swin V2's cosine attention) in the operation view: a normalisation whose
norm the relevance rules take as a constant, as they take LayerNorm's standard deviation. So
for one input, a model that normalises gets the same map as the same model multiplying by the
reciprocal norms precomputed for that input (a constant scale, a rule every method has), and
the gradient methods still see the true derivative of the norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.engine.optrace import detached_normalize

pytestmark = pytest.mark.usefixtures("float64_default")


class CosineAttention(nn.Module):
    """Patch tokens, one cosine-attention block (normalised queries and keys, as Swin V2),
    a normalised residual stream and a mean-pooled head. ``scales``: the reciprocal norms
    of the three normalised tensors for one input, multiplied instead of normalising."""

    def __init__(self, scales: tuple[torch.Tensor, ...] | None = None):
        super().__init__()
        self.scales = scales
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def parts(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return t, self.q(t), self.k(t)

    def forward(self, x):
        t, q, k = self.parts(x)
        if self.scales is None:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        else:
            q, k = q * self.scales[0], k * self.scales[1]
        attn = torch.softmax(q @ k.transpose(-2, -1) * 5.0, -1)
        h = t + attn @ self.v(t)
        h = F.normalize(h, dim=-1) if self.scales is None else h * self.scales[2]
        return self.head(h.mean(1))


def models(x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    normalising = CosineAttention().eval()
    with torch.no_grad():
        t, q, k = normalising.parts(x)
        attn = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
                             * 5.0, -1)
        h = t + attn @ normalising.v(t)
        scales = tuple(1 / v.norm(dim=-1, keepdim=True) for v in (q, k, h))
    scaling = CosineAttention(scales).eval()
    scaling.load_state_dict(normalising.state_dict())
    return normalising, scaling


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def test_the_two_models_agree_on_the_input(x):
    normalising, scaling = models(x)
    with torch.no_grad():
        torch.testing.assert_close(normalising(x), scaling(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["abslrp", "attnlrp", "cp_lrp", "lrp_epsilon_plus",
                                    "lrp_epsilon", "srd", "srd_tokens"])
def test_relevance_rules_take_the_norm_as_a_constant(x, method):
    normalising, scaling = models(x)
    a = srdxai.explain(normalising, x, [1, 3], method)
    b = srdxai.explain(scaling, x, [1, 3], method)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_srd_sums_to_the_logit_through_normalisations(x):
    normalising, _ = models(x)
    m = srdxai.explain(normalising, x, [1, 3], "srd")
    logits = normalising(x).detach()[torch.arange(2), torch.tensor([1, 3])]
    torch.testing.assert_close(m.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)


def test_gradients_keep_the_derivative_of_the_norm(x):
    """The gradient family differentiates the model as it is: the two models' input
    gradients differ (the scaling one lacks the norm's derivative), and the normalising
    one's is autograd's."""
    normalising, scaling = models(x)
    a = srdxai.explain(normalising, x, [1, 3], "gradient_x_input")
    b = srdxai.explain(scaling, x, [1, 3], "gradient_x_input")
    assert not torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    leaf = x.clone().requires_grad_(True)
    out = normalising(leaf)
    (grad,) = torch.autograd.grad(out[torch.arange(2), torch.tensor([1, 3])].sum(), leaf)
    torch.testing.assert_close(a, (grad * x).sum(1), rtol=1e-9, atol=1e-12)


def test_detached_normalize_is_the_value_with_a_constant_norm():
    v = torch.randn(3, 5, requires_grad=True)
    y = detached_normalize(v, dim=-1)
    torch.testing.assert_close(y, F.normalize(v, dim=-1))
    (g,) = torch.autograd.grad(y.sum(), v)
    torch.testing.assert_close(g, (1 / v.norm(dim=-1, keepdim=True)).expand(3, 5))
    tiny = torch.zeros(1, 4)
    assert torch.equal(detached_normalize(tiny, dim=-1), tiny)  # eps, as F.normalize
