"""Figures and reports for explanations."""

from srdxai.report.figures import save_explanation_figure, symmetric_limit

__all__ = ["save_explanation_figure", "symmetric_limit"]
