"""Gradient methods as one modified chain rule (Ancona et al., ICLR 2018).

Backpropagate through linear layers as usual and replace, at every elementwise activation
``v = f(z)``, the derivative ``f'(z)`` by a method-specific slope ``g``:

==================  =======================================  ==================
method              slope at an activation                   times
==================  =======================================  ==================
saliency            ``f'(z)``                                 (|.|)
gradient_x_input    ``f'(z)``                                 ``x``
integrated_grad.    ``f'(z)`` averaged on the path            ``x - x_bar``
epsilon_lrp         ``f(z) / (z + eps*sign(z))``              ``x``
deeplift_rescale    ``(f(z) - f(z_bar)) / (z - z_bar)``       ``x - x_bar``
smoothgrad          ``f'(z)`` averaged over noisy copies      (gradient)
guided_backprop     ``f'(z)`` applied to ``max(grad, 0)``      (gradient)
==================  =======================================  ==================

Each method is a rule (the slope) plus what multiplies the modified gradient; the engine
supplies targets, batching, layouts and restoration.

Maps are ``(N, H, W)``: channels summed (``channel_reduce="sum"``), except saliency, whose
default is the maximum of ``|gradient|`` over channels (Simonyan et al.).
``channel_reduce="none"`` returns ``(N, C, H, W)``.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Callable

import numpy as np
import torch

from ..engine.catalogue import check_output
from ..engine.core import (
    PlainGradientRule,
    Rule,
    Target,
    Trace,
    check_finite_output,
    keep_graph,
    map_target,
    non_finite_output_error,
    true_activation_gradient,
)
from ..engine.memory import budget_chunk, element_chunk, run_in_chunks
from ..errors import InvalidInputError, NonFiniteError, UnsupportedOperationError
from . import options
from .base import Method, checked_reduction, register

Tensor = torch.Tensor
Slope = Callable[[Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor]

REDUCTIONS = ("sum", "max", "none")


class SlopeRule(Rule):
    """An activation's backward is ``slope(z, grad, f)`` (the modified chain rule).

    ``gate_products``: a product of a sigmoid gate and a signal (an LSTM's gates,
    squeeze-excitation) passes the gradient to the signal only, the gate a constant weight
    (docs/methods.md, epsilon-LRP)."""

    def __init__(self, slope: Slope, gate_products: bool = False):
        self.slope = slope
        self.gate_products = gate_products

    def activation_backward(self, node, z, v, grad, fn):
        return self.slope(z, grad, fn)


def gradient_slope(z: Tensor, grad: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return true_activation_gradient(z, grad, fn)


def epsilon_slope(epsilon: float) -> Slope:
    """epsilon-LRP: ``f(z) / (z + eps*sign(z))``, with sign(0) = +1 (DeepExplain's choice)."""

    def slope(z, grad, fn):
        stabilised = z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        return grad * fn(z) / stabilised

    return slope


def guided_slope(z: Tensor, grad: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Guided backprop: only positive gradients pass, through the true derivative."""
    return true_activation_gradient(z, grad.clamp_min(0), fn)


class RescaleRule(Rule):
    """DeepLIFT-Rescale: at each activation the slope ``(f(z) - f(z_bar)) / (z - z_bar)``,
    ``z_bar`` the same activation's pre-activation in the baseline's forward pass.

    The two passes are paired activation by activation in forward order (:meth:`match`), not
    by batch row, so models that fold other dimensions into the batch (MobileViT's and
    Swin's patch unfolding) are explained too. Where the pre-activation barely moves
    (``|z - z_bar| < threshold``) the true gradient is used, as Captum does.
    """

    def __init__(self, references: list[Tensor], threshold: float = 1e-10):
        self.references = references
        self.threshold = threshold
        self.order: dict[int, int] = {}  # graph node index -> position in forward order

    def match(self, layers: list) -> None:
        """Pair the input pass's activations (``Trace.pfv_layers[1:]``) with the baseline's."""
        shapes = [tuple(n.shape) for n in layers]
        expected = [tuple(r.shape) for r in self.references]
        if shapes != expected:
            raise UnsupportedOperationError(
                "DeepLIFT pairs the activations of the input's and the baseline's forward "
                f"passes in order, but they differ ({len(shapes)} activations against "
                f"{len(expected)}, or other shapes): the model's control flow depends on its "
                "input. Use integrated gradients.")
        self.order = {n.index: k for k, n in enumerate(layers)}

    def activation_backward(self, node, z, v, grad, fn):
        z_ref = self.references[self.order[node.index]]
        delta_in = z - z_ref
        delta_out = fn(z) - fn(z_ref)
        small = delta_in.abs() < self.threshold
        ratio = delta_out / torch.where(small, torch.ones_like(delta_in), delta_in)
        return torch.where(small, true_activation_gradient(z, grad, fn), grad * ratio)


class ChainRuleMethod(Method):
    """Shared machinery: the modified input gradient under a slope, and channel reduction."""

    family = "chain rule"

    default_reduce = "sum"
    needs_smooth_activations = True  # slopes of a ReLU network are piecewise constant

    def __init__(self, model, batch_size=None, channels_last=None, channel_reduce=None):
        super().__init__(model, batch_size=batch_size, channels_last=channels_last)
        reduce = checked_reduction(channel_reduce, REDUCTIONS, self.default_reduce)
        self.channel_reduce = reduce

    def _reduce(self, attribution: Tensor) -> Tensor:
        if self.channel_reduce == "none":
            return attribution.contiguous()
        if self.channel_reduce == "max":
            return attribution.amax(1).contiguous()
        return attribution.sum(1).contiguous()

    def _modified_gradient(self, x: Tensor, target: Target, slope: Slope,
                           gate_products: bool = False) -> Tensor:
        """``d target / d x`` with every activation's derivative replaced by ``slope``
        (and gated products passing the gradient to their signal only, if
        ``gate_products``)."""

        rule = (PlainGradientRule() if slope is gradient_slope and not gate_products
                else SlopeRule(slope, gate_products))

        def run(leaf: Tensor) -> Tensor:
            with self._guard(), torch.enable_grad(), Trace(self.model, leaf, rule) as trace:
                out = trace.forward()
                grad_out, _ = self._target_gradient(out, target)
                (gx,) = self._grad(out, leaf, grad_out)
                del out
            return keep_graph(gx).contiguous()

        return self._with_layout(x, run)


def baseline_tensor(baseline: Tensor | float | None, x: Tensor) -> Tensor:
    """The baseline broadcast to ``x``: None (zeros), a number, or a broadcastable tensor;
    it must be finite (a NaN baseline made every map NaN without a word)."""
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, int | float) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise InvalidInputError(f"baseline must be finite, got {baseline}.")
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, Tensor):
        raise InvalidInputError(f"baseline must be None, a number or a tensor, got "
                                f"{type(baseline).__name__}.")
    baseline = baseline.to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(baseline).all()):
        raise InvalidInputError("the baseline holds NaN or Inf; give a finite one.")
    try:
        return torch.broadcast_to(baseline, x.shape)
    except RuntimeError:
        raise InvalidInputError(f"baseline of shape {tuple(baseline.shape)} does not broadcast "
                                f"to the inputs {tuple(x.shape)}.") from None


@register("saliency")
class Saliency(ChainRuleMethod):
    """Simonyan et al.: ``|d S_c / d x|``, max over channels by default. Unsigned."""

    signed = False
    default_reduce = "max"

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self._batched(inputs, target, lambda x, t: self._reduce(
            self._modified_gradient(x, t, gradient_slope).abs()))


@register("gradient_x_input")
class GradientXInput(ChainRuleMethod):
    """``x * d S_c / d x``, summed over channels. Signed."""

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self._batched(inputs, target, lambda x, t: self._reduce(
            x * self._modified_gradient(x, t, gradient_slope)))


@register("epsilon_lrp")
class EpsilonLRP(ChainRuleMethod):
    """epsilon-LRP as a modified chain rule: slope ``f(z)/(z + eps sign z)``, times ``x``.

    Signed, channels summed. For a CNN-specific LRP with layer rules (z+, gamma, alpha-beta)
    see the LRP composites.
    """

    def __init__(self, model, epsilon: float = 1e-4, **kw):
        super().__init__(model, **kw)
        self.epsilon = options.real(epsilon, "epsilon", 0, above=True)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        # Gates are constant weights (Arras et al. 2017, LRP for LSTMs: the signal takes all
        # the relevance of a gated product). With the full product rule a sigmoid gate's
        # slope sigma(z)/z grows without bound near z = 0 (0.5/z): through an LSTM's steps
        # the maps reached 1e6 for logits of 0.1. DeepExplain, Ancona et al.'s code, has no
        # rule for products and says not to use it on LSTMs. ReLU networks have no gates, so
        # epsilon-LRP = gradient x input still holds there.
        return self._batched(inputs, target, lambda x, t: self._reduce(
            x * self._modified_gradient(x, t, epsilon_slope(self.epsilon),
                                        gate_products=True)))


@register("guided_backprop")
class GuidedBackprop(ChainRuleMethod):
    """Springenberg et al.: only positive gradients pass each activation. Signed gradient,
    channels summed."""

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        return self._batched(inputs, target, lambda x, t: self._reduce(
            self._modified_gradient(x, t, guided_slope)))


@register("deeplift_rescale")
class DeepLiftRescale(ChainRuleMethod):
    """DeepLIFT with the Rescale rule: finite-difference slopes against a baseline, times
    ``x - baseline``. Signed, channels summed.

    The baseline runs in a forward pass of its own and each activation's slope uses the
    same activation of that pass (paired in forward order; Captum runs input and baseline as
    one batch of 2N, which needs a model that keeps samples in their batch rows). Max-pooling
    keeps its ordinary gradient (Ancona's chain-rule formulation; Captum applies a rescale
    rule to max-pool too).
    """

    def __init__(self, model, baseline: Tensor | float | None = None, **kw):
        super().__init__(model, **kw)
        self.baseline = baseline

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            base = baseline_tensor(self.baseline, x)
            if base.shape[0] != x.shape[0]:
                base = base.expand_as(x)
            return self._reduce((x - base) * self._rescaled_gradient(x, base, t))

        return self._batched(inputs, target, one)

    def _rescaled_gradient(self, x: Tensor, base: Tensor, target: Target) -> Tensor:
        def run(leaf: Tensor) -> Tensor:
            reference = torch.empty_like(leaf).copy_(base.detach())  # in the leaf's layout
            with self._guard(), torch.no_grad(), Trace(self.model, reference, Rule()) as trace:
                trace.forward()
                references = [n.pre.detach() for n in trace.pfv_layers[1:]]
            rule = RescaleRule(references)
            with self._guard(), torch.enable_grad(), Trace(self.model, leaf, rule) as trace:
                out = trace.forward()
                rule.match(trace.pfv_layers[1:])
                grad_out, _ = self._target_gradient(out, target)
                (gx,) = self._grad(out, leaf, grad_out)
                del out
            rule.references = []
            return keep_graph(gx).contiguous()

        return self._with_layout(x, run)


def _resolve_predicted(method: Method, x: Tensor, target: Target) -> Target:
    """Replace ``None`` by the predicted classes of ``x`` (one no-grad forward pass)."""
    if target is not None:
        return target
    with torch.no_grad(), method._guard():
        out = check_output(method.model(x.clone()))  # a copy: the model may edit its input
    check_finite_output(out)  # the arg-max of NaN is no prediction
    return out.argmax(1)


# --- path and noise integrals ---------------------------------------------------------------

def riemann_alphas(steps: int, method: str) -> tuple[Tensor, Tensor]:
    """Points ``alpha_k`` in [0, 1] and weights ``w_k`` approximating the integral over
    [0, 1]: Riemann (left, right, middle, trapezoid) or Gauss-Legendre (Captum's default)."""
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise InvalidInputError(f"steps must be an int >= 1, got {steps!r}.")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)
    if method == "riemann_trapezoid":
        if steps < 2:
            raise InvalidInputError("the trapezoid rule needs steps >= 2.")
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return alphas, weights
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if method not in offsets:
        raise InvalidInputError(
            f"unknown integration method '{method}'; choose gausslegendre, riemann_left, "
            "riemann_right, riemann_middle or riemann_trapezoid.")
    alphas = (torch.arange(steps, dtype=torch.float64) + offsets[method]) / steps
    return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


class _SampledGradients(ChainRuleMethod):
    """Gradients at many points per sample (path steps, noisy copies), batched in chunks of
    ``internal_batch_size`` points, weighted and summed per sample."""

    def __init__(self, model, internal_batch_size: int | None = None, **kw):
        super().__init__(model, **kw)
        self.internal_batch_size = options.integer(internal_batch_size, "internal_batch_size",
                                                   optional=True)

    def _weighted_gradient_sum(self, points: Tensor, weights: Tensor, target: Target,
                               n: int, absolute: bool = False) -> Tensor:
        """``sum_k w_k grad(points[k])`` for points laid out (K*N, ...) step-major
        (``|grad(points[k])|`` with ``absolute``).

        Chunks of ``internal_batch_size`` points (default: the device's element budget, 13
        points of 3x224x224 on a CPU), capped by a
        :func:`~srdxai.engine.memory.memory_budget`; a chunk that runs out of memory is
        split (``engine/memory.py``)."""
        total = torch.zeros_like(points[:n])
        chunk = budget_chunk(self.model, points,
                             self.internal_batch_size or element_chunk(points, backward=True),
                             backward=True)

        def run(start: int, stop: int) -> None:
            rows = torch.arange(start, stop, device=points.device)
            t = _target_rows(target, rows, n)
            try:
                grad = self._modified_gradient(points[start:stop], t, gradient_slope)
            except NonFiniteError as error:
                rows_hit = getattr(error, "samples", None)
                if rows_hit is None:
                    raise
                samples = sorted({(start + r) % n for r in rows_hit})
                raise non_finite_output_error(
                    samples, f" (at some of the {self.name} points around them)") from None
            w = weights.to(points.device, points.dtype)[rows // n]
            grad = grad.abs() if absolute else grad
            total.index_add_(0, rows % n, grad * w.view(-1, *([1] * (grad.dim() - 1))))

        run_in_chunks(points.shape[0], chunk, run, self.name)
        return total


def _target_rows(target: Target, rows: Tensor, n: int) -> Target:
    """Targets for the points ``rows`` (point ``r`` belongs to sample ``r % n``)."""
    return map_target(target, lambda t: t.to(rows.device)[rows % n])


@register("integrated_gradients")
class IntegratedGradients(_SampledGradients):
    """Sundararajan et al.: ``(x - x_bar) * integral_0^1 grad(x_bar + a (x - x_bar)) da``.

    Signed, channels summed. ``steps`` points per sample, ``method`` the quadrature
    (``gausslegendre`` as Captum, or ``riemann_right`` as DeepExplain, ...); the points of all
    samples run in chunks of ``internal_batch_size`` (default: about 2 Mi input values per
    pass on a CPU, 13 points of 3x224x224). Completeness:
    ``sum(map) -> f(x) - f(x_bar)`` as ``steps`` grows.
    """

    def __init__(self, model, steps: int = 50, baseline: Tensor | float | None = None,
                 integration: str = "gausslegendre", **kw):
        super().__init__(model, **kw)
        self.alphas, self.weights = riemann_alphas(
            steps, integration if isinstance(integration, str) else repr(integration))
        self.baseline = baseline

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            n = x.shape[0]
            base = baseline_tensor(self.baseline, x)
            alphas = self.alphas.to(x.device, x.dtype).view(-1, 1, *([1] * (x.dim() - 1)))
            points = (base.unsqueeze(0) + alphas * (x - base).unsqueeze(0)).reshape(
                -1, *x.shape[1:])
            t = _resolve_predicted(self, x, t)
            avg = self._weighted_gradient_sum(points, self.weights, t, n)
            return self._reduce((x - base) * avg)

        return self._batched(inputs, target, one)


@register("smoothgrad")
class SmoothGrad(_SampledGradients):
    """Smilkov et al.: the gradient averaged over ``samples`` noisy copies
    ``x + N(0, sigma^2)``, ``sigma = noise_level * (max(x) - min(x))`` per sample (or an
    absolute ``stdev``). Signed, channels summed. ``seed`` makes the noise reproducible and
    independent of batching (each sample's noise is drawn from ``seed`` and the sample
    itself; ``seed=None`` draws fresh noise); ``noise`` (samples, N, C, ...) supplies it.

    ``absolute=True`` averages ``|gradient|`` instead (per input value, then channels summed):
    Captum's ``NoiseTunnel(Saliency)``, whose ``Saliency`` takes the absolute value by
    default; with ``samples=5, stdev=1.0`` (Captum 0.6's defaults) it is the SmoothGrad the
    SRD paper most likely ran (reference/SRD.md section 8). The map is then unsigned.
    """

    def __init__(self, model, samples: int = 25, noise_level: float = 0.15,
                 stdev: float | None = None, seed: int | None = 0,
                 noise: Tensor | None = None, multiply_by_input: bool = False,
                 absolute: bool = False, **kw):
        super().__init__(model, **kw)
        self.absolute = options.flag(absolute, "absolute")
        samples = options.integer(samples, "samples")
        stdev = options.real(stdev, "stdev", 0, optional=True)
        # noise_level is unused (and may be None) when an absolute stdev is given
        noise_level = options.real(noise_level, "noise_level", 0, optional=stdev is not None)
        if noise is not None and not isinstance(noise, Tensor):
            raise InvalidInputError(
                f"noise must be a tensor (samples, N, C, H, W) or None, got "
                f"{type(noise).__name__}.")
        if noise is not None and not bool(torch.isfinite(noise).all()):
            raise InvalidInputError("noise contains NaN or Inf.")
        self.samples, self.noise_level, self.stdev = samples, noise_level, stdev
        self.seed = options.integer(seed, "seed", minimum=0, optional=True)
        self.noise = noise
        self.multiply_by_input = options.flag(multiply_by_input, "multiply_by_input")

    def _draw(self, x: Tensor) -> Tensor:
        if self.noise is not None:
            noise = self.noise.to(x.device, x.dtype)
            if noise.shape != (self.samples, *x.shape):
                raise InvalidInputError(
                    f"noise must have shape {(self.samples, *x.shape)}, got "
                    f"{tuple(noise.shape)} (use batch_size=None with explicit noise).")
            return noise
        if self.stdev is not None:
            sigma = torch.full((x.shape[0],), float(self.stdev), dtype=x.dtype, device=x.device)
        else:
            flat = x.flatten(1)
            sigma = self.noise_level * (flat.amax(1) - flat.amin(1))
        # One generator per sample, seeded from ``seed`` and the sample's own bytes: the noise
        # a sample gets does not depend on which batch or chunk it is explained in.
        draws = []
        for row in x:
            gen = torch.Generator(device=x.device)
            if self.seed is None:
                gen.seed()
            else:
                digest = zlib.crc32(row.detach().cpu().numpy().tobytes())
                gen.manual_seed((self.seed * 1_000_003 + digest) % (2**63))
            draws.append(torch.randn((self.samples, *x.shape[1:]), generator=gen,
                                     dtype=x.dtype, device=x.device))
        noise = torch.stack(draws, 1)
        return noise * sigma.view(1, -1, *([1] * (x.dim() - 1)))

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        def one(x: Tensor, t: Target) -> Tensor:
            n = x.shape[0]
            points = (x.unsqueeze(0) + self._draw(x)).reshape(-1, *x.shape[1:])
            t = _resolve_predicted(self, x, t)
            weights = torch.full((self.samples,), 1.0 / self.samples, dtype=torch.float64)
            avg = self._weighted_gradient_sum(points, weights, t, n, self.absolute)
            return self._reduce(x * avg if self.multiply_by_input else avg)

        return self._batched(inputs, target, one)


__all__ = [
    "SlopeRule", "Saliency", "GradientXInput", "IntegratedGradients", "EpsilonLRP",
    "DeepLiftRescale", "SmoothGrad", "GuidedBackprop", "riemann_alphas",
]
