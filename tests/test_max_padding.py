"""Padding with -inf before max pooling (timm's 'same' max pooling, NASNet's and PNASNet's
cells) runs with a finite stand-in below every entry (the windows never pick it, and the rules
never meet -inf * 0): every operation-view method's map equals the map of max pooling with its
own padding, and any other call reading the padded tensor is refused by name. On the operation
view, SRD reads constant zeros before a convolution as padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import srdxai
from srdxai.errors import UnsupportedOperationError
from srdxai.methods import get_method
from srdxai.methods.srd_tokens import token_relevance

DT = torch.float64
METHODS = ["abslrp", "attnlrp", "lrp_epsilon_plus", "cp_lrp"]


class Pooled(nn.Module):
    """conv -> (relu) -> max pooling 3x3, stride 1, padded by one: with ``F.pad(-inf)`` (the
    form under test), with the pooling's own padding, or with explicit zeros before a
    convolution (``zeros=True``)."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=0 if form == "zeros" else 1)
        self.head = nn.Linear(4, 3)
        self.double().eval()

    def forward(self, x):
        h = self.conv(x)  # no activation: negative entries, so the padding must never win
        if self.form == "inf":
            h = F.max_pool2d(F.pad(h, (1, 1, 1, 1), value=float("-inf")), 3, 1)
        elif self.form == "inf_then_sum":
            h = F.pad(h, (1, 1, 1, 1), value=float("-inf")).sum((2, 3), keepdim=True) + h
        else:
            h = F.max_pool2d(h, 3, 1, padding=1)
        h = torch.relu(h)
        if self.form == "zeros":
            h = F.pad(h, (1, 1, 1, 1))  # explicit zeros: the next conv's padding
        return self.head(torch.relu(self.conv2(h)).mean((2, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_minus_infinity_padding_equals_the_poolings_own(method):
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    padded, own = Pooled("inf"), Pooled("own")
    torch.testing.assert_close(padded(x), own(x))
    torch.testing.assert_close(srdxai.explain(padded, x, 1, method),
                               srdxai.explain(own, x, 1, method), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["inf", "zeros"])
def test_srd_on_the_operation_view_reads_such_padding_as_no_source(form):
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    model, own = Pooled(form), Pooled("own")
    srd = get_method("srd")
    ours = token_relevance(srd(model), x, torch.tensor([1, 1])).sum(1)
    reference = token_relevance(srd(own), x, torch.tensor([1, 1])).sum(1)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.sum((1, 2)), model(x)[:, 1], rtol=1e-10, atol=1e-12)


def test_another_call_reading_minus_infinity_padding_is_refused():
    with pytest.raises(UnsupportedOperationError, match="padded with -inf"):
        srdxai.explain(Pooled("inf_then_sum"), torch.randn(1, 3, 6, 6, dtype=DT), 0, "abslrp")
