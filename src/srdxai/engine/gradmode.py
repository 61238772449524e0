"""Whether code in a backward pass is building a differentiable map.

A backward pass run with ``create_graph=True`` (``srdxai.engine.differentiable``) has grad
mode on; an ordinary one has it off. Rules whose backward would take shortcuts that break
the graph (detached leaves, in-place steps on saved tensors, ``out=``) ask this first.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch


def building_graph(*tensors: torch.Tensor) -> bool:
    """Grad mode is on and one of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --- differentiable maps ---------------------------------------------------------------------

_DIFFERENTIABLE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "srdxai_differentiable", default=False)


@contextlib.contextmanager
def differentiable(enabled: bool = True) -> Iterator[None]:
    """Inside this context every method returns a map that is differentiable with respect to
    its input (``map.grad_fn`` leads back to ``inputs``), as the explanation-manipulation
    attack needs.

    The map is computed as usual (its backward pass runs with ``create_graph=True``), then
    every rule the method installed switches to the plain gradient (:meth:`Rule.to_gradient`),
    so that differentiating the map sees the model's true Jacobians: a rule replaces the
    backward of the forward graph's nodes, and the second differentiation runs through those
    same nodes. The map keeps the forward graph and the graph of its own backward pass
    alive until it is freed, where an ordinary call frees both.
    """
    token = _DIFFERENTIABLE.set(bool(enabled))
    try:
        yield
    finally:
        _DIFFERENTIABLE.reset(token)


def is_differentiable() -> bool:
    """True inside :func:`differentiable` (read it in forward code, not in a backward hook)."""
    return _DIFFERENTIABLE.get()


def keep_graph(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself inside :func:`differentiable`, else ``t.detach()``."""
    return t if _DIFFERENTIABLE.get() else t.detach()
