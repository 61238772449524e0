"""Cluttered Fashion-MNIST: one garment on a larger, cluttered RGB canvas, with its exact mask.

Built from the original Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist`` installs them
in ``/usr/share/datasets/fashion-mnist``; ``SRDXAI_FASHION_MNIST`` or ``root=`` point elsewhere).

Each sample ``i`` of a split is drawn from its own random stream, seeded by
``(seed, split, i)``, so a sample never depends on which other samples were generated, in which
order, or in how many processes:

1. the canvas (``canvas`` x ``canvas``, default 64) gets a dark random colour;
2. ``clutter`` fragments (2-4 by default) are pasted: random crops (8-14 px) of *other* items of
   the same split, each in a random colour at 40-90 % opacity;
3. the item itself (Fashion-MNIST item ``i`` of the split, its label is the sample's label) is
   resized to 34-62 % of the canvas side and alpha-blended at a uniformly random position in a
   bright random colour, its grey level as opacity: ``pixel = (1 - a) * canvas + a * colour``;
4. Gaussian noise (sigma 0.03) over everything, clipped to ``[0, 1]`` and rounded to 8-bit
   levels (``k / 255``), so a sample stored as ``uint8`` loses nothing.

The mask is exactly the pixels where the item's opacity ``a`` exceeds ``MASK_OPACITY`` (0.1): the
pixels whose colour the item decides. The box is that mask's bounding box
``(x0, y0, x1, y1)``, end-exclusive.

Splits follow the originals: ``train`` is original training items 0-54999, ``val`` items
55000-59999, ``test`` the original 10000 test items.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from srdxai.errors import InvalidInputError, MissingDependencyError, SrdxaiError

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "MEAN",
    "STD",
    "ClutteredFashionMNIST",
    "FashionBatch",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "normalize",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
#: The models of the zoo see ``(image - MEAN) / STD`` (per channel, image in [0, 1]).
MEAN = (0.25, 0.25, 0.25)
STD = (0.25, 0.25, 0.25)
MASK_OPACITY = 0.1

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SPLITS = {"train": ("train", 0, 55000), "val": ("train", 55000, 60000),
           "test": ("test", 0, 10000)}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_INSTALL_HINT = ("install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                 "or set SRDXAI_FASHION_MNIST to a folder with the four Fashion-MNIST .gz files")


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The folder with the IDX files: ``root``, else ``$SRDXAI_FASHION_MNIST``, else Debian's."""
    if root is not None:
        return Path(root)
    env = os.environ.get("SRDXAI_FASHION_MNIST")
    return Path(env) if env else DEFAULT_ROOT


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise MissingDependencyError(
            f"Fashion-MNIST file {path} is missing; {_INSTALL_HINT}") from exc
    except (OSError, EOFError) as exc:
        raise SrdxaiError(f"cannot read Fashion-MNIST file {path} ({exc}); it is probably "
                          "corrupt: reinstall it") from exc
    if len(data) < 4 + 4 * ndim:
        raise SrdxaiError(f"Fashion-MNIST file {path} is truncated; reinstall it")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != 0x800 + ndim:  # 0x08: unsigned byte, last byte: number of dimensions
        raise SrdxaiError(f"{path} is not an IDX file of {ndim} dimensions (magic {magic:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SrdxaiError(f"Fashion-MNIST file {path} is truncated; reinstall it")
    return body.reshape(shape)


@lru_cache(maxsize=4)
def _load_original(part: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _FILES[part]
    images = _read_idx(Path(root) / images_file, 3)
    labels = _read_idx(Path(root) / labels_file, 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise SrdxaiError(f"Fashion-MNIST {part} files in {root} do not match each other")
    return images, labels


def load_fashion_mnist(split: str, root: str | Path | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The plain 28 x 28 ``uint8`` items and labels of a split (``train``, ``val``, ``test``)."""
    if split not in _SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    part, start, stop = _SPLITS[split]
    images, labels = _load_original(part, str(fashion_mnist_root(root)))
    return images[start:stop], labels[start:stop]


@dataclass(frozen=True)
class FashionBatch:
    """Samples of :class:`ClutteredFashionMNIST`.

    ``images``: float32 ``(N, 3, S, S)`` in ``[0, 1]``; ``labels``: int64 ``(N,)``;
    ``masks``: bool ``(N, S, S)``; ``boxes``: int64 ``(N, 4)`` as ``(x0, y0, x1, y1)``,
    end-exclusive; ``indices``: the samples' indices in the split.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    boxes: Tensor
    indices: Tensor


def _resize(item: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = Image.fromarray(item).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32) / 255.0


def _blend(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    h, w = alpha.shape
    region = canvas[:, y:y + h, x:x + w]
    region *= 1.0 - alpha
    region += alpha * colour[:, None, None]


class ClutteredFashionMNIST(torch.utils.data.Dataset):
    """Deterministic cluttered Fashion-MNIST samples with exact object masks (see module doc).

    ``dataset[i]`` is a dict with ``image`` (3, S, S), ``label``, ``mask`` (S, S) and ``box``;
    ``dataset.batch(indices)`` returns a :class:`FashionBatch`. ``size`` limits the split to its
    first ``size`` items.
    """

    def __init__(self, split: str = "train", *, canvas: int = 64, seed: int = 0,
                 clutter: tuple[int, int] = (2, 4), size: int | None = None,
                 root: str | Path | None = None):
        if not isinstance(canvas, int) or canvas < 32:
            raise InvalidInputError(f"canvas must be an int >= 32, got {canvas!r}")
        lo, hi = clutter
        if not (0 <= lo <= hi):
            raise InvalidInputError(f"clutter must be (min, max) with 0 <= min <= max, "
                                    f"got {clutter!r}")
        self.split, self.canvas, self.seed, self.clutter = split, canvas, int(seed), (lo, hi)
        self.items, self.item_labels = load_fashion_mnist(split, root)
        self._clutter_pool = self.items  # the whole split, so `size` changes no sample
        if size is not None:
            if not isinstance(size, int) or not 1 <= size <= len(self.items):
                raise InvalidInputError(
                    f"size must be between 1 and {len(self.items)} for split {split!r}, "
                    f"got {size!r}")
            self.items, self.item_labels = self.items[:size], self.item_labels[:size]

    def __len__(self) -> int:
        return len(self.items)

    def _render(self, index: int, draw_item: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``draw_item=False`` makes the same random draws but leaves the item out (tests)."""
        s = self.canvas
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])
        canvas = np.empty((3, s, s), dtype=np.float32)
        canvas[:] = rng.uniform(0.0, 0.25, size=(3, 1, 1))
        for _ in range(int(rng.integers(self.clutter[0], self.clutter[1] + 1))):
            other = int(rng.integers(len(self._clutter_pool) - 1))
            other += other >= index  # never the item itself
            f = int(rng.integers(8, 15))
            cy, cx = (int(v) for v in rng.integers(0, 28 - f + 1, size=2))
            patch = self._clutter_pool[other, cy:cy + f, cx:cx + f].astype(np.float32) / 255.0
            y, x = (int(v) for v in rng.integers(0, s - f + 1, size=2))
            opacity = rng.uniform(0.4, 0.9)
            _blend(canvas, patch * opacity, rng.uniform(0.2, 1.0, size=3).astype(np.float32),
                   y, x)
        size = int(round(s * rng.uniform(0.34, 0.62)))
        alpha = _resize(self.items[index], size)
        y, x = (int(v) for v in rng.integers(0, s - size + 1, size=2))
        colour = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        if draw_item:
            _blend(canvas, alpha, colour, y, x)
        canvas += rng.normal(0.0, 0.03, size=canvas.shape).astype(np.float32)
        np.clip(canvas, 0.0, 1.0, out=canvas)
        canvas = np.round(canvas * 255.0) / np.float32(255.0)  # 8-bit levels, like a photo
        mask = np.zeros((s, s), dtype=bool)
        mask[y:y + size, x:x + size] = alpha > MASK_OPACITY
        return canvas, mask

    def batch(self, indices) -> FashionBatch:
        """The samples at ``indices`` (any int sequence or tensor), rendered and stacked."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise InvalidInputError(f"sample indices must lie in [0, {len(self)}) for split "
                                    f"{self.split!r}")
        n, s = idx.numel(), self.canvas
        images = np.empty((n, 3, s, s), dtype=np.float32)
        masks = np.empty((n, s, s), dtype=bool)
        for k, i in enumerate(idx.tolist()):
            images[k], masks[k] = self._render(i)
        masks_t = torch.from_numpy(masks)
        return FashionBatch(torch.from_numpy(images),
                            torch.from_numpy(self.item_labels[idx.numpy()].astype(np.int64)),
                            masks_t, _boxes(masks_t), idx)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        b = self.batch([index])
        return {"image": b.images[0], "label": b.labels[0], "mask": b.masks[0],
                "box": b.boxes[0]}


def _boxes(masks: Tensor) -> Tensor:
    """End-exclusive ``(x0, y0, x1, y1)`` bounding boxes of boolean masks ``(N, H, W)``."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    return torch.stack([x0, y0, x1, y1], 1)


def normalize(images: Tensor) -> Tensor:
    """``[0, 1]`` images -> the zoo models' input, ``(image - MEAN) / STD``."""
    mean = images.new_tensor(MEAN).reshape(1, 3, 1, 1)
    std = images.new_tensor(STD).reshape(1, 3, 1, 1)
    return (images - mean) / std
