"""Figures and reports for explanations."""

from srdxai.report.figures import save_explanation_figure, save_method_grid, symmetric_limit

__all__ = ["save_explanation_figure", "save_method_grid", "symmetric_limit"]
