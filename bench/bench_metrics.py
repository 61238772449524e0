"""srdxai.metrics against Quantus 0.6: wall time of the same evaluation, measured in one run.

    python bench/bench_metrics.py [--quick] [--threads 1] [--batch 16] [--rounds 1]
                                  [--models small,effnet]

Each metric with the same settings in both libraries (per-sample normalisation, Quantus'
draws and ours differ but have the same size):

* faithfulness correlation, 100 runs of 224 features (``subset_size``) per sample;
* local Lipschitz estimate, 200 noise samples (saliency re-run on every noisy input);
* pixel flipping with an element map, 192 steps (Quantus needs H*W % features_in_step == 0);
* region perturbation (50 regions) and selectivity on an 8 x 8 grid of patches, infidelity
  with the same patches (Quantus removes them cumulatively, we one at a time: the same number
  of forward passes), monotonicity correlation (16 groups per channel x 10 noise draws),
  max-sensitivity and relative input stability (10 / 200 noise samples).

on a small CNN (3x32x32) and on EfficientNet-Lite0 (3x224x224), batch 16. ``--quick`` runs a
small size (batch 4; 3x16x16 and 3x64x64 inputs; 10 noise samples; 48 flipping steps) for a
shared or slow machine. Prints our time, Quantus' time, their ratio (target: ours / quantus
<= 0.1, i.e. >= 10x faster) and, for the deterministic pixel-flipping curves, the largest
difference between the two results. On a machine whose cores are busy with other jobs, pass
``--threads 1``: with several threads, oneDNN's threads stall on one another and both libraries'
timings swing by up to 10x.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import srdxai
from srdxai import metrics
from srdxai.engine import memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402


class SmallCNN(nn.Module):
    """Three 3x3 convs (16, 32, 32 channels; two with stride 2) -> GAP -> Linear(32 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def saliency(model, x, y):
    return srdxai.explain(model, x, y, "saliency")


def import_quantus():
    from _compat import import_torchvision

    import_torchvision()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import quantus
    return quantus


def quantus_scores(metric, model, x, y, a, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                                 a_batch=a.numpy() if a.dim() == 4 else a[:, None].numpy(),
                                 batch_size=x.shape[0], **kwargs), dtype=np.float64)


def bench_model(name: str, model: nn.Module, x: torch.Tensor, args, quantus) -> list[tuple]:
    per_sample = {"normalise_func_kwargs": {"normalise_axes": (1, 2, 3)},
                  "disable_warnings": True, "display_progressbar": False}
    with torch.no_grad():
        y = model(x).argmax(1)
    a = saliency(model, x, y)
    elements = srdxai.explain(model, x, y, "gradient_x_input", channel_reduce="none")
    pixels = x.shape[-1] * x.shape[-2]
    flip_step = x[0].numel() // args.flip_steps
    if pixels % flip_step:
        raise SystemExit(f"{args.flip_steps} steps do not fit Quantus' H*W % step rule")
    rows = []

    def timed(metric_name, ours_fn, theirs_fn, compare: bool = False):
        ours_s, ours_result = _timing.median_time(ours_fn, args.rounds)
        theirs_s, theirs_result = _timing.median_time(theirs_fn, args.rounds)
        difference = ""
        if compare:
            difference = f"{np.abs(np.asarray(ours_result) - theirs_result).max():.2g}"
        rows.append((name, metric_name, ours_s, theirs_s, difference))
        print(f"  {metric_name}: ours {ours_s:.3f} s, quantus {theirs_s:.3f} s", flush=True)

    subset = min(224, pixels // 2)
    timed(
        f"faithfulness_correlation ({args.runs} runs)",
        lambda: metrics.faithfulness_correlation(model, x, y, a, nr_runs=args.runs,
                                                 subset_size=subset),
        lambda: quantus_scores(quantus.FaithfulnessCorrelation(
            nr_runs=args.runs, subset_size=subset, return_aggregate=False, **per_sample),
            model, x, y, a),
    )
    timed(
        f"local_lipschitz_estimate ({args.lle_samples} samples)",
        lambda: metrics.local_lipschitz_estimate(model, x, y, a, explain=saliency,
                                                 nr_samples=args.lle_samples),
        lambda: quantus_scores(quantus.LocalLipschitzEstimate(
            nr_samples=args.lle_samples, **per_sample), model, x, y, a,
            explain_func=metrics.quantus_explain_func("saliency")),
    )
    timed(
        f"pixel_flipping ({args.flip_steps} steps)",
        lambda: metrics.pixel_flipping(model, x, y, elements,
                                       features_in_step=flip_step).curve.numpy(),
        lambda: quantus_scores(quantus.PixelFlipping(features_in_step=flip_step, **per_sample),
                               model, x, y, elements),
        compare=True,
    )
    # the metric families added later, each with Quantus 0.6's counterpart and the same
    # number of model evaluations (docs/metrics.md §7 lists where the definitions differ)
    patch = max(2, x.shape[-1] // 8)  # an 8 x 8 grid (Quantus crashes unless p divides H)
    regions = min(50, (x.shape[-1] // patch) ** 2)
    timed(
        f"region_perturbation ({regions} regions)",
        lambda: metrics.region_perturbation(model, x, y, a, patch_size=patch,
                                            regions_evaluation=regions).aopc,
        lambda: quantus_scores(quantus.RegionPerturbation(
            patch_size=patch, regions_evaluation=regions, **per_sample), model, x, y, a),
    )
    timed(
        f"selectivity ({patch} px patches)",
        lambda: metrics.selectivity(model, x, y, a, patch_size=patch).auc,
        lambda: quantus_scores(quantus.Selectivity(patch_size=patch, **per_sample),
                               model, x, y, a),
    )
    timed(
        f"infidelity ({patch} px patches)",
        lambda: metrics.infidelity(model, x, y, a, patch_sizes=patch),
        lambda: quantus_scores(quantus.Infidelity(perturb_patch_sizes=[patch], **per_sample),
                               model, x, y, a),
    )
    group = pixels // 16  # Quantus needs H*W % features_in_step == 0: 16 groups per channel
    timed(
        f"monotonicity_correlation ({x[0].numel() // group} groups x {args.mc_samples})",
        lambda: metrics.monotonicity_correlation(model, x, y, elements, features_in_step=group,
                                                 nr_samples=args.mc_samples),
        lambda: quantus_scores(quantus.MonotonicityCorrelation(
            nr_samples=args.mc_samples, features_in_step=group, **per_sample),
            model, x, y, elements),
    )
    for ours_metric, theirs_metric in ((metrics.max_sensitivity, quantus.MaxSensitivity),
                                       (metrics.relative_input_stability,
                                        quantus.RelativeInputStability)):
        timed(
            f"{ours_metric.__name__} ({args.lle_samples} samples)",
            lambda m=ours_metric: m(model, x, y, a, explain=saliency,
                                    nr_samples=args.lle_samples),
            lambda m=theirs_metric: quantus_scores(m(nr_samples=args.lle_samples, **per_sample),
                                                   model, x, y, a,
                                                   explain_func=metrics.quantus_explain_func(
                                                       "saliency")),
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a busy machine")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--models", default="small,effnet", help="comma-separated: small,effnet")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    # ours and Quantus alike: no pass faults its activations in again (engine.memory)
    memory.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (4 if args.quick else 16)
    args.runs = 100
    args.lle_samples = 10 if args.quick else 200
    args.flip_steps = 48 if args.quick else 192
    args.mc_samples = 2 if args.quick else 10
    sizes = {"small": 16 if args.quick else 32, "effnet": 64 if args.quick else 224}
    quantus = import_quantus()
    torch.manual_seed(0)
    rows = []
    for key in args.models.split(","):
        size = sizes[key]
        if key == "small":
            model, label = SmallCNN().eval(), f"small CNN 3x{size}x{size}"
        else:
            from srdxai.models import load

            model, label = load("efficientnet-lite0").eval(), f"EfficientNet-Lite0 3x{size}x{size}"
        x = torch.randn(args.batch, 3, size, size)
        print(f"{label}, batch {args.batch}:", flush=True)
        rows += bench_model(label, model, x, args, quantus)

    print()
    print(f"{'model':34} {'metric':38} {'ours [s]':>9} {'quantus [s]':>12} "
          f"{'ours/quantus':>13} {'speed-up':>9} {'max diff':>9}")
    for label, metric_name, ours_s, theirs_s, difference in rows:
        print(f"{label:34} {metric_name:38} {ours_s:9.3f} {theirs_s:12.3f} "
              f"{ours_s / theirs_s:13.3f} {theirs_s / ours_s:8.1f}x {difference:>9}")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, rounds={args.rounds}"
          f"{', --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
