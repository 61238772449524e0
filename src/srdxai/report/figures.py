"""Explanation figures: photo, signed heat-map overlay and top-5 bar chart in one PNG."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from srdxai.errors import InvalidInputError

__all__ = ["save_explanation_figure", "symmetric_limit"]

#: Diverging colour map: red = positive relevance (evidence for the class), blue = negative.
CMAP = "bwr"


def _to_numpy(array: object) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def symmetric_limit(heatmap: np.ndarray, percentile: float = 99.0) -> float:
    """Colour limit ``L`` for a signed map shown on ``[-L, L]``: the percentile of ``|map|``.

    Non-finite values are ignored. Falls back to the largest ``|value|``, then to 1, so the limit
    is always a positive finite number.
    """
    values = np.abs(np.asarray(heatmap, dtype=np.float64))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0
    limit = float(np.percentile(values, percentile))
    if not limit > 0.0:
        limit = float(values.max())
    return limit if limit > 0.0 else 1.0


def _check_inputs(image: object, heatmap: object) -> tuple[np.ndarray, np.ndarray]:
    img = _to_numpy(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise InvalidInputError(f"expected an image of shape (H, W, 3), got {tuple(img.shape)}")
    if img.dtype != np.uint8:
        raise InvalidInputError(f"expected a uint8 image, got dtype {img.dtype}")
    heat = _to_numpy(heatmap).astype(np.float64, copy=False)
    if heat.ndim == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise InvalidInputError(f"expected a heat map of shape (H, W), got {tuple(heat.shape)}")
    return img[:, :, :3], heat


def save_explanation_figure(
    path: str | os.PathLike[str],
    image_uint8_hwc: object,
    heatmap_hw: object,
    top5: Sequence[tuple[str, float]],
    title: str,
    *,
    dpi: int = 110,
) -> Path:
    """Write a PNG with three panels: the photo, the heat map over it, and the top-5 classes.

    ``heatmap_hw`` is a signed relevance map (numpy array or torch tensor) of shape ``(H, W)``; it
    is stretched over the photo when the sizes differ. Colours are centred at 0 with symmetric
    limits at the 99th percentile of ``|map|``. ``top5`` holds ``(label, probability)`` pairs,
    most likely first. The file is written to a temporary name in the same folder and then renamed,
    so ``path`` is never left half-written. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img, heat = _check_inputs(image_uint8_hwc, heatmap_hw)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    limit = symmetric_limit(heat)
    shown = np.nan_to_num(heat, nan=0.0, posinf=limit, neginf=-limit)
    height, width = img.shape[:2]
    extent = (0.0, float(width), float(height), 0.0)

    fig = Figure(figsize=(13.5, 4.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_img, ax_map, ax_bar = fig.subplots(1, 3, width_ratios=[1.0, 1.2, 1.1])

    ax_img.imshow(img, extent=extent)
    ax_img.set_title("input")
    ax_img.set_axis_off()

    grey = img.astype(np.float64).mean(axis=2)
    ax_map.imshow(grey, cmap="gray", extent=extent, vmin=0, vmax=255)
    mappable = ax_map.imshow(
        shown,
        cmap=CMAP,
        vmin=-limit,
        vmax=limit,
        alpha=0.65,
        extent=extent,
        interpolation="nearest",
    )
    ax_map.set_title("relevance (red +, blue -)")
    ax_map.set_axis_off()
    fig.colorbar(mappable, ax=ax_map, shrink=0.85, label=f"clipped at ±{limit:.3g} (99th pct)")

    labels = [str(label) for label, _ in top5][:5]
    probs = [float(p) for _, p in top5][:5]
    positions = np.arange(len(labels))[::-1]
    bars = ax_bar.barh(positions, probs, color="tab:blue")
    ax_bar.set_yticks(positions, labels)
    ax_bar.set_xlim(0.0, 1.0)
    ax_bar.set_xlabel("probability")
    ax_bar.set_title("top-5 classes")
    for bar, p in zip(bars, probs, strict=True):
        ax_bar.text(
            min(p, 0.80) + 0.02, bar.get_y() + bar.get_height() / 2, f"{p:.3f}", va="center"
        )
    fig.suptitle(title)

    return _atomic_savefig(fig, out)


def write_atomic(out: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``out`` through ``write(handle)`` on a temporary file and an atomic rename, so
    readers see the old file or the new one, never a partial one; nothing is left behind on
    errors."""
    # A unique name in the target folder (same file system, so the rename is atomic); opened with
    # "xb" so the file gets the usual umask permissions, unlike tempfile.mkstemp's 0600.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _atomic_savefig(fig: object, out: Path) -> Path:
    """Save ``fig`` as PNG to ``out`` atomically."""
    return write_atomic(out, lambda handle: fig.savefig(handle, format="png"))


def save_method_grid(
    path: str | os.PathLike[str],
    image_uint8_hwc: object,
    maps: dict[str, object],
    title: str,
    *,
    signed: dict[str, bool] | None = None,
    columns: int = 5,
    dpi: int = 100,
) -> Path:
    """Write one PNG comparing several methods' maps on the same photo, side by side.

    ``maps`` maps a method name to its (H, W) map. Signed maps are drawn red/blue centred at 0
    (limits at the 99th percentile of ``|map|``); unsigned ones (``signed[name] is False``) from
    0 upwards; each panel has its own colour bar. Written atomically like
    :func:`save_explanation_figure`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    signed = signed or {}
    img = _check_inputs(image_uint8_hwc, np.zeros((1, 1)))[0]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    panels = 1 + len(maps)
    rows = -(-panels // columns)
    fig = Figure(figsize=(3.0 * columns, 3.2 * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    height, width = img.shape[:2]
    extent = (0.0, float(width), float(height), 0.0)
    axes[0].imshow(img, extent=extent)
    axes[0].set_title("input")
    grey = img.astype(np.float64).mean(axis=2)
    for ax, (name, heatmap) in zip(axes[1:], maps.items(), strict=False):
        heat = _check_inputs(img, heatmap)[1]
        limit = symmetric_limit(heat)
        shown = np.nan_to_num(heat, nan=0.0, posinf=limit, neginf=-limit)
        ax.imshow(grey, cmap="gray", extent=extent, vmin=0, vmax=255)
        if signed.get(name, True):
            drawn = ax.imshow(shown, cmap=CMAP, vmin=-limit, vmax=limit, alpha=0.7,
                              extent=extent, interpolation="nearest")
        else:
            drawn = ax.imshow(shown, cmap="inferno", vmin=0, vmax=limit, alpha=0.7,
                              extent=extent, interpolation="nearest")
        # every panel its own scale: methods' units differ (logits, probabilities, unit mass)
        bar = fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize="x-small")
        ax.set_title(name)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return _atomic_savefig(fig, out)


def save_attack_figure(
    path: str | os.PathLike[str],
    image_uint8_hwc: object,
    original_map: object,
    target_map: object,
    adversarial_uint8_hwc: object,
    adversarial_map: object,
    title: str,
    *,
    dpi: int = 80,
) -> Path:
    """The manipulation attack's figure (Dombrowski et al.'s layout): original image, its
    map, the target map, the manipulated image and its map. Maps are non-negative (unit-sum
    ``|map|``) and share one colour scale. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = _check_inputs(image_uint8_hwc, np.zeros((1, 1)))[0]
    adv = _check_inputs(adversarial_uint8_hwc, np.zeros((1, 1)))[0]
    maps = [_check_inputs(img, m)[1] for m in (original_map, target_map, adversarial_map)]
    limit = max(float(np.nanpercentile(np.abs(m), 99.5)) for m in maps) or 1.0
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(15.0, 3.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5)
    panels = [("image", img, None), ("original map", None, maps[0]),
              ("target map", None, maps[1]), ("manipulated image", adv, None),
              ("manipulated map", None, maps[2])]
    for ax, (name, picture, heat) in zip(axes, panels, strict=True):
        if picture is not None:
            ax.imshow(picture)
        else:
            ax.imshow(np.nan_to_num(heat, nan=0.0), cmap="inferno", vmin=0, vmax=limit,
                      interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    fig.suptitle(title)
    return _atomic_savefig(fig, out)
