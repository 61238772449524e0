"""SRD through concatenation, slices and splits, gates, adaptive pooling with overlapping
windows and upsampling: the engine against the independent path-by-path oracle
(``tests/srd_oracle_ops.py``, written from docs/srd.md without reading the engine)."""

from __future__ import annotations

import pytest
import torch

import srdxai
from srd_oracle_ops import (
    GATE_BRANCH_LAYERS,
    OPS_MODEL_CLASSES,
    build_ops_model,
    ops_input,
    pfv_layers,
    srd_oracle_ops,
    srd_oracle_ops_layer_seed,
)
from srdxai.methods.srd import SRD

MODELS = sorted(OPS_MODEL_CLASSES)


def assert_maps_equal(engine: torch.Tensor, oracle: torch.Tensor, what: str) -> None:
    scale = oracle.abs().max().clamp_min(1e-12)
    err = ((engine - oracle).abs().max() / scale).item()
    assert err < 1e-9, f"{what}: max relative difference {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_engine_matches_oracle(name, act):
    model = build_ops_model(name, act=act, seed=1)
    x = ops_input(name, seed=2)
    target = [1, 3]
    engine = srdxai.explain(model, x, target=target, method="srd", seed="logit")
    oracle = srd_oracle_ops(model, x, target)
    assert_maps_equal(engine, oracle, f"{name}/{act}")
    # conservation: the map sums to the target logit (float64)
    logits = model(x)[torch.arange(2), torch.tensor(target)]
    torch.testing.assert_close(engine.sum((1, 2)), logits.detach(), rtol=1e-9, atol=1e-12)
    # automatic seed: a decomposed head means the logit seed, never a silent Grad-CAM seed
    assert_maps_equal(srdxai.explain(model, x, target=target, method="srd"), oracle,
                      f"{name}/{act} auto seed")


@pytest.mark.parametrize("name", MODELS)
def test_erf_matches_oracle(name):
    model = build_ops_model(name, seed=4)
    x = ops_input(name, seed=5)
    layers = pfv_layers(model, x)
    srd = SRD(model)
    checked = 0
    for layer, (_, h, w) in layers.items():
        if layer == "input" or layer in GATE_BRANCH_LAYERS.get(name, ()):
            continue
        pos = (h // 2, w - 1)
        seed = torch.zeros(2, h, w, dtype=torch.float64)
        seed[:, pos[0], pos[1]] = 1.0
        assert_maps_equal(srd.erf(x, layer, pos), srd_oracle_ops_layer_seed(model, x, layer, seed),
                          f"{name} ERF of {layer}{pos}")
        checked += 1
    assert checked >= min(3, len(layers) - 1)


def test_gate_branches_receive_no_relevance():
    name = "GateNet"
    model = build_ops_model(name, seed=6)
    x = ops_input(name, seed=7)
    srd = SRD(model, seed="logit")
    for layer in GATE_BRANCH_LAYERS[name]:
        rel = srd.attribute_layer(x, target=0, layer=layer, upsample=False)
        assert rel.abs().max() == 0, layer


def test_float32_close_to_oracle():
    for name in MODELS:
        model = build_ops_model(name, seed=8)
        x = ops_input(name, seed=9)
        engine = srdxai.explain(model.float(), x.float(), target=2, method="srd")
        oracle = srd_oracle_ops(model.double(), x, 2)
        err = ((engine.double() - oracle).abs().max() / oracle.abs().max()).item()
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("quadratic_below", [0, None, 10 ** 9])
def test_pointwise_chain_split_equals_general_path_walk(monkeypatch, quadratic_below):
    """The fast bias split through per-channel / per-position scales (ConvNeXt's LayerNorm
    shift and first dense layer after the depthwise convolution) is the general walk, with
    the offsets' norms through the dense layer from K stacked Gram matrices (0), one Gram
    matrix per offset (10**9) or whichever the map's shape picks (None)."""
    from srdxai.methods import srd as srd_module
    from srdxai.methods.srd import SRDRule

    if quadratic_below is not None:
        monkeypatch.setattr(srd_module, "_QUADRATIC_POSITIONS_PER_CHANNEL", quadratic_below)

    model = build_ops_model("StreamNet", act="gelu", seed=3)
    x = ops_input("StreamNet", seed=2)
    taken = []
    original = SRDRule._split_through_pointwise

    def counting(self, node, rho):
        done = original(self, node, rho)
        taken.append(done)
        return done

    monkeypatch.setattr(SRDRule, "_split_through_pointwise", counting)
    fast = srdxai.explain(model, x, target=[1, 2])
    # per block the LayerNorm shift and the first dense layer (blocks reading the stem or
    # the downsampling convolution through a LayerNorm: the two-convolution case)
    assert sum(taken) >= 6
    monkeypatch.setattr(SRDRule, "_split_through_pointwise", lambda self, node, rho: False)
    general = srdxai.explain(model, x, target=[1, 2])
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-14)
