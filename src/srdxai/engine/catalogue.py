"""The one catalogue of torch calls the tracing core (``tracer.py``) and its two views
(``graph.py``'s PFV decomposition, ``optrace.py``'s operation records) sort calls by: which
calls are elementwise activations, which run in place and what their out-of-place form is,
which only move values, which read a tensor without depending on its values; plus the
pieces of tracing they need (names of calls for error messages, the module-name stack, the
dropout and output checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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
    hardtanh_out_of_place: "hardtanh",  # what ``F.hardtanh_`` runs as
    # a power with a number for exponent (StarReLU's ``relu(x) ** 2`` in the MetaFormers);
    # a tensor exponent is no activation (:func:`number_exponent`)
    torch.pow: "pow",
    Tensor.pow: "pow",
    Tensor.__pow__: "pow",
    torch.square: "square",
    Tensor.square: "square",
}


#: activations whose output is a gate whatever the other factor of a product is
GATE_ACTIVATIONS = {"sigmoid", "hardsigmoid"}


def gate_factor(made: Sequence[str | None], of_other: Sequence[bool]) -> int | None:
    """Which of two equally shaped factors of a product is a gate (docs/srd.md), from the
    activation whose output each is (``made``, None: not an activation's output) and whether
    each is that activation applied to the other factor (``of_other``): the sigmoid's
    (hard-sigmoid's) if only one is (``z * sigmoid(z)`` too); else the other activation's
    output if only one is and it is not of the other factor (GLU variants: SwiGLU's
    ``silu(x W) * (x V)``, StarNet's ``relu6(a) * b``; ``h * relu(h)`` is a square, not a
    gate); None otherwise. Both views of the engine decide by it."""
    sigmoid = [m in GATE_ACTIVATIONS for m in made]
    if sigmoid[0] != sigmoid[1]:
        return 0 if sigmoid[0] else 1
    if (made[0] is None) == (made[1] is None):
        return None
    gate = 0 if made[0] is not None else 1
    return None if of_other[gate] else gate


def number_exponent(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call of the activation catalogue is one: anything but a power, or a power of
    the traced tensor with a number for exponent (not ``2 ** x`` or ``x ** y``)."""
    if ACTIVATIONS.get(func) != "pow":
        return True
    exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
    return (len(args) > 0 and isinstance(args[0], Tensor)
            and isinstance(exponent, int | float) and not isinstance(exponent, bool))


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
    Tensor.clamp_: torch.clamp,
    torch.clamp_: torch.clamp,
    Tensor.clip_: torch.clamp,
    torch.clip_: torch.clamp,
}

# In-place arithmetic and its out-of-place form (the tracer runs the latter and makes the old
# tensor an alias of the result).
INPLACE_ARITHMETIC: dict[Any, Any] = {
    Tensor.add_: Tensor.add, Tensor.__iadd__: Tensor.add,
    Tensor.sub_: Tensor.sub, Tensor.__isub__: Tensor.sub,
    Tensor.mul_: Tensor.mul, Tensor.__imul__: Tensor.mul,
    Tensor.div_: Tensor.div, Tensor.__itruediv__: Tensor.div,
}


AUGMENTED_ASSIGNMENTS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                         "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__",
                         "__ixor__", "__ilshift__", "__irshift__"}


def out_of_place(func: Any, kwargs: dict) -> tuple[Any, dict] | None:
    """``(function, kwargs)`` that computes what the in-place call ``func`` writes, or None
    when ``func`` is not one of the in-place calls the tracers run out of place."""
    if func in INPLACE_ARITHMETIC:
        return INPLACE_ARITHMETIC[func], kwargs
    if func in INPLACE_ACTIVATIONS:
        return INPLACE_ACTIVATIONS[func], kwargs
    if func in ACTIVATIONS and kwargs.get("inplace"):
        return func, {**kwargs, "inplace": False}
    return None


def writes_in_place(func: Any) -> bool:
    """An in-place call with no out-of-place form in the catalogue (``x[i] = v``,
    ``masked_fill_``, ``copy_``, ``**=``): its write would not be recorded."""
    if func in MOVING or func in CONSTANT:
        return False  # ``requires_grad_`` changes no value
    name = getattr(func, "__name__", "") or ""
    if name == "__setitem__":
        return True
    if name in AUGMENTED_ASSIGNMENTS:
        return True  # __ipow__, __iand__, ... (``+=`` and friends are in the catalogue)
    return name.endswith("_") and not name.startswith("_")


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
    # copies of entries: sliding windows (HaloNet's and VOLO's neighbourhoods, TNT's pixel
    # patches; ``F.unfold``'s padded entries are zeros), repeats, gathers by index (GCViT)
    Tensor.unfold, F.unfold, Tensor.repeat_interleave, torch.repeat_interleave, Tensor.tile,
    torch.tile, Tensor.gather, torch.gather, Tensor.take_along_dim, torch.take_along_dim,
    # out of place, with a constant mask: the kept entries move, the filled ones become
    # constants (DistilBERT's attention masking); the gradient is zero there
    Tensor.masked_fill, torch.masked_fill,
}


def unfold_filled(args: tuple, kwargs: dict, fill: Any) -> Tensor:
    """``F.unfold(*args, **kwargs)`` with its padded entries set to ``fill`` instead of 0:
    True in a mask of constant entries, NaN in position tags (a padded entry has no place)."""
    names = ("input", "kernel_size", "dilation", "padding", "stride")
    bound = dict(zip(names, args, strict=False)) | kwargs
    pad = bound.pop("padding", 0)
    rows, cols = (pad, pad) if isinstance(pad, int) else tuple(pad)
    x = F.pad(bound.pop("input"), (cols, cols, rows, rows), value=fill)
    return F.unfold(x, padding=0, **bound)


# Calls that read a traced tensor but return something that does not depend on its values.
CONSTANT = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
            torch.rand_like, torch.randn_like, Tensor.new_zeros, Tensor.new_ones,
            Tensor.new_empty, Tensor.new_full, Tensor.new_tensor}
# What the tracer never tracks: value-free calls, and ``detach`` (the model itself declares the
# result a constant: no backward signal, hence no relevance, flows through it).
UNTRACKED = CONSTANT | {Tensor.detach, torch.detach}
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
