"""Train the zoo's models on cluttered Fashion-MNIST, deterministically, on the CPU in minutes.

``srdxai train --arch resnet --activation elu --out DIR`` (or :func:`train`) writes
``DIR/fmnist-resnet-elu.pt`` (a state dict) and ``DIR/fmnist-resnet-elu.json``, the model card:
architecture, activation, data seed and sizes, optimiser settings, epochs, test accuracy on the
whole cluttered test split, wall time, torch version and the weight file's sha256. Both files are
written to a temporary name first and renamed, so an interrupted run leaves no half file.

Determinism: the weights' initialisation, the shuffling and the data (see
:mod:`srdxai.data.fashion`) all derive from ``seed`` / ``data_seed``; a rerun with the same
torch version and thread count reproduces the same weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from srdxai.data.fashion import MEAN, STD, ClutteredFashionMNIST, normalize
from srdxai.errors import InvalidInputError
from srdxai.models.checkpoint import sha256_file
from srdxai.models.zoo import SmallResNet, SmallVGG, canonical_activation, small_vit

__all__ = ["ARCHITECTURES", "TrainConfig", "build", "evaluate", "model_name", "sha256_file",
           "train"]

#: Zoo architectures by card name: ``builder(num_classes, activation) -> nn.Module``.
ARCHITECTURES: dict[str, Callable[[int, str], nn.Module]] = {
    "vgg": lambda k, act: SmallVGG(k, act),
    "resnet": lambda k, act: SmallResNet(k, act),
    "vit": lambda k, act: small_vit(k, act),
}
#: The card's quick-check subset: the first this many samples of the test split.
SUBSET_SIZE = 1000
#: The activation each architecture uses when none is given.
DEFAULT_ACTIVATION = {"vgg": "relu", "resnet": "relu", "vit": "gelu"}


def model_name(arch: str, activation: str) -> str:
    return f"fmnist-{arch}-{canonical_activation(activation)}"


def build(arch: str, activation: str, num_classes: int = 10) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise InvalidInputError(f"unknown architecture {arch!r}; use one of "
                                f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes, canonical_activation(activation))


@dataclass
class TrainConfig:
    arch: str = "resnet"
    activation: str | None = None
    epochs: int = 5
    train_size: int = 55000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    data_seed: int = 0
    canvas: int = 64
    test_size: int | None = None  # None: the whole test split

    def resolved(self) -> TrainConfig:
        act = self.activation or DEFAULT_ACTIVATION.get(self.arch, "relu")
        cfg = TrainConfig(**{**asdict(self), "activation": canonical_activation(act)})
        for field in ("epochs", "train_size", "batch_size"):
            value = getattr(cfg, field)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{field} must be a positive int, got {value!r}")
        if cfg.arch not in ARCHITECTURES:
            raise InvalidInputError(f"unknown architecture {cfg.arch!r}; use one of "
                                    f"{', '.join(ARCHITECTURES)}")
        if cfg.lr <= 0:
            raise InvalidInputError(f"lr must be positive, got {cfg.lr!r}")
        return cfg


def _render(dataset: ClutteredFashionMNIST, count: int, desc: str, progress: bool):
    """All ``count`` first samples as uint8 images (4x less memory than float32) and labels."""
    images = torch.empty(count, 3, dataset.canvas, dataset.canvas, dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.int64)
    step = 1000
    for start in tqdm(range(0, count, step), desc=desc, disable=not progress, unit="k"):
        b = dataset.batch(range(start, min(start + step, count)))
        images[start:start + len(b.labels)] = (b.images * 255).round().to(torch.uint8)
        labels[start:start + len(b.labels)] = b.labels
    return images, labels


def _as_input(images_uint8: torch.Tensor) -> torch.Tensor:
    return normalize(images_uint8.to(torch.float32) / 255.0)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``[0, 1]`` float or uint8 images."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            chunk = images[start:start + batch_size]
            x = _as_input(chunk) if chunk.dtype == torch.uint8 else normalize(chunk)
            correct += int((model(x).argmax(1) == labels[start:start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train(config: TrainConfig, out_dir: str | Path | None = None, progress: bool = True
          ) -> tuple[nn.Module, dict]:
    """Train one zoo model; returns it (eval mode) and its card; writes both when ``out_dir``."""
    cfg = config.resolved()
    name = model_name(cfg.arch, cfg.activation)
    torch.manual_seed(cfg.seed)
    model = build(cfg.arch, cfg.activation)
    train_set = ClutteredFashionMNIST("train", canvas=cfg.canvas, seed=cfg.data_seed,
                                      size=min(cfg.train_size, 55000))
    test_set = ClutteredFashionMNIST("test", canvas=cfg.canvas, seed=cfg.data_seed,
                                     size=cfg.test_size)
    start_time = time.perf_counter()
    images, labels = _render(train_set, len(train_set), "render train", progress)
    test_images, test_labels = _render(test_set, len(test_set), "render test", progress)

    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=shuffle)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, unit="batch")
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            loss = loss_fn(model(_as_input(images[idx])), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    accuracy = evaluate(model, test_images, test_labels)
    subset = min(SUBSET_SIZE, len(test_labels))
    subset_accuracy = evaluate(model, test_images[:subset], test_labels[:subset])
    card = {
        "name": name,
        "architecture": cfg.arch,
        "activation": cfg.activation,
        "num_classes": 10,
        "labels": "fashion-mnist",
        "input_size": cfg.canvas,
        "mean": list(MEAN),
        "std": list(STD),
        "data": {"dataset": "cluttered-fashion-mnist", "data_seed": cfg.data_seed,
                 "canvas": cfg.canvas, "train_size": len(labels),
                 "test_size": len(test_labels)},
        "training": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                     "weight_decay": cfg.weight_decay, "seed": cfg.seed,
                     "optimiser": "AdamW + one-cycle", "seconds":
                     round(time.perf_counter() - start_time, 1),
                     "threads": torch.get_num_threads()},
        "test_accuracy": round(accuracy, 4),
        # the first SUBSET_SIZE test samples: a quick check that a load reproduces the model
        "test_subset": {"size": subset, "accuracy": round(subset_accuracy, 4)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_version": torch.__version__.split("+")[0],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = out / f"{name}.pt"
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        _write_atomic(weights, lambda p: torch.save(state, p))
        card["weights"] = weights.name
        card["sha256"] = sha256_file(weights)
        _write_atomic(out / f"{name}.json",
                      lambda p: p.write_text(json.dumps(card, indent=2) + "\n", "utf-8"))
    return model, card
