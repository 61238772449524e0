"""Pretrained models bundled with srdxai, their metadata and their preprocessing.

Example::

    from srdxai.models import load, preprocess

    model = load("efficientnet-lite0")          # real ImageNet weights, checksum verified
    small = load("fmnist-resnet-relu")          # trained on cluttered Fashion-MNIST (shipped)
    x = preprocess(image_uint8_hwc, "efficientnet-lite0")  # (1, 3, 224, 224)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from srdxai.errors import UnknownModelError
from srdxai.models import efficientnet, shipped
from srdxai.models.base import ModelInfo, ModelSpec, normalize, resize_image

__all__ = [
    "DEFAULT_MODEL",
    "ModelInfo",
    "class_names",
    "list_models",
    "load",
    "load_model",
    "model_info",
    "prepare_image",
    "preprocess",
]

DEFAULT_MODEL = efficientnet.NAME

def _registry() -> dict[str, ModelSpec]:
    return {efficientnet.NAME: efficientnet.SPEC, **shipped.specs()}


def list_models() -> list[str]:
    """Names accepted by :func:`load_model`."""
    return sorted(_registry())


def _spec(name: str) -> ModelSpec:
    registry = _registry()
    if not isinstance(name, str) or name not in registry:
        raise UnknownModelError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}"
        )
    return registry[name]


def model_info(name: str = DEFAULT_MODEL) -> ModelInfo:
    """Input size, normalisation (mean/std on the [0, 1] scale), resize rule and label set."""
    return _spec(name).info


def load_model(
    name: str = DEFAULT_MODEL, *, weights_path: str | Path | None = None
) -> torch.nn.Module:
    """Build a bundled model with its pretrained weights, in eval mode, float32, on the CPU.

    Raises :class:`~srdxai.errors.UnknownModelError` for an unknown name,
    :class:`~srdxai.errors.MissingDependencyError` (also an ``ImportError``) when the model's
    packages are not installed, and :class:`~srdxai.errors.SrdxaiError` for an unreadable weight
    file.
    """
    return _spec(name).load(weights_path)


#: ``srdxai.models.load(name)``: the registry's loader (same as :func:`load_model`).
load = load_model


def prepare_image(image: np.ndarray, name: str = DEFAULT_MODEL) -> np.ndarray:
    """The ``uint8`` ``(S, S, 3)`` image the model sees (before normalisation).

    Use it to draw a heat map over exactly the pixels that were explained.
    """
    info = model_info(name)
    return resize_image(image, info.input_size, info.crop_fraction)


def preprocess(image: np.ndarray, name: str = DEFAULT_MODEL) -> torch.Tensor:
    """``uint8`` ``(H, W, 3)`` image -> float32 model input of shape ``(1, 3, S, S)``.

    See :func:`model_info` for what is done (for EfficientNet-Lite0: the shorter side resized to
    256, the central 224 x 224 square, then ``(pixel - 127) / 128``; an image already 224 x 224 is
    used as it is).
    """
    info = model_info(name)
    return normalize(resize_image(image, info.input_size, info.crop_fraction), info)


def class_names(name: str = DEFAULT_MODEL) -> list[str]:
    """The class names of a model's outputs, indexed by class id."""
    info = model_info(name)
    if info.labels == "imagenet-1k":
        from srdxai.data import imagenet_class_names

        return imagenet_class_names()
    if info.labels == "fashion-mnist":
        from srdxai.data.fashion import CLASS_NAMES

        return list(CLASS_NAMES)
    return [str(i) for i in range(info.num_classes)]
