"""Your own classifier: built from a timm or torchvision architecture name, or by a function of
yours, with a weight file, and fed images the way its training preprocessed them.

Example::

    from srdxai.models.user import build_model, image_spec, prepare, preprocess

    model = build_model(arch="timm:resnet50", weights="resnet50.pth", num_classes=10)
    model = build_model(builder="my_project.nets:make_net", weights="net.pt")
    spec = image_spec(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = preprocess(image_uint8_hwc, spec)          # (1, 3, 224, 224)

Nothing is downloaded: architectures are built with random weights and then given the weight
file (read with ``weights_only=True``). Images are resized and centre-cropped as timm and
torchvision evaluate ImageNet models: the shorter side to ``size / crop_fraction``, then the
central ``size x size`` square; an image already ``size x size`` is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srdxai.errors import InvalidInputError, MissingDependencyError, SrdxaiError
from srdxai.models.base import centre_crop, normalize, resize_image
from srdxai.models.checkpoint import first_line, load_checkpoint

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageSpec", "build_model", "centre_crop",
           "image_spec", "prepare", "preprocess", "read_class_names"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_model(arch: str | None = None, builder: str | None = None,
                weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """Your classifier in eval mode, on the CPU.

    ``arch``: ``"timm:NAME"``, ``"torchvision:NAME"`` or a bare ``NAME`` (timm first, then
    torchvision); built without pretrained weights, with ``num_classes`` outputs if given.
    ``builder``: ``"package.module:function"`` or ``"path/to/file.py:function"``, called with no
    arguments (or ``num_classes=`` if given), returning an ``nn.Module``. Exactly one of the
    two. ``weights``: a state dict file (or a training checkpoint holding one under
    ``state_dict`` / ``model``; a ``module.`` prefix is dropped), loaded strictly.
    """
    if (arch is None) == (builder is None):
        raise InvalidInputError("give exactly one of arch (a timm or torchvision architecture "
                                "name) and builder ('module:function')")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(
            num_classes, int) or num_classes < 1):
        raise InvalidInputError(f"num_classes must be a positive int, got {num_classes!r}")
    if arch is not None:
        model = _from_arch(arch, num_classes)
    else:
        assert builder is not None  # exactly one of the two, checked above
        model = _from_builder(builder, num_classes)
    if weights is not None:
        what = arch or builder
        load_checkpoint(model, Path(weights), f"the model {what!r}",
                        "pass the state dict saved from this architecture (and --num-classes "
                        "if it was trained with another number of classes)")
    return model.eval()


def _from_arch(arch: str, num_classes: int | None) -> nn.Module:
    source, _, name = arch.rpartition(":")
    if source not in ("", "timm", "torchvision"):
        raise InvalidInputError(f"unknown architecture source {source!r} in {arch!r}: use "
                                "'timm:NAME', 'torchvision:NAME' or a bare NAME")
    options: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    tried = []
    if source in ("", "timm"):
        try:
            import timm
        except ImportError as exc:
            if source == "timm":
                raise MissingDependencyError(f"'{arch}' needs timm: pip install timm") from exc
        else:
            if name in timm.list_models():
                return timm.create_model(name, pretrained=False, **options)
            tried.append("timm")
    if source in ("", "torchvision"):
        try:
            from torchvision import models as tv_models
        except ImportError as exc:
            if source == "torchvision":
                raise MissingDependencyError(
                    f"'{arch}' needs torchvision: pip install torchvision") from exc
        else:
            if name in tv_models.list_models(module=tv_models):
                return tv_models.get_model(name, weights=None, **options)
            tried.append("torchvision")
    if not tried:
        raise MissingDependencyError(f"building {arch!r} needs timm or torchvision; install one")
    raise InvalidInputError(f"no architecture named {name!r} in {' or '.join(tried)}; "
                            "`timm.list_models()` and `torchvision.models.list_models()` list "
                            "the names")


def _from_builder(spec: str, num_classes: int | None) -> nn.Module:
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name.isidentifier():
        raise InvalidInputError(f"builder {spec!r} must be 'package.module:function' or "
                                "'path/to/file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise InvalidInputError(f"builder file not found: {path}")
            module_name = f"srdxai_user_model_{abs(hash(path.resolve()))}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise InvalidInputError(f"cannot import {path} as Python code")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SrdxaiError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"cannot import the builder module {target!r}: "
                                f"{first_line(exc)}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InvalidInputError(f"{target!r} has no function {func_name!r}")
    try:
        model = func() if num_classes is None else func(num_classes=num_classes)
    except Exception as exc:
        raise InvalidInputError(f"the builder {spec!r} failed: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"the builder {spec!r} returned {type(model).__name__}, not a "
                                "torch.nn.Module")
    return model


@dataclass(frozen=True)
class ImageSpec:
    """How images are fed to your model (see :func:`image_spec`)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_fraction: float = 0.875


def image_spec(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD, crop_fraction: float = 0.875) -> ImageSpec:
    """How images are fed to your model: resized and centre-cropped to ``size`` (see the
    module docstring), then ``(pixel / 255 - mean) / std`` per RGB channel."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InvalidInputError(f"size must be an int >= 8, got {size!r}")
    mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise InvalidInputError("mean and std need one value per RGB channel (3 each)")
    if not all(np.isfinite(mean_t)) or not all(np.isfinite(v) and v > 0 for v in std_t):
        raise InvalidInputError("mean must be finite and std finite and > 0")
    if not 0 < crop_fraction <= 1:
        raise InvalidInputError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return ImageSpec(size, mean_t, std_t, float(crop_fraction))  # type: ignore[arg-type]


def prepare(image: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """The ``uint8`` ``(size, size, 3)`` image the model sees (before normalisation)."""
    return resize_image(image, spec.input_size, spec.crop_fraction)


def preprocess(image: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """``uint8`` ``(H, W, 3)`` image -> float32 ``(1, 3, size, size)`` model input."""
    return normalize(prepare(image, spec), spec)


def read_class_names(path: str | Path, num_classes: int | None = None) -> list[str]:
    """One class name per line (blank lines at the end ignored); as many as the model has
    outputs when ``num_classes`` is given."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"class names file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read class names from {path}: "
                                f"{first_line(exc)}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if num_classes is not None and len(names) != num_classes:
        raise InvalidInputError(f"{path} has {len(names)} class names but the model has "
                                f"{num_classes} outputs; give one name per line, per output")
    return names
