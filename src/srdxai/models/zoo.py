"""Small CNNs and a Vision Transformer for the cluttered Fashion-MNIST canvas (and beyond).

Every architecture takes ``activation=`` one of :data:`ACTIVATIONS` (the six of SRD's activation
table: ReLU, ELU, LeakyReLU, SiLU/Swish, GELU, Tanh), so the same network can be trained with
each. All are plain torch: convolutions, BatchNorm, pooling, linear layers, and for the ViT
LayerNorm and an attention written as explicit ``q @ k^T``, softmax, ``@ v`` (no fused kernel),
so attribution rules can reach each step.

:class:`VisionTransformer` uses timm's state-dict names (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` / ``mlp.fc1`` /
``mlp.fc2``, ``norm``, ``head``); :func:`vit_base_patch16_224` has the shapes of timm's
``vit_base_patch16_224``, so a user's timm weight file loads with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from srdxai.errors import InvalidInputError

__all__ = [
    "ACTIVATIONS",
    "SmallResNet",
    "SmallVGG",
    "VisionTransformer",
    "canonical_activation",
    "make_activation",
    "small_vit",
    "vit_base_patch16_224",
]

#: Activation names accepted by every architecture here, and the module each one builds.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}
_ALIASES = {"swish": "silu", "leakyrelu": "leaky_relu"}


def canonical_activation(name: str) -> str:
    """The :data:`ACTIVATIONS` key for ``name`` (case-insensitive; ``swish`` means ``silu``)."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ACTIVATIONS:
        raise InvalidInputError(
            f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return key


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (see :func:`canonical_activation`)."""
    return ACTIVATIONS[canonical_activation(name)]()


class SmallVGG(nn.Module):
    """VGG-style: 3x3 conv + activation blocks and 2x2 max-pooling, then a two-layer classifier.

    ``widths`` ``(16, 32, 64, 128)`` give 5 convolutions: one per stage, two in the third; on a
    64 x 64 input the last feature map is 4 x 4 (``features``, ``classifier``, as torchvision's
    VGG; the "low" SRD / CAM layer is the last activation of ``features``).
    """

    def __init__(self, num_classes: int = 10, activation: str = "relu",
                 widths: tuple[int, ...] = (16, 32, 64, 128), in_channels: int = 3,
                 input_size: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for stage, w in enumerate(widths):
            convs = 2 if stage == 2 else 1
            for _ in range(convs):
                layers += [nn.Conv2d(c, w, 3, padding=1), make_activation(activation)]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = input_size // 2 ** len(widths)
        self.classifier = nn.Sequential(nn.Linear(c * side * side, 128),
                                        make_activation(activation), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 conv + BN), with its own activation modules."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = make_activation(activation)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act2(out + shortcut)


class SmallResNet(nn.Module):
    """ResNet-style: a stride-2 stem, one basic block per stage, global average pool, linear.

    Stage names follow torchvision (``layer1`` .. ``layer4``); on a 64 x 64 input ``layer4``
    is 4 x 4 (the "low" layer) and ``layer3`` 8 x 8 (the "high" layer).
    """

    def __init__(self, num_classes: int = 10, activation: str = "relu",
                 widths: tuple[int, ...] = (16, 32, 64, 128), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = make_activation(activation)
        c = widths[0]
        for k, w in enumerate(widths):
            setattr(self, f"layer{k + 1}", BasicBlock(c, w, 1 if k == 0 else 2, activation))
            c = w
        self.depth = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        for k in range(self.depth):
            x = getattr(self, f"layer{k + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InvalidInputError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Pre-norm ViT with a class token, learned position embeddings and a linear head on the
    class token (timm's ``VisionTransformer`` names and layout)."""

    def __init__(self, image_size: int = 224, patch: int = 16, in_channels: int = 3,
                 num_classes: int = 1000, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, activation: str = "gelu", eps: float = 1e-6):
        super().__init__()
        if image_size % patch:
            raise InvalidInputError(f"image size {image_size} is not a multiple of the patch "
                                    f"size {patch}")
        self.image_size, self.patch = image_size, patch
        self.patch_embed = PatchEmbed(patch, in_channels, dim)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, activation, eps)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise InvalidInputError(
                f"this ViT takes {self.image_size}x{self.image_size} inputs, got "
                f"{tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def small_vit(num_classes: int = 10, activation: str = "gelu", image_size: int = 64
              ) -> VisionTransformer:
    """ViT for the 64 x 64 canvas: 8 x 8 patches (64 tokens + class token), width 64, 4 blocks,
    4 heads."""
    return VisionTransformer(image_size=image_size, patch=8, num_classes=num_classes, dim=64,
                             depth=4, heads=4, mlp_ratio=2.0, activation=activation)


def vit_base_patch16_224(num_classes: int = 1000) -> VisionTransformer:
    """The shapes and names of timm's ``vit_base_patch16_224`` (86M parameters)."""
    return VisionTransformer(num_classes=num_classes)
