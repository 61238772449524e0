"""Bundled data: ImageNet-1k class names and a few demo photos.

``imagenet_class_names()`` reads ``imagenet_classes.txt`` (shipped as package data): the 1000
ImageNet-1k class names in the standard index order (0 ``tench`` ... 285 ``Egyptian cat`` ...
967 ``espresso`` ... 999 ``toilet tissue``), one per line.

``demo_images()`` returns photos that ship inside the scikit-image wheel, so they load offline.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from srdxai.data.text import (
    PlantedEvidenceSplit,
    TextSplit,
    Vocabulary,
    load_movie_reviews,
    make_planted_evidence,
    tokenize,
)
from srdxai.errors import InvalidInputError, MissingDependencyError, SrdxaiError

__all__ = ["DEMO_IMAGE_NAMES", "NUM_IMAGENET_CLASSES", "PlantedEvidenceSplit", "TextSplit",
           "Vocabulary", "demo_images", "imagenet_class_names", "load_movie_reviews",
           "make_planted_evidence", "tokenize",
           "read_image"]

NUM_IMAGENET_CLASSES = 1000

#: The scikit-image sample photos returned by :func:`demo_images`, in this order.
DEMO_IMAGE_NAMES: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket")


@lru_cache(maxsize=1)
def _read_class_names() -> tuple[str, ...]:
    try:
        text = resources.files(__name__).joinpath("imagenet_classes.txt").read_text("utf-8")
    except OSError as exc:
        raise SrdxaiError(f"cannot read the bundled ImageNet class names: {exc}") from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != NUM_IMAGENET_CLASSES:
        raise SrdxaiError(
            f"the bundled imagenet_classes.txt has {len(names)} class names, "
            f"expected {NUM_IMAGENET_CLASSES}; the installation is damaged"
        )
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, indexed by class id (a new list on every call)."""
    return list(_read_class_names())


def demo_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled photos as ``uint8`` arrays of shape ``(H, W, 3)``.

    Keys, in order: ``chelsea`` (a cat, ImageNet class 285 "Egyptian cat"), ``coffee`` (a cup of
    espresso, class 967), ``astronaut`` and ``rocket``. No network access is needed.
    """
    try:
        from skimage import data as skdata
    except ImportError as exc:  # pragma: no cover - scikit-image is a runtime dependency
        raise MissingDependencyError(
            "the demo images come from scikit-image; install it with "
            "'pip install -c constraints.txt scikit-image'"
        ) from exc
    images: dict[str, np.ndarray] = {}
    for name in DEMO_IMAGE_NAMES:
        image = np.asarray(getattr(skdata, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        images[name] = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    return images


#: Pillow modes of one-channel images with more than 8 bits per pixel, and their full scale
_DEEP_GREY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def read_image(path: str | Path) -> np.ndarray:
    """An image file as a ``uint8`` RGB array ``(H, W, 3)``, EXIF rotation applied.

    16-bit greyscale files (PNG, TIFF) are scaled from their full range to 8 bits (Pillow's
    own conversion would clip them to white); 16-bit colour PNGs are reduced to 8 bits by
    Pillow. 32-bit integer and floating-point images have no agreed range and are refused
    with :class:`~srdxai.errors.InvalidInputError`, as is anything Pillow cannot read.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"no such file: {path}")
    if not path.is_file():
        raise InvalidInputError(f"not a file: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            mode = img.mode
            if mode in _DEEP_GREY:
                deep = np.asarray(img).astype(np.float64)
                grey = np.rint(deep * (255.0 / _DEEP_GREY[mode])).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if mode == "I":  # 32-bit ints: 16-bit files opened this way keep <= 65535
                deep = np.asarray(img)
                if deep.min() >= 0 and deep.max() <= 65535:
                    grey = np.rint(deep.astype(np.float64) * (255.0 / 65535)).astype(np.uint8)
                    return np.repeat(grey[:, :, None], 3, axis=2)
            if mode in ("I", "F"):
                raise InvalidInputError(
                    f"{path} is a {'32-bit integer' if mode == 'I' else 'floating-point'} "
                    "image, whose range srdxai cannot know; save it as an 8- or 16-bit image")
            rgb = img.convert("RGB")
    except InvalidInputError:
        raise
    except Exception as exc:  # Pillow raises many types for damaged or unknown files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidInputError(f"cannot read image {path}: {reason}") from exc
    return np.asarray(rgb, dtype=np.uint8)
