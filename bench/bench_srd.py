"""SRD cost relative to one plain gradient, measured in one run.

    python bench/bench_srd.py [--model resnet50] [--batch 8] [--size 224] [--rounds 5]

Random weights in a torchvision-architecture ResNet50 (srdxai.models.torchvision_arch), with
BatchNorm statistics and shifts drawn at random so that every bias is non-zero, as in a trained
network (with all-zero biases SRD's bias-share pass would be skipped and look cheaper).

Prints the minimum and median wall time over repeated calls of: a plain PyTorch input
gradient (no srdxai), the same gradient through the srdxai engine, and SRD; and the ratios to
the plain gradient (target for SRD: <= 2.0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _timing  # the bench/ folder is on the path: run as a script or from bench_all
import srdxai
from srdxai.models.torchvision_arch import resnet18, resnet50, vgg16

MODELS = {"resnet50": resnet50, "resnet18": resnet18, "vgg16": vgg16}


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_((torch.rand(m.running_mean.shape, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.bias.data.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.2)


def timed_blocks(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Per function: one warm-up call, then ``rounds`` timed calls in a row (as timeit does;
    one after a warm-up longer than ``_timing.LONG_CALL_S``).

    Interleaving the methods instead makes each one pay for the previous one's memory churn
    (page faults on a freshly trimmed heap), which inflates everything by up to 2x here.
    """
    times: dict[str, list[float]] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        times[name] = []
        for _ in range(_timing.timed_rounds(time.perf_counter() - t0, rounds)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MODELS[args.model]().eval().to(args.device)
    randomize_bn(model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    target = torch.randint(0, 1000, (args.batch,), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def plain_gradient():
        xx = x.clone().requires_grad_(True)
        out = model(xx)
        torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)
        sync()

    x_cl = x.contiguous(memory_format=torch.channels_last)

    def plain_gradient_channels_last():
        xx = x_cl.clone().requires_grad_(True)
        out = model(xx)
        torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)
        sync()

    def engine_gradient():
        srdxai.explain(model, x, target=target, method="gradient")
        sync()

    seed = "gradcam" if args.model.startswith("vgg") else "logit"

    def srd():
        srdxai.explain(model, x, target=target, method="srd", seed=seed)
        sync()

    times = timed_blocks({"plain gradient (torch)": plain_gradient,
                          "plain gradient, NHWC input": plain_gradient_channels_last,
                          "gradient (srdxai engine)": engine_gradient,
                          f"SRD (seed={seed})": srd}, args.rounds)
    print(f"model={args.model} batch={args.batch} size={args.size} device={args.device} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} (seconds; ratios to the "
          "plain gradient)")
    base_min = min(times["plain gradient (torch)"])
    base_med = statistics.median(times["plain gradient (torch)"])
    print(f"{'':26s} {'min':>8s} {'median':>8s} {'ratio(min)':>11s} {'ratio(median)':>14s}")
    for name, ts in times.items():
        lo, med = min(ts), statistics.median(ts)
        print(f"{name:26s} {lo:8.3f} {med:8.3f} {lo / base_min:10.2f}x {med / base_med:13.2f}x")
    print("target: SRD <= 2.0x the plain gradient (the NCHW input users pass; srdxai runs its "
          "engine on a channels-last copy, so the NHWC row is the fastest plain gradient)")


if __name__ == "__main__":
    main()
