"""The tracing core: one recorder of a model's forward pass that every method runs on.

:class:`Tracer` is a ``TorchFunctionMode``: while a model runs under it, every torch call is
seen here first. The core does what every method needs, once:

* **tracking**: which tensors depend on the explained input (weak references, so the trace
  holds no memory beyond autograd's), each with what the view attached to it;
* **in-place calls**: the ones in the catalogue (``relu_``, ``inplace=True``, ``+=``) run out
  of place and the old tensor becomes an alias of the result, so code that ignores the return
  value still sees the right value; any other write into a tracked tensor (``x[i] = v``,
  ``masked_fill_``, ``copy_``) is refused, since the trace would not see it;
* **module names**: the stack of modules whose forward is running, for layer names and
  error messages;
* **checks**: value-free calls (``zeros_like``), ``detach`` and calls on untracked tensors
  run untouched; the output must be a ``(batch, classes)`` tensor that depends on the input.

What a call *means* is the view's business (:meth:`Tracer.handle`): the PFV view
(``graph.py``'s :class:`~srdxai.engine.graph.Recorder`) decomposes linear operations into the
components SRD's bias split needs; the operation view (``optrace.py``'s
:class:`~srdxai.engine.optrace.OpTracer`) records every computing call with a recipe to run
it again, which the LRP family's rules need. Both sort calls by the one catalogue
(``catalogue.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import UnsupportedOperationError
from .catalogue import (
    MOVING,
    UNTRACKED,
    check_output,
    func_name,
    module_names,
    out_of_place,
    resolve_alias,
    writes_in_place,
)
from .recurrent import recurrent_kind, unrolled

Tensor = torch.Tensor


def module_label(name: str, module: nn.Module) -> str:
    """How a module is named where a call ran (``OpCall.name``, ``LinearOp.name``, errors):
    its qualified name, or for the top-level model its class."""
    return name or f"{type(module).__name__} (the model's own forward)"


class Tracer(TorchFunctionMode):
    """The tracing core (see the module docstring); a view subclasses it and implements
    :meth:`handle` (what a call on tracked tensors does) and :meth:`unsupported` (its error)."""

    def __init__(self) -> None:
        super().__init__()
        # id(tensor) -> (weak reference to it, what the view attached to it: a graph node,
        # or True)
        self.tracked: dict[int, tuple[weakref.ref, Any]] = {}
        # id(old tensor) -> (old tensor, its replacement); the old one is held so that its id
        # cannot be reused by an unrelated tensor
        self.aliases: dict[int, tuple[Tensor, Tensor]] = {}
        self.module_stack: list[tuple[str, nn.Module]] = []
        self.verb = "trace"  # in errors: "The engine cannot <verb> <what>"
        # whether the pass started with autograd on (a pass run under no_grad on purpose,
        # Ablation-CAM's, is not the model turning it off)
        self.grad_at_start = False

    # -- tracking ----------------------------------------------------------------------------
    def track(self, tensor: Tensor, entry: Any = True) -> None:
        """Mark ``tensor`` as depending on the input, with ``entry`` attached to it. Only a
        weak reference is held: the entry goes away with the tensor."""
        key = id(tensor)
        # the callback reaches the tracer through a weak reference too: a strong one makes a
        # cycle (tracer -> entry -> weakref -> callback -> tracer) that keeps the tracer, its
        # aliases and everything they hold alive until a full garbage collection, which on
        # a ResNet50 batch of 8 piled up ~0.8 GB per call and page-faulted every call
        tracer = weakref.ref(self)

        def forget(ref: weakref.ref, key: int = key) -> None:
            me = tracer()
            item = None if me is None else me.tracked.get(key)
            if item is not None and item[0] is ref:
                del me.tracked[key]

        self.tracked[key] = (weakref.ref(tensor, forget), entry)

    def entry_of(self, obj: Any) -> Any:
        """What the view attached to ``obj`` (None if ``obj`` is not a tracked tensor)."""
        if not isinstance(obj, Tensor):
            return None
        item = self.tracked.get(id(obj))
        if item is None or item[0]() is not obj:
            return None
        return item[1]

    def is_tracked(self, obj: Any) -> bool:
        return self.entry_of(obj) is not None

    def resolve(self, obj: Any) -> Any:
        """What ``obj`` became through in-place calls that ran out of place."""
        return resolve_alias(self.aliases, obj)

    def forget_all(self) -> None:
        """Drop every entry and alias (after the pass: breaks reference cycles)."""
        self.tracked.clear()
        self.aliases.clear()

    # -- module names ------------------------------------------------------------------------
    @property
    def where(self) -> str:
        """The qualified name of the innermost module running (for names and errors)."""
        if not self.module_stack:
            return "<outside any module>"
        return module_label(*self.module_stack[-1])

    # -- the mode ----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args = tree_map(self.resolve, args)
        kwargs = tree_map(self.resolve, kwargs)
        flat, _ = tree_flatten((args, kwargs))
        tracked = [t for t in flat if self.is_tracked(t)]
        if not tracked or func in UNTRACKED:
            return func(*args, **kwargs)
        replaced = out_of_place(func, kwargs)
        if replaced is not None:
            if not self.is_tracked(args[0]):
                # ``c.add_(x)``: the tracked value would be written into an untracked tensor
                raise self.unsupported(
                    f"'{func_name(func)}' writing an input-dependent value into a tensor "
                    "that does not depend on the input", fatal=True)
            out = self.handle(replaced[0], args, replaced[1], tracked)
            self.aliases[id(args[0])] = (args[0], out)
            return out
        if (self.grad_at_start and not torch.is_grad_enabled() and func not in MOVING
                and getattr(func, "__name__", "") != "__get__"
                and any(t.requires_grad for t in tracked)):
            # model code computing on input-dependent tensors with autograd off: the body of
            # a custom torch.autograd.Function (whose own backward replaces the method's rule)
            # or a torch.no_grad() block; either way the rule would be skipped there
            raise self.unsupported(
                f"'{func_name(func)}' computed with autograd off (inside a custom "
                "torch.autograd.Function or a torch.no_grad() block in the model)",
                "The method's rule cannot act there. Write the operation with standard torch "
                "calls (e.g. torch.relu instead of a custom Function), or use a method that "
                "needs no rule (occlusion).", fatal=True)
        if writes_in_place(func):
            raise self.unsupported(
                f"the in-place write '{func_name(func)}' involving an input-dependent tensor",
                "The trace cannot see what it writes. Write the model out of place (e.g. "
                "torch.cat or torch.where instead of index assignment).", fatal=True)
        if func in (torch.addcmul, Tensor.addcmul):
            return self._addcmul(args, kwargs)
        kind = recurrent_kind(func)
        if kind is not None:  # nn.LSTM / nn.GRU / nn.RNN: their cell equations, step by step
            return unrolled(kind, args, kwargs, self._call, self.unsupported)
        return self.handle(func, args, kwargs, tracked)

    def _call(self, func: Any, *args: Any) -> Any:
        """``func(*args)`` as a call of the traced model (recorded by the view)."""
        return self.__torch_function__(func, (), args)

    def _addcmul(self, args: tuple, kwargs: dict) -> Any:
        """``torch.addcmul(input, t1, t2, value=v)`` as the calls ``input + v * (t1 * t2)``,
        each a call of its own for both views (ResMLP's affine layer ``addcmul(beta, alpha,
        x)``: a scale and a shift per channel; ConvNeXtV2's global response normalisation)."""
        names = ("input", "tensor1", "tensor2")
        bound = dict(zip(names, args, strict=False)) | kwargs
        product = self.__torch_function__(Tensor.__mul__, (), (bound["tensor1"],
                                                               bound["tensor2"]))
        value = bound.get("value", 1)
        if value != 1:
            product = self.__torch_function__(Tensor.__mul__, (), (product, value))
        return self.__torch_function__(Tensor.__add__, (), (bound["input"], product))

    def handle(self, func, args: tuple, kwargs: dict, tracked: list[Tensor]) -> Any:
        """Run ``func`` on arguments of which ``tracked`` depend on the input (in-place
        calls already replaced by their out-of-place form) and track what depends on it."""
        raise NotImplementedError

    def unsupported(self, what: str, advice: str = "", fatal: bool = False,
                    moves_values: bool = False) -> UnsupportedOperationError:
        """The error for a call the view cannot handle. ``fatal``: the call cannot even run
        untraced (an in-place write), so a view must not fall back to running it."""
        msg = f"The engine cannot {self.verb} {what} (in module '{self.where}')."
        if advice:
            msg += " " + advice
        error = UnsupportedOperationError(msg)
        error.fatal = fatal  # type: ignore[attr-defined]
        error.moves_values = moves_values  # type: ignore[attr-defined]
        return error

    # -- a pass ------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: Tensor,
            on_output: Callable[[str, nn.Module, Any], None] | None = None) -> Tensor:
        """``model(x)`` under this tracer with module names (hooks removed afterwards);
        ``on_output(name, module, output)`` sees each module's output. Returns the output,
        checked: ``(batch, classes)`` and dependent on ``x`` through traced calls."""
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedOperationError(
                "this is a TorchScript model: its compiled code runs without the torch calls "
                "the engine traces. Pass the original torch.nn.Module, or use a method that "
                "needs no tracing (gradient, saliency, gradient_x_input, integrated_gradients, "
                "smoothgrad, occlusion).")
        if not self.is_tracked(x):
            self.track(x, self.input_entry(x))
        self.grad_at_start = torch.is_grad_enabled()
        with module_names(model, on_output) as stack:
            self.module_stack = stack
            try:
                with self:
                    out = model(x)
            finally:
                self.module_stack = []
        out = self.resolve(check_output(out))
        if not self.is_tracked(out):
            raise UnsupportedOperationError(
                "the model output does not depend on the input through calls the engine "
                "traced (was the input detached or converted to numpy inside the model?).")
        return out

    def input_entry(self, x: Tensor) -> Any:
        """What the view attaches to the explained input."""
        return True
