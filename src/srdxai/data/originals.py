"""Loaders for the seeds' original data, from local files: ImageNet-S and CIFAR-100.

Nothing is downloaded; point ``root`` at your copy.

**ImageNet-S** (Gao et al.; SRD's Table 2 uses ImageNet-S50, 752 validation images)::

    ROOT/validation/<wnid>/<image>.JPEG
    ROOT/validation-segmentation/<wnid>/<image>.png   # class id = R + 256 * G; 0 background,
                                                      # 1000 "other/ignore"

The image's label is its folder's wnid mapped to the ImageNet-1k class index by a synset file
with one wnid per line in class-index order (ImageNet's ``LOC_synset_mapping.txt``:
``n01440764 tench, Tinca tinca``), given as ``synsets=`` or found as
``ROOT/LOC_synset_mapping.txt``. The mask is every pixel with a class id other than 0 and 1000.
The paper's preprocessing: resize the shorter side to 256 (bilinear; masks nearest), centre-crop
224, ImageNet mean/std.

**CIFAR-100** (the activation table's data): the python version,
``ROOT/cifar-100-python/{train,test}`` (or ``ROOT`` being that folder). The pickles are read
by ``srdxai.data.safe_pickle``, which only admits numpy arrays of plain numeric dtypes and plain
containers and bounds the memory and time a file can cost, so a tampered file can neither run
code nor exhaust the machine; the structure is then checked by type before any conversion.
Images are normalised with the CIFAR-100 mean/std; ``fine`` (100) or ``coarse`` (20)
labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from srdxai.data.safe_pickle import PickledArray, load_pickle
from srdxai.errors import InvalidInputError, SrdxaiError

__all__ = ["CIFAR100", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
           "ImageNetS", "ImageNetSSample", "imagenet_transform", "read_synsets"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_IGNORE = 1000
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def read_synsets(path: str | Path) -> dict[str, int]:
    """wnid -> ImageNet-1k index from a file with one ``wnid [description]`` per line."""
    try:
        lines = Path(path).read_text("utf-8").splitlines()
    except OSError as exc:
        raise SrdxaiError(f"cannot read the synset file {path}: {exc}") from exc
    wnids = [line.split()[0] for line in lines if line.strip()]
    if not wnids or not all(w.startswith("n") and w[1:].isdigit() for w in wnids):
        raise SrdxaiError(f"{path} is not a synset list (one 'nXXXXXXXX ...' per line)")
    return {w: i for i, w in enumerate(wnids)}


def _normalize(x: Tensor, mean, std) -> Tensor:
    return (x - torch.tensor(mean).reshape(3, 1, 1)) / torch.tensor(std).reshape(3, 1, 1)


def imagenet_transform(image, mask=None, size: int = 224, resize: int = 256):
    """The paper's preprocessing of a PIL image (and its PIL mask): shorter side to ``resize``,
    centre crop ``size``, ImageNet mean/std. Returns ``(3, size, size)`` float32 (and the mask
    cropped alike, nearest-neighbour)."""
    from PIL import Image

    w, h = image.size
    scale = resize / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    box = (left, top, left + size, top + size)
    image = image.convert("RGB").resize(new, Image.Resampling.BILINEAR).crop(box)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = _normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    if mask is None:
        return x
    return x, mask.resize(new, Image.Resampling.NEAREST).crop(box)


@dataclass(frozen=True)
class ImageNetSSample:
    image: Tensor  # (3, 224, 224) normalised
    label: int  # ImageNet-1k class index
    mask: Tensor  # (224, 224) bool: the labelled object pixels
    path: str


class ImageNetS:
    """ImageNet-S images with segmentation masks (see the module doc for the layout)."""

    def __init__(self, root: str | Path, split: str = "validation",
                 synsets: str | Path | dict[str, int] | None = None, size: int = 224):
        self.root = Path(root)
        images_dir = self.root / split
        masks_dir = self.root / f"{split}-segmentation"
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise SrdxaiError(f"ImageNet-S folder {d} does not exist; expected "
                                  f"ROOT/{split}/<wnid>/*.JPEG and "
                                  f"ROOT/{split}-segmentation/<wnid>/*.png")
        if synsets is None:
            synsets = self.root / "LOC_synset_mapping.txt"
            if not synsets.is_file():
                raise SrdxaiError(
                    f"no synset list to map wnids to ImageNet-1k classes: pass synsets= "
                    f"(ImageNet's LOC_synset_mapping.txt) or put it at {synsets}")
        self.wnid_to_index = synsets if isinstance(synsets, dict) else read_synsets(synsets)
        self.size = size
        self.samples: list[tuple[Path, Path, int]] = []
        for image_path in sorted(images_dir.glob("*/*")):
            if image_path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            wnid = image_path.parent.name
            if wnid not in self.wnid_to_index:
                raise SrdxaiError(f"wnid {wnid} of {image_path} is not in the synset list")
            mask_path = masks_dir / wnid / (image_path.stem + ".png")
            if not mask_path.is_file():
                raise SrdxaiError(f"{image_path} has no mask {mask_path}")
            self.samples.append((image_path, mask_path, self.wnid_to_index[wnid]))
        if not self.samples:
            raise SrdxaiError(f"no images found under {images_dir}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ImageNetSSample:
        from PIL import Image

        image_path, mask_path, label = self.samples[index]
        with Image.open(image_path) as im, Image.open(mask_path) as m:
            x, mask = imagenet_transform(im, m.convert("RGB"), self.size)
        rgb = np.asarray(mask, dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1]
        return ImageNetSSample(x, label, torch.from_numpy((ids != 0) & (ids != _IGNORE)),
                               str(image_path))


def _cifar_fields(entry: object, path: Path, labels: str) -> tuple[np.ndarray, list]:
    """The image array and the label list of a CIFAR-100 pickle, checked by type first.

    Nothing is converted before its type is known: a list of lists handed to numpy is walked
    element by element, and a few hundred bytes of memo references can alias one 2**60 times."""
    if not isinstance(entry, dict):
        raise InvalidInputError(f"{path} is not a CIFAR-100 python pickle: it holds a "
                                f"{type(entry).__name__}, not a dict")

    def field(name: str) -> object:
        # the originals were pickled by Python 2: their str keys read as bytes
        return entry.get(name.encode(), entry.get(name))

    key = "fine_labels" if labels == "fine" else "coarse_labels"
    data, label_list = field("data"), field(key)
    if data is None or label_list is None:
        raise InvalidInputError(f"{path} is not a CIFAR-100 python pickle (no data / "
                                f"{key.encode()!r})")
    if not isinstance(data, PickledArray):
        raise InvalidInputError(f"{path}: data is a {type(data).__name__}, not a numpy array")
    images = data.array()
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise InvalidInputError(f"{path}: data of shape {images.shape} and dtype {images.dtype} "
                                "is not N x 3072 uint8")
    if not isinstance(label_list, list) or len(label_list) != len(images):
        count = len(label_list) if isinstance(label_list, list) else type(label_list).__name__
        raise InvalidInputError(f"{path}: {key} must be a list of one label per image "
                                f"({len(images)}), found {count}")
    for value in label_list:
        if type(value) is not int and not isinstance(value, np.integer):
            raise InvalidInputError(f"{path}: {key} holds a {type(value).__name__}; a CIFAR-100 "
                                    "file has one integer label per image")
    return images, label_list


class CIFAR100:
    """CIFAR-100 from the python pickles: ``images`` float32 ``(N, 3, 32, 32)`` normalised,
    ``labels`` int64 ``(N,)``."""

    def __init__(self, root: str | Path, split: str = "test", labels: str = "fine"):
        if split not in ("train", "test"):
            raise InvalidInputError(f"split must be 'train' or 'test', got {split!r}")
        if labels not in ("fine", "coarse"):
            raise InvalidInputError(f"labels must be 'fine' or 'coarse', got {labels!r}")
        root = Path(root)
        folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        path = folder / split
        if not path.is_file():
            raise SrdxaiError(f"CIFAR-100 file {path} does not exist; expected "
                              "ROOT/cifar-100-python/{train,test} (the python version)")
        entry = load_pickle(path, "CIFAR-100 file")
        data, label_list = _cifar_fields(entry, path, labels)
        classes = 100 if labels == "fine" else 20
        try:
            label_array = np.array(label_list, dtype=np.int64)  # plain integers: checked above
        except OverflowError:
            label_array = None
        if label_array is None or (label_array.size and not (
                0 <= label_array.min() and label_array.max() < classes)):
            raise InvalidInputError(f"{path}: {labels} labels must lie in 0..{classes - 1}")
        x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        self.images = _normalize(x, CIFAR100_MEAN, CIFAR100_STD)
        self.labels = torch.from_numpy(label_array)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])
