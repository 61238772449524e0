"""Exceptions raised by srdxai.

Every error the library raises on purpose derives from :class:`SrdxaiError`, which is itself a
:class:`ValueError`, so callers can catch either. The command line turns any ``SrdxaiError`` into a
one-line ``srdxai: error: ...`` message and exit status 2.
"""

from __future__ import annotations

__all__ = [
    "SrdxaiError",
    "UnknownMethodError",
    "UnknownModelError",
    "UnsupportedOperationError",
    "InvalidInputError",
    "InvalidTargetError",
    "MissingDependencyError",
    "NonFiniteError",
    "RunDirectoryError",
    "OperationViewWarning",
]


class SrdxaiError(ValueError):
    """Base class of all errors raised by srdxai."""


class UnknownMethodError(SrdxaiError):
    """An attribution method name that srdxai does not provide."""


class UnknownModelError(SrdxaiError):
    """A model name that srdxai cannot build (see ``srdxai.models.list_models()``)."""


class UnsupportedOperationError(SrdxaiError):
    """The model contains an operation that the chosen attribution method cannot handle."""


class InvalidInputError(SrdxaiError):
    """An input (tensor, image array or image file) of the wrong shape, type or content."""


class InvalidTargetError(SrdxaiError):
    """A target class that is out of range, of the wrong type, or of the wrong length."""


class NonFiniteError(SrdxaiError):
    """A result (a map, the model's output, a target's objective) holds NaN or Inf."""


class RunDirectoryError(InvalidInputError):
    """A benchmark run directory or one of its results databases cannot be used: damaged, not
    a srdxai results database, locked, not writable, or the disk is full.

    The message names the file, what is wrong and what to do. It is an
    :class:`InvalidInputError` (the run directory is the command's input), so code that caught
    that for a bad database keeps working.
    """


class MissingDependencyError(SrdxaiError, ImportError):
    """An optional package needed for the request is not installed.

    It is also an :class:`ImportError`, so ``except ImportError`` keeps working.
    """


class OperationViewWarning(UserWarning):
    """SRD explained a model its PFV engine cannot decompose on the operation view instead:
    every operation a layer (``docs/srd.md``, "The operation view for what the PFV engine
    cannot decompose"). The map is SRD's and sums to the target logit; it differs from the PFV
    engine's, which composes the linear operations between two activations into one layer."""
