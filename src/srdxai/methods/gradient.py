"""The plain gradient (saliency without absolute value), the engine's baseline rule."""

from __future__ import annotations

import torch

from ..engine.core import PlainGradientRule, Target, Trace, keep_graph
from .base import Method, register

Tensor = torch.Tensor


@register("gradient")
class Gradient(Method):
    """Gradient of the target w.r.t. the input, summed over channels: (N, H, W), signed.

    It runs through the same engine as every other method (guard, targets, batching, layout)
    with the plain rule, which records nothing, so it costs what ``torch.autograd.grad`` does.
    """

    family = "chain rule"

    needs_smooth_activations = True

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def run(x: Tensor, t: Target) -> Tensor:
            rule = PlainGradientRule()
            with self._guard(), torch.enable_grad(), Trace(self.model, x, rule) as trace:
                out = trace.forward()
                grad_out, _ = self._target_gradient(out, t)
                (gx,) = self._grad(out, x, grad_out)
                del out
            return keep_graph(gx.sum(1)).contiguous()

        def one(x: Tensor, t: Target) -> Tensor:
            return self._with_layout(x, lambda leaf: run(leaf, t))

        return self._batched(inputs, target, one)
