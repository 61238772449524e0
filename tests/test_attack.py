"""The explanation-manipulation attack (``srdxai.robustness.manipulate``) and its experiment."""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from torch import nn

import small_models as sm
import srdxai
from srdxai.errors import InvalidInputError
from srdxai.models.zoo import small_vit
from srdxai.robustness import SmoothActivations, manipulate
from srdxai.robustness.attack import SCORES, beta_schedule, unit_map


def _model() -> nn.Module:
    return sm.build_model("PoolNet", "relu", seed=0, num_classes=3).train()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    other = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    return x, other


def _state(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()},
            [(n, type(x).__name__, x.training) for n, x in m.named_modules()],
            [p.requires_grad for p in m.parameters()],
            [(len(x._forward_hooks), len(x._forward_pre_hooks), len(x._backward_hooks))
             for x in m.modules()],
            [p.grad for p in m.parameters()])


def _assert_same(a, b) -> None:
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1:4] == b[1:4]
    assert all(g is None for g in b[4])  # the attack did not leave gradients on the model


FASHION = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists()
    and not os.environ.get("SRDXAI_FASHION_MNIST"),
    reason="Fashion-MNIST is not installed (make data)")


def _check_attack(model, x, other, method, iterations, lr, bounds, **options):
    before = _state(model)
    result = manipulate(model, x, method, target_image=other, iterations=iterations, lr=lr,
                        bounds=bounds, **options)
    _assert_same(before, _state(model))
    start = (result.original_map - result.target_map).square().flatten(1).mean(1)
    end = (result.adversarial_map - result.target_map).square().flatten(1).mean(1)
    assert (end < start).all(), (method, start, end)
    assert min(result.losses[1:]) < result.losses[0]
    assert result.scores["prediction_kept"].tolist() == [1.0] * x.shape[0]
    assert set(result.scores) == set(SCORES)
    assert all(v.shape == (x.shape[0],) for v in result.scores.values())
    low, high = bounds
    low = torch.as_tensor(low, dtype=x.dtype).reshape(1, -1, 1, 1)
    high = torch.as_tensor(high, dtype=x.dtype).reshape(1, -1, 1, 1)
    assert ((result.adversarial >= low) & (result.adversarial <= high)).all()  # clamped
    assert len(result.losses) == iterations
    return result


@pytest.mark.parametrize("method", ["srd", "lrp_zplus"])
def test_attack_on_a_random_relu_network(method):
    """Methods differentiable through ReLU itself: the attack needs no smoothing."""
    x, other = _inputs()
    result = _check_attack(_model(), x, other, method, 25, 5e-3, (0.0, 1.0))
    assert result.replaced == 0


@FASHION
@pytest.mark.parametrize("method", ["saliency", "gradient_x_input", "guided_backprop",
                                    "integrated_gradients", "lrp_zplus", "srd", "abslrp",
                                    "gradcam"])
def test_attack_on_the_shipped_vgg(method):
    """On a trained network and real images every method's map moves toward the target
    within 20 steps while the prediction stays."""
    from srdxai.data.fashion import MEAN, STD, ClutteredFashionMNIST, normalize
    from srdxai.methods import METHODS
    from srdxai.models import load

    model = load("fmnist-vgg-relu")
    x = normalize(ClutteredFashionMNIST("test").batch([0, 1, 2, 3]).images)
    bounds = ([-m / s for m, s in zip(MEAN, STD, strict=True)],
              [(1 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    options = {"steps": 4} if method == "integrated_gradients" else {}
    result = _check_attack(model, x[:2], x[2:], method, 20, 1e-2, bounds, **options)
    assert (result.replaced > 0) == METHODS[method].needs_smooth_activations


def test_smoothing_defaults_and_the_final_map_uses_the_original_relus():
    model = _model()
    x, other = _inputs()
    result = manipulate(model, x, "saliency", target_image=other, iterations=4, lr=1e-2)
    assert result.replaced == 4 and result.beta == pytest.approx(beta_schedule(3, 4))
    # the reported map is the ReLU network's map of the manipulated image: sum_c |gradient|
    classes = torch.softmax(model.eval()(x), 1).argmax(1)
    expected = unit_map(srdxai.explain(model, result.adversarial, classes, "saliency",
                                       channel_reduce="none"))
    torch.testing.assert_close(result.adversarial_map, expected)
    assert all(type(m) is not nn.Softplus for m in model.modules())
    plain = manipulate(model, x, "srd", target_image=other, iterations=2, lr=1e-2)
    assert plain.replaced == 0 and plain.beta is None  # SRD is differentiable through ReLU


def test_smooth_activations_swap_back_on_errors():
    model = _model()
    relus = [(n, m) for n, m in model.named_modules() if type(m) is nn.ReLU]
    x, _ = _inputs()
    with pytest.raises(RuntimeError, match="boom"), SmoothActivations(model, beta=5.0) as s:
        assert s.replaced == len(relus) == 4
        out = model.eval()(x)
        s.beta = 1e4  # one shared slope; a steep softplus is ReLU
        torch.testing.assert_close(model(x), sm.build_model("PoolNet", "relu", seed=0,
                                                            num_classes=3)(x))
        assert not torch.allclose(out, model(x))
        raise RuntimeError("boom")
    assert [(n, m) for n, m in model.named_modules() if type(m) is nn.ReLU] == relus


def test_beta_grows_geometrically_from_10_to_100():
    assert beta_schedule(0, 100) == 10.0
    assert beta_schedule(50, 100) == pytest.approx(10 * math.sqrt(10))
    assert beta_schedule(100, 100) == pytest.approx(100.0)


def test_target_map_option_and_clear_errors():
    model = _model()
    x, other = _inputs()
    target = torch.rand(2, 24, 24, dtype=torch.float64)
    result = manipulate(model, x, "lrp_zplus", target_map=target, iterations=1)
    torch.testing.assert_close(result.target_map, unit_map(target))
    with pytest.raises(InvalidInputError, match="exactly one"):
        manipulate(model, x, "srd", iterations=1)
    with pytest.raises(InvalidInputError, match="exactly one"):
        manipulate(model, x, "srd", target_image=other, target_map=target, iterations=1)
    with pytest.raises(InvalidInputError, match="shape"):
        manipulate(model, x, "srd", target_map=target[:, :6], iterations=1)
    with pytest.raises(InvalidInputError, match="channels"):
        manipulate(model, x, "srd", target_image=other, bounds=([0, 0], [1, 1]), iterations=1)
    with pytest.raises(InvalidInputError, match="NaN"):
        manipulate(model, x * float("nan"), "srd", target_image=other, iterations=1)
    with pytest.raises(InvalidInputError, match="iterations"):
        manipulate(model, x, "srd", target_image=other, iterations=-1)
    vit = small_vit(num_classes=3, image_size=16).double()
    image = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    kept = image.clone()
    with pytest.raises(srdxai.SrdxaiError, match="differentiable"):
        manipulate(vit, image, "attention_rollout",
                   target_image=torch.rand(1, 3, 16, 16, dtype=torch.float64), iterations=1)
    assert torch.equal(image, kept)  # a refused attack leaves the input as it was


@FASHION
def test_attack_experiment_in_bench_and_report(tmp_path, monkeypatch):
    from srdxai.experiments import BenchConfig, run
    from srdxai.experiments.suite import attack
    from srdxai.report.render import build_report

    monkeypatch.setitem(attack.ATTACK_SCHEDULE, True, (3, 6e-3))
    monkeypatch.setattr(attack, "ATTACK_METHODS", [("SRD-input", "srd", {}),
                                                   ("Gradient", "saliency", {})])
    db = run(tmp_path, BenchConfig(experiments=["attack"], quick=True), progress=False)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT model, method, metric, sample FROM results").fetchall()
    names = [n for (n,) in con.execute("SELECT name FROM artifacts")]
    con.close()
    assert len(rows) == 2 * 2 * len(SCORES) * 2  # models x methods x scores x samples
    assert sorted(names) == sorted(f"attack/{m}/{k}/0" for m in ("fmnist-vgg-relu",
                                                                  "fmnist-resnet-relu")
                                   for k in ("SRD-input", "Gradient"))
    _, md = build_report(tmp_path)
    text = md.read_text()
    assert "### Robustness: attack" in text and "Robustness: attack (not run)" not in text
    assert "pcc_to_target ↓" in text
    assert "figures/artifact-attack-fmnist-vgg-relu-SRD-input-0.png" in text
    assert "## Qualitative grid (not run)" in text or "attack/" not in text.split(
        "## Qualitative grid")[1]


def test_relu6_is_smoothed_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 6, 6) * 10
    expected = model(x)
    with SmoothActivations(model, beta=1e4) as s:
        assert s.replaced == 1 and not isinstance(model[1], nn.ReLU6)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-3)
        s.beta = 1.0
        assert not torch.allclose(model(x), expected)
    assert type(model[1]) is nn.ReLU6
