"""Serve srdxai's methods to Quantus as an ``explain_func``.

Quantus 0.6 calls ``explain_func(model=..., inputs=np.ndarray, targets=np.ndarray,
**explain_func_kwargs)`` (plus ``device=`` when the metric call got one) and expects a numpy
array of maps back (``Metric.explain_batch`` in ``quantus/metrics/base.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError
from .common import model_device_dtype

__all__ = ["quantus_explain_func"]


def quantus_explain_func(method: str, **options: Any) -> Callable[..., np.ndarray]:
    """An ``explain_func`` for Quantus that runs ``srdxai.explain(model, x, y, method)``.

    Inputs are converted to the model's device and dtype; maps come back as float numpy arrays
    of shape (N, H, W) (Quantus adds the channel axis itself). ``options`` (and any
    ``explain_func_kwargs`` Quantus passes, which take precedence) go to ``srdxai.explain``;
    Quantus' ``device`` keyword is dropped because the model's own device is used.

    Example::

        quantus.LocalLipschitzEstimate()(model=m, x_batch=x, y_batch=y, a_batch=a,
                                         explain_func=quantus_explain_func("saliency"))
    """
    from ..api import explain
    from ..methods import get_method

    get_method(method)  # fail now, not inside Quantus, for an unknown method name

    def explain_func(model: nn.Module, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
        kwargs.pop("device", None)
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"explain_func needs the torch model, got {type(model).__name__}.")
        device, dtype = model_device_dtype(model) or (torch.device("cpu"), torch.float32)
        x = torch.as_tensor(np.asarray(inputs)).to(device=device, dtype=dtype)
        y = torch.as_tensor(np.asarray(targets)).reshape(-1).to(device=device, dtype=torch.long)
        maps = explain(model, x, y, method, **{**options, **kwargs})
        return maps.detach().cpu().numpy()

    explain_func.__name__ = f"srdxai_{method}"
    return explain_func
