"""Engine behaviour: targets, model restoration, supported and unsupported operations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import (
    InvalidInputError,
    InvalidTargetError,
    UnknownMethodError,
    UnsupportedOperationError,
)

ACTIVATION_MODULES = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hardswish": nn.Hardswish,
}
ACTIVATION_FUNCTIONS = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
    "elu": F.elu,
    "silu": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish,
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and biases, so bias shares matter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


class FunctionalNet(nn.Module):
    """Functional activations, an activation module reused, x + y and torch.add residuals."""

    def __init__(self, act: str):
        super().__init__()
        self.act_fn = ACTIVATION_FUNCTIONS[act]
        self.shared = ACTIVATION_MODULES[act]()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.conv4 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.act_fn(self.bn1(self.conv1(x)))
        h = self.shared(self.bn2(self.conv2(h)) + h)
        h = self.shared(self.conv3(h))
        h = self.act_fn(torch.add(self.conv4(h), h))
        h = F.dropout(h, 0.5, self.training)
        return self.fc(h.mean((2, 3)))


class InplaceNet(nn.Module):
    """In-place activations and ``+=``, including a discarded return value."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        out = self.conv2(h)
        out += h
        torch.relu_(out)  # return value ignored on purpose
        out = self.pool(out)
        out = nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.head(out)


def test_conservation_float64_every_activation():
    for act in ACTIVATION_MODULES:
        torch.manual_seed(1)
        model = randomize(FunctionalNet(act).double())
        x = torch.randn(3, 3, 9, 12, dtype=torch.float64)
        out = model(x)
        rel = srdxai.explain(model, x, target=2)
        assert rel.shape == (3, 9, 12)
        torch.testing.assert_close(rel.sum((1, 2)), out[:, 2].detach(), rtol=1e-10,
                                   atol=1e-10, msg=act)


def test_inplace_and_ignored_return_value():
    torch.manual_seed(0)
    model = InplaceNet().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = model(x)
    rel = srdxai.explain(model, x, target=None)
    pred = out.argmax(1)
    torch.testing.assert_close(rel.sum((1, 2)), out[torch.arange(2), pred].detach())


def test_batch_versus_single_and_non_square():
    torch.manual_seed(0)
    model = randomize(FunctionalNet("silu").double())
    x = torch.randn(4, 3, 7, 13, dtype=torch.float64)
    targets = [0, 3, 1, 2]
    batch = srdxai.explain(model, x, target=targets)
    single = torch.cat([srdxai.explain(model, x[i:i + 1], target=targets[i])
                        for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=1e-10, atol=1e-12)
    chunked = srdxai.explain(model, x, target=targets, batch_size=3)
    torch.testing.assert_close(batch, chunked, rtol=1e-10, atol=1e-12)


def test_targets_int_list_tensor_none_callable():
    torch.manual_seed(0)
    model = randomize(FunctionalNet("relu").double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = model(x)
    a = srdxai.explain(model, x, target=1)
    b = srdxai.explain(model, x, target=[1, 1])
    c = srdxai.explain(model, x, target=torch.tensor([1, 1]))
    d = srdxai.explain(model, x, target=lambda o: o[:, 1])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)
    e = srdxai.explain(model, x, target=None)
    f = srdxai.explain(model, x, target=out.argmax(1))
    torch.testing.assert_close(e, f)
    # every row gets its own target (the reference code fills only row 0)
    assert not torch.allclose(srdxai.explain(model, x, target=0)[1],
                              srdxai.explain(model, x, target=1)[1])


@pytest.mark.parametrize("target, message", [
    (7, "out of range"),
    (-1, "out of range"),
    ([0, 1, 2], "3 targets for a batch of 2"),
    (1.5, "integers"),
    (lambda o: o, "one scalar per sample"),
])
def test_bad_targets(target, message):
    model = randomize(FunctionalNet("relu"))
    with pytest.raises(InvalidTargetError, match=message):
        srdxai.explain(model, torch.randn(2, 3, 8, 8), target=target)


def test_bad_inputs():
    model = randomize(FunctionalNet("relu"))
    x = torch.randn(2, 3, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        srdxai.explain(model, x)
    with pytest.raises(InvalidInputError, match="batch"):
        srdxai.explain(model, torch.randn(3, 8))
    with pytest.raises(InvalidInputError, match="float64"):
        srdxai.explain(model, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        srdxai.explain(model, [[1.0]])
    with pytest.raises(UnknownMethodError, match="available"):
        srdxai.explain(model, torch.randn(1, 3, 8, 8), method="nope")


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
         for m in model.modules()],
        [id(m) for m in model.modules()],
    )


def assert_same(before, after):
    sd0, *rest0 = before
    sd1, *rest1 = after
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    assert rest0 == rest1


def test_model_unchanged_after_call_and_after_exception():
    torch.manual_seed(0)
    model = randomize(FunctionalNet("gelu"))
    model.train()  # the engine evaluates in eval mode and must restore train mode
    model.conv2.weight.requires_grad_(False)
    handle = model.conv1.register_forward_hook(lambda *a: None)
    before = snapshot(model)
    srdxai.explain(model, torch.randn(2, 3, 8, 8), target=1)
    assert_same(before, snapshot(model))
    with pytest.raises(InvalidTargetError):
        srdxai.explain(model, torch.randn(2, 3, 8, 8), target=99)
    assert_same(before, snapshot(model))
    # an exception raised from inside the user's forward
    model.boom = True
    original = model.forward

    def bad_forward(x):
        original(x)
        raise RuntimeError("user code failed")

    model.forward = bad_forward
    # the model fails by itself too: a clear srdxai error with the model's own chained
    with pytest.raises(InvalidInputError, match="fails by itself.*user code failed") as info:
        srdxai.explain(model, torch.randn(1, 3, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)
    del model.forward
    del model.boom
    assert_same(before, snapshot(model))
    handle.remove()
    # plain torch still works afterwards (no mode left active)
    assert torch.add(torch.ones(1), 1).item() == 2


class Squared(nn.Module):
    """A product of two input-dependent tensors where neither factor is a gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        h = h * torch.relu(h)
        return self.fc(h.mean((2, 3)))


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.softmax(h, dim=1)
        return self.fc(h.mean((2, 3)))


class ConstantConcat(nn.Module):
    """Concatenating a constant map: its values would be a bias with no entry op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.cat([h, torch.ones_like(h)], 1)
        return self.fc(h.mean((2, 3)))


class ReflectPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("model_cls, pattern", [
    (Squared, "product of two input-dependent tensors .* where neither is a gate"),
    (Softmaxed, "a softmax .*in module 'Softmaxed"),
    (ConstantConcat, "concatenation with a tensor that does not depend on the input"),
    (ReflectPad, "padding with mode 'reflect'"),
    (FlattenHead, "seed='gradcam'"),
])
def test_unsupported_operations_raise_clear_errors(model_cls, pattern):
    torch.manual_seed(0)
    model = model_cls().eval()
    before = snapshot(model)
    # the PFV engine's refusal (by default a model it refuses goes to the operation view:
    # tests/test_srd_operation_view.py)
    with pytest.raises(UnsupportedOperationError, match=pattern):
        srdxai.explain(model, torch.randn(1, 3, 8, 8), seed="logit", operation_view=False)
    assert_same(before, snapshot(model))
    # the plain gradient runs through the same engine and still works
    assert srdxai.explain(model, torch.randn(1, 3, 8, 8), method="gradient").shape == (1, 8, 8)


def test_unsupported_error_names_the_module():
    model = Squared().eval()
    with pytest.raises(UnsupportedOperationError, match="in module 'Squared \\(the model's own"):
        srdxai.explain(model, torch.randn(1, 3, 8, 8), seed="logit", operation_view=False)

    class Transposer(nn.Module):
        def forward(self, x):
            return x.transpose(2, 3)

    nested = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(),
                           nn.Sequential(nn.Identity(), Transposer()),
                           nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(UnsupportedOperationError,
                       match=r"Tensor.transpose' \(in module '2.1'\)"):
        srdxai.explain(nested.eval(), torch.randn(1, 3, 8, 8), operation_view=False)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 5, stride=2, padding=2, dilation=1)
        self.bn = nn.BatchNorm1d(4)
        self.c2 = nn.Conv1d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.pool = nn.AvgPool1d(2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.elu(self.bn(self.c1(x)))
        h = F.leaky_relu(self.pool(self.c2(h)), 0.2)
        return self.fc(F.adaptive_avg_pool1d(h, 1).squeeze(-1))


def test_conv1d_model_conserves():
    torch.manual_seed(0)
    model = randomize(Conv1dNet().double())
    x = torch.randn(2, 2, 23, dtype=torch.float64)
    rel = srdxai.explain(model, x, target=1)
    assert rel.shape == (2, 23)
    torch.testing.assert_close(rel.sum(1), model(x)[:, 1].detach())


def test_model_with_bias_free_layers_and_constant_ops():
    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
            self.conv = nn.Conv2d(3, 4, 3, padding="same")
            self.pad = nn.ZeroPad2d((1, 0, 1, 0))
            self.conv2 = nn.Conv2d(4, 4, 2, stride=2)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = (x - self.mean) / 0.25
            h = F.hardswish(self.conv(x)).clamp(max=4.0) * 0.5  # clamp: an activation too
            h = torch.tanh(self.conv2(self.pad(h)))
            return self.fc(h.mean(dim=(-1, -2)))

    torch.manual_seed(0)
    model = Normalised().double().eval()
    x = torch.rand(2, 3, 9, 10, dtype=torch.float64)
    rel = srdxai.explain(model, x, target=0)
    torch.testing.assert_close(rel.sum((1, 2)), model(x)[:, 0].detach())


def test_layer_names_and_lookup():
    from srdxai.models.torchvision_arch import resnet18

    torch.manual_seed(0)
    model = randomize(resnet18(num_classes=5))
    x = torch.randn(1, 3, 64, 48)
    names = [n for n, _ in srdxai.SRD(model).layers(x)]
    assert names[:3] == ["input", "relu", "layer1.0.relu@0"]
    low = srdxai.explain(model, x, layer="low", upsample=False)
    assert low.shape == (1, 2, 2)
    high = srdxai.explain(model, x, layer="high", upsample=False)
    assert high.shape == (1, 4, 3)
    by_module = srdxai.explain(model, x, layer="layer4", upsample=False)
    torch.testing.assert_close(by_module, low)
    up = srdxai.explain(model, x, layer="layer3")
    assert up.shape == (1, 64, 48)
    with pytest.raises(InvalidInputError, match="unknown layer 'nope'"):
        srdxai.explain(model, x, layer="nope")


def test_relevance_is_conserved_at_every_layer():
    from srdxai.models.torchvision_arch import resnet18

    torch.manual_seed(0)
    model = randomize(resnet18(num_classes=5)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logit = model(x)[:, 4].detach()
    for layer in ["layer1", "layer2.0.relu@1", "layer3", "layer4"]:
        rel = srdxai.explain(model, x, target=4, layer=layer, upsample=False)
        torch.testing.assert_close(rel.flatten(1).sum(1), logit, msg=layer)


def test_erf_is_local_and_sums_to_one():
    from srdxai.models.torchvision_arch import resnet18

    torch.manual_seed(0)
    model = randomize(resnet18(num_classes=5)).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    erf = srdxai.SRD(model).erf(x, "layer2", (0, 0))
    assert erf.shape == (1, 64, 64)
    # a one-hot relevance at one PFV is conserved down to the pixels
    torch.testing.assert_close(erf.sum(), torch.tensor(1.0, dtype=torch.float64))
    # and stays inside that PFV's theoretical receptive field (99 px wide, centred at 3.5)
    assert erf[0, 56:, :].abs().sum() == 0 and erf[0, :, 56:].abs().sum() == 0
    assert erf[0, :8, :8].abs().sum() > 0
    with pytest.raises(InvalidInputError, match="outside layer"):
        srdxai.SRD(model).erf(x, "layer2", (9, 9))


def test_contrastive_is_per_sample():
    torch.manual_seed(0)
    model = randomize(FunctionalNet("relu").double())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    batch = srdxai.explain(model, x, target=1, contrastive=True)
    single = torch.cat([srdxai.explain(model, x[i:i + 1], target=1, contrastive=True)
                        for i in range(3)])
    torch.testing.assert_close(batch, single)
    # the seed map has zero mean, so the pixel map sums to (almost) 0 per sample
    assert batch.sum((1, 2)).abs().max() < 1e-9


def test_no_graph_survives_a_call():
    """The recorded graph and autograd's form cycles through C++; they must be broken."""
    import gc
    import weakref

    from srdxai.engine.graph import Node

    torch.manual_seed(0)
    model = randomize(FunctionalNet("relu"))
    x = torch.randn(2, 3, 8, 8)
    for method in ("srd", "gradient"):
        srdxai.explain(model, x, method=method)
        with pytest.raises(InvalidTargetError):
            srdxai.explain(model, x, method=method, target=50)
    gc.collect()
    # (a traceback kept by pytest may still reach a Node object, but none may hold a tensor)
    alive = [o for o in gc.get_objects() if type(o) is Node]
    assert not [o for o in alive if o.tensor is not None or o.pre is not None]
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None


class ViewFlatten(nn.Module):
    """`.view(N, -1)` of a spatial map only works in the ordinary memory layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def test_layout_fallback_for_layout_dependent_models():
    torch.manual_seed(0)
    model = ViewFlatten().eval()
    x = torch.randn(2, 3, 6, 6)
    ours = srdxai.explain(model, x, target=1, method="gradient")
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xx)[:, 1].sum(), xx)
    torch.testing.assert_close(ours, g.sum(1))
    # SRD seeds a flatten head with Grad-CAM at the last conv layer
    assert srdxai.explain(model, x, target=1).shape == (2, 6, 6)
    with pytest.raises(RuntimeError, match="view"):
        srdxai.explain(model, x, target=1, method="gradient", channels_last=True)


def test_channels_last_and_ordinary_layout_agree():
    torch.manual_seed(0)
    model = randomize(FunctionalNet("silu").double())
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    a = srdxai.explain(model, x, target=1, channels_last=True)
    b = srdxai.explain(model, x, target=1, channels_last=False)
    torch.testing.assert_close(a, b)
    assert a.is_contiguous()


@pytest.mark.parametrize("cin, cout, kernel, padding, dilation, size", [
    (3, 8, (3, 3), (1, 1), 1, (9, 7)),      # C_in < C_out: Gram form
    (8, 4, (3, 3), (1, 1), 1, (6, 6)),      # C_in > C_out: direct form
    (5, 5, (3, 3), (2, 2), 2, (7, 8)),      # dilation
    (4, 6, (3, 5), (1, 2), 1, (10, 5)),     # non-square kernel and padding
    (6, 6, (2, 2), (0, 0), 1, (5, 5)),      # even kernel, no padding
])
@pytest.mark.parametrize("block", [None, 50, 2000])
def test_offset_norms_at_input_positions_equal_per_offset_norms(
        monkeypatch, cin, cout, kernel, padding, dilation, size, block):
    # The stride-1 path computes every offset's norm once per input position and gathers;
    # the per-offset path convolves shifted copies. ``block`` forces blocks of one position
    # (50 output values) and blocks spanning images (2000).
    from srdxai.engine import ops

    if block is not None:
        monkeypatch.setattr(ops, "_NORM_BLOCK", block)
    g = torch.Generator().manual_seed(cin * 100 + cout)
    weight = torch.randn(cout, cin, *kernel, generator=g, dtype=torch.float64)
    x = torch.randn(3, cin, *size, generator=g, dtype=torch.float64)
    out = F.conv2d(x, weight, padding=padding, dilation=dilation)
    op = ops.ConvOp("conv", weight, None, (1, 1), padding, (dilation, dilation), 1, size,
                    out.shape[2:])
    assert op._norms_at_inputs_apply(x)
    for scale in (None, torch.rand(cout, generator=g, dtype=torch.float64)):
        _assert_offset_norms_are_the_definition(op, x, weight, scale, padding=padding,
                                                dilation=dilation)


@pytest.mark.parametrize("cin, multiplier, kernel, padding", [
    (5, 1, (3, 3), (1, 1)),   # depthwise
    (4, 2, (3, 5), (1, 2)),   # depthwise with a channel multiplier
    (6, 1, (7, 7), (3, 3)),   # ConvNeXt's kernel
])
def test_depthwise_offset_norms_at_input_positions_equal_the_definition(
        cin, multiplier, kernel, padding):
    # stride-1 depthwise kernels compute every offset's norm in one 1x1 convolution of x^2
    # at the input positions; each must equal the norm of that offset's share of the output
    from srdxai.engine import ops

    g = torch.Generator().manual_seed(cin * 10 + multiplier)
    cout = cin * multiplier
    weight = torch.randn(cout, 1, *kernel, generator=g, dtype=torch.float64)
    x = torch.randn(2, cin, 8, 6, generator=g, dtype=torch.float64)
    out = F.conv2d(x, weight, padding=padding, groups=cin)
    op = ops.ConvOp("conv", weight, None, (1, 1), padding, (1, 1), cin, x.shape[2:],
                    out.shape[2:])
    for scale in (None, torch.rand(cout, generator=g, dtype=torch.float64)):
        _assert_offset_norms_are_the_definition(op, x, weight, scale, padding=padding,
                                                groups=cin)


def _assert_offset_norms_are_the_definition(op, x, weight, scale, **conv):
    """``op.offset_norms`` equals the per-offset form and the definition: per offset, the norm
    over channels of that offset's share of the real convolution output (``conv``: its
    ``F.conv2d`` arguments), times ``scale`` per output channel if given."""
    norms = op.offset_norms(x, scale)
    per_offset = torch.stack([op.offset_norm(x, k, scale) for k in op.offsets], 1)
    torch.testing.assert_close(norms, per_offset, rtol=1e-12, atol=1e-12)
    for j, k in enumerate(op.offsets):
        w = torch.zeros_like(weight)
        w[(slice(None), slice(None), *k)] = weight[(slice(None), slice(None), *k)]
        part = F.conv2d(x, w, **conv)
        if scale is not None:
            part = part * scale.reshape(1, -1, 1, 1)
        torch.testing.assert_close(norms[:, j], part.norm(dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [8, 384, 512])
def test_channel_dot_is_the_channel_sum_of_the_product_in_every_layout(channels):
    # channels-last maps run as a batched matrix product up to 384 channels and as a product
    # and a sum beyond (the faster of the two on a CPU); both are the same sum
    from srdxai.engine.channels import channel_dot

    g = torch.Generator().manual_seed(channels)
    a = torch.randn(2, channels, 5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, channels, 5, 3, generator=g, dtype=torch.float64)
    expected = (a * b).sum(1)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = channel_dot(a.contiguous(memory_format=layout), b.contiguous(memory_format=layout))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class _Selects(nn.Module):
    """Integer indexing in every form the operation view shares one ``unbind`` for."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 12)

    def forward(self, x):
        t = self.lin(x).reshape(x.shape[0], 3, 4).transpose(0, 1)  # (3, N, 4), strided
        q, k, v = t[0], t[1], t[-1]
        again = t[0]  # the same part twice: its relevance accumulates
        return q * k + v + again.tanh()


def test_integer_selections_share_one_unbind_and_keep_the_gradient():
    from srdxai.engine.optrace import OpRule, OpTrace

    torch.manual_seed(0)
    model = _Selects().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.autograd.functional.jacobian(lambda v: model(v).sum(), x)
    grad_fns = []

    class Probe(OpRule):  # the plain gradient, seeing every move
        unknown = "gradient"

        def on_move(self, func, args, kwargs, output):
            if func is torch.Tensor.__getitem__:
                grad_fns.append(type(output.grad_fn).__name__)

    leaf = x.clone().requires_grad_(True)
    with torch.enable_grad(), OpTrace(model, leaf, Probe()) as trace:
        out = trace.forward()
        (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert grad_fns == ["UnbindBackward0"] * 4
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)

    class OutOfRange(nn.Module):
        def forward(self, x):
            return x.reshape(2, -1, 4)[2].sum(-1, keepdim=True)

    leaf = x[:4].clone().requires_grad_(True)
    with pytest.raises(IndexError), torch.enable_grad(), OpTrace(OutOfRange(), leaf,
                                                                 Probe()) as trace:
        trace.forward()


@pytest.mark.parametrize("raises", [False, True])
def test_model_guard_restores_mixed_flags_and_hooks_exactly(raises):
    # modules in train and eval mode side by side, some parameters frozen by the user, a hook
    # of the user's: inside, all eval and frozen; afterwards each flag and hook dictionary as
    # it was, whatever was changed or added inside and whether the body raised
    from srdxai.engine import model_guard

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(
        nn.ReLU(), nn.Dropout(0.5)), nn.Flatten(), nn.Linear(4, 2))
    model.train()
    model[2].eval()  # a submodule in eval mode inside a training model
    model[1].weight.requires_grad_(False)
    users = model[0].register_forward_hook(lambda *a: None)
    flags = [m.training for m in model.modules()]
    frozen = [p.requires_grad for p in model.parameters()]
    hooks = [dict(m._forward_hooks) for m in model.modules()]

    def body():
        with model_guard(model):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            model[4].register_forward_pre_hook(lambda *a: None)
            model[3].register_full_backward_hook(lambda *a: None)
            model[2][1].train()
            model[4].bias.requires_grad_(True)
            del model[0]._forward_hooks[users.id]
            if raises:
                raise KeyError("inside")

    if raises:
        with pytest.raises(KeyError, match="inside"):
            body()
    else:
        body()
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == frozen
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks
    assert all(not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    users.remove()
