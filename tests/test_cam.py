"""CAM methods: cross-checks against pytorch-grad-cam, invariances, ablation at any PFV layer,
clear errors.

Cross-checks compare ``normalize=True`` maps with pytorch-grad-cam's on the same model, inputs,
targets and target layer (pytorch-grad-cam's target layer is the module whose output is our PFV
layer, e.g. ``model.layer4[-1]`` for ResNet ``"low"``). The measure is
``max |ours - theirs| / max |theirs|`` and must stay below 1e-5: our maps are float64,
pytorch-grad-cam casts each layer map to float32 before resizing (relative rounding 6e-8; its
FullGrad sums thousands of such maps, then min-max scales a map with a large offset, see
:func:`fullgrad_amplification`) and computes Score-CAM and Ablation-CAM scores in float32.

Intended differences, tested separately here rather than against pytorch-grad-cam:
* Ablation-CAM always ablates a channel to 0 (the paper). pytorch-grad-cam does so only when the
  layer's minimum is 0 (the ReLU layers used in the cross-check, asserted there) and otherwise
  writes ``min - 1e7`` values; :func:`test_ablationcam_non_relu_layer_zeroes_channels` checks
  ours against an independent hook-based ablation on a SiLU layer.
* FullGrad: pytorch-grad-cam pairs bias vectors with the gradients it recorded by position,
  which goes wrong when a block runs its modules in another order than it registered them
  (our ResNet18 BasicBlock computes the shortcut first, unlike torchvision's): there it gives a
  different map (``ResNetLike``'s shortcut order even makes it crash on a shape mismatch).
  :func:`test_fullgrad_matches_grad_cam_only_when_forward_order_matches_registration` shows
  both.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
import srdxai.methods.cam  # noqa: F401  registers the CAM methods
from small_models import build_model, randomize_bn
from srdxai.errors import InvalidInputError
from srdxai.methods.base import METHODS
from srdxai.methods.cam import _minmax
from srdxai.models.torchvision_arch import BasicBlock, resnet18, resnet50

CAMS = ("gradcam", "gradcam_pp", "xgradcam", "layercam", "scorecam", "ablationcam", "fullgrad")
GRADIENT_CAMS = {"gradcam": "GradCAM", "gradcam_pp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
                 "layercam": "LayerCAM"}
TOLERANCE = 1e-5


# --- pytorch-grad-cam ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pgc():
    """pytorch_grad_cam, imported after the torchvision shim (skip if unavailable)."""
    try:
        from _compat import import_torchvision

        import_torchvision()
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: F401
    except ImportError as error:
        pytest.skip(f"pytorch-grad-cam (package grad-cam) is not usable here: {error}")
    return pytorch_grad_cam


def theirs(pgc, cls_name: str, model: nn.Module, layers: list[nn.Module], x: torch.Tensor,
           targets: list[int], batch_size: int | None = None,
           reshape_transform=None) -> torch.Tensor:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = copy.deepcopy(model)  # pytorch-grad-cam accumulates parameter gradients
    layers = [model.get_submodule(name) for name in layers]
    cam = getattr(pgc, cls_name)(model=model, target_layers=layers,
                                 reshape_transform=reshape_transform)
    if batch_size is not None:
        cam.batch_size = batch_size  # Score-CAM's / Ablation-CAM's chunk (speed only)
    try:
        maps = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(t))
                                                    for t in targets])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(maps)


def ours(name: str, model: nn.Module, x: torch.Tensor, targets, **options) -> torch.Tensor:
    return METHODS[name](model, normalize=True, **options).attribute(x, targets)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b.to(a.dtype)).abs().max() / b.abs().max())


def small(name: str, act: str = "relu", seed: int = 3) -> nn.Module:
    return build_model(name, act=act, seed=seed)


def torchvision_resnet(arch=resnet18, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(arch(10), seed + 1).double().eval()


def inputs(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g, dtype=torch.float64)


# (model factory, our layer, pytorch-grad-cam's target module, input size); non-square inputs
# catch height/width swaps in the resizing.
GRADIENT_CASES = {
    "resnet18-low": (torchvision_resnet, "low", "layer4.1", (64, 80)),
    "resnet18-high": (torchvision_resnet, "high", "layer3.1", (64, 80)),
    "resnet18-module-name": (torchvision_resnet, "layer4", "layer4.1", (64, 80)),
    "poolnet-act4": (lambda: small("PoolNet"), "act4", "act4", (12, 16)),
    "poolnet-high": (lambda: small("PoolNet"), "high", "act3", (12, 16)),
    "resnetlike-low": (lambda: small("ResNetLike"), "low", "layer2", (12, 16)),
    "depthwise-low-silu": (lambda: small("DepthwiseNet", "silu"), "low", "act3", (12, 16)),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
@pytest.mark.parametrize("name", sorted(GRADIENT_CAMS))
def test_gradient_cams_match_grad_cam(pgc, name, case):
    factory, layer, module, (h, w) = GRADIENT_CASES[case]
    model = factory()
    x = inputs(3, h, w)
    targets = [1, 4, 2]
    a = ours(name, model, x, targets, layer=layer)
    b = theirs(pgc, GRADIENT_CAMS[name], model, [module], x, targets)
    assert a.shape == b.shape == (3, h, w)
    assert relative(a, b) < TOLERANCE


def test_layer_can_be_given_as_a_module():
    model = torchvision_resnet()
    x = inputs(2, 32, 32)
    by_module = METHODS["gradcam"](model, layer=model.layer3).attribute(x, [0, 1])
    by_name = METHODS["gradcam"](model, layer="high").attribute(x, [0, 1])
    torch.testing.assert_close(by_module, by_name, rtol=0, atol=0)


def perturbation_case(case: str):
    """Model, our layer name, pytorch-grad-cam's module, inputs and targets for the Score-CAM /
    Ablation-CAM cross-checks; ResNet18 uses 'high' (layer3: 256 channels, 256 extra passes)."""
    if case == "resnet18":
        model, layer, module, x = torchvision_resnet(), "high", "layer3.1", inputs(1, 32, 40)
    else:
        model, layer = small(case), "low"
        module = {"PoolNet": "act4", "PlainNet": "act2", "ResNetLike": "layer2"}[case]
        x = inputs(3, 12, 16)
    return model, layer, module, x, [1, 4, 2][: x.shape[0]]


@pytest.mark.parametrize("case", ["PoolNet", "PlainNet", "ResNetLike", "resnet18"])
def test_scorecam_matches_grad_cam(pgc, case):
    model, layer, module, x, targets = perturbation_case(case)
    a = ours("scorecam", model, x, targets, layer=layer)
    b = theirs(pgc, "ScoreCAM", model, [module], x, targets, batch_size=64)
    assert relative(a, b) < TOLERANCE


class DeadChannelNet(nn.Module):
    """Conv -> ReLU whose channels 0, 2, 4 are dead on every input (bias -1e3), then a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.bias[::2] = -1e3
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def test_scorecam_runs_dead_channels_once_and_still_matches_grad_cam(pgc):
    """Dead channels have the zero mask: one forward pass on the zero image serves them all."""
    model = DeadChannelNet().eval().double()
    x = inputs(3, 12, 16)
    seen_rows = []
    handle = model.conv.register_forward_hook(lambda m, i, o: seen_rows.append(i[0].shape[0]))
    try:
        a = ours("scorecam", model, x, [1, 4, 2], layer="act")
    finally:
        handle.remove()
    # one recorded pass for the activations, 3 samples x 3 live channels, one zero image
    assert sum(seen_rows) == 3 + 3 * 3 + 1
    b = theirs(pgc, "ScoreCAM", model, ["act"], x, [1, 4, 2], batch_size=64)
    assert relative(a, b) < TOLERANCE


def test_scorecam_reduced_precision_is_close_but_not_the_full_map():
    """bfloat16 masked passes: same map up to the scores' rounding (a speed option)."""
    model = small("PoolNet").float()
    x = inputs(2, 12, 16).float()
    full = ours("scorecam", model, x, [1, 4], layer="low")
    half = ours("scorecam", model, x, [1, 4], layer="low", precision="bfloat16")
    assert full.dtype == half.dtype == torch.float32
    assert 0 < relative(half, full) < 0.1


def _activation(model: nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(module).register_forward_hook(
        lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[-1]


@pytest.mark.parametrize("case", ["PoolNet", "PlainNet", "ResNetLike", "resnet18"])
def test_ablationcam_matches_grad_cam_on_relu_layers(pgc, case):
    model, layer, module, x, targets = perturbation_case(case)
    # pytorch-grad-cam ablates to 0 only where a sample's activation has minimum 0.
    a_layer = _activation(model, module, x)
    assert (a_layer.flatten(1).amin(1) == 0).all()
    a = ours("ablationcam", model, x, targets, layer=layer)
    b = theirs(pgc, "AblationCAM", model, [module], x, targets, batch_size=64)
    assert relative(a, b) < TOLERANCE


@pytest.mark.parametrize("case", ["PoolNet", "PlainNet", "AvgPoolNet", "DepthwiseNet",
                                  "resnet50"])
def test_fullgrad_matches_grad_cam(pgc, case):
    if case == "resnet50":  # Bottleneck: forward order = registration order
        model, x = torchvision_resnet(resnet50), inputs(1, 32, 40)
    else:
        model, x = small(case), inputs(3, 12, 16)
    targets = [1, 4, 2][: x.shape[0]]
    a = ours("fullgrad", model, x, targets)
    b = theirs(pgc, "FullGrad", model, [], x, targets)
    assert relative(a, b) < TOLERANCE * fullgrad_amplification(model, x, targets)


def fullgrad_amplification(model, x, targets) -> float:
    """How much the final min-max scaling magnifies pytorch-grad-cam's float32 rounding.

    Its FullGrad map is a float32 sum of one [0, 1] map per channel of every bias layer
    (26k on ResNet50) with a large common offset (there: values 6548..7629), and the min-max
    divides by the range, so relative errors grow by ``max / (max - min)`` (7 there; our own
    float32 run differs from our float64 run by the same 1.5e-5 as pytorch-grad-cam).
    """
    raw = METHODS["fullgrad"](model).attribute(x, targets).flatten(1)
    return max(1.0, float((raw.amax(1) / (raw.amax(1) - raw.amin(1))).max()))


class TorchvisionOrderBasicBlock(BasicBlock):
    """Our BasicBlock computed in torchvision's order (shortcut after the main branch)."""

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


def test_fullgrad_matches_grad_cam_only_when_forward_order_matches_registration(pgc):
    model = torchvision_resnet()
    x = inputs(1, 32, 32)
    a = ours("fullgrad", model, x, [3])
    b = theirs(pgc, "FullGrad", model, [], x, [3])
    # Our BasicBlock runs the downsample branch first: pytorch-grad-cam then multiplies
    # bn1's bias with the downsample BatchNorm's gradient (same shapes, silently).
    assert relative(a, b) > 1e-4
    reordered = copy.deepcopy(model)
    for block in reordered.modules():
        if isinstance(block, BasicBlock):
            block.__class__ = TorchvisionOrderBasicBlock
    a2 = ours("fullgrad", reordered, x, [3])
    torch.testing.assert_close(a2, a, rtol=1e-9, atol=1e-12)  # the same function
    b2 = theirs(pgc, "FullGrad", reordered, [], x, [3])
    assert relative(a2, b2) < TOLERANCE


# --- definitions checked without pytorch-grad-cam --------------------------------------------

class Edited(nn.Module):
    """A small CNN whose activations include a module called twice (``act@0``, ``act@1``) and
    a functional relu (``relu``); ``edit`` lets a test replace a chosen activation."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.act = act()
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 7, 3, padding=1, stride=2)
        self.fc = nn.Linear(7, 4)
        self.edit: dict | None = None

    def _maybe(self, name, h):
        return self.edit[name](h) if self.edit and name in self.edit else h

    def forward(self, x):
        h = self._maybe("act@0", self.act(self.conv1(x)))
        h = self._maybe("act@1", self.act(self.conv2(h)))
        h = self._maybe("relu", F.relu(self.conv3(h) - 0.05))
        return self.fc(h.mean((2, 3)))


def edited(act=nn.ReLU) -> nn.Module:
    torch.manual_seed(5)
    return Edited(act).double().eval()


def reference_ablationcam(model: Edited, layer: str, x: torch.Tensor, targets) -> torch.Tensor:
    """Ablation-CAM from its definition: one plain forward per (sample, channel)."""
    store = {}
    model.edit = {layer: lambda h: store.setdefault("a", h)}
    with torch.no_grad():
        full = model(x)
    a = store["a"]
    maps = []
    for i, t in enumerate(targets):
        s = full[i, t]
        weights = []
        for c in range(a.shape[1]):
            def ablate(h, c=c, i=i):
                h = a[i:i + 1].clone()
                h[:, c] = 0
                return h

            model.edit = {layer: ablate}
            with torch.no_grad():
                weights.append((s - model(x[i:i + 1])[0, t]) / s)
        cam = (torch.stack(weights)[:, None, None] * a[i]).sum(0).clamp_min(0)
        maps.append(F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear",
                                  align_corners=False)[0, 0])
    model.edit = None
    return torch.stack(maps)


@pytest.mark.parametrize("layer", ["act@0", "act@1", "relu"])
def test_ablationcam_at_any_pfv_layer_matches_definition(layer):
    """Layers that are no module output (a module's first of two calls, a functional relu)."""
    model = edited()
    x = inputs(2, 8, 10)
    got = METHODS["ablationcam"](model, layer=layer, internal_batch_size=3).attribute(x, [1, 2])
    want = reference_ablationcam(model, layer, x, [1, 2])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_ablationcam_non_relu_layer_zeroes_channels():
    """On a SiLU layer (negative values) channels are still ablated to 0, as in the paper."""
    model = edited(nn.SiLU)
    x = inputs(2, 8, 10)
    got = METHODS["ablationcam"](model, layer="act@1").attribute(x, [0, 3])
    want = reference_ablationcam(model, "act@1", x, [0, 3])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", CAMS)
def test_normalize_is_per_sample_min_max_of_the_raw_map(name):
    model = small("PoolNet")
    x = inputs(3, 12, 16)
    raw = METHODS[name](model).attribute(x, [0, 1, 2])
    norm = METHODS[name](model, normalize=True).attribute(x, [0, 1, 2])
    assert (raw >= 0).all() and raw.amax() > 0
    # 1 at each map's maximum; a map that the relu zeroes everywhere stays 0
    peak = (raw.flatten(1).amax(1) > 0).to(raw.dtype)
    torch.testing.assert_close(norm.flatten(1).amax(1), peak, rtol=0, atol=1e-5)
    # normalize=True also scales the layer map first; only the 1e-7 guards can differ.
    scale = raw.flatten(1).amax(1)
    assert ((norm - _minmax(raw)).abs().flatten(1).amax(1) <= 1e-6 / scale.clamp_max(1)).all()


def test_layer_maps_through_explain():
    model = torchvision_resnet()
    x = inputs(2, 32, 48)
    low = srdxai.explain(model, x, [1, 2], "layercam", layer="low", upsample=False)
    assert low.shape == (2, 1, 2)
    up = srdxai.explain(model, x, [1, 2], "layercam", layer="low")
    torch.testing.assert_close(up, METHODS["layercam"](model).attribute(x, [1, 2]))
    high = srdxai.explain(model, x, [1, 2], "gradcam", layer="high", upsample=False)
    assert high.shape == (2, 2, 3)


# --- invariances -----------------------------------------------------------------------------

def state(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            [x.training for x in m.modules()], [p.requires_grad for p in m.parameters()],
            [(len(x._forward_hooks), len(x._forward_pre_hooks), len(x._backward_hooks),
              len(x._backward_pre_hooks)) for x in m.modules()])


def assert_unchanged(m: nn.Module, before) -> None:
    after = state(m)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]


def train_mode_model() -> nn.Module:
    model = small("ResNetLike").train()  # methods must evaluate in eval mode, give it back
    model.layer1.conv2.register_forward_hook(lambda m, i, o: None)  # a user's hook stays
    return model


@pytest.mark.parametrize("name", CAMS)
def test_batch_versus_single_and_model_unchanged(name):
    model = train_mode_model()
    before = state(model)
    x = inputs(3, 10, 12, seed=7)
    targets = [1, 0, 3]
    opts = {"internal_batch_size": 5} if name in ("scorecam", "ablationcam") else {}
    batch = srdxai.explain(model, x, targets, name, **opts)
    assert batch.shape == (3, 10, 12) and batch.dtype == torch.float64
    assert torch.isfinite(batch).all() and (batch >= 0).all()
    single = torch.cat([srdxai.explain(model, x[i:i + 1], targets[i], name, **opts)
                        for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-7, atol=1e-10)
    chunked = srdxai.explain(model, x, targets, name, batch_size=2, **opts)
    torch.testing.assert_close(batch, chunked, rtol=1e-7, atol=1e-10)
    nchw = METHODS[name](model, channels_last=False, **opts).attribute(x, targets)
    torch.testing.assert_close(batch, nchw, rtol=1e-7, atol=1e-10)
    # a callable target gives the same map as the class it selects
    by_callable = srdxai.explain(model, x, lambda out: out[:, 3], name, **opts)
    torch.testing.assert_close(by_callable, srdxai.explain(model, x, 3, name, **opts))
    assert_unchanged(model, before)


# --- errors ----------------------------------------------------------------------------------

class Flat(nn.Module):
    """Conv features, then a hidden fully connected layer with its own activation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(4 * 6 * 6, 8)
        self.hidden = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.hidden(self.fc1(self.act(self.conv(x)).flatten(1))))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3 * 6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


LAYER_CAMS = [n for n in CAMS if n != "fullgrad"]


@pytest.mark.parametrize("name", LAYER_CAMS)
def test_unknown_layer_is_a_clear_error_and_leaves_the_model_alone(name):
    model = train_mode_model()
    before = state(model)
    with pytest.raises(InvalidInputError, match="unknown layer 'layer9'.*layer1"):
        METHODS[name](model, layer="layer9").attribute(inputs(1, 8, 8), 0)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", LAYER_CAMS)
def test_layer_without_spatial_dims_is_a_clear_error(name):
    torch.manual_seed(0)
    model = Flat().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="'hidden'.*is not a feature map"):
        METHODS[name](model, layer="hidden").attribute(x)
    assert METHODS[name](model, layer="act").attribute(x).shape == (2, 6, 6)
    mlp = MLP().double()
    with pytest.raises(InvalidInputError, match="no activation layer with the input's spatial"):
        METHODS[name](mlp).attribute(torch.randn(2, 3, 6, dtype=torch.float64))


def test_option_errors():
    model = small("PlainNet")
    with pytest.raises(InvalidInputError, match="no target layer"):
        METHODS["fullgrad"](model, layer="low")
    with pytest.raises(InvalidInputError, match="has no layer maps"):
        srdxai.explain(model, inputs(1, 8, 8), 0, "fullgrad", layer="low")
    with pytest.raises(InvalidInputError, match="internal_batch_size"):
        METHODS["scorecam"](model, internal_batch_size=0)
    with pytest.raises(InvalidInputError, match="precision must be one of"):
        METHODS["scorecam"](model, precision="half")
    with pytest.raises(InvalidInputError, match="not part of the model"):
        METHODS["gradcam"](model, layer=nn.ReLU())


@pytest.mark.parametrize("name", CAMS)
def test_vision_transformer_token_layers(name):
    """The default layer is the patch tokens of the LayerNorm feeding the last attention, on
    their grid; an activation's (N, tokens, dim) output is not a feature map and is refused
    (it looks like a conv1d map to shape checks); FullGrad places the token biases on the
    patch grid (tests/test_fullgrad_vit.py) and has no layer."""
    from srdxai.models.zoo import small_vit

    torch.manual_seed(0)
    vit = small_vit(5).eval()
    x = torch.randn(1, 3, 64, 64)
    if name == "fullgrad":
        m = srdxai.explain(vit, x, 0, name)
        assert m.shape == (1, 64, 64) and torch.isfinite(m).all()
        with pytest.raises(InvalidInputError, match="no layer maps"):
            srdxai.explain(vit, x, 0, name, layer="blocks.0.mlp.act")
        return
    m = srdxai.explain(vit, x, 0, name, internal_batch_size=64) if name in (
        "scorecam", "ablationcam") else srdxai.explain(vit, x, 0, name)
    assert m.shape == (1, 64, 64) and torch.isfinite(m).all()
    with pytest.raises(InvalidInputError, match="is not a feature map"):
        srdxai.explain(vit, x, 0, name, layer="blocks.0.mlp.act")


# --- transformers: token layers read as feature maps -----------------------------------------

def _timm(name: str, **options) -> nn.Module:
    try:
        from _compat import import_torchvision

        import_torchvision()
        import timm
    except ImportError as error:  # pragma: no cover
        pytest.skip(f"timm is not usable here: {error}")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **options).eval()


def _tokens_to_map(prefix: int, h: int, w: int):
    def reshape(t):  # pytorch-grad-cam's reshape_transform for ViTs
        return t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


@pytest.mark.parametrize("method", [*GRADIENT_CAMS, "scorecam"])
def test_vit_cams_match_grad_cam_with_its_reshape_transform(pgc, method):
    """No reshape_transform needed: 'low' is the LayerNorm feeding the last attention
    (timm's ``blocks[-1].norm1``, pytorch-grad-cam's recommended ViT layer), the class token
    is dropped and the patch tokens are laid out on their grid."""
    model = _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = srdxai.explain(model, x, [1, 3], method, normalize=True)
    cls_name = GRADIENT_CAMS.get(method, "ScoreCAM")
    ref = theirs(pgc, cls_name, model, ["blocks.1.norm1"], x, [1, 3],
                 reshape_transform=_tokens_to_map(1, 4, 4))
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < TOLERANCE


def test_swin_cam_matches_grad_cam_on_its_channels_last_layer(pgc):
    """Swin's blocks keep (N, h, w, C) maps: read channels-last, no reshape_transform."""
    model = _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2,
                  depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 2, 2))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    layer = "layers.2.blocks.0.norm1"  # 4x4 windows of 2x2 at 64 px
    ours = srdxai.explain(model, x, [0, 4], "gradcam", normalize=True, layer=layer)
    ref = theirs(pgc, "GradCAM", model, [layer], x, [0, 4],
                 reshape_transform=lambda t: t.permute(0, 3, 1, 2))
    assert ref.abs().max() > 0
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < TOLERANCE
    low = srdxai.explain(model, x, [0, 4], "gradcam")  # the LayerNorm of the last attention
    assert low.shape == (2, 64, 64) and torch.isfinite(low).all()


def test_prefix_tokens_are_found_from_the_token_count():
    """DeiT-distilled has a class and a distillation token: 2 + 4x4 tokens."""
    model = _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    auto = srdxai.explain(model, x, 0, "gradcam")
    torch.testing.assert_close(auto, srdxai.explain(model, x, 0, "gradcam", prefix_tokens=2))
    with pytest.raises(InvalidInputError, match="prefix_tokens"):
        srdxai.explain(model, x, 0, "gradcam", prefix_tokens=5)


def test_vit_ablationcam_equals_an_independent_hook_ablation():
    model = _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).double()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    ours = srdxai.explain(model, x, 2, "ablationcam")
    layer = model.blocks[1].norm1
    captured = []
    handle = layer.register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        score = model(x)[0, 2]
    handle.remove()
    a = captured[0][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    weights = []
    for c in range(a.shape[1]):
        def zero(m, args, out, c=c):
            out = out.clone()
            out[:, 1:, c] = 0
            return out

        handle = layer.register_forward_hook(zero)
        with torch.no_grad():
            weights.append((score - model(x)[0, 2]) / score)
        handle.remove()
    cam = (torch.stack(weights)[None, :, None, None] * a).sum(1).clamp_min(0)
    expected = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear",
                             align_corners=False)[:, 0]
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("token_layer", ["linear", "batchnorm"])
def test_fullgrad_refuses_biases_it_cannot_place(token_layer):
    """A dense layer with a bias on (N, T, D) tokens (not decomposed) or a BatchNorm on the
    flattened (N*T, D) tokens (LeViT): their bias gradients have no place in the image, and
    FullGrad must not silently leave them out of its sum."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 4, stride=4)
            self.linear = nn.Linear(4, 4, bias=token_layer == "linear")
            self.bn = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
            t = self.linear(t)
            if token_layer == "batchnorm":
                t = self.bn(t.flatten(0, 1)).reshape_as(t)
            return self.head(F.relu(t).mean(1))

    with pytest.raises(InvalidInputError, match="FullGrad needs every bias"):
        srdxai.explain(Tokens().eval(), torch.randn(2, 3, 8, 8), 0, "fullgrad")


class _HybridTokens(nn.Module):
    """A conv stem (4-D activations), then tokens (N, T, D) through an MLP with an
    activation and a BatchNorm, no LayerNorm or attention (LeViT's pattern)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.act = nn.Hardswish()
        self.fc1 = nn.Linear(8, 16)
        self.mlp_act = nn.Hardswish()
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.act(self.stem(x)).flatten(2).transpose(1, 2)
        t = t + self.fc2(self.mlp_act(self.fc1(t)))
        return self.head(t.mean(1))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
def test_low_layer_of_a_hybrid_is_a_feature_map_like_the_input(method):
    """'low' skips activations laid out as tokens (N, T, D) (LeViT's MLPs used to be picked,
    and every CAM refused): it is the last activation shaped like the input, the stem's."""
    torch.manual_seed(0)
    model = _HybridTokens().eval()
    x = torch.randn(2, 3, 16, 16)
    ours = srdxai.explain(model, x, target=1, method=method)
    by_name = srdxai.explain(model, x, target=1, method=method, layer="act")
    torch.testing.assert_close(ours, by_name)
    assert ours.shape == (2, 16, 16) and torch.isfinite(ours).all()


class _LayerNormNet(nn.Module):
    """conv -> LayerNorm over channels (channels-last, ConvNeXt's) -> relu -> strided conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.conv1(x)
        h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = self.conv2(torch.relu(h))
        return self.fc(h.mean((2, 3)))


def test_fullgrad_counts_a_layernorm_shift_as_a_bias():
    """Written out by hand: the input term plus, per bias, |b * dS/d(output)| min-max scaled
    per channel, summed, upsampled. A LayerNorm's bias is its shift beta - mean * gamma / std
    per position (as BatchNorm's is beta - mean * gamma / std per channel); it used to be
    refused ("adds biases to tensors of shape (N, H, W, C)")."""
    torch.manual_seed(0)
    model = _LayerNormNet().double().eval()
    with torch.no_grad():
        model.norm.bias.add_(0.5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    xx = x.clone().requires_grad_(True)
    h1 = model.conv1(xx)
    h1.retain_grad()
    t = h1.permute(0, 2, 3, 1)
    mean = t.mean(-1, keepdim=True)
    std = (t.var(-1, unbiased=False, keepdim=True) + model.norm.eps).sqrt()
    n1 = model.norm(t).permute(0, 3, 1, 2)
    n1.retain_grad()
    h2 = model.conv2(torch.relu(n1))
    h2.retain_grad()
    out = model.fc(h2.mean((2, 3)))
    out[:, 1].sum().backward()
    shift = (model.norm.bias - mean * model.norm.weight / std).permute(0, 3, 1, 2).detach()

    def term(bias, grad):
        return _minmax((bias * grad).abs(), dims=2).sum(1)

    expected = _minmax((xx.grad * x).abs(), dims=2).sum(1)
    expected = expected + term(model.conv1.bias[:, None, None], h1.grad)
    expected = expected + term(shift, n1.grad)
    expected = expected + F.interpolate(term(model.conv2.bias[:, None, None], h2.grad)[:, None],
                                        size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    ours = srdxai.explain(model, x, target=1, method="fullgrad")
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-10, atol=1e-12)
