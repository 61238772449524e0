"""The attribution engine: traced forward pass, rules, targets and the model guard."""

from .core import (
    Rule,
    Trace,
    check_inputs,
    differentiable,
    is_differentiable,
    model_guard,
    target_gradient,
)
from .graph import Recorder
from .memory import OutOfMemoryError, memory_budget

__all__ = ["Rule", "Trace", "Recorder", "OutOfMemoryError", "check_inputs", "differentiable",
           "is_differentiable", "memory_budget", "model_guard", "target_gradient"]
