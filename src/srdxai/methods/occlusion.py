"""Occlusion (Zeiler & Fergus; Ancona et al.'s Occlusion-1 and Occlusion-n).

Slide a window over the spatial positions, replace the window (all channels) by the baseline,
and credit the drop of the target output ``S_c(x) - S_c(x_occluded)`` to every pixel under the
window; a pixel's value is the mean drop over the windows that cover it. Occlusion-1 is the
1x1 window with stride 1. Signed; one value per pixel (no channel sum: the drop belongs to the
whole window). All occluded copies run batched, ``internal_batch_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engine.catalogue import check_output
from ..engine.core import Target, is_callable_target, is_differentiable, target_gradient
from ..engine.memory import budget_chunk, run_in_chunks
from ..errors import InvalidInputError
from . import options
from .base import Method, register
from .chain_rule import baseline_tensor

Tensor = torch.Tensor


def _pair(v: int | Sequence[int], dims: int, what: str) -> tuple[int, ...]:
    t = (int(v),) * dims if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != dims or any(a < 1 for a in t):
        raise InvalidInputError(f"{what} must be a positive int or {dims} positive ints, got {v}.")
    return t


@register("occlusion")
class Occlusion(Method):
    """Occlusion-n: ``window`` (int or (h, w)), ``stride`` (default: the window, i.e. no
    overlap; 1 for Occlusion-1), ``baseline`` (0, a number or a tensor). Windows that would
    run past the border are clipped there, so every pixel is covered."""

    family = "perturbation"

    def __init__(self, model, window: int | Sequence[int] = 1,
                 stride: int | Sequence[int] | None = None,
                 baseline: Tensor | float | None = None, internal_batch_size: int = 256,
                 batch_size: int | None = None, channels_last: bool | None = None,
                 progress: bool = False):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        self.window = options.sizes(window, "window")
        self.stride = options.sizes(stride, "stride", optional=True)
        self.baseline = baseline
        self.internal_batch_size = options.integer(internal_batch_size, "internal_batch_size")
        self.progress = options.flag(progress, "progress")

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self._batched(inputs, target, self._occlude)

    @staticmethod
    def _objective(out: Tensor, target: Tensor | Callable[[Tensor], Tensor]) -> Tensor:
        """One score per row: a callable target's objective, or the logit of the class."""
        if is_callable_target(target):
            return target(out)
        return out.gather(1, target[:, None])[:, 0]

    def _occlude(self, x: Tensor, target: Target) -> Tensor:
        # no graph, unless a differentiable map is asked for (engine.differentiable)
        with torch.set_grad_enabled(is_differentiable()):
            return self._occlusion_map(x, target)

    def _occlusion_map(self, x: Tensor, target: Target) -> Tensor:
        dims = x.dim() - 2
        window = _pair(self.window, dims, "window")
        stride = _pair(self.stride if self.stride is not None else window, dims, "stride")
        spatial = tuple(x.shape[2:])
        if any(w > s for w, s in zip(window, spatial, strict=True)):
            raise InvalidInputError(f"window {window} is larger than the input {spatial}.")
        base = baseline_tensor(self.baseline, x)
        # Window corners every ``stride``; a last, border-clipped window is added where the
        # stride does not land exactly on the end, so every pixel is covered (as Captum).
        grid = [range(0, st * (-(-(s - w) // st)) + 1, st)
                for s, w, st in zip(spatial, window, stride, strict=True)]
        starts = torch.cartesian_prod(*[torch.tensor(list(g)) for g in grid]).reshape(-1, dims)
        n, p = x.shape[0], starts.shape[0]
        with self._guard():
            out = check_output(self.model(x.clone()))  # a copy: it may edit its input
            _, classes = target_gradient(out, target)  # checks the target once
            if classes is not None:
                target = classes
            reference = self._objective(out, target)
            drops = x.new_empty(n, p)
            # windows per forward pass: internal_batch_size occluded copies, capped by a
            # memory budget and halved when a pass runs out of memory (engine/memory.py)
            copies = budget_chunk(self.model, x, self.internal_batch_size,
                                  backward=is_differentiable())
            with tqdm(total=p, desc="occlusion", disable=not self.progress,
                      unit="window") as bar:

                def one(start: int, stop: int) -> None:
                    block = starts[start:stop].to(x.device)
                    masks = _window_masks(block, window, spatial, x.dtype)
                    occluded = x.unsqueeze(0) * (1 - masks) + base.unsqueeze(0) * masks
                    flat = occluded.reshape(-1, *x.shape[1:])
                    rows = (target if is_callable_target(target)
                            else target.repeat(block.shape[0]))
                    value = self._objective(self.model(flat), rows).reshape(block.shape[0], n)
                    drops[:, start:stop] = (reference.unsqueeze(0) - value).T
                    bar.update(stop - start)

                run_in_chunks(p, max(1, copies // n), one, "occlusion")
        # Spread each window's drop over its pixels and average by coverage.
        shape = [len(g) for g in grid]
        ones = x.new_ones((1, 1, *window))
        transpose = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        total = transpose(drops.reshape(n, 1, *shape), ones, stride=stride)
        count = transpose(x.new_ones((1, 1, *shape)), ones, stride=stride)
        pad = []
        for s, t in zip(reversed(spatial), reversed(total.shape[2:]), strict=True):
            pad += [0, s - t]
        total, count = F.pad(total, pad), F.pad(count, pad)
        return torch.where(count > 0, total / count.clamp_min(1), 0.0)[:, 0].contiguous()


def _window_masks(corners: Tensor, window: tuple[int, ...], spatial: tuple[int, ...],
                  dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, *spatial) masks, 1 inside each window: an outer product of 1-D ranges."""
    mask = None
    for d, (w, s) in enumerate(zip(window, spatial, strict=True)):
        pos = torch.arange(s, device=corners.device)
        inside = (pos >= corners[:, d, None]) & (pos < corners[:, d, None] + w)  # (B, s)
        shape = [corners.shape[0]] + [1] * len(spatial)
        shape[1 + d] = s
        inside = inside.reshape(shape)
        mask = inside if mask is None else mask & inside
    return mask.unsqueeze(1).unsqueeze(1).to(dtype)

