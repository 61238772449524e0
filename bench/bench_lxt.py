"""AttnLRP: srdxai against LXT 2.1 on a Hugging Face ViT-B/16 (random weights), time and
output difference.

    python bench/bench_lxt.py [--batch 8] [--size 224] [--rounds 3]

LXT patches ``torch.nn.LayerNorm``, ``torch.nn.Dropout`` and transformers' attention
process-wide, with no undo, so each side runs in a process of its own on the same weights,
input and targets (``--side lxt|ours OUT``, used internally) and writes its median time and
relevance (``x * grad``, per channel); this process compares them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402

import _timing  # noqa: E402


def _model(size: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=16, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, num_labels=1000,
                       attn_implementation="sdpa")
    return ViTForImageClassification(config).eval()


def _side(side: str, out: Path, batch: int, size: int, rounds: int) -> None:
    from _compat import import_torchvision

    import_torchvision()
    model = _model(size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2))
    if side == "lxt":
        from lxt_vit_reference import relevance

        relevance(model, x[:1], target[:1], cp=False)  # patches the classes (once)

        def call() -> torch.Tensor:  # LXT's way: x * grad through the patched model
            leaf = x.clone().requires_grad_(True)
            out = model(leaf).logits
            out[torch.arange(len(target)), target].sum().backward()
            return (leaf * leaf.grad).detach()
    else:
        import srdxai

        class Logits(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, t):
                return self.inner(t).logits

        wrapped = Logits(model)

        def call() -> torch.Tensor:
            return srdxai.explain(wrapped, x, target, "attnlrp", channel_reduce="none")

    seconds, result = _timing.median_time(call, rounds)
    torch.save({"seconds": seconds, "relevance": result.detach()}, out)


def compare(batch: int, size: int, rounds: int) -> tuple[float, float, float]:
    """(our median seconds, LXT's, max |ours - LXT| / max |LXT|)."""
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for side in ("lxt", "ours"):
            path = Path(tmp) / f"{side}.pt"
            done = subprocess.run(
                [sys.executable, __file__, "--side", side, str(path), "--batch", str(batch),
                 "--size", str(size), "--rounds", str(rounds)],
                capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the {side} side failed: {done.stderr[-2000:]}")
            results[side] = torch.load(path, weights_only=True)
    ours, theirs = results["ours"], results["lxt"]
    diff = float((ours["relevance"] - theirs["relevance"]).abs().max()
                 / theirs["relevance"].abs().max().clamp_min(1e-30))
    return ours["seconds"], theirs["seconds"], diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", nargs=2, metavar=("SIDE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _side(args.side[0], Path(args.side[1]), args.batch, args.size, args.rounds)
        return
    ours, theirs, diff = compare(args.batch, args.size, args.rounds)
    print(f"AttnLRP, HF ViT-B/16, batch {args.batch}, {args.size} px: srdxai {ours:.3f} s, "
          f"LXT {theirs:.3f} s, ratio {ours / theirs:.2f}x, max diff {diff:.1e}")


if __name__ == "__main__":
    main()
