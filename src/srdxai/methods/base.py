"""The method interface and registry.

A method is a small class: it states its rule and its outputs; batching, input and target
checks and the model guard come from :class:`Method`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.catalogue import check_output
from ..engine.core import (
    Target,
    check_inputs,
    check_target_count,
    is_differentiable,
    keep_graph,
    model_guard,
    non_finite_output_error,
    non_finite_samples,
    slice_target,
    target_gradient,
)
from ..engine.optrace import OpRule, OpTrace
from ..errors import (
    InvalidInputError,
    NonFiniteError,
    SrdxaiError,
    UnknownMethodError,
    UnsupportedOperationError,
)
from . import options

Tensor = torch.Tensor

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method to the ``explain(method=NAME)`` registry."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise UnknownMethodError(
            f"method must be a method's name (a str), got {name!r}; available: "
            f"{', '.join(sorted(METHODS))}.")
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}.") from None


def method_options(cls: type[Method]) -> list[str]:
    """The keyword options a method's constructor accepts (besides the model), following
    ``**kwargs`` up to the base classes that receive them."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        forwards = False
        for p in inspect.signature(init).parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in (
                    "self", "model") and p.name not in names:
                names.append(p.name)
        if not forwards:
            break
    return names


def checked_reduction(channel_reduce: str | None, allowed: tuple[str, ...],
                      default: str = "sum") -> str:
    """A method's ``channel_reduce`` option, validated (None: ``default``)."""
    reduce = channel_reduce or default
    if reduce not in allowed:
        raise InvalidInputError(
            f"channel_reduce must be one of {allowed}, got {channel_reduce!r}.")
    return reduce


#: method families in the order comparison grids show them: decompositions of the forward pass
#: (SRD), relevance propagation (LRP, absLRP, AttnLRP), the modified chain rule (gradients,
#: integrated gradients, DeepLIFT), class activation maps, attention maps, perturbation
FAMILIES = ("decomposition", "relevance", "chain rule", "cam", "attention", "perturbation",
            "other")


def by_family(names: Sequence[str]) -> list[str]:
    """Registered method names sorted family by family (``FAMILIES``), then by name."""
    def key(name: str) -> tuple[int, str]:
        family = getattr(METHODS.get(name), "family", "other")
        return (FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), name)

    return sorted(names, key=key)


class Method:
    """Base of every attribution method: ``Method(model, **options).attribute(x, target)``."""

    name = "method"
    signed = True
    #: the family it belongs to (``FAMILIES``): comparison grids show methods family by family
    family = "other"
    #: the map can be made differentiable with respect to the input
    #: (``srdxai.engine.differentiable``); False: such a call raises a clear error
    differentiable = True
    #: the map's input gradient vanishes or is uninformative through ReLU (ReLU'' = 0): the
    #: manipulation attack smooths ReLUs into softplus for it (Dombrowski et al.)
    needs_smooth_activations = False

    def __init__(self, model: nn.Module, batch_size: int | None = None,
                 channels_last: bool | None = None):
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.batch_size = options.integer(batch_size, "batch_size", optional=True)
        self.channels_last = options.flag(channels_last, "channels_last", optional=True)

    def attribute(self, inputs: Tensor, target: Target = None) -> Tensor:
        raise NotImplementedError

    def _with_layout(self, x: Tensor, fn: Callable[[Tensor], Any]) -> Any:
        """Run ``fn`` on a fresh leaf copy of ``x`` that requires grad.

        4-D inputs are copied in channels-last layout by default: oneDNN runs convolutions
        about 20 % faster in it, and SRD's per-offset convolutions and channel norms about
        ten times faster. Values and results are identical up to float rounding. Models whose
        code depends on the layout (``.view`` on a 4-D activation) raise a RuntimeError in
        that layout; the call is then repeated in the ordinary layout
        (``channels_last=False`` skips the attempt).
        """
        want = self.channels_last if self.channels_last is not None else x.dim() == 4
        if want and x.dim() == 4:
            leaf = _leaf_copy(x, torch.channels_last)
            try:
                return fn(leaf)
            except RuntimeError as error:
                if self.channels_last or "view" not in str(error) and "stride" not in str(
                    error
                ):
                    raise
        return fn(_leaf_copy(x, torch.contiguous_format))

    @staticmethod
    def _grad(output: Tensor, inputs: Tensor | Sequence[Tensor], seed: Tensor | None,
              **kwargs: Any) -> tuple[Tensor | None, ...]:
        """``torch.autograd.grad``, keeping the graph of the result inside
        :func:`~srdxai.engine.core.differentiable` (``create_graph``)."""
        return torch.autograd.grad(output, inputs, seed, create_graph=is_differentiable(),
                                   **kwargs)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[nn.Module]:
        with model_guard(self.model) as m:
            yield m

    def _check(self, inputs: Tensor) -> Tensor:
        if is_differentiable() and not self.differentiable:
            raise UnsupportedOperationError(
                f"method '{self.name}' cannot give a map differentiable with respect to its "
                "input (srdxai.engine.differentiable); attack a gradient, LRP, SRD, absLRP or "
                "CAM method instead.")
        return check_inputs(inputs, self.model)

    def _target_gradient(self, out: Tensor, target: Target):
        return target_gradient(out, target)

    def _traced_gradients(self, leaf: Tensor, rule: OpRule,
                          seeds: Callable[[Tensor], list[Tensor]]) -> list[Tensor]:
        """Run the model on ``leaf`` under an operation-level ``rule`` (``engine/optrace.py``)
        and, for each backward seed ``seeds(output)`` gives, return what reaches ``leaf``
        (zeros where nothing does); the graph is kept between seeds."""
        with self._guard(), torch.enable_grad(), OpTrace(self.model, leaf, rule) as trace:
            out = trace.forward()
            seed_list = seeds(out)
            grads = []
            for i, seed in enumerate(seed_list):
                (g,) = self._grad(out, leaf, seed, allow_unused=True,
                                  retain_graph=i + 1 < len(seed_list) or is_differentiable())
                grads.append(torch.zeros_like(leaf) if g is None else keep_graph(g))
            del out
        return grads

    def _batched(
        self, inputs: Tensor, target: Target, fn: Callable[[Tensor, Target], Tensor]
    ) -> Tensor:
        """Run ``fn`` over chunks of at most ``batch_size`` samples and concatenate."""
        if torch.is_inference_mode_enabled():
            # every method needs autograd (or at least ordinary tensors): run outside the
            # caller's inference mode, on an ordinary copy of an inference tensor
            with torch.inference_mode(False):
                if isinstance(inputs, Tensor) and inputs.is_inference():
                    inputs = inputs.clone()
                return self._batched(inputs, target, fn)
        x = self._check(inputs)
        n = x.shape[0]
        check_target_count(target, n)  # before the batch is cut into chunks
        step = self.batch_size or n
        parts = []
        for i in range(0, n, step):
            try:
                parts.append(fn(x[i:i + step], slice_target(target, i, i + step)))
            except NonFiniteError as error:
                rows = getattr(error, "samples", None)
                if rows is None or i == 0:
                    raise
                # the model's output checked on this chunk: name the caller's samples
                raise non_finite_output_error([i + r for r in rows],
                                              getattr(error, "where", "")) from None
            except SrdxaiError:
                raise
            except (MemoryError, torch.OutOfMemoryError):
                raise
            except Exception as error:
                self._blame_the_input(x[i:i + step], error)
                raise
        result = parts[0] if len(parts) == 1 else torch.cat(parts)
        check_finite_map(result, self.name)
        return result


    def _blame_the_input(self, x: Tensor, error: Exception) -> None:
        """After an exception from outside srdxai (torch's, the model's own): if the model
        cannot run on this input by itself (a plain forward of one sample without autograd,
        the model's state guarded), or returns something other than logits, raise a clear
        :class:`InvalidInputError` saying so, the original exception chained. Otherwise the
        failure is the method's: return, and the caller re-raises the original unchanged.
        Costs nothing unless something already failed."""
        try:
            with model_guard(self.model), torch.no_grad():
                out = self.model(x[:1].clone())
        except SrdxaiError:
            raise
        except Exception as plain:
            raise InvalidInputError(
                f"the model fails by itself (without srdxai) on x of shape {tuple(x.shape)} "
                f"({x.dtype}): {type(plain).__name__}: {plain}. If x is not the input it "
                "expects, pass (N, C, H, W) with a batch dimension, its number of channels "
                "and an image size it accepts; otherwise the error is in the model (the "
                "original exception is chained).") from plain
        check_output(out)  # a tuple or 1-D output: the typed error for that


def check_finite_map(result: Tensor, method: str) -> None:
    """A map with NaN or Inf is never returned: raise naming the samples. (The model's output
    and a callable target's objective are checked where they are read, with their own
    causes, so what reaches here is the method's own arithmetic.)"""
    samples = non_finite_samples(result)
    if samples:
        raise NonFiniteError(
            f"method '{method}' gave a map with NaN or Inf for samples {samples[:20]}"
            f"{' ...' if len(samples) > 20 else ''}: its arithmetic overflowed (values beyond "
            "the dtype's range: try float64 inputs and model, or a smaller input scale) or a "
            "NaN option reached it (a baseline, a noise level).")


def _leaf_copy(x: Tensor, layout: torch.memory_format) -> Tensor:
    """A copy of ``x`` in ``layout`` that requires grad: a fresh leaf, or, inside
    :func:`~srdxai.engine.core.differentiable` when ``x`` requires grad, a differentiable copy
    (so the map's graph leads back to the caller's ``x``)."""
    if is_differentiable() and x.requires_grad:
        return x.clone(memory_format=layout)
    return x.detach().clone(memory_format=layout).requires_grad_(True)
