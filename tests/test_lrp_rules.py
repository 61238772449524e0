"""LRP composites as data (``layer_rules`` overrides by module name or class) and the
transformer rules (``TransformerLRPRule``: the composites on attention and LayerNorm over
tokens), with their automatic choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import InvalidInputError, UnsupportedOperationError

COMPOSITES = ("lrp_epsilon", "lrp_epsilon_plus", "lrp_epsilon_gamma_box", "lrp_alpha_beta",
              "lrp_zplus")


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h)) + h  # a residual sum (Norm rule)
        return self.fc(F.avg_pool2d(h, 2).mean((2, 3)))


def _data(seed: int = 0):
    torch.manual_seed(seed)
    model = TwoConv().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    return model, x


def test_override_by_class_turns_one_composite_into_another():
    model, x = _data()
    plus = srdxai.explain(model, x, method="lrp_epsilon_plus", target=1)
    eps_with_zplus_convs = srdxai.explain(model, x, method="lrp_epsilon", target=1,
                                          layer_rules={nn.Conv2d: "zplus"})
    torch.testing.assert_close(eps_with_zplus_convs, plus, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(plus, srdxai.explain(model, x, method="lrp_epsilon", target=1))


def test_override_by_name_beats_class_and_default():
    model, x = _data(1)
    # conv1 epsilon, conv2 zplus, fc epsilon, reached from two different composites
    a = srdxai.explain(model, x, method="lrp_epsilon", target=2,
                       layer_rules={nn.Conv2d: "zplus", "conv1": "epsilon"})
    b = srdxai.explain(model, x, method="lrp_zplus", target=2,
                       layer_rules={"conv1": "epsilon", "fc": "epsilon"})
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    c = srdxai.explain(model, x, method="lrp_epsilon", target=2, layer_rules={"conv2": "zplus"})
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


def test_override_beats_the_first_layer_rule():
    model, x = _data(2)
    box = srdxai.explain(model, x, method="lrp_epsilon_gamma_box", target=0)
    overridden = srdxai.explain(model, x, method="lrp_epsilon_gamma_box", target=0,
                                layer_rules={"conv1": "gamma"})
    no_first = srdxai.explain(model, x, method="lrp_epsilon_gamma_box", target=0,
                              first_layer=None)
    torch.testing.assert_close(overridden, no_first, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(box, no_first)


@pytest.mark.parametrize("rules, message", [
    ({"conv9": "zplus"}, "does not have"),
    ({"conv": "zplus"}, "did you mean"),
    ({nn.Conv2d: "nonsense"}, "not a layer rule"),
    ({3: "zplus"}, "module name .str. or a module class"),
    ({int: "zplus"}, "module name .str. or a module class"),
    (["conv1"], "must be a dict"),
])
def test_bad_layer_rules_are_refused(rules, message):
    model, x = _data()
    with pytest.raises(InvalidInputError, match=message):
        srdxai.explain(model, x, method="lrp_epsilon", target=0, layer_rules=rules)


class ChannelsLastDense(nn.Module):
    """A dense layer on the channel axis of a channels-last map (ConvNeXt's MLP), or the
    same map as a 1x1 convolution."""

    def __init__(self, as_conv: bool):
        super().__init__()
        self.as_conv = as_conv
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pw = nn.Conv2d(6, 6, 1) if as_conv else nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        if self.as_conv:
            h = self.pw(h)
        else:
            h = self.pw(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(F.relu(h).mean((2, 3)))


def test_a_channels_last_dense_layer_gets_the_dense_rule():
    torch.manual_seed(0)
    dense = ChannelsLastDense(False).double().eval()
    conv = ChannelsLastDense(True).double().eval()
    conv.stem.load_state_dict(dense.stem.state_dict())
    conv.fc.load_state_dict(dense.fc.state_dict())
    conv.pw.weight.data = dense.pw.weight.data[:, :, None, None].clone()
    conv.pw.bias.data = dense.pw.bias.data.clone()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(dense(x), conv(x))
    # epsilon-plus: z+ for convolutions, epsilon for dense layers
    a = srdxai.explain(dense, x, method="lrp_epsilon_plus", target=1)
    b = srdxai.explain(conv, x, method="lrp_epsilon_plus", target=1,
                       layer_rules={"pw": "epsilon"})
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# --- the transformer rules ------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, divide: bool = False):
        super().__init__()
        self.heads, self.divide = heads, divide
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        a = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
        if self.divide:
            a = a.relu()
            a = a / (a.sum(-1, keepdim=True) + 1)  # a normalisation by a division
        else:
            a = a.softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


class TinyTransformer(nn.Module):
    def __init__(self, divide: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm1 = nn.LayerNorm(8)
        self.attn = Attention(divide=divide)
        self.norm2 = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


def _transformer(divide: bool = False):
    torch.manual_seed(0)
    model = TinyTransformer(divide).double().eval()
    for p in model.parameters():
        p.data += 0.1 * torch.randn_like(p)
    return model, torch.randn(2, 3, 8, 8, dtype=torch.float64)


def test_transformers_get_the_transformer_rules_automatically():
    model, x = _transformer()
    for method in COMPOSITES:
        auto = srdxai.explain(model, x, method=method, target=1)
        forced = srdxai.explain(model, x, method=method, target=1, transformer_rules=True)
        torch.testing.assert_close(auto, forced, rtol=0, atol=0)
        assert auto.shape == (2, 8, 8) and torch.isfinite(auto).all()
    with pytest.raises(UnsupportedOperationError, match="transformer_rules"):
        srdxai.explain(model, x, method="lrp_epsilon", target=1, transformer_rules=False)


def test_transformer_rules_at_the_epsilon_limit_are_attnlrp():
    """With every stabiliser -> 0, ``x * J^T (R / y)`` through each call is the gradient
    form of AttnLRP (R / y is its backward signal), which ``tests/test_attnlrp.py`` checks
    against LXT; the composites' epsilon rule is then AttnLRP."""
    model, x = _transformer()
    att = srdxai.explain(model, x, method="attnlrp", target=2)
    eps = srdxai.explain(model, x, method="lrp_epsilon", target=2, epsilon=1e-13,
                         stabilizer=1e-13)
    torch.testing.assert_close(eps, att, rtol=1e-6, atol=1e-9 * float(att.abs().max()))


def test_cnn_and_transformer_rules_agree_where_both_apply():
    """On a CNN without BatchNorm or LayerNorm both rule sets state the same rule for every
    operation (layer rules, Norm on sums and pooling, Pass on activations)."""
    model, x = _data(3)
    for method in COMPOSITES:
        cnn = srdxai.explain(model, x, method=method, target=1)
        ops = srdxai.explain(model, x, method=method, target=1, transformer_rules=True)
        torch.testing.assert_close(ops, cnn, rtol=1e-9, atol=1e-12, msg=method)


class BatchNormResNet(nn.Module):
    """Convolutions without bias, each followed by an eval BatchNorm (ResNet's blocks), a
    downsampling shortcut with its own BatchNorm, a dense layer followed by BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.down, self.bn_down = nn.Conv2d(6, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.bn3 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + self.bn_down(self.down(h)))
        return self.fc2(F.relu(self.bn3(self.fc1(h.mean((2, 3))))))


def test_the_transformer_rules_merge_batchnorm_as_the_cnn_rules_do():
    """A BatchNorm right after a conv / dense layer is merged into it by both rule sets, so
    they agree on a ResNet-style CNN; passing the relevance through the BatchNorm alone (the
    transformer rules until December 2026) blew the epsilon rule up where a convolution's own
    output was near 0 (1e12 times the logit on a random-weight ResNet18)."""
    torch.manual_seed(0)
    model = BatchNormResNet().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(0, 1.0)  # negative scales too: z+ must see W * s
                m.bias.normal_(0, 0.5)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for method in COMPOSITES:
        cnn = srdxai.explain(model, x, method=method, target=1)
        ops = srdxai.explain(model, x, method=method, target=1, transformer_rules=True)
        torch.testing.assert_close(ops, cnn, rtol=1e-9, atol=1e-12 * float(cnn.abs().max()),
                                   msg=method)


def test_transformer_rules_batch_equals_single_and_model_unchanged():
    model, x = _transformer()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_before = x.clone()
    batch = srdxai.explain(model, x, method="lrp_epsilon_plus", target=[0, 2])
    single = torch.cat([srdxai.explain(model, x[i:i + 1], method="lrp_epsilon_plus",
                                       target=t) for i, t in enumerate([0, 2])])
    torch.testing.assert_close(batch, single, rtol=1e-10, atol=1e-13)
    assert torch.equal(x, x_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_division_by_an_input_dependent_tensor_is_refused():
    model, x = _transformer(divide=True)
    with pytest.raises(UnsupportedOperationError, match="division by an input-dependent"):
        srdxai.explain(model, x, method="lrp_epsilon", target=0)


def test_bad_transformer_rules_option():
    model, x = _transformer()
    with pytest.raises(InvalidInputError, match="transformer_rules"):
        srdxai.explain(model, x, method="lrp_epsilon", target=0, transformer_rules="yes")


# --- against the independent oracle (tests/lrp_transformer_oracle.py) -----------------------

ORACLE_CASES = [  # method (options), the oracle's conv rule and dense rule
    ("lrp_epsilon", {}, "epsilon", "epsilon"),
    ("lrp_epsilon_plus", {}, "zplus", "epsilon"),
    ("lrp_zplus", {}, "zplus", "zplus"),
    ("lrp_epsilon_gamma_box", {"first_layer": None}, "gamma", "epsilon"),
    ("lrp_epsilon", {"layer_rules": {nn.Linear: "gamma"}}, "epsilon", "gamma"),
]


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("method, options, conv_rule, dense_rule", ORACLE_CASES)
def test_transformer_rules_equal_the_oracle(method, options, conv_rule, dense_rule, pool):
    from lrp_transformer_oracle import TinyViT, reference_relevance

    model = TinyViT(pool=pool, seed=3).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = [0, 4, 2]
    ours = srdxai.explain(model, x, method=method, target=target, channel_reduce="none",
                          epsilon=0.01, stabilizer=1e-3, gamma=0.3, **options)
    ref = reference_relevance(model, x, target, conv_rule=conv_rule, dense_rule=dense_rule,
                              epsilon=0.01, stabilizer=1e-3, gamma=0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
