"""absLRP on the operation-level engine: definition, options, ViT support and restoration.

The comparison with the independent slow reference (``abslrp_oracle.py``) is in
``test_abslrp_vs_oracle.py``; the shared batch-versus-single and model-restored checks in
``test_methods_common.py``.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from small_models import build_model
from srdxai.errors import UnsupportedOperationError
from srdxai.methods import abslrp as A
from srdxai.models.zoo import SmallResNet, SmallVGG, VisionTransformer, small_vit


def _double(m: nn.Module) -> nn.Module:
    m = m.double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(-1.0, 1.5, generator=g)  # some negative scales
                mod.bias.uniform_(-0.3, 0.3, generator=g)
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(-1.0, 1.5, generator=g)
                mod.bias.uniform_(-0.3, 0.3, generator=g)
    return m


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "vit": _double(small_vit(num_classes=5, image_size=32)),
        "resnet": _double(SmallResNet(num_classes=5)),
        "vgg": _double(SmallVGG(num_classes=5)),
        "plain": _double(build_model("PoolNet")),
        "depthwise": _double(build_model("DepthwiseNet", act="gelu")),
        "silu": _double(build_model("DepthwiseNet", act="silu")),
        "gelu_tanh": _double(_with_tanh_gelu(build_model("PoolNet", act="gelu"))),
    }


def _with_tanh_gelu(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.GELU):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], nn.GELU(approximate="tanh"))
    return model


def _input(m: nn.Module, n: int = 2, seed: int = 4) -> torch.Tensor:
    size = 64 if isinstance(m, SmallVGG) else 32 if isinstance(
        m, VisionTransformer | SmallResNet) else 16
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)


class _AutogradRule(A.AbsLRPRule):
    closed_forms = False


@pytest.mark.parametrize("name", ["vit", "resnet", "vgg", "plain", "depthwise", "silu",
                                  "gelu_tanh"])
def test_closed_forms_equal_the_autograd_definition(name, monkeypatch):
    m = _models()[name]
    x = _input(m)
    fast = srdxai.explain(m, x, [1, 3], "abslrp", channel_reduce="none")
    monkeypatch.setattr(A, "AbsLRPRule", _AutogradRule)
    slow = srdxai.explain(m, x, [1, 3], "abslrp", channel_reduce="none")
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["vit", "resnet", "vgg"])
def test_each_pass_has_unit_mass(name):
    m = _models()[name]
    x = _input(m)
    r = srdxai.explain(m, x, 2, "abslrp", contrastive=False, channel_reduce="none")
    torch.testing.assert_close(r.abs().flatten(1).sum(1), torch.ones(2, dtype=r.dtype))


def test_relu_cnn_relevance_stays_non_negative():
    m = _models()["vgg"]
    r = srdxai.explain(m, _input(m), 2, "abslrp", contrastive=False, channel_reduce="none")
    assert r.min() >= -1e-12 and r.max() > 0


def test_contrastive_is_the_target_pass_minus_the_other_classes_pass():
    m = _models()["resnet"]
    x = _input(m)
    target = torch.tensor([1, 4])
    others = 1.0 - F.one_hot(target, 5).double()
    both = srdxai.explain(m, x, target, "abslrp")
    pos = srdxai.explain(m, x, target, "abslrp", contrastive=False)
    neg = srdxai.explain(m, x, lambda out: (out * others).sum(1), "abslrp", contrastive=False)
    torch.testing.assert_close(both, pos - neg)
    assert not torch.allclose(both, pos)


def test_vit_maps_are_pixel_level():
    m = _models()["vit"]
    x = _input(m, n=3)
    r = srdxai.explain(m, x, None, "abslrp")
    assert r.shape == (3, 32, 32)
    patches = r.reshape(3, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).reshape(3, 16, 64)
    assert (patches.std(-1) > 0).all()  # not one value per patch


class _TinyAttention(nn.Module):
    """One attention layer written with ``F.scaled_dot_product_attention`` or by hand."""

    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(3)
        self.fused = fused
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax((q * 0.5) @ k.transpose(-2, -1), dim=-1) @ v
        return self.head(o.transpose(1, 2).reshape(t.shape[0], t.shape[1], 8).mean(1))


def test_scaled_dot_product_attention_is_split_into_its_steps():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused = srdxai.explain(_TinyAttention(True).double(), x, 1, "abslrp")
    manual = srdxai.explain(_TinyAttention(False).double(), x, 1, "abslrp")
    torch.testing.assert_close(fused, manual)


def test_timm_vit_gives_the_same_map_as_ours():
    try:
        from _compat import import_torchvision

        import_torchvision()
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError as error:  # pragma: no cover - timm is a test dependency
        pytest.skip(f"timm is not usable here: {error}")
    torch.manual_seed(0)
    theirs = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                     num_classes=5, global_pool="token").double().eval()
    ours = VisionTransformer(image_size=32, patch=8, dim=32, depth=2, heads=4,
                             num_classes=5).double().eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(srdxai.explain(theirs, x, 1, "abslrp"),
                               srdxai.explain(ours, x, 1, "abslrp"))


class _WithPlaceholders(nn.Module):
    def __init__(self, placeholders: bool):
        super().__init__()
        torch.manual_seed(5)
        self.placeholders = placeholders
        self.fc1, self.fc2 = nn.Linear(12, 6), nn.Linear(6, 3)
        self.drop, self.ident = nn.Dropout(0.5), nn.Identity()

    def forward(self, x):
        h = F.gelu(self.fc1(x.flatten(1)))
        if self.placeholders:  # no-ops in eval mode: the relevance must not change
            h = self.ident(self.drop(h))
        return self.fc2(h)


def test_identity_placeholders_pass_relevance_unchanged():
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    a = srdxai.explain(_WithPlaceholders(True).double(), x, 0, "abslrp")
    b = srdxai.explain(_WithPlaceholders(False).double(), x, 0, "abslrp")
    torch.testing.assert_close(a, b)


class _InPlace(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(6)
        self.inplace = inplace
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.conv1(x), inplace=self.inplace)
        out = self.conv2(h)
        if self.inplace:
            out += h
            out = torch.relu_(out)
        else:
            out = torch.relu(out + h)
        return self.fc(out.mean((2, 3)))


def test_inplace_calls_give_the_out_of_place_result():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    a = srdxai.explain(_InPlace(True).double(), x, 1, "abslrp")
    b = srdxai.explain(_InPlace(False).double(), x, 1, "abslrp")
    torch.testing.assert_close(a, b)


def test_max_pool_divide_option():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(16, 3)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    default = srdxai.explain(m, x, 0, "abslrp", contrastive=False)
    divided = srdxai.explain(m, x, 0, "abslrp", contrastive=False, max_pool_divide=True)
    assert not torch.allclose(default, divided)


class _UsesExp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)
        self.inner = nn.Sequential(nn.Identity())

    def forward(self, x):
        return self.fc(torch.exp(x.flatten(1)))


def test_unsupported_call_is_a_clear_error_and_the_model_is_restored():
    m = _UsesExp().train()
    where = r"in module '_UsesExp \(the model's own forward\)'"
    with pytest.raises(UnsupportedOperationError, match=r"torch\.exp.*" + where):
        srdxai.explain(m, torch.randn(2, 3, 2, 2), 0, "abslrp")
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_bad_options_are_refused():
    m = _models()["plain"]
    with pytest.raises(srdxai.SrdxaiError, match="channel_reduce"):
        srdxai.explain(m, _input(m), 0, "abslrp", channel_reduce="max")


def test_vit_batch_versus_single_and_model_restored():
    m = _models()["vit"].train()
    params = {k: v.clone() for k, v in m.state_dict().items()}
    x = _input(m, n=3)
    batch = srdxai.explain(m, x, [0, 1, 2], "abslrp")
    single = torch.cat([srdxai.explain(m, x[i:i + 1], i, "abslrp") for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-7, atol=1e-12)
    assert m.training
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in params.items())


def _intline_reference(m: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The paper-era streams, written for a bias-free ``Linear -> ReLU -> Linear`` net by
    hand: each stream normalised and scaled by its mass."""
    lin1, lin2 = m[1], m[3]
    h0 = x.flatten(1)
    z1 = lin1(h0)
    h1 = torch.relu(z1)
    z2 = lin2(h1)

    def terms(inp, w, g):  # x * W^T g + |x| * |W|^T g
        return inp * (g @ w) + inp.abs() * (g @ w.abs())

    def streams(inp, w, r, y, kernel):
        out = torch.zeros_like(inp)
        g = r / (y.abs() + 1e-9)
        for part, mass in ((g.clamp(min=0), r.clamp(min=0).sum(1)),
                           (g.clamp(max=0), r.clamp(max=0).sum(1).abs())):
            t = kernel(inp, w, part)
            out += t / (t.abs().sum(1, keepdim=True) + 1e-9) * mass[:, None]
        return out

    r2 = F.one_hot(torch.tensor([target] * len(x)), 3).double()
    r_h1 = streams(h1, lin2.weight, r2, z2, terms)
    relu_terms = streams(z1, None, r_h1, h1,
                         lambda inp, _, g: (inp.clamp(min=0) + inp.abs()) * g)
    return streams(h0, lin1.weight, relu_terms, z1, terms).reshape(x.shape)


def test_intline_variant_keeps_positive_and_negative_streams():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.ReLU(),
                      nn.Linear(6, 3, bias=False)).double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    ours = srdxai.explain(m, x, 1, "abslrp", variant="intline", contrastive=False,
                          channel_reduce="none")
    torch.testing.assert_close(ours, _intline_reference(m, x, 1))
    # relevance that stays one-signed (a ReLU net seeded by one class) has no negative stream:
    # both variants agree; a ViT's LayerNorms and softmaxes make it signed, and they differ
    same = srdxai.explain(m, x, 1, "abslrp", variant="intline")
    torch.testing.assert_close(same, srdxai.explain(m, x, 1, "abslrp"))
    vit = _models()["vit"]
    xv = _input(vit)
    assert not torch.allclose(srdxai.explain(vit, xv, 1, "abslrp", variant="intline"),
                              srdxai.explain(vit, xv, 1, "abslrp"))
    with pytest.raises(srdxai.SrdxaiError, match="variant"):
        srdxai.explain(m, x, 1, "abslrp", variant="ramp")


@pytest.mark.parametrize("func, kwargs", [(F.gelu, {}), (F.gelu, {"approximate": "tanh"}),
                                          (F.silu, {})])
def test_self_gated_activation_factor_equals_both_derivatives(func, kwargs):
    # x f'(x) + |x| f'(|x|) from autograd at x and at |x|, against the one-derivative form,
    # including x = 0, large |x| and both signs
    x = torch.cat([torch.linspace(-12, 12, 241, dtype=torch.float64), torch.zeros(1,
                                                                               dtype=torch.float64)])

    def derivative(at):
        at = at.clone().requires_grad_(True)
        (d,) = torch.autograd.grad(func(at, **kwargs).sum(), at)
        return d

    expected = x * derivative(x) + x.abs() * derivative(x.abs())
    call = types.SimpleNamespace(func=func, kind="activation",
                                 argument=lambda i, n, d=None: kwargs.get(n, d))
    scratch = A.Scratch()
    # the rule's own choice (from the output for the exact GELU) and the general form; grad
    # mode on: fresh temporaries; off (a backward pass): temporaries in the scratch, the
    # second call reusing them
    for mode in (torch.enable_grad, torch.no_grad, torch.no_grad):
        with mode():
            for factor in (A._elementwise_factor(call, x, func(x, **kwargs), scratch),
                           A._self_gated_factor(call, x, scratch)):
                torch.testing.assert_close(factor, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("size, kernel", [((32, 32), (8, 8)), ((35, 37), (8, 4)),
                                          ((16, 16), (1, 1))])
def test_patch_embedding_transpose_equals_the_convolution_backward(size, kernel):
    # stride = kernel: windows that do not overlap, including rows and columns they miss
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, *kernel, generator=g, dtype=torch.float64)
    y = F.conv2d(x, w, stride=kernel)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    expected = torch.ops.aten.convolution_backward(
        grad, x, w, None, list(kernel), [0, 0], [1, 1], False, [0, 0], 1,
        [True, False, False])[0]
    torch.testing.assert_close(A._patch_transpose(grad, x, w), expected, rtol=1e-12,
                               atol=1e-12)


class _FewChannels(nn.Module):
    """Signed inputs on few channels: a grouped 2-D convolution (two products), and a 1-D
    one (one transposed convolution over [W, |W|])."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.plain = nn.Conv1d(6, 5, 3, stride=2)
        self.head = nn.Linear(5 * 15, 3)

    def forward(self, x):
        t = self.grouped(x).mean(2)  # (N, 6, 32), signed
        return self.head(torch.relu(self.plain(t)).flatten(1))


@pytest.mark.parametrize("name, channels_last", [("resnet", False), ("vit", False),
                                                 ("few_channels", None)])
def test_closed_forms_equal_the_autograd_definition_in_every_layout(name, channels_last,
                                                                    monkeypatch):
    # the ordinary layout (the default is channels-last), grouped and 1-D convolutions
    torch.manual_seed(0)
    m = _FewChannels().double().eval() if name == "few_channels" else _models()[name]
    x = (torch.randn(2, 4, 8, 32, dtype=torch.float64) if name == "few_channels"
         else _input(m))
    fast = srdxai.explain(m, x, [1, 2], "abslrp", channel_reduce="none",
                          channels_last=channels_last)
    monkeypatch.setattr(A, "AbsLRPRule", _AutogradRule)
    slow = srdxai.explain(m, x, [1, 2], "abslrp", channel_reduce="none",
                          channels_last=channels_last)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm_variance_equals_the_biased_variance(dtype):
    # far from zero mean and over two dimensions: the two-pass form keeps its precision
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 64, generator=g, dtype=dtype) * 3 + 100
    scratch = A.Scratch()
    for dims in ((-1,), (-2, -1)):
        expected = x.var(dims, keepdim=True, unbiased=False)
        for mode in (torch.enable_grad, torch.no_grad):
            with mode():
                torch.testing.assert_close(A._variance(x, dims, scratch), expected,
                                           rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                           atol=0)
