"""How Table 2 and the activation table score a map: the evaluation protocol as configuration.

The SRD paper leaves the protocol open (reference/SRD.md sections 7-8), and its choices decide
the ranking: with a signed SmoothGrad and the black baseline SmoothGrad wins fidelity, with an
absolute SmoothGrad, a zero baseline or MuFidelity it falls to the bottom. So every choice is a
field here, recorded in the run's configuration (and its hash) and shown in the report, and
each run also scores fidelity under a few :data:`VARIANTS` of the protocol, from the same maps,
so that the report can show what decides the ranking.

Defaults follow what a co-author's working copy of the code uses (Quantus 0.4.3's
FaithfulnessCorrelation unmodified; PointingGame with a 15 px tolerance; xplique's MuFidelity
settings) where it is known, and say so in docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import InvalidInputError

__all__ = ["DEFAULT_VARIANTS", "FidelityProtocol", "MuFidelityProtocol", "Protocol", "VARIANTS",
           "parse_variants", "pixels_at"]

BASELINES = ("black", "zero", "mean", "blur")
CORRELATIONS = ("pearson", "spearman")
#: the image side the paper's pixel settings refer to (ImageNet at 224 x 224)
REFERENCE_SIDE = 224


def pixels_at(pixels_at_224: float, side: int) -> int:
    """A length given in pixels of a 224-pixel image, scaled to an image of ``side`` pixels."""
    return max(0, round(pixels_at_224 * side / REFERENCE_SIDE))


@dataclass(frozen=True)
class FidelityProtocol:
    """Faithfulness correlation ("Fid."): which features are removed, to what, and how the
    drops are correlated with the map.

    * ``baseline``: ``black`` (each sample's minimum, Quantus' "black"), ``zero`` (0 in model
      input units: the mean colour after normalisation), ``mean`` (each sample's mean) or
      ``blur`` (a Gaussian-blurred copy).
    * ``abs``: score ``|map|`` instead of the signed map.
    * ``subset``: features per random subset, a count (capped at a quarter of the features,
      so 224 on a 224 x 224 image and 224 on a 64 x 64 one) or a fraction in (0, 1).
    * ``correlation``: ``pearson`` (Bhatt et al., Quantus) or ``spearman``.
    * ``grid``: 0 removes pixels; ``k`` cuts the image into about ``k x k`` square cells and
      removes cells (the map summed per cell).
    * ``runs``: random subsets per sample (None: 100, or 50 with ``--quick``).
    """

    baseline: str = "black"
    abs: bool = False
    subset: int | float = 224
    correlation: str = "pearson"
    grid: int = 0
    runs: int | None = None

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise InvalidInputError(
                f"fidelity baseline must be one of {', '.join(BASELINES)}, got "
                f"{self.baseline!r}.")
        if self.correlation not in CORRELATIONS:
            raise InvalidInputError(
                f"fidelity correlation must be 'pearson' or 'spearman', got "
                f"{self.correlation!r}.")
        subset = self.subset
        if isinstance(subset, bool) or not isinstance(subset, int | float) or (
                isinstance(subset, float) and not 0.0 < subset < 1.0) or (
                isinstance(subset, int) and subset < 1):
            raise InvalidInputError(
                f"fidelity subset must be a count >= 1 or a fraction in (0, 1), got "
                f"{subset!r}.")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 0 or (
                self.grid == 1):
            raise InvalidInputError(
                f"fidelity grid must be 0 (pixels) or a number of cells per side >= 2, got "
                f"{self.grid!r}.")
        if self.runs is not None and (isinstance(self.runs, bool) or not isinstance(
                self.runs, int) or self.runs < 2):
            raise InvalidInputError(f"fidelity runs must be an int >= 2, got {self.runs!r}.")

    def perturbation(self, height: int, width: int, quick: bool) -> dict[str, Any]:
        """The choices that decide which inputs are scored: keyword arguments of
        :func:`srdxai.metrics.faithfulness_correlations` for images of ``height x width``."""
        cell = math.ceil(max(height, width) / self.grid) if self.grid else 1
        features = math.ceil(height / cell) * math.ceil(width / cell)
        subset: int | float = self.subset
        if isinstance(subset, int):
            subset = max(1, min(subset, features // 4))
        return {"baseline": self.baseline, "subset_size": subset, "cell": cell,
                "nr_runs": self.run_count(quick)}

    def run_count(self, quick: bool) -> int:
        """Random subsets per sample: ``runs``, else 100 (50 with ``--quick``)."""
        return self.runs or (50 if quick else 100)

    def reading(self) -> dict[str, Any]:
        """The choices that only change how the drops are read (no forward passes)."""
        return {"abs": self.abs, "correlation": self.correlation}

    def options(self, height: int, width: int, quick: bool) -> dict[str, Any]:
        """Keyword arguments of :func:`srdxai.metrics.faithfulness_correlation`."""
        return {**self.perturbation(height, width, quick), **self.reading()}

    def describe(self) -> str:
        subset = (f"{self.subset:.0%} of the features" if isinstance(self.subset, float)
                  else f"{self.subset} features (at most a quarter of them)")
        features = f"{self.grid}x{self.grid} grid cells" if self.grid else "pixels"
        return (f"{self.baseline} baseline, {'absolute' if self.abs else 'signed'} maps, "
                f"subsets of {subset}, {self.correlation.capitalize()}, {features}")


@dataclass(frozen=True)
class MuFidelityProtocol:
    """xplique's MuFidelity, the co-author's second candidate for "Fid.": a ``grid x grid``
    grid, each cell removed with probability ``fraction``, to ``baseline`` (0 in model input
    units), ``samples`` draws, Spearman."""

    grid: int = 9
    fraction: float = 0.2
    baseline: float = 0.0
    samples: int = 200

    def options(self, quick: bool) -> dict[str, Any]:
        return {"grid_size": self.grid, "subset_fraction": self.fraction,
                "baseline": self.baseline,
                "nr_samples": self.draw_count(quick)}

    def draw_count(self, quick: bool) -> int:
        """Draws per sample: ``samples``, at most 50 with ``--quick``."""
        return min(self.samples, 50) if quick else self.samples


#: Fidelity under other protocols, from the same maps and the run's seed: metric
#: ``fidelity[name]``. Each changes one choice of the default protocol.
VARIANTS: dict[str, dict[str, Any]] = {
    "zero-baseline": {"baseline": "zero"},
    "mean-baseline": {"baseline": "mean"},
    "blur-baseline": {"baseline": "blur"},
    "abs": {"abs": True},
    "spearman": {"correlation": "spearman"},
    "subset-10%": {"subset": 0.1},
    "grid-14": {"grid": 14, "subset": 0.1},
}
#: the variants a run scores unless told otherwise (the mean baseline adds little beside the
#: zero one: 0 in input units is the data set's mean colour)
DEFAULT_VARIANTS = ("zero-baseline", "blur-baseline", "abs", "spearman", "subset-10%",
                    "grid-14")


def parse_variants(text: str) -> tuple[str, ...]:
    """``default``, ``all``, ``none`` or a comma-separated list of :data:`VARIANTS` names."""
    text = text.strip()
    if text == "default":
        return DEFAULT_VARIANTS
    if text == "all":
        return tuple(VARIANTS)
    if text in ("none", ""):
        return ()
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise InvalidInputError(
            f"unknown fidelity variant(s) {', '.join(unknown)}; choose default, all, none or "
            f"from {', '.join(VARIANTS)}.")
    return names


@dataclass(frozen=True)
class Protocol:
    """Everything that decides Table 2's scores besides the maps."""

    fidelity: FidelityProtocol = field(default_factory=FidelityProtocol)
    mufidelity: MuFidelityProtocol = field(default_factory=MuFidelityProtocol)
    #: fidelity variants scored besides the default (names from :data:`VARIANTS`)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    #: the pointing game's tolerance in pixels at 224 x 224 (scaled to the image); the strict
    #: game (no tolerance, Quantus' PointingGame) is always scored too
    pointing_tolerance: int = 15
    #: noise draws of the stability (local Lipschitz) estimate; None: 50, or 10 with --quick.
    #: A maximum over fewer than 50 draws is reported as a lower bound.
    stability_draws: int | None = None

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise InvalidInputError(
                f"unknown fidelity variant(s) {', '.join(unknown)}; choose from "
                f"{', '.join(VARIANTS)}.")
        if isinstance(self.pointing_tolerance, bool) or not isinstance(
                self.pointing_tolerance, int) or self.pointing_tolerance < 0:
            raise InvalidInputError(
                f"pointing tolerance must be an int >= 0 (pixels at 224), got "
                f"{self.pointing_tolerance!r}.")
        if self.stability_draws is not None and (isinstance(self.stability_draws, bool) or (
                not isinstance(self.stability_draws, int)) or self.stability_draws < 1):
            raise InvalidInputError(
                f"stability draws must be an int >= 1, got {self.stability_draws!r}.")

    def variant(self, name: str) -> FidelityProtocol:
        return replace(self.fidelity, **VARIANTS[name])

    def fidelity_metrics(self) -> dict[str, FidelityProtocol]:
        """``fidelity`` (the default protocol) and ``fidelity[variant]`` for each variant."""
        return {"fidelity": self.fidelity,
                **{f"fidelity[{v}]": self.variant(v) for v in self.variants}}

    def fidelity_groups(self, height: int, width: int, quick: bool
                        ) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]]]]:
        """The fidelity metrics grouped by the inputs they score: ``(perturbation options,
        {metric: reading})``, one set of forward passes per group (the absolute and Spearman
        variants read the default protocol's drops)."""
        groups: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}
        for metric, chosen in self.fidelity_metrics().items():
            perturbation = chosen.perturbation(height, width, quick)
            key = repr(sorted(perturbation.items()))
            groups.setdefault(key, (perturbation, {}))[1][metric] = chosen.reading()
        return list(groups.values())

    def draws(self, quick: bool) -> int:
        return self.stability_draws or (10 if quick else 50)

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = list(self.variants)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        return cls(FidelityProtocol(**data.get("fidelity", {})),
                   MuFidelityProtocol(**data.get("mufidelity", {})),
                   tuple(data.get("variants", DEFAULT_VARIANTS)),
                   data.get("pointing_tolerance", 15), data.get("stability_draws"))
