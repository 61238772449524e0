"""Small CNNs used by the SRD test suite (engine tests and the slow oracle).

Every model is an ordinary ``nn.Module`` built from standard torch layers with an ordinary
``forward``; each takes ``act`` (one of :data:`ACTIVATIONS`) to choose the elementwise activation.
Every activation use is its own module instance (``act1``, ``act2``, ...), so a PFV layer can be
named by its activation module's qualified name.

All models take 3 input channels, work on any (also non-square) input of at least 8x8 pixels, and
end in global average pooling + a ``Linear`` head that gives logits.

Use :func:`build_model` to get a float64, eval-mode model with random non-trivial BatchNorm
statistics/affine parameters and random biases (or call :func:`randomize_bn` and
:func:`randomize_biases` yourself on a model you constructed).
"""

from __future__ import annotations

import torch
import torch.nn as nn

ACTIVATIONS: tuple[str, ...] = (
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "silu",
    "gelu",
    "tanh",
    "sigmoid",
    "hardswish",
)


def make_act(act: str) -> nn.Module:
    """Return a fresh activation module for the name ``act`` (see :data:`ACTIVATIONS`)."""
    table = {
        "relu": lambda: nn.ReLU(),
        "relu6": lambda: nn.ReLU6(),
        "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "elu": lambda: nn.ELU(),
        "silu": lambda: nn.SiLU(),
        "gelu": lambda: nn.GELU(),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: nn.Sigmoid(),
        "hardswish": lambda: nn.Hardswish(),
    }
    if act not in table:
        raise ValueError(f"unknown activation {act!r}; choose one of {ACTIVATIONS}")
    return table[act]()


class PlainNet(nn.Module):
    """conv3x3(bias) -> act1 -> conv3x3(stride 2, no bias) -> BN -> act2 -> GAP -> Linear."""

    def __init__(self, act: str = "relu", num_classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=True)
        self.act1 = make_act(act)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = make_act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.bn2(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class PoolNet(nn.Module):
    """conv3x3(bias)-BN-act1 -> MaxPool(3,2,1) -> conv1x1-BN-act2 -> conv3x3(bias)-act3
    -> MaxPool(2,2) -> conv3x3(bias)-act4 -> GAP -> Linear.

    The conv before the first BN has a bias (it is folded into the BN bias by SRD's rule).
    """

    def __init__(self, act: str = "relu", num_classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_act(act)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = make_act(act)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.act3 = make_act(act)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv4 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.act4 = make_act(act)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool1(x)
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.conv3(x))
        x = self.pool2(x)
        x = self.act4(self.conv4(x))
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)


class IdentityBottleneck(nn.Module):
    """conv1x1-BN-act1-conv3x3-BN-act2-conv1x1-BN, then ``out = out + identity`` and act3."""

    def __init__(self, channels: int, mid: int, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = make_act(act)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = make_act(act)
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.act3 = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.act3(out)


class DownsampleBottleneck(nn.Module):
    """conv1x1-BN-act1-conv3x3(stride s)-BN-act2-conv1x1-BN, shortcut conv1x1(stride s)+BN,
    combined with ``torch.add(out, shortcut)``, then act3."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = make_act(act)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = make_act(act)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.act3 = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = torch.add(out, shortcut)
        return self.act3(out)


class ResNetLike(nn.Module):
    """stem conv3x3(bias)-BN-act -> IdentityBottleneck (layer1) -> DownsampleBottleneck
    (layer2, stride 2) -> GAP -> Linear."""

    def __init__(self, act: str = "relu", num_classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = make_act(act)
        self.layer1 = IdentityBottleneck(width, 4, act)
        self.layer2 = DownsampleBottleneck(width, 4, 8, 2, act)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class DepthwiseNet(nn.Module):
    """conv3x3-BN-act1 -> depthwise conv3x3 (groups=C, stride 2, pad 1)-BN-act2 ->
    grouped conv3x3 (groups=2, dilation 2, pad 2, bias)-BN-act3 -> GAP -> Linear."""

    def __init__(self, act: str = "relu", num_classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_act(act)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = make_act(act)
        self.conv3 = nn.Conv2d(width, 8, 3, padding=2, dilation=2, groups=2, bias=True)
        self.bn3 = nn.BatchNorm2d(8)
        self.act3 = make_act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class AvgPoolNet(nn.Module):
    """conv3x3(bias) -> act1 -> AvgPool2d(2) -> conv3x3(no bias)-BN-act2 -> GAP -> Linear."""

    def __init__(self, act: str = "relu", num_classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=True)
        self.act1 = make_act(act)
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = make_act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.pool1(x)
        x = self.act2(self.bn2(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class TinyConvNet(nn.Module):
    """Toy for hand-checked values: conv (``in_ch`` -> ``out_ch``, kernel ``kernel``, no padding,
    bias) -> act -> GAP -> Linear(out_ch, 1)."""

    def __init__(
        self,
        act: str = "relu",
        in_ch: int = 1,
        out_ch: int = 2,
        kernel: tuple[int, int] = (1, 2),
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, bias=True)
        self.act = make_act(act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyPoolNet(nn.Module):
    """Toy for hand-checked values: MaxPool2d(kernel (1, 2), stride 1) on the input ->
    conv1x1 (``in_ch`` -> 1, bias) -> act -> GAP -> Linear(1, 1)."""

    def __init__(self, act: str = "leaky_relu", in_ch: int = 2) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d((1, 2), stride=1)
        self.conv = nn.Conv2d(in_ch, 1, 1, bias=True)
        self.act = make_act(act)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(self.pool(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


class TinyResNet(nn.Module):
    """Toy for hand-checked values (1 channel): ``z = conv(x) + x`` with a (1, 3) conv, padding
    (0, 1), bias; then act -> GAP -> Linear(1, 1). The identity shortcut gets no bias share."""

    def __init__(self, act: str = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=True)
        self.act = make_act(act)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out = out + x
        out = self.act(out)
        return self.fc(torch.flatten(self.gap(out), 1))


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "PlainNet": PlainNet,
    "PoolNet": PoolNet,
    "ResNetLike": ResNetLike,
    "DepthwiseNet": DepthwiseNet,
    "AvgPoolNet": AvgPoolNet,
}


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm2d of ``model`` random non-trivial running_mean, running_var,
    weight (gamma, with either sign) and bias (beta), drawn from a generator seeded by ``seed``.
    Works in place and returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            dt = m.running_mean.dtype
            m.running_mean.copy_((torch.rand(c, generator=g, dtype=torch.float64) - 0.5).to(dt))
            m.running_var.copy_((0.5 + torch.rand(c, generator=g, dtype=torch.float64)).to(dt))
            sign = torch.where(torch.rand(c, generator=g, dtype=torch.float64) < 0.15, -1.0, 1.0)
            gamma = sign * (0.6 + 0.8 * torch.rand(c, generator=g, dtype=torch.float64))
            m.weight.copy_(gamma.to(m.weight.dtype))
            m.bias.copy_((0.6 * torch.randn(c, generator=g, dtype=torch.float64)).to(m.bias.dtype))
    return model


@torch.no_grad()
def randomize_biases(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Replace the bias of every Conv2d / Linear that has one by ``scale * N(0, 1)`` noise
    (generator seeded by ``seed``). Works in place and returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            b = scale * torch.randn(m.bias.shape, generator=g, dtype=torch.float64)
            m.bias.copy_(b.to(m.bias.dtype))
    return model


def build_model(name: str, act: str = "relu", seed: int = 0, num_classes: int = 5) -> nn.Module:
    """Build ``MODEL_CLASSES[name](act)`` with weights drawn under ``torch.manual_seed(seed)``,
    random BN statistics/affine parameters and random biases; return it in float64, eval mode."""
    cls = MODEL_CLASSES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(act=act, num_classes=num_classes)
    randomize_bn(model, seed + 1)
    randomize_biases(model, seed + 2)
    return model.double().eval()


# The activation modules the oracles treat as PFV layers.
ACTIVATION_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
)
