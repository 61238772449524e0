"""Every peer comparison issue 3 asks for, in one run, one table.

    python bench/bench_peers.py [--batch 8] [--size 224] [--rounds 1] [--steps 50]
                                [--only ig,smoothgrad,lrp,scorecam]

Integrated gradients (50 steps) and SmoothGrad (25 samples) against Captum, LRP EpsilonPlus
against zennit, and Score-CAM against pytorch-grad-cam (also with our bfloat16 masked passes),
on ResNet50 / VGG16 architectures with random weights, batch 8. Prints our time / the peer's
time (targets: <= 1.0x for IG, SmoothGrad and LRP; Score-CAM >= 3x faster, i.e. <= 0.33x) and
the largest difference between the two maps relative to the peer's largest value (SmoothGrad's
noise draws differ, so its maps differ by design).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import srdxai
from srdxai.models.torchvision_arch import resnet50, vgg16

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402


def median_time(fn, rounds: int):
    """(median seconds, the last result as a float64 tensor)."""
    seconds, result = _timing.median_time(fn, rounds)
    if not isinstance(result, torch.Tensor):
        result = torch.as_tensor(result)
    return seconds, result.detach().double()


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|; a peer's per-channel map is summed over channels as
    ours are."""
    if theirs.dim() == ours.dim() + 1:
        theirs = theirs.sum(1)
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--internal-batch-size", type=int, default=64)
    parser.add_argument("--only", default="ig,smoothgrad,lrp,scorecam",
                        help="comma-separated subset of ig, smoothgrad, lrp, scorecam")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=1)
    add_arguments(parser)
    args = parser.parse_args()
    rows = peer_rows(args)
    print(f"batch={args.batch} size={args.size} threads={torch.get_num_threads()} "
          f"internal_batch_size={args.internal_batch_size} rounds={args.rounds} "
          "(median seconds)")
    print(_timing.text_table(rows))


def peer_rows(args: argparse.Namespace) -> list[_timing.Row]:
    """The peer comparisons ``args.only`` names, at ``args.batch`` x ``args.size``."""
    only = set(args.only.split(","))
    from _compat import import_torchvision

    tv = import_torchvision()
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    from pytorch_grad_cam import ScoreCAM
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    model = resnet50().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch,))
    ibs, rounds = args.internal_batch_size, args.rounds
    rows = []

    if "ig" in only:
        ours, a = median_time(lambda: srdxai.explain(
            model, x, target, "integrated_gradients", steps=args.steps,
            internal_batch_size=ibs), rounds)
        theirs, b = median_time(lambda: IntegratedGradients(model).attribute(
            x, target=target, n_steps=args.steps, internal_batch_size=ibs), rounds)
        rows.append(_timing.Row(f"IG {args.steps} steps", "resnet50", ours, theirs, "Captum",
                                1.0, relative_difference(a, b)))

    if "smoothgrad" in only:
        ours, a = median_time(lambda: srdxai.explain(
            model, x, target, "smoothgrad", samples=args.samples, stdev=0.15,
            internal_batch_size=ibs), rounds)
        theirs, b = median_time(lambda: NoiseTunnel(Saliency(model)).attribute(
            x, target=target, nt_type="smoothgrad", nt_samples=args.samples, stdevs=0.15,
            nt_samples_batch_size=max(1, ibs // args.batch), abs=False), rounds)
        rows.append(_timing.Row(f"SmoothGrad {args.samples} samples", "resnet50", ours,
                                theirs, "Captum", 1.0, relative_difference(a, b)))

    if "lrp" in only:
        twin = tv.models.resnet50().eval()
        twin.load_state_dict(model.state_dict())
        onehot = torch.nn.functional.one_hot(target, 1000).to(x.dtype)

        def zennit_call():
            with Gradient(twin, EpsilonPlus(canonizers=[ResNetCanonizer()])) as attributor:
                return attributor(x.clone().requires_grad_(True),
                                  lambda out: out * onehot)[1]

        ours, a = median_time(lambda: srdxai.explain(model, x, target, "lrp_epsilon_plus"),
                              rounds)
        theirs, b = median_time(zennit_call, rounds)
        rows.append(_timing.Row("LRP EpsilonPlus", "resnet50", ours, theirs, "zennit", 1.0,
                                relative_difference(a, b)))

    if "scorecam" in only:
        torch.manual_seed(0)
        small = vgg16().eval()
        layer = small.features[29]

        class Target:
            def __init__(self, c):
                self.c = c

            def __call__(self, out):
                return out[..., self.c] if out.dim() == 1 else out[:, self.c]

        def gradcam_call():
            with ScoreCAM(model=small, target_layers=[layer]) as cam:
                cam.batch_size = ibs
                return cam(input_tensor=x, targets=[Target(int(c)) for c in target])

        theirs, b = median_time(gradcam_call, rounds)
        for precision in ("full", "bfloat16"):
            ours, a = median_time(lambda p=precision: srdxai.explain(
                small, x, target, "scorecam", internal_batch_size=ibs, normalize=True,
                precision=p), rounds)
            rows.append(_timing.Row(f"Score-CAM ({precision})", "vgg16", ours, theirs,
                                    "pytorch-grad-cam", 1 / 3, relative_difference(a, b)))
    return rows


if __name__ == "__main__":
    main()
