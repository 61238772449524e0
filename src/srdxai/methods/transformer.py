"""Attention-based explanations for Vision Transformers: attention rollout and Chefer et al.'s
gradient-weighted attention (transformer attribution).

Both read the attention maps, the outputs of the softmax calls on ``(N, heads, T, T)`` score
tensors that the operation-level tracer (``engine/optrace.py``) sees in the forward pass, so
they work on any ViT whose attention is written with ``softmax`` or
``F.scaled_dot_product_attention`` (timm's and srdxai's). The first ``prefix_tokens`` tokens
(default 1, the class token) are not image patches; the others must form a square grid. Maps are
the class token's row over the patch tokens, reshaped to the grid and upsampled bilinearly to
the input: ``(N, H, W)``, non-negative.

* ``attention_rollout`` (Abnar & Zuidema 2020): per block the heads are fused (mean, max or
  min), the identity added for the residual path, ``A' = (A + I) / 2``, rows renormalised,
  and the blocks multiplied, ``A'_L ... A'_1``. It does not depend on the target class.
* ``transformer_attribution`` (Chefer, Gur & Wolf, CVPR 2021): per block
  ``Abar = mean_heads((dy_t/dA * R_A)+)`` with ``R_A`` the attention map's relevance (AttnLRP's
  here; ``relevance="attention"``: ``R_A = A``, their ICCV 2021 follow-up), and ``R = I``,
  ``R <- R + Abar R`` block by block. Class-specific.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..engine.core import Target
from ..engine.optrace import OpCall, OpRule, OpTrace
from ..errors import InvalidInputError, UnsupportedOperationError
from . import options
from .attnlrp import AttnLRPRule
from .base import Method, register

Tensor = torch.Tensor
HEAD_FUSIONS = ("mean", "max", "min")


class AttentionMaps(OpRule):
    """Keeps the attention maps of a forward pass; every backward stays autograd's."""

    kinds: frozenset[str] = frozenset()
    unknown = "gradient"

    def __init__(self) -> None:
        self.maps: list[Tensor] = []

    def on_call(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        if call.kind == "softmax" and output.dim() == 4 and output.shape[-1] == output.shape[-2]:
            self.maps.append(output)
        return output


def _patch_map(rows: Tensor, prefix: int, x: Tensor) -> Tensor:
    """The class token's row over the patch tokens ``(N, T)`` as an image-sized map; for a
    sequence input ``(N, E, L)`` (a text model's embeddings, :mod:`srdxai.text`), where each
    token is an input position, the row over all ``L`` tokens as it is."""
    if x.dim() == 3:
        if rows.shape[1] != x.shape[2]:
            raise InvalidInputError(
                f"the attention runs over {rows.shape[1]} tokens but the input has "
                f"{x.shape[2]} positions; a sequence model's tokens must be its inputs.")
        return rows.contiguous()
    patches = rows[:, prefix:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise InvalidInputError(
            f"{patches.shape[1]} tokens after the first {prefix} do not form a square patch "
            "grid; set prefix_tokens= to the number of non-patch tokens (class, distillation, "
            "register tokens).")
    grid = patches.reshape(-1, 1, side, side)
    return F.interpolate(grid, size=tuple(x.shape[2:]), mode="bilinear",
                         align_corners=False)[:, 0].contiguous()


class _AttentionMethod(Method):
    """Shared: options, the traced forward pass and the check that attention was found."""

    family = "attention"

    signed = False
    differentiable = False  # the attention maps are read detached

    def __init__(self, model, prefix_tokens: int = 1, batch_size: int | None = None,
                 channels_last: bool | None = None):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        # the class token first
        self.prefix_tokens = options.integer(prefix_tokens, "prefix_tokens")

    def _maps(self, rule: AttentionMaps, batch: int) -> list[Tensor]:
        if not rule.maps:
            raise UnsupportedOperationError(
                f"{self.name} found no attention maps (softmax over (N, heads, T, T) scores) in "
                "the model: it explains Vision Transformers only.")
        shapes = {(a.shape[0], a.shape[-1]) for a in rule.maps}
        if len(shapes) != 1 or next(iter(shapes))[0] != batch:
            raise UnsupportedOperationError(
                f"{self.name} needs one global attention over the same tokens in every block; "
                f"this model attends within windows or at several scales (attention maps of "
                f"shapes {sorted({tuple(a.shape) for a in rule.maps})} for a batch of {batch}, "
                "e.g. Swin or MobileViT). Use a gradient, absLRP or AttnLRP method.")
        return rule.maps


@register("attention_rollout")
class AttentionRollout(_AttentionMethod):
    """Attention rollout (Abnar & Zuidema 2020) for Vision Transformers.

    ``head_fusion``: how the heads of a block are combined (``"mean"``, ``"max"``, ``"min"``).
    Not class-specific (the target is checked, then ignored). Non-negative; one value per
    patch, upsampled bilinearly to (N, H, W).
    """

    def __init__(self, model, head_fusion: str = "mean", prefix_tokens: int = 1,
                 batch_size: int | None = None, channels_last: bool | None = None):
        super().__init__(model, prefix_tokens, batch_size, channels_last)
        if not isinstance(head_fusion, str) or head_fusion not in HEAD_FUSIONS:
            raise InvalidInputError(
                f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
        self.head_fusion = head_fusion

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            rule = AttentionMaps()
            with self._guard(), torch.no_grad(), OpTrace(self.model, x, rule) as trace:
                out = trace.forward()
                self._target_gradient(out, t)  # validates the target
                rollout = None
                for a in self._maps(rule, x.shape[0]):
                    fused = getattr(a, self.head_fusion)(1)
                    fused = fused.values if not isinstance(fused, Tensor) else fused
                    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
                    step = (fused + eye) / 2
                    step = step / step.sum(-1, keepdim=True)
                    rollout = step if rollout is None else step @ rollout
                assert rollout is not None
            return _patch_map(rollout[:, 0], self.prefix_tokens, x)

        return self._batched(inputs, target, one)


class _AttnLRPMaps(AttentionMaps):
    """The AttnLRP rule that also keeps the attention maps (their gradient times themselves is
    their AttnLRP relevance)."""

    kinds = AttnLRPRule.kinds
    unknown = "error"

    def __init__(self) -> None:
        super().__init__()
        self._rule = AttnLRPRule()

    def op_backward(self, call, inputs, output, grad):
        return self._rule.op_backward(call, inputs, output, grad)


RELEVANCES = ("attnlrp", "attention")


@register("transformer_attribution")
class TransformerAttribution(_AttentionMethod):
    """Chefer et al.'s transformer attribution: gradient-weighted attention relevance, rolled
    out over the blocks, for Vision Transformers.

    Per block ``Abar = mean over heads of (dy/dA * R_A)+`` with ``y`` the target logit (a
    callable target: its objective), accumulated as ``R <- R + Abar R`` from ``R = I``.
    ``relevance="attnlrp"`` (default; Chefer, Gur & Wolf, CVPR 2021): ``R_A`` is the
    attention map's LRP relevance, here AttnLRP's (``A * grad_AttnLRP A``; the paper used its
    own LRP rules), so two forward and two backward passes; ``relevance="attention"``
    (their ICCV 2021 follow-up): ``R_A = A``, one pass. Class-specific; non-negative; one
    value per patch, upsampled bilinearly to (N, H, W).
    """

    def __init__(self, model, relevance: str = "attnlrp", prefix_tokens: int = 1,
                 batch_size: int | None = None, channels_last: bool | None = None):
        super().__init__(model, prefix_tokens, batch_size, channels_last)
        if not isinstance(relevance, str) or relevance not in RELEVANCES:
            raise InvalidInputError(
                f"relevance must be one of {RELEVANCES}, got {relevance!r}.")
        self.relevance = relevance

    def _pass(self, x: Tensor, t: Target, rule: AttentionMaps) -> tuple[list, tuple]:
        leaf = x.detach().requires_grad_(True)  # the graph must reach the attention maps
        with self._guard(), torch.enable_grad(), OpTrace(self.model, leaf, rule) as trace:
            out = trace.forward()
            seed, _ = self._target_gradient(out, t)
            maps = self._maps(rule, x.shape[0])
            grads = torch.autograd.grad(out, maps, seed, allow_unused=True)
        return [a.detach() for a in maps], grads

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            maps, grads = self._pass(x, t, AttentionMaps())
            if self.relevance == "attnlrp":
                lrp_maps, lrp_grads = self._pass(x, t, _AttnLRPMaps())
                weights = [None if g is None else a * g
                           for a, g in zip(lrp_maps, lrp_grads, strict=True)]
            else:
                weights = list(maps)
            n, tokens = maps[0].shape[0], maps[0].shape[-1]
            r = torch.eye(tokens, dtype=x.dtype, device=x.device).expand(n, -1, -1)
            for w, g in zip(weights, grads, strict=True):
                if g is None or w is None:
                    continue
                r = r + (g * w).clamp(min=0).mean(1) @ r
            return _patch_map(r[:, 0], self.prefix_tokens, x)

        return self._batched(inputs, target, one)
