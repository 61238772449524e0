"""Robustness experiments' building blocks: APOP (activation-pattern-only prediction)."""

from .apop import APOPResult, apop, apop_logits

__all__ = ["APOPResult", "apop", "apop_logits"]
