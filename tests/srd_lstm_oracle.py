"""Slow, independent reference ("oracle") of SRD (Sharing Ratio Decomposition) for the tiny LSTM
text classifier :class:`small_text_models.TinyLSTM`: the relevance of each token's embedding.

Written from the definition only: nothing under ``srdxai/engine`` or ``srdxai/methods`` was read,
so this file cannot share a mistake with the implementation it checks. The only code reused is
the sharing rule :func:`srd_token_oracle.shares` of the token oracle (``tests/srd_token_oracle.py``,
written from the same definition and self-checked on its own). The forward pass is recomputed per
sample in float64 from the model's parameters (no hooks, no autograd), and the relevance is pushed
back with explicit Python loops over samples, time steps and vectors; only expressions on one
vector's own entries (a Linear, a sigmoid, a product) are vector expressions.

The model
---------
``e_t = embedding(ids)[t]``; ``h = c = 0`` (constants) before the first step. Per step ``t``::

    a_t = ih(e_t);  b_t = hh(h_{t-1});  z_t = a_t + b_t;  i, f, g, o = z_t.chunk(4)
    p_t = sigmoid(f) * c_{t-1};  q_t = sigmoid(i) * tanh(g);  c_new = p_t + q_t
    h_new = sigmoid(o) * tanh(c_new)
    h_t = keep_t * h_new + (1 - keep_t) * h_{t-1}     (keep_t = mask[t], 0 or 1; c_t likewise)

and ``logits = fc(h_L)``.

Definition
----------
Every operation is a layer; a pointwise feature vector (PFV) is one sample's whole vector at one
step (``e_t``, ``a_t``, ``b_t``, ``z_t``, the four chunk parts, gates, ``p_t``, ``q_t``, states).
Relevance is one number per PFV. For an output vector ``y`` built from sources ``s``::

    y    = sum_s c_s + constant
    mu_s = <c_s + beta_s, y> / ||y||^2               (0 when y = 0)
    R(s) = sum over the outputs y that s feeds of mu_s R(y)

where the constant term (a bias, or any source that does not depend on the input tokens) is split
among the input-dependent sources in proportion to ``||c_s||`` (evenly if all are 0), so the
ratios of the dependent sources sum to 1 and a constant source gets nothing. Per operation:

* ``fc``: ``R(logits)`` is the target logit; one source ``h_L``, ``mu = 1``;
* a Linear on one vector (``ih``, ``hh``), ``tanh``: one source, ``mu = 1``;
* ``z_t = a_t + b_t`` and ``c_new = p_t + q_t``: two sources, shared by vectors. Where the
  state before step ``t`` is still the constant 0 (``t = 0``, or only padding so far), ``b_t`` is
  the bias of ``hh`` and ``p_t`` is 0: constant terms, so ``a_t`` / ``q_t`` take everything;
* chunk: ``R(z_t) = R(i) + R(f) + R(g) + R(o)``;
* the three products ``sigmoid(.) * x``: the sigmoid factor is a gate (a constant weight); ``x``
  is the one source (``mu = 1``); a gate's branch (``i``, ``f``, ``o``) gets no relevance, so
  ``R(z_t) = R(g)``;
* padding merge ``h_t = keep * h_new + (1 - keep) * h_{t-1}``: two sources with contributions
  ``keep * h_new`` and ``(1 - keep) * h_{t-1}`` (the one with weight 0 is the zero vector and
  gets ``mu = 0``); likewise for ``c_t``;
* ``R(e_t) = R(a_t)`` is the map entry of token ``t``; padding tokens get 0.

Every ratio set sums to 1 wherever its output vector is non-zero and the constants ``h_0``,
``c_0`` receive nothing, so the map sums to the target logit (conservation). Relevance that would
reach a constant or a zero output vector of a many-source operation is counted in ``lost``
(0 with these models).

Resolved choices: ``h_t`` (and ``c_t``) depends on the input iff some step ``<= t`` is real
(``keep = 1``); ``h_new`` always counts as input-dependent (it is built from ``e_t``); a sample
with no real token has an all-zero map (its logits are constants). A one-source operation passes
its relevance unchanged even where its output vector is 0.

Public API
----------
:func:`srd_lstm_oracle` (the (N, L) map), :func:`srd_lstm_oracle_trace` (one sample's forward
and relevances at every cut), :func:`oracle_lstm_logits` (the recomputed forward),
:func:`tiny_lstm` (a TinyLSTM in float64 with non-zero random biases). The keyword arguments
``sum_rule`` and ``gate_share`` exist only so the self-checks can run deliberately wrong variants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import srd_token_oracle as tok
from small_text_models import TinyLSTM

__all__ = [
    "LSTMTrace",
    "StepForward",
    "SumRule",
    "oracle_lstm_logits",
    "srd_lstm_oracle",
    "srd_lstm_oracle_trace",
    "tiny_lstm",
]

DT = torch.float64

SumRule = Callable[[Tensor, list[Tensor], list[bool]], list[float]]
"""``(y, [c_1, c_2], [dependent_1, dependent_2]) -> [mu_1, mu_2]`` for a two-source sum."""


def _vector_shares(y: Tensor, contributions: list[Tensor], dependent: list[bool]) -> list[float]:
    """The definition's rule for a sum without bias: :func:`srd_token_oracle.shares`."""
    return tok.shares(y, contributions, dependent)


def tiny_lstm(seed: int = 0, *, bias_std: float = 0.5, **kwargs: int) -> TinyLSTM:
    """``torch.manual_seed(seed); TinyLSTM(**kwargs).double().eval()`` with every bias redrawn
    from ``N(0, bias_std^2)``, so the constant-term rules matter."""
    torch.manual_seed(seed)
    model = TinyLSTM(**kwargs).double().eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in (model.ih, model.hh, model.fc):
            layer.bias.normal_(0.0, bias_std, generator=g)
    return model


# --------------------------------------------------------------------------- forward (per sample)


def _d(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def _linear(layer: nn.Linear, v: Tensor) -> Tensor:
    return _d(layer.weight) @ v + _d(layer.bias)


def _sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


@dataclass
class StepForward:
    """Every vector of one sample at step ``t`` (all float64, one dimension)."""

    e: Tensor        # embedding e_t (E,)
    a: Tensor        # ih(e_t) (4H,)
    b: Tensor        # hh(h_{t-1}) (4H,)
    z: Tensor        # a + b
    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    p: Tensor        # sigmoid(f) * c_{t-1}
    q: Tensor        # sigmoid(i) * tanh(g)
    c_new: Tensor
    h_new: Tensor
    keep: float      # 1.0 real token, 0.0 padding
    h_prev: Tensor
    c_prev: Tensor
    dep_prev: bool   # whether h_{t-1}, c_{t-1} depend on the input tokens
    h: Tensor        # h_t after the padding merge
    c: Tensor        # c_t after the padding merge
    dep: bool        # whether h_t, c_t depend on the input tokens


def _forward_sample(model: TinyLSTM, ids: Tensor, mask: Tensor) -> tuple[list[StepForward],
                                                                        Tensor]:
    """One sample's forward, step by step; returns the steps and the logits."""
    hidden = model.hidden
    emb = _d(model.embedding.weight)
    h = torch.zeros(hidden, dtype=DT)
    c = torch.zeros(hidden, dtype=DT)
    dep = False
    steps: list[StepForward] = []
    for t in range(ids.shape[0]):
        e = emb[int(ids[t])].clone()
        a = _linear(model.ih, e)
        b = _linear(model.hh, h)
        z = a + b
        i, f, g, o = (z[k * hidden:(k + 1) * hidden] for k in range(4))
        p = _sigmoid(f) * c
        q = _sigmoid(i) * torch.tanh(g)
        c_new = p + q
        h_new = _sigmoid(o) * torch.tanh(c_new)
        keep = 1.0 if bool(mask[t]) else 0.0
        h_t = keep * h_new + (1.0 - keep) * h
        c_t = keep * c_new + (1.0 - keep) * c
        dep_t = dep or keep == 1.0
        steps.append(StepForward(e=e, a=a, b=b, z=z, i=i, f=f, g=g, o=o, p=p, q=q, c_new=c_new,
                                 h_new=h_new, keep=keep, h_prev=h, c_prev=c, dep_prev=dep,
                                 h=h_t, c=c_t, dep=dep_t))
        h, c, dep = h_t, c_t, dep_t
    logits = _linear(model.fc, h)
    return steps, logits


def _mask_of(ids: Tensor, mask: Tensor | None) -> Tensor:
    return (ids != 0) if mask is None else mask.bool()


def oracle_lstm_logits(model: TinyLSTM, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """The recomputed forward: (N, classes) float64 logits, sample by sample."""
    m = _mask_of(ids, mask)
    return torch.stack([_forward_sample(model, ids[n], m[n])[1] for n in range(ids.shape[0])])


# --------------------------------------------------------------------------- relevance


@dataclass
class LSTMTrace:
    """One sample's forward and relevances.

    ``r_h[t + 1]`` / ``r_c[t + 1]`` is the relevance of ``h_t`` / ``c_t`` (index 0: the constant
    initial states); ``r_e[t]`` the map entry of token ``t``; ``lost`` the relevance that reached
    a constant or a zero output vector of a many-source operation.
    """

    steps: list[StepForward]
    logits: Tensor
    target: int
    target_logit: float
    r_e: Tensor
    r_h: list[float] = field(default_factory=list)
    r_c: list[float] = field(default_factory=list)
    lost: float = 0.0


def srd_lstm_oracle_trace(model: TinyLSTM, ids: Tensor, mask: Tensor | None, target: int, *,
                          sum_rule: SumRule | None = None, gate_share: float = 0.0
                          ) -> LSTMTrace:
    """SRD of one sample (``ids``, ``mask``: shape (L,)) for logit ``target``.

    ``sum_rule`` replaces the sharing rule of the two sums ``z = a + b`` and ``c_new = p + q``
    and ``gate_share`` sends that fraction of each gated product's relevance to its gate's branch
    (the definition: ``None`` and 0); both exist only for the self-checks' wrong variants.
    """
    rule = _vector_shares if sum_rule is None else sum_rule
    m = _mask_of(ids, mask)
    steps, logits = _forward_sample(model, ids, m)
    length = len(steps)
    target_logit = float(logits[target])
    lost = 0.0
    r_e = torch.zeros(length, dtype=DT)
    r_h = [0.0] * (length + 1)
    r_c = [0.0] * (length + 1)
    # fc: one source, mu = 1 (its bias is the constant term of a single source); a sample with
    # no real token has a constant h_L and nothing to explain
    if steps and steps[-1].dep:
        r_h[length] = target_logit
    elif steps:
        lost += target_logit
    for t in range(length - 1, -1, -1):
        s = steps[t]
        rh, rc = r_h[t + 1], r_c[t + 1]
        # padding merges: h_t = keep * h_new + (1 - keep) * h_{t-1}; c_t likewise
        mu_h = tok.shares(s.h, [s.keep * s.h_new, (1.0 - s.keep) * s.h_prev], [True, s.dep_prev])
        mu_c = tok.shares(s.c, [s.keep * s.c_new, (1.0 - s.keep) * s.c_prev], [True, s.dep_prev])
        lost += rh * (1.0 - sum(mu_h)) + rc * (1.0 - sum(mu_c))
        r_h_new, r_h_prev = mu_h[0] * rh, mu_h[1] * rh
        r_c_new, r_c_prev = mu_c[0] * rc, mu_c[1] * rc
        # h_new = sigmoid(o) * tanh(c_new): the gate sigmoid(o) is a constant weight
        r_o = gate_share * r_h_new
        r_c_new += (1.0 - gate_share) * r_h_new  # tanh: one source
        # c_new = p + q: two sources by vectors; p = 0 is a constant while c_{t-1} is
        mu_pq = rule(s.c_new, [s.p, s.q], [s.dep_prev, True])
        lost += r_c_new * (1.0 - sum(mu_pq))
        r_p, r_q = mu_pq[0] * r_c_new, mu_pq[1] * r_c_new
        # p = sigmoid(f) * c_{t-1}: gate sigmoid(f); q = sigmoid(i) * tanh(g): gate sigmoid(i)
        r_f = gate_share * r_p
        r_c_prev += (1.0 - gate_share) * r_p
        r_i = gate_share * r_q
        r_g = (1.0 - gate_share) * r_q  # tanh: one source
        # chunk: the parts of one vector
        r_z = r_i + r_f + r_g + r_o
        # z = a + b: two sources by vectors; b = hh(0) is a constant while h_{t-1} is
        mu_ab = rule(s.z, [s.a, s.b], [True, s.dep_prev])
        lost += r_z * (1.0 - sum(mu_ab))
        r_a, r_b = mu_ab[0] * r_z, mu_ab[1] * r_z
        r_e[t] = r_a              # ih: one source
        r_h_prev += r_b           # hh: one source
        r_h[t], r_c[t] = r_h_prev, r_c_prev
    lost += r_h[0] + r_c[0]       # the constant initial states keep what reaches them
    return LSTMTrace(steps=steps, logits=logits, target=target, target_logit=target_logit,
                     r_e=r_e, r_h=r_h, r_c=r_c, lost=lost)


def _targets(target: int | Sequence[int] | Tensor, n: int) -> list[int]:
    if isinstance(target, Tensor):
        target = target.reshape(-1).tolist() if target.numel() > 1 else int(target)
    if isinstance(target, int):
        return [target] * n
    out = [int(v) for v in target]
    if len(out) != n:
        raise ValueError(f"{len(out)} targets for {n} samples")
    return out


def srd_lstm_oracle(model: TinyLSTM, ids: Tensor, mask: Tensor | None,
                    target: int | Sequence[int] | Tensor, *, sum_rule: SumRule | None = None,
                    gate_share: float = 0.0) -> Tensor:
    """The (N, L) float64 SRD map of ``ids`` (N, L) for the target logit(s): one relevance per
    token's embedding vector, 0 at padding (``mask`` False; ``None``: ``ids != 0`` as the
    model does). ``target`` is one class for all samples or one per sample. ``sum_rule`` and
    ``gate_share``: see :func:`srd_lstm_oracle_trace` (wrong variants for the self-checks)."""
    m = _mask_of(ids, mask)
    targets = _targets(target, ids.shape[0])
    rows = [srd_lstm_oracle_trace(model, ids[n], m[n], targets[n], sum_rule=sum_rule,
                                  gate_share=gate_share).r_e for n in range(ids.shape[0])]
    return torch.stack(rows) if rows else torch.zeros(ids.shape, dtype=DT)
