"""SRD on an LSTM (which its PFV engine refuses: the LSTM reads its embeddings one step at a
time) runs on the operation view, its sigmoid gates constant weights and its sums shared by
vectors, and equals the independent slow reference (``srd_lstm_oracle.py``, written from the
definition with loops over steps, without reading the engine); the comparison catches sums
shared entry by entry (how every (N, K) sum was shared before December 2026)."""

from __future__ import annotations

import pytest
import torch

import srdxai
from srd_lstm_oracle import srd_lstm_oracle, tiny_lstm
from srd_token_oracle import shares
from srdxai.errors import OperationViewWarning

IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 0, 0, 0], [12, 13, 14, 15, 0, 0],
                    [0, 0, 21, 22, 23, 0]])
MASK = IDS != 0

pytestmark = pytest.mark.filterwarnings("ignore::srdxai.errors.OperationViewWarning")


@pytest.mark.parametrize("seed", [0, 3])
def test_srd_on_an_lstm_equals_the_slow_reference(seed):
    model = tiny_lstm(seed)
    targets = torch.tensor([0, 2, 1, 2])
    ours = srdxai.explain(model, IDS, targets, "srd", attention_mask=MASK)
    reference = srd_lstm_oracle(model, IDS, MASK, targets)
    torch.testing.assert_close(ours, reference.to(ours.dtype), rtol=1e-9, atol=1e-12)
    logits = model(IDS, attention_mask=MASK).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(ours.sum(1), logits, rtol=1e-9, atol=1e-12)


def _by_entries(y, contributions, dependent):
    """A wrong rule for the reference: each entry of a sum shared by its own ratio c_k / y_k
    (averaged over the entries), not by the vectors' projections."""
    if not all(dependent):
        return shares(y, contributions, dependent)
    return [float((c / y).mean()) for c in contributions]


def test_the_comparison_catches_sums_shared_entry_by_entry():
    model = tiny_lstm(1)
    ours = srdxai.explain(model, IDS, 1, "srd", attention_mask=MASK)
    wrong = srd_lstm_oracle(model, IDS, MASK, 1, sum_rule=_by_entries)
    assert (ours - wrong.to(ours.dtype)).abs().max() > 1e-3 * ours.abs().max()


def test_the_first_call_says_it_ran_on_the_operation_view():
    model = tiny_lstm(2)
    with pytest.warns(OperationViewWarning, match="PFV engine cannot decompose"):
        srdxai.explain(model, IDS[:1], 0, "srd", attention_mask=MASK[:1])
