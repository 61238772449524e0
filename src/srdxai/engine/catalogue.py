"""The one catalogue of torch calls both tracers sort calls by (``graph.py``'s PFV recorder
and ``optrace.py``'s operation tracer): which calls are elementwise activations, which only
move values, which read a tensor without depending on its values; plus the pieces of tracing
both need (in-place aliasing, names of calls for error messages, the module-name stack, the
dropout and output checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError

Tensor = torch.Tensor

# --- the activation catalogue --------------------------------------------------------------

def hardtanh_out_of_place(x, min_val=-1.0, max_val=1.0, inplace=False):
    return F.hardtanh(x, min_val, max_val)


ACTIVATIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    Tensor.relu: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.silu: "silu",
    F.gelu: "gelu",
    F.mish: "mish",
    F.softplus: "softplus",
    torch.tanh: "tanh",
    Tensor.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    Tensor.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    torch.clamp: "clamp",
    Tensor.clamp: "clamp",
    torch.clip: "clamp",
    Tensor.clip: "clamp",
}
INPLACE_ACTIVATIONS: dict[Any, Any] = {
    torch.relu_: torch.relu,
    Tensor.relu_: torch.relu,
    F.relu_: torch.relu,
    torch.sigmoid_: torch.sigmoid,
    Tensor.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
    Tensor.tanh_: torch.tanh,
    F.leaky_relu_: F.leaky_relu,
    F.elu_: F.elu,
    F.hardtanh_: hardtanh_out_of_place,
}

# Calls that only move values (their plain gradient moves the backward signal the same way).
MOVING = {
    Tensor.view, Tensor.view_as, Tensor.reshape, Tensor.reshape_as, torch.reshape,
    torch.flatten, Tensor.flatten, Tensor.unflatten, torch.unflatten, Tensor.squeeze,
    torch.squeeze, Tensor.unsqueeze, torch.unsqueeze, Tensor.permute, torch.permute,
    Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes, Tensor.t, torch.t,
    Tensor.movedim, torch.movedim, Tensor.__getitem__, Tensor.select, torch.select,
    Tensor.narrow, torch.narrow, Tensor.index_select, torch.index_select, Tensor.expand,
    Tensor.expand_as, Tensor.repeat, torch.cat, torch.concat, torch.concatenate, torch.stack,
    Tensor.unbind, torch.unbind, Tensor.chunk, torch.chunk, Tensor.split, torch.split,
    Tensor.tensor_split, torch.tensor_split, Tensor.contiguous, Tensor.clone, torch.clone,
    Tensor.to, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.type_as,
    Tensor.flip, torch.flip, Tensor.roll, torch.roll, Tensor.requires_grad_,
    F.pixel_shuffle, F.pixel_unshuffle,
}
# Calls that read a traced tensor but return something that does not depend on its values.
CONSTANT = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
            torch.rand_like, torch.randn_like, Tensor.new_zeros, Tensor.new_ones,
            Tensor.new_empty, Tensor.new_full, Tensor.new_tensor}
DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
           F.feature_alpha_dropout}
SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax, F.log_softmax, torch.log_softmax,
           Tensor.log_softmax}


def dropout_in_training(func: Any, args: tuple, kwargs: dict) -> bool:
    """A dropout call that would drop values (``training=True``, its default)."""
    return bool(kwargs.get("training", args[2] if len(args) > 2 else True))


def func_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None)
    if owner is not None and owner.__name__ in ("TensorBase", "Tensor"):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module in ("torch", "torch._C._nn", "torch._C._VariableFunctions") or name in dir(torch):
        return f"torch.{name}"
    return name


def resolve_alias(aliases: dict[int, tuple[Tensor, Tensor]], obj: Any) -> Any:
    """What an in-place call that ran out of place turned ``obj`` into (``obj`` itself if
    nothing did). ``aliases`` maps id(old tensor) -> (old tensor, its replacement); the old
    tensor is held so that its id cannot be reused by an unrelated tensor."""
    while isinstance(obj, Tensor):
        entry = aliases.get(id(obj))
        if entry is None or entry[0] is not obj:
            return obj
        obj = entry[1]
    return obj


@contextlib.contextmanager
def module_names(
    model: nn.Module,
    on_output: Callable[[str, nn.Module, Any], None] | None = None,
) -> Iterator[list[tuple[str, nn.Module]]]:
    """While active, the yielded stack holds ``(qualified name, module)`` of every module whose
    forward is running, the innermost last; ``on_output(name, module, output)`` sees each
    module's output as it returns. The hooks are removed on exit, also after an exception."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[tuple[str, nn.Module]] = []

    def pre_hook(module, args):
        stack.append((names.get(module, "?"), module))

    def post_hook(module, args, output):
        name = stack.pop()[0] if stack else "?"
        if on_output is not None:
            on_output(name, module, output)

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def check_output(out: Any) -> Tensor:
    """The model output must be a (batch, classes) tensor of logits."""
    if not isinstance(out, Tensor):
        raise InvalidInputError(
            f"the model returned {type(out).__name__}; srdxai needs a tensor of logits.")
    if out.dim() != 2:
        raise InvalidInputError(
            f"the model output has shape {tuple(out.shape)}; srdxai expects (batch, "
            "classes) logits. Wrap the model so it returns them.")
    return out
