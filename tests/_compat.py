"""Importing optional peer libraries that need torchvision on this CPU-only torch.

torchvision 0.28 (the release pinned to torch 2.13.0) ships a ``_C`` extension linked against
CUDA libraries that CPU torch lacks, so its C++ operators are never registered and
``import torchvision`` fails in ``_meta_registrations.py`` with
``RuntimeError: operator torchvision::nms does not exist`` (docs: the environment notes, section
1). Everything the tests need from it (``torchvision.transforms``, imported by
pytorch-grad-cam) is pure Python, so :func:`import_torchvision` imports it with
``torch.library.register_fake`` turned into a no-op for ``torchvision::`` operators and puts the
real function back afterwards. torchvision's C++ operators (``torchvision.ops.nms``, ...) stay
unusable; nothing here calls them.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch


def _drop_torchvision_modules() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """Import torchvision, working around its missing C++ operators on CPU-only torch.

    Raises ImportError when torchvision is not installed or cannot be imported even with the
    shim (callers turn that into a pytest skip).
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise ImportError(f"torchvision does not import: {error}") from error
    _drop_torchvision_modules()
    real = torch.library.register_fake

    def register_fake(op, func=None, /, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            if func is None:
                return lambda f: f  # used as a decorator: leave the function alone
            return func
        return real(op, func, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        return importlib.import_module("torchvision")
    except Exception as error:  # noqa: BLE001 - report any failure as "not importable"
        _drop_torchvision_modules()
        raise ImportError(f"torchvision does not import even with the shim: {error}") from error
    finally:
        torch.library.register_fake = real
