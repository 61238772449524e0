"""Explanation figures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srdxai.errors import InvalidInputError
from srdxai.report import save_explanation_figure, symmetric_limit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOP5 = [("Egyptian cat", 0.79), ("tiger cat", 0.09), ("tabby", 0.07), ("lynx", 0.01), ("bag", 0.0)]


def _image(h: int = 64, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_writes_a_valid_png(tmp_path, as_tensor):
    heat = np.random.default_rng(1).normal(size=(64, 96))
    heatmap = torch.from_numpy(heat) if as_tensor else heat
    out = tmp_path / "sub" / "fig.png"
    written = save_explanation_figure(out, _image(), heatmap, TOP5, "a title")
    assert written == out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.width > img.height > 100  # three panels side by side
    assert sorted(p.name for p in out.parent.iterdir()) == ["fig.png"]  # no temp file left


def test_heatmap_of_another_size_and_degenerate_maps(tmp_path):
    for i, heat in enumerate(
        [np.zeros((7, 7)), np.full((224, 224), np.nan), torch.ones(1, 14, 14)]
    ):
        out = save_explanation_figure(tmp_path / f"f{i}.png", _image(), heat, TOP5[:3], "t")
        assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_overwrites_atomically(tmp_path):
    out = tmp_path / "fig.png"
    out.write_bytes(b"old")
    save_explanation_figure(out, _image(), np.ones((64, 96)), TOP5, "t")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "fig.png"
    with pytest.raises(InvalidInputError):
        save_explanation_figure(out, _image(), np.ones((2, 3, 4)), TOP5, "t")
    assert list(tmp_path.iterdir()) == []


def test_symmetric_limit():
    heat = np.concatenate([np.linspace(-1, 1, 1001), [50.0]])
    assert symmetric_limit(heat) == pytest.approx(np.percentile(np.abs(heat), 99))
    assert symmetric_limit(np.zeros((4, 4))) == 1.0
    assert symmetric_limit(np.r_[np.zeros(1000), 3.0]) == 3.0  # 99th percentile is 0 -> max
    assert symmetric_limit(np.array([np.nan, np.inf])) == 1.0


def test_method_grid_is_a_png_with_signed_and_unsigned_panels(tmp_path):
    from srdxai.report import save_method_grid

    image = np.zeros((20, 30, 3), dtype=np.uint8)
    maps = {"a": np.random.default_rng(0).normal(size=(20, 30)), "b": np.ones((20, 30)),
            "c": np.zeros((20, 30))}
    path = save_method_grid(tmp_path / "g.png", image, maps, "title", signed={"b": False},
                            columns=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_curves_have_their_real_axes_and_18_methods_stay_apart():
    from srdxai.experiments.suite.table2 import TABLE2_METHODS
    from srdxai.metrics import METRICS
    from srdxai.metrics.randomisation import SIMILARITIES
    from srdxai.report.blocks import axes_of, line_styles

    # every curve the experiments record has labelled axes: the names they write literally,
    # their templated ones, and (your model and data) every metric that returns curves, MPRT's
    # under each measure; Sensitivity-n's n on a log axis
    suite = Path(__file__).resolve().parent.parent / "src" / "srdxai" / "experiments" / "suite"
    literal = {name for path in suite.glob("*.py")
               for name in re.findall(r'curves\(\s*"(\w+)"', path.read_text())}
    assert {"sensitivity_n", "sensitivity_n_tokens"} <= literal  # the pattern still finds them
    templated = ({f"mprt_{m}" for m in SIMILARITIES} | {"insertion", "deletion"}
                 | {"insertion_tokens", "deletion_tokens"})
    curve_metrics = [name for name, info in METRICS.items() if "Result" in info.returns
                     and "one score per group" not in info.returns]
    assert {"pixel_flipping", "road", "irof", "model_parameter_randomisation"} <= set(
        curve_metrics)
    from_metrics = {f"{name}[{m}]" if "MPRT" in METRICS[name].returns else name
                    for name in curve_metrics for m in SIMILARITIES}
    for curve in literal | templated | from_metrics:
        axes = axes_of(curve)
        assert axes is not None and curve not in axes[:2], curve
        assert "{measure}" not in axes[0] + axes[1], curve
    assert axes_of("sensitivity_n")[2] == "log" and "Pearson" in axes_of("sensitivity_n")[1]
    assert axes_of("model_parameter_randomisation[ssim]")[1].endswith("(ssim)")
    assert axes_of("no_such_curve") is None
    n = len(TABLE2_METHODS)
    styles = line_styles(n)
    assert n >= 18 and len({(tuple(c), s) for c, s in styles}) == n
