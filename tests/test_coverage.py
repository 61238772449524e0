"""Every registered method on timm classifiers of every family (random weights, small
inputs): a finite map of the input's size or the expected clear refusal, SRD conserving the
logit, the model and the caller's tensor unchanged. The README's coverage table is this suite
(``scripts/coverage_table.py``)."""

from __future__ import annotations

import gc
from contextlib import contextmanager

import pytest
import torch

import srdxai
from coverage_archs import ARCHS, EXPECTED_REFUSALS, build, inputs, run_cell, state
from srdxai.methods import METHODS

try:
    from _compat import import_torchvision

    import_torchvision()
    import timm  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("timm is not installed", allow_module_level=True)


@contextmanager
def garbage_collector_off():
    """Automatic garbage collection off: what a call creates stays in the youngest generation,
    so :func:`left_in_cycles` examines only that (a full collection per call would double the
    suite's time)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def left_in_cycles() -> int:
    """How many tensors made since the last call are in reference cycles, unreachable. Only a
    full garbage collection frees those, so their memory piles up over consecutive calls (an
    absLRP tracer did this, ~0.8 GB per ResNet50 call) and, where autograd's C++ graph closes
    the cycle, never."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect(0)
        return sum(isinstance(o, torch.Tensor) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _params(archs):
    return [pytest.param(a, id=a.name, marks=[pytest.mark.slow] if a.slow else [])
            for a in archs]


@pytest.mark.parametrize("arch", _params(ARCHS))
def test_every_method_maps_or_refuses_clearly(arch):
    model = build(arch)
    x = inputs(arch)
    x_before = x.clone()
    before = state(model)
    outcome, leaks = {}, {}
    with garbage_collector_off():
        left_in_cycles()
        for method in sorted(METHODS):
            cell = run_cell(model, x, method)
            outcome[method] = cell.status
            if n := left_in_cycles():
                leaks[method] = n
            if cell.status == "ok":
                m = cell.map
                assert m.shape == (2, arch.size, arch.size), (method, tuple(m.shape))
                assert torch.isfinite(m).all(), method
            assert torch.equal(x, x_before), f"{method} changed the caller's tensor"
    assert not leaks, f"tensors left in reference cycles, per method: {leaks}"
    after = state(model)
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    assert before[1:] == after[1:], "train flags or hooks changed"
    refused = {m for m, s in outcome.items() if s == "refused"}
    assert refused == EXPECTED_REFUSALS[arch.name], (
        f"newly refused: {sorted(refused - EXPECTED_REFUSALS[arch.name])}; "
        f"newly working: {sorted(EXPECTED_REFUSALS[arch.name] - refused)}")


@pytest.mark.parametrize("arch", _params([a for a in ARCHS
                                          if "srd" not in EXPECTED_REFUSALS[a.name]]))
def test_srd_conserves_the_logit_in_float64(arch):
    """Whatever the architecture, SRD's map sums to the target logit (float64, 1e-6
    relative), and seeding any intermediate layer with its own relevance gives the same map."""
    model = build(arch).double()
    x = inputs(arch).double()
    srd = srdxai.SRD(model, seed="logit")
    target = [1, 3]
    pixel = srd.attribute(x, target)
    logits = model(x)[torch.arange(2), torch.tensor(target)].detach()
    torch.testing.assert_close(pixel.sum((1, 2)), logits, rtol=1e-6,
                               atol=1e-6 * logits.abs().max().item())
