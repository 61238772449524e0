"""What the text experiments share (text_sensitivity_n, text_localisation), Ancona et al.'s
second domain: Sensitivity-n (and insertion / deletion) with tokens as features on the shipped
movie-review models, and token localisation on the synthetic planted-evidence task, whose
evidence tokens are the ground truth.

Tokens are removed by setting their embedding to the zero vector (Ancona et al.'s baseline);
only real tokens are features (:mod:`srdxai.text.metrics`). Each model is explained where its
methods are defined as the papers define them: SRD on the word CNN and the transformer, not on
the LSTM (it reads its embeddings one step at a time, which SRD's PFV engine refuses; ``srd``
explains it on the operation view instead, every operation a layer, docs/srd.md, another
reading than the paper's, which the experiment leaves out).
"""

from __future__ import annotations

import json

import torch

from ..config import BenchConfig
from ..data import Source, text_classifier, text_texts
from ..registry import Experiment, MethodRow, ReportInputs, UnitInputs

__all__ = ["SHOWN_TEXTS", "TEXT_METHODS", "TextExperiment", "text_methods", "token_displays",
           "token_documents", "token_maps"]

#: Ancona et al.'s methods on text (Occlusion-1: one token at a time), with SRD and the LRP
#: family where the model has them
TEXT_METHODS: list[MethodRow] = [
    ("Saliency", "saliency", {}),
    ("GradInput", "gradient_x_input", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("epsilon-LRP", "epsilon_lrp", {}),
    ("DeepLIFT-Rescale", "deeplift_rescale", {}),
    ("Occlusion-1", "occlusion", {"window": 1}),
    ("SRD", "srd", {}),
    ("AttnLRP", "attnlrp", {}),
    ("absLRP", "abslrp", {}),
]
#: texts per model shown in the report's token display
SHOWN_TEXTS = 3


def text_methods(source: Source) -> list[MethodRow]:
    # SRD's PFV engine refuses the LSTM; its operation-view map is not the paper's SRD
    no_srd = source.model == "rt-lstm"
    return [row for row in TEXT_METHODS if not (no_srd and row[1] == "srd")]


def token_maps(unit: UnitInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit's token maps ``(N, L)`` for its labels, and the attention mask."""
    from ... import explain

    mask = unit.masks > 0
    maps = explain(unit.model, unit.x, unit.y, unit.job.method, attention_mask=mask,
                   **unit.options)
    return maps.detach(), mask


def token_documents(unit: UnitInputs, maps: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, bytes]:
    """The first batch's first texts as token explanations (JSON), for the report."""
    if unit.job.unit.unit != 0:
        return {}
    from ...text import call_text_model

    bundle = text_classifier(unit.job.source.model)
    shown = min(SHOWN_TEXTS, unit.x.shape[0])
    with torch.no_grad():
        probs = torch.softmax(call_text_model(unit.model, unit.x[:shown], mask[:shown]), 1)
    names = bundle.class_names
    texts = []
    for i in range(shown):
        real = int(mask[i].sum())
        predicted = int(probs[i].argmax())
        texts.append({
            "tokens": bundle.tokens(unit.x[i, :real]),
            "scores": [float(v) for v in maps[i, :real]],
            "predicted": names[predicted], "probability": float(probs[i, predicted]),
            "target": names[int(unit.y[i])], "true_label": names[int(unit.y[i])],
            "method": unit.job.unit.method,
            "title": f"test text {unit.job.samples[i]}: "
                     f"{text_texts(unit.job.source, [unit.job.samples[i]])[0][:60]}"})
    name = f"{unit.job.unit.experiment}/tokens/{unit.job.unit.model}/{unit.job.unit.method}"
    return {name: json.dumps(texts).encode("utf-8")}


def token_displays(report: ReportInputs, experiment: str) -> list:
    """One token display per model from the stored token explanations."""
    from ...report import tables
    from ...report.blocks import Html
    from ...report.tokens import TokenExplanation, tokens_html_fragment

    by_model: dict[str, list] = {}
    prefix = f"{experiment}/tokens/"
    for name, data in tables.artifacts(report.db, "json"):
        if not name.startswith(prefix):
            continue
        model = name[len(prefix):].split("/")[0]
        for item in json.loads(data.decode("utf-8")):
            by_model.setdefault(model, []).append(TokenExplanation(**item))
    blocks = []
    for model, explanations in by_model.items():
        # text by text, every method of one text together
        explanations.sort(key=lambda e: e.title or "")
        blocks.append(Html(f"Token attributions, {model} (red: for the label, blue: against; "
                           "each text on its own scale)", tokens_html_fragment(explanations)))
    return blocks


class TextExperiment(Experiment):
    """What a text experiment adds to :class:`Experiment` (not registered itself): the text
    methods its model has, units of at least 32 texts, at most :attr:`texts` samples, and
    the first texts' token maps under its section."""

    #: the texts its data has (the test split's size)
    texts: int = 0

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        return text_methods(source)

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        return min(self.texts, config.samples or (32 if config.quick else 256))

    def batch_size(self, config: BenchConfig) -> int:
        # texts are grouped by length inside a unit: larger units batch more texts together
        return max(config.batch_size, 32)

    def section(self, report: ReportInputs):
        section = super().section(report)
        if section.ran:
            section.blocks += token_displays(report, self.name)
        return section
