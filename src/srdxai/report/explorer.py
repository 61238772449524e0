"""The ERF explorer: one self-contained HTML page (no server, no network) that shows an image,
its SRD map, SRD's layer maps, and, when you hover or click any position of a layer, the
effective receptive field (ERF) of that feature vector over the image, with other methods'
maps side by side.

Every ERF is computed by SRD (``SRD.erf``: the pixel map of a one-hot relevance at that
position) before the page is written, and stored compactly: one byte per pixel at up to
``resolution`` x ``resolution`` (area-averaged), signed around 128 with a per-ERF scale, so a
page with a 7x7 and a 14x14 layer holds 245 maps in about 3 MB. The page's script decodes a
map and draws it with the same colour map as the static images.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from srdxai.errors import InvalidInputError
from srdxai.report.figures import write_atomic

__all__ = ["MAX_POSITIONS", "colour", "default_layers", "encode_erfs", "explore",
           "write_explorer"]

#: positions per layer above which a layer is refused (each costs one SRD pass)
MAX_POSITIONS = 1024


def colour(values: np.ndarray, signed: bool, bound: float | None = None) -> np.ndarray:
    """``uint8`` RGB of a map: signed maps blue (-) / white (0) / red (+), symmetric around 0;
    unsigned maps white (0) to red (max). ``bound`` (default: the largest magnitude) maps to
    full colour. The page's script uses the same formula."""
    v = np.asarray(values, dtype=np.float64)
    b = float(np.abs(v).max()) if bound is None else float(bound)
    t = np.clip(v / b, -1.0, 1.0) if b > 0 else np.zeros_like(v)
    if not signed:
        t = np.clip(t, 0.0, 1.0)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    red = 255.0 * (1.0 - neg)
    green = 255.0 * (1.0 - pos - neg)
    blue = 255.0 * (1.0 - pos)
    return np.rint(np.stack([red, green, blue], -1)).astype(np.uint8)


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_erfs(erfs: torch.Tensor, resolution: int) -> tuple[str, list[float], int]:
    """(K, H, W) ERFs -> (base64 of K * r * r bytes, per-ERF scales, r): area-averaged to at
    most ``resolution`` per side, then ``round(127 * v / scale) + 128``."""
    maps = erfs.detach().double()
    r = min(resolution, maps.shape[-1])
    if maps.shape[-2:] != (r, r):
        maps = F.adaptive_avg_pool2d(maps[:, None], (r, r))[:, 0]
    scales = maps.abs().flatten(1).amax(1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(127.0 * maps / safe[:, None, None]) + 128.0
    data = codes.clamp(1, 255).to(torch.uint8).numpy().tobytes()
    return base64.b64encode(data).decode("ascii"), [float(s) for s in scales], r


def default_layers(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> list[str]:
    """The last spatial layer of the deepest resolution and of the next finer one (at most
    ``MAX_POSITIONS`` positions each), from ``SRD.layers``' (name, shape) list."""
    chosen: list[str] = []
    seen: set[tuple[int, ...]] = set()
    for name, shape in reversed(list(shapes)):
        if len(shape) != 3 or shape[1] * shape[2] > MAX_POSITIONS or shape[1:] in seen:
            continue
        seen.add(shape[1:])
        chosen.append(name)
        if len(chosen) == 2:
            break
    return chosen[::-1]


def explore(model: torch.nn.Module, x: torch.Tensor, layers: Sequence[str],
            target: int | None = None, resolution: int = 112,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The data of an explorer page for one image ``x`` (1, C, H, W): per layer, its SRD
    relevance map and the ERF of every position; ``progress(n)`` is called after each ERF."""
    import srdxai

    if x.dim() != 4 or x.shape[0] != 1 or x.shape[-1] != x.shape[-2]:
        raise InvalidInputError(f"the explorer takes one square image (1, C, S, S), got "
                                f"{tuple(x.shape)}")
    srd = srdxai.SRD(model)
    shapes = dict(srd.layers(x))
    out = []
    for name in layers:
        if name not in shapes:
            raise InvalidInputError(f"no layer {name!r}; SRD's layers on this input: "
                                    f"{', '.join(shapes)}")
        shape = shapes[name]
        if len(shape) != 3:
            raise InvalidInputError(f"layer {name!r} has shape {shape}: the explorer shows "
                                    "spatial layers (channels, height, width)")
        _, h, w = shape
        if h * w > MAX_POSITIONS:
            raise InvalidInputError(f"layer {name!r} has {h * w} positions (more than "
                                    f"{MAX_POSITIONS}, one SRD pass each); choose a deeper "
                                    "layer")
        layer_map = srd.attribute_layer(x, target, layer=name, upsample=False)[0]
        erfs = []
        for i in range(h):
            for j in range(w):
                erfs.append(srd.erf(x, layer=name, position=(i, j))[0])
                if progress is not None:
                    progress(1)
        data, scales, r = encode_erfs(torch.stack(erfs), resolution)
        out.append({"name": name, "h": h, "w": w, "res": r, "scales": scales, "erf": data,
                    "map": layer_map.detach().double().numpy()})
    return {"layers": out}


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.85em; margin-top: 0.3em; max-width: 260px; }
.pic { width: 256px; height: 256px; image-rendering: pixelated; display: block; }
.grid { position: relative; width: 256px; height: 256px; cursor: crosshair; }
.grid img, .grid canvas { position: absolute; left: 0; top: 0; width: 256px; height: 256px;
  image-rendering: pixelated; }
.bar { width: 256px; height: 10px; }
.bar.signed { background: linear-gradient(to right, rgb(0,0,255), white, rgb(255,0,0)); }
.bar.unsigned { background: linear-gradient(to right, white, rgb(255,0,0)); }
.ticks { display: flex; justify-content: space-between; width: 256px; font-size: 0.75em; }
.stack { position: relative; width: 256px; height: 256px; }
.stack canvas, .stack img { position: absolute; left: 0; top: 0; width: 256px; height: 256px; }
"""

_SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById('explorer-data').textContent);
  const erf = document.getElementById('erf');
  const marker = document.getElementById('marker');
  const caption = document.getElementById('erf-caption');
  const decoded = data.layers.map(l => Uint8Array.from(atob(l.erf), c => c.charCodeAt(0)));
  let pinned = false;
  function show(li, row, col) {
    const l = data.layers[li], r = l.res, k = row * l.w + col;
    const bytes = decoded[li].subarray(k * r * r, (k + 1) * r * r);
    erf.width = r; erf.height = r;
    const ctx = erf.getContext('2d'), img = ctx.createImageData(r, r);
    for (let p = 0; p < r * r; p++) {
      const t = (bytes[p] - 128) / 127, pos = Math.max(t, 0), neg = Math.max(-t, 0);
      img.data[4 * p] = Math.round(255 * (1 - neg));
      img.data[4 * p + 1] = Math.round(255 * (1 - pos - neg));
      img.data[4 * p + 2] = Math.round(255 * (1 - pos));
      img.data[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    erf.dataset.layer = l.name; erf.dataset.row = row; erf.dataset.col = col;
    caption.textContent = 'ERF of ' + l.name + ' at (' + row + ', ' + col + '), ' + l.h + 'x' +
      l.w + ' positions; colour scale +-' + l.scales[k].toPrecision(3);
    const m = marker.getContext('2d'), D = 256;  // the marker is drawn at display size
    marker.width = D; marker.height = D;
    m.clearRect(0, 0, D, D);
    m.strokeStyle = 'yellow'; m.lineWidth = 2;
    m.strokeRect(col * D / l.w, row * D / l.h, D / l.w, D / l.h);
  }
  function cell(event, l) {
    const box = event.currentTarget.getBoundingClientRect();
    const col = Math.min(l.w - 1, Math.floor((event.clientX - box.left) / box.width * l.w));
    const row = Math.min(l.h - 1, Math.floor((event.clientY - box.top) / box.height * l.h));
    return [Math.max(row, 0), Math.max(col, 0)];
  }
  document.querySelectorAll('.grid').forEach(grid => {
    const li = Number(grid.dataset.index), l = data.layers[li];
    grid.addEventListener('mousemove', e => { if (!pinned) { const [r, c] = cell(e, l);
      show(li, r, c); } });
    grid.addEventListener('click', e => { const [r, c] = cell(e, l); pinned = true;
      show(li, r, c); });
  });
  window.srdxaiExplorer = { show: show, data: data };
})();
"""


def _ticks(bound: float, signed: bool) -> str:
    low = f"{-bound:.3g}" if signed else "0"
    mid = "0" if signed else f"{bound / 2:.3g}"
    return (f'<div class="bar {"signed" if signed else "unsigned"}"></div><div class="ticks">'
            f"<span>{low}</span><span>{mid}</span><span>{bound:.3g}</span></div>")


def write_explorer(path: str | os.PathLike[str], image_uint8: np.ndarray,
                   srd_map: np.ndarray, explored: dict[str, Any], title: str,
                   methods: dict[str, tuple[np.ndarray, bool]] | None = None) -> Path:
    """Write the page: ``image_uint8`` (S, S, 3) as the model saw it, ``srd_map`` (S, S),
    ``explored`` from :func:`explore`, ``methods`` name -> (map, signed) shown side by side."""
    image = np.asarray(image_uint8, dtype=np.uint8)
    size = image.shape[0]
    srd_bound = float(np.abs(srd_map).max()) or 1.0
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p>Hover over a position of a layer map to see the effective receptive field of "
             "that feature vector (its SRD pixel map for one unit of relevance); click to keep "
             "it. Red: positive relevance, blue: negative.</p>",
             "<div class='row'>",
             f"<figure><div class='stack'><img class='pic' alt='input' "
             f"src='data:image/png;base64,{_png(image)}'><canvas id='marker'></canvas></div>"
             "<figcaption>input as the model sees it</figcaption></figure>",
             f"<figure><img class='pic' alt='SRD map' src='data:image/png;base64,"
             f"{_png(colour(srd_map, True, srd_bound))}'>{_ticks(srd_bound, True)}"
             "<figcaption>SRD pixel map (sums to the explained logit)</figcaption></figure>",
             "<figure><canvas id='erf' class='pic'></canvas>"
             "<div class='bar signed'></div><div class='ticks'><span>-scale</span>"
             "<span>0</span><span>+scale</span></div>"
             "<figcaption id='erf-caption'>ERF: hover over a layer below</figcaption>"
             "</figure></div><h2>SRD's layer maps</h2><div class='row'>"]
    for index, layer in enumerate(explored["layers"]):
        bound = float(np.abs(layer["map"]).max()) or 1.0
        parts.append(
            f"<figure><div class='grid' data-index='{index}' data-layer="
            f"'{html.escape(layer['name'])}'><img alt='{html.escape(layer['name'])}' "
            f"src='data:image/png;base64,{_png(colour(layer['map'], True, bound))}'></div>"
            f"{_ticks(bound, True)}<figcaption>{html.escape(layer['name'])}: "
            f"{layer['h']}x{layer['w']} positions</figcaption></figure>")
    parts.append("</div>")
    if methods:
        parts.append("<h2>Methods side by side</h2><div class='row'>")
        for name, (values, signed) in methods.items():
            bound = float(np.abs(values).max()) or 1.0
            parts.append(
                f"<figure><img class='pic' alt='{html.escape(name)}' src='data:image/png;"
                f"base64,{_png(colour(values, signed, bound))}'>{_ticks(bound, signed)}"
                f"<figcaption>{html.escape(name)}</figcaption></figure>")
        parts.append("</div>")
    payload = {"size": size, "layers": [{k: v for k, v in layer.items() if k != "map"}
                                        for layer in explored["layers"]]}
    parts.append("<script id='explorer-data' type='application/json'>"
                 f"{json.dumps(payload)}</script><script>{_SCRIPT}</script></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = "".join(parts).encode("utf-8")
    return write_atomic(path, lambda handle: handle.write(page))  # never a half-written page
