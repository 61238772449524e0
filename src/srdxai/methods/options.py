"""Checks of the methods' options: each turns a bad value into an ``InvalidInputError`` naming
the option, what it must be and what it got, before any work is done (a NaN epsilon or a
string window would otherwise fail deep inside torch, or give a NaN map)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any

from ..errors import InvalidInputError


def integer(value: Any, name: str, minimum: int = 1, optional: bool = False) -> int | None:
    """An int >= ``minimum`` (``None`` too when ``optional``); bools are not numbers here."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidInputError(
            f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got "
            f"{value!r}.")
    return int(value)


def real(value: Any, name: str, minimum: float | None = None, above: bool = False,
         optional: bool = False) -> float | None:
    """A finite real number, >= ``minimum`` (> it when ``above``); ``None`` when ``optional``."""
    if value is None and optional:
        return None
    bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(float(value))
            or (minimum is not None and (value <= minimum if above else value < minimum))):
        raise InvalidInputError(
            f"{name} must be a finite number{bound}{' or None' if optional else ''}, got "
            f"{value!r}.")
    return float(value)


def flag(value: Any, name: str, optional: bool = False) -> bool | None:
    """True or False (``None`` too when ``optional``: automatic)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise InvalidInputError(
            f"{name} must be True or False{' or None' if optional else ''}, got {value!r}.")
    return value


def choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """One of ``choices`` (compared by equality; unhashable values are simply not one)."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        shown = ", ".join(map(repr, choices))
        raise InvalidInputError(f"{name} must be one of {shown}; got {value!r}.")
    return value


def sizes(value: Any, name: str, optional: bool = False) -> int | tuple[int, ...] | None:
    """A positive int or a sequence of them (a window, a stride)."""
    if value is None and optional:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise InvalidInputError(f"{name} must not be empty.")
        return tuple(integer(v, f"{name}[{i}]") for i, v in enumerate(value))  # type: ignore[misc]
    try:
        return integer(value, name)
    except InvalidInputError:
        raise InvalidInputError(
            f"{name} must be a positive int or a sequence of them"
            f"{' or None' if optional else ''}, got {value!r}.") from None
