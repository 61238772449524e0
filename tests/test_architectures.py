"""SRD on torchvision-architecture VGG16 and ResNet50 (random weights, small inputs)."""

from __future__ import annotations

import torch

import srdxai
from srdxai.models.torchvision_arch import resnet50, vgg16


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_((torch.rand(m.running_mean.shape, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.bias.data.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.2)
    return model.eval()


def test_resnet50_default_layers_logit_seed_and_conservation():
    torch.manual_seed(0)
    model = randomized(resnet50(num_classes=10)).double()
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    srd = srdxai.SRD(model)
    names = dict(srd.layers(x))
    assert names["layer4.2.relu@2"] == (2048, 2, 3)
    logit = model(x)[:, 7].detach()
    pixel = srdxai.explain(model, x, target=7)
    torch.testing.assert_close(pixel.sum((1, 2)), logit)
    low = srdxai.explain(model, x, target=7, layer="low", upsample=False)
    high = srdxai.explain(model, x, target=7, layer="high", upsample=False)
    torch.testing.assert_close(low, srdxai.explain(model, x, target=7, layer="layer4",
                                                   upsample=False))
    torch.testing.assert_close(high, srdxai.explain(model, x, target=7, layer="layer3",
                                                    upsample=False))
    torch.testing.assert_close(high.sum((1, 2)), logit)


def test_vgg16_gradcam_seed_at_conv5_3_is_conserved_to_the_pixels():
    torch.manual_seed(0)
    model = vgg16(num_classes=10).eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    srd = srdxai.SRD(model)  # auto -> gradcam: the flatten + FC head is not decomposed
    pixel = srd.attribute(x, target=3)
    seed = srd.attribute_layer(x, target=3, layer="features.29", upsample=False)
    assert seed.shape == (1, 4, 4)
    assert (seed >= 0).all() and seed.sum() > 0  # a Grad-CAM map
    torch.testing.assert_close(pixel.sum(), seed.sum())
    high = srd.attribute_layer(x, target=3, layer="high", upsample=False)
    assert high.shape == (1, 8, 8)  # features.22 (conv4_3)
    torch.testing.assert_close(high, srd.attribute_layer(x, target=3, layer="features.22",
                                                         upsample=False))
