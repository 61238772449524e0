"""Your model and your data in ``srdxai bench``: the ``evaluate`` experiment's setup.

The model is built from a timm or torchvision architecture name or a ``module:function``
builder with a weight file (``srdxai.models.user``), or handed over as an ``nn.Module`` from
Python. The data is a folder of images (class sub-folders give the labels, an optional
``masks/`` folder the object masks) or, from Python, any iterable of ``(x, y)`` or
``(x, y, masks)`` tensors. Everything that decides the numbers goes into the run's configuration
(and its hash): the model's and the data's identity (a fingerprint of the weights and of the
images for objects handed over from Python), the methods, the metrics. The run is resumable and
shards under ``torchrun`` like every ``srdxai bench`` run.

Folder layout::

    DATA/cat/0001.jpg            images, any depth; the first folder is the class (optional)
    DATA/dog/0002.png
    DATA/masks/cat/0001.png      optional: one mask per image, same path, any image suffix;
                                 non-zero pixels are the object

Maps can be saved (``save_maps``: a float32 ``.npz`` per unit, stored in the run's database with
the configuration hash) and read back with :func:`saved_maps`, or reused by a later run with other
metrics (``maps_from``), which then re-explains nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError

Tensor = torch.Tensor

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "OwnSetup", "evaluate", "saved_maps"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: the methods and metrics of an evaluation when none are named
DEFAULT_METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "gradcam", "srd")
DEFAULT_METRICS = ("faithfulness_correlation", "mu_fidelity", "insertion", "deletion",
                   "sparseness")
#: added to the defaults when the data has object masks
DEFAULT_MASK_METRICS = ("pointing_game", "attribution_localisation", "relevance_mass_accuracy")


@dataclass
class OwnSetup:
    """The model, data, methods and metrics of an ``evaluate`` run (stored in its
    configuration; see the module docstring)."""

    #: how the model is named in the results
    model_name: str = "model"
    arch: str | None = None
    builder: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    #: a fingerprint of the weights of a model handed over from Python (None: built)
    model_fingerprint: str | None = None
    #: a folder of images, or the name of data handed over from Python
    data: str = ""
    #: a fingerprint of data handed over from Python (None: the folder)
    data_fingerprint: str | None = None
    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    classes: str | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    metrics: list[str] | None = None  # None: DEFAULT_METRICS (+ the mask metrics with masks)
    #: "label" (the data's labels; the predicted class where there are none) or "predicted"
    targets: str = "label"
    save_maps: bool = False
    #: a previous run's directory whose saved maps replace explaining (same model, data and
    #: methods)
    maps_from: str | None = None

    def check(self) -> None:
        """Refuse what cannot run, naming it and what to do, before any work."""
        from ..methods import METHODS
        from ..metrics import METRICS

        if self.model_fingerprint is None and (self.arch is None) == (self.builder is None):
            raise InvalidInputError("your model: give exactly one of --arch (a timm or "
                                    "torchvision name) and --builder (module:function)")
        if not self.data:
            raise InvalidInputError("your data: give --data DIR (a folder of images)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InvalidInputError(
                f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                "`srdxai methods` lists them")
        if len(set(self.methods)) != len(self.methods):
            raise InvalidInputError(f"a method is named twice in {self.methods}")
        if self.metrics is not None:
            unknown = [m for m in self.metrics if m not in METRICS]
            if unknown or not self.metrics:
                raise InvalidInputError(
                    f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                    "`srdxai metrics` lists them")
            if "gae" in self.metrics:
                raise InvalidInputError(
                    "gae scores mosaics of four images of different classes, not single "
                    "images: use `srdxai bench --experiments gae` on the shipped models, or "
                    "srdxai.metrics.gae on your own groups of four")
        if self.targets not in ("label", "predicted"):
            raise InvalidInputError(f"targets must be 'label' or 'predicted', got "
                                    f"{self.targets!r}")

    def metric_names(self, has_masks: bool) -> list[str]:
        if self.metrics is not None:
            return list(self.metrics)
        return list(DEFAULT_METRICS) + (list(DEFAULT_MASK_METRICS) if has_masks else [])


# --- data ---------------------------------------------------------------------------------------

class ImageFolder:
    """A folder of images with optional class sub-folders and masks (module docstring),
    prepared for a model of input ``size`` with ``mean`` and ``std``."""

    def __init__(self, root: str | Path, size: int = 224,
                 mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225),
                 class_names: Sequence[str] | None = None):
        from ..models.user import image_spec

        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidInputError(f"data folder not found: {self.root}")
        self.spec = image_spec(size, mean, std)
        masks_dir = self.root / "masks"
        self.paths = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                            and masks_dir not in p.parents)
        if not self.paths:
            raise InvalidInputError(
                f"{self.root} holds no images ({', '.join(IMAGE_SUFFIXES)}); put them there, "
                "in class sub-folders if they have labels")
        relative = [p.relative_to(self.root) for p in self.paths]
        folders = [r.parts[0] if len(r.parts) > 1 else None for r in relative]
        self.labels = self._labels(folders, class_names)
        self.mask_paths = self._masks(masks_dir, relative)

    def _labels(self, folders: list[str | None], class_names: Sequence[str] | None
                ) -> list[int] | None:
        if all(f is None for f in folders):
            return None
        loose = [str(p) for p, f in zip(self.paths, folders, strict=True) if f is None]
        if loose:
            raise InvalidInputError(
                f"{len(loose)} image(s) lie outside a class folder (e.g. {loose[0]}) while "
                "others are in class folders: put every image in its class folder, or none")
        names = sorted({f for f in folders if f is not None})
        if class_names is not None:
            index = {name: i for i, name in enumerate(class_names)}
            missing = [n for n in names if n not in index]
            if missing:
                raise InvalidInputError(
                    f"class folder(s) {missing} are not in the class names file; name each "
                    "folder after its class")
            return [index[f] for f in folders if f is not None]
        if all(n.isdigit() for n in names):
            return [int(f) for f in folders if f is not None]
        position = {name: i for i, name in enumerate(names)}  # torchvision's ImageFolder
        return [position[f] for f in folders if f is not None]

    def _masks(self, masks_dir: Path, relative: list[Path]) -> list[Path] | None:
        if not masks_dir.is_dir():
            return None
        found: list[Path] = []
        missing = []
        for r in relative:
            candidates = [masks_dir / r.with_suffix(s) for s in IMAGE_SUFFIXES]
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is None:
                missing.append(str(r))
            else:
                found.append(hit)
        if missing:
            raise InvalidInputError(
                f"{masks_dir} lacks the mask of {len(missing)} image(s), e.g. {missing[0]}: "
                "give every image a mask (same path, any image suffix) or remove masks/")
        return found

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_masks(self) -> bool:
        return self.mask_paths is not None

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Model inputs (B, 3, size, size), labels (-1 where there are none) and masks."""
        from ..models.user import preprocess

        x = torch.cat([preprocess(_read_rgb(self.paths[i]), self.spec) for i in indices])
        y = torch.tensor([self.labels[i] if self.labels is not None else -1 for i in indices])
        if self.mask_paths is None:
            return x, y, None
        masks = torch.stack([self._mask(self.mask_paths[i]) for i in indices])
        return x, y, masks

    def _mask(self, path: Path) -> Tensor:
        from ..models.user import prepare

        gray = np.asarray(_read_image(path).convert("L"))
        rgb = np.repeat(((gray > 0) * 255).astype(np.uint8)[..., None], 3, axis=2)
        return torch.from_numpy(prepare(rgb, self.spec)[..., 0] > 127)


def _read_image(path: Path) -> Any:
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
        return image
    except Exception as exc:  # PIL raises many kinds for unreadable files
        raise InvalidInputError(f"cannot read the image {path}: {exc}") from exc


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(_read_image(path).convert("RGB"))


class TensorData:
    """Data handed over from Python: ``(x, y)`` or ``(x, y, masks)`` items, each a batch or a
    single sample, gathered into tensors."""

    def __init__(self, items: Iterable[Any]):
        xs, ys, ms = [], [], []
        for k, item in enumerate(items):
            if not isinstance(item, tuple | list) or len(item) not in (2, 3):
                raise InvalidInputError(
                    f"data item {k} must be (x, y) or (x, y, masks), got "
                    f"{type(item).__name__}")
            x = torch.as_tensor(item[0])
            if x.dim() == 3:
                x = x[None]
            if x.dim() != 4:
                raise InvalidInputError(f"data item {k}: x must be (C, H, W) or (B, C, H, W), "
                                        f"got shape {tuple(x.shape)}")
            y = torch.as_tensor(item[1]).reshape(-1).long()
            if y.numel() != x.shape[0]:
                raise InvalidInputError(f"data item {k}: {x.shape[0]} images but {y.numel()} "
                                        "labels")
            xs.append(x)
            ys.append(y)
            if len(item) == 3:
                m = torch.as_tensor(item[2]).bool()
                ms.append(m[None] if m.dim() == 2 else m.reshape(x.shape[0], *x.shape[2:]))
        if not xs:
            raise InvalidInputError("the data is empty")
        if ms and len(ms) != len(xs):
            raise InvalidInputError("give masks with every data item or with none")
        try:
            self.x, self.y = torch.cat(xs), torch.cat(ys)
        except RuntimeError as exc:
            raise InvalidInputError(f"the data's images differ in shape: {exc}") from exc
        self.masks = torch.cat(ms) if ms else None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor | None]:
        index = torch.as_tensor(list(indices))
        return (self.x[index], self.y[index],
                None if self.masks is None else self.masks[index])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.x, self.y) + (() if self.masks is None else (self.masks,)):
            _hash_tensor(h, t)
        return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class and its parameters and buffers."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()[:16]


def _hash_tensor(h: Any, t: Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes to the hash ``h`` (as bytes, so that dtypes
    numpy lacks, bfloat16, hash too)."""
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


#: models and data handed over from Python in this process, by fingerprint
_HANDED_OVER: dict[str, Any] = {}


def _handed_over(fingerprint: str, what: str, same: str) -> Any:
    """The object handed over from Python under ``fingerprint``; a clear error in a process
    that does not have it (a resumed run started from the command line)."""
    if fingerprint not in _HANDED_OVER:
        raise InvalidInputError(
            f"this run's {what} was handed over from Python and is not loaded in this process: "
            f"resume it with srdxai.experiments.evaluate(...) and the same {same}")
    return _HANDED_OVER[fingerprint]


def _key(setup: OwnSetup) -> str:
    return json.dumps(asdict(setup), sort_keys=True)


@cache
def _model_for(key: str, device: str) -> nn.Module:
    setup = OwnSetup(**json.loads(key))
    if setup.model_fingerprint is not None:
        return _handed_over(setup.model_fingerprint, f"model ({setup.model_name})",
                            "model").eval().to(device)
    from ..models.user import build_model

    return build_model(setup.arch, setup.builder, setup.weights, setup.num_classes).to(device)


@cache
def _data_for(key: str) -> ImageFolder | TensorData:
    setup = OwnSetup(**json.loads(key))
    if setup.data_fingerprint is not None:
        return _handed_over(setup.data_fingerprint, f"data ({setup.data})", "data")
    names = None
    if setup.classes is not None:
        from ..models.user import read_class_names

        names = read_class_names(setup.classes)
    return ImageFolder(setup.data, setup.size, setup.mean, setup.std, names)


def own_model(setup: OwnSetup, device: str) -> nn.Module:
    """The run's model in eval mode on ``device`` (built once per process)."""
    return _model_for(_key(setup), device)


def own_data(setup: OwnSetup) -> ImageFolder | TensorData:
    """The run's data (read once per process)."""
    return _data_for(_key(setup))


# --- saved maps ---------------------------------------------------------------------------------

def maps_name(model: str, method: str, unit: int) -> str:
    return f"maps/{model}/{method}/{unit}"


def pack_maps(samples: Sequence[int], maps: Tensor, config_hash: str) -> bytes:
    """A unit's maps as ``.npz`` bytes: ``samples``, ``maps`` (float32: float16 would be too
    coarse for recomputed metrics) and the configuration hash they were made under."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, samples=np.asarray(list(samples), dtype=np.int64),
                        maps=maps.detach().float().cpu().numpy(),
                        config_hash=np.asarray(config_hash))
    return buffer.getvalue()


def saved_maps(run_dir: str | Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """The maps an ``evaluate`` run saved (``save_maps``), by (model, method): the sample
    indices (S,) and the maps (S, ...) in sample order."""
    from ..report import tables
    from .store import merged_path

    db = merged_path(Path(run_dir))
    found: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, data in tables.artifacts(db, "maps"):
        pieces = name.split("/")  # maps/<model>/<method>/<unit>; a model name may hold "/"
        model, method = "/".join(pieces[1:-2]), pieces[-2]
        with np.load(io.BytesIO(data)) as z:
            found.setdefault((model, method), []).append((z["samples"], z["maps"]))
    out = {}
    for key, chunks in found.items():
        samples = np.concatenate([s for s, _ in chunks])
        maps = np.concatenate([m for _, m in chunks])
        order = np.argsort(samples, kind="stable")
        out[key] = (samples[order], maps[order])
    return out


# --- the Python entry point ---------------------------------------------------------------------

def evaluate(run_dir: str | Path, model: nn.Module | None = None, data: Any = None, *,
             methods: Sequence[str] = DEFAULT_METHODS, metrics: Sequence[str] | None = None,
             model_name: str = "model", data_name: str = "data", samples: int | None = None,
             batch_size: int = 8, seed: int = 0, targets: str = "label",
             save_maps: bool = False, maps_from: str | Path | None = None,
             device: str = "cpu", progress: bool = True, setup: OwnSetup | None = None
             ) -> Path | None:
    """Evaluate ``methods`` on your ``model`` and ``data`` with ``metrics`` into ``run_dir``
    (SQLite, resumable; ``srdxai report run_dir`` writes the report).

    ``model``: an ``nn.Module`` returning ``(batch, classes)`` logits. ``data``: a folder of
    images (prepared for a 224 x 224 ImageNet-normalised model; give ``setup`` for other sizes)
    or an iterable of ``(x, y)`` / ``(x, y, masks)`` tensors, batches or single samples, already
    prepared for the model. ``metrics``: registered names (``srdxai metrics``; default: five
    faithfulness and complexity metrics, plus three localisation ones when there are masks).
    ``samples``: at most this many (the first). ``save_maps``: keep every map (see
    :func:`saved_maps`); ``maps_from``: a previous run with the same model, data and methods
    whose saved maps are scored instead of explaining again. ``setup``: the whole
    :class:`OwnSetup` (e.g. an architecture name and weight file instead of ``model``).
    Returns the merged database (rank 0; None on other ``torchrun`` ranks)."""
    from .config import BenchConfig
    from .runner import run

    if setup is not None and (model is not None or data is not None):
        raise InvalidInputError("give the model and data either as model=/data= or inside "
                                "setup=, not both")
    if setup is None:
        setup = OwnSetup(model_name=model_name, methods=list(methods),
                         metrics=None if metrics is None else list(metrics), targets=targets,
                         save_maps=save_maps,
                         maps_from=None if maps_from is None else str(maps_from))
        if model is not None:
            if not isinstance(model, nn.Module):
                raise InvalidInputError(f"model must be a torch.nn.Module, got "
                                        f"{type(model).__name__}")
            setup.model_fingerprint = model_fingerprint(model)
            _HANDED_OVER[setup.model_fingerprint] = model
        if isinstance(data, str | Path):
            setup.data = str(data)
        elif data is not None:
            handed = TensorData(data)
            setup.data, setup.data_fingerprint = data_name, handed.fingerprint()
            _HANDED_OVER[setup.data_fingerprint] = handed
    config = BenchConfig(experiments=["evaluate"], seed=seed, batch_size=batch_size,
                         samples=samples, device=device, own=setup)
    return run(Path(run_dir), config, progress=progress)
