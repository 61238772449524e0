"""Text classifiers: per-token attributions (:func:`explain_tokens`) and their evaluation
with tokens as features (:func:`sensitivity_n_tokens`, :func:`insertion_tokens`,
:func:`deletion_tokens`, :func:`token_localisation`, :func:`token_metric`).

The data sets live in :mod:`srdxai.data.text`, the models in :mod:`srdxai.models.text`, the
HTML display in :mod:`srdxai.report.tokens`.
"""

from .explain import (
    EmbeddingView,
    TextGroup,
    TokenBatch,
    call_text_model,
    explain_tokens,
    find_embedding,
    is_token_input,
    real_length,
    text_groups,
    token_baseline,
    token_batch,
)
from .metrics import (
    TokenCurveResult,
    TokenLocalisationResult,
    TokenSensitivityNResult,
    deletion_tokens,
    insertion_tokens,
    sensitivity_n_tokens,
    token_localisation,
    token_metric,
    token_permutations,
)

__all__ = ["EmbeddingView", "TextGroup", "TokenBatch", "TokenCurveResult",
           "TokenLocalisationResult", "TokenSensitivityNResult", "call_text_model",
           "deletion_tokens", "explain_tokens", "find_embedding", "insertion_tokens",
           "is_token_input", "real_length", "sensitivity_n_tokens", "text_groups",
           "token_baseline", "token_batch", "token_localisation", "token_metric",
           "token_permutations"]
