"""SRD on token vectors equals the independent slow reference (``srd_token_oracle.py``,
written from the definition in docs/srd.md with loops over tokens, heads and pixels, without
reading the engine or ``methods/srd_tokens.py``), through ``srd_tokens`` and through ``srd``
(which routes Vision Transformers to it); and the comparison is sharp enough to catch the
rules that make it conservative."""

from __future__ import annotations

import pytest
import torch

import srdxai
from srd_hybrid_oracle import srd_hybrid_oracle, tiny_hybrid, tiny_hybrid_input
from srd_token_oracle import (
    VARIANTS,
    DistilledViT,
    srd_token_oracle,
    tiny_input,
    tiny_token_vit,
)
from srdxai.errors import UnsupportedOperationError
from srdxai.methods import srd_tokens

DT = torch.float64


def _oracle(model, x, targets):
    return torch.cat([srd_token_oracle(model, x[i:i + 1], t) for i, t in enumerate(targets)])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("method", ["srd_tokens", "srd"])
def test_library_equals_the_slow_reference(variant, activation, method):
    model = tiny_token_vit(variant, activation, seed=3)
    x = tiny_input(seed=5)
    targets = [1, 3]
    expected = _oracle(model, x, targets)
    got = srdxai.explain(model, x, targets, method)
    assert got.shape == expected.shape == (2, 16, 16)
    torch.testing.assert_close(got.to(DT), expected, rtol=1e-7,
                               atol=1e-9 * float(expected.abs().max()))
    logits = model(x)[[0, 1], targets]
    torch.testing.assert_close(got.sum((1, 2)), logits.detach(), rtol=1e-9, atol=1e-12)


def test_the_comparison_catches_a_dropped_constant_term(monkeypatch):
    """Without the class token's share handed on (the rule before), the maps differ."""
    model, x = tiny_token_vit("vit", seed=3), tiny_input(seed=5)
    expected = _oracle(model, x, [1, 3])
    # every vector taken as input-dependent (switching constant_parts off would also hide
    # which call made each tensor, which the attention rule needs)
    monkeypatch.setattr(srd_tokens, "_vector_constant", lambda *args, **kwargs: None)
    wrong = srdxai.explain(model, x, [1, 3], "srd_tokens")
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def test_the_comparison_catches_even_spreading(monkeypatch):
    """Relevance spread evenly over a vector's entries instead of by their squares shares a
    token's relevance among its heads by head count, not by ||o_h||^2 / ||o||^2."""
    model, x = tiny_token_vit("vit", seed=3), tiny_input(seed=5)
    expected = _oracle(model, x, [1, 3])
    squares = srd_tokens._spread

    def even(per_vector, like, axis=-1):
        return squares(per_vector, torch.ones_like(like), axis)

    monkeypatch.setattr(srd_tokens, "_spread", even)
    wrong = srdxai.explain(model, x, [1, 3], "srd_tokens")
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def test_srd_on_a_transformer_refuses_what_is_defined_for_cnns_only():
    model, x = tiny_token_vit("vit", seed=3), tiny_input(seed=5)
    for options in ({"seed": "gradcam"}, {"contrastive": True}):
        with pytest.raises(UnsupportedOperationError, match="defined for CNNs only"):
            srdxai.explain(model, x, 1, "srd", **options)
    srd = srdxai.SRD(model)
    for call in (lambda: srd.attribute_layer(x, 1, layer="low"),
                 lambda: srd.erf(x, layer="low", position=(0, 0)),
                 lambda: srd.layers(x)):
        with pytest.raises(UnsupportedOperationError, match="only the pixel map"):
            call()
    # the pixel map itself works
    assert srd.attribute(x, 1).shape == (2, 16, 16)


@pytest.mark.parametrize("block", ["plain", "se", "gc", "max_pool", "token_max", "eca",
                                   "eca+max_pool+token_max"])
@pytest.mark.parametrize("activation", ["silu", "relu"])
@pytest.mark.parametrize("method", ["srd_tokens", "srd"])
def test_hybrid_cnn_transformer_equals_the_slow_reference(activation, method, block):
    """A stem convolution with padding and stride 2, BatchNorm, an inverted-residual block with
    a depthwise convolution and an (N, C, H, W) residual sum, then a transformer block on the
    flattened map (``srd_hybrid_oracle.py``, written from the definition); ``se``: the block has
    a squeeze-excitation gate before its projecting convolution (the gate a constant weight,
    its branch gets no relevance); ``gc``: a global-context block follows it (attention pooling
    ``x @ softmax(...)``, the weights second, and a context vector added at every position);
    ``eca``: an ECA gate ``x * sigmoid(conv1d(mean)).expand_as(x)`` follows it (the signal
    first; the gate a constant weight); ``max_pool``: ``F.max_pool2d(x, 3, 2, 1)`` on the map
    before the tokens (each channel from the position that won it); ``token_max``: the tokens
    pooled in pairs ``t.view(N, 2, T // 2, D).amax(dim=1)`` (each entry from the token that
    won it)."""
    model = tiny_hybrid(activation, seed=2, **{k: True for k in block.split("+")
                                               if k != "plain"})
    x = tiny_hybrid_input(seed=4)
    targets = [0, 3]
    expected = torch.cat([srd_hybrid_oracle(model, x[i:i + 1], t)
                          for i, t in enumerate(targets)])
    got = srdxai.explain(model, x, targets, method)
    torch.testing.assert_close(got.to(DT), expected, rtol=1e-7,
                               atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("form", ["mean", "sum"])
def test_heads_averaged_through_a_stack_equal_the_slow_reference(form):
    """CrossViT averages its branch heads as ``torch.mean(torch.stack(logits, 0), 0)``: the
    stacked axis is not the batch (until December 2026 refused, since a mean over dim 0
    looked like one over the batch); at the logits each head gets its contribution to the
    target logit, as with DeiT's ``(a + b) / 2`` in the reference."""
    model = tiny_token_vit("distilled", "gelu", seed=3)

    def stacked(x):
        tokens = model.patch_embed(x)
        n = tokens.shape[0]
        t = torch.cat([model.cls_token.expand(n, -1, -1), model.dist_token.expand(n, -1, -1),
                       tokens], 1) + model.pos_embed
        t = model.norm(model.blocks(t))
        heads = torch.stack([model.head(t[:, 0]), model.head_dist(t[:, 1])], 0)
        return heads.mean(0) if form == "mean" else heads.sum(0) / 2

    model.forward = stacked
    x = tiny_input(seed=5)
    torch.testing.assert_close(model(x), DistilledViT.forward(model, x))
    got = srdxai.explain(model, x, [1, 3], "srd")
    expected = _oracle(model, x, [1, 3])
    torch.testing.assert_close(got.to(DT), expected, rtol=1e-7,
                               atol=1e-9 * float(expected.abs().max()))
