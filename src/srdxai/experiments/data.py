"""The models and masked data the experiments run on: the offline zoo and its data sets."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = ["Source", "display_image", "load_batch", "load_model", "source_batch",
           "source_model"]


@dataclass(frozen=True)
class Source:
    """A model and the masked data it is evaluated on."""

    model: str
    dataset: str  # "fashion", "composites", or "own" (the run's OwnSetup)


@cache
def load_model(name: str, device: str) -> torch.nn.Module:
    """The zoo model ``name`` in eval mode on ``device`` (loaded once per process)."""
    from ..models import load

    return load(name).eval().to(device)


@cache
def _dataset(name: str) -> Any:
    if name == "fashion":
        from ..data.fashion import ClutteredFashionMNIST

        return ClutteredFashionMNIST("test")
    from ..data.composites import ImageNetComposites

    return ImageNetComposites()


def load_batch(source: Source, indices: list[int], device: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Model inputs, labels and object masks of ``indices``."""
    if source.dataset == "fashion":
        from ..data.fashion import normalize

        b = _dataset("fashion").batch(indices)
        x, y, masks = normalize(b.images), b.labels, b.masks
    else:
        from ..models import preprocess

        b = _dataset("composites").batch(indices)
        x = torch.cat([preprocess(img, source.model) for img in b.images])
        y, masks = b.labels, b.masks
    return x.to(device), y.to(device), masks.to(device)


def display_image(source: Source, index: int) -> tuple[np.ndarray, str]:
    """Sample ``index`` as ``uint8`` (H, W, 3) for a figure, and its label's class name."""
    if source.dataset == "fashion":
        from ..data.fashion import CLASS_NAMES

        batch = _dataset("fashion").batch([index])
        image = (batch.images[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255)
        return image.astype(np.uint8), CLASS_NAMES[int(batch.labels[0])]
    from ..data import imagenet_class_names

    batch = _dataset("composites").batch([index])
    return batch.images[0], imagenet_class_names()[int(batch.labels[0])]


def source_model(source: Source, config: Any) -> torch.nn.Module:
    """The model of ``source`` for a run with ``config`` (a BenchConfig): the zoo's, or yours."""
    if source.dataset == "own":
        from .own import own_model

        return own_model(config.own, config.device)
    return load_model(source.model, config.device)


def source_batch(source: Source, indices: list[int], config: Any
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inputs, labels (-1: none) and object masks (None: none) of ``indices``."""
    if source.dataset == "own":
        from .own import own_data

        x, y, masks = own_data(config.own).batch(indices)
        device = config.device
        return x.to(device), y.to(device), None if masks is None else masks.to(device)
    return load_batch(source, indices, config.device)
