"""Two ways of writing one model must get one map: the shared pieces of the tests that check
a call the engine learnt against the same model written with calls it already knew
(``test_edge_padding_addcmul.py``, ``test_window_moves.py``, ``test_group_norm_op_view.py``)."""

from __future__ import annotations

import torch
from torch import nn

import srdxai


def image_batch() -> torch.Tensor:
    """Two 3 x 8 x 8 float64 images, always the same."""
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def written_pair(cls, **options) -> tuple[nn.Module, nn.Module]:
    """``cls(written=False, ...)`` with every parameter drawn from N(0, 0.4), and
    ``cls(written=True, ...)`` with the same parameters, both in eval mode."""
    torch.manual_seed(0)
    a = cls(written=False, **options).eval()
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.4)
    b = cls(written=True, **options).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def assert_same_maps(a: nn.Module, b: nn.Module, x: torch.Tensor, method: str,
                     target=(1, 2)) -> torch.Tensor:
    """``method``'s maps of ``a`` and ``b`` on ``x`` are finite and equal (1e-8 relative);
    returns ``a``'s."""
    got = srdxai.explain(a, x, list(target), method)
    expected = srdxai.explain(b, x, list(target), method)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-8,
                               atol=1e-10 * expected.abs().max().item())
    return got
