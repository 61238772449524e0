"""The trained model zoo shipped inside the package: weights, model cards, checksums.

``src/srdxai/models/weights/NAME.json`` is a model card written by ``srdxai train`` (see
:mod:`srdxai.training`); ``NAME.pt`` beside it holds the state dict. Loading checks the file's
sha256 against the card before ``torch.load(..., weights_only=True)``, then loads the state
dict strictly into the architecture the card names.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from srdxai.errors import SrdxaiError
from srdxai.models.base import ModelInfo, ModelSpec
from srdxai.models.checkpoint import load_checkpoint, verify_sha256

__all__ = ["WEIGHTS_DIR", "cards", "read_card", "specs"]

WEIGHTS_DIR = Path(str(resources.files("srdxai.models").joinpath("weights")))


_RESTORE_HINT = ("restore it from the repository (git checkout) or retrain it with "
                 "'srdxai train'")


def read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SrdxaiError(f"cannot read the model card {path}: {exc}") from exc
    missing = {"name", "architecture", "activation", "num_classes", "input_size", "mean", "std",
               "weights", "sha256", "test_accuracy"} - set(card)
    if missing:
        raise SrdxaiError(f"the model card {path} lacks {', '.join(sorted(missing))}")
    return card


def _spec(card_path: Path) -> ModelSpec:
    card = read_card(card_path)
    name = card["name"]

    def load(weights_path: str | Path | None = None) -> torch.nn.Module:
        from srdxai.training import build

        path = Path(weights_path) if weights_path is not None else \
            card_path.with_name(card["weights"])
        if weights_path is None:  # a user's own file has no card to check against
            verify_sha256(path, card["sha256"], repr(name), _RESTORE_HINT)
        model = build(card["architecture"], card["activation"], card["num_classes"])
        return load_checkpoint(model, path, repr(name), _RESTORE_HINT)

    info = ModelInfo(
        name=name, input_size=int(card["input_size"]), mean=tuple(card["mean"]),
        std=tuple(card["std"]), resize="none: cluttered Fashion-MNIST canvases are generated "
        f"at {card['input_size']}x{card['input_size']}", num_classes=int(card["num_classes"]),
        labels=card.get("labels", "fashion-mnist"),
        description=(f"{card['architecture']} with {card['activation']} trained on cluttered "
                     f"Fashion-MNIST; test accuracy {card['test_accuracy']:.4f}"))
    return ModelSpec(info=info, load=load)


@lru_cache(maxsize=1)
def specs() -> dict[str, ModelSpec]:
    """Every shipped model, by name (from the cards in :data:`WEIGHTS_DIR`)."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.stem: _spec(p) for p in sorted(WEIGHTS_DIR.glob("*.json"))}


def cards() -> dict[str, dict]:
    """The shipped model cards, by name."""
    return {p.stem: read_card(p) for p in sorted(WEIGHTS_DIR.glob("*.json"))}
