"""Robustness experiments' building blocks: APOP (activation-pattern-only prediction) and the
explanation-manipulation attack."""

from .apop import APOPResult, apop, apop_logits
from .attack import AttackResult, SmoothActivations, manipulate

__all__ = ["APOPResult", "AttackResult", "SmoothActivations", "apop", "apop_logits",
           "manipulate"]
