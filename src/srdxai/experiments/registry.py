"""The experiments of ``srdxai bench``, one file each, found through this registry.

An experiment is a subclass of :class:`Experiment` registered with
:func:`register_experiment`. It states its data (:meth:`Experiment.sources`), its methods
(:meth:`Experiment.methods`), how many samples it takes, what one unit computes
(:meth:`Experiment.run`) and its report section (:meth:`Experiment.section`); the runner keeps
only planning, sharding and resuming, and the report asks each experiment for its section. The
shipped experiments live in ``srdxai.experiments.suite``, one module each; a new one is one
module plus its test::

    @register_experiment
    class Calibration(Experiment):
        name, title, report_position = "calibration", "Calibration", 65

        def sources(self, config):
            return [Source("fmnist-vgg-relu", "fashion")]

        def run(self, unit):
            maps = unit.explain(unit.x, unit.y)
            return UnitResult(rows=unit.rows("sparseness", metrics.sparseness(None, None, None,
                                                                              maps)))
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from ..errors import InvalidInputError
from .config import BenchConfig, method_options
from .data import Source
from .store import Curve, Row, Unit

if TYPE_CHECKING:
    from ..report.blocks import FigureNames, Section

Tensor = torch.Tensor
#: a row of an experiment's table: (display name, srdxai method, options for ``explain``)
MethodRow = tuple[str, str, dict[str, Any]]
E = TypeVar("E", bound=type["Experiment"])

__all__ = ["EXPERIMENTS", "Experiment", "Job", "MethodRow", "ReportInputs", "UnitInputs",
           "UnitResult", "experiment", "experiment_names", "register_experiment", "unit_seed"]


@dataclass(frozen=True)
class Job:
    """One unit of work: an experiment's method (row) on one model and batch of samples."""

    unit: Unit
    source: Source
    method: str  # the srdxai method; an experiment may use its own markers ("-", "all")
    options: tuple[tuple[str, Any], ...]
    samples: tuple[int, ...]


@dataclass
class UnitInputs:
    """What :meth:`Experiment.run` gets: the job, the run's configuration, the model, the
    batch (inputs, labels, object masks) and the unit's seed (the same for every method and
    every sharding, so all methods see the same draws)."""

    job: Job
    config: BenchConfig
    model: torch.nn.Module
    x: Tensor
    y: Tensor
    masks: Tensor | None  # None: the data has no object masks
    seed: int

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.job.options)

    def explain_fn(self) -> Callable[[torch.nn.Module, Tensor, Tensor], Tensor]:
        """The unit's method as a metric's ``explain(model, x, y)``."""
        from .. import explain

        method, options = self.job.method, self.options

        def method_fn(m: torch.nn.Module, xx: Tensor, yy: Tensor) -> Tensor:
            return explain(m, xx, yy, method, **options)

        return method_fn

    def explain(self, x: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """The unit's maps of ``x`` (default: the batch), detached."""
        return self.explain_fn()(self.model, self.x if x is None else x,
                                 self.y if y is None else y).detach()

    def rows(self, metric: str, values: Tensor | Sequence[float],
             samples: Sequence[int] | None = None) -> list[Row]:
        """One result row per sample (``samples``: default the unit's)."""
        values = values.tolist() if isinstance(values, Tensor) else list(values)
        return [Row(metric, s, float(v))
                for s, v in zip(self.job.samples if samples is None else samples, values,
                                strict=True)]

    def curves(self, name: str, x: Sequence[float], ys: Tensor) -> list[Curve]:
        """One curve per sample: the shared x values and each sample's row of ``ys``."""
        return [Curve(name, s, list(x), c)
                for s, c in zip(self.job.samples, ys.tolist(), strict=True)]


@dataclass
class UnitResult:
    """What a unit wrote: result rows, figures (PNG bytes by artifact name), curves, saved
    maps (``.npz`` bytes by name, stored with kind ``maps``) and JSON documents."""

    rows: list[Row] = field(default_factory=list)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    curves: list[Curve] = field(default_factory=list)
    maps: dict[str, bytes] = field(default_factory=dict)
    #: JSON documents by name (kind ``json``), e.g. token explanations its section shows
    documents: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ReportInputs:
    """What :meth:`Experiment.section` gets: the merged results database, the run's stored
    configuration (None when absent or unreadable) and the report's figure-name allocator."""

    db: Path
    config: dict[str, Any] | None
    names: FigureNames


class Experiment:
    """An experiment of ``srdxai bench``; subclasses set the class attributes and override
    what differs from the defaults (see the module docstring)."""

    #: the name the command line and the results database use
    name: ClassVar[str]
    #: the report's section title
    title: ClassVar[str]
    #: where its section goes in the report (sections sorted by it)
    report_position: ClassVar[int] = 1000
    #: experiments with the same group (title, anchor) share one report section, each its own
    #: subsection
    group: ClassVar[tuple[str, str] | None] = None
    #: the result rows with a best mark and bar figures in the generic section, in this order
    metrics: ClassVar[tuple[str, ...]] = ()
    #: draw bar figures of :attr:`metrics` in the generic section
    bars: ClassVar[bool] = False
    #: a paragraph put above the generic section's tables
    note: ClassVar[str] = ""
    #: run only when asked for: its section is left out of reports of runs without it
    optional: ClassVar[bool] = False

    # --- planning ---------------------------------------------------------------------------

    def sources(self, config: BenchConfig) -> list[Source]:
        """The models (and data) it runs on, before ``--models`` narrows them."""
        raise NotImplementedError(f"experiment {self.name!r} must say its sources")

    def methods(self, source: Source, config: BenchConfig) -> list[MethodRow]:
        """The rows of its table on one model (default: Table 2's methods)."""
        from .suite.table2 import TABLE2_METHODS

        return list(TABLE2_METHODS)

    def sample_count(self, source: Source, config: BenchConfig) -> int:
        """Samples per model (default: half of the configured count, at least 4: the curve
        experiments cost more per sample than Table 2)."""
        return max(4, config.sizes(source.dataset) // 2)

    def batch_size(self, config: BenchConfig) -> int:
        """Samples per unit."""
        return config.batch_size

    def plan(self, source: Source, config: BenchConfig) -> list[Job]:
        """Its units on one model: every method on every batch, in a fixed order."""
        n, step = self.sample_count(source, config), self.batch_size(config)
        batches = [tuple(range(i, min(i + step, n))) for i in range(0, n, step)]
        out = []
        for label, method, options in self.methods(source, config):
            opts = method_options(method, options, config.quick)
            for k, samples in enumerate(batches):
                out.append(Job(Unit(self.name, source.model, label, k), source, method,
                               tuple(sorted(opts.items())), samples))
        return out

    # --- running and reporting --------------------------------------------------------------

    def run(self, unit: UnitInputs) -> UnitResult:
        """The rows, figures and curves of one unit."""
        raise NotImplementedError(f"experiment {self.name!r} must say what a unit computes")

    def section(self, report: ReportInputs) -> Section:
        """Its report section (default: :attr:`note`, a table per model with :attr:`metrics`
        first, the mean curves, bar figures of :attr:`metrics` when :attr:`bars`, and the
        PNG figures its units stored under ``<name>/``)."""
        from ..report import tables
        from ..report.blocks import Text, generic_section, png_figures

        section = generic_section(report, self.name, self.title, self.anchor, self.metrics,
                                  bars=self.bars)
        if section.ran:
            if self.note:
                section.blocks.insert(0, Text(self.note))
            section.blocks += png_figures(
                [(n, d) for n, d in tables.artifacts(report.db, "png")
                 if n.startswith(f"{self.name}/")], report.names)
        return section

    @property
    def anchor(self) -> str:
        """The section's HTML anchor."""
        return self.name if self.group is None else f"{self.group[1]}-{self.name}"


#: the registered experiments by name, in registration order (the order a default run takes)
EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(cls: E) -> E:
    """Register an :class:`Experiment` subclass under its ``name`` (class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must set the class attribute name")
    if not isinstance(getattr(cls, "title", None), str):
        raise ValueError(f"{cls.__name__} must set the class attribute title")
    if name in EXPERIMENTS:
        raise ValueError(f"experiment {name!r} is registered twice")
    EXPERIMENTS[name] = cls()
    return cls


def experiment_names() -> tuple[str, ...]:
    """The registered experiments' names (the shipped ones are imported first)."""
    from . import suite  # noqa: F401 - registers the shipped experiments

    return tuple(EXPERIMENTS)


def experiment(name: str) -> Experiment:
    """The registered experiment ``name``; an unknown name is an error listing the known."""
    names = experiment_names()
    if name not in EXPERIMENTS:
        raise InvalidInputError(f"unknown experiment {name!r}; choose from {', '.join(names)}.")
    return EXPERIMENTS[name]


def matching(sources: Iterable[Source], patterns: Sequence[str] | None) -> list[Source]:
    """The sources whose model matches one of the fnmatch ``patterns`` (None: all)."""
    if patterns is None:
        return list(sources)
    return [s for s in sources if any(fnmatch.fnmatchcase(s.model, p) for p in patterns)]


def unit_seed(config: BenchConfig, job: Job) -> int:
    """The seed of a unit's random draws: the same for every method and every sharding."""
    key = f"{config.seed}/{job.unit.experiment}/{job.unit.model}/{job.unit.unit}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
