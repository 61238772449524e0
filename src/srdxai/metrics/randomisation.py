"""Randomisation sanity checks (Adebayo et al., NeurIPS 2018; Sixt et al., ICML 2020).

A map that explains the model must change when the model's parameters are destroyed (model
parameter randomisation test, MPRT) and when another class is explained (random-logit test).
Both compare the original maps with the new ones by similarity measures; a method passes when
the similarity falls.

The user's model is never modified: the randomised model is one deep copy per call, whatever
the number of layers. ``cascading`` randomises the layers from the output to the input, each on
top of the previous ones; ``independent`` randomises one layer at a time and puts its saved
values back before the next. A layer is re-drawn with its own ``reset_parameters()`` (PyTorch's
initialisation, as Quantus' MPRT does), inside a forked random state seeded per layer, so
the draws are reproducible and the caller's random state is untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Unpack

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from .common import (
    Explain,
    MetricInputs,
    check_explain,
    check_model,
    concat_in_chunks,
    default_batch_size,
    explain_checked,
    guarded,
    pixel_map,
    spearman,
)
from .registry import register_metric
from .robustness import NoiseDraws
from .sampling import Sampling, SamplingOptions, sampling_of
from .similarity import scaled_abs_map, ssim

Tensor = torch.Tensor

__all__ = ["MPRTResult", "SIMILARITIES", "discrete_entropy", "efficient_mprt", "hog_cosine",
           "map_similarity", "model_parameter_randomisation", "random_logit",
           "randomisable_layers", "smooth_mprt"]

#: the similarity measures of Adebayo et al.: SSIM and HOG of the absolute maps, Spearman's
#: rank correlation of the absolute and of the signed maps
SIMILARITIES = ("ssim", "spearman_abs", "spearman", "hog_cosine")
Order = Literal["cascading", "bottom_up", "independent"]


def _pixel_maps(a: Tensor) -> Tensor:
    return pixel_map(a).to(torch.float64)


def hog_cosine(a: Tensor, b: Tensor, cell: int = 8, bins: int = 9) -> Tensor:
    """Cosine similarity of HOG-style descriptors of two (N, H, W) maps: per ``cell x cell``
    cell, a histogram of unsigned gradient orientations (``bins`` over 0-180 degrees) weighted
    by the gradient magnitude (central differences), without HOG's block normalisation. A map
    without gradients scores NaN."""
    def descriptor(m: Tensor) -> Tensor:
        m = m.unsqueeze(1)
        gx = F.pad(m[..., :, 2:] - m[..., :, :-2], (1, 1, 0, 0))
        gy = F.pad(m[..., 2:, :] - m[..., :-2, :], (0, 0, 1, 1))
        magnitude = torch.sqrt(gx**2 + gy**2)
        angle = torch.remainder(torch.atan2(gy, gx), math.pi)
        index = (angle / math.pi * bins).long().clamp(max=bins - 1)
        votes = torch.zeros(m.shape[0], bins, *m.shape[2:], dtype=m.dtype, device=m.device)
        votes.scatter_(1, index, magnitude)
        return F.avg_pool2d(votes, cell, ceil_mode=True).flatten(1)

    da, db = descriptor(a), descriptor(b)
    denominator = da.norm(dim=1) * db.norm(dim=1)
    cos = (da * db).sum(1) / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, cos, torch.full_like(cos, math.nan))


def map_similarity(a: Tensor, b: Tensor, measures: Sequence[str] = SIMILARITIES
                   ) -> dict[str, Tensor]:
    """Adebayo et al.'s similarity of two batches of maps, per sample, by measure (float64
    (N,)): SSIM and HOG cosine of the absolute maps scaled to [0, 1], Spearman's correlation of
    the absolute (``spearman_abs``) and of the signed maps (``spearman``). Element maps are
    summed over channels first."""
    unknown = [m for m in measures if m not in SIMILARITIES]
    if unknown:
        raise InvalidInputError(
            f"unknown similarity measure(s) {', '.join(unknown)}; choose from "
            f"{', '.join(SIMILARITIES)}.")
    pa, pb = _pixel_maps(a), _pixel_maps(b)
    ua, ub = scaled_abs_map(pa, "max_abs"), scaled_abs_map(pb, "max_abs")  # in [0, 1]
    out: dict[str, Tensor] = {}
    for measure in measures:
        if measure == "ssim":
            out[measure] = ssim(ua, ub, data_range=1.0)
        elif measure == "spearman_abs":
            out[measure] = spearman(pa.abs().flatten(1), pb.abs().flatten(1))
        elif measure == "spearman":
            out[measure] = spearman(pa.flatten(1), pb.flatten(1))
        else:
            out[measure] = hog_cosine(ua, ub)
    return out


def randomisable_layers(model: nn.Module) -> list[str]:
    """The names of the modules that own parameters, from the output to the input (the
    reverse of their registration order, the order of a plain forward pass)."""
    return [name for name, module in reversed(list(model.named_modules()))
            if any(True for _ in module.parameters(recurse=False))]


def _randomise(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            return
        for p in module.parameters(recurse=False):  # no initialiser: N(0, the layer's std)
            std = float(p.std()) if p.numel() > 1 else 1.0
            p.normal_(0.0, std if std > 0 else 1.0)


@dataclass(frozen=True)
class MPRTResult:
    """The maps' similarity to the original maps after each randomisation step.

    ``layers[k]`` is the layer randomised at step ``k`` (cascading: with all before it);
    ``similarity[measure]`` is float64 ``(len(layers), N)``. With ``keep_maps``, ``maps`` holds
    the (channel-summed) maps of every step ``(len(layers), N, H, W)`` and ``original`` those
    of the intact model ``(N, H, W)``."""

    order: str
    layers: list[str]
    similarity: dict[str, Tensor]
    maps: Tensor | None = None
    original: Tensor | None = None

    def final(self, measure: str = "ssim") -> Tensor:
        """Per-sample similarity after the last step (cascading: the fully random model)."""
        return self.similarity[measure][-1]

    def entropy_rise(self, n_bins: int = 100) -> Tensor:
        """Efficient MPRT's score from the kept maps: the relative rise of the maps'
        :func:`discrete_entropy` from the intact model to the last step's (cascading: fully
        random) model, ``(H_last - H_original) / H_original``; NaN for a constant original
        map. Needs ``keep_maps=True``."""
        if self.maps is None or self.original is None:
            raise InvalidInputError("entropy_rise needs the maps: run with keep_maps=True.")
        before = discrete_entropy(self.original, n_bins)
        after = discrete_entropy(self.maps[-1], n_bins)
        rise = (after - before) / before.where(before > 0, torch.ones_like(before))
        return torch.where(before > 0, rise, torch.full_like(rise, math.nan))


@register_metric(family="randomisation", direction="lower", needs=("model", "explain"),
                 returns="MPRTResult (similarity per randomised layer per sample)",
                 rows=("mprt_*",),
                 axes=("layers randomised, from the output (cascading)",
                       "similarity to the original map ({measure})", "linear"))
def model_parameter_randomisation(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    order: Order = "cascading",
    layers: Sequence[str] | None = None,
    measures: Sequence[str] = SIMILARITIES,
    steps: int | None = None,
    keep_maps: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> MPRTResult:
    """Model parameter randomisation test (Adebayo et al., NeurIPS 2018; Quantus' ``MPRT``).

    Re-draws the parameters of ``layers`` (default: :func:`randomisable_layers`, output first)
    in a copy of the model, ``cascading`` or ``independent`` (module docstring), explains the
    same inputs and targets after every step and compares the maps with the original ones
    (``attributions``, or ``explain`` on the intact model) by :func:`map_similarity`. Lower is
    better: the map depends on what the model learnt.

    Args:
        explain: ``explain(model, x, y) -> maps``; called once per step on the copy.
        order: ``"cascading"`` (output first), ``"bottom_up"`` (cascading from the input) or
            ``"independent"``.
        layers: module names to randomise, in that order.
        measures: similarity measures, from :data:`SIMILARITIES`.
        steps: at most this many explanations: the layers are split into ``steps``
            consecutive groups (as equal as possible) and a step re-draws a whole group, named
            ``"first..last"`` (None: one step per layer). Bounds the cost on deep models
            (EfficientNet-Lite0 has over 100 layers with parameters).
        keep_maps: also return every step's (channel-summed) maps.
        sampling: seed, batch size and progress (:class:`~srdxai.metrics.Sampling`; its
            fields may be given as keywords instead). The ``k``-th re-drawn layer is re-drawn
            from seed ``seed + k`` (a ``generator`` draws the base seed); ``batch_size``:
            images per explain call; the bar counts steps. No explicit ``draws``.

    Returns:
        :class:`MPRTResult`.
    """
    sampling = sampling_of(sampling, options, "model_parameter_randomisation")
    seed = _base_seed(sampling, "model_parameter_randomisation")
    model = check_model(model)
    explain = check_explain(explain, "model_parameter_randomisation")
    if order not in ("cascading", "bottom_up", "independent"):
        raise InvalidInputError(
            f"order must be 'cascading', 'bottom_up' or 'independent', got {order!r}.")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="MPRT")
    model, x, targets = s.model, s.x, s.y
    original = s.maps
    names = list(layers) if layers is not None else randomisable_layers(model)
    if order == "bottom_up" and layers is None:
        names.reverse()  # cascading from the input up (Hedström et al.'s recommendation)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise InvalidInputError(
            f"no such layer(s) to randomise: {', '.join(missing)}; choose from "
            f"{', '.join(randomisable_layers(model))}." if missing else
            "the model has no parameters to randomise.")
    wanted = tuple(measures)
    map_similarity(original[:1], original[:1], wanted)  # unknown measures fail before the work
    groups = _groups(names, steps)
    try:  # the one copy; the caller's model is never touched
        twin = copy.deepcopy(model).eval()
    except Exception as exc:  # any object a module holds may refuse to be copied
        raise InvalidInputError(
            f"MPRT randomises a copy of the model, and copy.deepcopy(model) failed: {exc}. "
            "Make the model deep-copyable (e.g. drop non-copyable attributes).") from exc
    twin_modules = dict(twin.named_modules())
    scores: dict[str, list[Tensor]] = {m: [] for m in wanted}
    kept = []
    drawn = 0
    size = default_batch_size(x, sampling.batch_size, explain=True, model=model)
    for group in tqdm(groups, disable=not sampling.progress, desc="MPRT", unit="step",
                      leave=False):
        saved = {}
        for name in group:
            module = twin_modules[name]
            if order == "independent":
                saved[name] = {key: value.detach().clone()
                               for key, value in module.state_dict().items()}
            _randomise(module, seed + drawn)
            drawn += 1
        with guarded(twin):
            maps = _explain_chunked(explain, twin, x, targets, original, size)
        for measure, value in map_similarity(original.detach(), maps, wanted).items():
            scores[measure].append(value.cpu())
        if keep_maps:
            kept.append(_pixel_maps(maps).cpu())
        for name, state in saved.items():
            twin_modules[name].load_state_dict(state)
    labels = [g[0] if len(g) == 1 else f"{g[0]}..{g[-1]}" for g in groups]
    return MPRTResult(order, labels, {m: torch.stack(v) for m, v in scores.items()},
                      torch.stack(kept) if keep_maps else None,
                      _pixel_maps(original.detach()).cpu() if keep_maps else None)


def _groups(names: list[str], steps: int | None) -> list[list[str]]:
    """``names`` in at most ``steps`` consecutive groups whose sizes differ by at most one."""
    if steps is None or steps >= len(names):
        return [[n] for n in names]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps must be an int >= 1 or None, got {steps!r}.")
    size, extra = divmod(len(names), steps)
    out, start = [], 0
    for k in range(steps):
        stop = start + size + (1 if k < extra else 0)
        out.append(names[start:stop])
        start = stop
    return out


def _base_seed(sampling: Sampling, metric: str) -> int:
    """The seed the randomisation metrics count from: ``sampling.seed``, or one drawn from
    ``sampling.generator`` (or from fresh entropy when the seed is None)."""
    sampling.refuse_draws(metric, "its only randomness is the seed; give seed= instead")
    if sampling.generator is None and sampling.seed is not None:
        return int(sampling.seed)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=sampling.make_generator()))


def _explain_chunked(explain: Explain, model: nn.Module, x: Tensor, y: Tensor, like: Tensor,
                     size: int) -> Tensor:
    """``explain`` of ``x`` in calls of at most ``size`` images (a chunk that runs out of
    memory is retried in halves), checked against the maps ``like``."""
    return concat_in_chunks(
        x.shape[0], size,
        lambda a, b: explain_checked(explain, model, x[a:b], y[a:b], like[a:b]).detach(),
        "explain")


@register_metric(family="randomisation", direction="lower", needs=("model", "explain"),
                 rows=("random_logit_*",))
def random_logit(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    measure: str = "ssim",
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Random-logit test (Sixt et al., ICML 2020; Quantus' ``RandomLogit``): the similarity of
    the map of the target class and the map of a uniformly drawn other class. Lower is better:
    the map says something about the class it explains.

    Args:
        measure: a :data:`SIMILARITIES` measure (Quantus' default is SSIM).
        sampling: the seed of the other classes' draw (one per sample), the batch size of the
            explain calls (:class:`~srdxai.metrics.Sampling`; fields may be keywords).

    Returns:
        float64 (N,).
    """
    sampling = sampling_of(sampling, options, "random_logit")
    sampling.refuse_draws("random_logit",
                          "its only randomness is the seed; give seed= instead")
    model = check_model(model)
    explain = check_explain(explain, "random_logit")
    with guarded(model):
        s = MetricInputs(model, x, y, attributions, explain, sampling.batch_size,
                         metric="random_logit")
        model, x, targets = s.model, s.x, s.y
        original = s.maps
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        if classes < 2:
            raise InvalidInputError("the random-logit test needs a model with 2 classes or "
                                    "more.")
        shift = torch.randint(1, classes, (x.shape[0],), generator=sampling.make_generator())
        others = (targets + shift.to(targets.device)) % classes  # uniform over the others
        size = default_batch_size(x, sampling.batch_size, explain=True, model=model)
        other_maps = _explain_chunked(explain, model, x, others, original, size)
    return map_similarity(original.detach(), other_maps.detach(), (measure,))[measure]


def _denoised(explain: Explain, nr_samples: int, noise_magnitude: float, seed: int,
              batch_size: int | None) -> Explain:
    """``explain`` averaged over ``nr_samples`` noisy copies of the input, noise
    ``N(0, (noise_magnitude * (max(x) - min(x)))^2)`` per sample; the same draws at every call
    (so the original and the randomised models see the same noise). The copies of all samples
    and draws are explained together, in calls of at most ``batch_size`` images."""
    def smooth(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        flat = x.flatten(1)
        std = (noise_magnitude * (flat.amax(1) - flat.amin(1))).view(-1, *([1] * (x.dim() - 1)))
        noise = NoiseDraws(x.shape, nr_samples, "gaussian", 0.0, 1.0,
                           torch.Generator().manual_seed(seed))
        size = default_batch_size(x, batch_size, explain=True, model=model)
        total = nr_samples * n
        sums: Tensor | None = None

        def run(offset: int, start: int, stop: int) -> Tensor:
            rows = torch.arange(offset + start, offset + stop, device=x.device)
            sample = rows % n  # items in (draw, sample) order, as NoiseDraws hands them out
            copies = x[sample] + std[sample] * noise.rows(offset + start, offset + stop).to(x)
            maps = torch.as_tensor(explain(model, copies, y[sample])).detach()
            return maps.to(torch.float64)

        for offset in range(0, total, size):  # a chunk's maps are summed, then dropped
            stop = min(total, offset + size)
            maps = concat_in_chunks(stop - offset, stop - offset, partial(run, offset),
                                    "smooth MPRT")
            if sums is None:
                sums = torch.zeros(n, *maps.shape[1:], dtype=torch.float64, device=maps.device)
            sums.index_add_(0, torch.arange(offset, stop, device=maps.device) % n, maps)
        assert sums is not None
        return (sums / nr_samples).to(x.dtype)

    return smooth


@register_metric(family="randomisation", direction="lower", needs=("model", "explain"),
                 returns="MPRTResult (similarity per randomised layer per sample)",
                 rows=("smprt_*",),
                 axes=("layers randomised, from the input (bottom-up)",
                       "similarity of the denoised maps ({measure})", "linear"))
def smooth_mprt(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    nr_samples: int = 50,
    noise_magnitude: float = 0.1,
    order: Order = "bottom_up",
    layers: Sequence[str] | None = None,
    measures: Sequence[str] = ("spearman",),
    steps: int | None = None,
    keep_maps: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> MPRTResult:
    """Smooth MPRT (Hedström et al., 2023; Quantus' ``SmoothMPRT``): MPRT on denoised maps.

    Every map, of the intact and of each randomised model, is the mean of the maps of
    ``nr_samples`` noisy copies of the input (Gaussian noise of standard deviation
    ``noise_magnitude`` times each image's value range, the same draws throughout), which
    removes the shattered-gradient noise that made plain MPRT's similarity fall for every
    method. ``attributions`` is not used: the original map must be denoised too. Defaults as
    Quantus: 50 samples, 0.1, bottom-up cascading, Spearman. Lower is better.

    The noisy copies of all samples and draws are explained together in calls of
    ``sampling.batch_size`` images: ``(1 + steps) * nr_samples * N`` maps in
    ``ceil(nr_samples * N / batch_size)`` calls per model. The seed draws both the noise and
    the layers (as :func:`model_parameter_randomisation`).
    """
    sampling = sampling_of(sampling, options, "smooth_mprt")
    seed = _base_seed(sampling, "smooth_mprt")
    nr_samples = int(nr_samples)
    if nr_samples < 1 or not noise_magnitude >= 0:
        raise InvalidInputError("nr_samples must be >= 1 and noise_magnitude >= 0.")
    smooth = _denoised(check_explain(explain, "smooth_mprt"), nr_samples, noise_magnitude,
                       seed, sampling.batch_size)
    # smooth explains its noisy copies in chunks itself; MPRT must hand it all N images at
    # once (no chunking there), since the noise of a call is drawn for the whole batch
    return model_parameter_randomisation(
        model, x, y, None, explain=smooth, order=order, layers=layers, measures=measures,
        steps=steps, keep_maps=keep_maps,
        sampling=Sampling(seed=seed, batch_size=2**62, progress=sampling.progress))


def discrete_entropy(maps: Tensor, n_bins: int = 100) -> Tensor:
    """Per sample, the entropy (natural log) of the histogram of the map's values in ``n_bins``
    equal bins over its own range (``numpy.histogram`` then ``scipy.stats.entropy``, as
    Quantus' ``discrete_entropy``); 0 for a constant map."""
    flat = _pixel_maps(maps).flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    width = (high - low).clamp_min(1e-300)
    index = ((flat - low) / width * n_bins).floor().long().clamp(0, n_bins - 1)
    counts = torch.zeros(flat.shape[0], n_bins, dtype=torch.float64, device=flat.device)
    counts.scatter_add_(1, index, torch.ones_like(flat))
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log(p.where(p > 0, torch.ones_like(p)))).sum(1)


@register_metric(family="randomisation", direction="higher", needs=("model", "explain"),
                 rows=("emprt",))
def efficient_mprt(
    model: nn.Module,
    x: Any,
    y: Any,
    attributions: Any = None,
    masks: Any = None,
    explain: Explain | None = None,
    *,
    n_bins: int = 100,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> Tensor:
    """Efficient MPRT (Hedström et al., 2023; Quantus' ``EfficientMPRT``): the relative rise
    in the maps' complexity when every layer of the model is randomised,
    ``(H(random) - H(original)) / H(original)`` with ``H`` the :func:`discrete_entropy` of a
    map. Higher is better: a map of a random model should be noise. One explanation of the
    fully randomised copy (the layers re-drawn from the input up, as Quantus). Quantus chooses
    the number of bins from the data when not given; we use ``n_bins`` (Quantus' default
    100). A constant original map gives NaN. ``sampling``: the seed of the re-drawn layers and
    the explain calls' batch size, as :func:`model_parameter_randomisation`.
    """
    return model_parameter_randomisation(
        model, x, y, attributions, explain=explain, order="bottom_up", measures=(), steps=1,
        keep_maps=True,
        sampling=sampling_of(sampling, options, "efficient_mprt")).entropy_rise(n_bins)
