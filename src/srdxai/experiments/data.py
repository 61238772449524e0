"""The models and masked data the experiments run on: the offline zoo and its data sets."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = ["PLANTED_MODEL", "Source", "display_image", "load_batch", "load_model",
           "load_text_batch", "source_batch", "source_model", "text_classifier", "text_texts"]


@dataclass(frozen=True)
class Source:
    """A model and the masked data it is evaluated on."""

    model: str
    #: "fashion", "composites", "own" (the run's OwnSetup), "text-rt" (a shipped text model
    #: on the movie-review test sentences) or "text-planted" (a word CNN trained here on the
    #: synthetic planted-evidence task)
    dataset: str

    @property
    def is_text(self) -> bool:
        return self.dataset.startswith("text-")


#: the word CNN of the planted-evidence task, trained in the run (a few seconds, seeded)
PLANTED_MODEL = "planted-kim-cnn"


@cache
def text_classifier(name: str) -> Any:
    """A text model and its encoder (:class:`srdxai.text.zoo.TextClassifier`): a shipped one,
    or :data:`PLANTED_MODEL`, trained once per process on the planted-evidence task."""
    if name != PLANTED_MODEL:
        from ..text.zoo import load_text_classifier

        return load_text_classifier(name)
    from ..data.text import Vocabulary, make_planted_evidence
    from ..models.text import KimCNN
    from ..text.zoo import TextClassifier
    from ..text_training import evaluate_text_classifier, train_text_classifier

    splits = {s: make_planted_evidence(s, seed=0) for s in ("train", "val", "test")}
    vocabulary = Vocabulary.build(splits["train"].texts)
    encoded = {s: (*vocabulary.encode(list(split.texts)), split.labels)
               for s, split in splits.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = KimCNN(len(vocabulary), len(splits["train"].class_names), embed_dim=32,
                       filters=32, dropout=0.2)
    train_text_classifier(model, encoded["train"], encoded["val"], epochs=3, lr=3e-3,
                          batch_size=64, seed=0, progress=False)
    accuracy = evaluate_text_classifier(model, *encoded["test"])
    card = {"name": PLANTED_MODEL, "architecture": "kim-cnn", "test_accuracy": accuracy,
            "dataset": "srdxai.data.text.make_planted_evidence(seed=0)"}
    return TextClassifier(PLANTED_MODEL, model.eval(), card,
                          list(splits["train"].class_names), vocabulary=vocabulary)


@cache
def _text_split(dataset: str) -> Any:
    if dataset == "text-planted":
        from ..data.text import make_planted_evidence

        return make_planted_evidence("test", seed=0)
    from ..data.text import load_movie_reviews

    return load_movie_reviews("test", source="rt")


def text_texts(source: Source, indices: list[int]) -> list[str]:
    """The texts of ``indices`` of a text source's test split."""
    split = _text_split(source.dataset)
    return [split.texts[i] for i in indices]


def load_text_batch(source: Source, indices: list[int], device: str
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids ``(N, L)`` (padded to the longest), labels, and a mask ``(N, L)`` (int8):
    0 at padding, 1 at real tokens, 2 at the planted evidence tokens (``text-planted``)."""
    split = _text_split(source.dataset)
    bundle = text_classifier(source.model)
    ids, mask = bundle.encode(text_texts(source, indices))
    masks = mask.to(torch.int8)
    if source.dataset == "text-planted":
        evidence = split.evidence_mask(max_length=ids.shape[1])[indices]
        masks = torch.where(evidence & mask, torch.full_like(masks, 2), masks)
    return ids.to(device), split.labels[indices].to(device), masks.to(device)


@cache
def load_model(name: str, device: str) -> torch.nn.Module:
    """The zoo model ``name`` in eval mode on ``device`` (loaded once per process)."""
    from ..models import load

    return load(name).eval().to(device)


@cache
def _dataset(name: str) -> Any:
    if name == "fashion":
        from ..data.fashion import ClutteredFashionMNIST

        return ClutteredFashionMNIST("test")
    from ..data.composites import ImageNetComposites

    return ImageNetComposites()


def load_batch(source: Source, indices: list[int], device: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Model inputs, labels and object masks of ``indices``."""
    if source.dataset == "fashion":
        from ..data.fashion import normalize

        b = _dataset("fashion").batch(indices)
        x, y, masks = normalize(b.images), b.labels, b.masks
    else:
        from ..models import preprocess

        b = _dataset("composites").batch(indices)
        x = torch.cat([preprocess(img, source.model) for img in b.images])
        y, masks = b.labels, b.masks
    return x.to(device), y.to(device), masks.to(device)


def display_image(source: Source, index: int) -> tuple[np.ndarray, str]:
    """Sample ``index`` as ``uint8`` (H, W, 3) for a figure, and its label's class name."""
    if source.dataset == "fashion":
        from ..data.fashion import CLASS_NAMES

        batch = _dataset("fashion").batch([index])
        image = (batch.images[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255)
        return image.astype(np.uint8), CLASS_NAMES[int(batch.labels[0])]
    from ..data import imagenet_class_names

    batch = _dataset("composites").batch([index])
    return batch.images[0], imagenet_class_names()[int(batch.labels[0])]


def source_model(source: Source, config: Any) -> torch.nn.Module:
    """The model of ``source`` for a run with ``config`` (a BenchConfig): the zoo's, or yours."""
    if source.dataset == "own":
        from .own import own_model

        return own_model(config.own, config.device)
    if source.is_text:
        return text_classifier(source.model).model.to(config.device)
    return load_model(source.model, config.device)


def source_batch(source: Source, indices: list[int], config: Any
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inputs, labels (-1: none) and object masks (None: none) of ``indices``; for a text
    source token ids, labels and the token mask of :func:`load_text_batch`."""
    if source.dataset == "own":
        from .own import own_data

        x, y, masks = own_data(config.own).batch(indices)
        device = config.device
        return x.to(device), y.to(device), None if masks is None else masks.to(device)
    if source.is_text:
        return load_text_batch(source, indices, config.device)
    return load_batch(source, indices, config.device)
