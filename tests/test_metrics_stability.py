"""srdxai.metrics.stability: relative input/output/representation stability, continuity and
consistency. Known answers on hand-built models, batching, purity and input checks; the
cross-check against Quantus 0.6 is tests/test_metrics_quantus_stability.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from srdxai.errors import InvalidInputError
from srdxai.metrics.sampling import Sampling
from srdxai.metrics.stability import (
    _Capture,
    consistency,
    continuity,
    continuity_shifts,
    discretise_first_n_sign,
    discretise_top_n_sign,
    relative_input_stability,
    relative_output_stability,
    relative_representation_stability,
)

RELATIVE = [relative_input_stability, relative_output_stability,
            relative_representation_stability]


def linear(weight: list[list[float]]) -> nn.Module:
    """logits = W @ flatten(x), float64, no bias."""
    w = torch.tensor(weight, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(w.shape[1], w.shape[0], bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(w)
    return model.eval()


def squares(model, x, y):
    """A hand-built "explanation": a(x) = x ** 2, elementwise (ignores model and class)."""
    return x ** 2


def constant_draws(*deltas: float, shape=(1, 1, 2, 2)) -> torch.Tensor:
    return torch.stack([torch.full(shape, d, dtype=torch.float64) for d in deltas])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def saliency(model, x, y):
    return srdxai.explain(model, x, y, "saliency")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    model = SmallCNN().double().eval()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


# --- known answers --------------------------------------------------------------------------

def test_relative_stability_known_answers():
    """x = ones (1x1x2x2), a(x) = x^2, W rows sum to 3 and 4 (class 1 predicted), constant
    noise d in {0.1, -0.05} (both keep class 1: logits (3, 4) * (1 + d)).
    Per element: (a - a')/a = 1 - (1 + d)^2 = -(2d + d^2); (x - x')/x = -d; four elements.
    RIS = 2|2d + d^2| / (2|d|) = |2 + d|: 2.1 and 1.95, max 2.1.
    ROS: logits move by (3d, 4d), norm 5|d|: 2|2d + d^2| / (5|d|) = 2|2 + d| / 5, max 0.84.
    RRS, default layer (the input of the Linear head = x flattened): as RIS, 2.1.
    RRS, layer "1" (the logits): (h - h')/h = -d for both classes, norm sqrt(2)|d|:
    2|2 + d| / sqrt(2), max sqrt(2) * 2.1."""
    model = linear([[1, 1, 1, 0], [1, 1, 1, 1]])
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    draws = constant_draws(0.1, -0.05)
    kwargs = {"explain": squares, "draws": draws}
    assert relative_input_stability(model, x, None, **kwargs).item() == pytest.approx(2.1)
    assert relative_output_stability(model, x, None, **kwargs).item() == pytest.approx(0.84)
    assert relative_representation_stability(model, x, None, **kwargs).item() == (
        pytest.approx(2.1))
    assert relative_representation_stability(model, x, None, layer="1", **kwargs).item() == (
        pytest.approx(math.sqrt(2) * 2.1))


def test_the_denominator_is_floored_at_eps_min():
    """d = 1e-9: RIS's denominator 2e-9 is floored at eps_min = 1e-6, so the score is
    2 (2d + d^2) / 1e-6 ~ 4e-3 (Quantus divides by 2e-9 and returns 2). d = 0 gives 0 / eps."""
    model = linear([[1, 1, 1, 0], [1, 1, 1, 1]])
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    tiny = relative_input_stability(model, x, None, explain=squares,
                                    draws=constant_draws(1e-9)).item()
    assert tiny == pytest.approx(2 * (2e-9 + 1e-18) / 1e-6, rel=1e-6)
    assert relative_input_stability(model, x, None, explain=squares,
                                    draws=constant_draws(0.0)).item() == 0.0
    floor = relative_input_stability(model, x, None, explain=squares, eps_min=1e-12,
                                     draws=constant_draws(1e-9)).item()
    assert floor == pytest.approx(2.0, rel=1e-6)  # the floor no longer binds


def test_copies_that_change_the_prediction():
    """W = [[1, 1, 1, 0], [0, 0, 0, 4]], a(x) = x^2. Sample 0: x = 1 (logits (3, 4), class
    1); sample 1: x = 2 (class 1). Draw A = (3, 3, 3, 0) flips both to class 0
    (logits (12, 4) and (15, 8)); draw B = 0.1 everywhere keeps them.
    Sample 0: A gives ||1 - 4^2|| / ||3|| over three elements = 15/3 = 5, B gives 2.1.
    Sample 1 (relative to 2): A gives ||1 - 2.5^2|| / ||1.5|| = 5.25/1.5 = 3.5, B gives
    ||1 - 1.05^2|| / ||0.05|| = 0.1025/0.05 = 2.05."""
    model = linear([[1, 1, 1, 0], [0, 0, 0, 4]])
    x = torch.cat([torch.ones(1, 1, 2, 2), 2 * torch.ones(1, 1, 2, 2)]).double()
    flip = torch.tensor([3.0, 3.0, 3.0, 0.0], dtype=torch.float64).view(1, 1, 2, 2)
    keep = torch.full((2, 1, 2, 2), 0.1, dtype=torch.float64)
    draws = torch.stack([flip.expand(2, 1, 2, 2), keep])
    run = {"explain": squares, "draws": draws}
    skip = relative_input_stability(model, x, None, **run)
    kept = relative_input_stability(model, x, None, changed_prediction="keep", **run)
    nan = relative_input_stability(model, x, None, changed_prediction="nan", **run)
    np.testing.assert_allclose(skip.numpy(), [2.1, 2.05], rtol=1e-12)
    np.testing.assert_allclose(kept.numpy(), [5.0, 3.5], rtol=1e-12)
    assert torch.isnan(nan).all()
    only_flips = relative_input_stability(model, x, None, explain=squares, draws=draws[:1])
    assert torch.isnan(only_flips).all()  # no copy keeps the prediction: undefined


def test_continuity_known_answer():
    """x = (1, 2, 3, 4) as a 1x1x1x4 image, a(x) = x itself, no preprocessing, baseline 0.
    Width 4: shifts -4 + k * (9 // nr_steps). nr_steps=4: dx = 2, shifts -2, 0, 2, 4.
    Shift 2: x' = (0, 0, 1, 2), x - x' = (1, 2, 2, 2): ||.||_1 / ||.||_2 = 7 / sqrt(13).
    Shift -2: x' = (3, 4, 0, 0), x - x' = (-2, -2, 3, 4): 11 / sqrt(33). Shift 4: x' = 0,
    10 / sqrt(30). Shift 0 (x' = x) is left out. Max: 7 / sqrt(13) = 1.9415.
    nr_steps=9: dx = 1, shifts -3..5; shift 1 gives x - x' = (1, 1, 1, 1): 4 / 2 = 2, the
    largest of all."""
    model = linear([[1, 1, 1, 1], [-1, -1, -1, -1]])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)

    def identity(m, xx, yy):
        return xx.clone()

    options = {"explain": identity, "normalise": None, "abs": False, "baseline": 0.0}
    assert continuity_shifts(4, 4).tolist() == [-2, 0, 2, 4]
    four = continuity(model, x, 0, nr_steps=4, **options).item()
    assert four == pytest.approx(7 / math.sqrt(13), rel=1e-12)
    assert continuity(model, x, 0, nr_steps=9, **options).item() == pytest.approx(2.0)
    down = continuity(model, x.transpose(2, 3), 0, nr_steps=4, direction="y", **options)
    assert down.item() == pytest.approx(four, rel=1e-12)


def test_continuity_shift_out_of_the_image_and_a_single_step():
    """nr_steps = 2 * width + 1 = 9 or 1 reach shift width + 1: the whole image is the
    baseline (Quantus raises there)."""
    model = linear([[1, 1, 1, 1], [-1, -1, -1, -1]])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    assert continuity_shifts(4, 1).tolist() == [5]
    one = continuity(model, x, 0, nr_steps=1, explain=lambda m, xx, yy: xx.clone(),
                     normalise=None, abs=False, baseline=0.0)
    assert one.item() == pytest.approx(10 / math.sqrt(30))


def test_consistency_known_answer():
    """Maps of four features, codes = top-2 features by |a| and their signs:
    samples 0-2 share code ({0, 1}, +, +); samples 3, 4 share ({2, 3}, -, +); sample 5 has
    ({2, 3}, +, +) alone. The model predicts class 1 iff x[0] > 0: classes 0, 0, 1, 1, 1, 0.
    Sample 0: of samples 1 and 2, one (1) shares its class: 1/2; sample 1: 1/2; sample 2: 0;
    samples 3 and 4: 1; sample 5: NaN (no other sample has its code).
    With abs=True the signs go: samples 3, 4, 5 share ({2, 3}, +, +): 1/2, 1/2, 0."""
    model = linear([[-1, 0, 0, 0], [1, 0, 0, 0]])
    x = torch.zeros(6, 1, 2, 2, dtype=torch.float64)
    x[:, 0, 0, 0] = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, -1.0])
    maps = torch.tensor([[5, 4, 0, 1], [3, 2, 1, 0], [9, 8, -1, 0], [0, 0, -7, 6],
                         [1, 0, -3, 2], [0, 0, 7, 6]], dtype=torch.float64).view(6, 2, 2)
    signed = consistency(model, x, None, maps, n=2, abs=False)
    np.testing.assert_array_equal(signed.numpy(), [0.5, 0.5, 0.0, 1.0, 1.0, np.nan])
    unsigned = consistency(model, x, None, maps, n=2)
    np.testing.assert_array_equal(unsigned.numpy(), [0.5, 0.5, 0.0, 0.5, 0.5, 0.0])
    # the same with a user discretisation: the code is the index of the largest |a|
    top1 = consistency(model, x, None, maps, discretise=lambda a: a.abs().argmax(1))
    np.testing.assert_array_equal(top1.numpy(), [0.5, 0.5, 0.0, 0.5, 0.5, 0.0])


def test_discretisations():
    maps = torch.tensor([[0.0, -3.0, 2.0, 3.0, -1.0]])
    # top 2 by |a|: indices 1 and 3 (equal |a|; both kept), signs -, +
    assert discretise_top_n_sign(maps, 2).tolist() == [[1.0, 3.0, -1.0, 1.0]]
    # ties at the boundary: the lower index wins
    assert discretise_top_n_sign(maps, 1).tolist() == [[1.0, -1.0]]
    # Quantus' top_n_sign: the first n positions, whatever their size
    assert discretise_first_n_sign(maps, 3).tolist() == [[0.0, -1.0, 1.0]]


# --- batching -------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", RELATIVE)
def test_relative_stability_batch_equals_per_sample(cnn, metric):
    model, x, y = cnn
    draws = (torch.rand(3, *x.shape, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64) - 0.5) * 0.4
    options = {"explain": saliency, "draws": draws, "changed_prediction": "keep"}
    batch = metric(model, x, y, **options)
    for bs in (1, 4):
        torch.testing.assert_close(metric(model, x, y, batch_size=bs, **options), batch,
                                   rtol=1e-10, atol=0)
    alone = torch.cat([metric(model, x[i:i + 1], y[i:i + 1], explain=saliency,
                              draws=draws[:, i:i + 1], changed_prediction="keep")
                       for i in range(len(x))])
    torch.testing.assert_close(alone, batch, rtol=1e-10, atol=0)
    assert batch.dtype == torch.float64 and batch.shape == (len(x),)
    assert torch.isfinite(batch).all()


def test_seeded_draws_do_not_depend_on_batch_size(cnn):
    model, x, y = cnn
    runs = [relative_input_stability(model, x, y, explain=saliency, nr_samples=3, seed=4,
                                     batch_size=bs) for bs in (2, 7, None)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-10, atol=0)


def test_continuity_batch_equals_per_sample(cnn):
    model, x, y = cnn
    batch = continuity(model, x, y, explain=saliency, nr_steps=5)
    torch.testing.assert_close(continuity(model, x, y, explain=saliency, nr_steps=5,
                                          batch_size=3), batch, rtol=1e-10, atol=0)
    alone = torch.cat([continuity(model, x[i:i + 1], y[i:i + 1], explain=saliency, nr_steps=5)
                       for i in range(len(x))])
    torch.testing.assert_close(alone, batch, rtol=1e-10, atol=0)
    skip = continuity(model, x, None, explain=saliency, nr_steps=5, changed_prediction="skip")
    assert (skip[torch.isfinite(skip)] <= batch[torch.isfinite(skip)] + 1e-12).all()


def test_consistency_is_relative_to_the_batch_and_permutation_equivariant(cnn):
    """Consistency compares the samples with each other, so it is not per sample; instead
    its scores follow a permutation of the batch and do not depend on batch_size."""
    model, x, y = cnn
    maps = torch.zeros(len(x), 8, 8, dtype=torch.float64)
    maps[:, 0, 0] = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0])  # two codes
    scores = consistency(model, x, y, maps, n=1, abs=False)
    order = torch.tensor([3, 0, 4, 1, 2])
    permuted = consistency(model, x[order], y[order], maps[order], n=1, abs=False)
    torch.testing.assert_close(permuted, scores[order], equal_nan=True)
    torch.testing.assert_close(consistency(model, x, y, maps, n=1, abs=False, batch_size=1),
                               scores, equal_nan=True)
    assert torch.isfinite(scores).all()
    assert torch.isnan(consistency(model, x[:1], y[:1], maps[:1], n=1)).all()


# --- purity ---------------------------------------------------------------------------------

def test_caller_tensors_and_model_are_unchanged(cnn):
    _, x, y = cnn
    torch.manual_seed(1)
    model = SmallCNN().double().train()
    model.conv1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x_copy, y_copy = x.clone(), y.clone()
    a = saliency(model.eval(), x, y).clone()
    model.train()
    a_copy = a.clone()
    draws = torch.zeros(2, *x.shape, dtype=torch.float64) + 0.05
    draws_copy = draws.clone()
    for metric in RELATIVE:
        metric(model, x, y, a, explain=saliency, draws=draws)
    relative_representation_stability(model, x, y, a, explain=saliency, draws=draws,
                                      layer=["conv1", model.conv2])
    continuity(model, x, y, a, explain=saliency, nr_steps=3, changed_prediction="nan")
    consistency(model, x, y, a)
    for name, value in (("x", x), ("y", y), ("a", a), ("draws", draws)):
        assert torch.equal(value, locals()[f"{name}_copy"]), name
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_removes_its_hooks_when_the_forward_pass_raises():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            self.fc(x.flatten(1))
            raise RuntimeError("boom")

    model = Broken()
    capture = _Capture(model, [(model.fc, "output", True)])
    with pytest.raises(RuntimeError, match="boom"):
        capture(torch.zeros(1, 1, 2, 2))
    assert not model.fc._forward_hooks


def test_representations_are_copied_before_an_in_place_relu():
    """The Linear's output is read before ReLU(inplace=True) overwrites it: the same score
    as with an out-of-place ReLU (Quantus, on the CPU, would read the ReLU'd values)."""
    torch.manual_seed(3)
    in_place = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(inplace=True),
                             nn.Linear(6, 3)).double()
    out_of_place = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(),
                                 nn.Linear(6, 3)).double()
    out_of_place.load_state_dict(in_place.state_dict())
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    draws = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64) * 0.1
    options = {"explain": saliency, "draws": draws, "layer": "1", "changed_prediction": "keep"}
    torch.testing.assert_close(relative_representation_stability(in_place, x, None, **options),
                               relative_representation_stability(out_of_place, x, None,
                                                                 **options))


def test_layer_choices(cnn):
    model, x, y = cnn
    draws = torch.full((2, *x.shape), 0.05, dtype=torch.float64)
    run = {"explain": saliency, "draws": draws}
    by_name = relative_representation_stability(model, x, y, layer="conv2", **run)
    by_module = relative_representation_stability(model, x, y, layer=model.conv2, **run)
    torch.testing.assert_close(by_name, by_module)
    for layer in (None, "all", ["conv1", "fc"]):
        out = relative_representation_stability(model, x, y, layer=layer, **run)
        assert out.shape == (len(x),) and torch.isfinite(out).all()


# --- options and errors ---------------------------------------------------------------------

def test_sampling_object_equals_keywords(cnn):
    model, x, y = cnn
    for metric in RELATIVE:
        by_object = metric(model, x, y, explain=saliency, nr_samples=2,
                           sampling=Sampling(seed=3, batch_size=4))
        by_keywords = metric(model, x, y, explain=saliency, nr_samples=2, seed=3, batch_size=4)
        torch.testing.assert_close(by_object, by_keywords)
    torch.testing.assert_close(
        continuity(model, x, y, explain=saliency, nr_steps=3, sampling=Sampling(batch_size=2)),
        continuity(model, x, y, explain=saliency, nr_steps=3, batch_size=2))
    torch.testing.assert_close(consistency(model, x, y, explain=saliency,
                                           sampling=Sampling(batch_size=2)),
                               consistency(model, x, y, explain=saliency, batch_size=2),
                               equal_nan=True)
    with pytest.raises(InvalidInputError, match="not both"):
        relative_input_stability(model, x, y, explain=saliency, sampling=Sampling(), seed=1)


def test_bad_inputs_are_refused(cnn):
    model, x, y = cnn
    good = {"explain": saliency, "nr_samples": 1}
    cases = [
        (relative_input_stability, {"nr_samples": 1}, "explain="),
        (relative_input_stability, dict(good, changed_prediction="drop"), "changed_prediction"),
        (relative_input_stability, dict(good, draws=torch.zeros(2, 3)), r"draws must be noise"),
        (relative_input_stability,
         dict(good, draws=torch.full((1, *x.shape), math.nan)), "NaN"),
        (relative_input_stability, dict(good, eps_min=0.0), "eps_min"),
        (relative_input_stability, dict(good, p=-1), "p must"),
        (relative_input_stability, dict(good, lower_bound=0.3, upper_bound=0.1), "upper_bound"),
        (relative_input_stability, dict(good, lower_bound=0.0), "lower_bound"),
        (relative_representation_stability, dict(good, layer="conv9"), "no layer 'conv9'"),
        (relative_representation_stability, dict(good, layer=nn.Linear(2, 2)), "not part"),
        (continuity, {"explain": saliency, "nr_steps": 18}, "at most"),
        (continuity, {"explain": saliency, "direction": "z"}, "direction"),
        (continuity, {"explain": saliency, "draws": torch.zeros(1)}, "draws nothing"),
        (consistency, {"n": 0, "explain": saliency}, "n must"),
        (consistency, {"n": 65, "explain": saliency}, "at most the number of features"),
        (consistency, {"discretise": "rank", "explain": saliency}, "discretise must"),
        (consistency, {"discretise": lambda a: a[:2], "explain": saliency}, "one code row"),
    ]
    for metric, options, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            metric(model, x, y, **options)
    headless = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    with pytest.raises(InvalidInputError, match="no nn.Linear"):
        relative_representation_stability(headless, x, None, **good)

    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    odd = nn.Sequential(nn.Flatten(), nn.Linear(192, 3)).double()
    odd.add_module("pair", TupleOut())

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = odd

        def forward(self, x):
            return self.body[1](self.body[0](x)) + self.body.pair(x)[0].flatten(1)[:, :3]

    with pytest.raises(InvalidInputError, match="not a tensor"):
        relative_representation_stability(Head().double(), x, None, layer="body.pair", **good)
    with pytest.raises(InvalidInputError, match="got 2 maps|hold"):
        relative_input_stability(model, x, y, torch.zeros(2, 8, 8), **good)
