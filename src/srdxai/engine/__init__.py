"""The attribution engine: one tracing core (``tracer.Tracer``) with its two views (the PFV
``Recorder`` and the operation-level ``OpTracer``), rules, targets and the model guard."""

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
from .optrace import OpCall, OpRule, OpTrace, OpTracer
from .tracer import Tracer

__all__ = ["Rule", "Trace", "Recorder", "Tracer", "OpTracer", "OpTrace", "OpRule", "OpCall",
           "OutOfMemoryError", "check_inputs", "differentiable", "is_differentiable",
           "memory_budget", "model_guard", "target_gradient"]
