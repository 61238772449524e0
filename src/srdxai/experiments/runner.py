"""``srdxai bench``: the seeds' experiments on the offline models, resumable and sharded.

A run is a list of *units* (experiment, model, method, batch of samples), enumerated in one
fixed order from the configuration. Each process (``torchrun`` rank) takes every
``world_size``-th unit, skips those its database already holds (resume), and writes each
finished unit atomically (``store.py``). The random draws of a unit depend only on the run seed,
the experiment, the model and the batch, never on the method or on which process runs it, so
every method sees the same perturbations and a sharded run computes what one process does.
When all ranks are done, rank 0 merges their databases into ``results.sqlite``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from .protocol import Protocol, pixels_at
from .store import Curve, ResultStore, Row, Unit, merge, rank_path

Tensor = torch.Tensor

#: Table 2's rows: (display name, srdxai method, options; ``layer`` goes to ``explain``)
TABLE2_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("Saliency", "saliency", {}),
    ("GuidedBackprop", "guided_backprop", {}),
    ("GradInput", "gradient_x_input", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("LRP-z+", "lrp_zplus", {}),
    # Captum 0.6's NoiseTunnel(Saliency) defaults: |gradient|, 5 samples, sigma 1.0 in input
    # units; the SmoothGrad the paper most likely ran (reference/SRD.md section 8)
    ("SmoothGrad-abs", "smoothgrad", {"absolute": True, "samples": 5, "stdev": 1.0}),
    # Smilkov et al.'s signed mean gradient (25 samples, 15 % noise): not the paper's row
    ("SmoothGrad-signed", "smoothgrad", {}),
    ("FullGrad", "fullgrad", {}),
    ("GradCAM", "gradcam", {}),
    ("GradCAM++", "gradcam_pp", {}),
    ("ScoreCAM", "scorecam", {}),
    ("AblationCAM", "ablationcam", {}),
    ("XGradCAM", "xgradcam", {}),
    ("LayerCAM-low", "layercam", {"layer": "low"}),
    ("LayerCAM-high", "layercam", {"layer": "high"}),
    ("SRD-low", "srd", {"layer": "low"}),
    ("SRD-high", "srd", {"layer": "high"}),
    ("SRD-input", "srd", {}),
    ("absLRP", "abslrp", {}),
]
#: method options that keep ``--quick`` quick (the full run uses each method's defaults)
QUICK_OPTIONS = {"integrated_gradients": {"steps": 16}, "smoothgrad": {"samples": 8}}
ACTIVATIONS = ("relu", "elu", "leaky_relu", "silu", "gelu", "tanh")
#: Ancona et al.'s methods for Sensitivity-n (the occlusion window is set per dataset)
SENSITIVITY_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("Saliency", "saliency", {}),
    ("GradInput", "gradient_x_input", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("epsilon-LRP", "epsilon_lrp", {}),
    ("DeepLIFT-Rescale", "deeplift_rescale", {}),
    ("Occlusion", "occlusion", {}),
    ("SRD-input", "srd", {}),
    ("absLRP", "abslrp", {}),
]
GAE_CNN_METHODS = [m for m in TABLE2_METHODS if m[0] in (
    "Saliency", "GradInput", "IntegratedGradients", "LRP-z+", "GradCAM", "LayerCAM-high",
    "SRD-high", "SRD-input", "absLRP")]
GAE_VIT_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("Saliency", "saliency", {}),
    ("GradInput", "gradient_x_input", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("AttnLRP", "attnlrp", {}),
    ("CP-LRP", "cp_lrp", {}),
    ("AttentionRollout", "attention_rollout", {}),
    ("TransformerAttribution", "transformer_attribution", {}),
    ("SRD-tokens", "srd_tokens", {}),
    ("absLRP", "abslrp", {}),
]
#: the manipulation attack's rows: the methods of SRD's robustness figure, absLRP and Grad-CAM
#: (the attack sums |map| over channels: saliency's is Dombrowski et al.'s gradient map)
ATTACK_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("Gradient", "saliency", {}),
    ("GradInput", "gradient_x_input", {}),
    ("GuidedBackprop", "guided_backprop", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("LRP-z+", "lrp_zplus", {}),
    ("SRD-input", "srd", {}),
    ("absLRP", "abslrp", {}),
    ("GradCAM", "gradcam", {}),
]
#: (iterations, Adam learning rate): the authors' 1500 steps of 2e-4, and a quick run that
#: takes 30x fewer, 30x larger steps (the same total step budget)
ATTACK_SCHEDULE = {False: (1500, 2e-4), True: (50, 6e-3)}
#: images attacked per model (each batch's targets are its own images, rotated by one)
ATTACK_SAMPLES = {False: 16, True: 2}
#: the randomisation sanity checks' rows: the gradient family (Guided Backprop is the method
#: Adebayo et al. found to fail), LRP-z+, SmoothGrad, Grad-CAM, SRD and absLRP
RANDOMISATION_METHODS = [m for m in TABLE2_METHODS if m[0] in (
    "Saliency", "GuidedBackprop", "GradInput", "IntegratedGradients", "LRP-z+",
    "SmoothGrad-abs", "GradCAM", "SRD-high", "SRD-input", "absLRP")]
#: at most this many cascading steps (groups of consecutive layers on deeper models)
RANDOMISATION_STEPS = 16
EXPERIMENTS = ("table2", "activation", "sensitivity_n", "insertion_deletion", "gae", "noise",
               "apop", "attack", "grid", "randomisation")
#: Gaussian input noise of the ``noise`` experiment, in units of each image's value range
NOISE_LEVELS = (0.05, 0.1, 0.2)


@dataclass
class BenchConfig:
    """Everything that determines a run's numbers (hashed; a resumed run must match)."""

    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    quick: bool = False
    seed: int = 0
    batch_size: int = 8
    samples: int | None = None  # per model; default 32 (quick) / 256 (fashion), 96 (composites)
    device: str = "cpu"
    #: how Table 2 and the activation table score maps (fidelity protocol and its variants,
    #: MuFidelity, pointing tolerance, stability draws)
    protocol: Protocol = field(default_factory=Protocol)
    #: only the models matching one of these names or fnmatch patterns (None: all)
    models: list[str] | None = None

    def sizes(self, dataset: str) -> int:
        if self.samples is not None:
            return self.samples
        if self.quick:
            return 32
        return 96 if dataset == "composites" else 256

    @property
    def fidelity_runs(self) -> int:
        return 50 if self.quick else 100

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.public(), sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("device")  # where it runs does not change what it computes
        d["protocol"] = self.protocol.public()
        return d


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    from .. import __version__

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent)
        if head.returncode == 0 and head.stdout.strip():
            return f"{__version__}+g{head.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


# --- data -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A model and the masked data it is evaluated on."""

    model: str
    dataset: str  # "fashion" or "composites"


@cache
def _model(name: str, device: str) -> torch.nn.Module:
    from ..models import load

    return load(name).eval().to(device)


@cache
def _dataset(name: str) -> Any:
    if name == "fashion":
        from ..data.fashion import ClutteredFashionMNIST

        return ClutteredFashionMNIST("test")
    from ..data.composites import ImageNetComposites

    return ImageNetComposites()


def load_batch(source: Source, indices: list[int], device: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Model inputs, labels and object masks of ``indices``."""
    if source.dataset == "fashion":
        from ..data.fashion import normalize

        b = _dataset("fashion").batch(indices)
        x, y, masks = normalize(b.images), b.labels, b.masks
    else:
        from ..models import preprocess

        b = _dataset("composites").batch(indices)
        x = torch.cat([preprocess(img, source.model) for img in b.images])
        y, masks = b.labels, b.masks
    return x.to(device), y.to(device), masks.to(device)


def sources(experiment: str, config: BenchConfig) -> list[Source]:
    """The models (and data) of ``experiment``, narrowed to ``config.models``."""
    found = _all_sources(experiment, config)
    if config.models is None:
        return found
    return [s for s in found if any(fnmatch.fnmatchcase(s.model, p) for p in config.models)]


#: Table 2 rows left out on EfficientNet-Lite0 with ``--quick``: each map costs one forward
#: pass per channel of the last convolution (1280), 10 minutes per 32 images on 2 cores
QUICK_SKIPPED_ON_IMAGENET = ("ScoreCAM", "AblationCAM")


def heavy_quick(config: BenchConfig, source: Source) -> bool:
    """``--quick`` on the ImageNet composites: Table 2 scores the default fidelity, MuFidelity
    and the localisation and complexity metrics, without variants, stability or the
    :data:`QUICK_SKIPPED_ON_IMAGENET` rows, so that the quick run stays in minutes."""
    return config.quick and source.dataset == "composites"


def _all_sources(experiment: str, config: BenchConfig) -> list[Source]:
    if experiment == "table2":
        return [Source("fmnist-vgg-relu", "fashion"), Source("fmnist-resnet-relu", "fashion"),
                Source("efficientnet-lite0", "composites")]
    if experiment == "activation":
        return [Source(f"fmnist-resnet-{a}", "fashion") for a in ACTIVATIONS]
    if experiment in ("grid", "sensitivity_n", "insertion_deletion", "noise", "attack",
                      "randomisation"):
        # the quick run keeps these on the two Fashion-MNIST CNNs
        found = _all_sources("table2", config)
        return [s for s in found if not heavy_quick(config, s)]
    if experiment == "gae":
        return _all_sources("grid", config) + [Source("fmnist-vit-gelu", "fashion")]
    if experiment == "apop":
        found = _all_sources("activation", config)
        return found + [src for src in _all_sources("grid", config) if src not in found]
    raise InvalidInputError(f"unknown experiment {experiment!r}; choose from {EXPERIMENTS}.")


# --- units ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    unit: Unit
    source: Source
    method: str  # srdxai method name ("-": the model's own accuracy)
    options: tuple[tuple[str, Any], ...]
    samples: tuple[int, ...]


def method_options(method: str, options: dict[str, Any], quick: bool) -> dict[str, Any]:
    """A row's options for ``explain``: its own, over the ``--quick`` ones of its method."""
    return {**(QUICK_OPTIONS.get(method, {}) if quick else {}), **options}


def jobs(config: BenchConfig) -> list[Job]:
    """Every unit of the run, in the one fixed order all ranks agree on."""
    out: list[Job] = []
    for experiment in config.experiments:
        for source in sources(experiment, config):
            if experiment == "grid":  # one figure per image: every Table-2 method
                for k in range(2 if config.quick else 4):
                    out.append(Job(Unit(experiment, source.model, "all", k), source, "all",
                                   (), (k,)))
                continue
            n = config.sizes(source.dataset)
            if experiment != "table2" and experiment != "activation":
                n = max(4, n // 2)  # the curve experiments cost more per sample
            step = config.batch_size
            if experiment == "attack":  # 1500 differentiable maps per image (full size)
                n = min(config.sizes(source.dataset), ATTACK_SAMPLES[config.quick])
                step = max(2, step)
            if experiment == "gae":  # groups of four images
                n, step = n - n % 4, max(4, step - step % 4)
            if experiment == "randomisation":  # one explanation per randomised layer
                n = min(n, 8 if config.quick else 32)
            batches = [tuple(range(i, min(i + step, n))) for i in range(0, n, step)]
            methods = methods_for(experiment, source)
            if experiment == "table2" and heavy_quick(config, source):
                methods = [m for m in methods if m[0] not in QUICK_SKIPPED_ON_IMAGENET]
            for label, method, options in methods:
                opts = method_options(method, options, config.quick)
                for k, samples in enumerate(batches):
                    out.append(Job(Unit(experiment, source.model, label, k), source, method,
                                   tuple(sorted(opts.items())), samples))
    return out


def methods_for(experiment: str, source: Source) -> list[tuple[str, str, dict[str, Any]]]:
    """The rows of an experiment on one model."""
    if experiment == "activation":
        return [("-", "-", {})] + list(TABLE2_METHODS)
    if experiment == "sensitivity_n":
        window = 4 if source.dataset == "fashion" else 16  # Occlusion-1 costs H*W passes
        return [(label, m, {"window": window, "stride": window} if m == "occlusion" else o)
                for label, m, o in SENSITIVITY_METHODS]
    if experiment == "gae":
        return list(GAE_VIT_METHODS if "vit" in source.model else GAE_CNN_METHODS)
    if experiment == "apop":
        return [("-", "apop", {})]
    if experiment == "attack":
        return list(ATTACK_METHODS)
    if experiment == "randomisation":
        return list(RANDOMISATION_METHODS)
    return list(TABLE2_METHODS)


def unit_seed(config: BenchConfig, job: Job) -> int:
    """The seed of a unit's random draws: the same for every method and every sharding."""
    key = f"{config.seed}/{job.unit.experiment}/{job.unit.model}/{job.unit.unit}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def run_job(job: Job, config: BenchConfig
            ) -> tuple[list[Row], dict[str, bytes], list[Curve]]:
    """The metric rows of one unit, its figures (PNG bytes by artifact name) and curves."""
    from .. import explain, metrics

    model = _model(job.source.model, config.device)
    x, y, masks = load_batch(job.source, list(job.samples), config.device)
    if job.method == "all":
        grid = _grid(job, model, x, y, config.quick)
        return [], {f"grid/{job.source.model}/{job.samples[0]}": grid}, []
    if job.method == "apop":  # the model-level APOP experiment
        from ..robustness import apop

        seed = unit_seed(config, job)
        rows = []
        for baseline in ("zeros", "noise", "other"):
            result = apop(model, x, y, baseline, seed=seed) if (
                baseline != "other" or len(job.samples) > 1) else None
            if result is None:
                continue
            if baseline == "zeros":
                rows += [Row("accuracy", s, float(c))
                         for s, c in zip(job.samples, result.correct.tolist(), strict=True)]
            rows += [Row(f"apop_{baseline}", s, float(r))
                     for s, r in zip(job.samples, result.recovered.tolist(), strict=True)]
        return rows, {}, []
    if job.method == "-":  # the model's own accuracy on these samples
        with torch.no_grad():
            correct = (model(x).argmax(1) == y).double()
        return [Row("accuracy", s, float(c))
                for s, c in zip(job.samples, correct, strict=True)], {}, []
    options = dict(job.options)

    def method_fn(m: torch.nn.Module, xx: Tensor, yy: Tensor) -> Tensor:
        return explain(m, xx, yy, job.method, **options)

    seed = unit_seed(config, job)
    experiment = job.unit.experiment
    if experiment == "attack":
        return _attack_rows(job, model, x, config.quick)
    if experiment == "gae":
        result = metrics.gae(model, x, y, explain=method_fn, seed=seed)
        firsts = job.samples[::4]
        rows = []
        for metric in ("gae", "local_consistency", "contrastiveness", "faithfulness",
                       "robustness"):
            values = getattr(result, metric).tolist()
            name = metric if metric in ("gae", "local_consistency", "contrastiveness") else (
                f"gae_{metric}")
            rows += [Row(name, s, float(v)) for s, v in zip(firsts, values, strict=True)]
        return rows, {}, []
    maps = method_fn(model, x, y).detach()
    if experiment == "randomisation":
        return _randomisation_rows(job, model, x, y, maps, method_fn, seed)
    if experiment == "sensitivity_n":
        result = metrics.sensitivity_n(model, x, y, maps, nr_subsets=config.fidelity_runs,
                                       seed=seed)
        grid = result.n_grid.tolist()
        curves = [Curve("sensitivity_n", s, grid, c)
                  for s, c in zip(job.samples, result.curve.tolist(), strict=True)]
        means = torch.nanmean(result.curve, dim=1).tolist()
        return [Row("sensitivity_n_mean", s, float(v))
                for s, v in zip(job.samples, means, strict=True)], {}, curves
    if experiment == "noise":
        return _noise_rows(job, model, x, y, maps, method_fn, seed), {}, []
    if experiment == "insertion_deletion":
        rows, curves = [], []
        for name, fn in (("insertion", metrics.insertion), ("deletion", metrics.deletion)):
            result = fn(model, x, y, maps)
            fractions = result.fractions.tolist()
            curves += [Curve(name, s, fractions, c)
                       for s, c in zip(job.samples, result.curve.tolist(), strict=True)]
            rows += [Row(f"auc_{name}", s, float(v))
                     for s, v in zip(job.samples, result.auc.tolist(), strict=True)]
        return rows, {}, curves
    scores = protocol_scores(config, experiment, model, x, y, maps, masks, method_fn, seed,
                             heavy_quick(config, job.source))
    rows = []
    for metric, values in scores.items():
        for s, v in zip(job.samples, values.tolist(), strict=True):
            rows.append(Row(metric, s, float(v)))
    return rows, {}, []


def protocol_scores(config: BenchConfig, experiment: str, model: torch.nn.Module, x: Tensor,
                    y: Tensor, maps: Tensor, masks: Tensor,
                    method_fn: Callable[[torch.nn.Module, Tensor, Tensor], Tensor],
                    seed: int, reduced: bool = False) -> dict[str, Tensor]:
    """Table 2's metrics under the run's protocol: ``fidelity`` (the default protocol),
    ``fidelity[variant]`` for each variant and ``mufidelity`` from the same maps, the strict and
    the tolerant pointing game, attribution localisation, sparseness and stability. The
    activation table scores ``fidelity`` and ``mufidelity`` only (its variants would multiply
    six models' cost). ``reduced`` (see :func:`heavy_quick`) leaves out the variants and
    stability."""
    from .. import metrics

    protocol = config.protocol
    if reduced or experiment != "table2":
        protocol = replace(protocol, variants=())
    height, width = x.shape[-2:]
    scores: dict[str, Tensor] = {}
    for perturbation, readings in protocol.fidelity_groups(height, width, config.quick):
        scores.update(metrics.faithfulness_correlations(model, x, y, maps, seed=seed,
                                                        readings=readings, **perturbation))
    scores["mufidelity"] = metrics.mu_fidelity(model, x, y, maps, seed=seed,
                                               **protocol.mufidelity.options(config.quick))
    if experiment == "table2":
        scores["pointing_game"] = metrics.pointing_game(model, x, y, maps, masks)
        tolerance = pixels_at(protocol.pointing_tolerance, max(height, width))
        scores[f"pointing_game_{protocol.pointing_tolerance}px"] = metrics.pointing_game(
            model, x, y, maps, masks, tolerance=tolerance)
        scores["attribution_localisation"] = metrics.attribution_localisation(
            model, x, y, maps, masks)
        scores["sparseness"] = metrics.sparseness(model, x, y, maps)
        if reduced:
            return scores
        scores["stability"] = metrics.local_lipschitz_estimate(
            model, x, y, maps, explain=method_fn, nr_samples=protocol.draws(config.quick),
            seed=seed)
    return scores


def _randomisation_rows(job: Job, model: torch.nn.Module, x: Tensor, y: Tensor, maps: Tensor,
                        method_fn: Callable[[torch.nn.Module, Tensor, Tensor], Tensor],
                        seed: int) -> tuple[list[Row], dict[str, bytes], list[Curve]]:
    """The cascading MPRT (similarity to the original map after randomising the layers from the
    output down: the fully random model's per sample, the curve over the layers) and the
    random-logit test; the first batch also gives the figure of one image's maps degrading."""
    from .. import metrics

    result = metrics.model_parameter_randomisation(model, x, y, maps, explain=method_fn,
                                                   steps=RANDOMISATION_STEPS, seed=seed,
                                                   keep_maps=True)
    steps = list(range(1, len(result.layers) + 1))
    rows, curves = [], []
    for measure, values in result.similarity.items():
        rows += [Row(f"mprt_{measure}", s, float(v))
                 for s, v in zip(job.samples, values[-1].tolist(), strict=True)]
        curves += [Curve(f"mprt_{measure}", s, steps, c)
                   for s, c in zip(job.samples, values.T.tolist(), strict=True)]
    logit = metrics.random_logit(model, x, y, maps, explain=method_fn, seed=seed)
    rows += [Row("random_logit_ssim", s, float(v))
             for s, v in zip(job.samples, logit.tolist(), strict=True)]
    # efficient MPRT from the cascading run's last step, the fully randomised model: no second
    # copy of the model and no second explanation of it
    rise = result.entropy_rise()
    rows += [Row("emprt", s, float(v)) for s, v in zip(job.samples, rise.tolist(), strict=True)]
    artifacts = {}
    if job.unit.unit == 0:
        artifacts[f"randomisation/{job.source.model}/{job.unit.method}"] = _cascade_figure(
            job, result)
    return rows, artifacts, curves


def _cascade_figure(job: Job, result: Any) -> bytes:
    """One image's map before and after each cascading randomisation step (at most 8 steps,
    evenly spaced, always the last), as PNG bytes."""
    import tempfile

    from ..report.figures import save_method_grid

    total = len(result.layers)
    picked = sorted({round(i * (total - 1) / 7) for i in range(8)} if total > 8
                    else set(range(total)))
    panels = {"original": result.original[0].float().numpy()}
    for k in picked:
        panels[f"{k + 1}: {result.layers[k]}"] = result.maps[k][0].float().numpy()
    signed = {name: bool((panel < 0).any()) for name, panel in panels.items()}
    image, _ = _display_image(job)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_method_grid(Path(tmp) / "cascade.png", image, panels,
                                f"{job.source.model}, {job.unit.method}: cascading "
                                f"randomisation (layers from the output), sample "
                                f"{job.samples[0]}", signed=signed, columns=5, dpi=70)
        return path.read_bytes()


def _display_image(job: Job) -> tuple[Any, str]:
    """The first image of a unit as ``uint8`` (H, W, 3), and its label's class name."""
    import numpy as np

    if job.source.dataset == "fashion":
        from ..data.fashion import CLASS_NAMES

        batch = _dataset("fashion").batch(list(job.samples[:1]))
        image = (batch.images[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255)
        return image.astype(np.uint8), CLASS_NAMES[int(batch.labels[0])]
    from ..data import imagenet_class_names

    batch = _dataset("composites").batch(list(job.samples[:1]))
    return batch.images[0], imagenet_class_names()[int(batch.labels[0])]


def _noise_rows(job: Job, model: torch.nn.Module, x: Tensor, y: Tensor, maps: Tensor,
                method_fn: Callable[[torch.nn.Module, Tensor, Tensor], Tensor],
                seed: int) -> list[Row]:
    """SSIM and Pearson correlation between the clean map and the map of a noisy copy, per
    noise level (maps as the attack compares them: |map| summed over channels, unit sum)."""
    from ..metrics.similarity import normalise_map, pearson, ssim

    g = torch.Generator(device="cpu").manual_seed(seed)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).reshape(-1, *[1] * (x.dim() - 1))
    clean = normalise_map(maps)
    rows = []
    for level in NOISE_LEVELS:
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        noisy = normalise_map(method_fn(model, x + level * span * noise, y).detach())
        for name, values in (("ssim", ssim(clean, noisy)), ("pcc", pearson(clean, noisy))):
            rows += [Row(f"{name}_noise_{level:g}", s, float(v))
                     for s, v in zip(job.samples, values.tolist(), strict=True)]
    return rows


def _attack_rows(job: Job, model: torch.nn.Module, x: Tensor, quick: bool
                 ) -> tuple[list[Row], dict[str, bytes], list[Curve]]:
    """The manipulation attack on a batch: each image's target map is the map of the next
    image in the batch (rotated by one); scores per image, and the figure of the first."""
    import tempfile

    import numpy as np

    from ..models import model_info
    from ..report.figures import save_attack_figure
    from ..robustness import manipulate

    if x.shape[0] < 2:
        raise InvalidInputError("the attack experiment needs batches of at least 2 images "
                                "(one's map is the other's target).")
    info = model_info(job.source.model)
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    iterations, lr = ATTACK_SCHEDULE[quick]
    result = manipulate(model, x, job.method, target_image=x.roll(1, 0),
                        iterations=iterations, lr=lr, bounds=(-mean / std, (1 - mean) / std),
                        **dict(job.options))
    rows = [Row(name, s, float(v)) for name, values in result.scores.items()
            for s, v in zip(job.samples, values.tolist(), strict=True)]

    def picture(t: Tensor) -> np.ndarray:
        pixels = (t * std[0] + mean[0]).clamp(0, 1).mul(255).round()
        return pixels.permute(1, 2, 0).to(torch.uint8).cpu().numpy()

    title = (f"{job.source.model}, {job.unit.method}, sample {job.samples[0]}: PCC to target "
             f"{float(result.scores['pcc_to_target'][0]):.2f}, to original "
             f"{float(result.scores['pcc_to_original'][0]):.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_attack_figure(
            Path(tmp) / "attack.png", picture(x[0]), result.original_map[0].cpu(),
            result.target_map[0].cpu(), picture(result.adversarial[0]),
            result.adversarial_map[0].cpu(), title)
        figure = path.read_bytes()
    name = f"attack/{job.source.model}/{job.unit.method}/{job.samples[0]}"
    return rows, {name: figure}, []


def _grid(job: Job, model: torch.nn.Module, x: Tensor, y: Tensor, quick: bool) -> bytes:
    """Every Table-2 method's map of one image, side by side, as PNG bytes."""
    import tempfile

    from .. import explain
    from ..methods import METHODS
    from ..report.figures import save_method_grid

    maps, signed = {}, {}
    for label, method, options in TABLE2_METHODS:
        opts = method_options(method, options, quick)
        maps[label] = explain(model, x, y, method, **opts)[0].detach().float().cpu().numpy()
        signed[label] = bool(getattr(METHODS[method], "signed", True))
    image, label = _display_image(job)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_method_grid(Path(tmp) / "grid.png", image, maps,
                                f"{job.source.model}, sample {job.samples[0]}, '{label}' "
                                f"(class {int(y[0])})", signed=signed, columns=6, dpi=70)
        return path.read_bytes()


# --- the run --------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    initialised: bool = False


def _distributed() -> Distributed:
    """torchrun's rank and world size; a gloo process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Distributed(rank, world, True)


def run(run_dir: Path, config: BenchConfig, progress: bool = True,
        stop_after: int | None = None) -> Path | None:
    """Run (or resume) the benchmark into ``run_dir``; returns the merged database on rank 0.

    ``stop_after``: finish at most that many new units and return without merging (used to
    test resuming)."""
    for experiment in config.experiments:
        if experiment not in EXPERIMENTS:
            raise InvalidInputError(
                f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}.")
    run_dir = Path(run_dir)
    dist = _distributed()
    if dist.world_size > 1 and config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    every = jobs(config)
    if not every:
        raise InvalidInputError(
            f"nothing to run: no model of {', '.join(config.experiments)} matches --models "
            f"{','.join(config.models or [])}.")
    mine = [j for i, j in enumerate(every) if i % dist.world_size == dist.rank]
    with ResultStore(rank_path(run_dir, dist.rank), config.public(), config.hash(),
                     code_version()) as store:
        todo = [j for j in mine if not store.done(j.unit)]
        done_now = 0
        for job in _progress(todo, progress and dist.rank == 0, len(mine) - len(todo),
                             len(mine)):
            if stop_after is not None and done_now >= stop_after:
                return None
            start = time.perf_counter()
            rows, artifacts, curves = run_job(job, config)
            store.write_unit(job.unit, unit_seed(config, job), dist.rank,
                             time.perf_counter() - start, rows, curves, artifacts=artifacts)
            done_now += 1
    if dist.initialised:
        import torch.distributed as tdist

        tdist.barrier()
    if dist.rank == 0:
        return merge(run_dir)
    return None


def _progress(items: list[Job], show: bool, already: int, total: int) -> Iterator[Job]:
    if not show:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=total, initial=already, desc="srdxai bench", unit="unit",
              dynamic_ncols=True) as bar:
        for item in items:
            bar.set_postfix_str(f"{item.unit.experiment} {item.unit.model} {item.unit.method}",
                                refresh=False)
            yield item
            bar.update(1)
