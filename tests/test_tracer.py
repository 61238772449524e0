"""The tracing core (``engine/tracer.py``): what both views of it (the PFV recorder behind SRD,
the LRP composites, the CAMs and the chain rule; the operation tracer behind absLRP, AttnLRP
and the token methods) get from it: in-place calls run out of place, in-place writes the
trace cannot see are refused, ``detach`` makes a constant, module names in errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from method_sets import VIT_ONLY, fast_options
from srdxai.engine.graph import Recorder
from srdxai.engine.optrace import OpTracer
from srdxai.engine.tracer import Tracer
from srdxai.errors import UnsupportedOperationError

# one method per view, and one rule family each
PFV_METHODS = ("srd", "lrp_epsilon", "guided_backprop")
OP_METHODS = ("abslrp", "attnlrp")


class Body(nn.Module):
    def __init__(self, write: str):
        super().__init__()
        self.write = write
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        h = F.gelu(self.conv1(x))  # (GELU's backward does not need h: autograd allows writes)
        if self.write == "setitem":
            h[:, 0] = 0.0
        elif self.write == "into_constant":
            buf = torch.zeros_like(h)
            buf[:, :3] = h[:, :3]
            h = buf
        elif self.write == "masked_fill_":
            h.masked_fill_(h > 1.0, 1.0)
        elif self.write == "constant_add_":
            c = torch.ones_like(h)
            c.add_(h)
            h = c
        return F.relu(self.conv2(h))


class Net(nn.Module):
    def __init__(self, write: str = "none"):
        super().__init__()
        self.body = Body(write)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_both_views_are_the_one_core():
    assert issubclass(Recorder, Tracer) and issubclass(OpTracer, Tracer)
    # neither view keeps its own tracking, aliasing or module stack
    for view in (Recorder, OpTracer):
        for name in ("__torch_function__", "resolve", "track", "entry_of", "run", "where"):
            assert name not in view.__dict__, (view.__name__, name)


@pytest.mark.parametrize("write", ["setitem", "into_constant", "masked_fill_",
                                   "constant_add_"])
@pytest.mark.parametrize("method", PFV_METHODS + OP_METHODS)
def test_in_place_writes_the_trace_cannot_see_are_refused(write, method):
    torch.manual_seed(0)
    model = Net(write).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedOperationError, match=r"in module 'body'"):
        srdxai.explain(model, x, method=method, target=1)
    # the plain gradient runs the model untraced: autograd sees every write
    assert torch.isfinite(srdxai.explain(model, x, method="gradient", target=1)).all()


class InplaceBlock(nn.Module):
    """In-place calls whose return values are ignored, also on a channels-last tensor."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dense = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.conv(x)
        if self.inplace:
            torch.relu_(h)
        else:
            h = torch.relu(h)
        t = self.dense(h.permute(0, 2, 3, 1))  # channels last
        if self.inplace:
            F.relu(t, inplace=True)
            t.mul_(self.scale)
            t += 0.5
        else:
            t = F.relu(t) * self.scale + 0.5
        h = t.permute(0, 3, 1, 2)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("method", PFV_METHODS + OP_METHODS)
def test_in_place_calls_give_the_out_of_place_map(method):
    torch.manual_seed(0)
    a = InplaceBlock(True).double().eval()
    b = InplaceBlock(False).double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    ma = srdxai.explain(a, x, method=method, target=2)
    mb = srdxai.explain(b, x, method=method, target=2)
    torch.testing.assert_close(ma, mb, rtol=1e-10, atol=1e-12)
    if method == "srd":  # conservation through the in-place channels-last block
        torch.testing.assert_close(ma.sum((1, 2)), a(x)[:, 2], rtol=1e-9, atol=1e-12)


class DetachedGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = h * torch.sigmoid(h).detach()  # the model declares the factor a constant
        return self.fc(h.mean((2, 3)))


def test_detach_makes_a_constant_in_both_views():
    torch.manual_seed(0)
    model = DetachedGate().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    logit = model(x)[:, 0].detach()
    srd = srdxai.explain(model, x, method="srd", target=0)
    torch.testing.assert_close(srd.sum((1, 2)), logit, rtol=1e-9, atol=1e-12)
    # attnlrp is the gradient here but for its identity rule on ReLU: x * grad sums to the
    # logit minus the biases' shares, and the detached factor is a constant weight for it
    grad = srdxai.explain(model, x, method="gradient_x_input", target=0)
    att = srdxai.explain(model, x, method="attnlrp", target=0)
    assert torch.isfinite(att).all() and torch.isfinite(grad).all()


FAST = fast_options(8)


def test_no_op_hooks_on_the_model_change_no_method():
    """A module's full backward hook runs ``view_as`` on its inputs and outputs inside the
    traced pass; it used to be an undecomposed op, so SRD's automatic seed fell back from the
    logit seed to Grad-CAM's (the map moved and no longer summed to the logit)."""
    from small_models import build_model
    from srdxai.methods import METHODS

    model = build_model("ResNetLike", act="relu", seed=0)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    plain = {m: srdxai.explain(model, x, 1, m, **FAST.get(m, {}))
             for m in sorted(METHODS) if m not in VIT_ONLY}
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    handles = [head.register_full_backward_hook(lambda *a: None),
               head.register_forward_hook(lambda *a: None),
               model.register_full_backward_hook(lambda *a: None)]
    try:
        for method, expected in plain.items():
            hooked = srdxai.explain(model, x, 1, method, **FAST.get(method, {}))
            torch.testing.assert_close(hooked, expected, rtol=1e-10, atol=1e-12, msg=method)
    finally:
        for h in handles:
            h.remove()


class _CustomReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype)


class _CustomActivationNet(nn.Module):
    def __init__(self, no_grad_block: bool = False):
        super().__init__()
        self.no_grad_block = no_grad_block
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        if self.no_grad_block:
            with torch.no_grad():
                h = h * 2.0 + torch.relu(h)
        else:
            h = _CustomReLU.apply(h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("no_grad_block", [False, True])
@pytest.mark.parametrize("method", PFV_METHODS + OP_METHODS + ("epsilon_lrp",
                                                               "deeplift_rescale"))
def test_activations_computed_with_autograd_off_are_refused(method, no_grad_block):
    """A ReLU written as a custom autograd Function (its own backward replaces the method's
    rule) or computed under torch.no_grad() used to be skipped silently: SRD, guided
    backprop, DeepLIFT and epsilon-LRP gave other maps than for nn.ReLU without a word."""
    torch.manual_seed(0)
    model = _CustomActivationNet(no_grad_block).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(UnsupportedOperationError, match="autograd off"):
        srdxai.explain(model, x, method=method, target=1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", PFV_METHODS + OP_METHODS)
def test_a_finished_trace_is_freed_without_the_garbage_collector(method, monkeypatch):
    """Reference counting alone frees the tracer and what it held: the tracer's weak
    references used to call back into it through a strong reference, a cycle that kept its
    in-place aliases (whole activations) until a full garbage collection; over consecutive
    absLRP calls on ResNet50 that piled up ~0.8 GB per call."""
    import gc
    import weakref

    made: list[weakref.ref] = []
    original = Tracer.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(Tracer, "__init__", recording_init)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    x = torch.randn(2, 3, 8, 8)
    gc.collect()
    gc.disable()
    try:
        srdxai.explain(model, x, 1, method)
        alive = [type(ref()).__name__ for ref in made if ref() is not None]
    finally:
        gc.enable()
    assert made, "no tracer ran"
    assert not alive, f"tracers alive after the call: {alive}"
