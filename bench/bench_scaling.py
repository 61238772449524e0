"""How SRD and integrated gradients scale: time and peak memory against batch size and image
size, as a figure and a Markdown table.

    python bench/bench_scaling.py [--model resnet50] [--batches 1,2,4,8,16,32,64]
                                  [--sizes 64,112,224,336,448] [--ig-steps 16]
                                  [--out out/bench/scaling] [--device cpu]

Every point runs in a fresh process (so one point's memory does not count for the next) on a
random-weight torchvision-architecture model: batch sizes at 224 x 224, image sizes at batch
8. Peak memory is the process's peak resident set minus its size before the call (CPU), or
``torch.cuda.max_memory_allocated`` minus the memory before the call (GPU); time is one call
after a warm-up call. The plain input gradient is measured alongside as the reference. IG runs
its ``--ig-steps`` path points in one pass per call (its default ``internal_batch_size``), so
its memory grows with batch x steps; ``memory_budget`` or ``internal_batch_size`` bound it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import srdxai
from srdxai.models.torchvision_arch import resnet18, resnet50, vgg16

MODELS = {"resnet50": resnet50, "resnet18": resnet18, "vgg16": vgg16}
METHODS = ("gradient", "srd", "integrated_gradients")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(model_name: str, method: str, batch: int, size: int, steps: int,
            device: str) -> dict:
    """One point, in this process: seconds of one call after a warm-up, and peak bytes."""
    torch.manual_seed(0)
    model = MODELS[model_name]().eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    options = {"steps": steps} if method == "integrated_gradients" else {}
    if method == "srd":
        options["seed"] = "gradcam" if model_name.startswith("vgg") else "logit"

    def call() -> None:
        srdxai.explain(model, x, target, method, **options)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes()
        call()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    start = time.perf_counter()
    call()
    return {"method": method, "batch": batch, "size": size,
            "seconds": time.perf_counter() - start, "peak_bytes": max(0, peak)}


def run_point(args: argparse.Namespace, method: str, batch: int, size: int) -> dict:
    command = [sys.executable, __file__, "--point", f"{method},{batch},{size}", "--model",
               args.model, "--ig-steps", str(args.ig_steps), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        return {"method": method, "batch": batch, "size": size, "seconds": None,
                "peak_bytes": None, "error": tail[0][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def figure(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), layout="constrained")
    for col, (axis, fixed) in enumerate((("batch", ("size", 224)), ("size", ("batch", 8)))):
        for method in METHODS:
            rows = sorted((p for p in points if p["method"] == method
                           and p[fixed[0]] == fixed[1] and p["seconds"] is not None),
                          key=lambda p: p[axis])
            xs = [p[axis] for p in rows]
            axes[0][col].plot(xs, [p["seconds"] for p in rows], "o-", label=method)
            axes[1][col].plot(xs, [p["peak_bytes"] / 2**30 for p in rows], "o-", label=method)
        for row, label in ((0, "seconds per call"), (1, "peak memory [GiB]")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{axis} ({fixed[0]} {fixed[1]})")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def markdown(points: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "| method | batch | size | seconds | peak memory [MiB] |",
             "|---|---:|---:|---:|---:|"]
    for p in points:
        if p["seconds"] is None:
            lines.append(f"| {p['method']} | {p['batch']} | {p['size']} | failed: "
                         f"{p.get('error', '?')} | |")
        else:
            lines.append(f"| {p['method']} | {p['batch']} | {p['size']} | {p['seconds']:.3f} "
                         f"| {p['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--sizes", default="64,112,224,336,448")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("out/bench/scaling"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # method,batch,size: one point
    args = parser.parse_args()
    if args.point:
        method, batch, size = args.point.split(",")
        print(json.dumps(measure(args.model, method, int(batch), int(size), args.ig_steps,
                                 args.device)))
        return
    grid = sorted({(b, 224) for b in map(int, args.batches.split(","))}
                  | {(8, s) for s in map(int, args.sizes.split(","))})
    points = []
    for method in METHODS:
        for batch, size in grid:
            point = run_point(args, method, batch, size)
            points.append(point)
            shown = ("failed: " + point["error"]) if point["seconds"] is None else (
                f"{point['seconds']:.3f} s, {point['peak_bytes'] / 2**20:.0f} MiB")
            print(f"{method:22s} batch {batch:3d} size {size:3d}: {shown}", flush=True)
    title = (f"{args.model}, random weights, {args.device}, {torch.get_num_threads()} threads, "
             f"IG {args.ig_steps} steps")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.md").write_text(markdown(points, title))
    figure(points, args.out / "scaling.png", title)
    print(f"written: {args.out / 'scaling.md'}, {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
