"""Stability metrics: relative stability (RIS, ROS, RRS), continuity and consistency.

The relative stability metrics (Agarwal et al., 2022) and continuity (Montavon et al., 2018)
re-run the explanation method on perturbed copies of every input: noisy copies for the first,
translated copies for the second. The copies are explained in chunks of ``batch_size`` images,
one ``explain`` call per chunk with samples and perturbations mixed, never one call per draw.
Consistency (Dasgupta et al., 2022) compares the discretised explanations of the samples of
the batch with each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Unpack

import torch
from torch import nn

from ..errors import InvalidInputError, InvalidTargetError
from .common import (
    Baseline,
    Explain,
    MetricInputs,
    Normalise,
    adaptive_chunks,
    baseline_values,
    check_attributions,
    check_explain,
    check_finite_logits,
    check_finite_number,
    check_inputs,
    check_model,
    check_positive_int,
    check_targets,
    concat_in_chunks,
    default_batch_size,
    explain_checked,
    guarded,
    predicted_classes,
    preprocess_attributions,
    to_tensor,
)
from .registry import register_metric
from .robustness import noise_draws, uniform_bounds
from .sampling import Sampling, SamplingOptions, sampling_of

Tensor = torch.Tensor
ChangedPrediction = Literal["skip", "nan", "keep"]
Layer = str | nn.Module
Discretise = Literal["top_n_sign", "first_n_sign"] | Callable[[Tensor], Tensor]

__all__ = [
    "relative_input_stability",
    "relative_output_stability",
    "relative_representation_stability",
    "continuity",
    "consistency",
    "continuity_shifts",
    "discretise_top_n_sign",
    "discretise_first_n_sign",
]

_MODES = ("skip", "nan", "keep")


# --- shared pieces --------------------------------------------------------------------------

def _check_mode(mode: object) -> ChangedPrediction:
    if mode not in _MODES:
        raise InvalidInputError(
            f"changed_prediction must be 'skip' (leave out perturbations that change the "
            f"predicted class), 'nan' (score the sample NaN) or 'keep'; got {mode!r}.")
    return mode  # type: ignore[return-value]


def _largest(values: Tensor, valid: Tensor, changed: Tensor | None,
             mode: ChangedPrediction) -> Tensor:
    """The maximum over the last axis of ``values`` where ``valid``, per row.

    ``changed`` marks perturbations that changed the predicted class: ``"skip"`` leaves them
    out, ``"nan"`` makes the row NaN if any did, ``"keep"`` ignores the flag. A row without a
    value left is NaN."""
    use = valid if changed is None or mode != "skip" else valid & ~changed
    filled = torch.where(use, values, torch.full_like(values, -math.inf))
    best = filled.max(-1).values
    best = torch.where(use.any(-1), best, torch.full_like(best, math.nan))
    if changed is not None and mode == "nan":
        best = best.masked_fill(changed.any(-1), math.nan)
    return best


class _Capture:
    """Run the model and keep the outputs (or inputs) of chosen modules, flattened per sample,
    in float64, in the order the modules ran. Hooks exist only during the call, and are
    removed also when the forward pass raises."""

    def __init__(self, model: nn.Module, spec: list[tuple[nn.Module, str, bool]]):
        self.model = model
        self.spec = spec  # (module, "input" | "output", required)
        self.names = {id(m): name for name, m in model.named_modules()}

    def __call__(self, inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.spec:
            return self.model(inputs), None
        captured: list[Tensor] = []
        batch = inputs.shape[0]

        def hook_for(module: nn.Module, where: str, required: bool):
            def hook(_module: nn.Module, args: tuple, output: Any) -> None:
                value = (args[0] if args else None) if where == "input" else output
                name = self.names.get(id(module), type(module).__name__) or "<model>"
                if not isinstance(value, Tensor):
                    if required:
                        raise InvalidInputError(
                            f"the {where} of layer {name!r} is a {type(value).__name__}, not a "
                            "tensor; choose a layer whose output is one tensor.")
                    return
                if value.dim() == 0 or value.shape[0] != batch:
                    raise InvalidInputError(
                        f"the {where} of layer {name!r} has shape {tuple(value.shape)}, which "
                        f"does not start with the batch dimension ({batch}); choose a layer "
                        "whose output is (N, ...) with layer=.")
                # a copy: a later in-place operation (ReLU(inplace=True)) must not change it
                captured.append(value.detach().reshape(batch, -1).to(torch.float64, copy=True))
            return hook

        handles = []
        try:
            for module, where, required in self.spec:
                handles.append(module.register_forward_hook(hook_for(module, where, required)))
            out = self.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise InvalidInputError("none of the chosen layers ran in the forward pass (or none "
                                    "returned a tensor); choose another layer=.")
        return out, torch.cat(captured, 1)


def _layers(model: nn.Module, layer: Any) -> list[tuple[nn.Module, str, bool]]:
    """Resolve RRS's ``layer`` option into hook specifications (see its docstring)."""
    if layer is None:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise InvalidInputError(
                "relative_representation_stability: the model has no nn.Linear head whose "
                "input could serve as the representation; name a layer with layer= (e.g. "
                f"one of {[n for n, _ in model.named_modules() if n][:8]}).")
        return [(heads[-1], "input", True)]
    if isinstance(layer, str) and layer == "all":
        modules = [m for _, m in model.named_modules()
                   if not isinstance(m, type(model) | nn.Sequential)]
        if not modules:
            raise InvalidInputError("layer='all': the model has no submodule to take outputs "
                                    "from; name a layer.")
        return [(m, "output", False) for m in modules]
    chosen = list(layer) if isinstance(layer, list | tuple) else [layer]
    if not chosen:
        raise InvalidInputError("layer= names no layer.")
    spec = []
    members = {id(m) for m in model.modules()}
    for item in chosen:
        if isinstance(item, str):
            try:
                module = model.get_submodule(item)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n]
                raise InvalidInputError(
                    f"the model has no layer {item!r}; its layers include "
                    f"{names[:12]}{' ...' if len(names) > 12 else ''}.") from None
        elif isinstance(item, nn.Module):
            if id(item) not in members:
                raise InvalidInputError("layer= got a module that is not part of the model.")
            module = item
        else:
            raise InvalidInputError(
                f"layer must be None, 'all', a layer name, a module or a list of them; got "
                f"{type(item).__name__}.")
        spec.append((module, "output", True))
    return spec


def _relative_change(before: Tensor, after: Tensor, eps: float) -> Tensor:
    """(before - after) / before elementwise, with ``eps`` in place of a zero ``before``
    (Quantus' guard; the definition leaves it open)."""
    return (before - after) / torch.where(before == 0, torch.full_like(before, eps), before)


# --- relative stability ---------------------------------------------------------------------

def _relative_stability(model, x, y, attributions, explain, *, metric: str,
                        against: Literal["input", "output", "representation"], nr_samples: int,
                        lower_bound: float, upper_bound: float | None, eps_min: float, p: float,
                        normalise: Normalise, abs: bool, changed_prediction: ChangedPrediction,
                        layer: Any, sampling: Sampling) -> Tensor:
    model = check_model(model)
    explain = check_explain(explain, metric)
    mode = _check_mode(changed_prediction)
    eps = check_finite_number(eps_min, "eps_min", positive=True)
    order = _check_p(p)
    low, high = uniform_bounds(lower_bound, upper_bound)
    with guarded(model):
        x = check_inputs(x, model)
        n = x.shape[0]
        size = default_batch_size(x, sampling.batch_size, explain=True, model=model)
        forward = _Capture(model, _layers(model, layer) if against == "representation" else [])
        targets = check_targets(y, n, x.device)
        need_forward = against != "input" or mode != "keep" or targets is None
        clean_logits = clean_reps = torch.empty(0, dtype=torch.float64, device=x.device)
        clean_classes = torch.empty(0, dtype=torch.long, device=x.device)
        if need_forward:
            clean_logits, reps = _forward_in_chunks(forward, x, size, metric)
            clean_reps = reps if reps is not None else clean_reps
            clean_classes = clean_logits.argmax(1)
            if targets is None:
                targets = clean_classes
            elif (targets >= clean_logits.shape[1]).any():
                raise InvalidTargetError(
                    f"y holds classes >= the model's {clean_logits.shape[1]} outputs: "
                    f"{targets[targets >= clean_logits.shape[1]].unique().tolist()}.")
        assert targets is not None
        if attributions is None:
            a = explain_checked(explain, model, x, targets, None)
        else:
            a = check_attributions(attributions, x)
        reference = preprocess_attributions(a, normalise, abs).flatten(1)
        x64 = x.to(torch.float64)
        source = noise_draws(sampling, x, nr_samples, "uniform", low, high)
        steps = source.steps

        values = torch.empty(steps * n, dtype=torch.float64)
        changed = torch.zeros(steps * n, dtype=torch.bool)

        def run(start: int, stop: int) -> None:
            sample = torch.arange(start, stop) % n  # flat order (step, sample), as NoiseDraws
            at = sample.to(x.device)
            perturbed = (x64[at] + source.rows(start, stop).to(x.device)).to(x.dtype)
            maps = explain_checked(explain, model, perturbed, targets[at], a)
            maps = preprocess_attributions(maps, normalise, abs).flatten(1)
            numerator = torch.linalg.vector_norm(
                _relative_change(reference[at], maps, eps), ord=order, dim=1)
            if need_forward:
                with torch.no_grad():
                    logits, reps = forward(perturbed)
                logits = check_finite_logits(logits, metric, sample).to(torch.float64)
            if against == "input":  # the copy the model saw (rounded to its dtype)
                moved = _relative_change(x64[at].flatten(1),
                                         perturbed.to(torch.float64).flatten(1), eps)
            elif against == "output":
                moved = clean_logits[at] - logits
            else:
                assert reps is not None
                moved = _relative_change(clean_reps[at], reps, eps)
            denominator = torch.linalg.vector_norm(moved, ord=order, dim=1).clamp(min=eps)
            values[start:stop] = (numerator / denominator).cpu()
            if mode != "keep":
                changed[start:stop] = (logits.argmax(1) != clean_classes[at]).cpu()

        adaptive_chunks(steps * n, size, sampling.progress, metric, run)
        values = values.view(steps, n).T
        changed_flags = changed.view(steps, n).T if mode != "keep" else None
        valid = torch.ones_like(values, dtype=torch.bool)
        return _largest(values, valid, changed_flags, mode).to(x.device)


def _check_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not (p > 0):
        raise InvalidInputError(f"p must be a positive number (or math.inf), got {p!r}.")
    return float(p)


def _forward_in_chunks(forward: _Capture, x: Tensor, size: int,
                       metric: str) -> tuple[Tensor, Tensor | None]:
    """Logits (N, K) and, when ``forward`` captures layers, representations (N, D), float64."""
    classes: list[int] = []

    def run(start: int, stop: int) -> Tensor:
        with torch.no_grad():
            logits, reps = forward(x[start:stop])
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != stop - start:
            raise InvalidInputError(
                "the model must return logits of shape (N, classes); got "
                f"{getattr(logits, 'shape', type(logits).__name__)}.")
        logits = check_finite_logits(logits, metric, torch.arange(start, stop))
        classes[:] = [logits.shape[1]]
        out = logits.to(torch.float64)
        return out if reps is None else torch.cat([out, reps], 1)

    both = concat_in_chunks(x.shape[0], size, run, f"{metric} (unperturbed inputs)")
    k = classes[0]
    return both[:, :k], (both[:, k:] if forward.spec else None)


@register_metric(family="robustness", direction="lower", needs=("model", "explain"))
def relative_input_stability(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_samples: int = 200,
    lower_bound: float = 0.2,
    upper_bound: float | None = None,
    eps_min: float = 1e-6,
    p: float = 2,
    normalise: Normalise = None,
    abs: bool = False,
    changed_prediction: ChangedPrediction = "skip",
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Relative input stability (Agarwal et al., 2022): the relative change of the map over
    the relative change of the input, at its worst over noisy copies.

    ``RIS = max_x' ||(a(x) - a(x')) / a(x)||_p / max(||(x - x') / x||_p, eps_min)`` over noisy
    copies ``x' = x + d`` that keep the predicted class (divisions elementwise; a zero entry of
    ``a(x)`` or ``x`` is replaced by ``eps_min``, as Quantus does). Lower is more stable.

    Differences from Quantus 0.6 (``RelativeInputStability``), where it departs from the
    paper: the denominator is floored at ``eps_min`` (Quantus only replaces an exact zero, so
    a denominator of 1e-9 divides by 1e-9); copies that change the prediction are left out of
    the max (Quantus, by default, returns NaN for the whole sample); the default noise is
    symmetric (see ``lower_bound``).

    Args:
        nr_samples: noise draws per input (Quantus: 200).
        lower_bound, upper_bound: the uniform noise added to every input element:
            ``U(-lower_bound, lower_bound)`` when ``upper_bound`` is None (default, 0.2), else
            ``U(lower_bound, upper_bound)``. Quantus 0.6's default is ``U(0.02, 0.2)``, which
            only ever brightens the input; pass ``lower_bound=0.02, upper_bound=0.2`` for it.
        eps_min: the floor of the denominator, and the stand-in for the zero entries that the
            relative changes divide by (Quantus: 1e-6).
        p: the norm (2, as Quantus; any p > 0, or ``math.inf``).
        normalise, abs: preprocessing of the given and the re-computed maps (per sample;
            Quantus: none).
        changed_prediction: what to do with a noisy copy whose predicted class differs from the
            input's: ``"skip"`` (default; the definition's max over copies that keep the
            prediction; NaN when none does), ``"nan"`` (Quantus' default: the sample scores NaN
            if any copy changed it) or ``"keep"`` (no filter; Quantus'
            ``return_nan_when_prediction_changes=False``).
        sampling: seed or generator of the noise, explicit ``draws`` of shape
            ``(nr_samples, N, C, H, W)`` (the noise added to ``x``, e.g. Quantus' draws; see
            :class:`~srdxai.metrics.NoiseDraws`), ``batch_size`` (noisy copies per ``explain``
            call) and ``progress``; the same fields may be given as keywords.

    Returns:
        float64 scores (N,). Cost per sample: ``nr_samples`` explained copies, plus one forward
        pass per copy and one for the input unless ``changed_prediction="keep"`` and ``y`` is
        given.
    """
    sampling = sampling_of(sampling, dict(options), "relative_input_stability")
    return _relative_stability(
        model, x, y, attributions, explain, metric="relative_input_stability", against="input",
        nr_samples=nr_samples, lower_bound=lower_bound, upper_bound=upper_bound, eps_min=eps_min,
        p=p, normalise=normalise, abs=abs, changed_prediction=changed_prediction, layer=None,
        sampling=sampling)


@register_metric(family="robustness", direction="lower", needs=("model", "explain"))
def relative_output_stability(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_samples: int = 200,
    lower_bound: float = 0.2,
    upper_bound: float | None = None,
    eps_min: float = 1e-6,
    p: float = 2,
    normalise: Normalise = None,
    abs: bool = False,
    changed_prediction: ChangedPrediction = "skip",
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Relative output stability (Agarwal et al., 2022): the relative change of the map over
    the change of the logits, at its worst over noisy copies.

    ``ROS = max_x' ||(a(x) - a(x')) / a(x)||_p / max(||h(x) - h(x')||_p, eps_min)`` with the
    logits ``h`` of all classes (their plain difference, as in the paper and Quantus), over
    noisy copies that keep the predicted class. Lower is more stable. Differences from Quantus
    0.6 and the arguments as for :func:`relative_input_stability`.

    Returns:
        float64 scores (N,). Cost per sample: ``nr_samples`` explained copies and
        ``nr_samples + 1`` forward passes (the logits).
    """
    sampling = sampling_of(sampling, dict(options), "relative_output_stability")
    return _relative_stability(
        model, x, y, attributions, explain, metric="relative_output_stability",
        against="output", nr_samples=nr_samples, lower_bound=lower_bound,
        upper_bound=upper_bound, eps_min=eps_min, p=p, normalise=normalise, abs=abs,
        changed_prediction=changed_prediction, layer=None, sampling=sampling)


@register_metric(family="robustness", direction="lower", needs=("model", "explain"))
def relative_representation_stability(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    layer: Layer | Sequence[Layer] | None = None,
    nr_samples: int = 200,
    lower_bound: float = 0.2,
    upper_bound: float | None = None,
    eps_min: float = 1e-6,
    p: float = 2,
    normalise: Normalise = None,
    abs: bool = False,
    changed_prediction: ChangedPrediction = "skip",
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Relative representation stability (Agarwal et al., 2022): the relative change of the
    map over the relative change of a hidden representation, at its worst over noisy copies.

    ``RRS = max_x' ||(a(x) - a(x')) / a(x)||_p / max(||(L(x) - L(x')) / L(x)||_p, eps_min)``
    with a hidden representation ``L`` (flattened per sample), over noisy copies that keep the
    predicted class. ``L`` is captured with forward hooks during the metric's own forward
    passes (never during ``explain``); the hooks are removed afterwards, also on errors, and
    the captured values are copies (an in-place ReLU after the layer cannot change them).
    Lower is more stable. Differences from Quantus 0.6 and the other arguments as for
    :func:`relative_input_stability`; the default layer differs too (below).

    Args:
        layer: where ``L`` is read. None (default): the input of the model's last
            ``nn.Linear``, the features its classifier head reads (the paper leaves ``L``
            open; OpenXAI, by the paper's authors, uses the first hidden layer). A layer name
            (as in ``model.named_modules()``) or a module: its output. A list of them: their
            outputs concatenated in the order they run. ``"all"``: the outputs of every
            submodule that is not an ``nn.Sequential`` (Quantus' default; large for real
            networks); modules that return no tensor are left out. ReLU outputs hold many
            zeros, which the relative change divides by ``eps_min``: prefer layers before an
            activation.

    Returns:
        float64 scores (N,). Cost per sample: ``nr_samples`` explained copies and
        ``nr_samples + 1`` forward passes (the representations).
    """
    sampling = sampling_of(sampling, dict(options), "relative_representation_stability")
    return _relative_stability(
        model, x, y, attributions, explain, metric="relative_representation_stability",
        against="representation", nr_samples=nr_samples, lower_bound=lower_bound,
        upper_bound=upper_bound, eps_min=eps_min, p=p, normalise=normalise, abs=abs,
        changed_prediction=changed_prediction, layer=layer, sampling=sampling)


# --- continuity -----------------------------------------------------------------------------

def continuity_shifts(size: int, nr_steps: int) -> Tensor:
    """The translations of :func:`continuity` (pixels; positive moves the image right or
    down): ``-size + k * dx`` for ``k = 1..nr_steps`` with ``dx = (2 * size + 1) //
    nr_steps``, Quantus 0.6's schedule."""
    dx = (2 * size + 1) // nr_steps
    return -size + dx * torch.arange(1, nr_steps + 1)


def _translate(images: Tensor, fill: Tensor, shifts: Tensor, axis: int) -> Tensor:
    """Each image moved by its shift along ``axis`` (3: x, 2: y); the uncovered pixels take
    ``fill``'s values there."""
    length = images.shape[axis]
    source = torch.arange(length, device=images.device)[None, :] - shifts.to(images.device)[:, None]
    inside = (source >= 0) & (source < length)
    view = [-1, 1, 1, 1]
    view[axis] = length
    index = source.clamp(0, length - 1).view(*view).expand_as(images)
    moved = images.gather(axis, index)
    return torch.where(inside.view(*view), moved, fill)


@register_metric(family="robustness", direction="lower", needs=("model", "explain"))
def continuity(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_steps: int = 28,
    direction: Literal["x", "y"] = "x",
    baseline: Baseline = "black",
    normalise: Normalise = True,
    abs: bool = True,
    changed_prediction: ChangedPrediction = "keep",
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Continuity (Montavon et al., 2018): the steepest change of the map as the image is
    translated.

    ``max_x' ||a(x) - a(x')||_1 / ||x - x'||_2`` over ``nr_steps`` translated copies ``x'`` of
    the input (Montavon et al.'s ``max_{x != x'}``, estimated on translations as in their
    illustration), as Quantus 0.6's ``Continuity``: horizontal shifts by :func:`continuity_shifts`
    (``nr_steps=28`` on a 224-pixel image: -208, -192, ..., 224), the uncovered pixels set to
    ``baseline``. Maps are normalised (per-sample max) and made absolute first, as Quantus.
    Lower is smoother.

    Differences from Quantus 0.6: a copy equal to the input (shift 0) is left out, as the
    definition requires ``x' != x`` (Quantus scores it ``||a(x) - a(x)||_1 / 1e-9``, which is 0
    for a deterministic method but ~1e9 times any run-to-run noise of a stochastic one, and
    adds 1e-9 to every denominator); ``baseline`` and ``direction`` are honoured (Quantus
    always translates along x and pads with "black", whatever ``perturb_baseline`` says); a
    step count dividing ``2 * width + 1`` shifts the image out entirely (Quantus raises an
    IndexError); given ``attributions`` are used (Quantus re-computes them); a changed
    prediction is judged against the predicted class of ``x`` (Quantus: against ``y``).
    (Quantus 0.5 and older implemented a different, patch-wise correlation version.)

    Args:
        nr_steps: translated copies per input, 1 to ``2 * size + 1``.
        direction: ``"x"`` (horizontal, Quantus) or ``"y"`` (vertical).
        baseline: the value of the uncovered pixels: a number, "black" (the sample's minimum,
            Quantus), "white", "mean", "zero", "blur" or a tensor broadcasting to x.
        normalise, abs: preprocessing of the given and the re-computed maps (per sample).
        changed_prediction: ``"keep"`` (default, Quantus' default), ``"skip"`` (leave out
            copies whose predicted class differs from the input's) or ``"nan"`` (the sample
            scores NaN if any copy changed it; Quantus' ``return_nan_when_prediction_changes``).
        sampling: only ``batch_size`` (copies per ``explain`` call) and ``progress`` apply; the
            metric draws nothing.

    Returns:
        float64 scores (N,); NaN if no copy is left. Cost per sample: ``nr_steps`` explained
        copies, plus ``nr_steps + 1`` forward passes unless ``changed_prediction="keep"``
        (and one for the predicted class when ``y`` is None).
    """
    sampling = sampling_of(sampling, dict(options), "continuity")
    sampling.refuse_draws("continuity", "it is deterministic and draws nothing")
    metric = "continuity"
    model = check_model(model)
    explain = check_explain(explain, metric)
    mode = _check_mode(changed_prediction)
    if direction not in ("x", "y"):
        raise InvalidInputError(f"direction must be 'x' or 'y', got {direction!r}.")
    axis = 3 if direction == "x" else 2
    with guarded(model):
        x = check_inputs(x, model)
        n = x.shape[0]
        size = default_batch_size(x, sampling.batch_size, explain=True, model=model)
        length = x.shape[axis]
        steps = check_positive_int(nr_steps, "nr_steps")
        if steps > 2 * length + 1:
            raise InvalidInputError(
                f"nr_steps ({steps}) must be at most 2 * {'width' if axis == 3 else 'height'} "
                f"+ 1 = {2 * length + 1}: the translations are (2 * size + 1) // nr_steps "
                "pixels apart.")
        targets = check_targets(y, n, x.device)
        clean_classes = torch.empty(0, dtype=torch.long, device=x.device)
        if targets is None or mode != "keep":
            clean_classes = predicted_classes(model, x, size, metric)
        if targets is None:
            targets = clean_classes
        if attributions is None:
            a = explain_checked(explain, model, x, targets, None)
        else:
            a = check_attributions(attributions, x)
        reference = preprocess_attributions(a, normalise, abs).flatten(1)
        fill = baseline_values(baseline, x)
        shifts = continuity_shifts(length, steps).to(x.device)
        x64 = x.to(torch.float64)

        values = torch.empty(n * steps, dtype=torch.float64)
        moved = torch.zeros(n * steps, dtype=torch.bool)
        changed = torch.zeros(n * steps, dtype=torch.bool)

        def run(start: int, stop: int) -> None:
            flat = torch.arange(start, stop)
            sample = flat // steps
            at = sample.to(x.device)
            copies = _translate(x[at], fill[at], shifts[(flat % steps).to(x.device)], axis)
            maps = explain_checked(explain, model, copies, targets[at], a)
            maps = preprocess_attributions(maps, normalise, abs).flatten(1)
            change = (reference[at] - maps).abs().sum(1)
            distance = (x64[at] - copies.to(torch.float64)).flatten(1).norm(dim=1)
            values[start:stop] = (change / torch.where(distance > 0, distance,
                                                       torch.ones_like(distance))).cpu()
            moved[start:stop] = (distance > 0).cpu()
            if mode != "keep":
                with torch.no_grad():
                    logits = check_finite_logits(model(copies), metric, sample)
                changed[start:stop] = (logits.argmax(1) != clean_classes[at]).cpu()

        adaptive_chunks(n * steps, size, sampling.progress, metric, run)
        flags = changed.view(n, steps) if mode != "keep" else None
        return _largest(values.view(n, steps), moved.view(n, steps), flags, mode).to(x.device)


# --- consistency ----------------------------------------------------------------------------

def discretise_top_n_sign(maps: Tensor, n: int) -> Tensor:
    """Consistency's default discretisation: per map (flattened), the indices of its ``n``
    largest features by |value| (ties: the lower index), in increasing order, followed by the
    sign of each: (N, 2n) codes, equal exactly when two maps agree on their top ``n``
    features and those features' signs."""
    flat = maps.flatten(1)
    top = flat.abs().sort(dim=1, descending=True, stable=True).indices[:, :n].sort(1).values
    return torch.cat([top.to(torch.float64), flat.gather(1, top).sign()], 1)


def discretise_first_n_sign(maps: Tensor, n: int) -> Tensor:
    """Quantus 0.6's ``top_n_sign``: the signs of the first ``n`` features of each flattened
    map (by position, not by importance: for an image, ``n`` pixels of its top row)."""
    return maps.flatten(1)[:, :n].sign()


@register_metric(family="robustness", direction="higher", needs=("model",))
def consistency(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    n: int = 5,
    discretise: Discretise = "top_n_sign",
    abs: bool = True,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Consistency (Dasgupta et al., ICML 2022): how often samples with the same discretised
    explanation share the predicted class.

    Each map is discretised into a code (``discretise``); the score of sample i is the fraction
    of the other samples of the batch whose code equals i's that have i's predicted class:
    the estimate of ``Pr[f(x') = f(x) | e(x') = e(x)]`` on the batch, which serves as the
    sample from the data distribution. It therefore depends on the other samples (not
    per-sample; pass the whole evaluation set, or fixed groups, at once). Higher is better.

    Differences from Quantus 0.6 (``Consistency``): Quantus' ``top_n_sign`` takes the signs
    of the first n features by position, not the n most important ones (it is available as
    ``discretise="first_n_sign"``); a sample whose code no other sample shares scores NaN (the
    conditional probability is undefined; Quantus returns 0); the batch is the whole ``x``
    (Quantus compares only within its internal batches of ``batch_size``); Quantus declares
    lower as better, which inverts the definition.

    Args:
        n: features per code.
        discretise: ``"top_n_sign"`` (:func:`discretise_top_n_sign`), ``"first_n_sign"``
            (:func:`discretise_first_n_sign`, Quantus') or a callable ``(N, F) float64 maps ->
            (N, D) codes``; rows are compared for exact equality.
        abs: take |a| first (Quantus' default; the codes then carry no signs).
        sampling: only ``batch_size`` (images per forward pass) and ``progress`` apply.

    Returns:
        float64 scores (N,) in [0, 1]; NaN for a sample whose code no other sample shares.
        Cost: one forward pass per sample (the predicted classes; ``explain`` once if
        ``attributions`` is None).
    """
    sampling = sampling_of(sampling, dict(options), "consistency")
    sampling.refuse_draws("consistency", "it is deterministic and draws nothing")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="consistency")
        classes = s.y if y is None else predicted_classes(s.model, s.x, s.batch_size,
                                                          "consistency")
        maps = s.maps.abs() if abs else s.maps
        features = maps[0].numel()
        if discretise in ("top_n_sign", "first_n_sign"):
            count = check_positive_int(n, "n")
            if count > features:
                raise InvalidInputError(
                    f"n ({count}) must be at most the number of features ({features}).")
            codes = (discretise_top_n_sign(maps, count) if discretise == "top_n_sign"
                     else discretise_first_n_sign(maps, count))
        elif callable(discretise):
            codes = to_tensor(discretise(maps.flatten(1)), "discretise(...) codes")
            if codes.dim() == 1:
                codes = codes[:, None]
            if codes.dim() != 2 or codes.shape[0] != s.n:
                raise InvalidInputError(
                    f"discretise must return one code row per map, shape ({s.n}, D); got "
                    f"{tuple(codes.shape)}.")
        else:
            raise InvalidInputError(
                "discretise must be 'top_n_sign', 'first_n_sign' or a callable (N, F) maps -> "
                f"(N, D) codes; got {discretise!r}.")
        codes = codes.to(s.x.device)
        if codes.is_floating_point():
            codes = codes + 0.0  # -0.0 and 0.0 are one code
        group = torch.unique(codes, dim=0, return_inverse=True)[1]
        classes = classes.to(s.x.device)
        groups = int(group.max()) + 1
        size = torch.bincount(group, minlength=groups)
        pair = group * (int(classes.max()) + 1) + classes
        agree = torch.bincount(pair, minlength=groups * (int(classes.max()) + 1))
        others = (size[group] - 1).to(torch.float64)
        same = (agree[pair] - 1).to(torch.float64)
        score = same / others.clamp(min=1)
        return torch.where(others > 0, score, torch.full_like(score, math.nan))

