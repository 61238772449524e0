"""Explaining text classifiers: one attribution per token, from any registered method.

A text classifier maps token ids ``(N, L)`` (and an attention mask) to logits. Attribution
methods need a continuous input, so they explain the model as a function of its **token
embeddings**: the output of the model's input embedding module (``nn.Embedding``; for a
Hugging Face model ``get_input_embeddings()``). :class:`EmbeddingView` is that function: a
module whose input ``e`` of shape ``(B, E, L)`` (embedding dimension as channels, tokens as
the one spatial axis) replaces the embedding module's output, through a forward hook that
exists only during the view's own forward pass. Every method then runs unchanged, as on a
1-D signal, and its map ``(B, L)`` is the per-token attribution (gradient methods sum over
the embedding dimension, as they sum over colour channels).

The attention mask is not an input of the explained function: methods do not perturb it. So
texts are explained in groups sharing one mask row (for right-padded texts: one group per
length), each group's mask (and a representative row of ids) given to the model as
constants. A batch then gives each text exactly the map it gets alone (with the same
padding). Where a model gives the same logits without the padding (checked, see
:func:`real_length`), a group is explained on its real tokens only, so no method can put
relevance on padding. Padding positions get 0.

Baselines (integrated gradients, DeepLIFT, occlusion) live in embedding space: ``"zero"``
(the zero vector, Ancona et al.'s choice), ``"pad"`` (the padding token's embedding), a token
id (its embedding at every real token, e.g. ``[MASK]`` or ``<unk>``) or a tensor of shape
``(E,)`` or ``(L, E)``. At padding positions the baseline is the text's own embedding, so
padding never moves.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, UnsupportedOperationError
from ..methods.base import get_method, method_options

__all__ = ["EmbeddingView", "TextGroup", "TokenBatch", "call_text_model", "explain_tokens",
           "find_embedding", "is_token_input", "real_length", "text_groups", "token_baseline",
           "token_batch"]


@dataclass(frozen=True)
class TokenBatch:
    """Checked token ids ``(N, L)`` (long) and attention mask ``(N, L)`` (bool)."""

    ids: Tensor
    mask: Tensor


def is_token_input(x: Any) -> bool:
    """Token ids (an integer tensor) or a tokenizer's batch (a mapping with ``input_ids``)."""
    if isinstance(x, Tensor):
        return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    return isinstance(x, Mapping) or hasattr(x, "keys") and "input_ids" in x


def token_batch(x: Any, attention_mask: Any = None) -> TokenBatch:
    """Token ids and mask from ids ``(N, L)`` (mask: ``attention_mask``, else every position
    real) or a tokenizer's batch (``input_ids``, ``attention_mask``)."""
    if not isinstance(x, Tensor):
        try:
            ids = x["input_ids"]
        except (KeyError, TypeError):
            raise InvalidInputError(
                "a text input must be token ids (an integer tensor (N, L)) or a tokenizer's "
                "batch holding 'input_ids' (return_tensors='pt').") from None
        if attention_mask is None and "attention_mask" in x:
            attention_mask = x["attention_mask"]
        x = ids
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.is_floating_point() or x.dtype == torch.bool or x.is_complex():
        raise InvalidInputError(f"token ids must be integers, got {x.dtype}.")
    if x.dim() == 1:
        raise InvalidInputError(
            f"token ids need a batch dimension: got shape {tuple(x.shape)}; pass ids[None].")
    if x.dim() != 2 or x.shape[1] == 0:
        raise InvalidInputError(f"token ids must have shape (N, L) with L >= 1, got "
                                f"{tuple(x.shape)}.")
    ids = x.long()
    if bool((ids < 0).any()):
        raise InvalidInputError("token ids must be >= 0.")
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(attention_mask, device=ids.device)
        if mask.shape != ids.shape:
            raise InvalidInputError(f"attention_mask of shape {tuple(mask.shape)} does not match "
                                    f"the ids' {tuple(ids.shape)}.")
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            raise InvalidInputError("attention_mask must hold 0 and 1 (or booleans).")
        mask = mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"texts {empty[:10]} have no real token (their attention mask "
                                "is all zero); nothing to explain.")
    return TokenBatch(ids, mask)


def find_embedding(model: nn.Module, embedding: str | nn.Module | None = None) -> nn.Embedding:
    """The module whose output the methods explain: ``embedding`` (a module or its name in
    ``model``), else a Hugging Face model's ``get_input_embeddings()``, else the model's only
    ``nn.Embedding`` or the one named ``embedding``."""
    if isinstance(embedding, nn.Module):
        found: nn.Module | None = embedding
    elif isinstance(embedding, str):
        modules = dict(model.named_modules())
        if embedding not in modules:
            raise InvalidInputError(f"the model has no module {embedding!r}; its embeddings: "
                                    f"{_embedding_names(model) or 'none'}.")
        found = modules[embedding]
    elif embedding is not None:
        raise InvalidInputError(f"embedding must be a module or a module name, got "
                                f"{type(embedding).__name__}.")
    else:
        found = None
        getter = getattr(model, "get_input_embeddings", None)
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                found = None
        if found is None:
            named = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            by_name = [m for n, m in named if n == "embedding"]
            if by_name:
                found = by_name[0]
            elif len(named) == 1:
                found = named[0][1]
            else:
                raise InvalidInputError(
                    "cannot tell which module embeds the tokens: "
                    + (f"the model has several ({_embedding_names(model)}); "
                       if named else "the model has no nn.Embedding; ")
                    + "pass embedding='name' (the module whose output the methods explain).")
    if not isinstance(found, nn.Embedding):
        raise InvalidInputError(
            f"the token embedding must be an nn.Embedding (ids -> vectors), got "
            f"{type(found).__name__}.")
    return found


def _embedding_names(model: nn.Module) -> str:
    return ", ".join(n for n, m in model.named_modules() if isinstance(m, nn.Embedding))


def _takes_attention_mask(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in parameters


def call_text_model(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """The logits of ``model`` on ``ids``: the mask is passed as ``attention_mask=`` where the
    forward takes one (Hugging Face models, srdxai's text models); an output object's
    ``logits`` are read (Hugging Face's ``SequenceClassifierOutput``)."""
    if _takes_attention_mask(model):
        out = model(ids, attention_mask=mask.to(torch.long))
    else:
        out = model(ids)
    if not isinstance(out, Tensor):
        logits = getattr(out, "logits", None)
        if not isinstance(logits, Tensor):
            raise InvalidInputError(
                "the text model must return logits (N, classes) or an object with .logits; "
                f"got {type(out).__name__}.")
        out = logits
    return out


class EmbeddingView(nn.Module):
    """The model as a function of its token embeddings, for texts sharing one mask row.

    ``forward(e)`` with ``e`` of shape ``(B, E, L)`` runs the model on ``ids_row`` (repeated
    B times; its values matter only where the model reads ids other than through the
    embedding, e.g. to build a mask) with the embedding module's output replaced by
    ``e.transpose(1, 2)``. The replacing hook is registered for that call only and removed
    after it, also when the model raises: nothing is left on the user's model.
    """

    def __init__(self, model: nn.Module, embedding: nn.Embedding, ids_row: Tensor,
                 mask_row: Tensor):
        super().__init__()
        self.model = model
        # a plain attribute, not a submodule: the model already holds it
        object.__setattr__(self, "embedding", embedding)
        self.ids_row = ids_row.reshape(1, -1)
        self.mask_row = mask_row.reshape(1, -1)

    def forward(self, e: Tensor) -> Tensor:
        if e.dim() != 3 or e.shape[2] != self.ids_row.shape[1]:
            raise InvalidInputError(f"the embedding view takes (B, E, {self.ids_row.shape[1]}) "
                                    f"inputs, got {tuple(e.shape)}.")
        replacement = e.transpose(1, 2)
        calls = []

        def replace(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            if out.shape != replacement.shape:
                raise InvalidInputError(
                    f"the embedding's output {tuple(out.shape)} does not match the explained "
                    f"embeddings {tuple(replacement.shape)} (expected (B, L, E)).")
            calls.append(1)
            return replacement

        handle = self.embedding.register_forward_hook(replace)
        try:
            b = e.shape[0]
            out = call_text_model(self.model, self.ids_row.expand(b, -1),
                                  self.mask_row.expand(b, -1))
        finally:
            handle.remove()
        if len(calls) != 1:
            raise UnsupportedOperationError(
                f"the token embedding module ran {len(calls)} times in one forward pass; the "
                "explained embeddings must be its only output (call it once).")
        return out


def token_baseline(baseline: Any, embedding: nn.Embedding, batch: TokenBatch,
                   pad_id: int = 0) -> Tensor:
    """The baseline embeddings ``(N, E, L)`` of ``batch``: at real tokens ``baseline``
    (``"zero"``, ``"pad"``, a token id, a tensor ``(E,)`` or ``(L, E)``), at padding the
    texts' own embeddings."""
    with torch.no_grad():
        own = embedding(batch.ids)  # (N, L, E)
        dim = own.shape[2]
        if isinstance(baseline, str):
            if baseline == "zero":
                value = own.new_zeros(dim)
            elif baseline == "pad":
                value = embedding.weight[pad_id].detach()
            else:
                raise InvalidInputError(f"unknown baseline {baseline!r}; use 'zero', 'pad', a "
                                        "token id or a tensor (E,) or (L, E).")
        elif isinstance(baseline, int) and not isinstance(baseline, bool):
            if not 0 <= baseline < embedding.num_embeddings:
                raise InvalidInputError(f"baseline token id {baseline} is outside the "
                                        f"vocabulary [0, {embedding.num_embeddings}).")
            value = embedding.weight[baseline].detach()
        elif isinstance(baseline, Tensor):
            value = baseline.detach().to(own)
            if value.shape not in ((dim,), (own.shape[1], dim)):
                raise InvalidInputError(
                    f"a baseline tensor must have shape (E,) = ({dim},) or (L, E) = "
                    f"({own.shape[1]}, {dim}); got {tuple(value.shape)}.")
            if not bool(torch.isfinite(value).all()):
                raise InvalidInputError("the baseline holds NaN or Inf; give a finite one.")
        else:
            raise InvalidInputError(f"baseline must be 'zero', 'pad', a token id or a tensor, "
                                    f"got {type(baseline).__name__}.")
        base = torch.where(batch.mask[..., None], value.expand_as(own), own)
    return base.transpose(1, 2).contiguous()


def explain_tokens(
    model: nn.Module,
    ids: Any,
    target: Any = None,
    method: str = "integrated_gradients",
    *,
    attention_mask: Any = None,
    baseline: Any = "zero",
    embedding: str | nn.Module | None = None,
    pad_id: int = 0,
    batch_size: int | None = None,
    **options: Any,
) -> Tensor:
    """Per-token attributions ``(N, L)`` of ``model``'s decision on token ids.

    Args:
        model: a text classifier taking ids ``(N, L)`` (and ``attention_mask=`` if its
            forward has one) and returning logits ``(N, K)`` or an object with ``.logits``.
        ids: token ids ``(N, L)`` or a tokenizer's batch (``input_ids``, ``attention_mask``).
        target: None (predicted class), an int, one int per text, or a callable on logits.
        method: any registered method (``srdxai.methods.METHODS``).
        attention_mask: ``(N, L)``, 1 at real tokens (default: from a tokenizer's batch, else
            all real).
        baseline: for integrated gradients, DeepLIFT and occlusion: ``"zero"``, ``"pad"``,
            a token id or a tensor ``(E,)``/``(L, E)`` (see the module's docstring).
        embedding: the token embedding module or its name (default: found, see
            :func:`find_embedding`).
        pad_id: the padding token's id (for ``baseline="pad"``).
        batch_size: explain at most this many texts at a time within a group.
        **options: the method's own options (occlusion: ``window`` and ``stride`` in
            tokens).

    Returns:
        A float tensor ``(N, L)``: the attribution of each token (0 at padding).
    """
    from ..api import explain  # the image front door explains each group's view

    batch = token_batch(ids, attention_mask)
    cls = get_method(method)
    emb = find_embedding(model, embedding)
    if "baseline" in options:
        raise InvalidInputError("pass the baseline as explain_tokens(..., baseline=...): it "
                                "is given in embedding space for every text.")
    if "baseline" in method_options(cls):  # a point in embedding space for these methods
        base = token_baseline(baseline, emb, batch, pad_id)
    else:
        base = None
    with torch.no_grad():
        embedded = emb(batch.ids).transpose(1, 2).contiguous()  # (N, E, L)
    targets = _per_text_targets(target, batch.ids.shape[0], batch.ids.device)
    out = embedded.new_zeros(batch.ids.shape)
    for group in text_groups(model, emb, batch):
        members, first, length = group.members, group.first, group.length
        group_options = dict(options)
        if base is not None:
            group_options["baseline"] = base[first:first + 1, :, :length]
        group_target = targets if not isinstance(targets, Tensor) else targets[members]
        maps = explain(group.view, embedded[members, :, :length], group_target, method,
                       batch_size=batch_size, **group_options)
        if maps.shape != (members.numel(), length):
            raise UnsupportedOperationError(
                f"method '{method}' returned maps of shape {tuple(maps.shape)} for texts of "
                f"{length} tokens; it has no per-token map.")
        out[members, :length] = maps.to(out.dtype)
    return out.masked_fill(~batch.mask, 0.0)


@dataclass(frozen=True)
class TextGroup:
    """Texts of a batch explained (or scored) in one call: ``members`` share their mask row
    and their padding ids, so one row of constants (ids and mask for the model, baseline and
    padding embeddings) serves every member exactly. ``first`` is one of them, ``length``
    the length they are explained at (:func:`real_length`), ``view`` the model on their
    embeddings at that length."""

    members: Tensor
    first: int
    length: int
    view: EmbeddingView


def text_groups(model: nn.Module, embedding: nn.Embedding, batch: TokenBatch
                ) -> list[TextGroup]:
    """The groups of ``batch`` (see :class:`TextGroup`), in a fixed order."""
    key = torch.where(batch.mask, torch.full_like(batch.ids, -1), batch.ids)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    groups = []
    for g in range(int(inverse.max()) + 1):
        members = (inverse == g).nonzero().flatten()
        first = int(members[0])
        length = real_length(model, batch.ids[members], batch.mask[members])
        view = EmbeddingView(model, embedding, batch.ids[first, :length],
                             batch.mask[first, :length])
        groups.append(TextGroup(members, first, length, view))
    return groups


def real_length(model: nn.Module, ids: Tensor, mask: Tensor) -> int:
    """The length to explain texts sharing one mask row at: their real tokens only, where
    the mask is real tokens then padding and the model gives the same logits without the
    padding (checked on these texts, one pass without gradients); else the full length.

    Without padding in the explained input, a method cannot put relevance on it: SRD's bias
    shares reach padding positions through the convolutions' windows otherwise, and the
    map of a padded text would not sum to its logit (about 0.04 % of it lost on a
    movie-review sentence padded to 64 tokens). The texts' maps are the maps they get alone.
    """
    count = int(mask[0].sum())
    full = ids.shape[1]
    if count == full or not bool(mask[0, :count].all()):
        return full
    try:
        with torch.no_grad():
            padded = call_text_model(model, ids, mask)
            trimmed = call_text_model(model, ids[:, :count], mask[:, :count])
    except Exception:  # noqa: BLE001 - a model that needs its full length keeps it
        return full
    scale = float(padded.abs().max()) or 1.0
    same = padded.shape == trimmed.shape and bool(
        torch.allclose(padded, trimmed, rtol=1e-4, atol=1e-5 * scale))
    return count if same else full


def _per_text_targets(target: Any, n: int, device: torch.device) -> Any:
    """A target tensor (N,) to split over groups, or the target as it is where it applies to
    every text alike (None, an int, a callable)."""
    if target is None or callable(target) or isinstance(target, int) and not isinstance(
            target, bool):
        return target
    t = torch.as_tensor(target, device=device)
    if t.dim() == 0:
        return int(t)
    if t.shape != (n,):
        raise InvalidInputError(f"target must be None, an int, one class per text ({n}) or a "
                                f"callable; got shape {tuple(t.shape)}.")
    return t.long()
