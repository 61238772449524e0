"""Our LRP EpsilonPlus against zennit's, measured in one run.

    python bench/bench_lrp.py [--models vgg16,resnet50] [--batch 8] [--size 224] [--rounds 3]

Random weights (torchvision architecture; zennit runs torchvision's own classes with the same
state dict, since its ResNet canonizer only knows those), the same inputs and targets. zennit:
``EpsilonPlus`` with its VGG / ResNet canonizer and the target logit as output relevance;
ours: ``lrp_epsilon_plus`` (``channel_reduce="none"``, the same (N, C, H, W) relevance).
Prints each model's median time and ours / zennit (target <= 1.0x) and the maps' relative
differences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import srdxai
import srdxai.methods.lrp  # noqa: F401  (registers the LRP methods)
from _timing import median_time  # noqa: E402
from srdxai.models.torchvision_arch import resnet18, resnet50, vgg16

MODELS = {"resnet50": resnet50, "resnet18": resnet18, "vgg16": vgg16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    try:
        from _compat import import_torchvision

        tv = import_torchvision()
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlus
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    except ImportError as error:
        raise SystemExit(f"zennit is not usable ({error}); it is a test dependency") from None

    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        theirs_model = getattr(tv.models, name)().eval()
        theirs_model.load_state_dict(model.state_dict())
        canonizer = ResNetCanonizer() if name.startswith("resnet") else VGGCanonizer()
        x = torch.randn(args.batch, 3, args.size, args.size)
        target = torch.randint(0, 1000, (args.batch,))
        onehot = torch.nn.functional.one_hot(target, 1000).to(x.dtype)

        def zennit_call(theirs_model=theirs_model, canonizer=canonizer, x=x, onehot=onehot):
            composite = EpsilonPlus(canonizers=[canonizer])
            with Gradient(theirs_model, composite) as attributor:
                _, relevance = attributor(x.clone().requires_grad_(True),
                                          lambda out: out * onehot)
            return relevance

        def ours_call(model=model, x=x, target=target):
            return srdxai.explain(model, x, target, "lrp_epsilon_plus", channel_reduce="none")

        t_ours, r_ours = median_time(ours_call, args.rounds)
        t_theirs, r_theirs = median_time(zennit_call, args.rounds)
        diff = ((r_ours - r_theirs).abs().max() / r_theirs.abs().max()).item()
        l2 = ((r_ours - r_theirs).norm() / r_theirs.norm()).item()
        rows.append((name, t_ours, t_theirs, diff, l2))

    print(f"EpsilonPlus batch={args.batch} size={args.size} threads={torch.get_num_threads()} "
          f"rounds={args.rounds} (median seconds, float32)")
    print(f"{'model':10s} {'srdxai':>8s} {'zennit':>8s} {'ours/zennit':>12s} "
          f"{'max rel diff':>13s} {'rel L2 diff':>12s}")
    for name, a, b, d, l2 in rows:
        print(f"{name:10s} {a:8.2f} {b:8.2f} {a / b:11.2f}x {d:13.1e} {l2:12.1e}")
    print("target: <= 1.0x. The differences are float32 rounding (our channels-last layout) "
          "and zennit's merged BatchNorm dividing by sqrt(1 + eps); in float64 with eps=0 the "
          "maps agree to ~1e-14 (tests/test_lrp.py).")


if __name__ == "__main__":
    main()
