"""Operations the engine decomposes beyond plain CNNs, and the cases that used to give a
silently wrong map: each is exact (conservation, equality with an equivalent network) or a
clear ``UnsupportedOperationError``. The path-by-path oracle comparisons for the same
operations are in ``test_srd_ops_vs_oracle.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import UnsupportedOperationError
from srdxai.models.zoo import small_vit
from test_differentiable import _check_directional_derivative


class Case(nn.Module):
    """The small models of the report that SRD's map was silently wrong on."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16 if kind == "cat_mean" else 8, 5)

    def forward(self, x):
        a, b = F.relu(self.c1(x)), F.relu(self.c2(x))
        if self.kind == "cat_slice":
            h = torch.cat([a, b], 1)[:, :8]
        elif self.kind == "cat_mean":
            h = torch.cat([a, b], 1)
        elif self.kind == "slice":
            h = a[:, :8]
        elif self.kind == "chunk":
            h = F.relu(self.c3(a)).chunk(2, 1)[0]
            h = torch.cat([h, h], 1)
        elif self.kind == "silu":
            z = self.c3(a)
            h = z * torch.sigmoid(z)
        elif self.kind == "gate":
            h = a * torch.sigmoid(self.c3(a))
        else:
            h = a
        out = self.fc(h.mean((2, 3)))
        return out.softmax(1) if self.kind == "softmax" else out


EXACT = ["cat_slice", "cat_mean", "slice", "chunk", "silu", "gate"]


@pytest.mark.parametrize("kind", EXACT)
@pytest.mark.parametrize("seed", ["auto", "logit"])
def test_reported_cases_conserve_the_logit(kind, seed):
    torch.manual_seed(0)
    model = Case(kind).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = srdxai.explain(model, x, target=1, method="srd", seed=seed)
    torch.testing.assert_close(m.sum((1, 2)), model(x)[:, 1].detach(), rtol=1e-9, atol=1e-12)
    assert m.abs().sum() > 0


@pytest.mark.parametrize("seed", ["auto", "logit"])
def test_softmax_at_the_output_is_refused(seed):
    model = Case("softmax").double().eval()
    with pytest.raises(UnsupportedOperationError, match="softmax.*explain its logits"):
        srdxai.explain(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), method="srd",
                       seed=seed)


def test_auto_seed_never_switches_to_gradcam_behind_an_undecomposed_operation():
    class Exp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.exp(F.relu(self.c(x))).mean((2, 3)))

    with pytest.raises(UnsupportedOperationError, match="torch.exp"):
        srdxai.explain(Exp().eval(), torch.randn(1, 3, 8, 8), method="srd")


def test_a_product_without_a_gate_is_refused_with_advice():
    class Product(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.c(x))
            return self.fc((h * torch.tanh(h)).mean((2, 3)))

    with pytest.raises(UnsupportedOperationError, match="neither is a gate.*sigmoid"):
        srdxai.explain(Product().eval(), torch.randn(1, 3, 8, 8), method="srd")


class Scaled(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.factor != 1:
            h = h * self.factor
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("method", ["lrp_epsilon", "lrp_epsilon_plus", "lrp_zplus",
                                    "lrp_alpha_beta", "lrp_epsilon_gamma_box", "srd"])
def test_a_constant_scale_compensated_in_the_next_layer_changes_nothing(method):
    """``relu(x) * 3`` followed by a conv with weights / 3 is the same function: LRP
    multiplied its relevance by 3 until the scale passed relevance unchanged."""
    torch.manual_seed(0)
    plain = Scaled(1.0).double().eval()
    scaled = Scaled(3.0).double().eval()
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        scaled.c2.weight /= 3
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(srdxai.explain(scaled, x, 1, method),
                               srdxai.explain(plain, x, 1, method), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["lrp_epsilon", "lrp_epsilon_plus"])
def test_lrp_composites_on_a_vision_transformer(method):
    """They used to sum to -1e5 here (the gradient through LayerNorm, softmax and matmul).
    The CNN rules refuse it; the default picks the transformer rules (tests/test_lrp_rules.py
    checks those against an oracle)."""
    torch.manual_seed(0)
    vit = small_vit(num_classes=4, image_size=16).double().eval()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(UnsupportedOperationError, match="no layer rule.*transformer_rules"):
        srdxai.explain(vit, x, 0, method, transformer_rules=False)
    rel = srdxai.explain(vit, x, 0, method)
    logit = float(vit(x)[0, 0])
    assert torch.isfinite(rel).all() and abs(float(rel.sum())) < 10 * abs(logit) + 1


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt-style block with an activation after it, written channels-last (permute,
    LayerNorm, Linear, layer scale) or channels-first (LayerNorm over channels as a
    function, 1x1 convolutions, a per-channel scale): the same function."""

    def __init__(self, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        t = self.dw(h)
        if self.channels_last:
            t = t.permute(0, 2, 3, 1)
            t = self.fc2(F.gelu(self.fc1(self.norm(t)))) * self.gamma
            t = t.permute(0, 3, 1, 2)
        else:
            t = F.layer_norm(t.permute(0, 2, 3, 1), (6,), self.norm.weight,
                             self.norm.bias, self.norm.eps).permute(0, 3, 1, 2)
            t = F.conv2d(t, self.fc1.weight[:, :, None, None], self.fc1.bias)
            t = F.conv2d(F.gelu(t), self.fc2.weight[:, :, None, None], self.fc2.bias)
            t = t * self.gamma[:, None, None]
        return self.head(F.relu(h + t).mean((2, 3)))


def _randomised(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.double().eval()


# (lrp_epsilon: a composite with one rule for convolutions and dense layers, since the
# channels-last form's Linear gets the dense rule and the other form's 1x1 conv the conv rule)
@pytest.mark.parametrize("method", ["srd", "lrp_epsilon", "guided_backprop", "gradcam",
                                    "fullgrad"])
def test_channels_last_blocks_equal_their_channels_first_form(method):
    torch.manual_seed(0)
    last = _randomised(ChannelsLastBlock(True))
    first = ChannelsLastBlock(False).double().eval()
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(first(x), last(x))
    a = srdxai.explain(last, x, [0, 2], method)
    torch.testing.assert_close(a, srdxai.explain(first, x, [0, 2], method), rtol=1e-9,
                               atol=1e-12)
    if method == "srd":
        torch.testing.assert_close(a.sum((1, 2)), last(x)[[0, 1], [0, 2]].detach(),
                                   rtol=1e-9, atol=1e-12)


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.gn(self.c1(x)))
        return self.fc(self.ln(F.relu(self.c2(h)).mean((2, 3))))


def test_group_and_layer_norm_conserve_and_keep_the_true_gradient_elsewhere():
    model = _randomised(GroupNormNet())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = srdxai.explain(model, x, [1, 2], "srd")
    torch.testing.assert_close(m.sum((1, 2)), model(x)[[0, 1], [1, 2]].detach(), rtol=1e-9,
                               atol=1e-12)
    # methods that take the true gradient still do (the statistics are constants only for
    # the rules that ask for it)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(srdxai.explain(model, x, 1, "gradient_x_input"),
                               (g * x).sum(1))


@pytest.mark.parametrize("method", ["srd", "lrp_epsilon_plus"])
def test_gates_and_norms_give_differentiable_maps(method):
    model = _randomised(GroupNormNet())
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    _check_directional_derivative(model, x, method, {})
    torch.manual_seed(0)
    gated = Case("gate").double().eval()
    _check_directional_derivative(gated, x, method, {}, target=2)


def test_contiguous_after_permute_keeps_its_promise():
    """Swin's windows call ``.contiguous().view`` on permuted tensors; the recorder used to
    return a non-contiguous alias, so every method of the PFV engine crashed there."""

    class Windows(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 2, stride=2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.c(x).permute(0, 2, 3, 1).contiguous()
            n, hh, ww, c = h.shape
            w = h.view(n, hh // 2, 2, ww // 2, 2, c)
            return self.fc(F.gelu(w).mean((1, 2, 3, 4)))

    model = Windows().eval()
    for method in ("gradient", "guided_backprop", "deeplift_rescale", "epsilon_lrp"):
        assert torch.isfinite(srdxai.explain(model, torch.randn(2, 3, 8, 8), 0, method)).all()


def test_the_public_activation_hook_replaces_an_activation_output():
    """``Trace(..., on_activation=...)``: what Ablation-CAM uses instead of reaching into the
    recorder; the replaced value is what every later operation sees."""
    from srdxai.engine import Rule, Trace

    torch.manual_seed(0)
    model = Case("none").double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    seen = []

    def zero_second(index, name, value):
        seen.append((index, name))
        return torch.zeros_like(value) if index == 1 else None

    with Trace(model, x, Rule(), on_activation=zero_second) as trace:
        out = trace.forward()
    assert [i for i, _ in seen] == [0, 1]
    expected = model.fc(F.relu(model.c1(x)).mean((2, 3)))  # b = relu(c2(x)) zeroed: unused
    torch.testing.assert_close(out, expected)

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.c(x)).mean((2, 3)))

    chain = Chain().double().eval()
    with Trace(chain, x, Rule(), on_activation=lambda i, n, v: torch.ones_like(v)) as trace:
        out = trace.forward()
    torch.testing.assert_close(out, chain.fc(torch.ones(2, 4, dtype=torch.float64)))
    with pytest.raises(srdxai.SrdxaiError, match="on_activation returned shape"):
        with Trace(chain, x, Rule(), on_activation=lambda i, n, v: v[:1]) as trace:
            trace.forward()


def test_an_expanded_gate_is_still_a_gate():
    """ECA (timm's EcaModule): ``x * y.expand_as(x)`` with ``y`` a sigmoid's output viewed
    to (N, C, 1, 1); the expanded factor has the signal's shape but is still the gate."""

    class Eca(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.k = nn.Conv1d(1, 1, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.bn(F.relu(self.c(x)))
            y = self.k(h.mean((2, 3)).view(x.shape[0], 1, -1))
            y = torch.sigmoid(y).view(x.shape[0], -1, 1, 1)
            return self.fc(F.relu(h * y.expand_as(h)).mean((2, 3)))

    model = _randomised(Eca())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for method in ("srd", "lrp_epsilon_plus"):
        m = srdxai.explain(model, x, 1, method)
        assert torch.isfinite(m).all() and m.abs().sum() > 0
    m = srdxai.explain(model, x, 1, "srd")
    torch.testing.assert_close(m.sum((1, 2)), model(x)[:, 1].detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cin, cout", [(3, 8), (16, 32), (32, 16), (24, 24)])
@pytest.mark.parametrize("block", [None, 64 * 9])
def test_conv_offset_norms_equal_their_definition(monkeypatch, cin, cout, block):
    """``ConvOp.stacked_norms``: ``|| W_k x(q + k - pad) ||`` over the output channels for every
    kernel offset k and output position q, against unfold and one product per offset. The
    cases cover its three ways of computing it: a Gram form as batched matrix-vector
    products (few input channels), a Gram form as a product and a sum (more input channels
    than 16, fewer than output channels) and the contribution itself (no fewer output
    channels); ``block`` splits the positions into blocks of a few rows."""
    from srdxai.engine import ops

    if block is not None:
        monkeypatch.setattr(ops, "_NORM_BLOCK", block)
    g = torch.Generator().manual_seed(cin + cout)
    conv = nn.Conv2d(cin, cout, 3, padding=1).double()
    x = torch.randn(2, cin, 7, 6, generator=g, dtype=torch.float64)
    op = ops.ConvOp("conv", conv.weight.detach(), None, (1, 1), (1, 1), (1, 1), 1,
                    (7, 6), (7, 6))
    norms = op.stacked_norms(x, op.offset_weights())
    columns = F.unfold(x, 3, padding=1).view(2, cin, 9, 7, 6)  # (N, C, offset, H, W)
    for k, (dy, dx) in enumerate(op.offsets):
        contribution = torch.einsum("oc,nchw->nohw", conv.weight.detach()[:, :, dy, dx],
                                    columns[:, :, 3 * dy + dx])
        torch.testing.assert_close(norms[:, k], contribution.norm(dim=1), rtol=1e-10,
                                   atol=1e-12)
