"""The seeds' experiments (``srdxai bench``): resumable, sharded runs into SQLite."""

from .runner import EXPERIMENTS, TABLE2_METHODS, BenchConfig, jobs, run
from .store import ResultStore, merge

__all__ = ["EXPERIMENTS", "TABLE2_METHODS", "BenchConfig", "jobs", "run", "ResultStore",
           "merge"]
