"""``srdxai report``: a run directory's ``results.sqlite`` as ``report.html`` and ``report.md``.

The report is built once as a list of sections made of neutral blocks (text, tables, figures)
and then written twice: as one self-contained HTML file (inline CSS, figures as base64 PNG data
URIs) and as Markdown with its figures written to ``figures/`` next to it. Every file is written
to a temporary name and renamed, so a reader never sees half a report. A section whose
experiment has no rows says "not run" instead of failing, and experiments this module does not
know still get a generic table, so new experiments show up without code changes.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from srdxai.errors import RunDirectoryError, SrdxaiError
from srdxai.experiments.store import check_writable, merged_path
from srdxai.report import paper, tables
from srdxai.report.figures import write_atomic
from srdxai.report.tables import CurveSet, MetricTable, RunInfo

__all__ = ["build_report", "TABLE2_METRICS", "GAE_METRICS", "ROBUSTNESS_EXPERIMENTS"]

TABLE2_METRICS = ("pointing_game", "pointing_game_15px", "attribution_localisation",
                  "sparseness", "fidelity", "mufidelity", "stability")
#: the SRD rows the paired differences are taken against: SRD-high is the paper's best
#: fidelity row (.206 VGG16 / .142 ResNet50), SRD-input the pixel map of the headline method
SRD_REFERENCES = ("SRD-high", "SRD-input")
#: marks a row (or cell) the paper has no counterpart for
BEYOND = " §"
GAE_METRICS = ("local_consistency", "contrastiveness", "gae")
ROBUSTNESS_EXPERIMENTS = ("attack", "noise", "apop")
CURVE_EXPERIMENTS = {"sensitivity_n": "Sensitivity-n", "insertion_deletion": "Insertion / deletion"}
KNOWN_EXPERIMENTS = frozenset({"table2", "activation", "gae", "randomisation",
                               *CURVE_EXPERIMENTS,
                               *ROBUSTNESS_EXPERIMENTS})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_LISTED = 12  # missing-value cells listed by name in a table's notes


# --- blocks -----------------------------------------------------------------------------------

@dataclass
class Text:
    text: str


@dataclass
class Code:
    text: str
    lang: str = ""  # "json": the text is JSON (the Markdown writer relies on it)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[tuple[str, bool]]]  # (text, bold)
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    title: str
    filename: str  # under figures/ for the Markdown report
    png: bytes


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Text | Code | Table | Figure | Section] = field(default_factory=list)
    ran: bool = True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


class _Names:
    """Unique figure file names (two models may slug to the same text)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, stem: str) -> str:
        base, k = _slug(stem), 1
        name = f"{base}.png"
        while name in self.used:
            k += 1
            name = f"{base}-{k}.png"
        self.used.add(name)
        return name


def _not_run(title: str, anchor: str, experiments: Sequence[str]) -> Section:
    which = ", ".join(f"'{e}'" for e in experiments)
    return Section(title, anchor, [Text(f"Not run: results.sqlite has no rows for experiment "
                                        f"{which}.")], ran=False)


# --- metric tables ----------------------------------------------------------------------------

def _arrow(metric: str) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(tables.direction(metric) or "", "")


def _n_note(typical: int) -> str:
    return f"n = {typical} per cell (samples with a finite value; other counts are shown)."


def _notes(table: MetricTable, model: str, metrics: Sequence[str]) -> list[str]:
    notes = []
    typical = table.typical_n(model)
    if typical is not None:
        notes.append(_n_note(typical))
    missing = [(method, metric, c.missing) for method in table.methods
               for metric in metrics
               if (c := table.cell(model, method, metric)) is not None and c.missing]
    if missing:
        listed = "; ".join(f"{m} · {k}: {n}" for m, k, n in missing[:_MAX_LISTED])
        more = f"; and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        notes.append(f"NaN/NULL values left out of the statistics: {listed}{more}.")
    return notes


def _model_tables(table: MetricTable, title: str, metrics: Sequence[str] | None = None,
                  marks: dict[str, str] | None = None, notes: Sequence[str] = ()
                  ) -> list[Table]:
    """One methods x metrics table per model; ``metrics`` first, then any others present;
    ``marks`` appends a mark to a method's name, ``notes`` go under every table."""
    out = []
    for model in table.models:
        present = table.metrics_for(model)
        order = [m for m in (metrics or ()) if m in present]
        order += [m for m in present if m not in order]
        typical = table.typical_n(model)
        rows = []
        for method in table.methods_for(model, order):
            row = [(method + (marks or {}).get(method, ""), False)]
            for metric in order:
                c = table.cell(model, method, metric)
                row.append((tables.format_cell(c, typical), bool(c and c.best)))
            rows.append(row)
        out.append(Table(f"{title}: {model}", ["method"] + [m + _arrow(m) for m in order], rows,
                         _notes(table, model, order) + list(notes)))
    return out


# --- figures ----------------------------------------------------------------------------------

def _new_figure(width: float, height: float):  # -> matplotlib.figure.Figure
    # The object-oriented API with the Agg canvas: no pyplot state, no GUI backend, and the
    # figure is freed with its last reference (nothing registered that would need closing).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clear()
    return buf.getvalue()


#: per curve the report draws: (x axis label, y axis label, x scale)
CURVE_AXES = {
    "sensitivity_n": ("n, features removed at random (log scale)",
                      "Pearson r (map sum vs output change)", "log"),
    "insertion": ("fraction of pixels inserted", "class probability", "linear"),
    "deletion": ("fraction of pixels removed", "class probability", "linear"),
    "mprt_ssim": ("layers randomised, from the output", "SSIM to the original map", "linear"),
    "mprt_spearman_abs": ("layers randomised, from the output",
                          "Spearman of |maps| to the original", "linear"),
    "mprt_spearman": ("layers randomised, from the output", "Spearman to the original map",
                      "linear"),
    "mprt_hog_cosine": ("layers randomised, from the output", "HOG cosine to the original",
                        "linear"),
}
#: line styles cycled with the colours, so 19 methods stay apart in black and white too
LINE_STYLES = ("-", "--", ":", "-.")


def line_styles(n: int) -> list[tuple[object, str]]:
    """(colour, line style) for ``n`` lines: ten colours, then the next style."""
    colours = _colours(min(n, 10))
    return [(colours[i % len(colours)], LINE_STYLES[(i // len(colours)) % len(LINE_STYLES)])
            for i in range(n)]


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _mean_curve(cs: CurveSet) -> tuple[np.ndarray, np.ndarray, int, bool] | None:
    """(x, mean y, samples used, interpolated?) of one method's curves, None if unusable."""
    pairs = [(np.asarray(x, float), np.asarray(y, float)) for x, y in zip(cs.xs, cs.ys,
                                                                         strict=True)]
    pairs = [(x, y) for x, y in pairs if x.size and x.size == y.size]
    if not pairs:
        return None
    x0 = pairs[0][0]
    if all(x.size == x0.size and np.allclose(x, x0, equal_nan=True) for x, _ in pairs):
        with np.errstate(all="ignore"):
            mean = np.nanmean(np.stack([y for _, y in pairs]), axis=0)
        return x0, mean, len(pairs), False
    # Samples on different x grids: average on the union of their x values inside the range
    # every sample covers (np.interp would otherwise extend the ends flat).
    lo = max(np.nanmin(x) for x, _ in pairs)
    hi = min(np.nanmax(x) for x, _ in pairs)
    grid = np.unique(np.concatenate([x[np.isfinite(x)] for x, _ in pairs]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if grid.size == 0:
        return None
    ys = []
    for x, y in pairs:
        order = np.argsort(x)
        ys.append(np.interp(grid, x[order], y[order]))
    with np.errstate(all="ignore"):
        mean = np.nanmean(np.stack(ys), axis=0)
    return grid, mean, len(pairs), True


def _curve_figures(db: Path, experiment: str, names: _Names) -> list[Figure | Text]:
    """Per model: one panel per curve name, the mean curve of every method."""
    sets = tables.curves(db, experiment)
    out: list[Figure | Text] = []
    for model in dict.fromkeys(cs.model for cs in sets):
        mine = [cs for cs in sets if cs.model == model]
        curve_names = list(dict.fromkeys(cs.curve for cs in mine))
        methods = list(dict.fromkeys(cs.method for cs in mine))
        style = dict(zip(methods, line_styles(len(methods)), strict=True))
        width = max(6.0, 4.8 * len(curve_names))
        # Legend below the panels, as many ~2.6-inch columns as fit (method names are long).
        ncols = max(1, min(len(methods), int(width // 2.6)))
        fig = _new_figure(width, 3.8 + 0.22 * math.ceil(len(methods) / ncols))
        axes = fig.subplots(1, len(curve_names), squeeze=False)[0]
        interpolated = skipped = False
        for ax, curve in zip(axes, curve_names, strict=True):
            for cs in (c for c in mine if c.curve == curve):
                got = _mean_curve(cs)
                if got is None:
                    skipped = True
                    continue
                x, y, n, interp = got
                interpolated |= interp
                colour, line = style[cs.method]
                ax.plot(x, y, color=colour, linestyle=line, label=f"{cs.method} (n={n})",
                        lw=1.5)
            xlabel, ylabel, scale = CURVE_AXES.get(curve, (curve, "value", "linear"))
            ax.set_title(curve.replace("_", "-"))
            ax.set_xscale(scale)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{ylabel}, mean over samples")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab, strict=True):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=ncols,
                       fontsize="small")
        fig.suptitle(f"{experiment}: {model}")
        title = f"{experiment}: mean curves per method, {model}"
        out.append(Figure(title, names(f"{experiment}-{model}-curves"), _png(fig)))
        if interpolated:
            out.append(Text(f"{model}: samples were on different x grids; their curves were "
                            "interpolated onto the x values common to all before averaging."))
        if skipped:
            out.append(Text(f"{model}: some curves were empty or had x and y of different "
                            "lengths and were left out."))
    return out


def _bar_figures(table: MetricTable, metrics: Sequence[str], experiment: str, names: _Names
                 ) -> list[Figure]:
    """Per model: one bar panel per metric, bars = methods with their 95 % CI."""
    out = []
    for model in table.models:
        present = [m for m in metrics if m in table.metrics_for(model)]
        if not present:
            continue
        methods = table.methods_for(model, present)
        width = max(4.0, 0.45 * len(methods) + 1.5)
        # Side by side while narrow; one panel per row once the method names need the width.
        if len(methods) <= 8:
            fig = _new_figure(width * len(present), 4.2)
            axes = fig.subplots(1, len(present), squeeze=False)[0]
        else:
            fig = _new_figure(width, 3.6 * len(present))
            axes = fig.subplots(len(present), 1, squeeze=False)[:, 0]
        for ax, metric in zip(axes, present, strict=True):
            cells = [table.cell(model, m, metric) for m in methods]
            means = [c.mean if c and c.n else math.nan for c in cells]
            # (below, above) the mean: Wilson's interval for 0/1 metrics, else +- t
            errs = np.array([
                (c.mean - c.interval[0], c.interval[1] - c.mean) if c and c.interval
                else (c.half_width, c.half_width) if c and c.n > 1 else (0.0, 0.0)
                for c in cells]).T
            colours = ["tab:orange" if c and c.best else "tab:blue" for c in cells]
            pos = np.arange(len(methods))
            ax.bar(pos, np.nan_to_num(means), yerr=np.nan_to_num(errs), color=colours,
                   capsize=3)
            ax.set_xticks(pos, methods, rotation=60, ha="right", fontsize="small")
            ax.set_title(metric + _arrow(metric))
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{experiment}: {model} (mean and 95 % CI: t, or Wilson for 0/1 "
                     "metrics; best in orange)")
        out.append(Figure(f"{experiment}: {model}", names(f"{experiment}-{model}-bars"),
                          _png(fig)))
    return out


# --- sections ---------------------------------------------------------------------------------

def _header(info: RunInfo, contents: list[Section]) -> Section:
    blocks: list = [
        Text(f"Results database: {info.path}"),
        Text(f"Config hash: {info.config_hash} · code version: {info.code_version} · "
             f"created: {info.created}"),
        Text(f"Rows: {info.n_results} results, {info.n_curves} curves, {info.n_artifacts} "
             f"artifacts."),
    ]
    others = [v for v in info.row_code_versions if v != info.code_version]
    if others:
        blocks.append(Text(f"Warning: result rows come from other code versions too: "
                           f"{', '.join(info.row_code_versions)}."))
    if info.rows_per_experiment:
        blocks.append(Table("Result rows per experiment", ["experiment", "rows"],
                            [[(e, False), (str(n), False)]
                             for e, n in info.rows_per_experiment.items()]))
    if info.config is not None:
        blocks += [Text("Configuration:"),
                   Code(json.dumps(info.config, indent=2, sort_keys=True), "json")]
    elif info.config_text:
        # Shown as a JSON string: exact, and safe to put in either report whatever it holds.
        blocks += [Text("Configuration (stored text that is not a JSON object):"),
                   Code(json.dumps(info.config_text), "json")]
    else:
        blocks += [Text("Configuration:"), Code("(no configuration stored)")]
    blocks.append(Text(
        "Cells are the mean over samples ± the half-width of its 95 % confidence interval "
        "(Student's t with n−1 degrees of freedom); NaN/NULL values are left out and counted "
        "in the notes; n=1 has no interval. Bold marks the best method per model and metric "
        "(↑ higher is better, ↓ lower is better; ties are all bold; metrics without an arrow "
        "have no declared direction and no mark)."))
    blocks.append(Text("Sections: " + "; ".join(
        f"{s.title}{'' if s.ran else ' (not run)'}" for s in contents) + "."))
    return Section("Run", "run", blocks)


def _paper_table2() -> list[Table | Text]:
    header = ["method"] + [f"{model} {abbr}{_arrow(key)}" for model in paper.PAPER_MODELS
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


def _paper_activation() -> list[Table]:
    notes: list[str] = []
    rows = []
    for method in paper.PAPER_ACTIVATION_METHODS:
        label = method
        note = paper.PAPER_ACTIVATION_NOTES.get((method, "*"))
        if note:
            notes.append(f"[{len(notes) + 1}] {method}: {note}")
            label += f" [{len(notes)}]"
        values = paper.PAPER_ACTIVATION_FIDELITY[method]
        rows.append([(label, False)] + [
            ("-" if math.isnan(values[a]) else f"{values[a]:.3f}", False)
            for a in paper.PAPER_ACTIVATIONS])
    rows.append([("accuracy", False)] + [
        (f"{paper.PAPER_ACTIVATION_ACCURACY[a]:.3f}", False) for a in paper.PAPER_ACTIVATIONS])
    return [Table(f"Paper's activation table (not our numbers) — "
                  f"{paper.PAPER_ACTIVATION_SOURCE}", ["method"] + list(paper.PAPER_ACTIVATIONS),
                  rows, notes)]


def _identical_notes(db: Path, experiment: str) -> list[Text]:
    """A note per method whose every value equals an earlier method's on the same model."""
    return [Text(f"{model}: {method} equals {other} on every metric and sample of this run: "
                 "the two are the same computation here (for example SRD-low seeded with "
                 "Grad-CAM at its own layer is Grad-CAM), not two independent results.")
            for model, method, other in tables.identical_methods(db, experiment)]


def _is_variant(metric: str) -> bool:
    return metric.startswith("fidelity[")


def _protocol_text(config: dict | None) -> list[Text]:
    """The evaluation protocol of the run, in words (from its stored configuration)."""
    from srdxai.experiments.protocol import Protocol

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


def _beyond_marks(methods: Sequence[str]) -> dict[str, str]:
    in_paper = {v for v in paper.PAPER_TO_SRDXAI.values() if v}
    return {m: BEYOND for m in methods if m not in in_paper and m != "-"}


def _paired_tables(db: Path, experiment: str, metrics: Sequence[str], title: str,
                   columns: dict[str, str] | None = None) -> list[Table]:
    """``SRD row - method`` per metric, paired by sample: rows methods, columns models."""
    out = []
    for metric in metrics:
        for reference in SRD_REFERENCES:
            diffs = tables.paired_differences(db, experiment, metric, reference)
            if not diffs:
                continue
            models = list(dict.fromkeys(m for m, _ in diffs))
            methods = list(dict.fromkeys(meth for _, meth in diffs))
            rows = []
            for method in methods:
                row = [(method, False)]
                for model in models:
                    c = diffs.get((model, method))
                    text = tables.format_cell(c, None) if c else "—"
                    clear = bool(c and c.n > 1 and math.isfinite(c.half_width)
                                 and abs(c.mean) > c.half_width)
                    row.append((text + (" *" if clear else ""), False))
                rows.append(row)
            ns = sorted({c.n for c in diffs.values() if c.n})
            widths = [2 * c.half_width for c in diffs.values()
                      if c.n > 1 and math.isfinite(c.half_width)]
            notes = [f"Cells: mean of {reference} − method over the same samples and draws, "
                     "± the 95 % t half-width of the paired differences; positive: "
                     f"{reference} scores higher. * the interval excludes 0.",
                     f"n = {', '.join(map(str, ns))} pairs per cell; interval widths "
                     f"{tables.format_number(min(widths)) if widths else 'nan'} to "
                     f"{tables.format_number(max(widths)) if widths else 'nan'}."]
            header = ["method"] + [(columns or {}).get(m, m) for m in models]
            out.append(Table(f"{title}: {reference} − method, {metric} (paired)", header,
                             rows, notes))
    return out


def _competition_ranks(means: dict[str, float]) -> dict[str, int]:
    """1 + the number of strictly better (higher) means: ties share a rank."""
    return {m: 1 + sum(other > v for other in means.values()) for m, v in means.items()}


def _ranking_tables(table: MetricTable) -> list[Table]:
    """Per model: each method's rank (1 = best) and mean under the default fidelity protocol,
    every variant and MuFidelity."""
    from srdxai.experiments.protocol import VARIANTS

    out = []
    for model in table.models:
        protocols = [m for m in table.metrics_for(model)
                     if m == "fidelity" or _is_variant(m) or m == "mufidelity"]
        if len(protocols) < 2:
            continue
        methods = table.methods_for(model, protocols)
        ranks: dict[tuple[str, str], int] = {}
        for metric in protocols:
            means = {m: c.mean for m in methods
                     if (c := table.cell(model, m, metric)) is not None and c.n > 0
                     and math.isfinite(c.mean)}
            for m, rank in _competition_ranks(means).items():
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


def _table2(db: Path, names: _Names, config: dict | None = None) -> Section:
    everything = tables.metric_table(db, "table2")
    if everything.empty:
        return _not_run("Table 2", "table2", ["table2"])
    core = [m for m in everything.metrics if not _is_variant(m)]
    table = tables.metric_table(db, "table2", core)
    marks = _beyond_marks(table.methods)
    blocks: list = [Text("Ours: the models and data of this run (see the configuration), "
                         "not the paper's ImageNet-S50 setup.")]
    blocks += _protocol_text(config)
    if (config or {}).get("quick") and "efficientnet-lite0" in table.models:
        from srdxai.experiments.runner import QUICK_SKIPPED_ON_IMAGENET

        blocks.append(Text(
            "--quick on EfficientNet-Lite0 (ImageNet composites): no stability, no protocol "
            f"variants, and no {' or '.join(QUICK_SKIPPED_ON_IMAGENET)} (one forward pass per "
            "channel of the last convolution: 1280 per map); the full run scores them."))
    beyond_note = [f"{BEYOND.strip()}: a row the paper's Table 2 does not have (the paper's "
                   "Smoothgrad is most likely SmoothGrad-abs, Captum's absolute value)."
                   ] if marks else []
    blocks += _model_tables(table, "Table 2 (ours)", TABLE2_METRICS, marks, beyond_note)
    blocks += _identical_notes(db, "table2")
    blocks.append(Text("The paper's fidelity claim rests on SRD-high, its best-fidelity SRD row "
                       "(.206 VGG16 / .142 ResNet50); SRD-input is its pixel map (.069 / .080). "
                       "The tables below compare both with every other method on the same "
                       "samples and draws."))
    blocks += _paired_tables(db, "table2", ["fidelity", "mufidelity"], "Table 2 (ours)")
    ranking = _ranking_tables(everything)
    if ranking:
        blocks.append(Text("What decides the ranking: the same maps scored under the protocol "
                           "variants. A method whose rank moves a lot between columns owes its "
                           "place to a protocol choice the paper leaves open."))
        blocks += ranking
    blocks += _curve_figures(db, "table2", names)
    blocks += _paper_table2()
    return Section("Table 2", "table2", blocks)


def _activation(db: Path, names: _Names) -> Section:
    table = tables.metric_table(db, "activation")
    if table.empty:
        return _not_run("Activation functions", "activation", ["activation"])
    suffix = {m: m.rsplit("-", 1)[-1] for m in table.models}
    # The column is the activation named by the model; fall back to the whole model name when
    # two models share an activation (e.g. a VGG and a ResNet with ReLU).
    clash = len(set(suffix.values())) < len(suffix)
    columns = {m: m if clash else paper.ACTIVATION_NAMES.get(a, a) for m, a in suffix.items()}
    blocks: list = []
    fid_models = [m for m in table.models if "fidelity" in table.metrics_for(m)]
    rows = []
    beyond = False
    marks = _beyond_marks(table.methods)
    for method in table.methods:
        cells = [table.cell(m, method, "fidelity") for m in fid_models]
        if any(c is not None for c in cells):
            row = [(method + marks.get(method, ""), False)]
            for c, m in zip(cells, fid_models, strict=True):
                text = tables.format_cell(c, table.typical_n(m))
                # the paper scores LRP-z+ on the ReLU model only (its rule assumes ReLUs)
                if c is not None and method == "LRP-z+" and suffix[m] != "relu":
                    text += BEYOND
                    beyond = True
                row.append((text, bool(c and c.best)))
            rows.append(row)
    acc_models = [m for m in table.models if "accuracy" in table.metrics_for(m)]
    shown = list(dict.fromkeys(fid_models + acc_models))
    if rows or acc_models:
        accuracy = [("accuracy", False)]
        for m in shown:
            # The runner writes accuracy under method '-'; otherwise take the first method that
            # has it (pooling methods would count the same samples several times).
            with_acc = [meth for meth in table.methods if table.cell(m, meth, "accuracy")]
            pick = "-" if "-" in with_acc else (with_acc[0] if with_acc else None)
            c = table.cell(m, pick, "accuracy") if pick else None
            accuracy.append((tables.format_cell(c, None), False))
        rows = [r + [("—", False)] * (len(shown) - len(fid_models)) for r in rows]
        notes = [f"Columns: {', '.join(f'{columns[m]} = {m}' for m in shown)}.",
                 "Cells: fidelity (↑) mean ± 95 % CI, best per column in bold; last row: the "
                 "model's accuracy (no mark)."]
        if beyond or any(m in marks for m in table.methods):
            notes.append(f"{BEYOND.strip()}: beyond the paper: rows its Table 2 does not have, "
                         "and LRP-z+ on models without ReLUs (the paper scores it on ReLU "
                         "only).")
        typical = table.typical_n()
        if typical is not None:
            notes.append(_n_note(typical))
        blocks.append(Table("Fidelity per activation function (ours)",
                            ["method"] + [columns[m] for m in shown], rows + [accuracy], notes))
    blocks += _paired_tables(db, "activation", ["fidelity"], "Activation functions (ours)",
                             columns)
    ranking = _activation_ranking(table, columns)
    if ranking is not None:
        blocks.append(ranking)
    rest = [k for k in table.metrics
            if k not in ("fidelity", "accuracy", "mufidelity") and not _is_variant(k)]
    if rest:
        blocks += _model_tables(tables.metric_table(db, "activation", rest),
                                "Other metrics (ours)")
    blocks += _curve_figures(db, "activation", names)
    blocks += _paper_activation()
    return Section("Activation functions", "activation", blocks)


def _activation_ranking(table: MetricTable, columns: dict[str, str]) -> Table | None:
    """The SRD rows' ranks among the methods, per protocol (rows) and activation (columns)."""
    models = [m for m in table.models if "fidelity" in table.metrics_for(m)]
    protocols = [k for k in table.metrics if k == "fidelity" or _is_variant(k)
                 or k == "mufidelity"]
    if not models or len(protocols) < 2:
        return None
    rows = []
    for metric in protocols:
        row = [(metric, False)]
        for model in models:
            means = {m: c.mean for m in table.methods
                     if (c := table.cell(model, m, metric)) is not None and c.n > 0
                     and math.isfinite(c.mean) and m != "-"}
            ranks = _competition_ranks(means)
            parts = [f"{ref} {ranks[ref]}" for ref in SRD_REFERENCES if ref in ranks]
            best = ", ".join(m for m, r in ranks.items() if r == 1) or "—"
            row.append((f"{' / '.join(parts)} of {len(ranks)}; best {best}", False))
        rows.append(row)
    return Table("What decides the ranking (activation functions): the SRD rows' ranks",
                 ["protocol"] + [columns[m] for m in models], rows,
                 ["Rank 1 = best; each row scores the same maps under one protocol (see the "
                  "Table 2 section for the variants' definitions)."])


def _generic(db: Path, experiment: str, title: str, anchor: str, names: _Names,
             metrics: Sequence[str] | None = None, bars: bool = False) -> Section:
    table = tables.metric_table(db, experiment)
    figures = _curve_figures(db, experiment, names)
    if table.empty and not figures:
        return _not_run(title, anchor, [experiment])
    blocks: list = list(figures)
    blocks += _model_tables(table, f"{title} (ours)", metrics)
    blocks += _identical_notes(db, experiment)
    if bars and metrics:
        blocks += _bar_figures(table, metrics, experiment, names)
    return Section(title, anchor, blocks)


#: artifacts under this prefix are the attack's figures (shown with its table)
ATTACK_FIGURES = "attack/"
#: and these the cascading randomisation's
RANDOMISATION_FIGURES = "randomisation/"
ATTACK_NOTE = (
    "Explanation-manipulation attack (Dombrowski et al. 2019): each image is optimised so that "
    "the method's map approaches another image's map while the softmax output stays put. "
    "Best (bold) = most robust method: its manipulated map least like the target "
    "(ssim/pcc_to_target low, mse_to_target high) and most like the original map. "
    "output_mse, prediction_kept and target_probability_change say how well the output was "
    "kept; linf and psnr how much the image changed (model-input units; PSNR in dB over each "
    "image's value range).")


RANDOMISATION_NOTE = (
    "Sanity checks (Adebayo et al. 2018; Sixt et al. 2020): a map that explains the model "
    "should change when the model's parameters are re-drawn and when another class is "
    "explained. mprt_*: similarity of the map of the fully randomised model (every layer "
    "re-drawn, from the output down, cascading) to the original map; the curves follow the "
    "similarity layer by layer. random_logit_ssim: SSIM between the maps of the target class "
    "and of a random other class. Lower is better everywhere: a method whose similarity stays "
    "high explains the input more than the model.")


def _randomisation(db: Path, names: _Names) -> Section:
    section = _generic(db, "randomisation", "Randomisation (sanity checks)", "randomisation",
                       names)
    if section.ran:
        section.blocks.insert(0, Text(RANDOMISATION_NOTE))
        section.blocks += _png_figures(
            [(n, d) for n, d in tables.artifacts(db, "png")
             if n.startswith(RANDOMISATION_FIGURES)], names)
    return section


def _robustness(db: Path, names: _Names) -> Section:
    subs = [_generic(db, e, f"Robustness: {e}", f"robustness-{e}", names)
            for e in ROBUSTNESS_EXPERIMENTS]
    attack = subs[ROBUSTNESS_EXPERIMENTS.index("attack")]
    if attack.ran:
        attack.blocks.insert(0, Text(ATTACK_NOTE))
        attack.blocks += _png_figures(
            [(n, d) for n, d in tables.artifacts(db, "png") if n.startswith(ATTACK_FIGURES)],
            names)
    if not any(s.ran for s in subs):
        return _not_run("Robustness", "robustness", ROBUSTNESS_EXPERIMENTS)
    return Section("Robustness", "robustness", list(subs))


def _png_figures(found: list[tuple[str, bytes]], names: _Names) -> list:
    blocks: list = []
    for name, data in found:
        if data.startswith(PNG_SIGNATURE):
            blocks.append(Figure(name, names(f"artifact-{name.removesuffix('.png')}"), data))
        else:
            blocks.append(Text(f"Artifact {name!r} is marked 'png' but is not a PNG; left out."))
    return blocks


def _qualitative(db: Path, names: _Names) -> Section:
    found = [(n, d) for n, d in tables.artifacts(db, "png")
             if not n.startswith((ATTACK_FIGURES, RANDOMISATION_FIGURES))]
    if not found:
        return Section("Qualitative grid", "qualitative",
                       [Text("Not run: results.sqlite holds no PNG artifacts.")], ran=False)
    return Section("Qualitative grid", "qualitative", _png_figures(found, names))


def _sections(db: Path, info: RunInfo) -> list[Section]:
    names = _Names()
    body = [_table2(db, names, info.config), _activation(db, names)]
    for experiment, title in CURVE_EXPERIMENTS.items():
        body.append(_generic(db, experiment, title, _slug(experiment), names))
    body.append(_generic(db, "gae", "GAE", "gae", names, GAE_METRICS, bars=True))
    body.append(_robustness(db, names))
    body.append(_randomisation(db, names))
    body.append(_qualitative(db, names))
    for experiment in tables.experiments(db):
        if experiment not in KNOWN_EXPERIMENTS:
            body.append(_generic(db, experiment, f"Experiment '{experiment}'",
                                 f"experiment-{_slug(experiment)}", names))
    return [_header(info, body)] + body


# --- writers ----------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222;
       padding: 0 1em; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #aaa; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
tbody tr:nth-child(even) { background: #fafafa; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; }
.scroll { overflow-x: auto; max-width: 100%; }
.note { color: #555; font-size: 0.85em; margin: 0.2em 0; }
.notrun { color: #999; font-style: italic; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.85em; }
"""


def _html_block(block: Text | Code | Table | Figure | Section, level: int) -> list[str]:
    e = html.escape
    if isinstance(block, Section):
        out = [f'<section id="{e(block.anchor)}">', f"<h{level}>{e(block.title)}</h{level}>"]
        for b in block.blocks:
            out += _html_block(b, level + 1)
        return out + ["</section>"]
    if isinstance(block, Text):
        cls = ' class="notrun"' if block.text.startswith("Not run") else ""
        return [f"<p{cls}>{e(block.text)}</p>"]
    if isinstance(block, Code):
        return [f"<pre>{e(block.text)}</pre>"]
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        return [f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.title)}">'
                f"<figcaption>{e(block.title)}</figcaption></figure>"]
    head = "".join(f"<th>{e(h)}</th>" for h in block.header)
    body = ["<tr>" + "".join(f"<td><b>{e(t)}</b></td>" if bold else f"<td>{e(t)}</td>"
                             for t, bold in row) + "</tr>" for row in block.rows]
    # wide tables (19 methods x many metrics) scroll sideways inside the page, never cut off
    return ([f'<div class="scroll"><table><caption>{e(block.title)}</caption><thead><tr>'
             f"{head}</tr></thead><tbody>"] + body + ["</tbody></table></div>"]
            + [f'<p class="note">{e(n)}</p>' for n in block.notes])


def _html(sections: list[Section]) -> str:
    contents = "".join(
        f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a>'
        f"{'' if s.ran else ' (not run)'}</li>" for s in sections)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>srdxai benchmark report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>srdxai benchmark report</h1>", f"<nav><ul>{contents}</ul></nav>"]
    for s in sections:
        parts += _html_block(s, 2)
    return "\n".join(parts + ["</body></html>", ""])


# Markdown: everything the report shows is literal text (most of it comes from the database:
# names of experiments, models, methods, metrics and artifacts, the configuration), so a name
# can neither break a table nor add markup, HTML or links. CommonMark backslash escapes cover
# the markup; HTML's three characters become entities (which also defeats <autolinks>).
_MD_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")  # newlines end a table row or line
_MD_ALWAYS = re.compile(r"[\\`*#|~$@]")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # intraword _ is no markup
_MD_LINK_END = re.compile(r"\](?=[(\[:])")  # ](url), ][ref], [ref]: definitions
_MD_AUTOLINK = re.compile(r"(?i)(?<=:)//|(?<=\bwww)\.")  # GitHub links bare URLs
_MD_BLOCK_START = re.compile(r"([-+=])|\d{1,9}([.)])(?=\s|$)")  # a list, rule or setext line


def _md_text(text: str, brackets: bool = False) -> str:
    """``text`` as literal Markdown inline text on one line; ``brackets``: inside ``[...]``
    (an image's text), where every bracket must be escaped to keep the brackets balanced."""
    text = html.escape(_MD_CONTROL.sub(" ", str(text)).strip(), quote=False)
    text = _MD_ALWAYS.sub(lambda m: "\\" + m.group(), text)
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    if brackets:
        text = text.replace("[", "\\[").replace("]", "\\]")
    else:
        text = _MD_LINK_END.sub(r"\\]", text)
    return _MD_AUTOLINK.sub(lambda m: "\\" + m.group(), text)


def _md_line(text: str) -> str:
    """``text`` as a paragraph line: also nothing at its start may open a block."""
    out = _md_text(text)
    start = _MD_BLOCK_START.match(out)
    if start is None:
        return out
    if start.group(1):
        return "\\" + out
    cut = start.end() - 1
    return out[:cut] + "\\" + out[cut:]


def _md_code(block: Code) -> list[str]:
    text = block.text
    if block.lang == "json":
        # In JSON these characters occur only inside strings, where the \u escapes mean the
        # same: the configuration stays valid, equal JSON with no HTML and no fence in it.
        text = text.translate({ord(c): f"\\u{ord(c):04x}" for c in "<>&`"})
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + block.lang, text, fence, ""]


def _md_block(block: Text | Code | Table | Figure | Section, level: int) -> list[str]:
    if isinstance(block, Section):
        out = ["#" * level + " " + _md_text(block.title), ""]
        for b in block.blocks:
            out += _md_block(b, level + 1)
        return out
    if isinstance(block, Text):
        if block.text.startswith("Not run"):
            return [f"_{_md_text(block.text)}_", ""]
        return [_md_line(block.text), ""]
    if isinstance(block, Code):
        return _md_code(block)
    if isinstance(block, Figure):  # the file name is a slug: [A-Za-z0-9._-]
        return [f"![{_md_text(block.title, brackets=True)}](figures/{block.filename})", ""]
    out = [f"**{_md_text(block.title)}**", "",
           "| " + " | ".join(_md_text(h) for h in block.header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(block.header) - 1)) + "|"]
    for row in block.rows:
        out.append("| " + " | ".join(f"**{_md_text(t)}**" if bold else _md_text(t)
                                     for t, bold in row) + " |")
    out.append("")
    for note in block.notes:
        out += [_md_line(note), ""]
    return out


def _markdown(sections: list[Section]) -> str:
    lines = ["# srdxai benchmark report", ""]
    for s in sections:
        lines += _md_block(s, 2)
    return "\n".join(lines)


def _figures(blocks: Sequence) -> list[Figure]:
    out = []
    for b in blocks:
        if isinstance(b, Section):
            out += _figures(b.blocks)
        elif isinstance(b, Figure):
            out.append(b)
    return out


#: errno values meaning "cannot write here" (as opposed to a bug or a vanished file)
_NO_WRITE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def _cannot_write(target: Path, run_dir: Path, exc: OSError) -> RunDirectoryError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space and run `srdxai report` again"
    else:
        todo = (f"make {target.parent} writable (`chmod u+w {target.parent}`), or copy "
                f"{run_dir} somewhere writable and run `srdxai report` on the copy")
    return RunDirectoryError(f"cannot write the report file {target}: "
                             f"{exc.strerror or exc}; {todo}. No report file is left "
                             "half-written.")


def _write_atomic(path: Path, data: bytes, run_dir: Path) -> None:
    try:
        write_atomic(path, lambda handle: handle.write(data))
    except OSError as exc:
        if exc.errno in _NO_WRITE:
            raise _cannot_write(path, run_dir, exc) from exc
        raise


def build_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/report.md`` (with its
    figures in ``run_dir/figures/``) from ``run_dir/results.sqlite``; returns both paths.

    Raises :class:`~srdxai.errors.InvalidInputError` when the database is missing, not a
    results database, or empty, saying what to run, and its subclass
    :class:`~srdxai.errors.RunDirectoryError` when the database is damaged or a report file
    cannot be written (naming the file; reports already there stay as they were).
    """
    run_dir = Path(run_dir)
    db = merged_path(run_dir)
    info = tables.run_info(db)
    # Before the figures are drawn: an unwritable run directory is one line, not lost work.
    check_writable(run_dir, f"write report.html, report.md and figures/ into {run_dir}")
    sections = _sections(db, info)
    figures = _figures(sections)
    if figures:
        try:
            (run_dir / "figures").mkdir(exist_ok=True)
        except OSError as exc:
            if exc.errno in _NO_WRITE:
                raise _cannot_write(run_dir / "figures", run_dir, exc) from exc
            raise
    for fig in figures:
        _write_atomic(run_dir / "figures" / fig.filename, fig.png, run_dir)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _write_atomic(md_path, _markdown(sections).encode("utf-8"), run_dir)
    _write_atomic(html_path, _html(sections).encode("utf-8"), run_dir)
    return html_path, md_path
