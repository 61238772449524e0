"""The architecture coverage suite: timm classifiers of every family, random weights, small
inputs, and what every registered method does on each.

Used by ``tests/test_coverage.py`` (the checks) and ``scripts/coverage_table.py`` (the table in
the README). Each cell is either a finite map of the input's size or a clear srdxai refusal;
``EXPECTED_REFUSALS`` states which, so that a method that starts or stops working on an
architecture is noticed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import srdxai
from srdxai.errors import InvalidInputError, UnsupportedOperationError

try:
    from ._compat import import_torchvision  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - depends on how pytest imports the tests
    from _compat import import_torchvision  # type: ignore[no-redef]


@dataclass(frozen=True)
class Arch:
    # timm model name, "torchvision:<name>" (torchvision's own code) or "timm:<name>" (a small
    # configuration of a timm class whose registered models are all large)
    name: str
    family: str  # what it adds to the suite
    size: int = 64  # input side
    options: dict = field(default_factory=dict)  # timm.create_model / builder keywords
    slow: bool = False  # only in the slow suite (heavy for CI)


_SMALL_SWIN = dict(img_size=32, window_size=2, depths=(1, 1, 1, 1), embed_dim=24,
                   num_heads=(1, 1, 2, 2))
_SMALL_VIT = dict(img_size=32, patch_size=8, depth=2)

ARCHS: list[Arch] = [
    Arch("resnet18", "residual CNN"),
    Arch("resnext26ts", "grouped convolutions, SiLU", slow=True),
    Arch("repvgg_a0", "re-parameterised plain CNN"),
    Arch("vgg11", "plain CNN, conv-MLP head", size=32, slow=True),
    Arch("densenet121", "dense concatenation"),
    Arch("dla34", "tree aggregation (concatenation)"),
    Arch("ghostnet_100", "ghost modules (slices, concatenation), SE"),
    Arch("mobilenetv3_small_050", "depthwise, hard-swish, SE with hard-sigmoid gates"),
    Arch("efficientnet_b0", "depthwise, SiLU, squeeze-excitation"),
    Arch("regnety_002", "group convolutions, squeeze-excitation"),
    Arch("mixnet_s", "mixed kernel sizes (channel split + concatenation)"),
    Arch("rexnet_100", "channel-padding residuals (slices), SE"),
    Arch("lcnet_050", "hard-swish, SE"),
    Arch("ecaresnet26t", "efficient channel attention (expanded gates)"),
    Arch("ese_vovnet19b_dw", "one-shot aggregation, effective SE"),
    Arch("hrnet_w18_small", "multi-resolution branches, upsampling", slow=True),
    Arch("cspresnet50", "cross-stage partial (split + concatenation)", slow=True),
    Arch("xception41", "separable convolutions", slow=True),
    Arch("convnext_atto", "LayerNorm, 7x7 depthwise, layer scale"),
    Arch("vit_tiny_patch16_224", "vision transformer", size=32, options=_SMALL_VIT),
    Arch("deit_tiny_patch16_224", "vision transformer (DeiT)", size=32, options=_SMALL_VIT),
    Arch("swin_tiny_patch4_window7_224", "shifted-window transformer", size=32,
         options=_SMALL_SWIN),
    Arch("mobilevit_xxs", "hybrid CNN-transformer", size=32),
    Arch("levit_128s", "hybrid CNN-transformer (LeViT)", options={"img_size": 64}),
    Arch("timm:mixer", "MLP-Mixer (dense layers over the tokens)", size=32),
    # torchvision's own code for the same families: its models are what many users have
    Arch("torchvision:shufflenet_v2_x0_5", "channel shuffle (view, transpose, view)"),
    Arch("torchvision:googlenet", "inception modules (concatenation)",
         options={"aux_logits": False, "init_weights": True}),
    Arch("torchvision:squeezenet1_1", "fire modules, convolutional head"),
    Arch("torchvision:efficientnet_b0", "SE as 1x1 convolutions, stochastic depth"),
    Arch("torchvision:convnext_tiny", "channels-last blocks, layer scale parameter",
         slow=True),
    Arch("torchvision:vit", "vision transformer (nn.MultiheadAttention)", size=32),
    Arch("torchvision:swin", "shifted windows (torchvision's code)", size=32),
    Arch("torchvision:swin_v2", "cosine attention, log-spaced position bias", size=32),
    Arch("torchvision:maxvit", "MBConv with SE, block and grid attention", size=32),
]

# Options that keep the many-pass methods fast here (their defaults are tested elsewhere).
FAST_OPTIONS = {
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"samples": 2},
    "occlusion": {"window": 8, "stride": 8},
}

# Methods that explain Vision Transformers only, and refuse everything else.
_VIT_ONLY = {"attention_rollout", "transformer_attribution", "srd_tokens"}
_CNN_REFUSES = _VIT_ONLY
# What each architecture refuses today (a clear srdxai error); every other method must give a
# finite map. Shrinking these sets is the work of the one-engine issue.
EXPECTED_REFUSALS: dict[str, set[str]] = {
    **{a.name: set(_CNN_REFUSES) for a in ARCHS},
    "vit_tiny_patch16_224": set(),
    "deit_tiny_patch16_224": set(),
    "swin_tiny_patch4_window7_224": {"attention_rollout", "transformer_attribution"},
    "mobilevit_xxs": {"attention_rollout", "transformer_attribution"},
    "levit_128s": {"attention_rollout", "transformer_attribution"},
    "torchvision:vit": set(),
    "torchvision:swin": {"attention_rollout", "transformer_attribution"},
    "torchvision:swin_v2": {"attention_rollout", "transformer_attribution"},
    # FullGrad: the bias gradients of the block / grid partitions have no tracked place
    "torchvision:maxvit": {"attention_rollout", "transformer_attribution", "fullgrad"},
    # FullGrad: the token-mixing layers' biases act on hidden tokens with no place in the image
    "timm:mixer": {"attention_rollout", "transformer_attribution", "fullgrad"},
}


def build(arch: Arch) -> torch.nn.Module:
    import_torchvision()
    torch.manual_seed(0)
    if arch.name.startswith("torchvision:"):
        return _torchvision(arch.name.split(":", 1)[1], arch.options).eval()
    if arch.name == "timm:mixer":  # every registered MLP-Mixer has 8 or more 512-wide blocks
        from timm.models.mlp_mixer import MlpMixer

        model = MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)
        with torch.no_grad():  # timm starts the head at 0: every logit would be its bias
            model.head.weight.normal_(0, 0.2)
        return model.eval()
    import timm

    return timm.create_model(arch.name, pretrained=False, num_classes=5, **arch.options).eval()


def _torchvision(name: str, options: dict) -> torch.nn.Module:
    """A torchvision classifier with random weights: small configurations of the transformers
    (their constructors take them), the named models as they are."""
    from torchvision import models
    from torchvision.models import swin_transformer

    if name == "vit":
        model = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                         num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)
        with torch.no_grad():  # torchvision starts the head at 0: every logit would be 0
            model.heads.head.weight.normal_(0, 0.2)
        return model
    if name in ("swin", "swin_v2"):
        v2 = name == "swin_v2"
        return swin_transformer.SwinTransformer(
            patch_size=[4, 4], embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
            window_size=[2, 2], num_classes=5,
            block=swin_transformer.SwinTransformerBlockV2 if v2 else
            swin_transformer.SwinTransformerBlock,
            downsample_layer=swin_transformer.PatchMergingV2 if v2 else
            swin_transformer.PatchMerging)
    if name == "maxvit":  # maxvit_t needs 224 px; the same blocks, two small stages
        return models.maxvit.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                                    block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                                    stochastic_depth_prob=0.0, num_classes=5)
    return models.get_model(name, num_classes=5, **options)


def inputs(arch: Arch, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, arch.size, arch.size, generator=g)


@dataclass
class Cell:
    status: str  # "ok" or "refused"
    detail: str = ""
    map: torch.Tensor | None = None


def run_cell(model: torch.nn.Module, x: torch.Tensor, method: str, target=1) -> Cell:
    """One method on one model: a map, or a clear refusal. Any other exception propagates."""
    try:
        m = srdxai.explain(model, x, target=target, method=method,
                           **FAST_OPTIONS.get(method, {}))
    except (UnsupportedOperationError, InvalidInputError) as error:
        return Cell("refused", str(error).split(". ")[0])
    return Cell("ok", map=m)


def state(model: torch.nn.Module):
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()], [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()]
