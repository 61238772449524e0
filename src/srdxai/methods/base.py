"""The method interface and registry.

A method is a small class: it states its rule and its outputs; batching, input and target
checks and the model guard come from :class:`Method`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..engine.core import Target, check_inputs, model_guard, slice_target
from ..errors import InvalidInputError, UnknownMethodError

Tensor = torch.Tensor

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method to the ``explain(method=NAME)`` registry."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}.") from None


class Method:
    """Base of every attribution method: ``Method(model, **options).attribute(x, target)``."""

    name = "method"
    signed = True

    def __init__(self, model: nn.Module, batch_size: int | None = None):
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.model = model
        self.batch_size = batch_size

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def _guard(self) -> Iterator[nn.Module]:
        with model_guard(self.model) as m:
            yield m

    def _check(self, inputs: Tensor) -> Tensor:
        return check_inputs(inputs, self.model)

    def _target_gradient(self, out: Tensor, target: Target):
        from ..engine.core import target_gradient

        return target_gradient(out, target)

    def _batched(
        self, inputs: Tensor, target: Target, fn: Callable[[Tensor, Target], Tensor]
    ) -> Tensor:
        """Run ``fn`` over chunks of at most ``batch_size`` samples and concatenate."""
        x = self._check(inputs)
        n = x.shape[0]
        if target is not None and not isinstance(target, int) and not callable(target):
            t = torch.as_tensor(target)
            if t.numel() not in (1, n):
                from ..errors import InvalidTargetError

                raise InvalidTargetError(
                    f"got {t.numel()} targets for a batch of {n}; give one per sample, a "
                    "single int, or None for the predicted class.")
        step = self.batch_size or n
        parts = [fn(x[i:i + step], slice_target(target, i, i + step)) for i in range(0, n, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
