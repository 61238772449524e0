"""Evaluation metrics for attribution maps: pure, batched torch functions.

Every metric has the same call::

    metric(model, x, y, attributions, masks=None, explain=None, *, <its options>,
           sampling=Sampling(seed=0, draws=None, batch_size=None, progress=False))

and returns float64 scores of shape (N,), except the curve metrics (``insertion``,
``deletion``, ``pixel_flipping``: :class:`CurveResult`), ``sensitivity_n``
(:class:`SensitivityNResult`) and ``gae`` (:class:`GAEResult`, one score per group of four).
``explain(model, x, y) -> maps`` is needed by the robustness metrics and GAE, e.g.
``lambda m, x, y: srdxai.explain(m, x, y, "saliency")``. Inputs may be tensors or Quantus-style
numpy arrays. See docs/metrics.md for exact definitions and the differences from Quantus.

Every metric is registered with its family, direction and needs (:data:`METRICS`,
``srdxai metrics``); a new one is one function with :func:`register_metric` plus its test (a
new module of this package is imported and exported by :func:`load_metric_modules`).
"""

from .attribution_tests import (
    focus,
    focus_mosaics,
    gaussian_noise,
    infidelity,
    monotonicity_correlation,
    quadrant_masks,
    sufficiency,
)
from .axiomatic import non_sensitivity
from .complexity import complexity, sparseness
from .faithfulness import (
    CurveResult,
    SensitivityNResult,
    completeness,
    deletion,
    faithfulness_correlation,
    faithfulness_correlations,
    insertion,
    monotonicity,
    mu_fidelity,
    pixel_flipping,
    random_permutations,
    random_subsets,
    sensitivity_n,
    sensitivity_n_grid,
)
from .gae import GAEResult, gae, make_mosaics
from .localisation import (
    attribution_localisation,
    localisation_auc,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)
from .ordering import (
    IROFResult,
    RegionPerturbationResult,
    irof,
    noisy_linear_imputation,
    region_perturbation,
    road,
    selectivity,
)
from .quantus_adapter import quantus_explain_func
from .randomisation import (
    MPRTResult,
    efficient_mprt,
    model_parameter_randomisation,
    random_logit,
    smooth_mprt,
)
from .registry import (
    FAMILIES,
    METRICS,
    MetricInfo,
    by_family,
    curve_axes,
    metric_info,
    register_metric,
)
from .robustness import NoiseDraws, avg_sensitivity, local_lipschitz_estimate, max_sensitivity
from .sampling import Sampling, SamplingOptions
from .stability import (
    consistency,
    continuity,
    continuity_shifts,
    discretise_first_n_sign,
    discretise_top_n_sign,
    relative_input_stability,
    relative_output_stability,
    relative_representation_stability,
)

__all__ = [
    "pointing_game",
    "attribution_localisation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
    "localisation_auc",
    "focus",
    "focus_mosaics",
    "quadrant_masks",
    "sparseness",
    "complexity",
    "faithfulness_correlation",
    "faithfulness_correlations",
    "mu_fidelity",
    "monotonicity",
    "completeness",
    "non_sensitivity",
    "infidelity",
    "monotonicity_correlation",
    "sufficiency",
    "road",
    "region_perturbation",
    "irof",
    "selectivity",
    "noisy_linear_imputation",
    "RegionPerturbationResult",
    "IROFResult",
    "insertion",
    "deletion",
    "pixel_flipping",
    "sensitivity_n",
    "local_lipschitz_estimate",
    "max_sensitivity",
    "avg_sensitivity",
    "relative_input_stability",
    "relative_output_stability",
    "relative_representation_stability",
    "continuity",
    "consistency",
    "continuity_shifts",
    "discretise_top_n_sign",
    "discretise_first_n_sign",
    "gae",
    "quantus_explain_func",
    "CurveResult",
    "SensitivityNResult",
    "GAEResult",
    "NoiseDraws",
    "random_subsets",
    "gaussian_noise",
    "random_permutations",
    "sensitivity_n_grid",
    "make_mosaics",
    "model_parameter_randomisation",
    "smooth_mprt",
    "efficient_mprt",
    "random_logit",
    "MPRTResult",
    "FAMILIES",
    "METRICS",
    "MetricInfo",
    "by_family",
    "curve_axes",
    "metric_info",
    "register_metric",
    "load_metric_modules",
    "Sampling",
    "SamplingOptions",
]


def load_metric_modules() -> None:
    """Import every metric module of this package, so that a new one registers its metrics
    (and they become ``srdxai.metrics.<name>``) without an edit here; run on import."""
    import importlib
    import inspect
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    for name, info in METRICS.items():
        # a module named like its metric (gae.py: gae) is shadowed by the metric
        if name not in globals() or inspect.ismodule(globals()[name]):
            globals()[name] = info.function
        if name not in __all__:
            __all__.append(name)


load_metric_modules()
