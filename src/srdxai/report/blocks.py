"""The building blocks of the report: neutral blocks (text, code, tables, figures, sections)
and the pieces every experiment's section is made of (a methods x metrics table per model, the
mean curves, bar figures, stored PNG figures, the generic section).

The report writers (``render.py``) turn the blocks into HTML and Markdown; the experiments
(``srdxai.experiments.suite``) build their sections from them.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from srdxai.metrics.registry import curve_axes
from srdxai.report import tables
from srdxai.report.tables import CurveSet, MetricTable

if TYPE_CHECKING:
    from srdxai.experiments.registry import ReportInputs

__all__ = ["CURVE_AXES", "Code", "Figure", "FigureNames", "Html", "LINE_STYLES", "MeanCurve",
           "PNG_SIGNATURE", "Section", "Table", "Text", "arrow", "axes_of", "bar_figures",
           "curve_figures", "generic_section", "identical_notes", "line_styles", "mean_curve",
           "model_tables", "n_note", "new_figure", "not_run", "png", "png_figures", "slug"]

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
class Html:
    """A self-contained HTML fragment (its own ``<style>``, no blank line, every text in it
    escaped by its maker), e.g. token attributions from :mod:`srdxai.report.tokens`; the
    Markdown report holds it as raw HTML."""

    title: str
    html: str


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Text | Code | Table | Figure | Html | Section] = field(default_factory=list)
    ran: bool = True


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


class FigureNames:
    """Unique figure file names (two models may slug to the same text)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, stem: str) -> str:
        base, k = slug(stem), 1
        name = f"{base}.png"
        while name in self.used:
            k += 1
            name = f"{base}-{k}.png"
        self.used.add(name)
        return name


def not_run(title: str, anchor: str, experiments: Sequence[str]) -> Section:
    which = ", ".join(f"'{e}'" for e in experiments)
    return Section(title, anchor, [Text(f"Not run: results.sqlite has no rows for experiment "
                                        f"{which}.")], ran=False)


# --- metric tables ----------------------------------------------------------------------------

def arrow(metric: str) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(tables.direction(metric) or "", "")


def n_note(typical: int) -> str:
    return f"n = {typical} per cell (samples with a finite value; other counts are shown)."


def _notes(table: MetricTable, model: str, metrics: Sequence[str]) -> list[str]:
    notes = []
    typical = table.typical_n(model)
    if typical is not None:
        notes.append(n_note(typical))
    missing = [(method, metric, c.missing) for method in table.methods
               for metric in metrics
               if (c := table.cell(model, method, metric)) is not None and c.missing]
    if missing:
        listed = "; ".join(f"{m} · {k}: {n}" for m, k, n in missing[:_MAX_LISTED])
        more = f"; and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        notes.append(f"NaN/NULL values left out of the statistics: {listed}{more}.")
    return notes


def model_tables(table: MetricTable, title: str, metrics: Sequence[str] | None = None,
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
        out.append(Table(f"{title}: {model}", ["method"] + [m + arrow(m) for m in order], rows,
                         _notes(table, model, order) + list(notes)))
    return out


# --- figures ----------------------------------------------------------------------------------

def new_figure(width: float, height: float):  # -> matplotlib.figure.Figure
    # The object-oriented API with the Agg canvas: no pyplot state, no GUI backend, and the
    # figure is freed with its last reference (nothing registered that would need closing).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clear()
    return buf.getvalue()


#: per curve an experiment records under a name of its own: (x axis label, y axis label, x
#: scale); a curve named after a metric (``sensitivity_n``, ``road``) has the axes the metric
#: declares (:func:`srdxai.metrics.curve_axes`)
CURVE_AXES = {
    "sensitivity_n_tokens": ("n, tokens removed at random (log scale)",
                             "Pearson r (map sum vs logit change)", "log"),
    "insertion_tokens": ("fraction of tokens inserted", "class probability", "linear"),
    "deletion_tokens": ("fraction of tokens removed", "class probability", "linear"),
    "mprt_ssim": ("layers randomised, from the output", "SSIM to the original map", "linear"),
    "mprt_spearman_abs": ("layers randomised, from the output",
                          "Spearman of |maps| to the original", "linear"),
    "mprt_spearman": ("layers randomised, from the output", "Spearman to the original map",
                      "linear"),
    "mprt_hog_cosine": ("layers randomised, from the output", "HOG cosine to the original",
                        "linear"),
}


def axes_of(curve: str) -> tuple[str, str, str] | None:
    """(x label, y label, x scale) of a curve: its experiment's (:data:`CURVE_AXES`), else
    its metric's; None where neither states them."""
    return CURVE_AXES.get(curve) or curve_axes(curve)


#: line styles cycled with the colours, so 19 methods stay apart in black and white too
LINE_STYLES = ("-", "--", ":", "-.")


def line_styles(n: int) -> list[tuple[object, str]]:
    """(colour, line style) for ``n`` lines: ten colours, then the next style."""
    colours = colour_cycle(min(n, 10))
    return [(colours[i % len(colours)], LINE_STYLES[(i // len(colours)) % len(LINE_STYLES)])
            for i in range(n)]


def colour_cycle(n: int) -> list:
    """``n`` colours: tab10, or tab20 beyond ten."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


class MeanCurve(NamedTuple):
    """One method's mean curve: x, the mean y, the samples used, whether they were
    interpolated onto common x values, and whether it was cut where a sample's curve ends
    while others go on."""

    x: np.ndarray
    y: np.ndarray
    n: int
    interpolated: bool
    cut: bool


def mean_curve(cs: CurveSet) -> MeanCurve | None:
    """One method's mean curve (:class:`MeanCurve`), None if unusable.

    The mean stops where the first sample's values end (:func:`_covered_mean`): a mean over
    fewer samples jumps where one drops out (IROF past an image's last superpixel went from
    0.96 to 1.0 on the samples with more superpixels)."""
    pairs = [(np.asarray(x, float), np.asarray(y, float)) for x, y in zip(cs.xs, cs.ys,
                                                                         strict=True)]
    pairs = [(x, y) for x, y in pairs if x.size and x.size == y.size]
    if not pairs:
        return None
    x0 = pairs[0][0]
    if all(x.size == x0.size and np.allclose(x, x0, equal_nan=True) for x, _ in pairs):
        mean, cut = _covered_mean(np.stack([y for _, y in pairs]))
        return MeanCurve(x0, mean, len(pairs), False, cut)
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
    mean, cut = _covered_mean(np.stack(ys))
    return MeanCurve(grid, mean, len(pairs), True, cut)


def _covered_mean(ys: np.ndarray) -> tuple[np.ndarray, bool]:
    """The mean over the rows of ``ys`` (samples x points) ignoring NaN, NaN past the end of
    any row: where a row's values stop (its trailing NaN: IROF past an image's last
    superpixel). A NaN between values (an undefined correlation at one n) only leaves that
    sample out of that point's mean, as the tables leave it out of a cell. Also whether a
    value was cut so."""
    finite = np.isfinite(ys)
    has = finite.any(1)
    # index of each row's last value; rows without any do not end anything
    last = np.where(has, ys.shape[1] - 1 - np.argmax(finite[:, ::-1], axis=1), ys.shape[1])
    with warnings.catch_warnings():  # a point without any value stays NaN (not drawn)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(ys, axis=0)
    past = np.arange(ys.shape[1]) > last.min()
    cut = bool(np.isfinite(mean[past]).any())
    mean[past] = np.nan
    return mean, cut


#: curve panels per row of a figure, and the characters per line of an axis label
_PANELS_PER_ROW = 3
_LABEL_WIDTH = 40


def curve_figures(db: Path, experiment: str, names: FigureNames) -> list[Figure | Text]:
    """Per model: one panel per curve name, the mean curve of every method."""
    from matplotlib.ticker import MaxNLocator

    sets = tables.curves(db, experiment)
    out: list[Figure | Text] = []
    for model in dict.fromkeys(cs.model for cs in sets):
        mine = [cs for cs in sets if cs.model == model]
        curve_names = list(dict.fromkeys(cs.curve for cs in mine))
        methods = list(dict.fromkeys(cs.method for cs in mine))
        style = dict(zip(methods, line_styles(len(methods)), strict=True))
        # at most three panels a row (a user's nine curve metrics in one row were a strip
        # 43 inches wide), rows as needed
        across = min(_PANELS_PER_ROW, len(curve_names))
        rows = math.ceil(len(curve_names) / across)
        width = max(6.0, 4.8 * across)
        # Legend below the panels, as many ~2.6-inch columns as fit (method names are long).
        ncols = max(1, min(len(methods), int(width // 2.6)))
        fig = new_figure(width, 3.6 * rows + 0.2 + 0.22 * math.ceil(len(methods) / ncols))
        grid = fig.subplots(rows, across, squeeze=False).flatten()
        for unused in grid[len(curve_names):]:
            unused.set_axis_off()
        axes = grid[:len(curve_names)]
        interpolated = skipped = gaps = False
        for ax, curve in zip(axes, curve_names, strict=True):
            whole = True  # every x value an integer
            for cs in (c for c in mine if c.curve == curve):
                got = mean_curve(cs)
                if got is None:
                    skipped = True
                    continue
                x, y, n, interp, cut = got
                interpolated |= interp
                gaps |= cut
                whole &= bool(np.allclose(x, np.round(x)))
                colour, line = style[cs.method]
                ax.plot(x, y, color=colour, linestyle=line, label=f"{cs.method} (n={n})",
                        lw=1.5)
            xlabel, ylabel, scale = axes_of(curve) or (curve, "value", "linear")
            title = curve.replace("_", "-")
            # a long name[reading] on two lines: three panels a row leave about 40 characters
            ax.set_title(title.replace("[", "\n[", 1) if len(title) > _LABEL_WIDTH else title)
            ax.set_xscale(scale)
            if whole and scale == "linear":  # steps (layers, superpixels): no 1.25 ticks
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(textwrap.fill(xlabel, _LABEL_WIDTH))
            ax.set_ylabel(textwrap.fill(f"{ylabel}, mean over samples", _LABEL_WIDTH))
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
        out.append(Figure(title, names(f"{experiment}-{model}-curves"), png(fig)))
        if interpolated:
            out.append(Text(f"{model}: samples were on different x grids; their curves were "
                            "interpolated onto the x values common to all before averaging."))
        if skipped:
            out.append(Text(f"{model}: some curves were empty or had x and y of different "
                            "lengths and were left out."))
        if gaps:
            out.append(Text(f"{model}: a mean curve stops where the first sample's curve ends "
                            "(IROF: at the fewest superpixels of any image), since a mean over "
                            "fewer samples would jump there."))
    return out


def bar_figures(table: MetricTable, metrics: Sequence[str], experiment: str, names: FigureNames
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
            fig = new_figure(width * len(present), 4.2)
            axes = fig.subplots(1, len(present), squeeze=False)[0]
        else:
            fig = new_figure(width, 3.6 * len(present))
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
            ax.set_title(metric + arrow(metric))
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{experiment}: {model} (mean and 95 % CI: t, or Wilson for 0/1 "
                     "metrics; best in orange)")
        out.append(Figure(f"{experiment}: {model}", names(f"{experiment}-{model}-bars"),
                          png(fig)))
    return out



def identical_notes(db: Path, experiment: str) -> list[Text]:
    """A note per method whose every value equals an earlier method's on the same model."""
    return [Text(f"{model}: {method} equals {other} on every metric and sample of this run: "
                 "the two are the same computation here (for example SRD-low seeded with "
                 "Grad-CAM at its own layer is Grad-CAM), not two independent results.")
            for model, method, other in tables.identical_methods(db, experiment)]



def png_figures(found: list[tuple[str, bytes]], names: FigureNames) -> list:
    blocks: list = []
    for name, data in found:
        if data.startswith(PNG_SIGNATURE):
            blocks.append(Figure(name, names(f"artifact-{name.removesuffix('.png')}"), data))
        else:
            blocks.append(Text(f"Artifact {name!r} is marked 'png' but is not a PNG; left out."))
    return blocks



def generic_section(report: ReportInputs, experiment: str, title: str, anchor: str,
                    metrics: Sequence[str] | None = None, bars: bool = False) -> Section:
    """An experiment's rows as a methods x metrics table per model (``metrics`` first), its
    mean curves, notes on identical methods, and bar figures of ``metrics`` if ``bars``; "not
    run" when the database has neither rows nor curves of ``experiment``."""
    db, names = report.db, report.names
    table = tables.metric_table(db, experiment)
    figures = curve_figures(db, experiment, names)
    if table.empty and not figures:
        return not_run(title, anchor, [experiment])
    blocks: list = list(figures)
    blocks += model_tables(table, f"{title} (ours)", metrics)
    blocks += identical_notes(db, experiment)
    if bars and metrics:
        blocks += bar_figures(table, metrics, experiment, names)
    return Section(title, anchor, blocks)


