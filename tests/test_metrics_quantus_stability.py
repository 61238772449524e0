"""Cross-checks of srdxai.metrics.stability against Quantus 0.6 on a tiny float64 CNN, and the
Quantus bugs documented in docs/metrics.md, each shown on Quantus itself.

As tests/test_metrics_quantus.py: float64 on both sides, so scores must agree to 1e-9
relative; the random metrics are fed Quantus' own noise, recorded from ``np.random.uniform``
during the Quantus call. The model flattens its last feature map into the linear head (a
global average pool made every input predict the same class, which would hide the
prediction-change handling).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from quantus_guard import PER_SAMPLE, RTOL, import_quantus
from srdxai.metrics import quantus_explain_func
from srdxai.metrics.stability import (
    consistency,
    continuity,
    relative_input_stability,
    relative_output_stability,
    relative_representation_stability,
)

quantus = import_quantus()
from quantus.functions.discretise_func import top_n_sign  # noqa: E402 - after the guard
from quantus.helpers.enums import ScoreDirection  # noqa: E402 - after the guard
from quantus.helpers.model.pytorch_model import PyTorchModel  # noqa: E402 - after the guard

STEPS = 6
#: symmetric noise U(-0.2, 0.2) (ours' default), under which some copies of some samples
#: change the predicted class
WIDE = {"lower_bound": -0.2, "upper_bound": 0.2}


class FlatCNN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3/2 -> ReLU -> flatten -> Linear(256 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def saliency(model, x, y):
    return srdxai.explain(model, x, y, "saliency")


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    model = FlatCNN().double().eval()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    assert len(set(y.tolist())) > 1
    return {"model": model, "x": x.numpy(), "y": y.numpy(), "a": saliency(model, x, y).numpy()}


@contextlib.contextmanager
def quantus_in_float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_default_dtype(default)


def quantus_call(metric, data, maps=None, **kwargs) -> np.ndarray:
    maps = data["a"] if maps is None else maps
    with quantus_in_float64():
        out = metric(model=data["model"], x_batch=data["x"], y_batch=data["y"],
                     a_batch=maps[:, None], **kwargs)
    return np.asarray(out, dtype=np.float64)


def assert_same(ours: torch.Tensor, theirs: np.ndarray, rtol: float = RTOL) -> None:
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=rtol, equal_nan=True)
    both = np.isfinite(theirs)
    if both.any():
        difference = np.max(np.abs(ours.numpy()[both] - theirs[both])
                            / np.maximum(np.abs(theirs[both]), 1e-300))
        print(f"max relative difference to Quantus: {difference:.3g}")  # shown with pytest -s


class Recorder:
    """Wrap ``np.random.uniform`` and keep what it returned."""

    def __init__(self, monkeypatch):
        self.real = np.random.uniform
        self.draws: list[np.ndarray] = []
        monkeypatch.setattr(np.random, "uniform", self)

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.draws.append(np.asarray(out))
        return out

    def noise(self, shape) -> np.ndarray:
        return np.stack(self.draws).reshape(len(self.draws), *shape)


def run_relative(monkeypatch, data, quantus_metric, seed: int, **quantus_options):
    recorder = Recorder(monkeypatch)
    np.random.seed(seed)
    theirs = quantus_call(
        quantus_metric(nr_samples=STEPS, disable_warnings=True, **quantus_options), data,
        explain_func=quantus_explain_func("saliency"))
    monkeypatch.undo()
    return theirs, recorder.noise(data["x"].shape)


OURS = {
    "RelativeInputStability": (relative_input_stability, {}, {}),
    "RelativeOutputStability": (relative_output_stability, {}, {}),
    # Quantus' default representation: every submodule's output, concatenated
    "RelativeRepresentationStability": (relative_representation_stability, {"layer": "all"},
                                        {}),
    "RRS[conv1]": (relative_representation_stability, {"layer": "conv1"},
                   {"layer_names": ["conv1"]}),
}


@pytest.mark.parametrize("name", sorted(OURS))
@pytest.mark.parametrize(("quantus_nan", "ours_mode"), [(False, "keep"), (True, "nan")])
def test_relative_stability_matches_quantus_with_its_draws(data, monkeypatch, name,
                                                           quantus_nan, ours_mode):
    metric, ours_options, quantus_options = OURS[name]
    quantus_metric = getattr(quantus, name.split("[")[0].replace("RRS",
                                                               "RelativeRepresentationStability"))
    theirs, draws = run_relative(monkeypatch, data, quantus_metric, seed=7,
                                 return_nan_when_prediction_changes=quantus_nan,
                                 perturb_func_kwargs=WIDE, **quantus_options)
    ours = metric(data["model"], data["x"], data["y"], data["a"], explain=saliency, draws=draws,
                  changed_prediction=ours_mode, **ours_options)
    assert_same(ours, theirs)
    if quantus_nan:  # the wide noise changes some predictions, not all
        assert 0 < np.isnan(theirs).sum() < len(theirs)


def test_relative_stability_with_quantus_default_noise(data, monkeypatch):
    theirs, draws = run_relative(monkeypatch, data, quantus.RelativeInputStability, seed=8)
    ours = relative_input_stability(data["model"], data["x"], data["y"], data["a"],
                                    explain=saliency, draws=draws, changed_prediction="nan")
    assert_same(ours, theirs)


# --- the documented differences, shown on Quantus -------------------------------------------

def test_quantus_returns_nan_where_the_paper_takes_the_max_over_kept_predictions(
        data, monkeypatch):
    """Agarwal et al. take the max over copies x' with the same prediction as x. Quantus'
    default (return_nan_when_prediction_changes=True) scores the whole sample NaN as soon as
    one copy changes it; ours (changed_prediction="skip") is the max over the others, i.e.
    Quantus' per-copy objective with the changed copies left out."""
    theirs_nan, draws = run_relative(monkeypatch, data, quantus.RelativeInputStability, seed=7,
                                     perturb_func_kwargs=WIDE)
    theirs_all, _ = run_relative(monkeypatch, data, quantus.RelativeInputStability, seed=7,
                                 perturb_func_kwargs=WIDE,
                                 return_nan_when_prediction_changes=False)
    ours = relative_input_stability(data["model"], data["x"], data["y"], data["a"],
                                    explain=saliency, draws=draws)
    hit = np.isnan(theirs_nan)
    assert hit.any() and np.isfinite(ours.numpy()).all()
    assert_same(ours[~torch.as_tensor(hit)], theirs_nan[~hit])
    # where Quantus gives NaN, ours is the max over fewer copies: never above Quantus' max
    assert (ours.numpy()[hit] <= theirs_all[hit] * (1 + 1e-12)).all()
    per_copy = []
    x = torch.as_tensor(data["x"])
    with torch.no_grad():
        clean = data["model"](x).argmax(1)
        for d in torch.as_tensor(draws):
            per_copy.append(data["model"](x + d).argmax(1) != clean)
    changed = torch.stack(per_copy)
    assert changed.any(0).numpy().tolist() == hit.tolist()
    assert not changed.all(0).any()


def test_quantus_does_not_floor_the_denominator(data, monkeypatch):
    """Quantus adds eps_min only to a denominator that is exactly 0; the paper divides by
    max(||.||, eps_min). With a head scaled by 1e-9 the logits move by ~1e-10: Quantus' ROS
    divides by that, ours by eps_min = 1e-6 (and equals Quantus when the floor is lowered)."""
    model = FlatCNN().double().eval()
    model.load_state_dict(data["model"].state_dict())
    with torch.no_grad():
        model.fc.weight.mul_(1e-9)
    quiet = dict(data, model=model)
    theirs, draws = run_relative(monkeypatch, quiet, quantus.RelativeOutputStability, seed=9)
    options = {"explain": saliency, "draws": draws, "changed_prediction": "nan"}
    ours = relative_output_stability(model, data["x"], data["y"], data["a"], **options)
    unfloored = relative_output_stability(model, data["x"], data["y"], data["a"],
                                          eps_min=1e-300, **options)
    assert_same(unfloored, theirs)
    assert (ours.numpy() < theirs / 100).all()


def test_quantus_default_noise_only_brightens(data, monkeypatch):
    """RelativeInputStability's perturb_func gets upper_bound=0.2 while lower_bound keeps
    batch_uniform_noise's default 0.02: every draw is U(0.02, 0.2), a one-sided shift, not
    the symmetric neighbourhood of the paper (ours: U(-0.2, 0.2))."""
    _, draws = run_relative(monkeypatch, data, quantus.RelativeInputStability, seed=3)
    assert draws.min() >= 0.02 and draws.max() <= 0.2


def test_quantus_reads_representations_after_an_in_place_relu():
    """Quantus' hook keeps ``module_out.cpu().numpy()``, which on the CPU shares memory with
    the module's output: a later ReLU(inplace=True) zeroes the negative values it captured.
    Ours copies the output in the hook."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        true_output = model[0](x).flatten(1).numpy()
    with quantus_in_float64():
        theirs = PyTorchModel(model, channel_first=True).get_hidden_representations(
            x.numpy(), layer_names=["0"])
    assert (true_output < 0).any()
    assert (theirs >= 0).all() and not np.allclose(theirs, true_output)
    np.testing.assert_array_equal(theirs, np.maximum(true_output, 0))


@pytest.mark.parametrize("steps", [28, 8, 5])
def test_continuity_matches_quantus(data, steps):
    """Quantus adds 1e-9 to every denominator (ours do not), hence 1e-9 and not better."""
    theirs = quantus_call(quantus.Continuity(nr_steps=steps, **PER_SAMPLE), data,
                          explain_func=quantus_explain_func("saliency"))
    ours = continuity(data["model"], data["x"], data["y"], data["a"], explain=saliency,
                      nr_steps=steps)
    assert_same(ours, theirs)
    assert np.isfinite(theirs).all() and len(set(np.round(theirs, 6))) > 1


def test_quantus_continuity_scores_the_untranslated_copy(data):
    """With nr_steps=8 on width 16 the shifts are -12, -8, ..., 16, including 0 (x' = x).
    Quantus scores it ||a(x) - a(x)||_1 / 1e-9: zero for a deterministic method, but ~1e9
    times any run-to-run difference of a stochastic one. Here the method adds 1e-8 per
    call; ours leaves x' = x out, as the definition (x' != x) requires."""
    calls = {"n": 0}

    def jittery(model, inputs, targets, **kwargs):
        calls["n"] += 1
        maps = quantus_explain_func("saliency")(model, inputs, targets, **kwargs)
        return maps + 1e-8 * calls["n"]

    def jittery_ours(model, x, y):
        return torch.as_tensor(jittery(model, x.numpy(), y.numpy()))

    theirs = quantus_call(quantus.Continuity(nr_steps=8, normalise=False, abs=False,
                                             disable_warnings=True), data, explain_func=jittery)
    calls["n"] = 0
    ours = continuity(data["model"], data["x"], data["y"], explain=jittery_ours, nr_steps=8,
                      normalise=None, abs=False)
    assert (theirs > 1e3).all()  # 256 pixels x k * 1e-8 / 1e-9
    assert (ours.numpy() < 10).all()


def test_quantus_continuity_ignores_its_baseline_and_breaks_on_some_step_counts(data):
    """Quantus 0.6 always pads with "black" (perturb_baseline is not used), raises an
    IndexError when nr_steps divides 2 * width + 1 (the last shift is width + 1), and cannot
    mark changed predictions under NumPy 2 (np.NaN)."""
    ef = quantus_explain_func("saliency")
    black = quantus_call(quantus.Continuity(nr_steps=8, **PER_SAMPLE), data, explain_func=ef)
    white = quantus_call(quantus.Continuity(nr_steps=8, perturb_baseline="white", **PER_SAMPLE),
                         data, explain_func=ef)
    np.testing.assert_array_equal(black, white)
    ours_white = continuity(data["model"], data["x"], data["y"], data["a"], explain=saliency,
                            nr_steps=8, baseline="white")
    assert not np.allclose(ours_white.numpy(), black)
    with pytest.raises(IndexError):
        quantus_call(quantus.Continuity(nr_steps=11, **PER_SAMPLE), data, explain_func=ef)
    assert torch.isfinite(continuity(data["model"], data["x"], data["y"], data["a"],
                                     explain=saliency, nr_steps=11)).all()
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        with pytest.raises(AttributeError, match="NaN"):
            quantus_call(quantus.Continuity(nr_steps=4, return_nan_when_prediction_changes=True,
                                            **PER_SAMPLE), data, explain_func=ef)


@pytest.mark.parametrize(("maps", "abs_", "n"), [("a", True, 5), ("signed", False, 1),
                                                 ("signed", False, 2)])
def test_consistency_matches_quantus_with_its_discretisation(data, maps, abs_, n):
    """Ours with discretise="first_n_sign" is Quantus' top_n_sign; Quantus scores a sample
    that shares its code with no other 0, ours NaN. Quantus adds 1e-9 to the number of
    samples sharing the code (k / (k + 1e-9)), hence the tolerance."""
    x, y = torch.as_tensor(data["x"]), torch.as_tensor(data["y"])
    chosen = (data["a"] if maps == "a" else
              srdxai.explain(data["model"], x, y, "gradient_x_input").numpy())
    theirs = quantus_call(quantus.Consistency(
        abs=abs_, discretise_func=functools.partial(top_n_sign, n=n), **PER_SAMPLE), data,
        maps=chosen)
    ours = consistency(data["model"], data["x"], data["y"], chosen, discretise="first_n_sign",
                       n=n, abs=abs_)
    alone = torch.isnan(ours).numpy()
    assert_same(ours[~torch.as_tensor(alone)], theirs[~alone], rtol=2e-9)
    assert (theirs[alone] == 0).all()
    assert (~alone).any()


def test_quantus_consistency_discretises_by_position_and_scores_lower_as_better(data):
    """Quantus' top_n_sign is sign(a)[:n]: the first n features, e.g. the top-left pixels of
    an image, however unimportant. Two maps that agree there share a code even if their most
    important features differ; ours compares the n most important features. And Quantus
    declares lower consistency as better (ScoreDirection.LOWER)."""
    first = np.zeros(16)
    first[:5] = 0.01
    second = first.copy()
    first[9], second[12] = 5.0, 5.0
    assert top_n_sign(first) == top_n_sign(second)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double().eval()
    maps = torch.as_tensor(np.stack([first, second])).view(2, 4, 4)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    ours_positional = consistency(model, x, None, maps, discretise="first_n_sign")
    assert ours_positional.tolist() == [1.0, 1.0]
    assert torch.isnan(consistency(model, x, None, maps)).all()  # top-5 sets differ
    assert quantus.Consistency.score_direction == ScoreDirection.LOWER
