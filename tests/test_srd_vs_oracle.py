"""The engine's SRD against the slow reference written straight from the definition.

`tests/srd_oracle.py` loops over positions, kernel/pool offsets and paths with explicit
contribution vectors, bias shares and sharing ratios; it shares no code with the engine.
Everything is float64 and must agree to 1e-6 (relative to the map's scale).
"""

from __future__ import annotations

import pytest
import torch

import srdxai
from small_models import ACTIVATIONS, MODEL_CLASSES, build_model
from srd_oracle import pfv_layer_names, srd_oracle, srd_oracle_layer_seed

MODELS = [name for name in MODEL_CLASSES if not name.startswith("Tiny")]


def assert_maps_equal(engine: torch.Tensor, oracle: torch.Tensor, what: str) -> None:
    scale = oracle.abs().max().clamp_min(1e-12)
    err = ((engine - oracle).abs().max() / scale).item()
    assert err < 1e-6, f"{what}: max relative difference {err:.3e}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_engine_matches_oracle(name, act):
    model = build_model(name, act=act, seed=3)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    target = [1, 4]
    assert_maps_equal(srdxai.explain(model, x, target=target), srd_oracle(model, x, target),
                      f"{name}/{act}")


@pytest.mark.parametrize("name", MODELS)
def test_engine_matches_oracle_non_square_and_contrastive(name):
    model = build_model(name, act="silu", seed=5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 13, 17, generator=g, dtype=torch.float64)
    for contrastive in (False, True):
        engine = srdxai.explain(model, x, target=2, contrastive=contrastive)
        oracle = srd_oracle(model, x, 2, contrastive=contrastive)
        assert_maps_equal(engine, oracle, f"{name} contrastive={contrastive}")


@pytest.mark.parametrize("name", MODELS)
def test_erf_matches_oracle(name):
    model = build_model(name, act="gelu", seed=2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 12, 10, generator=g, dtype=torch.float64)
    layers = {k: v for k, v in pfv_layer_names(model, x).items() if k != "input"}
    srd = srdxai.SRD(model)
    engine_names = {n for n, _ in srd.layers(x)}
    for layer, (_, h, w) in layers.items():
        assert layer in engine_names, (layer, engine_names)
        pos = (h // 2, w - 1)
        seed = torch.zeros(1, h, w, dtype=torch.float64)
        seed[0, pos[0], pos[1]] = 1.0
        assert_maps_equal(srd.erf(x, layer, pos), srd_oracle_layer_seed(model, x, layer, seed),
                          f"{name} ERF {layer}{pos}")


def test_float32_engine_close_to_oracle():
    model = build_model("ResNetLike", act="relu", seed=0)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    oracle = srd_oracle(model, x, [0, 3])
    engine = srdxai.explain(model.float(), x.float(), target=[0, 3])
    scale = oracle.abs().max()
    assert ((engine.double() - oracle).abs().max() / scale).item() < 1e-4


@pytest.mark.parametrize("name", ["PoolNet", "ResNetLike"])
def test_gradcam_seed_matches_oracle_seeded_with_an_independent_gradcam(name):
    model = build_model(name, act="relu", seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 12, 12, generator=g, dtype=torch.float64)
    layers = [k for k in pfv_layer_names(model, x) if k != "input"]
    layer = layers[-1]
    # Grad-CAM of the seed layer's activation output with plain autograd (torchray's formula
    # on the tensor the reference's in-place ReLU leaves in its probe)
    captured = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, a, o: captured.update(v=o))
    out = model(x)
    handle.remove()
    v = captured["v"]
    (gv,) = torch.autograd.grad(out[:, 3].sum(), v)
    cam = (gv.mean((2, 3), keepdim=True) * v).sum(1).clamp_min(0).detach()
    engine = srdxai.explain(model, x, target=3, seed="gradcam", seed_layer=layer)
    assert_maps_equal(engine, srd_oracle_layer_seed(model, x, layer, cam), f"{name} gradcam")


@pytest.mark.parametrize("name, act", [("DepthwiseNet", "elu"), ("ResNetLike", "relu")])
def test_fast_conv_split_equals_general_path_walk(monkeypatch, name, act):
    # ResNetLike's 1x1 convolutions (stride 1 and 2) give each bias one path per position,
    # which the fast split hands the whole bias without computing norms; a dead ReLU
    # (zero PFV vectors, so zero norms) must not change that
    from srdxai.methods.srd import SRDRule

    model = build_model(name, act=act, seed=4)
    if name == "ResNetLike":
        model.layer1.bn2.bias.data.fill_(-50.0)  # act2 dead: conv3 (1x1) reads zeros
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    fast = srdxai.explain(model, x, target=1)
    monkeypatch.setattr(SRDRule, "_split_conv_offsets", lambda self, node, rho: False)
    general = srdxai.explain(model, x, target=1)
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-14)


def test_device_path_without_host_checks_gives_the_same_map(monkeypatch):
    # On a GPU the bias split skips its "anything to do?" checks (they would read a value back
    # to the host once per layer); the map must not change. Zero biases and an all-zero input
    # row make both checks matter on the CPU path.
    from srdxai.methods import srd as srd_module

    model = build_model("PoolNet", act="relu", seed=2)
    model.conv3.bias.data.zero_()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    x[:, :, :3] = 0.0
    checked = srdxai.explain(model, x, target=1)
    monkeypatch.setattr(srd_module, "_may_hold", lambda mask: True)
    unchecked = srdxai.explain(model, x, target=1)
    torch.testing.assert_close(unchecked, checked, rtol=1e-12, atol=1e-14)
