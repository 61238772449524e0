"""The manipulation attack at full size on one pair of images: time and scores per method.

    python bench/bench_attack.py [--model fmnist-vgg-relu] [--methods srd,saliency,lrp_zplus]
                                 [--iterations 1500] [--lr 2e-4] [--samples 0,1]

The images (cluttered Fashion-MNIST test canvases) are each other's targets, as in the bench
experiment ``attack``; the authors' defaults (Adam, 1500 steps of 2e-4, loss weights 1e11 and
1e6), clamped to the normalised image of [0, 1] pixels. Prints the wall time of each attack and
the per-image scores (similarity of the manipulated map to the target and to the original map,
whether the prediction was kept, the image change).
"""

from __future__ import annotations

import argparse
import time

import torch

from srdxai.data.fashion import ClutteredFashionMNIST, normalize
from srdxai.models import load, model_info
from srdxai.robustness import manipulate

SHOWN = ("pcc_to_target", "ssim_to_target", "pcc_to_original", "prediction_kept", "linf",
         "psnr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vgg-relu")
    parser.add_argument("--methods", default="srd,saliency,lrp_zplus")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--samples", default="0,1")
    args = parser.parse_args()
    model = load(args.model).eval()
    samples = [int(s) for s in args.samples.split(",")]
    x = normalize(ClutteredFashionMNIST("test").batch(samples).images)
    info = model_info(args.model)
    low = [-m / s for m, s in zip(info.mean, info.std, strict=True)]
    high = [(1 - m) / s for m, s in zip(info.mean, info.std, strict=True)]
    print(f"{args.model}, samples {samples}, {args.iterations} steps of lr {args.lr}, "
          f"{torch.get_num_threads()} threads")
    for method in args.methods.split(","):
        start = time.perf_counter()
        result = manipulate(model, x, method, target_image=x.roll(1, 0),
                            iterations=args.iterations, lr=args.lr, bounds=(low, high))
        seconds = time.perf_counter() - start
        scores = "  ".join(f"{k} " + "/".join(f"{float(v):.3f}" for v in result.scores[k])
                           for k in SHOWN)
        print(f"{method:14s} {seconds:7.1f} s  loss {result.losses[0]:.3g} -> "
              f"{result.losses[-1]:.3g}  {scores}", flush=True)


if __name__ == "__main__":
    main()
