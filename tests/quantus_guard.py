"""Quantus 0.6 for the cross-check tests: imported through tests/_compat.py's torchvision shim
(Quantus imports zennit, which imports torchvision), or the calling test module is skipped."""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import pytest

#: Quantus configured to normalise per sample, as srdxai always does
PER_SAMPLE = {"normalise_func_kwargs": {"normalise_axes": (1, 2, 3)}, "disable_warnings": True}
#: float64 models on both sides leave only summation-order rounding
RTOL = 1e-9


def import_quantus() -> ModuleType:
    """The quantus module, or skip the whole test module that asks (no oracle here)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from _compat import import_torchvision

        import_torchvision()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import quantus
    except Exception as error:  # noqa: BLE001 - any import failure means "no oracle here"
        pytest.skip(f"quantus is not importable ({error}); install it with "
                    "pip install -c constraints.txt 'quantus==0.6.*'", allow_module_level=True)
    return quantus
