"""The shipped experiments of ``srdxai bench``, one module each; importing this package
registers them (``srdxai.experiments.registry``): those of a default run in its order, then
every other module of this package (a new experiment is one module here, nothing else)."""

import importlib
import pkgutil

from ..config import DEFAULT_EXPERIMENTS

__all__ = ["load_experiment_modules"]


def load_experiment_modules() -> None:
    """Import (and so register) the default run's experiments in its order, then every other
    module of this package by name; run on import."""
    others = sorted(m.name for m in pkgutil.iter_modules(__path__)
                    if m.name not in DEFAULT_EXPERIMENTS)
    for name in list(DEFAULT_EXPERIMENTS) + others:
        importlib.import_module(f"{__name__}.{name}")


load_experiment_modules()
