"""ImageNet localisation composites: real photos pasted on real textures, with their masks.

A stand-in for ImageNet-S that runs offline: five object photos that ship inside scikit-image
(``chelsea``, ``coffee``, ``camera``, ``rocket``, ``stereo_motorcycle``) are cut (a random crop
keeping 80-100 % of each side, sometimes mirrored), scaled so their longer side is 96-150 px and
pasted at a random position on a 224 x 224 crop of one of scikit-image's textures (``brick``,
``grass``, ``gravel``, randomly tinted). The mask is the pasted rectangle.

Each photo's label is the ImageNet class EfficientNet-Lite0 predicts for the whole clean photo
resized to 224 x 224 (:data:`PHOTO_LABELS`, checked against the model in the tests): 285
Egyptian cat (p = 0.79), 967 espresso (0.90), 872 tripod (0.94), 540 drilling platform (0.42;
ImageNet has no rocket class), 665 moped (0.49). ``astronaut`` is left out: its top class,
"bobsled" (0.29), names nothing in the photo.

Sample ``i`` is drawn from its own random stream seeded by ``(seed, i)``: deterministic, and
independent of which other samples are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from srdxai.errors import InvalidInputError, MissingDependencyError

__all__ = ["PHOTO_LABELS", "TEXTURES", "CompositeBatch", "ImageNetComposites"]

#: Photo -> the ImageNet-1k class EfficientNet-Lite0 predicts for it (top-1, clean photo).
PHOTO_LABELS: dict[str, int] = {
    "chelsea": 285,
    "coffee": 967,
    "camera": 872,
    "rocket": 540,
    "stereo_motorcycle": 665,
}
TEXTURES = ("brick", "grass", "gravel")
SIZE = 224


@lru_cache(maxsize=1)
def _sources() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        from skimage import data as skdata
    except ImportError as exc:  # pragma: no cover - scikit-image is a runtime dependency
        raise MissingDependencyError(
            "the composites use scikit-image's bundled photos; install scikit-image") from exc

    def rgb(image) -> np.ndarray:
        image = np.asarray(image[0] if isinstance(image, tuple) else image)
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        return np.ascontiguousarray(image[..., :3], dtype=np.uint8)

    photos = {name: rgb(getattr(skdata, name)()) for name in PHOTO_LABELS}
    textures = {name: rgb(getattr(skdata, name)()) for name in TEXTURES}
    return photos, textures


@dataclass(frozen=True)
class CompositeBatch:
    """``images``: uint8 ``(N, 224, 224, 3)``; ``labels``: int64 ``(N,)`` ImageNet classes;
    ``masks``: bool ``(N, 224, 224)``; ``boxes``: int64 ``(N, 4)`` ``(x0, y0, x1, y1)``,
    end-exclusive; ``photos``: the source photo of each sample."""

    images: np.ndarray
    labels: Tensor
    masks: Tensor
    boxes: Tensor
    photos: tuple[str, ...]


class ImageNetComposites:
    """``count`` deterministic composites (default 300); ``batch(indices)`` renders them.

    Images are ``uint8`` at 224 x 224, so any model's preprocessing applies
    (``srdxai.models.preprocess``; for EfficientNet-Lite0 it keeps the size).
    """

    def __init__(self, count: int = 300, seed: int = 0):
        if not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"count must be a positive int, got {count!r}")
        self.count, self.seed = count, int(seed)

    def __len__(self) -> int:
        return self.count

    def _render(self, index: int) -> tuple[np.ndarray, tuple[int, int, int, int], str]:
        from PIL import Image

        photos, textures = _sources()
        rng = np.random.default_rng([self.seed, index])
        names = list(PHOTO_LABELS)
        photo_name = names[index % len(names)]  # balanced classes
        texture = textures[TEXTURES[int(rng.integers(len(TEXTURES)))]]
        t = int(rng.integers(160, min(texture.shape[:2]) + 1))
        ty = int(rng.integers(0, texture.shape[0] - t + 1))
        tx = int(rng.integers(0, texture.shape[1] - t + 1))
        canvas = Image.fromarray(texture[ty:ty + t, tx:tx + t]).resize(
            (SIZE, SIZE), Image.Resampling.BILINEAR)
        tint = rng.uniform(0.6, 1.0, size=3)
        canvas = np.asarray(canvas, dtype=np.float32) * tint

        photo = photos[photo_name]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.8, 1.0)), int(w * rng.uniform(0.8, 1.0))
        cy, cx = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        cut = photo[cy:cy + ch, cx:cx + cw]
        if rng.random() < 0.5:
            cut = cut[:, ::-1]
        longer = int(rng.integers(96, 151))
        scale = longer / max(ch, cw)
        ph, pw = max(1, round(ch * scale)), max(1, round(cw * scale))
        pasted = np.asarray(Image.fromarray(np.ascontiguousarray(cut)).resize(
            (pw, ph), Image.Resampling.BILINEAR), dtype=np.float32)
        y, x = int(rng.integers(0, SIZE - ph + 1)), int(rng.integers(0, SIZE - pw + 1))
        canvas[y:y + ph, x:x + pw] = pasted
        image = np.clip(canvas.round(), 0, 255).astype(np.uint8)
        return image, (x, y, x + pw, y + ph), photo_name

    def batch(self, indices) -> CompositeBatch:
        idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if any(i < 0 or i >= self.count for i in idx):
            raise InvalidInputError(f"composite indices must lie in [0, {self.count})")
        images = np.empty((len(idx), SIZE, SIZE, 3), dtype=np.uint8)
        masks = torch.zeros(len(idx), SIZE, SIZE, dtype=torch.bool)
        boxes, photos = [], []
        for k, i in enumerate(idx):
            images[k], box, name = self._render(i)
            x0, y0, x1, y1 = box
            masks[k, y0:y1, x0:x1] = True
            boxes.append(box)
            photos.append(name)
        labels = torch.tensor([PHOTO_LABELS[p] for p in photos], dtype=torch.int64)
        return CompositeBatch(images, labels, masks,
                              torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4),
                              tuple(photos))

    def __getitem__(self, index: int) -> dict:
        b = self.batch([index])
        return {"image": b.images[0], "label": b.labels[0], "mask": b.masks[0],
                "box": b.boxes[0], "photo": b.photos[0]}
