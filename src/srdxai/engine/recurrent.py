"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) as the calls they are made of.

``nn.LSTM`` and its siblings run one fused kernel (``torch.lstm``), which no rule can see
inside. The tracing core runs them instead as their cell equations, step by step, each step a
few ordinary calls (dense layers, sigmoid, tanh, products and sums, ``chunk`` and ``stack``)
that both views record and every rule already handles: an LSTM's and a GRU's sigmoid gates are
then gates (a constant weight of their signal, as Arras et al.'s LRP for LSTMs and SRD treat
them), the plain gradient is unchanged (the same function), and a map of a model with
``nn.LSTM`` equals the map of the same model written with those calls.

Per step, with PyTorch's gate order and parameter layout (``weight_ih_l{k}{_reverse}`` etc.)::

    LSTM: i, f, g, o = (x W_ih^T + b_ih + h W_hh^T + b_hh).chunk(4)
          c' = sigmoid(f) c + sigmoid(i) tanh(g);  h' = sigmoid(o) tanh(c')
    GRU:  r, z, n from x W_ih^T + b_ih and h W_hh^T + b_hh (chunk(3) each)
          n = tanh(x_n + sigmoid(x_r + h_r) (h_n))
          h' = sigmoid(-(x_z + h_z)) n + sigmoid(x_z + h_z) h       (1 - z = sigmoid(-a))
    RNN:  h' = tanh or relu(x W_ih^T + b_ih + h W_hh^T + b_hh)

``1 - z`` is written as ``sigmoid(-a)`` (the same number) so that it is a gate too. Stacked
layers read the previous layer's outputs; the reverse direction of a bidirectional layer runs
from the last step to the first. Packed sequences and projections (``proj_size``) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: the fused kernels, by name, and the number of gates of their cell
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def recurrent_kind(func: Any) -> str | None:
    """The name of a fused recurrent kernel (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``,
    ``torch.rnn_relu``), or None for any other call."""
    name = getattr(func, "__name__", "")
    if name in GATES and func == getattr(torch._VF, name, None):
        return name
    return None


def unrolled(kind: str, args: tuple, kwargs: dict, call: Callable[..., Any],
             refuse: Callable[[str], Exception]) -> tuple[Tensor, ...]:
    """Run the fused recurrent kernel ``kind`` on ``args`` as its cell equations, every
    elementary call through ``call(func, *args)`` (the tracer, so each is recorded); returns
    what the kernel returns: ``(output, h_n, c_n)`` for an LSTM, ``(output, h_n)`` else.
    ``refuse(what)`` makes the error for a form that is not unrolled."""
    names = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
             "bidirectional", "batch_first")
    if len(args) > 1 and isinstance(args[1], Tensor) and args[1].dtype == torch.long:
        raise refuse(f"'torch.{kind}' on a packed sequence (unpack it, or pad the batch)")
    bound = dict(zip(names, args, strict=False)) | kwargs
    x, hx, params = bound["input"], bound["hx"], list(bound["params"])
    layers, directions = int(bound["num_layers"]), 2 if bound["bidirectional"] else 1
    biases = bool(bound["has_biases"])
    if bound["train"] and float(bound["dropout"]) > 0:
        raise refuse(f"'torch.{kind}' with dropout in training mode (call model.eval())")
    per = 4 if biases else 2
    if len(params) != layers * directions * per:
        raise refuse(f"'torch.{kind}' with projections (proj_size) or an unknown parameter "
                     "layout")
    if x.dim() != 3:
        raise refuse(f"'torch.{kind}' on an unbatched sequence (add a batch dimension)")
    if bound["batch_first"]:
        x = call(Tensor.transpose, x, 0, 1)  # (T, N, E)
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    steps = x.shape[0]
    layer_input = x
    h_last: list[Tensor] = []
    c_last: list[Tensor] = []
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh = params[k * per], params[k * per + 1]
            b_ih, b_hh = (params[k * per + 2], params[k * per + 3]) if biases else (None, None)
            h = call(Tensor.__getitem__, h0, k)
            c = call(Tensor.__getitem__, c0, k) if c0 is not None else None
            order = range(steps - 1, -1, -1) if direction else range(steps)
            hs: list[Tensor | None] = [None] * steps
            for t in order:
                xt = call(Tensor.__getitem__, layer_input, t)
                h, c = _cell(kind, call, xt, h, c, (w_ih, w_hh, b_ih, b_hh))
                hs[t] = h
            outputs.append(call(torch.stack, hs, 0))
            h_last.append(h)
            if c is not None:
                c_last.append(c)
        layer_input = outputs[0] if directions == 1 else call(torch.cat, outputs, 2)
    output = layer_input
    if bound["batch_first"]:
        output = call(Tensor.transpose, output, 0, 1)
    h_n = call(torch.stack, h_last, 0)
    if kind == "lstm":
        return output, h_n, call(torch.stack, c_last, 0)
    return output, h_n


def _cell(kind: str, call: Callable[..., Any], x: Tensor, h: Tensor, c: Tensor | None,
          weights: Sequence[Tensor | None]) -> tuple[Tensor, Tensor | None]:
    w_ih, w_hh, b_ih, b_hh = weights
    xs = call(F.linear, x, w_ih, b_ih)
    hs = call(F.linear, h, w_hh, b_hh)
    if kind == "lstm":
        i, f, g, o = call(Tensor.chunk, call(Tensor.__add__, xs, hs), 4, 1)
        kept = call(Tensor.__mul__, call(torch.sigmoid, f), c)
        new = call(Tensor.__mul__, call(torch.sigmoid, i), call(torch.tanh, g))
        c = call(Tensor.__add__, kept, new)
        return call(Tensor.__mul__, call(torch.sigmoid, o), call(torch.tanh, c)), c
    if kind == "gru":
        x_r, x_z, x_n = call(Tensor.chunk, xs, 3, 1)
        h_r, h_z, h_n = call(Tensor.chunk, hs, 3, 1)
        r = call(torch.sigmoid, call(Tensor.__add__, x_r, h_r))
        a_z = call(Tensor.__add__, x_z, h_z)
        n = call(torch.tanh, call(Tensor.__add__, x_n, call(Tensor.__mul__, r, h_n)))
        keep_new = call(torch.sigmoid, call(Tensor.__neg__, a_z))  # 1 - z, a gate too
        kept = call(Tensor.__mul__, call(torch.sigmoid, a_z), h)
        return call(Tensor.__add__, call(Tensor.__mul__, keep_new, n), kept), None
    act = torch.tanh if kind == "rnn_tanh" else torch.relu
    return call(act, call(Tensor.__add__, xs, hs)), None
