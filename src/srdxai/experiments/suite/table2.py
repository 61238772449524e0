"""Table 2 of the SRD paper: localisation, complexity, faithfulness and stability of every
method on the Fashion-MNIST CNNs and EfficientNet-Lite0 (ImageNet composites), under the
run's evaluation protocol (``srdxai.experiments.protocol``)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ...report import paper, tables
from ...report.blocks import (
    Section,
    Table,
    Text,
    arrow,
    curve_figures,
    identical_notes,
    model_tables,
    not_run,
)
from ...report.comparisons import (
    BEYOND,
    beyond_marks,
    competition_ranks,
    is_variant,
    paired_tables,
)
from ...report.tables import MetricTable
from ..config import BenchConfig
from ..data import Source
from ..protocol import VARIANTS, Protocol, pixels_at
from ..registry import (
    Experiment,
    MethodRow,
    ReportInputs,
    UnitInputs,
    UnitResult,
    register_experiment,
)

Tensor = torch.Tensor

__all__ = ["QUICK_SKIPPED_ON_IMAGENET", "TABLE2_METHODS", "TABLE2_METRICS", "Table2",
           "heavy_quick", "protocol_scores"]

#: Table 2's rows: (display name, srdxai method, options; ``layer`` goes to ``explain``)
TABLE2_METHODS: list[MethodRow] = [
    ("Saliency", "saliency", {}),
    ("GuidedBackprop", "guided_backprop", {}),
    ("GradInput", "gradient_x_input", {}),
    ("IntegratedGradients", "integrated_gradients", {}),
    ("LRP-z+", "lrp_zplus", {}),
    # Captum 0.6's NoiseTunnel(Saliency) defaults: |gradient|, 5 samples, sigma 1.0 in input
    # units; the SmoothGrad the paper most likely ran (reference/SRD.md section 8)
    ("SmoothGrad-abs", "smoothgrad", {"absolute": True, "samples": 5, "stdev": 1.0}),
    # Smilkov et al.'s signed mean gradient (25 samples, 15 % noise): not the paper's row
    ("SmoothGrad-signed", "smoothgrad", {}),
    ("FullGrad", "fullgrad", {}),
    ("GradCAM", "gradcam", {}),
    ("GradCAM++", "gradcam_pp", {}),
    ("ScoreCAM", "scorecam", {}),
    ("AblationCAM", "ablationcam", {}),
    ("XGradCAM", "xgradcam", {}),
    ("LayerCAM-low", "layercam", {"layer": "low"}),
    ("LayerCAM-high", "layercam", {"layer": "high"}),
    ("SRD-low", "srd", {"layer": "low"}),
    ("SRD-high", "srd", {"layer": "high"}),
    ("SRD-input", "srd", {}),
    ("absLRP", "abslrp", {}),
]
#: the metric rows of the table, in the paper's order
TABLE2_METRICS = ("pointing_game", "pointing_game_15px", "attribution_localisation",
                  "sparseness", "fidelity", "mufidelity", "stability")
#: Table 2 rows left out on EfficientNet-Lite0 with ``--quick``: each map costs one forward
#: pass per channel of the last convolution (1280), 10 minutes per 32 images on 2 cores
QUICK_SKIPPED_ON_IMAGENET = ("ScoreCAM", "AblationCAM")
TABLE2_SOURCES = (Source("fmnist-vgg-relu", "fashion"), Source("fmnist-resnet-relu", "fashion"),
                  Source("efficientnet-lite0", "composites"))


def heavy_quick(config: BenchConfig, source: Source) -> bool:
    """``--quick`` on the ImageNet composites: Table 2 scores the default fidelity, MuFidelity
    and the localisation and complexity metrics, without variants, stability or the
    :data:`QUICK_SKIPPED_ON_IMAGENET` rows, so that the quick run stays in minutes."""
    return config.quick and source.dataset == "composites"


def light_sources(config: BenchConfig) -> list[Source]:
    """Table 2's models that the curve experiments run on: all but EfficientNet-Lite0 with
    ``--quick`` (the quick run keeps them on the two Fashion-MNIST CNNs)."""
    return [s for s in TABLE2_SOURCES if not heavy_quick(config, s)]


def protocol_scores(config: BenchConfig, experiment: str, model: torch.nn.Module, x: Tensor,
                    y: Tensor, maps: Tensor, masks: Tensor, method_fn: Any, seed: int,
                    reduced: bool = False) -> dict[str, Tensor]:
    """Table 2's metrics under the run's protocol: ``fidelity`` (the default protocol),
    ``fidelity[variant]`` for each variant and ``mufidelity`` from the same maps, the strict and
    the tolerant pointing game, attribution localisation, sparseness and stability. The
    activation table scores ``fidelity`` and ``mufidelity`` only (its variants would multiply
    six models' cost). ``reduced`` (see :func:`heavy_quick`) leaves out the variants and
    stability."""
    from ... import metrics

    protocol = config.protocol
    if reduced or experiment != "table2":
        protocol = replace(protocol, variants=())
    height, width = x.shape[-2:]
    sampling = metrics.Sampling(seed=seed)
    scores: dict[str, Tensor] = {}
    for perturbation, readings in protocol.fidelity_groups(height, width, config.quick):
        scores.update(metrics.faithfulness_correlations(model, x, y, maps, readings=readings,
                                                        sampling=sampling, **perturbation))
    scores["mufidelity"] = metrics.mu_fidelity(model, x, y, maps, sampling=sampling,
                                               **protocol.mufidelity.options(config.quick))
    if experiment == "table2":
        scores["pointing_game"] = metrics.pointing_game(model, x, y, maps, masks)
        tolerance = pixels_at(protocol.pointing_tolerance, max(height, width))
        scores[f"pointing_game_{protocol.pointing_tolerance}px"] = metrics.pointing_game(
            model, x, y, maps, masks, tolerance=tolerance)
        scores["attribution_localisation"] = metrics.attribution_localisation(
            model, x, y, maps, masks)
        scores["sparseness"] = metrics.sparseness(model, x, y, maps)
        if reduced:
            return scores
        scores["stability"] = metrics.local_lipschitz_estimate(
            model, x, y, maps, explain=method_fn, nr_samples=protocol.draws(config.quick),
            sampling=sampling)
    return scores


@register_experiment
class Table2(Experiment):
    """Table 2: every method, the protocol's metrics, on the Table 2 models."""

    name = "table2"
    title = "Table 2"
    report_position = 10

    def sources(self, config: BenchConfig) -> list[Source]:
        return list(TABLE2_SOURCES)

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        return config.sizes(source.dataset)

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        if heavy_quick(config, source):
            return [m for m in TABLE2_METHODS if m[0] not in QUICK_SKIPPED_ON_IMAGENET]
        return list(TABLE2_METHODS)

    def run(self, unit: UnitInputs) -> UnitResult:
        maps = unit.explain()
        scores = protocol_scores(unit.config, self.name, unit.model, unit.x, unit.y, maps,
                                 unit.masks, unit.explain_fn(), unit.seed,
                                 heavy_quick(unit.config, unit.job.source))
        return UnitResult(rows=[row for metric, values in scores.items()
                                for row in unit.rows(metric, values)])

    def section(self, report: ReportInputs) -> Section:
        db, names, config = report.db, report.names, report.config
        everything = tables.metric_table(db, self.name)
        if everything.empty:
            return not_run(self.title, self.anchor, [self.name])
        core = [m for m in everything.metrics if not is_variant(m)]
        table = tables.metric_table(db, self.name, core)
        marks = beyond_marks(table.methods)
        blocks: list = [Text("Ours: the models and data of this run (see the configuration), "
                             "not the paper's ImageNet-S50 setup.")]
        blocks += protocol_text(config)
        if (config or {}).get("quick") and "efficientnet-lite0" in table.models:
            blocks.append(Text(
                "--quick on EfficientNet-Lite0 (ImageNet composites): no stability, no "
                f"protocol variants, and no {' or '.join(QUICK_SKIPPED_ON_IMAGENET)} (one "
                "forward pass per channel of the last convolution: 1280 per map); the full "
                "run scores them."))
        beyond_note = [f"{BEYOND.strip()}: a row the paper's Table 2 does not have (the "
                       "paper's Smoothgrad is most likely SmoothGrad-abs, Captum's absolute "
                       "value)."] if marks else []
        blocks += model_tables(table, "Table 2 (ours)", TABLE2_METRICS, marks, beyond_note)
        blocks += identical_notes(db, self.name)
        blocks.append(Text(
            "The paper's fidelity claim rests on SRD-high, its best-fidelity SRD row (.206 "
            "VGG16 / .142 ResNet50); SRD-input is its pixel map (.069 / .080). The tables "
            "below compare both with every other method on the same samples and draws."))
        blocks += paired_tables(db, self.name, ["fidelity", "mufidelity"], "Table 2 (ours)")
        ranking = ranking_tables(everything)
        if ranking:
            blocks.append(Text(
                "What decides the ranking: the same maps scored under the protocol variants. "
                "A method whose rank moves a lot between columns owes its place to a protocol "
                "choice the paper leaves open."))
            blocks += ranking
        blocks += curve_figures(db, self.name, names)
        blocks += paper_table2()
        return Section(self.title, self.anchor, blocks)


def protocol_text(config: dict | None) -> list[Text]:
    """The evaluation protocol of the run, in words (from its stored configuration)."""
    from ...errors import SrdxaiError

    stored = (config or {}).get("protocol")
    if not isinstance(stored, dict):
        return [Text("Protocol: not recorded in this run's configuration (a run of an older "
                     "version: its fidelity is Quantus' default protocol).")]
    try:
        protocol = Protocol.from_dict(stored)
    except (TypeError, ValueError, SrdxaiError) as exc:
        return [Text(f"Protocol: the stored protocol could not be read ({exc}).")]
    quick = bool((config or {}).get("quick"))
    runs = protocol.fidelity.run_count(quick)
    mu = protocol.mufidelity
    draws = protocol.draws(quick)
    stability = (f"the maximum over {draws} noise draws"
                 + (", a lower bound: fewer than 50 draws underestimate the maximum "
                    "(Quantus draws 200)" if draws < 50 else ""))
    return [Text(
        f"Protocol. fidelity: faithfulness correlation with {protocol.fidelity.describe()}, "
        f"{runs} random subsets per sample. mufidelity: xplique's MuFidelity ({mu.grid}x"
        f"{mu.grid} grid, each cell removed with probability {mu.fraction:g}, baseline "
        f"{mu.baseline:g}, {mu.draw_count(quick)} draws, "
        f"Spearman). pointing_game: strict (Quantus); pointing_game_"
        f"{protocol.pointing_tolerance}px: a hit within {protocol.pointing_tolerance} px at "
        f"224 x 224, scaled to the image (the co-author's Quantus copy). stability: local "
        f"Lipschitz estimate, {stability}. Every method sees the same draws.")]


def ranking_tables(table: MetricTable) -> list[Table]:
    """Per model: each method's rank (1 = best) and mean under the default fidelity protocol,
    every variant and MuFidelity."""
    out = []
    for model in table.models:
        protocols = [m for m in table.metrics_for(model)
                     if m == "fidelity" or is_variant(m) or m == "mufidelity"]
        if len(protocols) < 2:
            continue
        methods = table.methods_for(model, protocols)
        ranks: dict[tuple[str, str], int] = {}
        for metric in protocols:
            means = {m: c.mean for m in methods
                     if (c := table.cell(model, m, metric)) is not None and c.n > 0
                     and math.isfinite(c.mean)}
            for m, rank in competition_ranks(means).items():
                ranks[(m, metric)] = rank
        rows = []
        for method in methods:
            row = [(method, False)]
            for metric in protocols:
                c = table.cell(model, method, metric)
                rank = ranks.get((method, metric))
                text = "—" if c is None or rank is None else (
                    f"{rank} ({tables.format_number(c.mean)})")
                row.append((text, rank == 1))
            rows.append(row)
        defined = "; ".join(f"fidelity[{v}]: {', '.join(f'{k}={w}' for k, w in d.items())}"
                            for v, d in VARIANTS.items() if f"fidelity[{v}]" in protocols)
        notes = ["Cells: rank among the methods (1 = best, bold) and the mean; ties share a "
                 "rank. " + (f"Each variant changes one choice of the default protocol "
                             f"(fidelity), on the same maps: {defined}. " if defined else
                             "No protocol variants were scored for this model. ")
                 + "mufidelity: xplique's MuFidelity."]
        out.append(Table(f"What decides the ranking: {model}", ["method"] + protocols, rows,
                         notes))
    return out




def paper_table2() -> list[Table | Text]:
    header = ["method"] + [f"{model} {abbr}{arrow(key)}" for model in paper.PAPER_MODELS
                           for abbr, key in paper.PAPER_METRIC_KEYS.items()]
    notes: list[str] = []
    rows = []
    for method in paper.PAPER_TABLE2_METHODS:
        row = [(method + paper.PAPER_MARKS.get(method, ""), False)]
        for model in paper.PAPER_MODELS:
            for key in paper.PAPER_METRICS:
                value = paper.PAPER_TABLE2[(model, method)][key]
                text = "n/a" if math.isnan(value) else f"{value:.3f}"
                note = paper.PAPER_TABLE2_NOTES.get((model, method, key))
                if note:
                    notes.append(f"[{len(notes) + 1}] {model}, {method}, {key}: {note}")
                    text += f" [{len(notes)}]"
                row.append((text, False))
        rows.append(row)
    renamed = [f"{p} → {s}" for p, s in paper.PAPER_TO_SRDXAI.items() if s and s != p]
    notes += paper.PAPER_TABLE2_GENERAL_NOTES
    notes.append("† / ‡: the paper's row marks, pairing CAM rows with SRD-low (†) and SRD-high "
                 "(‡); the caption defining them is not in the transcribed text.")
    notes.append("Paper names and our rows: " + ", ".join(renamed) + ".")
    return [Table(f"Paper's Table 2 (not our numbers) — {paper.PAPER_SOURCE}", header, rows,
                  notes)]


