"""Whether code in a backward pass is building a differentiable map.

A backward pass run with ``create_graph=True`` (``srdxai.engine.differentiable``) has grad
mode on; an ordinary one has it off. Rules whose backward would take shortcuts that break
the graph (detached leaves, in-place steps on saved tensors, ``out=``) ask this first.
"""

from __future__ import annotations

import torch


def building_graph(*tensors: torch.Tensor) -> bool:
    """Grad mode is on and one of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
