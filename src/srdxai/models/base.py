"""Model metadata and the image preprocessing shared by the bundled models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from srdxai.errors import InvalidInputError

__all__ = ["ModelInfo", "ModelSpec", "as_rgb_uint8", "centre_crop", "normalize", "resize_image"]


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to feed a bundled model.

    ``mean`` and ``std`` are per-channel (RGB) values on the ``[0, 1]`` scale: the model input is
    ``(pixel / 255 - mean) / std`` after the image has been resized as ``resize`` says:
    ``crop_fraction`` ``None`` resizes the whole image to the input size, a number resizes the
    shorter side to ``input_size / crop_fraction`` and keeps the central square (see
    :func:`resize_image`).
    """

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    num_classes: int
    labels: str
    description: str
    crop_fraction: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its metadata and a loader ``load(weights_path) -> nn.Module``."""

    info: ModelInfo
    load: Callable[[str | Path | None], torch.nn.Module]


def as_rgb_uint8(image: object) -> np.ndarray:
    """Check an image and return it as a contiguous ``uint8`` array of shape ``(H, W, 3)``.

    Accepts ``(H, W)`` grey, ``(H, W, 1)``, ``(H, W, 3)`` and ``(H, W, 4)`` (alpha dropped) arrays
    of dtype ``uint8``, and Pillow images (converted to RGB).
    """
    from PIL import Image  # a runtime dependency

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(
            "expected an image as a numpy uint8 array of shape (H, W, 3), "
            f"got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise InvalidInputError(
            f"expected a uint8 image (values 0-255), got dtype {image.dtype}; "
            "convert it first, e.g. (img * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InvalidInputError(
            f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(image.shape)}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidInputError(f"the image is empty: shape {tuple(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def centre_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """``uint8`` ``(H, W, 3)`` -> ``(size, size, 3)``: the shorter side resized to
    ``round(size / crop_fraction)`` (antialiased bilinear), then the central square."""
    from PIL import Image

    rgb = as_rgb_uint8(image)
    height, width = rgb.shape[:2]
    short = round(size / crop_fraction)
    scale = short / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h),
                                                     Image.Resampling.BILINEAR), dtype=np.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size].copy()


def resize_image(image: np.ndarray, size: int, crop_fraction: float | None = None) -> np.ndarray:
    """A ``uint8`` RGB image as a model of input size ``size`` sees it.

    ``crop_fraction`` ``None``: the whole image resized to ``size x size`` (Pillow's antialiased
    bilinear filter; the aspect ratio changes when the image is not square). A number: as
    :func:`centre_crop`, the evaluation preprocessing of timm, torchvision and TensorFlow's
    EfficientNets. An image that is already ``size x size`` is taken to be prepared (e.g. the
    composites, whose object masks are drawn at that size) and returned unchanged.
    """
    from PIL import Image

    rgb = as_rgb_uint8(image)
    if rgb.shape[:2] == (size, size):
        return rgb.copy()
    if crop_fraction is not None:
        return centre_crop(rgb, size, crop_fraction)
    resized = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


class Normalisation(Protocol):
    """Anything with per-channel ``mean`` and ``std`` (a :class:`ModelInfo`, a user model's
    ``ImageSpec``)."""

    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...


def normalize(image: np.ndarray, info: Normalisation) -> torch.Tensor:
    """``uint8`` ``(H, W, 3)`` -> float32 ``(1, 3, H, W)``: ``(pixel / 255 - mean) / std``."""
    rgb = as_rgb_uint8(image)
    x = torch.from_numpy(rgb).to(torch.float32).div_(255.0)
    mean = torch.tensor(info.mean, dtype=torch.float32)
    std = torch.tensor(info.std, dtype=torch.float32)
    x = (x - mean) / std
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()
