"""SRD and FullGrad remember, per model, whether it has attention or token mixing: later
calls on the same model take the right route without a probe or a failed PFV-engine pass, and
a model whose structure changed is probed again."""

from __future__ import annotations

import pytest
import torch

import srdxai
from srdxai.methods import srd as srd_module
from srdxai.methods import srd_tokens
from srdxai.models.zoo import small_vit


def _no_probe(*args, **kwargs):
    raise AssertionError("probed again")


def test_a_transformer_is_routed_to_token_vectors_without_a_second_attempt(monkeypatch):
    model = small_vit(num_classes=3, image_size=16).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    first = srdxai.explain(model, x, 1, "srd")

    def no_pfv(self, *args, **kwargs):
        raise AssertionError("the PFV engine ran on a known transformer")

    monkeypatch.setattr(srd_module.SRD, "_explain", no_pfv)
    monkeypatch.setattr(srd_tokens, "token_structure", _no_probe)
    torch.testing.assert_close(srdxai.explain(model, x, 1, "srd"), first)
    srdxai.explain(model, x, 1, "fullgrad")  # FullGrad shares what SRD found


def test_a_cnn_is_not_probed_and_a_changed_model_is():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    srdxai.explain(model, x, 0, "srd")
    assert srd_tokens.known_on_tokens(model, x) is False
    assert srd_tokens.known_on_tokens(model, x[:, :2]) is None  # another input shape
    model[1] = torch.nn.GELU()  # another structure: nothing known about it yet
    assert srd_tokens.known_on_tokens(model, x) is None


@pytest.mark.parametrize("method", ["srd", "fullgrad"])
def test_what_is_remembered_goes_with_the_model(method):
    import gc
    import weakref

    model = small_vit(num_classes=3, image_size=16).eval()
    x = torch.randn(1, 3, 16, 16)
    srdxai.explain(model, x, 0, method)
    assert srd_tokens.known_on_tokens(model, x) is True
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the memo holds the model weakly
