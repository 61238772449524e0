"""Training, evaluating, saving and loading the text classifiers of :mod:`srdxai.models.text`.

:func:`train_text_classifier` runs Adam over shuffled mini-batches and keeps the weights of the
epoch with the best validation accuracy. It is deterministic on the CPU given ``seed``: the
shuffling uses its own generator and the dropout masks come from the global generator, seeded
inside :func:`torch.random.fork_rng` so the caller's random state is left as it was.

Every batch is cut after its last real token: the models are padding invariant, so this changes
no result, and the step-by-step LSTM does not run over columns of padding only.

:func:`save_text_model` writes ``NAME.pt`` (a state dict) and ``NAME.json`` (the card: the
architecture and its constructor arguments, plus what the caller adds: vocabulary file, accuracy,
training time, data set, seed), each to a temporary file first and renamed, so an interrupted
save leaves no half file; :func:`load_text_model` rebuilds the architecture from the card and
reads the weights with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from srdxai.errors import InvalidInputError, UnknownModelError
from srdxai.models.checkpoint import first_line, sha256_file
from srdxai.models.text import (
    MINILM_PACKAGE,
    KimCNN,
    LSTMClassifier,
    MiniLMClassifier,
    import_transformers,
)
from srdxai.report.figures import write_atomic

__all__ = [
    "TEXT_ARCHITECTURES",
    "TextTrainResult",
    "evaluate_text_classifier",
    "load_text_model",
    "save_text_model",
    "train_text_classifier",
]

#: Card name of each architecture and its class.
TEXT_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "kim-cnn": KimCNN,
    "lstm": LSTMClassifier,
    "minilm": MiniLMClassifier,
}

TextSplit = tuple[Tensor, Tensor | None, Tensor]


@dataclass
class TextTrainResult:
    """What :func:`train_text_classifier` did; ``model`` holds the best epoch's weights."""

    model: nn.Module
    best_epoch: int  # 1-based
    best_val_accuracy: float
    train_loss: list[float] = field(default_factory=list)  # mean loss of each epoch
    val_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time of each epoch

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds))


def _split(data: Any, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """Checked ``(ids, mask, labels)``; a ``None`` mask becomes ``ids != 0``."""
    if not isinstance(data, tuple | list) or len(data) != 3:
        raise InvalidInputError(f"{what} must be a tuple (ids, mask, labels)")
    ids, mask, labels = data
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (
            torch.int64, torch.int32):
        raise InvalidInputError(f"{what} ids must be a (N, L) integer tensor")
    if mask is None:
        mask = ids != 0
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise InvalidInputError(f"{what} mask must be a tensor of the ids' shape "
                                f"{tuple(ids.shape)}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or len(labels) != len(ids):
        raise InvalidInputError(f"{what} labels must be a (N,) tensor with N = {len(ids)}")
    if len(ids) == 0:
        raise InvalidInputError(f"{what} is empty")
    return ids.long(), mask != 0, labels.long()


def _trimmed(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing columns that are padding in every row (exact for these models)."""
    used = mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return ids[:, :length], mask[:, :length]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    return value


@torch.no_grad()
def evaluate_text_classifier(model: nn.Module, ids: Tensor, mask: Tensor | None, labels: Tensor,
                             batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``ids`` / ``mask`` (``None``: ``ids != 0``) / ``labels``,
    in eval mode (the model's mode is restored afterwards)."""
    ids, mask, labels = _split((ids, mask, labels), "evaluation data")
    batch_size = _positive_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            b_ids, b_mask = _trimmed(ids[start:start + batch_size], mask[start:start + batch_size])
            predicted = model(b_ids, b_mask).argmax(dim=1)
            correct += int((predicted == labels[start:start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


def train_text_classifier(model: nn.Module, train: TextSplit, val: TextSplit, epochs: int = 5,
                          lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 0.0,
                          seed: int = 0, progress: bool = True) -> TextTrainResult:
    """Train ``model`` with Adam on ``train = (ids, mask, labels)``, check it on ``val`` after
    every epoch and leave in it the weights of the best validation accuracy (eval mode).

    Deterministic on the CPU for a given ``seed``, torch version and thread count.
    """
    ids, mask, labels = _split(train, "train")
    val_ids, val_mask, val_labels = _split(val, "val")
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    if not lr > 0:
        raise InvalidInputError(f"lr must be positive, got {lr!r}")
    if weight_decay < 0:
        raise InvalidInputError(f"weight_decay must be >= 0, got {weight_decay!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise InvalidInputError("the model has no trainable parameters")
    optimiser = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(labels) / batch_size)
    result = TextTrainResult(model=model, best_epoch=0, best_val_accuracy=-1.0)
    best_state: dict[str, Tensor] | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        for epoch in range(epochs):
            start_time = time.perf_counter()
            model.train()
            order = torch.randperm(len(labels), generator=shuffle)
            total = 0.0
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                       unit="batch", leave=False)
            for step in bar:
                idx = order[step * batch_size:(step + 1) * batch_size]
                b_ids, b_mask = _trimmed(ids[idx], mask[idx])
                loss = loss_fn(model(b_ids, b_mask), labels[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.close()
            accuracy = evaluate_text_classifier(model, val_ids, val_mask, val_labels)
            result.train_loss.append(total / len(labels))
            result.val_accuracy.append(accuracy)
            result.seconds.append(time.perf_counter() - start_time)
            if progress:
                tqdm.write(f"epoch {epoch + 1}/{epochs}: train loss {total / len(labels):.4f}, "
                           f"val accuracy {accuracy:.4f}")
            if accuracy > result.best_val_accuracy:
                result.best_val_accuracy, result.best_epoch = accuracy, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


# --- saving and loading -------------------------------------------------------------------------


def _architecture_name(model: nn.Module) -> str:
    for name, cls in TEXT_ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise UnknownModelError(
        f"cannot save a {type(model).__name__}: not one of the text architectures "
        f"({', '.join(c.__name__ for c in TEXT_ARCHITECTURES.values())})")


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".pt", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".pt"), path.with_name(path.name + ".json")


def _saved_state(model: nn.Module) -> tuple[dict[str, Tensor], bool]:
    """The state dict to write, and whether it leaves out the encoder: a frozen pretrained
    MiniLM encoder is the package's, so only the head is written (1.5 kB instead of 90 MB)."""
    state = model.state_dict()
    head_only = isinstance(model, MiniLMClassifier) and model.pretrained_encoder and \
        model.freeze_encoder
    if head_only:
        state = {k: v for k, v in state.items() if not k.startswith(("encoder.", "embedding."))}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, head_only


def save_text_model(path: str | Path, model: nn.Module, card: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``path`` ``.pt`` (state dict) and ``.json`` (card) and return the card written.

    ``card`` should hold ``vocabulary`` (the vocabulary file's name), ``accuracy``,
    ``training_seconds``, ``dataset`` and ``seed``; this adds ``architecture``, ``arguments``
    (the constructor's), ``weights`` (the weight file's name), ``sha256``, ``encoder_weights``
    (``"file"`` or ``"package"``) and ``torch_version``.
    """
    weights, card_path = _paths(path)
    architecture = _architecture_name(model)
    arguments = dict(model.config)  # type: ignore[arg-type]
    state, head_only = _saved_state(model)
    out = {**dict(card), "architecture": architecture, "arguments": arguments,
           "weights": weights.name, "encoder_weights": "package" if head_only else "file",
           "torch_version": torch.__version__.split("+")[0]}
    try:
        out = json.loads(json.dumps(out))  # what the file will hold (tuples become lists)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"the card cannot be written as JSON: {exc}") from exc
    weights.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(weights, lambda handle: torch.save(state, handle))
    out["sha256"] = sha256_file(weights)
    # the card last: a card on disk always describes a complete weight file
    write_atomic(card_path,
                 lambda handle: handle.write((json.dumps(out, indent=2) + "\n").encode("utf-8")))
    return out


def _build(architecture: str, arguments: dict[str, Any]) -> nn.Module:
    if architecture not in TEXT_ARCHITECTURES:
        raise UnknownModelError(f"unknown text architecture {architecture!r}; use one of "
                                f"{', '.join(TEXT_ARCHITECTURES)}")
    args = dict(arguments)
    if architecture == "minilm":
        encoder = args.pop("encoder", MINILM_PACKAGE)
        if encoder != MINILM_PACKAGE:
            if not isinstance(encoder, dict):
                raise InvalidInputError("the card's MiniLM encoder is neither the package nor a "
                                        "BERT config")
            transformers = import_transformers()
            config = transformers.BertConfig(**{**encoder, "attn_implementation": "eager"})
            args["encoder"] = transformers.BertModel(config, add_pooling_layer=False)
    elif "widths" in args:
        args["widths"] = tuple(args["widths"])
    try:
        return TEXT_ARCHITECTURES[architecture](**args)
    except TypeError as exc:
        raise InvalidInputError(f"the card's arguments do not fit {architecture}: {exc}") from exc


def load_text_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model saved by :func:`save_text_model` at ``path`` (eval mode) and its card."""
    weights, card_path = _paths(path)
    hint = "save the model again"
    try:
        card = json.loads(card_path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise InvalidInputError(f"no model card at {card_path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"cannot read the model card {card_path}: {first_line(exc)}; "
                                f"it is damaged; {hint}") from exc
    if not isinstance(card, dict) or not isinstance(card.get("arguments"), dict) or \
            not isinstance(card.get("architecture"), str):
        raise InvalidInputError(f"the model card {card_path} lacks its architecture or arguments;"
                                f" {hint}")
    if not weights.is_file():
        raise InvalidInputError(f"the weight file {weights} is missing; {hint}")
    if card.get("sha256") and sha256_file(weights) != card["sha256"]:
        raise InvalidInputError(f"the weight file {weights} fails its checksum: it is damaged or "
                                f"not the file its card {card_path.name} describes; {hint}")
    model = _build(card["architecture"], card["arguments"])
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise InvalidInputError(f"cannot read the weight file {weights}: {first_line(exc)}; "
                                f"it is damaged; {hint}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InvalidInputError(f"{weights} is not a state dict; {hint}")
    head_only = card.get("encoder_weights") == "package"
    try:
        result = model.load_state_dict(state, strict=not head_only)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise InvalidInputError(f"{weights} does not fit {card['architecture']} with the card's "
                                f"arguments: {first_line(exc)}; {hint}") from exc
    if head_only:
        missing = [k for k in result.missing_keys if not k.startswith(("encoder.", "embedding."))]
        if missing or result.unexpected_keys:
            raise InvalidInputError(f"{weights} does not fit {card['architecture']}: missing "
                                    f"{missing}, unexpected {result.unexpected_keys}; {hint}")
    model.eval()
    return model, card
