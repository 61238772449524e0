"""APOP: activation-pattern-only prediction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from small_models import build_model
from srdxai.errors import InvalidInputError
from srdxai.robustness import apop, apop_logits


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def test_the_pattern_of_the_input_itself_reproduces_the_output_exactly():
    m = build_model("ResNetLike", act="relu", seed=1)
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
    assert torch.equal(apop_logits(m, x, x), out)
    for act in ("gelu", "tanh", "elu"):  # any activation, with per-neuron gains
        m = build_model("PlainNet", act=act, seed=2)
        with torch.no_grad():
            out = m(x)
        torch.testing.assert_close(apop_logits(m, x, x, pattern="gain"), out)
        assert not torch.allclose(apop_logits(m, x, x, pattern="binary"), out)


def test_apop_equals_a_hand_written_replay_and_restores_the_model():
    m = _MLP().double().train()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        h1 = m.fc1(x.flatten(1))
        h2 = m.fc2(torch.relu(h1))
        zero = torch.zeros(4, 12, dtype=torch.float64)
        g1 = m.fc1(zero) * (h1 > 0)
        expected = m.fc3(m.fc2(g1) * (h2 > 0))
        predicted = m.eval()(x).argmax(1)
    m.train()
    torch.testing.assert_close(apop_logits(m, x, "zeros"), expected)
    result = apop(m, x, predicted, "zeros")
    assert torch.equal(result.apop_prediction, expected.argmax(1))
    assert torch.equal(result.recovered, expected.argmax(1) == predicted)
    assert result.correct.all()
    assert m.training and not any(mod._forward_hooks for mod in m.modules())


def test_baselines_and_errors():
    m = _MLP().double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    noise = apop_logits(m, x, "noise", seed=3)
    torch.testing.assert_close(noise, apop_logits(m, x, "noise", seed=3))
    assert not torch.allclose(noise, apop_logits(m, x, "noise", seed=4))
    torch.testing.assert_close(apop_logits(m, x, "other"), apop_logits(m, x, x.roll(1, 0)))
    with pytest.raises(InvalidInputError, match="pattern"):
        apop_logits(m, x, pattern="sign")
    with pytest.raises(InvalidInputError, match="baseline"):
        apop_logits(m, x, "ones")
    with pytest.raises(InvalidInputError, match="at least 2"):
        apop_logits(m, x[:1], "other")
    with pytest.raises(InvalidInputError, match="shape"):
        apop_logits(m, x, torch.zeros(1, 3, 2, 2, dtype=torch.float64))
