"""The qualitative grid: every Table 2 method's map of a few images, side by side."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ...report import tables
from ...report.blocks import Section, Text, png_figures
from ..config import BenchConfig, method_options
from ..data import Source, display_image
from ..registry import (
    EXPERIMENTS,
    Experiment,
    Job,
    ReportInputs,
    UnitInputs,
    UnitResult,
    register_experiment,
)
from ..store import Unit
from .table2 import TABLE2_METHODS, light_sources

__all__ = ["Grid"]


@register_experiment
class Grid(Experiment):
    """One figure per image (2 quick, 4 full) with every Table 2 method's map."""

    name = "grid"
    title = "Qualitative grid"
    report_position = 80

    def sources(self, config: BenchConfig) -> list[Source]:
        return light_sources(config)

    def plan(self, source: Source, config: BenchConfig) -> list[Job]:
        return [Job(Unit(self.name, source.model, "all", k), source, "all", (), (k,))
                for k in range(2 if config.quick else 4)]

    def run(self, unit: UnitInputs) -> UnitResult:
        from ... import explain
        from ...methods import METHODS
        from ...report.figures import save_method_grid

        maps, signed = {}, {}
        for label, method, options in TABLE2_METHODS:
            opts = method_options(method, options, unit.config.quick)
            maps[label] = explain(unit.model, unit.x, unit.y, method,
                                  **opts)[0].detach().float().cpu().numpy()
            signed[label] = bool(getattr(METHODS[method], "signed", True))
        job = unit.job
        image, label = display_image(job.source, job.samples[0])
        with tempfile.TemporaryDirectory() as tmp:
            path = save_method_grid(Path(tmp) / "grid.png", image, maps,
                                    f"{job.source.model}, sample {job.samples[0]}, '{label}' "
                                    f"(class {int(unit.y[0])})", signed=signed, columns=6,
                                    dpi=70)
            figure = path.read_bytes()
        return UnitResult(artifacts={f"{self.name}/{job.source.model}/{job.samples[0]}": figure})

    @property
    def anchor(self) -> str:
        return "qualitative"

    def section(self, report: ReportInputs) -> Section:
        # every PNG no other experiment claims (its own name as the artifact's prefix)
        claimed = tuple(f"{name}/" for name in EXPERIMENTS if name != self.name)
        found = [(n, d) for n, d in tables.artifacts(report.db, "png")
                 if not n.startswith(claimed)]
        if not found:
            return Section(self.title, self.anchor,
                           [Text("Not run: results.sqlite holds no PNG artifacts.")], ran=False)
        return Section(self.title, self.anchor, png_figures(found, report.names))
