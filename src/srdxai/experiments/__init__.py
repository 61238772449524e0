"""The experiments of ``srdxai bench``: resumable, sharded runs into SQLite.

Each experiment is one module of ``srdxai.experiments.suite`` registered in
``srdxai.experiments.registry`` (the shipped ones are registered on the first call of
:func:`experiment_names` or :func:`experiment`); the runner plans, shards and resumes.
"""

from .config import BenchConfig
from .own import OwnSetup, evaluate, saved_maps
from .registry import (
    EXPERIMENTS,
    Experiment,
    ReportInputs,
    UnitInputs,
    UnitResult,
    experiment,
    experiment_names,
    register_experiment,
)
from .runner import jobs, run
from .store import ResultStore, merge

__all__ = ["EXPERIMENTS", "TABLE2_METHODS", "BenchConfig", "Experiment", "OwnSetup",
           "ReportInputs", "ResultStore", "UnitInputs", "UnitResult", "evaluate", "experiment",
           "experiment_names", "jobs", "merge", "register_experiment", "run", "saved_maps"]


def __getattr__(name: str) -> object:
    # Table 2's rows are loaded with the experiments, on first use: importing them here would
    # make ``srdxai.report.tables`` (which this package's store serves) import itself in a
    # cycle through the experiments' report sections.
    if name == "TABLE2_METHODS":
        from .suite.table2 import TABLE2_METHODS

        return TABLE2_METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
