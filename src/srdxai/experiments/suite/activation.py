"""The SRD paper's activation table: fidelity of every method on six Fashion-MNIST ResNets
that differ only in their activation function, with each model's accuracy."""

from __future__ import annotations

import math

import torch

from ...report import paper, tables
from ...report.blocks import (
    Section,
    Table,
    curve_figures,
    model_tables,
    n_note,
    not_run,
)
from ...report.comparisons import (
    BEYOND,
    SRD_REFERENCES,
    beyond_marks,
    competition_ranks,
    is_variant,
    paired_tables,
)
from ...report.tables import MetricTable
from ..config import BenchConfig
from ..data import Source
from ..registry import (
    Experiment,
    MethodRow,
    ReportInputs,
    UnitInputs,
    UnitResult,
    register_experiment,
)
from .table2 import TABLE2_METHODS, protocol_scores

__all__ = ["ACTIVATIONS", "Activation"]

ACTIVATIONS = ("relu", "elu", "leaky_relu", "silu", "gelu", "tanh")


@register_experiment
class Activation(Experiment):
    """Fidelity and MuFidelity per activation function; method "-" is the model's accuracy."""

    name = "activation"
    title = "Activation functions"
    report_position = 20

    def sources(self, config: BenchConfig) -> list[Source]:
        return [Source(f"fmnist-resnet-{a}", "fashion") for a in ACTIVATIONS]

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        return config.sizes(source.dataset)

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        return [("-", "-", {})] + list(TABLE2_METHODS)

    def run(self, unit: UnitInputs) -> UnitResult:
        if unit.job.method == "-":  # the model's own accuracy on these samples
            with torch.no_grad():
                correct = (unit.model(unit.x).argmax(1) == unit.y).double()
            return UnitResult(rows=unit.rows("accuracy", correct))
        maps = unit.explain()
        scores = protocol_scores(unit.config, self.name, unit.model, unit.x, unit.y, maps,
                                 unit.masks, unit.explain_fn(), unit.seed)
        return UnitResult(rows=[row for metric, values in scores.items()
                                for row in unit.rows(metric, values)])

    def section(self, report: ReportInputs) -> Section:
        db, names = report.db, report.names
        table = tables.metric_table(db, self.name)
        if table.empty:
            return not_run(self.title, self.anchor, [self.name])
        suffix = {m: m.rsplit("-", 1)[-1] for m in table.models}
        # The column is the activation named by the model; fall back to the whole model name
        # when two models share an activation (e.g. a VGG and a ResNet with ReLU).
        clash = len(set(suffix.values())) < len(suffix)
        columns = {m: m if clash else paper.ACTIVATION_NAMES.get(a, a)
                   for m, a in suffix.items()}
        blocks: list = []
        fid_models = [m for m in table.models if "fidelity" in table.metrics_for(m)]
        rows = []
        beyond = False
        marks = beyond_marks(table.methods)
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
                # The runner writes accuracy under method '-'; otherwise take the first method
                # that has it (pooling methods would count the same samples several times).
                with_acc = [meth for meth in table.methods if table.cell(m, meth, "accuracy")]
                pick = "-" if "-" in with_acc else (with_acc[0] if with_acc else None)
                c = table.cell(m, pick, "accuracy") if pick else None
                accuracy.append((tables.format_cell(c, None), False))
            rows = [r + [("—", False)] * (len(shown) - len(fid_models)) for r in rows]
            notes = [f"Columns: {', '.join(f'{columns[m]} = {m}' for m in shown)}.",
                     "Cells: fidelity (↑) mean ± 95 % CI, best per column in bold; last row: "
                     "the model's accuracy (no mark)."]
            if beyond or any(m in marks for m in table.methods):
                notes.append(f"{BEYOND.strip()}: beyond the paper: rows its Table 2 does not "
                             "have, and LRP-z+ on models without ReLUs (the paper scores it "
                             "on ReLU only).")
            typical = table.typical_n()
            if typical is not None:
                notes.append(n_note(typical))
            blocks.append(Table("Fidelity per activation function (ours)",
                                ["method"] + [columns[m] for m in shown], rows + [accuracy],
                                notes))
        blocks += paired_tables(db, self.name, ["fidelity"], "Activation functions (ours)",
                                columns)
        ranking = activation_ranking(table, columns)
        if ranking is not None:
            blocks.append(ranking)
        rest = [k for k in table.metrics
                if k not in ("fidelity", "accuracy", "mufidelity") and not is_variant(k)]
        if rest:
            blocks += model_tables(tables.metric_table(db, self.name, rest),
                                   "Other metrics (ours)")
        blocks += curve_figures(db, self.name, names)
        blocks += paper_activation()
        return Section(self.title, self.anchor, blocks)


def activation_ranking(table: MetricTable, columns: dict[str, str]) -> Table | None:
    """The SRD rows' ranks among the methods, per protocol (rows) and activation (columns)."""
    models = [m for m in table.models if "fidelity" in table.metrics_for(m)]
    protocols = [k for k in table.metrics if k == "fidelity" or is_variant(k)
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
            ranks = competition_ranks(means)
            parts = [f"{ref} {ranks[ref]}" for ref in SRD_REFERENCES if ref in ranks]
            best = ", ".join(m for m, r in ranks.items() if r == 1) or "—"
            row.append((f"{' / '.join(parts)} of {len(ranks)}; best {best}", False))
        rows.append(row)
    return Table("What decides the ranking (activation functions): the SRD rows' ranks",
                 ["protocol"] + [columns[m] for m in models], rows,
                 ["Rank 1 = best; each row scores the same maps under one protocol (see the "
                  "Table 2 section for the variants' definitions)."])




def paper_activation() -> list[Table]:
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


