"""srdxai: faithful explanations of image classifiers (SRD and friends) and their metrics."""

from .api import explain
from .errors import SrdxaiError
from .methods import METHODS, SRD, Gradient

__version__ = "0.1.0"

__all__ = ["explain", "SRD", "Gradient", "METHODS", "SrdxaiError", "__version__"]
