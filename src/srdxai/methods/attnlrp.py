"""AttnLRP and CP-LRP for transformers (Achtibat et al., ICML 2024; Ali et al., ICML 2022), as
published in LXT (``lxt`` 2.1, its "efficient" rules), on the operation-level engine.

Both are modified gradients: the backward signal is a gradient whose product with each
tensor is that tensor's relevance, and the map is ``x * grad`` at the input (the target
logit's one-hot seed, so the output relevance is the logit). Per call:

==============================  ===========================================================
call                            backward
==============================  ===========================================================
dense layer, convolution,       the gradient (LXT's epsilon rule with epsilon = 0; the bias
``+``, pooling, views, scaling  absorbs its share)
LayerNorm                       the gradient with the standard deviation constant (the
                                centring keeps its gradient): LXT's ``layer_norm_forward``
elementwise activation (GELU)   identity rule: ``grad * f(x) / x``, so ``R_x = R_y``
matrix product of two           uniform rule: each operand gets half, ``grad / 2`` (AttnLRP);
activations (``q @ k^T``,       CP-LRP: the gradient
``attn @ v``)
product ``a * b`` of two        uniform rule, ``grad / 2`` each (gated MLPs); where one
activations                     factor comes straight from a sigmoid (an LSTM's gates) the
                                signal takes all (the gradient), the gate nothing (Arras et
                                al. 2017): the identity rule through a gate divides by its
                                pre-activation and reached -30 for a logit of 1.2
softmax                         AttnLRP: the gradient (``R_x = x (R - s sum R)``, the
                                paper's Proposition 3.1); CP-LRP: nothing (the attention
                                weights are constants, so relevance reaches only the values)
==============================  ===========================================================

The cross-check against LXT itself is ``tests/test_attnlrp.py`` (rule by rule, and a whole
Hugging Face ViT in a subprocess, because LXT patches library classes process-wide).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from ..engine.catalogue import ACTIVATIONS, GATE_ACTIVATIONS
from ..engine.core import Target, keep_graph
from ..engine.optrace import OpCall, OpRule, constant_statistics
from .base import Method, checked_reduction, register

Tensor = torch.Tensor
REDUCTIONS = ("sum", "none")
#: the identity rule's stabiliser (LXT adds 1e-10; here with the sign of x, so that a
#: pre-activation of -1e-10 does not divide by zero)
IDENTITY_EPS = 1e-10


@constant_statistics
def sigma_detached_layer_norm(x: Tensor, normalized_shape: Sequence[int],
                              weight: Tensor | None = None, bias: Tensor | None = None,
                              eps: float = 1e-5, *,
                              statistics_of: Tensor | None = None) -> Tensor:
    """LayerNorm whose standard deviation is a constant for autograd (LXT's LayerNorm rule);
    ``statistics_of``: as :func:`~srdxai.engine.optrace.detached_layer_norm`."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    source = x.detach() if statistics_of is None else statistics_of
    std = (source.var(dims, keepdim=True, unbiased=False) + eps).sqrt()
    y = centred / std
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class AttnLRPRule(OpRule):
    """LXT's AttnLRP (``cp=False``) or CP-LRP (``cp=True``) rules (see the module docstring)."""

    kinds = frozenset({"layer_norm", "normalize", "activation", "matmul", "mul", "softmax"})

    def __init__(self, cp: bool = False):
        self.cp = cp
        self._gates: dict[int, weakref.ref] = {}  # sigmoid outputs of this forward pass
        self._gated: dict[int, int] = {}  # mul call index -> which factor is the gate

    def on_call(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor) -> Tensor:
        """Note sigmoid outputs, and the products that take one as a factor (a gate)."""
        if call.kind == "activation" and ACTIVATIONS.get(call.original) in GATE_ACTIVATIONS:
            self._gates[id(output)] = weakref.ref(output)
        elif call.kind == "mul" and len(inputs) == 2:
            gates = [self._is_gate(t) for t in inputs]
            if gates.count(True) == 1:
                self._gated[call.index] = gates.index(True)
        return output

    def _is_gate(self, t: Tensor) -> bool:
        ref = self._gates.get(id(t))
        return ref is not None and ref() is t

    def op_backward(self, call: OpCall, inputs: Sequence[Tensor], output: Tensor,
                    grad: Tensor) -> Sequence[Tensor | None]:
        kind = call.kind
        if kind == "mul" and call.index in self._gated:
            grads = list(call.vjp(inputs, grad, func=call.original))
            gate = self._gated[call.index]
            grads[gate] = torch.zeros_like(inputs[gate])  # the signal takes all
            return grads
        if kind == "softmax":  # the true softmax gradient, not absLRP's detached form
            if self.cp:
                return [torch.zeros_like(inputs[0])]
            return call.vjp(inputs, grad, func=call.original)
        if kind == "layer_norm":
            return call.vjp(inputs, grad, func=sigma_detached_layer_norm)
        if kind == "normalize":  # the norm constant, as LayerNorm's standard deviation
            return call.vjp(inputs, grad)
        if kind == "activation":
            x = inputs[0]
            den = torch.where(x >= 0, x + IDENTITY_EPS, x - IDENTITY_EPS)
            return [grad * output / den]
        grads = call.vjp(inputs, grad, func=call.original)
        if len(inputs) == 2 and (kind == "mul" or (kind == "matmul" and not self.cp)):
            return [g / 2 for g in grads]  # the uniform rule
        return grads


class _LXTMethod(Method):
    cp = False
    signed = True
    family = "relevance"

    def __init__(self, model, channel_reduce: str | None = None, batch_size: int | None = None,
                 channels_last: bool | None = None):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        reduce = checked_reduction(channel_reduce, REDUCTIONS, "sum")
        self.channel_reduce = reduce

    def relevance(self, x: Tensor, target: Target) -> Tensor:
        """Input relevance ``(N, C, ...)`` for one chunk."""

        def run(leaf: Tensor) -> Tensor:
            (grad,) = self._traced_gradients(
                leaf, AttnLRPRule(cp=self.cp),
                lambda out: [self._target_gradient(out, target)[0]])
            return keep_graph(grad * leaf).contiguous()

        return self._with_layout(x, run)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            rel = self.relevance(x, t)
            return rel if self.channel_reduce == "none" else rel.sum(1).contiguous()

        return self._batched(inputs, target, one)


@register("attnlrp")
class AttnLRP(_LXTMethod):
    """AttnLRP (Achtibat et al. 2024) with LXT's rules: uniform rule on attention products,
    the softmax rule, identity rule on activations, LayerNorm with constant deviation, the
    gradient (epsilon = 0) elsewhere. Signed; channels summed to (N, H, W)
    (``channel_reduce="none"``: (N, C, H, W)). Any model; designed for transformers."""


@register("cp_lrp")
class CPLRP(_LXTMethod):
    """CP-LRP (Ali et al. 2022) with LXT's rules: attention weights constant (relevance flows
    through the values only), identity rule on activations, LayerNorm with constant deviation,
    the gradient elsewhere. Signed; channels summed to (N, H, W)
    (``channel_reduce="none"``: (N, C, H, W))."""

    cp = True
