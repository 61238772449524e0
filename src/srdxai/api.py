"""``srdxai.explain``: one call for every method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .engine.core import Target
from .methods.base import get_method, method_options

Tensor = torch.Tensor


def explain(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    method: str = "srd",
    *,
    layer: str | None = None,
    upsample: bool = True,
    batch_size: int | None = None,
    **options: Any,
) -> Tensor:
    """Explain ``model``'s decision on ``x`` with ``method``; returns one map per sample.

    Args:
        model: a ``torch.nn.Module`` returning logits (N, K). Its state is restored afterwards.
        x: inputs (N, C, H, W) (or (N, C, L)), on the model's device and dtype; or token
            ids (N, L) (an integer tensor) or a tokenizer's batch, explained per token by
            :func:`srdxai.text.explain_tokens` (options: ``attention_mask``, ``baseline``,
            ``embedding``, ``pad_id``), which returns (N, L).
        target: None (predicted class), an int, one int per sample, or a callable on the
            output returning one scalar per sample.
        method: a registered method name (``srdxai.methods.METHODS``), default ``"srd"``.
        layer: for SRD and the CAM methods, the layer to map (``"low"``, ``"high"`` or a
            layer name; see ``SRD.layers``); SRD then returns that layer's PFV relevance.
        upsample: upsample a layer map bilinearly to the input size.
        batch_size: explain at most this many samples at a time.
        **options: the method's own options (e.g. ``seed``, ``contrastive`` for SRD).

    Returns:
        A (N, H, W) tensor (signed for SRD; see each method's docstring).
    """
    from .text.explain import explain_tokens, is_token_input

    if is_token_input(x):  # token ids or a tokenizer's batch: explained per token (N, L)
        if layer is not None:
            options["layer"] = layer
        return explain_tokens(model, x, target, method, batch_size=batch_size, **options)
    cls = get_method(method)
    try:
        explainer = cls(model, batch_size=batch_size, **options)
    except TypeError as error:
        unknown = [k for k in options if k not in method_options(cls)]
        if not unknown:
            raise
        from .errors import InvalidInputError

        raise InvalidInputError(
            f"method '{method}' has no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(method_options(cls)) or 'none'}.") from error
    if layer is not None:
        if not hasattr(explainer, "attribute_layer"):
            from .errors import InvalidInputError

            raise InvalidInputError(f"method '{method}' has no layer maps.")
        return explainer.attribute_layer(x, target, layer=layer, upsample=upsample)
    return explainer.attribute(x, target)
