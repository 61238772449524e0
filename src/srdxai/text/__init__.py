"""Text classifiers: per-token attributions (:func:`explain_tokens`).

The data sets live in :mod:`srdxai.data.text`, the models in :mod:`srdxai.models.text`, the
HTML display in :mod:`srdxai.report.tokens`.
"""

from .explain import (
    EmbeddingView,
    TokenBatch,
    call_text_model,
    explain_tokens,
    find_embedding,
    is_token_input,
    real_length,
    token_baseline,
    token_batch,
)

__all__ = ["EmbeddingView", "TokenBatch", "call_text_model", "explain_tokens", "find_embedding",
           "is_token_input", "real_length", "token_baseline", "token_batch"]
