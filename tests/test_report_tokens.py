"""The HTML display of token attributions (srdxai.report.tokens)."""

from __future__ import annotations

import math
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from srdxai.errors import InvalidInputError
from srdxai.report.tokens import (
    TokenExplanation,
    render_tokens_html,
    save_tokens_html,
    tokens_html_fragment,
    top_tokens,
)

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}


class _Page(HTMLParser):
    """Collects every token span (attributes and text) and checks that tags nest: each opened
    non-void tag is closed by the matching end tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.spans: list[dict] = []
        self._span: dict | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag not in _VOID:
            self.stack.append(tag)
        if tag == "span" and "srdx-tok" in (attrs.get("class") or "").split():
            self._span = {"attrs": attrs, "text": ""}
            self.spans.append(self._span)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in _VOID:
            self.errors.append(f"self-closed non-void <{tag}/>")

    def handle_endtag(self, tag):
        if tag in _VOID:
            self.errors.append(f"end tag of void </{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        self.text.append(data)
        if self._span is not None:
            self._span["text"] += data


def _parse(document: str) -> _Page:
    page = _Page()
    page.feed(document)
    page.close()
    assert page.errors == []
    assert page.stack == [], f"unclosed tags: {page.stack}"
    return page


def _style(span: dict) -> dict[str, str]:
    out = {}
    for item in span["attrs"]["style"].split(";"):
        if item.strip():
            key, value = item.split(":", 1)
            out[key.strip()] = value.strip()
    return out


def _rgb(colour: str) -> tuple[int, int, int]:
    assert re.fullmatch(r"#[0-9a-f]{6}", colour), colour
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _background(span: dict) -> tuple[int, int, int]:
    return _rgb(_style(span)["background-color"])


def _ex(tokens, scores, **kwargs) -> TokenExplanation:
    fields = {"predicted": "positive", "target": "positive", "method": "srd"} | kwargs
    return TokenExplanation(tokens=tokens, scores=scores, **fields)


# --- colours ----------------------------------------------------------------------------------

def test_positive_red_negative_blue_zero_white():
    page = _parse(render_tokens_html([_ex(["good", "bad", "the", "fine"],
                                          [1.0, -1.0, 0.0, 0.25])]))
    good, bad, the, fine = page.spans
    r, g, b = _background(good)
    assert r > 150 and g < 60 and b < 60  # saturated red at the scale's end
    r, g, b = _background(bad)
    assert b > 150 and r < 60 and g < 150 and b > g
    assert _background(the) == (255, 255, 255)
    r, g, b = _background(fine)  # a quarter of the way from white to red
    assert r > g and r > b and 190 < g < 230 and 190 < b < 230
    assert _background(fine) == _background(_parse(render_tokens_html(
        [_ex(["a", "b"], [0.25, 1.0])])).spans[0])  # linear, reproducible


def test_intensity_is_linear_in_score():
    page = _parse(render_tokens_html([_ex(list("abcde"), [0.0, 0.25, 0.5, 0.75, 1.0])]))
    greens = [_background(s)[1] for s in page.spans]  # green falls linearly 255 -> 24
    steps = np.diff(greens)
    assert all(d < 0 for d in steps) and max(steps) - min(steps) <= 1


def test_text_turns_white_on_dark_backgrounds():
    page = _parse(render_tokens_html([_ex(["strong", "weak", "anti", "none"],
                                          [1.0, 0.05, -1.0, 0.0])]))
    colours = [_style(s)["color"] for s in page.spans]
    assert colours == ["#ffffff", "#000000", "#ffffff", "#000000"]


def test_all_zero_scores_render_white():
    page = _parse(render_tokens_html([_ex(["a", "b", "c"], [0.0, 0.0, -0.0])]))
    assert [_background(s) for s in page.spans] == [(255, 255, 255)] * 3
    assert [s["attrs"]["title"] for s in page.spans] == ["a: +0", "b: +0", "c: +0"]
    assert "All scores are zero" in "".join(page.text)
    _parse(render_tokens_html([_ex(["a"], [0.0])], scale="shared"))


# --- scales -----------------------------------------------------------------------------------

def test_per_example_vs_shared_scale():
    big, small = _ex(["x", "y"], [4.0, -2.0]), _ex(["z"], [1.0])
    per = _parse(render_tokens_html([big, small], scale="per-example")).spans
    shared = _parse(render_tokens_html([big, small], scale="shared")).spans
    # per example: each example's largest |score| is fully saturated
    assert _background(per[0]) == _background(per[2])
    # shared: z (1.0) is a quarter of x (4.0); y (-2.0) half-saturated blue
    assert _background(shared[0]) == _background(per[0])
    assert _background(shared[2]) == _background(_parse(render_tokens_html(
        [_ex(["q", "w"], [1.0, 4.0])])).spans[0])
    assert _background(shared[1]) == _background(per[1])  # same scale 4 in both for example 0


def test_legends_show_the_range():
    per = render_tokens_html([_ex(["x", "y"], [4.0, -2.0]), _ex(["z"], [0.5])])
    page = _parse(per)
    assert per.count('class="srdx-legend"') == 2
    assert "linear-gradient(" in per
    text = "".join(page.text)
    assert "-4" in text and "+4" in text and "-0.5" in text and "+0.5" in text
    assert "supports the target class" in text and "speaks against it" in text
    ticks = re.findall(r'<div class="srdx-ticks"><span>(.*?)</span><span>(.*?)</span>'
                       r"<span>(.*?)</span></div>", per)
    assert ticks == [("-4", "0", "+4"), ("-0.5", "0", "+0.5")]
    shared = render_tokens_html([_ex(["x", "y"], [4.0, -2.0]), _ex(["z"], [0.5])],
                                scale="shared")
    assert shared.count('class="srdx-legend"') == 1
    assert re.findall(r'<div class="srdx-ticks"><span>(.*?)</span><span>(.*?)</span>'
                      r"<span>(.*?)</span></div>", shared) == [("-4", "0", "+4")]


def test_normalise_false_uses_a_fixed_unit_scale():
    page = _parse(render_tokens_html([_ex(["a", "b", "c"], [0.5, 2.0, -1.0])],
                                     normalise=False))
    half, over, minus = page.spans
    assert _background(over) == _background(_parse(render_tokens_html(
        [_ex(["a"], [1.0])])).spans[0])  # saturates at 1
    assert _background(half) == _background(_parse(render_tokens_html(
        [_ex(["a", "b"], [0.5, 1.0])])).spans[0])
    assert _background(minus)[2] > _background(minus)[0]
    assert "Fixed scale ±1" in "".join(page.text)


def test_bad_options():
    with pytest.raises(InvalidInputError, match="scale"):
        render_tokens_html([_ex(["a"], [1.0])], scale="global")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="no explanations"):
        render_tokens_html([])


# --- text -------------------------------------------------------------------------------------

def test_tokens_are_escaped():
    tokens = ["<script>alert(1)</script>", "a&b", '"quoted"', "it's", "<pad>"]
    document = render_tokens_html([_ex(tokens, [0.1, 0.2, 0.3, 0.4, 0.0],
                                       title="<b>T</b>", method="<i>m</i>", target="a&b")],
                                  title="<h1>x</h1>")
    assert "<script" not in document and "<b>T</b>" not in document
    assert "<i>m</i>" not in document and "<h1>x</h1>" not in document
    page = _parse(document)
    assert [s["text"] for s in page.spans] == tokens
    assert [s["attrs"]["title"].rsplit(": ", 1)[0] for s in page.spans] == tokens
    assert "script" not in page.tags and "i" not in page.tags
    assert "<T>" not in "".join(page.text) and "<b>T</b>" in "".join(page.text)


def test_word_pieces_are_joined():
    document = render_tokens_html([_ex(["[CLS]", "un", "##believ", "##able", "film", "[SEP]"],
                                       [0.0, 0.5, 0.2, -0.1, 0.3, 0.0])])
    page = _parse(document)
    assert [s["text"] for s in page.spans] == ["[CLS]", "un", "believ", "able", "film", "[SEP]"]
    # no whitespace between the pieces of one word, a space between words
    text = re.search(r'<p class="srdx-text">(.*?)</p>', document).group(1)
    plain = re.sub(r"<[^>]+>", "", text)
    assert plain == "[CLS] unbelievable film [SEP]"
    assert page.spans[2]["attrs"]["title"] == "##believ: +0.2"  # the tooltip keeps the token


def test_special_tokens_are_dimmed():
    page = _parse(render_tokens_html([_ex(["[CLS]", "<pad>", "</s>", "word", "<b>"],
                                          [0.0, 0.0, 0.0, 0.0, 0.0])]))
    special = ["srdx-special" in s["attrs"]["class"].split() for s in page.spans]
    assert special == [True, True, True, False, False]
    assert _style(page.spans[0])["color"] != _style(page.spans[3])["color"]


def test_long_text_wraps():
    document = render_tokens_html([_ex([f"word{i}" for i in range(500)],
                                       np.linspace(-1, 1, 500))])
    assert "overflow-wrap: anywhere" in document
    assert "white-space: nowrap" not in document and "white-space: pre" not in document
    assert document.count(" <span") >= 499  # break opportunities between words


def test_whitespace_and_control_tokens_stay_visible_and_one_line():
    fragment = tokens_html_fragment([_ex(["a", "\n\n", " ", "b\tc"], [0.1, 0.2, 0.3, 0.4])])
    page = _parse(fragment)
    assert [s["text"] for s in page.spans] == ["a", "↵↵", "␣", "b⇥c"]
    assert page.spans[1]["attrs"]["title"] == "\n\n: +0.2"  # exact token in the tooltip
    assert "\n\n" not in fragment  # a blank line would end a Markdown HTML block


def test_tooltips_exact():
    scores = [0.0123, -0.5, 3.2e-6, 12345.678, 1.0]
    page = _parse(render_tokens_html([_ex(list("abcde"), scores)]))
    assert [s["attrs"]["title"] for s in page.spans] == [
        "a: +0.0123", "b: -0.5", "c: +3.2e-06", "d: +1.235e+04", "e: +1"]
    assert [float(s["attrs"]["data-score"]) for s in page.spans] == scores  # exact values


def test_header_fields():
    text = "".join(_parse(render_tokens_html([
        _ex(["a"], [1.0], predicted="negative", probability=0.8766, target="positive",
            true_label="positive", method="SRD", title="Review 17"),
        _ex(["b"], [1.0], predicted="positive", probability=None),
    ])).text)
    assert "Review 17" in text and "Example 2" in text
    assert "method: SRD" in text
    assert "predicted: negative (p = 0.877)" in text
    assert "target: positive" in text
    assert "true label: positive (prediction wrong)" in text
    assert text.count("true label") == 1  # not shown when not given
    assert "predicted: positive ·" in text  # no probability


def test_document_is_self_contained_html5():
    document = render_tokens_html([_ex(["a", "##b"], [1.0, -1.0])], title="Demo")
    assert document.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in document
    assert "<title>Demo</title>" in document
    lowered = document.lower()
    for forbidden in ("<script", "<link", "@import", "url(", "http://", "https://", "src="):
        assert forbidden not in lowered
    page = _parse(document)
    assert page.tags[:4] == ["html", "head", "meta", "meta"]


def test_scores_as_list_numpy_and_torch():
    expected = render_tokens_html([_ex(["a", "b", "c"], [0.5, -0.25, 0.0])])
    for scores in (np.array([0.5, -0.25, 0.0], dtype=np.float32),
                   torch.tensor([0.5, -0.25, 0.0]),
                   torch.tensor([0.5, -0.25, 0.0], dtype=torch.bfloat16),
                   torch.tensor([0.5, -0.25, 0.0], requires_grad=True) * 1.0):
        ex = _ex(["a", "b", "c"], scores)
        assert ex.scores == (0.5, -0.25, 0.0)
        assert render_tokens_html([ex]) == expected
    assert render_tokens_html(_ex(["a", "b", "c"], (0.5, -0.25, 0.0))) == expected  # one


# --- fragment and saving ----------------------------------------------------------------------

def test_fragment_is_embeddable():
    fragment = tokens_html_fragment([_ex(["a", "b"], [1.0, -1.0])], scale="shared")
    assert "<html" not in fragment and "<body" not in fragment and "<head" not in fragment
    assert "<!DOCTYPE" not in fragment
    assert fragment.startswith("<style>")
    page = _parse(fragment)
    assert [t for t in page.tags if t in ("style", "div")][:2] == ["style", "div"]
    # one top-level <div> after the <style>
    top = re.sub(r"<style>.*?</style>\s*", "", fragment, flags=re.S).strip()
    assert top.startswith('<div class="srdx-tokens">') and top.endswith("</div>")
    css = re.search(r"<style>(.*?)</style>", fragment, re.S).group(1)
    selectors = re.findall(r"([^{}]+)\{", css)
    assert all(s.strip().startswith(".srdx-") for s in selectors)  # no clash with the host
    # embedded in a page it still parses
    _parse(f"<!DOCTYPE html><html><head><title>r</title></head><body>{fragment}</body></html>")


def test_save_is_atomic_and_creates_parents(tmp_path):
    out = tmp_path / "new" / "deeper" / "tokens.html"
    got = save_tokens_html(out, [_ex(["a", "b"], [1.0, -1.0])], title="Saved", scale="shared")
    assert got == out
    assert out.read_text(encoding="utf-8") == render_tokens_html(
        [_ex(["a", "b"], [1.0, -1.0])], title="Saved", scale="shared")
    assert os.listdir(out.parent) == ["tokens.html"]  # no temporary file left
    # a string path works, and an existing file is replaced
    save_tokens_html(str(out), [_ex(["c"], [1.0])])
    assert ">c</span>" in out.read_text(encoding="utf-8")


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "t.html"
    save_tokens_html(out, [_ex(["old"], [1.0])])
    before = out.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_tokens_html(out, [_ex(["new"], [1.0])])
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.html"]


def test_save_checks_before_creating_anything(tmp_path):
    with pytest.raises(InvalidInputError):
        save_tokens_html(tmp_path / "sub" / "t.html", [_ex(["a"], [1.0], probability=0.5)],
                         scale="nope")
    assert not (tmp_path / "sub").exists()


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, scores, message", [
    (["a", "b"], [1.0], "2 tokens but 1 scores"),
    ([], [], "token list is empty"),
    (["a", "b"], [1.0, math.nan], r"score 1 \(token 'b'\) is NaN"),
    (["a", "b"], [math.inf, -math.inf], r"score 0 \(token 'a'\) is Inf, and 1 more"),
    (["a", "b"], np.zeros((1, 2)), r"1-D .* shape \(1, 2\)"),
    (["a", 7], [1.0, 2.0], "token 1 is a int"),
    ("ab", [1.0, 2.0], "list of strings"),
    (["a"], ["x"], "numbers"),
])
def test_invalid_explanations(tokens, scores, message):
    with pytest.raises(InvalidInputError, match=message):
        _ex(tokens, scores)


def test_bad_probability():
    for p in (1.5, -0.1, math.nan, "high"):
        with pytest.raises(InvalidInputError, match="probability"):
            _ex(["a"], [1.0], probability=p)


def test_errors_name_the_example_index():
    good, bad = _ex(["a"], [1.0]), _ex(["b", "c"], [1.0, 2.0], title="second")
    bad.scores = [1.0, math.nan]  # changed after construction
    with pytest.raises(InvalidInputError, match=r"example 1 \('second'\): score 1 .* NaN"):
        render_tokens_html([good, bad])
    bad.scores, bad.tokens = [1.0, 2.0], ["b"]
    with pytest.raises(InvalidInputError, match="example 1 .*1 tokens but 2 scores"):
        tokens_html_fragment([good, bad])
    bad.tokens = []
    with pytest.raises(InvalidInputError, match="example 1 .*empty"):
        render_tokens_html([good, bad])
    with pytest.raises(InvalidInputError, match="example 0: expected a TokenExplanation"):
        render_tokens_html(["text"])  # type: ignore[list-item]


# --- top_tokens -------------------------------------------------------------------------------

def test_top_tokens_order_and_ties():
    tokens = ["a", "b", "c", "d", "e"]
    scores = torch.tensor([0.1, 0.9, -2.0, 0.9, 0.5])
    assert top_tokens(tokens, scores, k=3) == [("b", pytest.approx(0.9)),
                                               ("d", pytest.approx(0.9)),
                                               ("e", 0.5)]
    assert [t for t, _ in top_tokens(tokens, scores)] == ["b", "d", "e", "a", "c"]  # k > L
    assert top_tokens(tokens, [0.0] * 5, k=2) == [("a", 0.0), ("b", 0.0)]
    assert top_tokens(tokens, np.arange(5.0), k=0) == []
    assert all(isinstance(s, float) for _, s in top_tokens(tokens, scores))
    with pytest.raises(InvalidInputError, match="k must"):
        top_tokens(tokens, scores, k=-1)
    with pytest.raises(InvalidInputError, match="top_tokens: score 0"):
        top_tokens(["a"], [math.nan])
