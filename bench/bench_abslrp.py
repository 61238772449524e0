"""absLRP cost relative to one plain gradient, measured in one run.

    python bench/bench_abslrp.py [--models vgg16,vit_b16] [--batch 8] [--rounds 3]

Random weights in the VGG16 / ResNet50 architectures of ``srdxai.models.torchvision_arch`` and
the ViT-B/16 of ``srdxai.models.zoo`` (timm's ``vit_base_patch16_224`` shapes), 224 x 224.
Prints, per model, the minimum and median wall time of a plain PyTorch input gradient (no
srdxai), of absLRP with ``contrastive=False`` (one forward, one backward) and with its default
contrastive output relevance (one forward, two backward passes), and their ratios to the plain
gradient (target for absLRP: <= 3.0x). On 2 CPU cores single calls vary by up to 3x from run to
run (fresh large allocations are page-faulted in each time), so the minimum is the steadier
figure.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import torch

import srdxai
from bench_srd import randomize_bn, timed_blocks
from srdxai.models.torchvision_arch import resnet50, vgg16
from srdxai.models.zoo import vit_base_patch16_224

MODELS = {"vgg16": vgg16, "resnet50": resnet50, "vit_b16": vit_base_patch16_224}


def bench_model(name: str, args: argparse.Namespace, sync) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval().to(args.device)
    randomize_bn(model)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    target = torch.randint(0, 1000, (args.batch,), device=args.device)

    def plain_gradient():
        xx = x.clone().requires_grad_(True)
        out = model(xx)
        torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)
        sync()

    def abslrp():
        srdxai.explain(model, x, target=target, method="abslrp")
        sync()

    def abslrp_single():
        srdxai.explain(model, x, target=target, method="abslrp", contrastive=False)
        sync()

    times = timed_blocks({"plain gradient (torch)": plain_gradient,
                          "absLRP (contrastive=False)": abslrp_single,
                          "absLRP (contrastive)": abslrp}, args.rounds)
    base_min = min(times["plain gradient (torch)"])
    base_med = statistics.median(times["plain gradient (torch)"])
    for label, ts in times.items():
        lo, med = min(ts), statistics.median(ts)
        print(f"{name:9s} {label:28s} {lo:8.3f} {med:8.3f} {lo / base_min:10.2f}x "
              f"{med / base_med:13.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,vit_b16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.rows_only:
        bench_model(args.models, args, sync)
        return
    print(f"batch={args.batch} size=224 device={args.device} threads={torch.get_num_threads()}"
          f" rounds={args.rounds} (seconds; ratios to the plain gradient)")
    print(f"{'':38s} {'min':>8s} {'median':>8s} {'ratio(min)':>11s} {'ratio(median)':>14s}")
    names = args.models.split(",")
    if len(names) == 1:
        bench_model(names[0], args, sync)
    else:
        # one process per model: what a model's run leaves in the C allocator's heap slows
        # the next model's page faults unevenly (see bench_all.plain_gradient_rows)
        for name in names:
            done = subprocess.run(
                [sys.executable, __file__, "--models", name, "--batch", str(args.batch),
                 "--rounds", str(args.rounds), "--device", args.device, "--rows-only"],
                check=True, capture_output=True, text=True)
            print(done.stdout, end="")
    print("target: absLRP <= 3.0x the plain gradient")


if __name__ == "__main__":
    main()
