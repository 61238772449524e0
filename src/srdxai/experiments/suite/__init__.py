# ruff: noqa: I001 - the imports register the experiments in this order
"""The shipped experiments of ``srdxai bench``, one module each; importing this package
registers them (``srdxai.experiments.registry``) in the default run's order."""

from . import (  # noqa: F401 - imported to register, in the order a default run takes
    table2,
    activation,
    sensitivity_n,
    insertion_deletion,
    gae,
    noise,
    apop,
    attack,
    grid,
    randomisation,
    evaluate,
)
