"""The options every sampling metric shares: seed, explicit draws, batch size and progress.

One object instead of the same five keyword arguments on every metric::

    from srdxai.metrics import Sampling, faithfulness_correlation

    run = Sampling(seed=3, batch_size=32, progress=True)
    faithfulness_correlation(model, x, y, a, sampling=run)
    max_sensitivity(model, x, y, a, explain=explain, sampling=run)

Its fields may also be given to a metric as keywords (``faithfulness_correlation(..., seed=3)``),
which is short for ``sampling=Sampling(seed=3)``; giving both is an error, so a field is never
silently overridden.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["Sampling", "SamplingOptions", "sampling_of"]


@dataclass(frozen=True)
class Sampling:
    """How a metric draws and batches (the same object fits every metric).

    Attributes:
        seed: seed of the metric's own CPU generator (default 0: reproducible); None draws a
            fresh seed.
        generator: a ``torch.Generator`` to draw from instead (wins over ``seed``); it is
            advanced, so two metrics sharing one see different draws.
        draws: explicit draws, which replace the generator; their layout is the metric's own
            (docs/metrics.md §1 lists them), e.g. the subsets Quantus drew.
        batch_size: perturbed inputs per forward pass (or per ``explain`` call); None: as many
            as the device's memory budget allows.
        progress: show a tqdm bar.
    """

    seed: int | None = 0
    generator: torch.Generator | None = None
    draws: Any = None
    batch_size: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int | np.integer)):
            raise InvalidInputError(f"seed must be an int or None, got {self.seed!r}.")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise InvalidInputError(
                f"generator must be a torch.Generator, got {type(self.generator).__name__}.")
        if self.batch_size is not None and (isinstance(self.batch_size, bool)
                                            or not isinstance(self.batch_size, int | np.integer)
                                            or self.batch_size < 1):
            raise InvalidInputError(
                f"batch_size must be a positive int or None, got {self.batch_size!r}.")
        if not isinstance(self.progress, bool):
            raise InvalidInputError(f"progress must be True or False, got {self.progress!r}.")

    def make_generator(self) -> torch.Generator:
        """The generator to draw from: ``generator`` itself, else a CPU generator seeded with
        ``seed`` (CPU, so that draws are the same on every device)."""
        if self.generator is not None:
            return self.generator
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g

    def chunk_size(self, x: torch.Tensor, model: torch.nn.Module | None = None,
                   explain: bool = False) -> int:
        """The inputs per forward pass (or per ``explain`` call when ``explain``) a metric
        uses for inputs like ``x``: ``batch_size``, or the device's element budget (capped by
        a memory budget, estimated on ``model``)."""
        from .common import default_batch_size

        return default_batch_size(x, self.batch_size, explain=explain, model=model)

    def refuse_draws(self, metric: str, reason: str) -> None:
        """Refuse explicit ``draws`` for a metric that takes none; ``reason`` says why (e.g.
        "it draws nothing", "its only randomness is the seed")."""
        if self.draws is not None:
            raise InvalidInputError(f"{metric} takes no explicit draws: {reason}, so it needs "
                                    "no draws; leave sampling.draws (draws=) unset.")

    def replace(self, **changes: Any) -> Sampling:
        """A copy with ``changes`` applied (checked like a new object)."""
        return dataclasses.replace(self, **changes)


class SamplingOptions(TypedDict, total=False):
    """The fields of :class:`Sampling` given as keywords to a metric."""

    seed: int | None
    generator: torch.Generator | None
    draws: Any
    batch_size: int | None
    progress: bool


FIELDS = tuple(f.name for f in dataclasses.fields(Sampling))


def sampling_of(sampling: Sampling | None, options: dict[str, Any], metric: str) -> Sampling:
    """The :class:`Sampling` a metric runs with: ``sampling``, or one built from the keywords
    ``options`` (a metric's ``**options: Unpack[SamplingOptions]``); not both, and no unknown
    keyword."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"{metric}() got unexpected keyword argument(s) {unknown}; its "
                        f"sampling options are {list(FIELDS)}.")
    if sampling is None:
        return Sampling(**options)
    if not isinstance(sampling, Sampling):
        raise InvalidInputError(
            f"sampling must be a srdxai.metrics.Sampling, got {type(sampling).__name__}.")
    if options:
        raise InvalidInputError(
            f"{metric}: give {sorted(options)} inside sampling= or as keywords, not both "
            f"(sampling={sampling}).")
    return sampling
