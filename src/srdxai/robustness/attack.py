"""The explanation-manipulation attack (Dombrowski et al., NeurIPS 2019).

Find ``x_adv`` near ``x`` whose explanation looks like a *target* map (the explanation of
another image) while the network's output stays what it was:

``L = map_weight * MSE(h(x_adv), h_t) + output_weight * MSE(softmax g(x_adv), softmax g(x))``

minimised with Adam; after each step ``x_adv`` is clamped to the valid input range. ``h`` is the
method's map for ``x``'s class, preprocessed as in the authors' code: ``|map|`` summed over
channels, scaled to sum 1 per sample. The map must be differentiable with respect to the input,
which ``srdxai.engine.differentiable`` provides for every gradient, LRP, SRD, absLRP and CAM
method.

A ReLU network's gradient maps have zero second derivative almost everywhere, so the attack's
gradient through them is uninformative; for those methods (``needs_smooth_activations``) every
``nn.ReLU`` module is replaced, for the attack only, by ``softplus(beta z) / beta`` with
``beta`` growing geometrically from 10 to 100, and the final map is computed with the original
ReLUs (the authors' ``--beta_growth``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engine.core import Target, check_inputs, differentiable, model_guard
from ..errors import InvalidInputError
from ..methods.base import Method, get_method
from ..metrics.similarity import mse, normalise_map, pearson, scaled_abs_map, ssim

Tensor = torch.Tensor

#: the authors' defaults (``run_attack.py``): Adam's learning rate, iterations, loss weights
DEFAULT_LR = 2e-4
DEFAULT_ITERATIONS = 1500
DEFAULT_MAP_WEIGHT = 1e11
DEFAULT_OUTPUT_WEIGHT = 1e6
BETA_RANGE = (10.0, 100.0)


# --- ReLU -> softplus, reversibly ------------------------------------------------------------

class _Softplus(nn.Module):
    """``softplus(beta z) / beta`` with a ``beta`` shared by every replaced ReLU."""

    def __init__(self, schedule: SmoothActivations):
        super().__init__()
        self._schedule = [schedule]  # a list: not registered as a submodule

    def forward(self, z: Tensor) -> Tensor:
        return F.softplus(z, beta=self._schedule[0].beta)

    def extra_repr(self) -> str:
        return f"beta={self._schedule[0].beta:g}"


class _SoftplusReLU6(_Softplus):
    """``(softplus(beta z) - softplus(beta (z - 6))) / beta``: ReLU6 smoothed at both kinks."""

    def forward(self, z: Tensor) -> Tensor:
        beta = self._schedule[0].beta
        return F.softplus(z, beta=beta) - F.softplus(z - 6.0, beta=beta)


#: the modules :class:`SmoothActivations` replaces, and by what
SMOOTHED = {nn.ReLU: _Softplus, nn.ReLU6: _SoftplusReLU6}


class SmoothActivations:
    """Context manager: every ``nn.ReLU`` of ``model`` becomes a softplus of slope ``beta``
    (settable while inside), every ``nn.ReLU6`` the difference of two such softplus (as in
    EfficientNet-Lite); the original modules are put back on exit, also on errors.

    Only these *modules* are replaced (torchvision's and timm's models use them); ``F.relu``
    calls inside a ``forward`` stay ReLUs, and ``replaced`` says how many modules were swapped.
    """

    def __init__(self, model: nn.Module, beta: float = BETA_RANGE[0]):
        self.model = model
        self.beta = float(beta)
        self.replaced = 0
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> SmoothActivations:
        try:
            for parent in self.model.modules():
                for name, child in list(parent.named_children()):
                    smooth = SMOOTHED.get(type(child))
                    if smooth is not None:
                        self._swapped.append((parent, name, child))
                        setattr(parent, name, smooth(self))
        except BaseException:
            self._restore()
            raise
        self.replaced = len(self._swapped)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._swapped:
            parent, name, child = self._swapped.pop()
            setattr(parent, name, child)


def beta_schedule(step: int, iterations: int, beta_range: tuple[float, float] = BETA_RANGE
                  ) -> float:
    """``beta_i = b0 (b1 / b0)^(i / iterations)`` (geometric growth, the authors' rule)."""
    b0, b1 = beta_range
    return b0 * (b1 / b0) ** (step / max(iterations, 1))


# --- maps as the attack sees them ----------------------------------------------------------

def _attack_method(model: nn.Module, method: str | Method, options: dict[str, Any]) -> Method:
    if isinstance(method, Method):
        if options:
            raise InvalidInputError("give options to the Method you pass, not to the attack.")
        return method
    cls = get_method(method)
    if "channel_reduce" not in options and _accepts(cls, "channel_reduce"):
        options = {**options, "channel_reduce": "none"}  # |.| is summed over channels below
    return cls(model, **options)


def _accepts(cls: type, name: str) -> bool:
    import inspect

    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and name in inspect.signature(init).parameters:
            return True
    return False


def unit_map(m: Tensor) -> Tensor:
    """``|m|`` summed over channels (4-D maps), scaled to sum 1 per sample; differentiable,
    an all-zero map stays zero."""
    return scaled_abs_map(m, "sum_abs")


# --- the attack ------------------------------------------------------------------------------

@dataclass
class AttackResult:
    """Everything one attack produced, per sample.

    ``adversarial``: the manipulated inputs; ``original_map``, ``target_map``,
    ``adversarial_map``: unit-sum maps (N, H, W), the last computed with the model's original
    activations; ``scores``: per-sample float64 tensors (see :data:`SCORES`); ``losses``: the
    total loss per iteration (summed over samples); ``beta``: the final softplus slope (None
    without smoothing); ``replaced``: ReLU modules smoothed.
    """

    adversarial: Tensor
    original_map: Tensor
    target_map: Tensor
    adversarial_map: Tensor
    scores: dict[str, Tensor]
    losses: list[float] = field(default_factory=list)
    beta: float | None = None
    replaced: int = 0


#: what ``AttackResult.scores`` holds
SCORES = ("ssim_to_target", "pcc_to_target", "mse_to_target", "ssim_to_original",
          "pcc_to_original", "mse_to_original", "output_mse", "prediction_kept",
          "target_probability_change", "linf", "psnr")


def manipulate(
    model: nn.Module,
    x: Tensor,
    method: str | Method,
    *,
    target_image: Tensor | None = None,
    target_map: Tensor | None = None,
    target: Target = None,
    iterations: int = DEFAULT_ITERATIONS,
    lr: float = DEFAULT_LR,
    map_weight: float = DEFAULT_MAP_WEIGHT,
    output_weight: float = DEFAULT_OUTPUT_WEIGHT,
    bounds: tuple[float | Sequence[float] | Tensor, float | Sequence[float] | Tensor] | None = None,
    smooth: bool | None = None,
    beta_range: tuple[float, float] = BETA_RANGE,
    progress: bool = False,
    **options: Any,
) -> AttackResult:
    """Manipulate ``x`` so that ``method``'s map looks like the target (see the module
    docstring).

    Args:
        model: the classifier (restored afterwards: activations, hooks, flags).
        x: inputs (N, C, H, W) in the model's input space.
        method: a registered method name (``options`` go to it) or a :class:`Method`.
        target_image: images (N or 1, C, H, W) whose maps, each for its own predicted class,
            are the targets; or ``target_map``: target maps (N, H, W) or (N, C, H, W).
        target: the class whose map is manipulated (default: ``x``'s predicted class).
        iterations, lr: Adam's steps and learning rate (the authors': 1500, 2e-4).
        map_weight, output_weight: the loss weights (the authors': 1e11, 1e6).
        bounds: ``(low, high)``, numbers or one value per channel: ``x_adv`` is clamped to
            them after every step (the normalised image of [0, 1] pixels in the authors'
            code); None: no clamping.
        smooth: replace ReLUs by a growing softplus during the attack; None: the method's
            ``needs_smooth_activations``.
        beta_range: the softplus slope's start and end.
        progress: a progress bar over the iterations.

    Returns:
        :class:`AttackResult`.
    """
    x = check_inputs(x, model).detach()
    if x.dim() != 4:
        raise InvalidInputError(f"the attack needs images (N, C, H, W); got {tuple(x.shape)}.")
    if (target_image is None) == (target_map is None):
        raise InvalidInputError("give exactly one of target_image and target_map.")
    if not isinstance(iterations, int) or iterations < 0:
        raise InvalidInputError(f"iterations must be an int >= 0, got {iterations!r}.")
    if not lr > 0:
        raise InvalidInputError(f"lr must be > 0, got {lr}.")
    explainer = _attack_method(model, method, options)
    if smooth is None:
        smooth = bool(explainer.needs_smooth_activations)
    low, high = _bounds(bounds, x)
    with model_guard(model):  # eval mode, frozen parameters; restored on exit
        return _attack(model, explainer, x, target_image, target_map, target, iterations, lr,
                       map_weight, output_weight, low, high, smooth, beta_range, progress)


def _attack(model: nn.Module, explainer: Method, x: Tensor, target_image: Tensor | None,
            target_map: Tensor | None, target: Target, iterations: int, lr: float,
            map_weight: float, output_weight: float, low: Tensor, high: Tensor, smooth: bool,
            beta_range: tuple[float, float], progress: bool) -> AttackResult:
    n = x.shape[0]
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    classes = _classes(target, probs)
    original_map = unit_map(explainer.attribute(x, classes)).detach()
    if target_map is None:
        assert target_image is not None
        t_img = check_inputs(target_image, model).detach()
        if t_img.shape[0] == 1 and n > 1:
            t_img = t_img.expand(n, *t_img.shape[1:])
        if t_img.shape != x.shape:
            raise InvalidInputError(f"target_image has shape {tuple(t_img.shape)}; the inputs "
                                    f"have {tuple(x.shape)}.")
        target_map = unit_map(explainer.attribute(t_img, None)).detach()
    else:
        target_map = unit_map(torch.as_tensor(target_map).to(x)).detach()
    if target_map.shape != original_map.shape:
        raise InvalidInputError(f"the target map has shape {tuple(target_map.shape)} but the "
                                f"method's maps have {tuple(original_map.shape)}.")

    x_adv = x.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x_adv], lr=lr)
    losses: list[float] = []
    beta = None
    smoother = SmoothActivations(model) if smooth else contextlib.nullcontext()
    with smoother as swap:
        for step in tqdm(range(iterations), desc=f"attack {explainer.name}",
                         disable=not progress, unit="step"):
            if swap is not None:
                beta = swap.beta = beta_schedule(step, iterations, beta_range)
            optimiser.zero_grad(set_to_none=True)
            with differentiable():
                h = unit_map(explainer.attribute(x_adv, classes))
            out = torch.softmax(model(x_adv), 1)
            per_sample = (map_weight * (h - target_map).square().flatten(1).mean(1)
                          + output_weight * (out - probs).square().mean(1))
            loss = per_sample.sum()
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(
                    f"the attack's loss became {float(loss.detach())} at step {step}; lower "
                    "lr or the loss weights.")
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                x_adv.copy_(torch.maximum(torch.minimum(x_adv, high), low))
            losses.append(float(loss.detach()))
            del h, out, loss, per_sample
    adversarial = x_adv.detach()
    # the final map with the model's own activations
    adversarial_map = unit_map(explainer.attribute(adversarial, classes)).detach()
    with torch.no_grad():
        adv_probs = torch.softmax(model(adversarial), 1)
    scores = _scores(x, adversarial, original_map, target_map, adversarial_map, probs,
                     adv_probs, classes)
    return AttackResult(adversarial, original_map, target_map, adversarial_map, scores, losses,
                        beta, swap.replaced if swap is not None else 0)


def _classes(target: Target, probs: Tensor) -> Tensor:
    n, k = probs.shape
    if target is None:
        return probs.argmax(1)
    classes = torch.as_tensor(target, device=probs.device).long().flatten()
    if classes.numel() == 1:
        classes = classes.expand(n).clone()
    if classes.numel() != n or (classes < 0).any() or (classes >= k).any():
        raise InvalidInputError(f"target must be one class in 0..{k - 1} or one per sample "
                                f"({n}); got {target!r}.")
    return classes


def _bounds(bounds: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    if bounds is None:
        inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
        return -inf, inf
    if not isinstance(bounds, tuple | list) or len(bounds) != 2:
        raise InvalidInputError("bounds must be (low, high).")

    def one(v: Any) -> Tensor:
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if t.dim() == 1:
            if t.numel() != x.shape[1]:
                raise InvalidInputError(f"bounds give {t.numel()} values; the inputs have "
                                        f"{x.shape[1]} channels.")
            t = t.reshape(1, -1, 1, 1)
        return t

    low, high = one(bounds[0]), one(bounds[1])
    if bool((low > high).any()):
        raise InvalidInputError("bounds: low must not exceed high.")
    return low, high


def _scores(x: Tensor, adversarial: Tensor, original_map: Tensor, target_map: Tensor,
            adversarial_map: Tensor, probs: Tensor, adv_probs: Tensor, classes: Tensor
            ) -> dict[str, Tensor]:
    """Similarity to the target and to the original map; output and image change."""
    adv, tgt, org = (normalise_map(m) for m in (adversarial_map, target_map, original_map))
    rows = torch.arange(x.shape[0], device=x.device)
    diff = (adversarial - x).double().flatten(1)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).double()
    mse_image = diff.square().mean(1)
    psnr = torch.where(mse_image > 0, 10 * torch.log10(span.square() / mse_image),
                       torch.full_like(mse_image, math.inf))
    return {
        "ssim_to_target": ssim(adv, tgt),
        "pcc_to_target": pearson(adv, tgt),
        "mse_to_target": mse(adv, tgt),
        "ssim_to_original": ssim(adv, org),
        "pcc_to_original": pearson(adv, org),
        "mse_to_original": mse(adv, org),
        "output_mse": (adv_probs - probs).double().square().mean(1),
        "prediction_kept": (adv_probs.argmax(1) == probs.argmax(1)).double(),
        "target_probability_change": (adv_probs[rows, classes] - probs[rows, classes]).double(),
        "linf": diff.abs().amax(1),
        "psnr": psnr,
    }


__all__ = ["AttackResult", "SCORES", "SmoothActivations", "beta_schedule", "manipulate",
           "unit_map"]
