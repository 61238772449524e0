"""Token attributions of a text classifier as a self-contained HTML page.

An explanation of a text is one relevance value per token. Each token is drawn as an inline
span whose background is a signed diverging colour: red for positive relevance (the token
supports the explained class), blue for negative (it speaks against it), white for zero, with
the intensity linear in ``|score| / scale``. The page needs nothing but itself: inline CSS, no
JavaScript, no fonts or URLs, so it can be mailed, archived or opened offline years later.

:func:`tokens_html_fragment` gives the same content as one ``<style>`` plus one ``<div>`` (no
blank line in it, so it also survives as a raw HTML block inside Markdown) for embedding in
another page, such as the benchmark report; its CSS classes all start with ``srdx-`` so they
do not collide with the host page's.
"""

from __future__ import annotations

import html
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from srdxai.errors import InvalidInputError
from srdxai.report.figures import write_atomic

__all__ = [
    "TokenExplanation",
    "render_tokens_html",
    "save_tokens_html",
    "tokens_html_fragment",
    "top_tokens",
]

Scale = Literal["per-example", "shared"]

# End colours of the diverging scale (ColorBrewer RdBu's extremes). Dark enough that full
# intensity needs white text, light enough in between that black text stays readable; both
# are told apart by people with the common red-green colour blindness.
_POSITIVE = (178, 24, 43)  # #b2182b
_NEGATIVE = (33, 102, 172)  # #2166ac
_WHITE = (255, 255, 255)

# BERT's [CLS]/[SEP]/[PAD]/[UNK]/[MASK], and the <s>, </s>, <pad>, <unk>, <|endoftext|> of
# SentencePiece, RoBERTa and GPT-2 vocabularies. Angle brackets only with known names: a text
# about HTML has tokens like "<b>" that are words, not markers.
_SPECIAL = re.compile(r"\[[A-Z][A-Z_]*\]|<\|[^<>|\s]+\|>"
                      r"|<(?i:s|/s|pad|unk|mask|cls|sep|bos|eos)>")

_CSS = """\
.srdx-tokens { font-family: system-ui, sans-serif; color: #222; print-color-adjust: exact;
  -webkit-print-color-adjust: exact; }
.srdx-example { border: 1px solid #ddd; border-radius: 0.4em; padding: 0.6em 0.9em;
  margin: 0.8em 0; }
.srdx-title { font-weight: 600; margin: 0 0 0.3em 0; }
.srdx-head { color: #444; font-size: 0.9em; margin: 0 0 0.5em 0; }
.srdx-head b { color: #111; }
.srdx-text { line-height: 2.1; overflow-wrap: anywhere; word-break: normal; margin: 0; }
.srdx-tok { padding: 0.15em 0.12em; border-radius: 0.2em; box-decoration-break: clone;
  -webkit-box-decoration-break: clone; }
.srdx-special { font-size: 0.8em; font-style: italic; }
.srdx-legend { font-size: 0.8em; color: #444; margin: 0.6em 0 0.2em 0; max-width: 26em; }
.srdx-bar { height: 0.8em; border: 1px solid #bbb; border-radius: 0.2em; }
.srdx-ticks { display: flex; justify-content: space-between; margin: 0.1em 0; }
.srdx-legend p { margin: 0.2em 0; }
"""


@dataclass
class TokenExplanation:
    """One explained text: its tokens, one relevance score per token, and what was explained.

    ``scores`` may be a list, a numpy array or a torch tensor (1-D, same length as ``tokens``);
    it is stored as a tuple of floats, so the explanation holds no tensor. NaN or Inf scores,
    an empty token list, mismatched lengths and non-string tokens raise
    :class:`~srdxai.errors.InvalidInputError` here, where the mistake is made.
    """

    tokens: list[str]
    scores: Sequence[float]
    predicted: str
    target: str
    method: str
    probability: float | None = None
    true_label: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        tokens, scores = _checked(self.tokens, self.scores, "TokenExplanation")
        self.tokens = tokens
        self.scores = tuple(float(s) for s in scores)
        self.probability = _checked_probability(self.probability, "TokenExplanation")


# --- validation -------------------------------------------------------------------------------

def _as_scores(scores: object, where: str) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor, without importing torch here
        # float64 first: .numpy() cannot convert bfloat16, and integer scores are fine too
        scores = scores.detach().cpu().double().numpy()
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: scores must be numbers, one per token ({exc})") from None
    if array.ndim != 1:
        raise InvalidInputError(
            f"{where}: scores must be 1-D (one value per token), got shape {tuple(array.shape)}; "
            "for a batch make one TokenExplanation per example")
    return array


def _checked(tokens: object, scores: object, where: str) -> tuple[list[str], np.ndarray]:
    """``tokens`` as a list of strings and ``scores`` as finite float64, or an error saying
    what is wrong; ``where`` starts the message (which example)."""
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise InvalidInputError(
            f"{where}: tokens must be a list of strings, got {type(tokens).__name__}")
    tokens = list(tokens)
    if not tokens:
        raise InvalidInputError(f"{where}: the token list is empty; there is nothing to show")
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise InvalidInputError(
                f"{where}: token {i} is a {type(token).__name__}, not a string; convert token "
                "ids to text with the tokenizer first")
    array = _as_scores(scores, where)
    if array.shape[0] != len(tokens):
        raise InvalidInputError(
            f"{where}: {len(tokens)} tokens but {array.shape[0]} scores; there must be one "
            "score per token")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        i = int(bad[0])
        kind = "NaN" if math.isnan(array[i]) else "Inf"
        raise InvalidInputError(
            f"{where}: score {i} (token {tokens[i]!r}) is {kind}"
            + (f", and {bad.size - 1} more scores are not finite" if bad.size > 1 else "")
            + "; the attribution failed or overflowed")
    return tokens, array


def _checked_probability(probability: object, where: str) -> float | None:
    if probability is None:
        return None
    try:
        p = float(probability)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{where}: probability must be a number or None, got {probability!r}") from None
    if not 0.0 <= p <= 1.0:  # also refuses NaN
        raise InvalidInputError(f"{where}: probability must lie in [0, 1], got {p}")
    return p


def _examples(explanations: TokenExplanation | Sequence[TokenExplanation]
              ) -> list[tuple[TokenExplanation, list[str], np.ndarray]]:
    """Every explanation checked again, with its index in the message: a dataclass can be
    changed after it was made, and the index is what the caller needs to find the bad one."""
    if isinstance(explanations, TokenExplanation):
        explanations = [explanations]
    explanations = list(explanations)
    if not explanations:
        raise InvalidInputError("no explanations to render: pass at least one TokenExplanation")
    out = []
    for i, ex in enumerate(explanations):
        if not isinstance(ex, TokenExplanation):
            raise InvalidInputError(
                f"example {i}: expected a TokenExplanation, got {type(ex).__name__}")
        where = f"example {i}" + (f" ({ex.title!r})" if ex.title else "")
        tokens, scores = _checked(ex.tokens, ex.scores, where)
        _checked_probability(ex.probability, where)
        out.append((ex, tokens, scores))
    return out


# --- colours and text -------------------------------------------------------------------------

def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _luminance(rgb: Sequence[int]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    def linear(c: int) -> float:
        c_ = c / 255.0
        return c_ / 12.92 if c_ <= 0.04045 else ((c_ + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _colours(score: float, scale: float) -> tuple[str, str]:
    """(background, text) colours of a token with ``score`` on ``[-scale, scale]``.

    The background runs linearly from white to the end colour, the same interpolation that
    the legend's CSS gradient uses, so a token's colour can be read off the bar. Scores beyond
    the scale saturate. The text is black or white, whichever contrasts more (WCAG ratio).
    """
    t = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    end = _POSITIVE if score > 0 else _NEGATIVE
    rgb = tuple(round(w + t * (e - w)) for w, e in zip(_WHITE, end, strict=True))
    lum = _luminance(rgb)
    on_black = (lum + 0.05) / 0.05
    on_white = 1.05 / (lum + 0.05)
    return _hex(rgb), "#ffffff" if on_white > on_black else "#000000"


def _fmt(value: float) -> str:
    """A score for people: signed, four significant digits (``+0.0123``, ``-3.2e-06``), so
    tiny scores do not all read ``0.0000``."""
    return f"{value + 0.0:+.4g}"  # + 0.0 turns -0.0 into 0.0


def _attr(text: str) -> str:
    """``text`` escaped for a double-quoted attribute, line breaks as character references,
    so no attribute can put a blank line into the fragment (it would end a Markdown HTML
    block)."""
    return html.escape(text, quote=True).replace("\r", "&#13;").replace("\n", "&#10;")


def _display(token: str) -> str:
    """What a token shows: word-piece ``##`` dropped (it is joined to the previous token
    instead), line breaks and tabs as visible symbols, whitespace-only tokens as ``␣``."""
    if token.startswith("##") and len(token) > 2:
        token = token[2:]
    token = token.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")
    token = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in token)
    return token if token.strip() else "␣"


def _is_continuation(token: str) -> bool:
    return token.startswith("##") and len(token) > 2


def _is_special(token: str) -> bool:
    return _SPECIAL.fullmatch(token) is not None


# --- HTML -------------------------------------------------------------------------------------

def _legend(scale: float, normalise: bool, what: str, target: str | None) -> str:
    e = html.escape
    gradient = (f"linear-gradient(to right, {_hex(_NEGATIVE)}, {_hex(_WHITE)}, "
                f"{_hex(_POSITIVE)})")
    lo, hi = (_fmt(-scale), _fmt(scale)) if scale > 0 else ("0", "0")
    target_text = f"the target class <b>{e(target)}</b>" if target else "the target class"
    if not normalise:
        note = "Fixed scale ±1 (scores are not rescaled); larger |scores| saturate."
    elif scale > 0:
        note = f"Colour intensity is linear in |score| / {_fmt(scale)[1:]} ({what})."
    else:
        note = "All scores are zero: every token is white."
    return (f'<div class="srdx-legend">'
            f'<div class="srdx-bar" style="background: {gradient}"></div>'
            f'<div class="srdx-ticks"><span>{lo}</span><span>0</span><span>{hi}</span></div>'
            f'<p><span style="color: {_hex(_POSITIVE)}"><b>red</b></span>: supports '
            f'{target_text}; <span style="color: {_hex(_NEGATIVE)}"><b>blue</b></span>: '
            f"speaks against it.</p><p>{e(note)}</p></div>")


def _header(ex: TokenExplanation) -> str:
    e = html.escape
    parts = [f"method: <b>{e(str(ex.method))}</b>"]
    predicted = f"predicted: <b>{e(str(ex.predicted))}</b>"
    if ex.probability is not None:
        predicted += f" (p = {float(ex.probability):.3f})"
    parts.append(predicted)
    parts.append(f"target: <b>{e(str(ex.target))}</b>")
    if ex.true_label is not None:
        verdict = "correct" if str(ex.true_label) == str(ex.predicted) else "wrong"
        parts.append(f"true label: <b>{e(str(ex.true_label))}</b> (prediction {verdict})")
    return '<p class="srdx-head">' + " · ".join(parts) + "</p>"


def _text(tokens: list[str], scores: np.ndarray, scale: float) -> str:
    spans = []
    for i, (token, score) in enumerate(zip(tokens, scores.tolist(), strict=True)):
        background, colour = _colours(score, scale)
        special = _is_special(token)
        if special:  # dimmed text; the background still shows the token's relevance
            colour = "#dddddd" if colour == "#ffffff" else "#777777"
        cls = "srdx-tok srdx-special" if special else "srdx-tok"
        span = (f'<span class="{cls}" style="background-color: {background}; color: {colour}" '
                f'title="{_attr(f"{token}: {_fmt(score)}")}" data-score="{score!r}">'
                f"{html.escape(_display(token))}</span>")
        # A space between words lets the line wrap there; none before a ## continuation, so
        # a word split into pieces reads as one word (and never breaks inside).
        spans.append(span if i == 0 or _is_continuation(token) else " " + span)
    return '<p class="srdx-text">' + "".join(spans) + "</p>"


def _checked_options(scale: str, normalise: bool) -> None:
    if scale not in ("per-example", "shared"):
        raise InvalidInputError(f"scale must be 'per-example' or 'shared', got {scale!r}")
    if not isinstance(normalise, bool):
        raise InvalidInputError(f"normalise must be True or False, got {normalise!r}")


def _body(explanations: TokenExplanation | Sequence[TokenExplanation], scale: Scale,
          normalise: bool) -> str:
    _checked_options(scale, normalise)
    examples = _examples(explanations)
    shared = max(float(np.abs(s).max()) for _, _, s in examples)
    parts = ['<div class="srdx-tokens">']
    if scale == "shared" or not normalise:
        what = f"largest |score| over all {len(examples)} examples"
        parts.append(_legend(shared if normalise else 1.0, normalise, what, None))
    for i, (ex, tokens, scores) in enumerate(examples):
        title = ex.title if ex.title is not None else f"Example {i + 1}"
        parts.append('<div class="srdx-example">')
        parts.append(f'<p class="srdx-title">{html.escape(str(title))}</p>')
        parts.append(_header(ex))
        if not normalise:
            limit = 1.0
        elif scale == "shared":
            limit = shared
        else:
            limit = float(np.abs(scores).max())
        parts.append(_text(tokens, scores, limit))
        if scale == "per-example" and normalise:
            parts.append(_legend(limit, True, "largest |score| in this example",
                                 str(ex.target)))
        parts.append("</div>")
    parts.append("</div>")
    return "\n".join(parts)


def tokens_html_fragment(explanations: TokenExplanation | Sequence[TokenExplanation], *,
                         scale: Scale = "per-example", normalise: bool = True) -> str:
    """The token display as one ``<style>`` block and one ``<div>``, to embed in another HTML
    page (or as a raw HTML block in Markdown: the fragment has no blank line). Options as in
    :func:`render_tokens_html`."""
    return f"<style>\n{_CSS}</style>\n{_body(explanations, scale, normalise)}\n"


def render_tokens_html(explanations: TokenExplanation | Sequence[TokenExplanation], *,
                       title: str = "Token attributions", scale: Scale = "per-example",
                       normalise: bool = True) -> str:
    """One complete, self-contained HTML5 document showing each explanation's tokens on a
    signed colour scale (red: supports the target class, blue: speaks against it).

    ``scale``: ``"per-example"`` colours each example relative to its own largest ``|score|``
    (each gets its own legend); ``"shared"`` uses the largest ``|score|`` over all examples
    (one legend), so colours compare across examples. ``normalise=False`` shows the scores on
    a fixed ``[-1, 1]`` scale instead (for scores already normalised; ``scale`` is then
    ignored and larger values saturate).

    Every span's tooltip (``title``) holds the token and its score; ``data-score`` holds the
    score exactly. Raises :class:`~srdxai.errors.InvalidInputError` naming the example and the
    problem (no explanations, empty tokens, length mismatch, NaN/Inf, bad probability).
    """
    body = _body(explanations, scale, normalise)
    e = html.escape
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        "<style>",
        "body { margin: 2em auto; max-width: 60em; padding: 0 1em; }",
        "h1 { font-family: system-ui, sans-serif; font-size: 1.5em; }",
        _CSS + "</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        body,
        "</body>",
        "</html>",
        "",
    ])


def save_tokens_html(path: str | os.PathLike[str],
                     explanations: TokenExplanation | Sequence[TokenExplanation],
                     **kwargs: object) -> Path:
    """Write :func:`render_tokens_html`'s document (``kwargs`` are its options) to ``path``,
    creating missing parent folders; returns the path.

    The file is written under a temporary name in the same folder and renamed, so a reader
    (or a browser reloading it) never sees half a page, and an existing file survives a failed
    write. The document is rendered, and so checked, before anything is created.
    """
    document = render_tokens_html(explanations, **kwargs)  # type: ignore[arg-type]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = document.encode("utf-8")
    return write_atomic(out, lambda handle: handle.write(data))


def top_tokens(tokens: Sequence[str], scores: object, k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` tokens with the largest scores, largest first, as ``(token, score)`` pairs;
    equal scores keep their order in the text. For a short command line summary."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidInputError(f"k must be a non-negative integer, got {k!r}")
    tokens, array = _checked(tokens, scores, "top_tokens")
    # a stable sort of the negated scores: ties stay in position order
    order = np.argsort(-array, kind="stable")[:k]
    return [(tokens[i], float(array[i])) for i in order.tolist()]
