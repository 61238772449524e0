"""The trained model zoo shipped inside the package: weights, model cards, checksums.

``src/srdxai/models/weights/NAME.json`` is a model card written by ``srdxai train`` (see
:mod:`srdxai.training`); ``NAME.pt`` beside it holds the state dict. Loading checks the file's
sha256 against the card before ``torch.load(..., weights_only=True)``, then loads the state
dict strictly into the architecture the card names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from srdxai.errors import SrdxaiError
from srdxai.models.base import ModelInfo, ModelSpec

__all__ = ["WEIGHTS_DIR", "load_checkpoint", "read_card", "specs", "verify_sha256"]

WEIGHTS_DIR = Path(str(resources.files("srdxai.models").joinpath("weights")))


_RESTORE_HINT = ("restore it from the repository (git checkout) or retrain it with "
                 "'srdxai train'")


def verify_sha256(path: Path, expected: str, what: str, hint: str = _RESTORE_HINT) -> None:
    """Raise a clear :class:`SrdxaiError` unless ``path`` exists and has the sha256 ``expected``."""
    if not path.is_file():
        raise SrdxaiError(f"the weight file for {what} is missing: {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise SrdxaiError(
            f"the weight file for {what} ({path}) fails its checksum (sha256 "
            f"{digest.hexdigest()[:16]}..., expected {expected[:16]}...): it is corrupt or not "
            f"the file its card describes; {hint}")


def load_checkpoint(model: torch.nn.Module, path: Path, what: str) -> torch.nn.Module:
    """Load a state-dict file into ``model`` (strict, ``weights_only=True``) with clear errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise SrdxaiError(f"cannot read the weight file for {what} ({path}): "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}; "
                          "the file is probably corrupt") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise SrdxaiError(f"the weight file for {what} ({path}) does not hold a state dict "
                          "of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise SrdxaiError(f"the weight file for {what} ({path}) does not match its "
                          f"architecture: {' '.join(first[:3])}") from exc
    return model.eval()


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
            verify_sha256(path, card["sha256"], repr(name))
        model = build(card["architecture"], card["activation"], card["num_classes"])
        return load_checkpoint(model, path, repr(name))

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
