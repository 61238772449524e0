"""SRD on token-mixing MLPs (MLP-Mixer, ResMLP, gMLP) equals the independent slow reference
(``srd_mixer_oracle.py``, written from the definition with loops over tokens and pixels,
without reading the engine or ``methods/srd_tokens.py``), through ``srd`` (which routes these
models to token vectors) and ``srd_tokens``; and the comparison is sharp enough to catch a
token-mixing bias split evenly or a gate read the other way round."""

from __future__ import annotations

import pytest
import torch

import srdxai
from srd_mixer_oracle import KINDS, srd_mixer_oracle, tiny_mixer_input, tiny_mixer_model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["srd", "srd_tokens"])
@pytest.mark.parametrize("seed", [0, 4])
def test_library_equals_the_slow_reference(kind, method, seed):
    model = tiny_mixer_model(kind, seed=seed)
    x = tiny_mixer_input(seed=seed + 1)
    targets = torch.tensor([1, 3])
    ours = srdxai.explain(model, x, targets, method)
    reference = srd_mixer_oracle(model, x, targets)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    logits = model(x).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(ours.flatten(1).sum(1), logits, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mutation", ["mixing_bias_even", "gate_to_u"])
def test_the_comparison_catches_a_wrong_rule(kind, mutation):
    """The reference with one rule changed (the token-mixing bias split evenly, gMLP's gate
    read the other way round) still sums to the logit, and differs from the library."""
    if mutation == "gate_to_u" and kind != "gmlp":
        pytest.skip("only gMLP has a gate")
    model = tiny_mixer_model(kind, seed=2)
    x = tiny_mixer_input(seed=3)
    ours = srdxai.explain(model, x, 2, "srd")
    wrong = srd_mixer_oracle(model, x, 2, mutation=mutation)
    assert (ours - wrong).abs().max() > 1e-3 * ours.abs().max()
