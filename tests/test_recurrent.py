"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run as their cell equations in the tracing core
(``engine/recurrent.py``): every method's map of a model with them equals its map of the same
model written step by step with plain calls (here, from PyTorch's documented equations), SRD on
an ``nn.LSTM`` equals the independent LSTM oracle, and what is not unrolled (packed sequences,
projections) is refused by name."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import srdxai
from small_text_models import TinyLSTM
from srd_lstm_oracle import srd_lstm_oracle
from srdxai.errors import OperationViewWarning, UnsupportedOperationError

DT = torch.float64
IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 1, 13, 17]])
METHODS = ["saliency", "gradient_x_input", "epsilon_lrp", "lrp_epsilon_plus", "abslrp",
           "attnlrp", "srd"]


class Recurrent(nn.Module):
    """Embeddings -> a recurrent layer (batch first) -> the last step's output -> a dense
    head; ``unrolled=True`` runs the same parameters step by step with plain calls."""

    def __init__(self, kind: str, layers: int = 1, bidirectional: bool = False,
                 unrolled: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.unrolled = kind, unrolled
        self.embedding = nn.Embedding(20, 5)
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = cls(5, 4, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.fc = nn.Linear(4 * (2 if bidirectional else 1), 3)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.2 * torch.randn_like(p))
        self.double().eval()

    def forward(self, ids, attention_mask=None):
        e = self.embedding(ids)
        out = self._steps(e) if self.unrolled else self.rnn(e)[0]
        return self.fc(out[:, -1])

    def _steps(self, x):
        rnn = self.rnn
        for layer in range(rnn.num_layers):
            outs = []
            for direction in range(2 if rnn.bidirectional else 1):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = getattr(rnn, "weight_ih" + suffix), getattr(rnn, "weight_hh" + suffix)
                b_ih, b_hh = getattr(rnn, "bias_ih" + suffix), getattr(rnn, "bias_hh" + suffix)
                h = x.new_zeros(x.shape[0], rnn.hidden_size)
                c = torch.zeros_like(h)
                steps = range(x.shape[1] - 1, -1, -1) if direction else range(x.shape[1])
                hs = {}
                for t in steps:
                    gx, gh = F.linear(x[:, t], w_ih, b_ih), F.linear(h, w_hh, b_hh)
                    if self.kind == "lstm":
                        i, f, g, o = (gx + gh).chunk(4, 1)
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        h = torch.sigmoid(o) * torch.tanh(c)
                    elif self.kind == "gru":
                        xr, xz, xn = gx.chunk(3, 1)
                        hr, hz, hn = gh.chunk(3, 1)
                        n = torch.tanh(xn + torch.sigmoid(xr + hr) * hn)
                        a = xz + hz  # (1 - z) n + z h, with 1 - sigmoid(a) = sigmoid(-a)
                        h = torch.sigmoid(-a) * n + torch.sigmoid(a) * h
                    else:
                        h = torch.tanh(gx + gh)
                    hs[t] = h
                outs.append(torch.stack([hs[t] for t in range(x.shape[1])], 1))
            x = torch.cat(outs, 2)
        return x


CASES = [("lstm", 1, False), ("lstm", 2, True), ("gru", 1, False), ("gru", 2, True),
         ("rnn", 2, True)]


@pytest.mark.parametrize("kind, layers, bidirectional", CASES)
def test_the_unrolled_equations_are_the_layer(kind, layers, bidirectional):
    fused = Recurrent(kind, layers, bidirectional)
    written = Recurrent(kind, layers, bidirectional, unrolled=True)
    torch.testing.assert_close(written(IDS), fused(IDS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, layers, bidirectional", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_maps_the_layer_as_its_equations(kind, layers, bidirectional, method):
    fused = Recurrent(kind, layers, bidirectional)
    written = Recurrent(kind, layers, bidirectional, unrolled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OperationViewWarning)  # SRD: the operation view
        ours = srdxai.explain(fused, IDS, 1, method)
        reference = srdxai.explain(written, IDS, 1, method)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    if method == "srd":
        torch.testing.assert_close(ours.sum(1), fused(IDS)[:, 1], rtol=1e-9, atol=1e-12)


def test_srd_on_nn_lstm_equals_the_lstm_oracle():
    tiny = TinyLSTM().double().eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1),
                                     dtype=DT))

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = tiny.embedding
            self.rnn = nn.LSTM(8, tiny.hidden, batch_first=True).double()
            with torch.no_grad():
                self.rnn.weight_ih_l0.copy_(tiny.ih.weight)
                self.rnn.weight_hh_l0.copy_(tiny.hh.weight)
                self.rnn.bias_ih_l0.copy_(tiny.ih.bias)
                self.rnn.bias_hh_l0.copy_(tiny.hh.bias)
            self.fc = tiny.fc

        def forward(self, ids, attention_mask=None):
            return self.fc(self.rnn(self.embedding(ids))[1][0][0])

    model = Fused().eval()
    ids = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 10, 12, 14]])
    torch.testing.assert_close(model(ids), tiny(ids))
    with pytest.warns(OperationViewWarning):
        ours = srdxai.explain(model, ids, 2, "srd")
    torch.testing.assert_close(ours, srd_lstm_oracle(tiny, ids, ids != 0, 2), rtol=1e-9,
                               atol=1e-12)


class _Packed(nn.Module):
    def __init__(self, proj: int = 0):
        super().__init__()
        self.embedding = nn.Embedding(20, 5)
        self.rnn = nn.LSTM(5, 4, batch_first=True, proj_size=proj)
        self.fc = nn.Linear(proj or 4, 3)
        self.packed = not proj

    def forward(self, ids, attention_mask=None):
        e = self.embedding(ids)
        if self.packed:
            e = pack_padded_sequence(e, torch.tensor([6, 4]), batch_first=True)
        return self.fc(self.rnn(e)[1][0][-1])


@pytest.mark.parametrize("proj, words", [(0, "packed sequence"), (2, "proj_size")])
def test_packed_sequences_and_projections_are_refused_by_name(proj, words):
    with pytest.raises(UnsupportedOperationError, match=words):
        srdxai.explain(_Packed(proj).eval(), IDS, 0, "epsilon_lrp")
    # the plain gradient needs no rule and still runs
    assert srdxai.explain(_Packed(proj).eval(), IDS, 0, "saliency").shape == IDS.shape
