"""Method groups and fast options shared by the tests that run every registered method."""

from __future__ import annotations

from srdxai.methods import METHODS

#: methods that explain Vision Transformers only (and refuse CNNs clearly)
VIT_ONLY = frozenset({"attention_rollout", "transformer_attribution", "srd_tokens"})
#: every method that explains a CNN
CNN_METHODS = sorted(set(METHODS) - VIT_ONLY)


def fast_options(size: int = 8) -> dict[str, dict]:
    """Options that keep the many-pass methods fast on ``size``-pixel inputs (their defaults
    are tested elsewhere)."""
    return {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 2, "seed": 0},
            "occlusion": {"window": max(1, size // 2), "stride": max(1, size // 2)}}
