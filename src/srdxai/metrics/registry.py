"""What each metric is, declared beside its function: family, direction, needs.

A metric registers itself where it is defined::

    @register_metric(family="faithfulness", direction="higher", needs=("model",),
                     rows=("fidelity", "fidelity[*"))
    def faithfulness_correlation(model, x, y, attributions, ...): ...

and the rest of srdxai reads the registry instead of keeping its own lists: ``srdxai
metrics`` prints it, and the report takes the direction of a result row (``fidelity[abs]``:
higher is better) from the metric that wrote it. ``rows`` are the result names ``srdxai bench``
stores for the metric; a trailing ``*`` matches any continuation (``pointing_game_*`` covers
``pointing_game_15px``). A metric that returns curves states their ``axes`` (x label, y label,
x scale, at its default options): the report labels its curve figures with them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ..errors import InvalidInputError

__all__ = ["FAMILIES", "METRICS", "MetricInfo", "by_family", "curve_axes", "metric_info",
           "register_metric", "row_direction"]

#: metric families in the order they are listed (Quantus' grouping, as the SRD paper's)
FAMILIES = ("localisation", "complexity", "faithfulness", "robustness", "randomisation",
            "axiomatic")
#: what a metric may need besides the inputs, targets and maps
NEEDS = ("model", "masks", "explain")

Direction = Literal["higher", "lower"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric: its function and what the runner, the report and the CLI need to
    know about it."""

    name: str
    function: Callable[..., Any]
    family: str
    direction: Direction | None
    needs: tuple[str, ...]
    returns: str
    rows: tuple[str, ...]
    #: its curves' (x label, y label, x scale: "linear" or "log"), or None where it returns
    #: none; ``{measure}`` in a label stands for the measure of a curve ``name[measure]``
    axes: tuple[str, str, str] | None = None

    @property
    def summary(self) -> str:
        """The first sentence of the function's docstring."""
        doc = (self.function.__doc__ or "").strip()
        paragraph = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
        end = paragraph.find(". ")
        return paragraph if end < 0 else paragraph[:end + 1]

    def writes(self, row: str) -> bool:
        """Whether ``row`` is one of the result names ``srdxai bench`` stores for it."""
        return any(row.startswith(p[:-1]) if p.endswith("*") else row == p for p in self.rows)


#: every registered metric by name, in registration order
METRICS: dict[str, MetricInfo] = {}


def register_metric(*, family: str, direction: Direction | None, needs: Iterable[str] = (),
                    returns: str = "scores (N,)", rows: Iterable[str] = (),
                    axes: tuple[str, str, str] | None = None) -> Callable[[F], F]:
    """Register the decorated metric function under its own name (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown metric family {family!r}; choose from {FAMILIES}")
    if direction not in ("higher", "lower", None):
        raise ValueError(f"direction must be 'higher', 'lower' or None, got {direction!r}")
    needed = tuple(needs)
    unknown = [n for n in needed if n not in NEEDS]
    if unknown:
        raise ValueError(f"unknown needs {unknown}; choose from {NEEDS}")
    if axes is not None and (len(axes) != 3 or axes[2] not in ("linear", "log")):
        raise ValueError(f"axes must be (x label, y label, 'linear' or 'log'), got {axes!r}")

    def add(function: F) -> F:
        name = function.__name__
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = MetricInfo(name, function, family, direction, needed, returns,
                                   tuple(rows), None if axes is None else tuple(axes))
        return function

    return add


def metric_info(name: str) -> MetricInfo:
    """The registered metric ``name``; an unknown name is an error listing the known ones."""
    if name not in METRICS:
        raise InvalidInputError(
            f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))} "
            "(`srdxai metrics` describes them).")
    return METRICS[name]


def by_family() -> list[MetricInfo]:
    """The metrics family by family (:data:`FAMILIES` order), by name within a family."""
    return sorted(METRICS.values(), key=lambda m: (FAMILIES.index(m.family), m.name))


def row_direction(row: str) -> Direction | None:
    """Which way a result row is better, from the metric that writes it (or whose name it
    is); None when no registered metric writes it or the metric declares no direction."""
    for info in METRICS.values():
        if info.writes(row):
            return info.direction
    # rows named after the metric itself (``srdxai bench``'s evaluate experiment), with an
    # optional reading in brackets: ``road``, ``model_parameter_randomisation[ssim]``
    base = row.split("[", 1)[0]
    return METRICS[base].direction if base in METRICS else None


def curve_axes(curve: str) -> tuple[str, str, str] | None:
    """(x label, y label, x scale) of a curve named after the metric that returned it
    (``road``, ``model_parameter_randomisation[ssim]``: the measure fills ``{measure}``), or
    None where no registered metric of that name states its axes."""
    base, _, rest = curve.partition("[")
    info = METRICS.get(base)
    if info is None or info.axes is None:
        return None
    measure = rest[:-1] if rest.endswith("]") else rest
    xlabel, ylabel, scale = info.axes
    return xlabel.replace("{measure}", measure), ylabel.replace("{measure}", measure), scale
