"""APOP: activation-pattern-only prediction (the observation behind SRD's transparent
activations, Han et al., ICLR 2024, section 6 of ``docs/srd.md``).

Record each activation's on/off pattern while the model sees a real image, then run the model
on an uninformative input (zeros, noise or another image) with every activation replaced by
multiplication with the recorded pattern, and see how often the real image's prediction comes
back. ``pattern="binary"`` is the paper's on/off mask ``[z > 0]`` (exactly ReLU's gate, so with
the real image itself the model's output is reproduced exactly); ``pattern="gain"`` records each
neuron's gain ``f(z) / z`` instead, which reproduces any activation's output on the real image.
Max pooling keeps its own routing (it is not an activation). The model is not modified: the
activations are intercepted by the operation-level tracer inside the model guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.core import check_inputs, model_guard
from ..engine.optrace import OpCall, OpRule, OpTrace
from ..errors import InvalidInputError

Tensor = torch.Tensor
PATTERNS = ("binary", "gain")
BASELINES = ("zeros", "noise", "other")


class _RecordPattern(OpRule):
    unknown = "gradient"

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.masks: list[Tensor] = []

    def on_call(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        if call.kind == "activation":
            z = inputs[0].detach()
            if self.pattern == "binary":
                self.masks.append((z > 0).to(z.dtype))
            else:
                safe = torch.where(z == 0, torch.ones_like(z), z)
                self.masks.append(torch.where(z == 0, torch.zeros_like(z),
                                              output.detach() / safe))
        return output


class _ReplayPattern(OpRule):
    unknown = "gradient"

    def __init__(self, masks: list[Tensor]):
        self.masks, self.index = masks, 0

    def on_call(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        if call.kind != "activation":
            return output
        if self.index >= len(self.masks) or self.masks[self.index].shape != inputs[0].shape:
            raise InvalidInputError(
                "the model ran other activations on the uninformative input than on the real "
                f"one (at {call}); APOP needs a model whose structure does not depend on the "
                "input.")
        mask = self.masks[self.index]
        self.index += 1
        return inputs[0] * mask


def _baseline(x: Tensor, baseline: str | Tensor, seed: int) -> Tensor:
    if isinstance(baseline, Tensor):
        if baseline.shape != x.shape:
            raise InvalidInputError(
                f"the baseline input has shape {tuple(baseline.shape)}, the images "
                f"{tuple(x.shape)}.")
        return baseline.to(x)
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "noise":
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    if baseline == "other":
        if x.shape[0] < 2:
            raise InvalidInputError("baseline='other' needs a batch of at least 2 images.")
        return x.roll(1, dims=0)  # each image's pattern on the previous image
    raise InvalidInputError(f"baseline must be one of {BASELINES} or a tensor, got "
                            f"{baseline!r}.")


def apop_logits(model: nn.Module, x: Tensor, baseline: str | Tensor = "zeros",
                pattern: str = "binary", seed: int = 0) -> Tensor:
    """The model's logits on ``baseline`` with every activation replaced by the pattern it
    had on ``x`` (see the module docstring)."""
    if pattern not in PATTERNS:
        raise InvalidInputError(f"pattern must be one of {PATTERNS}, got {pattern!r}.")
    x = check_inputs(x, model)
    other = _baseline(x, baseline, seed)
    with model_guard(model), torch.no_grad():
        record = _RecordPattern(pattern)
        with OpTrace(model, x, record) as trace:
            trace.forward()
        if not record.masks:
            raise InvalidInputError("the model has no activation to take a pattern from.")
        replay = _ReplayPattern(record.masks)
        with OpTrace(model, other, replay) as trace:
            out = trace.forward()
        if replay.index != len(record.masks):
            raise InvalidInputError("the model ran fewer activations on the uninformative "
                                    "input than on the real one.")
        return out.detach()


@dataclass(frozen=True)
class APOPResult:
    """``prediction``: the model's classes on the real images; ``apop_prediction``: with only
    their activation patterns, on the baseline; ``recovered``: where the two agree;
    ``correct``: where the real prediction equals the label (if labels were given)."""

    prediction: Tensor
    apop_prediction: Tensor
    recovered: Tensor
    correct: Tensor | None


def apop(model: nn.Module, x: Tensor, y: Tensor | None = None, baseline: str | Tensor = "zeros",
         pattern: str = "binary", seed: int = 0) -> APOPResult:
    """How often the activation pattern alone recovers the prediction (per sample)."""
    x = check_inputs(x, model)
    with model_guard(model), torch.no_grad():
        prediction = model(x).argmax(1)
    apop_prediction = apop_logits(model, x, baseline, pattern, seed).argmax(1)
    correct = None if y is None else (prediction == torch.as_tensor(y, device=x.device))
    return APOPResult(prediction, apop_prediction, apop_prediction == prediction, correct)
