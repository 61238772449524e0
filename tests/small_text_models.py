"""Tiny text classifiers for the text tests: a word CNN and an LSTM written in plain ops, both
ignoring padding through their attention mask (see tests/test_text_explain.py and
tests/test_text_metrics.py)."""

from __future__ import annotations

import torch
from torch import nn


class TinyKim(nn.Module):
    """Word CNN: masked embeddings, Conv1d of widths 2 and 3, ReLU, max over real windows."""

    def __init__(self, vocab: int = 40, dim: int = 8, classes: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.convs = nn.ModuleList([nn.Conv1d(dim, 6, k, padding=k - 1) for k in (2, 3)])
        self.fc = nn.Linear(12, classes)

    def forward(self, ids, attention_mask=None):
        m = ((ids != 0) if attention_mask is None else attention_mask.bool()).float()
        h = (self.embedding(ids) * m[..., None]).transpose(1, 2)
        pooled = [nn.functional.max_pool1d(
            torch.relu(conv(h))[..., :ids.shape[1]] * m[:, None], ids.shape[1]).flatten(1)
            for conv in self.convs]
        return self.fc(torch.cat(pooled, 1))


class TinyLSTM(nn.Module):
    """An LSTM in plain ops; the state is carried unchanged over padding."""

    def __init__(self, vocab: int = 40, dim: int = 8, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.ih, self.hh = nn.Linear(dim, 4 * hidden), nn.Linear(hidden, 4 * hidden)
        self.fc = nn.Linear(hidden, classes)
        self.hidden = hidden

    def forward(self, ids, attention_mask=None):
        m = ((ids != 0) if attention_mask is None else attention_mask.bool()).float()
        e = self.embedding(ids)
        h = e.new_zeros(ids.shape[0], self.hidden)
        c = torch.zeros_like(h)
        for t in range(ids.shape[1]):
            i, f, g, o = (self.ih(e[:, t]) + self.hh(h)).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            keep = m[:, t, None]
            h, c = keep * h_new + (1 - keep) * h, keep * c_new + (1 - keep) * c
        return self.fc(h)
