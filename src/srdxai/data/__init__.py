"""Bundled data: ImageNet-1k class names and a few demo photos.

``imagenet_class_names()`` reads ``imagenet_classes.txt`` (shipped as package data): the 1000
ImageNet-1k class names in the standard index order (0 ``tench`` ... 285 ``Egyptian cat`` ...
967 ``espresso`` ... 999 ``toilet tissue``), one per line.

``demo_images()`` returns photos that ship inside the scikit-image wheel, so they load offline.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from srdxai.errors import MissingDependencyError, SrdxaiError

__all__ = ["DEMO_IMAGE_NAMES", "NUM_IMAGENET_CLASSES", "demo_images", "imagenet_class_names"]

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
