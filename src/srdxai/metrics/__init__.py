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
``srdxai metrics``); a new one is one function with :func:`register_metric` plus its test.
"""

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
from .quantus_adapter import quantus_explain_func
from .randomisation import (
    MPRTResult,
    efficient_mprt,
    model_parameter_randomisation,
    random_logit,
    smooth_mprt,
)
from .registry import FAMILIES, METRICS, MetricInfo, by_family, metric_info, register_metric
from .robustness import NoiseDraws, avg_sensitivity, local_lipschitz_estimate, max_sensitivity
from .sampling import Sampling, SamplingOptions

__all__ = [
    "pointing_game",
    "attribution_localisation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
    "localisation_auc",
    "sparseness",
    "complexity",
    "faithfulness_correlation",
    "faithfulness_correlations",
    "mu_fidelity",
    "monotonicity",
    "completeness",
    "insertion",
    "deletion",
    "pixel_flipping",
    "sensitivity_n",
    "local_lipschitz_estimate",
    "max_sensitivity",
    "avg_sensitivity",
    "gae",
    "quantus_explain_func",
    "CurveResult",
    "SensitivityNResult",
    "GAEResult",
    "NoiseDraws",
    "random_subsets",
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
    "metric_info",
    "register_metric",
    "Sampling",
    "SamplingOptions",
]
