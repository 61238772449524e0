"""LRP composites (``srdxai.methods.lrp``): cross-checks against zennit, conservation, the
model left alone, batch versus single.

zennit is imported through ``_compat.import_torchvision`` (torchvision's C++ operators do not
load on this CPU torch); the cross-checks are skipped when it cannot be imported.

Intended differences, handled here rather than hidden by tolerances:

* zennit's BatchNorm canonizer turns a merged BatchNorm into ``running_mean=0, running_var=1,
  weight=1, bias=0``, which still computes ``x / sqrt(1 + eps)``: every merged BatchNorm
  scales what follows by ``(1 + eps)^-1/2`` (about 5e-6 relative for eps=1e-5). Our merge is
  exact. The cross-checks therefore set ``eps=0`` on every BatchNorm (both libraries then
  compute the same function) and agree to ~1e-15; one test keeps the default eps and checks
  that the maps differ by that artefact only (< 1e-5 per BatchNorm).
* zennit finds residual sums through its canonizers: torchvision's ``BasicBlock`` /
  ``Bottleneck`` (``ResNetCanonizer``); the small test models get an equivalent canonizer
  here (``stack`` + ``Sum``, as zennit's). We treat every recorded ``a + b`` of two
  input-dependent tensors as such a sum (Norm rule).
* At inputs smaller than 224 px, VGG's ``AdaptiveAvgPool2d((7, 7))`` *upsamples* (1x1 -> 7x7);
  the engine records it as a resampling op and, like zennit, applies the Norm rule there
  (``x R / s(x)``), so the VGG16 cross-check runs both libraries with their own rules on it.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import small_models as sm
import srdxai
import srdxai.methods.lrp as lrp
from _compat import import_torchvision
from srdxai.errors import InvalidInputError, InvalidTargetError
from srdxai.models import torchvision_arch as ta

try:
    tv = import_torchvision()
    from zennit.attribution import Gradient as ZGradient
    from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
    from zennit.composites import (
        EpsilonAlpha2Beta1,
        EpsilonGammaBox,
        EpsilonPlus,
        EpsilonPlusFlat,
        LayerMapComposite,
        SpecialFirstLayerMapComposite,
        layer_map_base,
    )
    from zennit.layer import Sum
    from zennit.rules import Epsilon, WSquare, ZPlus
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution
    from zennit.types import Linear as ZLinear

    ZENNIT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the environment
    ZENNIT_ERROR = f"zennit cannot be imported: {error}"

needs_zennit = pytest.mark.skipif(ZENNIT_ERROR is not None, reason=str(ZENNIT_ERROR))

LRP_METHODS = ("lrp_epsilon_plus", "lrp_epsilon_gamma_box", "lrp_zplus", "lrp_alpha_beta",
               "lrp_epsilon")


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def no_bn_eps(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    return model


def ours(name: str, model: nn.Module, x: torch.Tensor, target, **options) -> torch.Tensor:
    return srdxai.explain(model, x, target, name, channel_reduce="none", **options)


def zennit_relevance(model: nn.Module, x: torch.Tensor, composite, target) -> torch.Tensor:
    """zennit's attributor with the target logit as output relevance (onehot * output)."""
    with torch.no_grad():
        k = model(x).shape[1]
    onehot = torch.nn.functional.one_hot(torch.as_tensor(target), k).to(x.dtype)
    with ZGradient(model, composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), lambda out: out * onehot)
    return relevance


# --- zennit canonizer for the small residual blocks (what its ResNetCanonizer does) ----------

def _identity_block_forward(self, x):
    out = self.act1(self.bn1(self.conv1(x)))
    out = self.act2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.act3(self.canonizer_sum(torch.stack([x, out], dim=-1)))


def _downsample_block_forward(self, x):
    shortcut = self.downsample(x)
    out = self.act1(self.bn1(self.conv1(x)))
    out = self.act2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.act3(self.canonizer_sum(torch.stack([out, shortcut], dim=-1)))


def _small_block_attributes(name, module):
    if isinstance(module, sm.IdentityBottleneck):
        return {"forward": _identity_block_forward.__get__(module), "canonizer_sum": Sum()}
    if isinstance(module, sm.DownsampleBottleneck):
        return {"forward": _downsample_block_forward.__get__(module), "canonizer_sum": Sum()}
    return None


def small_canonizers():
    return [SequentialMergeBatchNorm(), AttributeCanonizer(_small_block_attributes)]


BOX = {"low": -3.0, "high": 3.0}


def zennit_composites(canonizers, skip=()):
    """Our method and options -> the zennit composite computing the same thing."""
    skip = list(skip)
    return {
        "epsilon_plus": (
            "lrp_epsilon_plus", {},
            lambda: EpsilonPlus(canonizers=canonizers(), layer_map=skip)),
        "epsilon_gamma_box": (
            "lrp_epsilon_gamma_box", BOX,
            lambda: EpsilonGammaBox(canonizers=canonizers(), layer_map=skip, **BOX)),
        "zplus": (
            "lrp_zplus", {},
            lambda: LayerMapComposite(skip + layer_map_base() + [
                (Convolution, ZPlus()), (nn.Linear, ZPlus())], canonizers=canonizers())),
        "alpha2_beta1": (
            "lrp_alpha_beta", {},
            lambda: EpsilonAlpha2Beta1(canonizers=canonizers(), layer_map=skip)),
        "epsilon_0.1": (
            "lrp_epsilon", {"epsilon": 0.1},
            lambda: LayerMapComposite(skip + layer_map_base() + [
                (Convolution, Epsilon(0.1)), (nn.Linear, Epsilon(0.1))],
                canonizers=canonizers())),
        "epsilon_plus_flat": (
            "lrp_epsilon_plus", {"first_layer": "flat"},
            lambda: EpsilonPlusFlat(canonizers=canonizers(), layer_map=skip)),
        "epsilon_plus_wsquare": (
            "lrp_epsilon_plus", {"first_layer": "wsquare"},
            lambda: SpecialFirstLayerMapComposite(
                skip + layer_map_base() + [(Convolution, ZPlus()), (nn.Linear, Epsilon())],
                [(ZLinear, WSquare())], canonizers=canonizers())),
        "gamma0.5_box_per_channel": (
            "lrp_epsilon_gamma_box",
            {"gamma": 0.5, "low": torch.tensor([-1.0, -2.0, -3.0]),
             "high": torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)},
            lambda: EpsilonGammaBox(
                low=torch.tensor([-1.0, -2.0, -3.0]).reshape(1, 3, 1, 1),
                high=torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1), gamma=0.5,
                canonizers=canonizers(), layer_map=skip)),
    }


# --- (1) cross-checks against zennit ----------------------------------------------------------

class EdgeNet(nn.Module):
    """'same' padding with an even kernel (asymmetric), an average pool with padding,
    count_include_pad=False and ceil_mode, a strided conv + BatchNorm, and a dense layer
    followed by BatchNorm1d (merged into it, as zennit does)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 4, padding="same")
        self.act1 = nn.ReLU()
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False,
                                 ceil_mode=True)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU()
        self.fc1 = nn.Linear(6 * 9, 7)
        self.bn3 = nn.BatchNorm1d(7)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(7, 5)

    def forward(self, x):
        h = self.pool(self.act1(self.conv1(x)))
        h = torch.flatten(self.act2(self.bn2(self.conv2(h))), 1)
        return self.fc2(self.act3(self.bn3(self.fc1(h))))


def edge_net() -> nn.Module:
    torch.manual_seed(1)
    model = EdgeNet()
    sm.randomize_bn(model, 2)
    with torch.no_grad():
        bn = model.bn3
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(-1.0, 1.0)
        bn.bias.uniform_(-0.5, 0.5)
        bn.eps = 0.0
    return model.double().eval()


@needs_zennit
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("model_name", ["PlainNet", "PoolNet", "AvgPoolNet", "DepthwiseNet",
                                        "ResNetLike", "EdgeNet"])
def test_small_models_match_zennit(model_name):
    if model_name == "EdgeNet":
        model = no_bn_eps(edge_net())
    else:
        model = no_bn_eps(sm.build_model(model_name, "relu", seed=1))
    g = torch.Generator().manual_seed(2)
    size = 8 if model_name == "EdgeNet" else 12
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    target = torch.tensor([1, 3])
    for case, (method, options, composite) in zennit_composites(small_canonizers).items():
        a = ours(method, model, x, target, **options)
        b = zennit_relevance(model, x, composite(), target)
        assert max_rel(a, b) < 1e-10, (case, max_rel(a, b))


@needs_zennit
def test_resnet18_matches_zennit_resnet_canonizer():
    """torchvision-architecture ResNet18; zennit runs torchvision's own resnet18 (its ResNet
    canonizer only knows those classes) with the same state dict."""
    torch.manual_seed(0)
    model = ta.resnet18(num_classes=10)
    sm.randomize_bn(model, 3)
    model = no_bn_eps(model).double().eval()
    theirs = no_bn_eps(tv.models.resnet18(num_classes=10)).double().eval()
    theirs.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    cases = zennit_composites(lambda: [ResNetCanonizer()])
    for case in ("epsilon_plus", "epsilon_gamma_box", "zplus"):
        method, options, composite = cases[case]
        a = ours(method, model, x, 7, **options)
        b = zennit_relevance(theirs, x, composite(), [7])
        assert max_rel(a, b) < 1e-10, (case, max_rel(a, b))


@needs_zennit
def test_vgg16_matches_zennit():
    """torchvision-architecture VGG16 at 32 px. zennit runs on the same module (its VGG
    canonizer is only the BatchNorm merge, which needs no torchvision class); both apply Norm
    to the upsampling adaptive average pool (see the module docstring)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # build in float64: no copy of 120M weights
    try:
        model = ta.vgg16(num_classes=10).eval()
    finally:
        torch.set_default_dtype(previous)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    cases = zennit_composites(lambda: [SequentialMergeBatchNorm()])
    # (z+ on VGG's 25088 x 4096 dense layer would copy its float64 weights several times over;
    # the dense z+ rule is covered by the small models and ResNet18.)
    for case in ("epsilon_plus", "epsilon_gamma_box"):
        method, options, composite = cases[case]
        a = ours(method, model, x, 4, **options)
        b = zennit_relevance(model, x, composite(), [4])
        assert max_rel(a, b) < 1e-10, (case, max_rel(a, b))


@needs_zennit
def test_default_batchnorm_eps_differs_only_by_zennits_merge_artefact():
    """With eps=1e-5 zennit's 'identity' BatchNorm scales by (1 + eps)^-1/2 (see above)."""
    model = sm.build_model("PlainNet", "relu", seed=1)  # one BatchNorm
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = ours("lrp_epsilon_plus", model, x, [0, 2])
    b = zennit_relevance(model, x, EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]),
                         [0, 2])
    assert 1e-7 < max_rel(a, b) < 1e-5


# --- (2) conservation -------------------------------------------------------------------------

class BiasFree(nn.Module):
    """Bias-free ReLU net: conv, max pool, avg pool, a residual sum, GAP, dense."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.pool2 = nn.AvgPool2d(2)
        self.conv4 = nn.Conv2d(6, 8, 1, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        h = self.pool1(torch.relu(self.conv1(x)))
        h = torch.relu(h + self.conv3(torch.relu(self.conv2(h))))
        h = torch.relu(self.conv4(self.pool2(h)))
        return self.fc(self.gap(h).flatten(1))


@pytest.mark.parametrize("method, options", [
    ("lrp_zplus", {}),
    ("lrp_epsilon_plus", {"epsilon": 1e-12}),
    ("lrp_epsilon", {"epsilon": 1e-12}),
    ("lrp_epsilon_gamma_box", {"epsilon": 1e-12}),
    ("lrp_epsilon_plus", {"epsilon": 1e-12, "first_layer": "flat"}),
])
def test_relevance_sums_to_the_target_logit_on_bias_free_relu_nets(method, options):
    torch.manual_seed(0)
    model = BiasFree().double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = [0, 3, 4]
    rel = srdxai.explain(model, x, target, method, stabilizer=1e-12, **options)
    logits = model(x).detach()[torch.arange(3), torch.tensor(target)]
    torch.testing.assert_close(rel.sum((1, 2)), logits, rtol=1e-8, atol=1e-12)


def test_relevance_with_batchnorm_merged_is_conserved_when_the_shift_is_zero():
    """BatchNorm with zero mean and shift is linear: merged, z+ still conserves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 2.0)
    model = model.double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    rel = srdxai.explain(model, x, 1, "lrp_zplus", stabilizer=1e-12)
    torch.testing.assert_close(rel.sum((1, 2)), model(x)[:, 1].detach())


# --- (3) the model is left alone; batching; options ---------------------------------------------

def state(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            [x.training for x in m.modules()], [p.requires_grad for p in m.parameters()],
            [(len(x._forward_hooks), len(x._forward_pre_hooks), len(x._backward_hooks))
             for x in m.modules()])


def assert_same_state(before, after):
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]


@pytest.mark.parametrize("method", LRP_METHODS)
def test_model_unchanged_batch_versus_single(method):
    model = sm.build_model("ResNetLike", "relu", seed=4).train()
    model.layer1.requires_grad_(False)
    before = state(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 11, 13, generator=g, dtype=torch.float64)
    target = [1, 0, 4]
    batch = srdxai.explain(model, x, target, method)
    assert batch.shape == (3, 11, 13) and batch.dtype == torch.float64
    assert torch.isfinite(batch).all()
    single = torch.cat([srdxai.explain(model, x[i:i + 1], target[i], method) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-9, atol=1e-14)
    chunked = srdxai.explain(model, x, target, method, batch_size=2)
    torch.testing.assert_close(batch, chunked, rtol=1e-9, atol=1e-14)
    contiguous = srdxai.explain(model, x, target, method, channels_last=False)
    torch.testing.assert_close(batch, contiguous, rtol=1e-9, atol=1e-14)
    full = srdxai.explain(model, x, target, method, channel_reduce="none")
    assert full.shape == (3, 3, 11, 13)
    torch.testing.assert_close(full.sum(1), batch)
    assert_same_state(before, state(model))


def test_model_unchanged_after_errors():
    model = sm.build_model("PoolNet", "relu", seed=0).train()
    before = state(model)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    reference = srdxai.explain(model, x, 1, "lrp_epsilon_gamma_box")
    with pytest.raises(InvalidTargetError):  # raised after the forward pass
        srdxai.explain(model, x, 9, "lrp_epsilon_gamma_box")
    assert_same_state(before, state(model))
    with pytest.raises(InvalidInputError, match="ZBox bound"):  # raised inside the backward
        srdxai.explain(model, x, 1, "lrp_epsilon_gamma_box", low=torch.zeros(5),
                       high=torch.ones(5))
    assert_same_state(before, state(model))
    torch.testing.assert_close(srdxai.explain(model, x, 1, "lrp_epsilon_gamma_box"), reference)


def test_no_tensors_survive_calls():
    """Autograd functions here hold graph ops and tensors; nothing may outlive a call."""
    model = sm.build_model("ResNetLike", "relu", seed=0)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)

    def count() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    srdxai.explain(model, x, 1, "lrp_epsilon_gamma_box")
    before = count()
    for method in LRP_METHODS:
        srdxai.explain(model, x, 1, method)
        with pytest.raises(InvalidTargetError):
            srdxai.explain(model, x, 9, method)
    assert count() <= before


def test_callable_target_and_registry():
    model = sm.build_model("PlainNet", "relu", seed=0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    by_index = srdxai.explain(model, x, 2, "lrp_epsilon_plus")
    by_callable = srdxai.explain(model, x, lambda out: out[:, 2], "lrp_epsilon_plus")
    torch.testing.assert_close(by_index, by_callable)
    for name in LRP_METHODS:
        cls = srdxai.methods.get_method(name)
        assert cls.signed and "Signed" in cls.__doc__ and "summed" in cls.__doc__


@pytest.mark.parametrize("options, message", [
    ({"first_layer": "bogus"}, "first_layer"),
    ({"alpha": 1.0, "beta": 1.0}, "alpha"),
    ({"channel_reduce": "max"}, "channel_reduce"),
    ({"low": -1.0}, "both low and high"),
    ({"stabilizer": 0.0}, "stabilizer"),
])
def test_invalid_options(options, message):
    model = sm.build_model("PlainNet", "relu", seed=0)
    with pytest.raises(InvalidInputError, match=message):
        srdxai.explain(model, torch.randn(1, 3, 8, 8, dtype=torch.float64), 0,
                       "lrp_alpha_beta", **options)


def test_zbox_default_bounds_need_three_channels():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 36, 2))
    with pytest.raises(InvalidInputError, match="low= and high="):
        srdxai.explain(model, torch.randn(1, 1, 8, 8), 0, "lrp_epsilon_gamma_box")
    rel = srdxai.explain(model, torch.randn(1, 1, 8, 8), 0, "lrp_epsilon_gamma_box",
                         low=-2.0, high=2.0)
    assert rel.shape == (1, 8, 8)
    assert lrp.LRPEpsilonGammaBox.default_first_layer == "zbox"


def test_zbox_bounds_must_be_ordered():
    model = sm.build_model("PlainNet", "relu", seed=1)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(srdxai.SrdxaiError, match="low <= high"):
        srdxai.explain(model, x, 0, "lrp_epsilon_gamma_box", low=1.0, high=-1.0)
    with pytest.raises(srdxai.SrdxaiError, match="low <= high"):
        srdxai.explain(model, x, 0, "lrp_epsilon_gamma_box", low=torch.tensor([0.0, 2.0, 0.0]),
                       high=torch.tensor([1.0, 1.0, 1.0]))
    assert torch.isfinite(srdxai.explain(model, x, 0, "lrp_epsilon_gamma_box", low=-1.0,
                                         high=1.0)).all()
