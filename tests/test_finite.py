"""Never a NaN map without a word: the model's output, a callable target's objective,
baselines and every method's map are checked (``NonFiniteError`` / ``InvalidInputError``
naming the samples and the likely cause)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from method_sets import VIT_ONLY, fast_options
from srdxai.errors import InvalidInputError, InvalidTargetError, NonFiniteError
from srdxai.methods import METHODS

FAST = fast_options(8)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def _data():
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.randn(3, 3, 8, 8)


@pytest.mark.parametrize("method", sorted(set(METHODS) - VIT_ONLY))
def test_inputs_that_overflow_inside_the_model_are_named(method):
    """Finite inputs whose logits overflow (float32) used to give NaN maps (a ViT at 1e20,
    absLRP at 1e36); now every method raises, naming the sample."""
    model, x = _data()
    x[1] = x[1].sign() * 3e38
    assert torch.isfinite(x).all() and not torch.isfinite(model(x)[1]).all()
    with pytest.raises(NonFiniteError, match=r"samples \[1\]"):
        srdxai.explain(model, x, 0, method, **FAST.get(method, {}))
    with pytest.raises(NonFiniteError, match=r"samples \[1\]"):  # chunks name them too
        srdxai.explain(model, x, 0, method, batch_size=1, **FAST.get(method, {}))


def test_a_callable_target_returning_nan_is_refused():
    model, x = _data()
    with pytest.raises(NonFiniteError, match="callable target returned NaN"):
        srdxai.explain(model, x, lambda out: out[:, 0] * float("nan"), "gradient_x_input")


@pytest.mark.parametrize("target, message", [
    (lambda out: out.argmax(1), "not floating point"),
    (lambda out: out[:, 0].detach(), "does not depend on the output"),
])
def test_a_callable_target_must_compute_from_the_output(target, message):
    model, x = _data()
    with pytest.raises(InvalidTargetError, match=message):
        srdxai.explain(model, x, target, "gradient_x_input")


@pytest.mark.parametrize("method", ["deeplift_rescale", "integrated_gradients", "occlusion"])
@pytest.mark.parametrize("baseline", [float("nan"), float("inf"), "tensor"])
def test_non_finite_baselines_are_refused(method, baseline):
    model, x = _data()
    if baseline == "tensor":
        baseline = torch.zeros(1, 3, 8, 8)
        baseline[0, 1, 2, 3] = float("nan")
    with pytest.raises(InvalidInputError, match="baseline"):
        srdxai.explain(model, x, 0, method, baseline=baseline, **FAST.get(method, {}))


def test_a_map_the_method_itself_makes_non_finite_is_refused():
    """The last check, in every method's batching (``Method._batched``): whatever the method
    computed, a map with NaN or Inf is not returned; the error names method and samples."""
    from srdxai.methods.base import Method

    class Broken(Method):
        name = "broken"

        def attribute(self, inputs, target=None):
            def one(x, t):
                m = x.sum(1)
                marked = (x[:, 0, 0, 0] == 12345.0).to(m.dtype)[:, None, None]
                return m / (1 - marked)  # Inf or NaN for the marked sample only

            return self._batched(inputs, target, one)

    model, x = _data()
    x[1, 0, 0, 0] = 12345.0
    with pytest.raises(NonFiniteError, match=r"method 'broken'.*samples \[1\]"):
        Broken(model).attribute(x, 0)
    with pytest.raises(NonFiniteError, match=r"samples \[1\]"):  # also across chunks
        Broken(model, batch_size=1).attribute(x, 0)
