"""A generated family of bad (and unusual but valid) calls over every registered method.

Each call must end in one of two ways: a typed srdxai error (``SrdxaiError``), or a finite map
of shape (N, H, W). Whatever happens, the model is unchanged (parameters, buffers, mode, hooks,
``requires_grad``) and so are the caller's tensors (input, target, baseline, and their
``.grad``). Variants marked valid must give a map; variants marked invalid must give an error.

The family: every method x (every input variant, every target variant, every option variant,
every model variant) on a small CNN, the same on a small ViT for fewer variants, plus seeded
random combinations of all four. About 2,000 calls on 8- and 16-pixel inputs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from method_sets import VIT_ONLY, fast_options
from srdxai.errors import SrdxaiError
from srdxai.methods import METHODS
from srdxai.methods.base import method_options
from srdxai.models.zoo import small_vit

METHOD_NAMES = sorted(METHODS)


# --- models -----------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = F.relu(self.conv2(h)) + h
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class EditsInput(SmallCNN):
    def forward(self, x):
        x.mul_(0.5)
        return super().forward(x)


class ReturnsTuple(SmallCNN):
    def forward(self, x):
        return super().forward(x), x.mean()


class ReturnsVector(SmallCNN):
    def forward(self, x):
        return super().forward(x)[:, 0]


def _cnn(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"plain": SmallCNN, "hooked": SmallCNN, "train_mode": SmallCNN,
             "edits_input": EditsInput, "returns_tuple": ReturnsTuple,
             "returns_vector": ReturnsVector}[kind]()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    if kind == "hooked":  # hooks that do nothing must change nothing
        model.fc.register_full_backward_hook(lambda *a: None)
        model.conv2.register_forward_hook(lambda *a: None)
        model.conv1.register_forward_pre_hook(lambda *a: None)
    if kind == "train_mode":
        model.train()
    return model


def _vit(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = small_vit(num_classes=3, image_size=16).eval()
    if kind == "hooked":
        model.head.register_full_backward_hook(lambda *a: None)
        model.blocks[0].register_forward_hook(lambda *a: None)
    if kind == "train_mode":
        model.train()
    return model


# what a model variant promises: a map equal to the plain model's (True), an error (False),
# either (None)
MODEL_VALID = {"plain": True, "hooked": True, "train_mode": None, "edits_input": True,
               "returns_tuple": False, "returns_vector": False}
VIT_MODELS = ("plain", "hooked", "train_mode")


# --- inputs -------------------------------------------------------------------------------------

def _inputs(kind: str, size: int) -> tuple[Any, bool | None]:
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    s = size
    table: dict[str, Callable[[], tuple[Any, bool | None]]] = {
        "normal": lambda: (randn(2, 3, s, s), True),
        "batch_of_one": lambda: (randn(1, 3, s, s), True),
        "zeros": lambda: (torch.zeros(2, 3, s, s), True),
        "tiny_values": lambda: (randn(2, 3, s, s) * 1e-30, None),
        "huge_values": lambda: (randn(2, 3, s, s) * 1e30, None),
        "non_contiguous": lambda: (randn(2, s, s, 3).permute(0, 3, 1, 2), True),
        "channels_last": lambda: (randn(2, 3, s, s).contiguous(
            memory_format=torch.channels_last), True),
        "expanded_batch": lambda: (randn(1, 3, s, s).expand(2, 3, s, s), True),
        "requires_grad": lambda: (randn(2, 3, s, s).requires_grad_(), True),
        "nan_entry": lambda: (randn(2, 3, s, s).index_put_(
            (torch.tensor([1]), torch.tensor([0]), torch.tensor([2]), torch.tensor([3])),
            torch.tensor(math.nan)), False),
        "inf_entry": lambda: (torch.where(torch.arange(s)[None, None, None] == 1,
                                          math.inf, randn(2, 3, s, s)), False),
        "no_batch_dim": lambda: (randn(3, s, s), False),
        "five_dims": lambda: (randn(1, 2, 3, s, s), False),
        "integer_dtype": lambda: (torch.randint(0, 255, (2, 3, s, s), generator=g), False),
        "float64_on_float32_model": lambda: (randn(2, 3, s, s).double(), False),
        "float16": lambda: (randn(2, 3, s, s).half(), False),
        "wrong_channels": lambda: (randn(2, 4, s, s), False),
        "empty_batch": lambda: (randn(0, 3, s, s), False),
        "numpy_array": lambda: (randn(2, 3, s, s).numpy(), False),
        "nested_list": lambda: (randn(1, 3, s, s).tolist(), False),
        "string": lambda: ("image.png", False),
        "none": lambda: (None, False),
    }
    return table[kind]()


INPUTS = ("normal", "batch_of_one", "zeros", "tiny_values", "huge_values", "non_contiguous",
          "channels_last", "expanded_batch", "requires_grad", "nan_entry", "inf_entry",
          "no_batch_dim", "five_dims", "integer_dtype", "float64_on_float32_model", "float16",
          "wrong_channels", "empty_batch", "numpy_array", "nested_list", "string", "none")
VIT_INPUTS = ("normal", "batch_of_one", "huge_values", "non_contiguous", "requires_grad",
              "nan_entry", "no_batch_dim", "wrong_channels", "empty_batch")


# --- targets ------------------------------------------------------------------------------------

def _nan_objective(out):
    return out[:, 0] * math.nan


TARGETS: dict[str, tuple[Callable[[], Any], bool | None]] = {
    "none": (lambda: None, True),
    "int": (lambda: 1, True),
    "numpy_int": (lambda: np.int64(2), True),
    "list": (lambda: [0, 2], True),
    "long_tensor": (lambda: torch.tensor([2, 0]), True),
    "callable": (lambda: (lambda out: out[:, 0] - out[:, 1]), True),
    "out_of_range": (lambda: 3, False),
    "negative": (lambda: -1, False),
    "one_in_a_list": (lambda: [0], True),  # a single class applies to every sample
    "too_many": (lambda: [0, 1, 2], False),
    "float": (lambda: 1.5, False),
    "float_tensor": (lambda: torch.tensor([0.5, 1.0]), False),
    "bool": (lambda: True, False),
    "string": (lambda: "cat", False),
    "nones": (lambda: [None, None], False),
    "column_tensor": (lambda: torch.tensor([[0], [1]]), True),  # (N, 1) as a loader gives
    "callable_nan": (lambda: _nan_objective, False),
    "callable_int": (lambda: (lambda out: out.argmax(1)), False),
    "callable_detached": (lambda: (lambda out: out[:, 0].detach()), False),
    "callable_wrong_length": (lambda: (lambda out: out[:, :2].flatten()), False),
}
VIT_TARGETS = ("none", "list", "callable", "out_of_range", "callable_nan", "nones")


# --- options -------------------------------------------------------------------------------------

OPTIONS: dict[str, tuple[dict, bool | None]] = {
    "defaults": ({}, True),
    "batch_size_1": ({"batch_size": 1}, True),
    "batch_size_0": ({"batch_size": 0}, False),
    "batch_size_float": ({"batch_size": 1.5}, False),
    "unknown_option": ({"no_such_option": 1}, False),
}


# --- the checks ---------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """Everything about a model and the caller's tensors that a call must leave as it was."""

    state: dict[str, bytes] = field(default_factory=dict)
    flags: list[tuple[str, bool, int, int, int]] = field(default_factory=list)
    grads: list[tuple[str, bool]] = field(default_factory=list)
    tensors: list[tuple[bytes, tuple, tuple, bool, bool]] = field(default_factory=list)

    @classmethod
    def take(cls, model: nn.Module, *caller: Any) -> Snapshot:
        snap = cls()
        for name, t in model.state_dict(keep_vars=True).items():
            snap.state[name] = t.detach().cpu().numpy().tobytes()
        for name, m in model.named_modules():
            snap.flags.append((name, m.training, len(m._forward_hooks),
                               len(m._forward_pre_hooks), len(m._backward_hooks)))
        for name, p in model.named_parameters():
            snap.grads.append((name, p.requires_grad))
            assert p.grad is None
        for t in caller:
            if isinstance(t, torch.Tensor):
                snap.tensors.append((t.detach().cpu().numpy().tobytes(), tuple(t.shape),
                                     t.stride(), t.requires_grad, t.grad is None))
            elif isinstance(t, np.ndarray):
                snap.tensors.append((t.tobytes(), t.shape, t.strides, False, True))
        return snap


def _call(model, x, target, method, options, size):
    opts = dict(fast_options(size).get(method, {}))
    opts.update(options)
    return srdxai.explain(model, x, target, method, **opts)


def _check_one(family: str, method: str, model_kind: str, input_kind: str, target_kind: str,
               option_kind: str) -> str:
    """Run one call and check it; returns 'map' or 'error' (for the summary)."""
    build = _vit if family == "vit" else _cnn
    size = 16 if family == "vit" else 8
    model = build(model_kind)
    x, x_valid = _inputs(input_kind, size)
    make_target, target_valid = TARGETS[target_kind]
    target = make_target()
    options, options_valid = OPTIONS[option_kind]
    before = Snapshot.take(model, x, target)
    label = f"{family}/{method}/{model_kind}/{input_kind}/{target_kind}/{option_kind}"
    try:
        result = _call(model, x, target, method, options, size)
    except SrdxaiError as error:
        outcome: Any = error
    except Exception as error:  # noqa: BLE001 - what the test is about
        pytest.fail(f"{label}: {type(error).__name__} from outside srdxai's errors: {error}")
    else:
        outcome = result
    after = Snapshot.take(model, x, target)
    assert after.state == before.state, f"{label}: the model's parameters or buffers changed"
    assert after.flags == before.flags, f"{label}: the model's mode or hooks changed"
    assert after.grads == before.grads, f"{label}: requires_grad of a parameter changed"
    assert after.tensors == before.tensors, f"{label}: the caller's tensors changed"

    refused = isinstance(outcome, SrdxaiError)
    if not refused:
        n = len(x)
        assert isinstance(outcome, torch.Tensor), label
        assert outcome.shape == (n, size, size), f"{label}: map of shape {outcome.shape}"
        assert torch.isfinite(outcome).all(), f"{label}: a non-finite map came back"
    validity = [x_valid, target_valid, options_valid, MODEL_VALID[model_kind]]
    if False in validity:
        assert refused, f"{label}: an invalid call returned a map instead of an error"
    elif all(v is True for v in validity) and _supported(family, method):
        assert not refused, f"{label}: a valid call was refused: {outcome}"
        if model_kind == "hooked":  # the same function: the same map as without hooks
            expected = _call(build("plain"), x, target, method, options, size)
            torch.testing.assert_close(outcome, expected, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{label}: {m}")
    return "error" if refused else "map"


def _supported(family: str, method: str) -> bool:
    """Methods that explain this family (the others refuse it, which the coverage suite
    checks)."""
    if family == "cnn":
        return method not in VIT_ONLY
    return method != "fullgrad"


def _cases() -> list[tuple[str, ...]]:
    cases = []
    for method in METHOD_NAMES:
        for i in INPUTS:
            cases.append(("cnn", method, "plain", i, "none", "defaults"))
        for t in TARGETS:
            cases.append(("cnn", method, "plain", "normal", t, "defaults"))
        for o in OPTIONS:
            cases.append(("cnn", method, "plain", "normal", "none", o))
        for m in MODEL_VALID:
            cases.append(("cnn", method, m, "normal", "none", "defaults"))
        for i in VIT_INPUTS:
            cases.append(("vit", method, "plain", i, "none", "defaults"))
        for t in VIT_TARGETS:
            cases.append(("vit", method, "plain", "normal", t, "defaults"))
        for m in VIT_MODELS:
            cases.append(("vit", method, m, "normal", "none", "defaults"))
    # seeded random combinations of everything
    rng = random.Random(2026)
    for _ in range(300):
        cases.append(("cnn", rng.choice(METHOD_NAMES), rng.choice(list(MODEL_VALID)),
                      rng.choice(INPUTS), rng.choice(list(TARGETS)), rng.choice(list(OPTIONS))))
    return list(dict.fromkeys(cases))


CASES = _cases()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_fuzz_every_method(method, one_thread):
    outcomes = {"map": 0, "error": 0}
    for case in CASES:
        if case[1] == method:
            outcomes[_check_one(*case)] += 1
    assert outcomes["map"] > 0 and outcomes["error"] > 0, outcomes


# --- every option of every method, given nonsense ----------------------------------------------

NONSENSE = (math.nan, math.inf, -1, 0, 2.5, -1e9, "bogus", None, [1], True)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_fuzz_every_option(method, one_thread):
    """Each option of the method's constructor given each value of NONSENSE: a typed srdxai
    error or a finite map, the model and the caller's tensors unchanged. (Sizes far beyond the
    memory, e.g. steps=10**9, are left out: they end in Python's MemoryError or torch's
    allocator error, which say what happened.)"""
    names = [o for o in method_options(METHODS[method]) if o != "batch_size"]
    assert names  # every method has at least channels_last
    for name in names:
        for value in NONSENSE:
            model = _cnn("plain")
            x, _ = _inputs("normal", 8)
            before = Snapshot.take(model, x)
            label = f"{method}({name}={value!r})"
            try:
                result = _call(model, x, None, method, {name: value}, 8)
            except SrdxaiError:
                pass
            except Exception as error:  # noqa: BLE001 - what the test is about
                pytest.fail(f"{label}: {type(error).__name__} from outside srdxai's errors: "
                            f"{error}")
            else:
                assert torch.isfinite(result).all(), f"{label}: a non-finite map came back"
            assert Snapshot.take(model, x) == before, f"{label}: the model or x changed"
