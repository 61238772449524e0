"""Evaluating token attributions: the image metrics with tokens as features.

A text's features are its **real tokens** (attention mask 1). Removing a token sets its
embedding to the **baseline** embedding (``"zero"``, the zero vector, by default; ``"pad"``, a
token id or a tensor ``(E,)``/``(L, E)``, exactly as :func:`~srdxai.text.explain_tokens`'s
``baseline``). Padding is never a feature: it is never drawn, removed, ranked or counted, and
the attributions at padding positions are ignored.

How a batch is evaluated (:func:`token_metric`, the runner every function here builds on):

* Texts are grouped as :func:`~srdxai.text.explain_tokens` groups them: by mask row and padding
  ids, each group evaluated on its real tokens only where the model gives the same logits
  without the padding (:func:`~srdxai.text.real_length`). So a text scores what it scores
  alone.
* A group of ``B`` texts with ``T`` real tokens becomes an image-metric call: the model as a
  function of the real tokens' embeddings (an :class:`~srdxai.text.EmbeddingView`), inputs
  ``(B, E, 1, T)``, maps ``(B, 1, T)`` and the baseline ``(1, E, 1, T)``. The image metrics
  check for 4-D inputs ``(N, C, H, W)``, so tokens are the width of a one-pixel-high image and
  the embedding dimensions its channels: a feature (pixel) is one token, all its dimensions
  replaced at once. Where a group cannot be trimmed (a model that reads its padding, or padding
  that is not at the end), its padding positions are held fixed inside the view at the texts'
  own embeddings (the same for every member: a group shares its padding ids), so the metric
  still sees only the real tokens.
* Per-text results are put back in the caller's order. Texts have different numbers of
  tokens, so curves become ``(N, S)`` padded with NaN after a text's last point
  (:class:`TokenCurveResult`), and Sensitivity-n is NaN where n is not below the text's number
  of tokens (:class:`TokenSensitivityNResult`).

Random draws (:func:`sensitivity_n_tokens`) are seeded per text from the seed and the text's
own real token ids (:func:`token_permutations`), not from one stream in batch order: a text
gets the same draws whatever batch, position or group it is in, so a batch scores each text
exactly as it scores alone, also with seeded draws. Identical texts get identical draws.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Unpack

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, UnsupportedOperationError
from ..metrics.common import (
    Normalise,
    check_positive_int,
    check_targets,
    guarded,
    to_tensor,
)
from ..metrics.faithfulness import (
    CurveResult,
    SensitivityNResult,
    deletion,
    insertion,
    sensitivity_n,
)
from ..metrics.localisation import (
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)
from ..metrics.registry import metric_info
from ..metrics.sampling import Sampling, SamplingOptions, sampling_of
from .explain import (
    EmbeddingView,
    find_embedding,
    text_groups,
    token_baseline,
    token_batch,
)

__all__ = ["TokenCurveResult", "TokenLocalisationResult", "TokenSensitivityNResult",
           "deletion_tokens", "insertion_tokens", "sensitivity_n_tokens", "token_localisation",
           "token_metric", "token_permutations"]

#: Ancona et al.'s subset sizes, cut at 16: most sentences have a few dozen tokens at most
DEFAULT_N_GRID = (1, 2, 3, 4, 6, 8, 12, 16)


# --- results ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenCurveResult:
    """Perturbation curves of texts with different numbers of tokens.

    Attributes:
        curve: float64 ``(N, S)``: text i's curve in ``curve[i, :points[i]]``, NaN after it
            (S is the largest number of points).
        fractions: float64 ``(N, S)``: the fraction of the text's real tokens perturbed at
            each point, NaN-padded like ``curve``.
        auc: float64 ``(N,)``: the area under each text's curve, as the metric defines it.
        points: long ``(N,)``: the number of points of each text's curve.
        extras: further per-text results of the metric (e.g. region perturbation's ``aopc``),
            by field name, ``(N, ...)`` each.
    """

    curve: Tensor
    fractions: Tensor
    auc: Tensor
    points: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSensitivityNResult(SensitivityNResult):
    """Sensitivity-n of texts with different numbers of tokens.

    Attributes:
        curve: float64 ``(N, G)``: Pearson correlation per text and subset size; NaN where n
            was not evaluated for the text (see ``evaluated``) or the correlation is undefined
            (constant attribution sums or outputs).
        n_grid: long ``(G,)``: the subset sizes n, in tokens.
        lengths: long ``(N,)``: the number of real tokens of each text.
        evaluated: bool ``(N, G)``: where n was evaluated (:func:`sensitivity_n_tokens`:
            ``n < lengths[i]``).

    ``mean_curve`` (inherited) averages over texts skipping NaN; :attr:`counts` says how many
    texts each of its points averages.
    """

    lengths: Tensor
    evaluated: Tensor

    @property
    def counts(self) -> Tensor:
        """long ``(G,)``: the texts with a defined correlation at each n (those in
        ``mean_curve``)."""
        return (~torch.isnan(self.curve)).sum(0)


@dataclass(frozen=True)
class TokenLocalisationResult:
    """Localisation of token maps on evidence tokens, per text (float64 ``(N,)`` each; NaN
    for a text without evidence tokens).

    Attributes:
        mass_accuracy: relevance mass accuracy, ``sum_evidence(a) / sum(a)`` over real tokens.
        rank_accuracy: relevance rank accuracy: the share of the K top-ranked real tokens
            that are evidence, K the number of evidence tokens.
        top_k_intersection: the share of the k top-ranked real tokens that are evidence; with
            the default k = K it equals ``rank_accuracy``. NaN where k exceeds the text's
            number of real tokens.
        k: long ``(N,)``: the k used per text.
    """

    mass_accuracy: Tensor
    rank_accuracy: Tensor
    top_k_intersection: Tensor
    k: Tensor


# --- the grouped runner -----------------------------------------------------------------------

class _RealTokenView(nn.Module):
    """The model as a function of one group's real-token embeddings ``(B, E, 1, T)``.

    The image metrics take 4-D inputs; the singleton height is dropped here. Where the view
    is longer than the real tokens (an untrimmable group), the other positions are filled
    with the group's own (padding) embeddings, which every member shares.
    """

    def __init__(self, view: EmbeddingView, fill: Tensor, positions: Tensor | None):
        super().__init__()
        self.view = view
        self.fill = fill  # (1, E, L_view): constants, not parameters
        self.positions = positions  # (T,) real positions within the view, None: all

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[2] != 1:
            raise InvalidInputError(f"the token view takes (B, E, 1, T) inputs, got "
                                    f"{tuple(x.shape)}.")
        e = x[:, :, 0]
        if self.positions is not None:
            e = self.fill.expand(e.shape[0], -1, -1).index_copy(2, self.positions, e)
        return self.view(e)


@dataclass(frozen=True)
class _Group:
    """One image-metric call: texts ``members`` sharing a mask row and padding ids."""

    members: Tensor  # (B,) indices into the caller's batch
    positions: Tensor  # (T,) the real tokens' positions in the texts
    model: nn.Module  # a _RealTokenView
    inputs: Tensor  # (B, E, 1, T)
    maps: Tensor | None  # (B, 1, T) float64
    baseline: Tensor  # (1, E, 1, T)
    target: Tensor | None  # (B,) or None (the predicted class)
    masks: Tensor | None  # (B, 1, T) for metrics with masks=

    @property
    def length(self) -> int:
        return int(self.positions.numel())


def _token_maps(values: Any, mask: Tensor, name: str) -> Tensor:
    """Checked per-token values ``(N, L)`` as float64; only real tokens need be finite."""
    a = to_tensor(values, name)
    if a.dtype == torch.bool or a.is_complex() or not (
            a.is_floating_point() or a.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise InvalidInputError(f"{name} must hold real numbers, got {a.dtype}.")
    if a.shape != mask.shape:
        raise InvalidInputError(f"{name} must have the ids' shape {tuple(mask.shape)} (one "
                                f"value per token), got {tuple(a.shape)}.")
    a = a.to(device=mask.device, dtype=torch.float64)
    bad = (~torch.isfinite(a) & mask).any(1)
    if bool(bad.any()):
        raise InvalidInputError(f"{name} hold NaN or Inf at real tokens of texts "
                                f"{bad.nonzero().flatten().tolist()[:10]}.")
    return a.masked_fill(~mask, 0.0)


def _binary_tokens(values: Any, shape: tuple[int, ...], name: str) -> Tensor:
    m = to_tensor(values, name)
    if tuple(m.shape) != shape:
        raise InvalidInputError(f"{name} must have shape {shape}, got {tuple(m.shape)}.")
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise InvalidInputError(f"{name} must hold 0 and 1 (or booleans).")
        m = m != 0
    return m


def _token_groups(model: nn.Module, ids: Any, y: Any, attributions: Any, *,
                  attention_mask: Any, baseline: Any, embedding: str | nn.Module | None,
                  pad_id: int, masks: Any = None) -> tuple[int, list[_Group]]:
    """The batch size and the image-metric calls of a token batch (call inside
    :func:`guarded`, so that :func:`real_length` sees the model in eval mode)."""
    batch = token_batch(ids, attention_mask)
    emb = find_embedding(model, embedding)
    n = batch.ids.shape[0]
    maps = None if attributions is None else _token_maps(attributions, batch.mask,
                                                         "attributions")
    given_masks = None
    if masks is not None:
        given_masks = _binary_tokens(masks, tuple(batch.ids.shape), "masks").to(batch.ids.device)
    targets = check_targets(y, n, batch.ids.device)
    base = token_baseline(baseline, emb, batch, pad_id)  # (N, E, L)
    with torch.no_grad():
        embedded = emb(batch.ids).transpose(1, 2).contiguous()  # (N, E, L)
    groups = []
    for group in text_groups(model, emb, batch):  # explain_tokens' groups
        members, first, length = group.members, group.first, group.length
        positions = batch.mask[first, :length].nonzero().flatten()
        trimmed = positions.numel() == length
        wrapped = _RealTokenView(group.view, embedded[first:first + 1, :, :length],
                                 None if trimmed else positions)
        groups.append(_Group(
            members=members, positions=positions, model=wrapped,
            inputs=embedded[members][:, :, positions].unsqueeze(2),
            maps=None if maps is None else maps[members][:, positions].unsqueeze(1),
            baseline=base[first:first + 1][:, :, positions].unsqueeze(2),
            target=None if targets is None else targets[members],
            masks=None if given_masks is None else given_masks[members][:, positions]
            .unsqueeze(1)))
    return n, groups


def _lengths(n: int, groups: list[_Group]) -> Tensor:
    """long (N,): each text's number of real tokens."""
    lengths = torch.zeros(n, dtype=torch.long)
    for g in groups:
        lengths[g.members.cpu()] = g.length
    return lengths


def _pad_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` NaN-padded at the end of every axis to ``shape``."""
    out = torch.full(shape, math.nan, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _merge_tensors(parts: list[tuple[Tensor, Tensor]], n: int, what: str) -> Tensor:
    """Per-text tensors ``(B, ...)`` of each group as one ``(N, ...)``, NaN-padded where
    groups give different trailing shapes."""
    for members, value in parts:
        if value.dim() == 0 or value.shape[0] != members.numel():
            raise UnsupportedOperationError(
                f"{what} of shape {tuple(value.shape)} is not one value per text of its group "
                f"({members.numel()} texts); token_metric cannot put it back per text.")
    if any(v.dim() != parts[0][1].dim() for _, v in parts):
        raise UnsupportedOperationError(f"{what} has a different number of axes per group.")
    rest = tuple(max(v.shape[d] for _, v in parts) for d in range(1, parts[0][1].dim()))
    first = parts[0][1]
    ragged = any(tuple(v.shape[1:]) != rest for _, v in parts)
    dtype = first.dtype
    if ragged and not first.is_floating_point():
        dtype = torch.float64  # NaN-padding needs a float
    out = torch.full((n, *rest), math.nan if dtype.is_floating_point else 0, dtype=dtype,
                     device=first.device)
    for members, value in parts:
        value = value.to(dtype)
        out[members.to(out.device)] = _pad_to(value, (value.shape[0], *rest)) if ragged else value
    return out


def _merge(parts: list[tuple[Tensor, Any]], lengths: Tensor,
           what: str = "the metric's result") -> Any:
    """The groups' results put back in the caller's order (see :func:`token_metric`);
    ``lengths`` (N,) are the texts' numbers of real tokens."""
    n = lengths.numel()
    first = parts[0][1]
    if any(type(r) is not type(first) for _, r in parts):
        raise UnsupportedOperationError(f"{what} has a different type per group.")
    if isinstance(first, Tensor):
        return _merge_tensors(parts, n, what)
    if isinstance(first, dict):
        keys = set(first)
        if any(set(r) != keys for _, r in parts):
            raise UnsupportedOperationError(f"{what} has different keys per group.")
        return {k: _merge([(m, r[k]) for m, r in parts], lengths, f"{what}[{k!r}]")
                for k in first}
    if isinstance(first, SensitivityNResult):
        grid = torch.unique(torch.cat([r.n_grid.reshape(-1).cpu() for _, r in parts]))
        curve = torch.full((n, grid.numel()), math.nan, dtype=torch.float64)
        evaluated = torch.zeros(n, grid.numel(), dtype=torch.bool)
        for members, r in parts:
            columns = torch.searchsorted(grid, r.n_grid.reshape(-1).cpu())
            rows = members.cpu()
            curve[rows[:, None], columns[None]] = r.curve.cpu().to(torch.float64)
            evaluated[rows[:, None], columns[None]] = True
        return TokenSensitivityNResult(curve=curve, n_grid=grid, lengths=lengths,
                                       evaluated=evaluated)
    if isinstance(first, CurveResult):
        points = torch.zeros(n, dtype=torch.long)
        for members, r in parts:
            points[members.cpu()] = r.curve.shape[1]
        curve = _merge_tensors([(m, r.curve) for m, r in parts], n, f"{what}.curve")
        fractions = _merge_tensors(
            [(m, r.fractions.reshape(1, -1).expand(m.numel(), -1)) for m, r in parts], n,
            f"{what}.fractions")
        auc = _merge_tensors([(m, r.auc) for m, r in parts], n, f"{what}.auc")
        extras = {f.name: _merge_tensors([(m, getattr(r, f.name)) for m, r in parts], n,
                                         f"{what}.{f.name}")
                  for f in fields(first)
                  if f.name not in ("curve", "fractions", "auc")
                  and isinstance(getattr(first, f.name), Tensor)}
        return TokenCurveResult(curve=curve.to(torch.float64),
                                fractions=fractions.to(torch.float64),
                                auc=auc.to(torch.float64), points=points.to(curve.device),
                                extras=extras)
    raise UnsupportedOperationError(
        f"token_metric puts back per-text tensors, CurveResult and SensitivityNResult (and "
        f"dicts of them); {what} is a {type(first).__name__}. Run the metric yourself on one "
        "group of texts sharing a mask row.")


def _metric_function(metric: str | Callable[..., Any]) -> Callable[..., Any]:
    if isinstance(metric, str):
        return metric_info(metric).function
    if not callable(metric):
        raise InvalidInputError(f"metric must be a metric function or a registered metric's "
                                f"name, got {type(metric).__name__}.")
    return metric


def _takes(function: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True


def _given_draws(options: dict[str, Any]) -> bool:
    sampling = options.get("sampling")
    return options.get("draws") is not None or (
        isinstance(sampling, Sampling) and sampling.draws is not None)


def token_metric(
    metric: str | Callable[..., Any],
    model: nn.Module,
    ids: Any,
    y: Any,
    attributions: Any,
    *,
    attention_mask: Any = None,
    baseline: Any = "zero",
    embedding: str | nn.Module | None = None,
    pad_id: int = 0,
    **metric_kwargs: Any,
) -> Any:
    """Any image metric on token maps, with real tokens as features (see the module docstring).

    Each group of texts sharing a mask row is one call ``metric(view, inputs, y, maps,
    baseline=..., **metric_kwargs)`` with ``inputs`` the texts' real-token embeddings
    ``(B, E, 1, T)``, ``maps`` ``(B, 1, T)`` and ``baseline`` ``(1, E, 1, T)``; the results are
    put back in the caller's order.

    Args:
        metric: a metric function with the common signature ``(model, x, y, attributions,
            ...)`` (e.g. :func:`srdxai.metrics.pixel_flipping`) or a registered metric's name.
        model: a text classifier (as for :func:`~srdxai.text.explain_tokens`).
        ids: token ids ``(N, L)`` or a tokenizer's batch.
        y: None (the predicted class), an int, or one class per text.
        attributions: ``(N, L)`` per-token maps (values at padding are ignored), or None for a
            metric that computes its own maps (``explain=`` then receives the group's view
            and inputs ``(B, E, 1, T)``).
        attention_mask: ``(N, L)``, 1 at real tokens (default: a tokenizer's, else all real).
        baseline: the removed tokens' embedding: ``"zero"``, ``"pad"``, a token id or a
            tensor ``(E,)``/``(L, E)``; given to metrics that take ``baseline=``.
        embedding: the token embedding module or its name (default: found).
        pad_id: the padding token's id (for ``baseline="pad"``).
        **metric_kwargs: the metric's own options. ``masks=`` (for localisation metrics)
            is given per token ``(N, L)`` and cut per group like the maps. Sampling options
            are passed to every group's call as they are, so seeded draws restart per group;
            explicit ``draws`` are refused for more than one group (their layout is per
            call).

    Returns:
        The metric's result per text, in the caller's order: a tensor ``(N, ...)`` for a
        tensor ``(B, ...)`` (NaN-padded where groups differ in trailing size); a
        :class:`TokenCurveResult` for a ``CurveResult``; a :class:`TokenSensitivityNResult`
        for a ``SensitivityNResult`` (the groups' grids joined, NaN where a text's group did
        not evaluate n); a dict of these for a dict. Other results raise
        :class:`~srdxai.errors.UnsupportedOperationError`.
    """
    function = _metric_function(metric)
    if "baseline" in metric_kwargs:
        raise InvalidInputError("pass the baseline as token_metric(..., baseline=...): it is "
                                "given in embedding space for every text.")
    masks = metric_kwargs.pop("masks", None)
    with guarded(model):
        n, groups = _token_groups(model, ids, y, attributions, attention_mask=attention_mask,
                                  baseline=baseline, embedding=embedding, pad_id=pad_id,
                                  masks=masks)
        if len(groups) > 1 and _given_draws(metric_kwargs):
            raise InvalidInputError(
                f"explicit draws have the layout of one metric call, but these texts form "
                f"{len(groups)} groups (one per mask row); pass texts of one mask row, or "
                "let the metric draw (sensitivity_n_tokens takes draws per text).")
        takes_baseline = _takes(function, "baseline")
        parts = []
        for group in groups:
            options = dict(metric_kwargs)
            if takes_baseline:
                options["baseline"] = group.baseline
            if group.masks is not None:
                options["masks"] = group.masks
            result = function(group.model, group.inputs, group.target, group.maps, **options)
            parts.append((group.members, result))
    return _merge(parts, _lengths(n, groups))


# --- Sensitivity-n ----------------------------------------------------------------------------

def _text_seed(base: int, tokens: Sequence[int]) -> int:
    """A 64-bit seed from the run's base seed and a text's real token ids (NumPy's
    SeedSequence mixes them, so neighbouring seeds or texts give unrelated streams)."""
    state = np.random.SeedSequence([base, len(tokens), *tokens]).generate_state(1, np.uint64)
    return int(state[0])


def token_permutations(ids: Any, nr_subsets: int = 100, *, attention_mask: Any = None,
                       sampling: Sampling | None = None,
                       **options: Unpack[SamplingOptions]) -> list[Tensor]:
    """The draws of :func:`sensitivity_n_tokens`: per text a long tensor ``(nr_subsets, T)``
    of random permutations of its ``T`` real tokens (0 = its first real token); subset r of
    size n removes the first n tokens of permutation r.

    Text i's permutations come from a generator seeded by ``(seed, its real token ids)``, so
    they do not depend on the batch, the text's position or its group, and the first r rows
    do not depend on ``nr_subsets``. With ``sampling.generator`` (or ``seed=None``) one base
    seed is drawn from the generator per call instead of ``seed``.
    """
    sampling = sampling_of(sampling, options, "token_permutations")
    sampling.refuse_draws("token_permutations", "it makes the draws")
    subsets = check_positive_int(nr_subsets, "nr_subsets", 2)
    batch = token_batch(ids, attention_mask)
    if sampling.generator is None and sampling.seed is not None:
        base = int(sampling.seed) % 2**64
    else:
        base = int(torch.randint(0, 2**62, (1,), generator=sampling.make_generator()))
    out = []
    for row, real in zip(batch.ids.cpu(), batch.mask.cpu(), strict=True):
        tokens = row[real].tolist()
        gen = torch.Generator().manual_seed(_text_seed(base, tokens))
        out.append(torch.rand(subsets, len(tokens), generator=gen).argsort(1))
    return out


def _check_permutations(draws: Any, lengths: list[int]) -> list[Tensor]:
    if isinstance(draws, Tensor) and draws.dim() == 3:
        draws = list(draws)
    if not isinstance(draws, Sequence) or isinstance(draws, str) or len(draws) != len(lengths):
        raise InvalidInputError(
            f"draws must be one permutation tensor (nr_subsets, T_i) per text ({len(lengths)} "
            "texts; see token_permutations).")
    out = []
    for i, (value, length) in enumerate(zip(draws, lengths, strict=True)):
        p = to_tensor(value, f"draws[{i}]")
        if p.is_floating_point() or p.dtype == torch.bool or p.dim() != 2 or (
                p.shape[1] != length) or p.shape[0] < 2:
            raise InvalidInputError(
                f"draws[{i}] must be integer permutations of shape (nr_subsets >= 2, "
                f"{length}) (text {i} has {length} real tokens); got {tuple(p.shape)} "
                f"{p.dtype}.")
        p = p.long()
        if not torch.equal(p.sort(1).values, torch.arange(length).expand_as(p)):
            raise InvalidInputError(f"draws[{i}] must hold permutations of 0..{length - 1}.")
        out.append(p)
    if len({p.shape[0] for p in out}) > 1:
        raise InvalidInputError("draws must have the same number of subsets for every text.")
    return out


def _n_grid(n_grid: Any) -> Tensor:
    grid = to_tensor(n_grid, "n_grid").reshape(-1)
    if grid.numel() == 0 or grid.is_floating_point() or grid.dtype == torch.bool or bool(
            (grid < 1).any()):
        raise InvalidInputError(f"n_grid must hold subset sizes, ints >= 1; got "
                                f"{grid.tolist()}.")
    return torch.unique(grid.long())


def sensitivity_n_tokens(
    model: nn.Module,
    ids: Any,
    y: Any,
    attributions: Any,
    *,
    attention_mask: Any = None,
    baseline: Any = "zero",
    embedding: str | nn.Module | None = None,
    pad_id: int = 0,
    n_grid: Sequence[int] | Tensor = DEFAULT_N_GRID,
    nr_subsets: int = 100,
    softmax: bool = False,
    abs: bool = False,
    normalise: Normalise = None,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> TokenSensitivityNResult:
    """Sensitivity-n (Ancona et al., ICLR 2018) with tokens as features.

    A map satisfies Sensitivity-n when, for every set S of n real tokens, ``sum_S a =
    f_y(x) - f_y(x with S's embeddings set to the baseline)``. For each n of ``n_grid`` below
    a text's number of real tokens, ``nr_subsets`` random subsets of n tokens are removed and
    the Pearson correlation of the attribution sums and the output drops is the text's value
    at n (:func:`srdxai.metrics.sensitivity_n` per group; subsets nested across n). Sizes n at
    or above a text's number of tokens are not evaluated (NaN): removing every token leaves
    nothing to correlate.

    Args:
        model, ids, y, attributions, attention_mask, baseline, embedding, pad_id: as for
            :func:`token_metric` (Ancona et al.'s baseline: the zero embedding).
        n_grid: subset sizes in tokens (sorted, duplicates dropped).
        nr_subsets: random subsets per n and text.
        softmax: logits (default, as Ancona et al.) or probabilities.
        abs, normalise: attribution preprocessing (none by default).
        sampling: seed, draws, batch size and progress
            (:class:`~srdxai.metrics.Sampling`, or its fields as keywords). The draws are
            :func:`token_permutations` (seeded per text); explicit ``draws`` are one
            permutation tensor ``(nr_subsets, T_i)`` of each text's real tokens.

    Returns:
        A :class:`TokenSensitivityNResult`: ``curve`` ``(N, G)``, ``mean_curve`` ``(G,)``
        over texts (NaN skipped), ``counts`` ``(G,)`` texts per n.
    """
    sampling = sampling_of(sampling, options, "sensitivity_n_tokens")
    grid = _n_grid(n_grid)
    if sampling.draws is None:
        check_positive_int(nr_subsets, "nr_subsets", 2)
    with guarded(model):
        n, groups = _token_groups(model, ids, y, attributions, attention_mask=attention_mask,
                                  baseline=baseline, embedding=embedding, pad_id=pad_id)
        if any(g.maps is None for g in groups):
            raise InvalidInputError("sensitivity_n_tokens scores given maps: pass "
                                    "attributions (N, L).")
        lengths = _lengths(n, groups)
        if sampling.draws is None:
            permutations = token_permutations(ids, nr_subsets, attention_mask=attention_mask,
                                              sampling=sampling.replace(batch_size=None,
                                                                        progress=False))
        else:
            permutations = _check_permutations(sampling.draws, lengths.tolist())
        curve = torch.full((n, grid.numel()), math.nan, dtype=torch.float64)
        for g in groups:
            evaluated = grid < g.length
            if not bool(evaluated.any()):
                continue  # a text of one token (or tokens fewer than every n): all NaN
            draws = torch.stack([permutations[int(i)] for i in g.members])
            result = sensitivity_n(
                g.model, g.inputs, g.target, g.maps, n_grid=grid[evaluated],
                baseline=g.baseline, softmax=softmax, abs=abs, normalise=normalise,
                sampling=Sampling(draws=draws, batch_size=sampling.batch_size,
                                  progress=sampling.progress))
            rows = g.members.cpu()[:, None]
            curve[rows, evaluated.nonzero().flatten()[None]] = result.curve.cpu().to(
                torch.float64)
    return TokenSensitivityNResult(curve=curve, n_grid=grid, lengths=lengths,
                                   evaluated=grid[None] < lengths[:, None])


# --- insertion and deletion -------------------------------------------------------------------

def _insertion_deletion_tokens(function: Callable[..., CurveResult], name: str,
                               model: nn.Module, ids: Any, y: Any, attributions: Any,
                               attention_mask: Any, baseline: Any,
                               embedding: str | nn.Module | None, pad_id: int, softmax: bool,
                               abs: bool, sampling: Sampling | None,
                               options: dict[str, Any]) -> TokenCurveResult:
    sampling = sampling_of(sampling, options, name)
    sampling.refuse_draws(name, "it removes tokens in attribution order")
    if attributions is None:
        raise InvalidInputError(f"{name} scores given maps: pass attributions (N, L).")
    return token_metric(function, model, ids, y, attributions, attention_mask=attention_mask,
                        baseline=baseline, embedding=embedding, pad_id=pad_id, step=1,
                        softmax=softmax, abs=abs, normalise=None, sampling=sampling)


def insertion_tokens(
    model: nn.Module,
    ids: Any,
    y: Any,
    attributions: Any,
    *,
    attention_mask: Any = None,
    baseline: Any = "zero",
    embedding: str | nn.Module | None = None,
    pad_id: int = 0,
    softmax: bool = True,
    abs: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> TokenCurveResult:
    """Insertion (Petsiuk et al., 2018) with tokens: start with every real token at the
    baseline embedding and put the text's tokens back one at a time in order of descending
    attribution (ties: the earlier token first).

    Text i's curve has ``T_i + 1`` points (0 to all ``T_i`` real tokens inserted), its x axis
    the inserted fraction ``k / T_i``, and its AUC the trapezoid over that fraction in [0, 1],
    so texts of different lengths compare. Higher is better.

    Args:
        model, ids, y, attributions, attention_mask, baseline, embedding, pad_id: as for
            :func:`token_metric`.
        softmax: probabilities (default, RISE) or logits.
        abs: order by |a|.
        sampling: batch size and progress (:class:`~srdxai.metrics.Sampling`).

    Returns:
        A :class:`TokenCurveResult` (``curve`` NaN-padded after ``points[i] = T_i + 1``).
    """
    return _insertion_deletion_tokens(insertion, "insertion_tokens", model, ids, y,
                                      attributions, attention_mask, baseline, embedding,
                                      pad_id, softmax, abs, sampling, options)


def deletion_tokens(
    model: nn.Module,
    ids: Any,
    y: Any,
    attributions: Any,
    *,
    attention_mask: Any = None,
    baseline: Any = "zero",
    embedding: str | nn.Module | None = None,
    pad_id: int = 0,
    softmax: bool = True,
    abs: bool = False,
    sampling: Sampling | None = None,
    **options: Unpack[SamplingOptions],
) -> TokenCurveResult:
    """Deletion (Petsiuk et al., 2018) with tokens: set the text's real tokens to the
    baseline embedding one at a time in order of descending attribution (ties: the earlier
    token first). Lower AUC is better.

    Same curve layout and AUC as :func:`insertion_tokens` (the first point is the clean text).
    """
    return _insertion_deletion_tokens(deletion, "deletion_tokens", model, ids, y,
                                      attributions, attention_mask, baseline, embedding,
                                      pad_id, softmax, abs, sampling, options)


# --- localisation -----------------------------------------------------------------------------

def token_localisation(
    attributions: Any,
    evidence_mask: Any,
    attention_mask: Any = None,
    *,
    k: int | None = None,
    abs: bool = False,
) -> TokenLocalisationResult:
    """How much of each text's map lies on its evidence tokens (e.g. the planted words of
    :func:`srdxai.data.text.make_planted_evidence`, ``evidence_mask(max_length)``).

    Only real tokens count: padding is neither in the map's total nor among the ranked tokens.
    The scores are :func:`srdxai.metrics.relevance_mass_accuracy`,
    :func:`~srdxai.metrics.relevance_rank_accuracy` and
    :func:`~srdxai.metrics.top_k_intersection` on each text's real tokens (signed maps; ties
    in rank go to the earlier token).

    Args:
        attributions: ``(N, L)`` per-token maps.
        evidence_mask: ``(N, L)`` bool (or 0/1), True at evidence tokens; evidence must be
            real tokens.
        attention_mask: ``(N, L)``, 1 at real tokens (default: all real).
        k: the tokens top-k intersection counts; default per text its number of evidence
            tokens.
        abs: score |a| instead of the signed map.

    Returns:
        A :class:`TokenLocalisationResult`; a text without evidence tokens scores NaN.
    """
    a_raw = to_tensor(attributions, "attributions")
    if a_raw.dim() != 2 or a_raw.shape[0] == 0 or a_raw.shape[1] == 0:
        raise InvalidInputError(f"attributions must have shape (N, L), got "
                                f"{tuple(a_raw.shape)}.")
    shape = tuple(a_raw.shape)
    mask = (torch.ones(shape, dtype=torch.bool) if attention_mask is None
            else _binary_tokens(attention_mask, shape, "attention_mask"))
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"texts {empty[:10]} have no real token (their attention mask "
                                "is all zero).")
    a = _token_maps(a_raw.cpu(), mask, "attributions")
    evidence = _binary_tokens(evidence_mask, shape, "evidence_mask").cpu()
    on_padding = (evidence & ~mask).any(1)
    if bool(on_padding.any()):
        raise InvalidInputError(f"evidence_mask marks padding of texts "
                                f"{on_padding.nonzero().flatten().tolist()[:10]}; evidence must "
                                "be real tokens (use evidence_mask(max_length) with the "
                                "max_length the ids were encoded with).")
    if k is not None:
        k = check_positive_int(k, "k")
    n = shape[0]
    mass = torch.full((n,), math.nan, dtype=torch.float64)
    rank = torch.full((n,), math.nan, dtype=torch.float64)
    top = torch.full((n,), math.nan, dtype=torch.float64)
    counts = evidence.sum(1)
    k_used = counts.clone() if k is None else torch.full((n,), k, dtype=torch.long)
    # texts sharing a mask row share their real positions: one call per row (and per k)
    rows, inverse = torch.unique(mask, dim=0, return_inverse=True)
    for g in range(rows.shape[0]):
        members = (inverse == g).nonzero().flatten()
        real = rows[g]
        maps = a[members][:, real].unsqueeze(1)  # (B, 1, T)
        marks = evidence[members][:, real].unsqueeze(1)
        length = int(real.sum())
        mass[members] = relevance_mass_accuracy(None, None, None, maps, marks, abs=abs,
                                                normalise=False)
        rank[members] = relevance_rank_accuracy(None, None, None, maps, marks, abs=abs,
                                                normalise=False)
        for value in torch.unique(k_used[members]).tolist():
            chosen = (k_used[members] == value) & (counts[members] > 0)
            if value < 1 or value > length or not bool(chosen.any()):
                continue  # no evidence, or k beyond the text's tokens: NaN
            top[members[chosen]] = top_k_intersection(None, None, None, maps[chosen],
                                                      marks[chosen], k=int(value), abs=abs,
                                                      normalise=False)
    return TokenLocalisationResult(mass_accuracy=mass, rank_accuracy=rank,
                                   top_k_intersection=top, k=k_used)
