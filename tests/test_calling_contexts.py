"""Unusual calling contexts: every method under ``torch.inference_mode()`` and on a model that
edits its input in place (the caller's tensor never changes, the map is that of the
out-of-place model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from method_sets import CNN_METHODS, fast_options

FAST = fast_options(8)


class EditsItsInput(nn.Module):
    def __init__(self, in_place: bool = True):
        super().__init__()
        self.in_place = in_place
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if self.in_place:
            x.mul_(2.0)
            x.add_(0.5)
        else:
            x = x * 2.0 + 0.5
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("method", CNN_METHODS)
def test_a_model_that_edits_its_input_in_place(method):
    """IG, SmoothGrad, occlusion and the plain gradients used to hand the caller's tensor (or
    a leaf that requires grad) to the model: the caller's x changed, or torch failed with
    'a leaf Variable that requires grad is being used in an in-place operation'."""
    torch.manual_seed(0)
    editing = EditsItsInput(True).double().eval()
    plain = EditsItsInput(False).double().eval()
    plain.load_state_dict(editing.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = x.clone()
    ours = srdxai.explain(editing, x, 1, method, **FAST.get(method, {}))
    assert torch.equal(x, before), "the caller's tensor changed"
    expected = srdxai.explain(plain, x, 1, method, **FAST.get(method, {}))
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", CNN_METHODS)
def test_every_method_runs_under_inference_mode(method):
    """Under the caller's torch.inference_mode() 22 of 25 methods used to fail deep inside
    torch; the methods now run outside it, on an ordinary copy of the inputs."""
    torch.manual_seed(0)
    model = EditsItsInput(False).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = srdxai.explain(model, x, 1, method, **FAST.get(method, {}))
    with torch.inference_mode():
        xi = x.clone()
        ours = srdxai.explain(model, xi, 1, method, **FAST.get(method, {}))
    torch.testing.assert_close(ours, expected)


class _Detaches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).detach().mean((2, 3)))


@pytest.mark.parametrize("method", CNN_METHODS)
def test_a_forward_that_detaches_is_a_clear_error(method):
    """The plain-gradient methods used to fail with torch's 'element 0 of tensors does not
    require grad'; occlusion needs no gradient and still explains the model."""
    torch.manual_seed(0)
    model = _Detaches().eval()
    x = torch.randn(2, 3, 8, 8)
    if method == "occlusion":
        assert torch.isfinite(srdxai.explain(model, x, 0, method, **FAST["occlusion"])).all()
        return
    with pytest.raises(srdxai.SrdxaiError, match="does not depend on the input"):
        srdxai.explain(model, x, 0, method, **FAST.get(method, {}))


@pytest.mark.parametrize("method", CNN_METHODS)
def test_torchscript_models(method):
    """A scripted model runs compiled code the tracer cannot see: the traced methods say so
    (they used to fail with 'register_forward_pre_hook is not supported on ScriptModules');
    the methods that need no tracing give the eager model's map."""
    torch.manual_seed(0)
    eager = EditsItsInput(False).eval()
    scripted = torch.jit.script(eager)
    x = torch.randn(2, 3, 8, 8)
    try:
        expected = srdxai.explain(eager, x, 1, method, **FAST.get(method, {}))
        ours = srdxai.explain(scripted, x, 1, method, **FAST.get(method, {}))
    except srdxai.SrdxaiError as error:
        assert "TorchScript" in str(error), str(error)
        assert method not in {"gradient", "saliency", "gradient_x_input",
                              "integrated_gradients", "smoothgrad", "occlusion"}
        return
    torch.testing.assert_close(ours, expected)


class _Outputs(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc(F.relu(self.conv(x)).mean((2, 3)))
        return (out, out) if self.mode == "tuple" else out[:, 0] if self.mode == "1d" else out


BAD_CALLS = {  # name: (model mode, input, target), each a clear srdxai error for every method
    "tuple output": ("tuple", lambda: torch.randn(2, 3, 8, 8), 0),
    "1-D logits": ("1d", lambda: torch.randn(2, 3, 8, 8), 0),
    "None targets": ("", lambda: torch.randn(3, 3, 8, 8), [None] * 3),
    "zero-size input": ("", lambda: torch.randn(2, 3, 0, 8), 0),
    "meta input": ("", lambda: torch.randn(2, 3, 8, 8, device="meta"), 0),
    "sparse input": ("", lambda: torch.randn(2, 3, 8, 8).to_sparse(), 0),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_calls_are_clear_errors_for_every_method(case):
    """They used to end in torch's own errors ('Could not infer dtype of NoneType', 'Tensor.
    item() cannot be called on meta tensors', "'tuple' object has no attribute 'shape'" in
    occlusion, ...)."""
    mode, make, target = BAD_CALLS[case]
    torch.manual_seed(0)
    model = _Outputs(mode).eval()
    for method in CNN_METHODS:
        with pytest.raises(srdxai.SrdxaiError):
            srdxai.explain(model, make(), target, method, **FAST.get(method, {}))
