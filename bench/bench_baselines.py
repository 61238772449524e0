"""Our gradient baselines against Captum, measured in one run.

    python bench/bench_baselines.py [--model resnet50] [--batch 8] [--size 224] [--rounds 3]

Random weights (torchvision architecture), the same inputs, targets and internal batch size
for both libraries. Prints each method's median time and ours / Captum (target <= 1.0x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import srdxai
from srdxai.models.torchvision_arch import resnet18, resnet50, vgg16

MODELS = {"resnet50": resnet50, "resnet18": resnet18, "vgg16": vgg16}


def median_time(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--internal-batch-size", type=int, default=64)
    args = parser.parse_args()
    try:
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    except ImportError:
        raise SystemExit("captum is not installed: make venv (it is a test dependency)") from None

    torch.manual_seed(0)
    model = MODELS[args.model]().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch,))
    ibs = args.internal_batch_size

    rows = []
    ours = median_time(lambda: srdxai.explain(
        model, x, target, "integrated_gradients", steps=args.steps,
        internal_batch_size=ibs, channel_reduce="none"), args.rounds)
    theirs = median_time(lambda: IntegratedGradients(model).attribute(
        x, target=target, n_steps=args.steps, internal_batch_size=ibs), args.rounds)
    rows.append((f"IG ({args.steps} steps)", ours, theirs))
    ours = median_time(lambda: srdxai.explain(
        model, x, target, "smoothgrad", samples=args.samples, stdev=0.15,
        internal_batch_size=ibs, channel_reduce="none"), args.rounds)
    theirs = median_time(lambda: NoiseTunnel(Saliency(model)).attribute(
        x, target=target, nt_type="smoothgrad", nt_samples=args.samples, stdevs=0.15,
        nt_samples_batch_size=max(1, ibs // args.batch), abs=False), args.rounds)
    rows.append((f"SmoothGrad ({args.samples} samples)", ours, theirs))

    print(f"model={args.model} batch={args.batch} size={args.size} "
          f"internal_batch_size={ibs} threads={torch.get_num_threads()} "
          f"rounds={args.rounds} (median seconds)")
    print(f"{'method':28s} {'srdxai':>8s} {'captum':>8s} {'ours/captum':>12s}")
    for name, a, b in rows:
        print(f"{name:28s} {a:8.2f} {b:8.2f} {a / b:11.2f}x")
    print("targets: <= 1.0x")


if __name__ == "__main__":
    main()
