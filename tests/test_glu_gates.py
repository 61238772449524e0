"""GLU variants as gates: in a product of two equally shaped input-dependent tensors where one is
an activation's output and the other is not (SwiGLU's ``silu(x W) * (x V)`` in EVA, StarNet's
``relu6(a) * b``), the activation's output is the gate, a constant weight (docs/srd.md), as a
sigmoid gate already was. So the map equals the map of the same model multiplying by the gate's
value precomputed for that input (a constant), on both SRD engines (the PFV engine for a CNN,
token vectors with attention) and for the LRP composites, which share the convention. Products
of two activations' outputs stay refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import UnsupportedOperationError

pytestmark = pytest.mark.usefixtures("float64_default")


def _x(size: int = 8) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


class StarBlock(nn.Module):
    """A CNN with StarNet's star operation ``relu6(f1(x)) * f2(x)``; ``gate``: that factor's
    value for one input, multiplied as a constant instead."""

    def __init__(self, gate: torch.Tensor | None = None):
        super().__init__()
        self.gate = gate
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.f1, self.f2 = nn.Conv2d(6, 8, 1), nn.Conv2d(6, 8, 1)
        self.g = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def gate_value(self, x):
        return F.relu6(self.f1(F.relu(self.stem(x))))

    def forward(self, x):
        x = F.relu(self.stem(x))
        gate = F.relu6(self.f1(x)) if self.gate is None else self.gate
        x = x + self.g(gate * self.f2(x))
        return self.head(F.relu(x).mean((2, 3)))


class SwiGLUViT(nn.Module):
    """Patch tokens, attention, and EVA's SwiGLU MLP ``fc2(silu(fc1_g(x)) * fc1_x(x))``."""

    def __init__(self, gate: torch.Tensor | None = None, dim: int = 8):
        super().__init__()
        self.gate = gate
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc1_g, self.fc1_x = nn.Linear(dim, 12), nn.Linear(dim, 12)
        self.fc2 = nn.Linear(12, dim)
        self.head = nn.Linear(dim, 4)

    def tokens(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, -1)
        return t + F.scaled_dot_product_attention(q, k, v)

    def gate_value(self, x):
        return F.silu(self.fc1_g(self.tokens(x)))

    def forward(self, x):
        t = self.tokens(x)
        gate = F.silu(self.fc1_g(t)) if self.gate is None else self.gate
        t = t + self.fc2(gate * self.fc1_x(t))
        return self.head(t.mean(1))


def _pair(cls, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    gated = cls().eval()
    with torch.no_grad():
        for p in gated.parameters():
            p.normal_(0, 0.4)
        value = gated.gate_value(x)
    constant = cls(gate=value).eval()
    constant.load_state_dict(gated.state_dict())
    return gated, constant


@pytest.mark.parametrize("cls", [StarBlock, SwiGLUViT])
def test_the_two_models_agree_on_the_input(cls):
    x = _x()
    gated, constant = _pair(cls, x)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), constant(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls, method", [(StarBlock, "srd"), (StarBlock, "epsilon_lrp"),
                                         (SwiGLUViT, "srd"), (SwiGLUViT, "srd_tokens")])
def test_the_gate_is_a_constant_weight(cls, method):
    x = _x()
    gated, constant = _pair(cls, x)
    a = srdxai.explain(gated, x, [1, 3], method)
    b = srdxai.explain(constant, x, [1, 3], method)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())


@pytest.mark.parametrize("method", ["lrp_epsilon_plus", "lrp_zplus"])
def test_the_lrp_composites_take_the_star_gate(method):
    """They share the convention (the signal takes all) and now run; they do not equal the
    constant-gate model to rounding (1e-7 - 1e-5 relative here, as with a sigmoid gate before
    this change), so only the run is checked."""
    x = _x()
    gated, _ = _pair(StarBlock, x)
    assert torch.isfinite(srdxai.explain(gated, x, [1, 3], method)).all()


@pytest.mark.parametrize("cls", [StarBlock, SwiGLUViT])
def test_srd_conserves_through_the_gate(cls):
    gated, _ = _pair(cls, _x())
    x = _x()
    srd = srdxai.SRD(gated, seed="logit").attribute(x, [1, 3])
    with torch.no_grad():
        logits = gated(x)[torch.arange(2), torch.tensor([1, 3])]
    torch.testing.assert_close(srd.sum((1, 2)), logits, rtol=1e-9, atol=1e-12)


def _attention_first(x: torch.Tensor) -> torch.Tensor:
    """``x`` plus an attention over its positions (so that SRD takes token vectors)."""
    t = x.flatten(2).transpose(1, 2)
    return x + F.scaled_dot_product_attention(t, t, t).transpose(1, 2).reshape(x.shape)


class TwoActivations(nn.Module):
    def __init__(self, tokens: bool):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Conv2d(3, 4, 2, stride=2)
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.embed(x))
        if self.tokens:  # an attention first, so that SRD takes token vectors
            x = _attention_first(x)
        x = F.gelu(self.a(x)) * torch.tanh(self.b(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("tokens", [False, True], ids=["pfv", "tokens"])
def test_a_product_of_two_activations_is_refused(tokens):
    with pytest.raises(UnsupportedOperationError, match="gate"):
        srdxai.explain(TwoActivations(tokens).eval(), _x(), 1, "srd")


class SelfProduct(nn.Module):
    """``h * relu(h)``: a square of the positive part, not a gate (the activation's input is
    the other factor)."""

    def __init__(self, tokens: bool):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Conv2d(3, 4, 2, stride=2)
        self.a = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.embed(x))
        if self.tokens:
            x = _attention_first(x)
        h = self.a(x)
        return self.head(F.adaptive_avg_pool2d(h * F.relu(h), 1).flatten(1))


@pytest.mark.parametrize("tokens", [False, True], ids=["pfv", "tokens"])
def test_an_activation_of_the_other_factor_is_no_gate(tokens):
    with pytest.raises(UnsupportedOperationError, match="gate"):
        srdxai.explain(SelfProduct(tokens).eval(), _x(), 1, "srd")


class ResampledGate(nn.Module):
    """GhostNetV2's attention gate: a sigmoid computed on a pooled copy of the map and
    upsampled back to its size, ``x * F.interpolate(sigmoid(...), size)`` (equal shapes, the
    signal first); ``tokens``: an attention first, so SRD takes token vectors."""

    def __init__(self, gate: torch.Tensor | None = None, tokens: bool = False,
                 mode: str = "nearest"):
        super().__init__()
        self.gate, self.tokens, self.mode = gate, tokens, mode
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.short = nn.Conv2d(6, 6, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def features(self, x):
        x = F.relu(self.stem(x))
        if self.tokens:
            x = _attention_first(x)
        return x

    def gate_value(self, x):
        x = self.features(x)
        small = torch.sigmoid(self.short(F.avg_pool2d(x, 2)))
        return F.interpolate(small, size=x.shape[-2:], mode=self.mode)

    def forward(self, x):
        x = self.features(x)
        if self.gate is None:
            small = torch.sigmoid(self.short(F.avg_pool2d(x, 2)))
            gate = F.interpolate(small, size=x.shape[-2:], mode=self.mode)
        else:
            gate = self.gate
        return self.head(F.relu(self.conv(x * gate)).mean((2, 3)))


@pytest.mark.parametrize("tokens, method", [(False, "srd"), (True, "srd_tokens"),
                                            (False, "lrp_epsilon_plus")])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_a_resampled_sigmoid_is_the_gate(tokens, method, mode):
    x = _x()
    torch.manual_seed(0)
    gated = ResampledGate(tokens=tokens, mode=mode).eval()
    with torch.no_grad():
        for p in gated.parameters():
            p.normal_(0, 0.4)
        value = gated.gate_value(x)
    constant = ResampledGate(value, tokens, mode).eval()
    constant.load_state_dict(gated.state_dict())
    a = srdxai.explain(gated, x, [1, 3], method)
    b = srdxai.explain(constant, x, [1, 3], method)
    rtol = 1e-5 if method.startswith("lrp") else 1e-9  # the composites: see above
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
