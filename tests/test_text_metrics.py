"""Token-level evaluation (srdxai.text.metrics): the image metrics with real tokens as features.

The oracles here are written from the metrics' definitions, text by text and subset by subset:
plain model calls without gradients, the removed tokens' embeddings replaced through a forward
hook on the embedding module, on each text alone with its own padding (so they also check that
the runner's grouping and trimming change nothing). They share no code with the library but
the models.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import srdxai
from small_text_models import TinyKim, TinyLSTM
from srdxai.errors import InvalidInputError, InvalidTargetError, UnsupportedOperationError
from srdxai.metrics import Sampling, pixel_flipping, relevance_mass_accuracy
from srdxai.text import explain_tokens, real_length
from srdxai.text.metrics import (
    TokenCurveResult,
    TokenSensitivityNResult,
    deletion_tokens,
    insertion_tokens,
    sensitivity_n_tokens,
    token_localisation,
    token_metric,
    token_permutations,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny tensors: extra intra-op threads only add overhead, a lot on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


# --- models -----------------------------------------------------------------------------------

class BagOfEmbeddings(nn.Module):
    """Linear in the real tokens' embeddings: logits = W sum_t e_t + b."""

    def __init__(self, vocab: int = 40, dim: int = 8, classes: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, ids, attention_mask=None):
        m = ((ids != 0) if attention_mask is None else attention_mask.bool()).float()
        return self.fc((self.embedding(ids) * m[..., None]).sum(1))


class ReadsPadding(nn.Module):
    """Averages tanh features over every position, padding included: its logits change when
    padding is cut, so texts cannot be trimmed. Records every embedding batch it sees."""

    def __init__(self, vocab: int = 40, dim: int = 8, classes: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 10)
        self.fc = nn.Linear(10, classes)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, ids, attention_mask=None):
        e = self.embedding(ids)
        self.seen.append((ids.clone(), e.detach().clone()))
        return self.fc(torch.tanh(self.proj(e)).mean(1))


# texts of 6, 3, 4, 3 and 1 real tokens; texts 1 and 3 share a mask row and padding
IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 0, 0, 0], [12, 13, 14, 15, 0, 0],
                    [21, 22, 23, 0, 0, 0], [30, 0, 0, 0, 0, 0]])
MASK = IDS != 0
LENGTHS = MASK.sum(1)
TARGETS = torch.tensor([0, 1, 2, 0, 1])
MODELS = [TinyKim, TinyLSTM]


def _model(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls().eval()


def _maps(n_texts: int = 5, length: int = 6, seed: int = 1) -> torch.Tensor:
    """Random maps, zero at padding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_texts, length, generator=g, dtype=torch.float64).masked_fill(~MASK, 0)


def _draws(nr_subsets: int, seed: int = 5, mask: torch.Tensor = MASK) -> list[torch.Tensor]:
    """Fixed permutations of each text's real tokens, drawn here (not by the library)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(int(n), generator=g) for _ in range(nr_subsets)])
            for n in mask.sum(1)]


# --- the oracle ---------------------------------------------------------------------------------

def _score(model, ids_row, mask_row, e, target, softmax):
    """The target's logit (or probability) of one text whose embeddings are ``e`` (1, L, E)."""
    handle = model.embedding.register_forward_hook(lambda module, args, out: e)
    try:
        with torch.no_grad():
            out = model(ids_row, attention_mask=mask_row)
    finally:
        handle.remove()
    if softmax:
        out = out.softmax(1)
    return float(out[0, target])


def _own(model, ids, i):
    with torch.no_grad():
        return model.embedding(ids[i:i + 1]).clone()


def _base_vector(model, baseline):
    if baseline == "zero":
        return torch.zeros(model.embedding.embedding_dim)
    return model.embedding.weight[baseline].detach().clone()  # a token id


def oracle_sensitivity_n(model, ids, mask, maps, targets, draws, grid, baseline="zero",
                         softmax=False):
    """Ancona et al.'s Sensitivity-n, text by text: Pearson's r over the given subsets of the
    removed tokens' attribution sum and the output drop, for each n below the text's length."""
    out = np.full((ids.shape[0], len(grid)), math.nan)
    for i in range(ids.shape[0]):
        real = mask[i].nonzero().flatten().tolist()
        e0 = _own(model, ids, i)
        clean = _score(model, ids[i:i + 1], mask[i:i + 1], e0, targets[i], softmax)
        for column, n in enumerate(grid):
            if n >= len(real):
                continue
            sums, drops = [], []
            for permutation in draws[i]:
                removed = [real[j] for j in permutation[:n].tolist()]
                e = e0.clone()
                e[0, removed] = _base_vector(model, baseline)
                sums.append(float(maps[i, removed].sum()))
                drops.append(clean - _score(model, ids[i:i + 1], mask[i:i + 1], e, targets[i],
                                            softmax))
            out[i, column] = np.corrcoef(sums, drops)[0, 1]
    return out


def oracle_insertion_deletion(model, ids, mask, maps, targets, insert, baseline="zero",
                              softmax=True):
    """RISE's insertion / deletion, text by text: tokens put back (or removed) one at a time
    in descending attribution order; the AUC is the trapezoid over the fraction k / T."""
    curves, aucs = [], []
    for i in range(ids.shape[0]):
        real = mask[i].nonzero().flatten().tolist()
        order = sorted(real, key=lambda p: (-float(maps[i, p]), p))  # ties: earlier token
        e0 = _own(model, ids, i)
        empty = e0.clone()
        empty[0, real] = _base_vector(model, baseline)
        start, put = (empty, e0) if insert else (e0, empty)
        curve = []
        for k in range(len(real) + 1):
            e = start.clone()
            e[0, order[:k]] = put[0, order[:k]]
            curve.append(_score(model, ids[i:i + 1], mask[i:i + 1], e, targets[i], softmax))
        fractions = np.arange(len(real) + 1) / len(real)
        curves.append(curve)
        aucs.append(float(np.sum((fractions[1:] - fractions[:-1])
                                 * (np.array(curve[1:]) + np.array(curve[:-1])) / 2)))
    return curves, aucs


def oracle_localisation(maps, evidence, mask):
    mass, rank = [], []
    for i in range(maps.shape[0]):
        real = mask[i].nonzero().flatten().tolist()
        marked = [p for p in real if evidence[i, p]]
        if not marked:
            mass.append(math.nan)
            rank.append(math.nan)
            continue
        mass.append(sum(float(maps[i, p]) for p in marked) / sum(float(maps[i, p]) for p in real))
        top = sorted(real, key=lambda p: (-float(maps[i, p]), p))[:len(marked)]
        rank.append(sum(p in marked for p in top) / len(marked))
    return torch.tensor(mass, dtype=torch.float64), torch.tensor(rank, dtype=torch.float64)


# --- Sensitivity-n ------------------------------------------------------------------------------

GRID = (1, 2, 3, 4, 6)


@pytest.mark.parametrize("cls", MODELS)
def test_sensitivity_n_matches_the_oracle_with_fixed_draws(cls):
    model = _model(cls)
    maps = _maps()
    draws = _draws(6)
    got = sensitivity_n_tokens(model, IDS, TARGETS, maps, attention_mask=MASK, n_grid=GRID,
                               draws=draws)
    expected = oracle_sensitivity_n(model, IDS, MASK, maps, TARGETS.tolist(), draws, GRID)
    assert isinstance(got, TokenSensitivityNResult)
    assert got.curve.shape == (5, len(GRID)) and got.curve.dtype == torch.float64
    np.testing.assert_allclose(got.curve.numpy(), expected, rtol=1e-4, atol=1e-4)
    # n is evaluated only below a text's number of real tokens; a one-token text has no n
    assert torch.equal(got.evaluated, torch.tensor(GRID)[None] < LENGTHS[:, None])
    assert bool(torch.isnan(got.curve[~got.evaluated]).all())
    assert bool(torch.isnan(got.curve[4]).all())
    assert torch.equal(got.lengths, LENGTHS)
    assert got.counts.tolist() == [4, 4, 2, 1, 0]
    torch.testing.assert_close(got.mean_curve[:4],
                               torch.from_numpy(np.nanmean(expected[:, :4], axis=0)),
                               rtol=1e-4, atol=1e-4)
    assert math.isnan(float(got.mean_curve[4]))


def test_sensitivity_n_with_a_token_baseline_and_predicted_classes():
    model = _model(TinyLSTM, seed=3)
    maps = _maps(seed=2)
    draws = _draws(5, seed=9)
    got = sensitivity_n_tokens(model, IDS, None, maps, attention_mask=MASK, n_grid=(1, 3),
                               baseline=7, softmax=True, sampling=Sampling(draws=draws))
    with torch.no_grad():
        predicted = model(IDS, attention_mask=MASK).argmax(1).tolist()
    expected = oracle_sensitivity_n(model, IDS, MASK, maps, predicted, draws, (1, 3),
                                    baseline=7, softmax=True)
    np.testing.assert_allclose(got.curve.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["gradient_x_input", "integrated_gradients"])
def test_linear_model_satisfies_sensitivity_n_for_every_n(method):
    # for a model linear in the embeddings, removing S changes the logit by exactly
    # sum_S w.(e_t - b): gradient x input (b = 0) and integrated gradients (any b) satisfy
    # Sensitivity-n exactly, so every evaluated correlation is 1
    model = _model(BagOfEmbeddings)
    with torch.no_grad():
        model.embedding.weight[0] = 0.3  # the padding token's embedding is not zero
    baseline = "zero" if method == "gradient_x_input" else "pad"
    options = {"steps": 8} if method == "integrated_gradients" else {}
    maps = explain_tokens(model, IDS, TARGETS, method, attention_mask=MASK, baseline=baseline,
                          **options)
    got = sensitivity_n_tokens(model, IDS, TARGETS, maps, attention_mask=MASK, baseline=baseline,
                               n_grid=(1, 2, 3, 5), nr_subsets=20, seed=4)
    evaluated = got.curve[got.evaluated]
    assert evaluated.numel() == 4 + 4 + 2 + 1
    torch.testing.assert_close(evaluated, torch.ones_like(evaluated), rtol=0, atol=1e-5)


def test_seeded_draws_do_not_depend_on_the_batch():
    model = _model(TinyKim)
    maps = _maps()
    batch = sensitivity_n_tokens(model, IDS, TARGETS, maps, attention_mask=MASK, n_grid=GRID,
                                 nr_subsets=8, seed=11)
    for i in range(IDS.shape[0]):
        n = int(LENGTHS[i])
        # alone, with and without its padding
        for width in (IDS.shape[1], n):
            one = slice(i, i + 1), slice(0, width)
            alone = sensitivity_n_tokens(model, IDS[one], TARGETS[i:i + 1], maps[one],
                                         attention_mask=MASK[one], n_grid=GRID, nr_subsets=8,
                                         seed=11)
            torch.testing.assert_close(alone.curve[0], batch.curve[i], rtol=1e-5, atol=1e-6,
                                       equal_nan=True)
    order = torch.tensor([3, 0, 4, 2, 1])
    shuffled = sensitivity_n_tokens(model, IDS[order], TARGETS[order], maps[order],
                                    attention_mask=MASK[order], n_grid=GRID, nr_subsets=8,
                                    seed=11)
    torch.testing.assert_close(shuffled.curve, batch.curve[order], rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    other_seed = sensitivity_n_tokens(model, IDS, TARGETS, maps, attention_mask=MASK,
                                      n_grid=GRID, nr_subsets=8, seed=12)
    assert not torch.allclose(other_seed.curve[0, :4], batch.curve[0, :4])


def test_token_permutations_are_per_text_and_reproducible():
    draws = token_permutations(IDS, 7, attention_mask=MASK, seed=3)
    assert [tuple(d.shape) for d in draws] == [(7, int(n)) for n in LENGTHS]
    for d, n in zip(draws, LENGTHS, strict=True):
        assert torch.equal(d.sort(1).values, torch.arange(int(n)).expand_as(d))
    again = token_permutations(IDS[[2]], 9, attention_mask=MASK[[2]], seed=3)
    assert torch.equal(again[0][:7], draws[2])  # independent of the batch and nr_subsets
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    from_generator = token_permutations(IDS, 7, attention_mask=MASK, generator=g1)
    assert all(torch.equal(a, b) for a, b in zip(
        from_generator, token_permutations(IDS, 7, attention_mask=MASK, generator=g2),
        strict=True))
    # a generator is advanced: the next call draws anew
    assert not torch.equal(token_permutations(IDS, 7, attention_mask=MASK, generator=g1)[0],
                           from_generator[0])


# --- insertion and deletion ---------------------------------------------------------------------

@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("insert", [True, False])
def test_insertion_and_deletion_match_the_oracle(cls, insert):
    model = _model(cls)
    maps = _maps(seed=4)
    maps[0, 2] = maps[0, 4]  # a tie: the earlier token goes first
    metric = insertion_tokens if insert else deletion_tokens
    got = metric(model, IDS, TARGETS, maps, attention_mask=MASK)
    curves, aucs = oracle_insertion_deletion(model, IDS, MASK, maps, TARGETS.tolist(), insert)
    assert isinstance(got, TokenCurveResult)
    assert got.points.tolist() == (LENGTHS + 1).tolist()
    assert got.curve.shape == got.fractions.shape == (5, 7)
    for i, curve in enumerate(curves):
        k = len(curve)
        np.testing.assert_allclose(got.curve[i, :k].numpy(), curve, rtol=1e-5, atol=1e-6)
        assert bool(torch.isnan(got.curve[i, k:]).all() and torch.isnan(got.fractions[i, k:]).all())
        np.testing.assert_allclose(got.fractions[i, :k].numpy(), np.arange(k) / (k - 1))
    np.testing.assert_allclose(got.auc.numpy(), aucs, rtol=1e-5, atol=1e-6)


def test_insertion_with_logits_and_a_tensor_baseline():
    model = _model(TinyKim, seed=2)
    maps = _maps(seed=6)
    vector = torch.linspace(-0.5, 0.5, 8)
    got = insertion_tokens(model, IDS, 1, maps, attention_mask=MASK, baseline=vector,
                           softmax=False)
    with torch.no_grad():
        model.embedding.weight[39] = vector  # the same vector as a token id, for the oracle
    curves, aucs = oracle_insertion_deletion(model, IDS, MASK, maps, [1] * 5, True,
                                             baseline=39, softmax=False)
    for i, curve in enumerate(curves):
        np.testing.assert_allclose(got.curve[i, :len(curve)].numpy(), curve, rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(got.auc.numpy(), aucs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", [insertion_tokens, deletion_tokens])
def test_a_batch_of_mixed_lengths_scores_each_text_as_alone(metric):
    model = _model(TinyLSTM)
    maps = _maps(seed=8)
    batch = metric(model, IDS, TARGETS, maps, attention_mask=MASK)
    for i in range(IDS.shape[0]):
        n = int(LENGTHS[i])
        alone = metric(model, IDS[i:i + 1, :n], TARGETS[i:i + 1], maps[i:i + 1, :n])
        torch.testing.assert_close(alone.curve[0], batch.curve[i, :n + 1], rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(alone.auc[0], batch.auc[i], rtol=1e-5, atol=1e-6)


# --- padding ------------------------------------------------------------------------------------

def test_padding_is_never_drawn_or_removed_where_texts_cannot_be_trimmed():
    model = _model(ReadsPadding)
    with torch.no_grad():
        model.embedding.weight[0] = 0.7  # removing a padding token would show
    ids = torch.cat([IDS, torch.tensor([[0, 0, 17, 18, 19, 0]])])  # padding on both sides
    mask = ids != 0
    assert real_length(model, ids[1:2], mask[1:2]) == ids.shape[1]  # no trimming
    maps = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64).masked_fill(~mask, 1e6)  # ignored at padding
    model.seen.clear()
    sens = sensitivity_n_tokens(model, ids, 0, maps, attention_mask=mask, n_grid=(1, 2),
                                nr_subsets=6)
    dele = deletion_tokens(model, ids, 0, maps, attention_mask=mask)
    pad = model.embedding.weight[0].detach()
    assert model.seen
    for seen_ids, e in model.seen:
        at_padding = e[seen_ids == 0]
        torch.testing.assert_close(at_padding, pad.expand_as(at_padding))
    # the left-padded text's features are its three real tokens only
    assert sens.lengths[-1] == 3 and dele.points[-1] == 4
    # and the oracle (which only ever removes real tokens) agrees for the whole batch
    _, aucs = oracle_insertion_deletion(model, ids, mask, maps, [0] * 6, insert=False)
    draws = _draws(6, mask=mask)
    fixed = sensitivity_n_tokens(model, ids, 0, maps, attention_mask=mask, n_grid=(1, 2),
                                 draws=draws)
    expected = oracle_sensitivity_n(model, ids, mask, maps, [0] * 6, draws, (1, 2))
    np.testing.assert_allclose(dele.auc.numpy(), aucs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fixed.curve.numpy(), expected, rtol=1e-4, atol=1e-4)


# --- the generic runner -------------------------------------------------------------------------

def test_token_metric_runs_an_image_metric_per_text():
    model = _model(TinyKim)
    maps = _maps(seed=3)
    flipped = token_metric(pixel_flipping, model, IDS, TARGETS, maps, attention_mask=MASK)
    assert isinstance(flipped, TokenCurveResult)
    assert flipped.points.tolist() == LENGTHS.tolist()  # no unperturbed point
    deleted = deletion_tokens(model, IDS, TARGETS, maps, attention_mask=MASK)
    torch.testing.assert_close(flipped.curve[:, :6], deleted.curve[:, 1:], rtol=1e-5,
                               atol=1e-6, equal_nan=True)
    evidence = torch.zeros_like(MASK)
    evidence[:, 0] = True
    by_name = token_metric("relevance_mass_accuracy", model, IDS, None, maps,
                           attention_mask=MASK, masks=evidence)
    direct = token_metric(relevance_mass_accuracy, model, IDS, None, maps, attention_mask=MASK,
                          masks=evidence)
    assert by_name.shape == (5,)
    torch.testing.assert_close(by_name, direct)
    torch.testing.assert_close(by_name, token_localisation(maps, evidence, MASK).mass_accuracy)


def test_token_metric_puts_tensors_and_dicts_back_in_order():
    model = _model(TinyKim)

    def per_token(model, x, y, attributions, baseline=None):
        # one value per token: a (B, T) result, ragged across groups
        return {"a": attributions[:, 0], "x": x[:, 0, 0].double(), "b": baseline[0, 0, 0]
                .expand(x.shape[0], -1).double()}

    maps = _maps()
    got = token_metric(per_token, model, IDS, None, maps, attention_mask=MASK)
    assert got["a"].shape == (5, 6)
    torch.testing.assert_close(got["a"], maps.masked_fill(~MASK, math.nan), equal_nan=True)
    with torch.no_grad():
        e = model.embedding(IDS)[..., 0].double()
    torch.testing.assert_close(got["x"], e.masked_fill(~MASK, math.nan), equal_nan=True)
    assert bool((got["b"][MASK] == 0).all())


# --- localisation -------------------------------------------------------------------------------

def test_localisation_known_answers():
    maps = torch.tensor([[3.0, 1.0, 2.0, 0.0],
                         [0.1, 0.2, 100.0, 100.0],   # padding's values are ignored
                         [-1.0, -2.0, 0.0, 0.0],    # padding's 0 would outrank both tokens
                         [1.0, 2.0, 3.0, 4.0]])    # no evidence
    evidence = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    got = token_localisation(maps, evidence, mask)
    torch.testing.assert_close(got.mass_accuracy[:3],
                               torch.tensor([0.5, 2 / 3, 2 / 3], dtype=torch.float64))
    assert got.rank_accuracy[:3].tolist() == [1.0, 1.0, 0.0]
    assert got.top_k_intersection[:3].tolist() == [1.0, 1.0, 0.0]
    assert got.k.tolist() == [1, 1, 1, 0]
    assert math.isnan(got.mass_accuracy[3]) and math.isnan(got.rank_accuracy[3])
    assert math.isnan(got.top_k_intersection[3])
    # |a|: the second token of the third text now outranks the first
    assert token_localisation(maps, evidence, mask, abs=True).rank_accuracy[2] == 1.0
    # k = 3: all three tokens of text 0 (one evidence); text 1 has only two tokens: NaN
    two = token_localisation(maps, evidence, mask, k=3)
    assert two.top_k_intersection[0] == pytest.approx(1 / 3)
    assert math.isnan(two.top_k_intersection[1])


def test_localisation_matches_the_oracle_on_random_maps():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(40, 9, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 10, (40,), generator=g)
    mask = torch.arange(9)[None] < lengths[:, None]
    evidence = (torch.rand(40, 9, generator=g) < 0.3) & mask
    got = token_localisation(maps, evidence, mask)
    mass, rank = oracle_localisation(maps, evidence, mask)
    torch.testing.assert_close(got.mass_accuracy, mass, equal_nan=True)
    torch.testing.assert_close(got.rank_accuracy, rank, equal_nan=True)
    torch.testing.assert_close(got.top_k_intersection, rank, equal_nan=True)


# --- errors -------------------------------------------------------------------------------------

def test_bad_inputs_raise_typed_errors():
    model = _model(TinyKim)
    maps = _maps()
    run = {"attention_mask": MASK}
    with pytest.raises(InvalidInputError, match="shape"):
        sensitivity_n_tokens(model, IDS, None, maps[:, :4], **run)
    bad = maps.clone()
    bad[0, 0] = math.nan
    with pytest.raises(InvalidInputError, match="real tokens"):
        insertion_tokens(model, IDS, None, bad, **run)
    padded_nan = maps.clone()
    padded_nan[1, 5] = math.nan  # padding: ignored
    insertion_tokens(model, IDS, None, padded_nan, **run)
    with pytest.raises(InvalidTargetError):
        deletion_tokens(model, IDS, torch.tensor([0, 1]), maps, **run)
    with pytest.raises(InvalidTargetError):
        deletion_tokens(model, IDS, 7, maps, **run)
    with pytest.raises(InvalidInputError, match="n_grid"):
        sensitivity_n_tokens(model, IDS, None, maps, n_grid=(0, 2), **run)
    with pytest.raises(InvalidInputError, match="n_grid"):
        sensitivity_n_tokens(model, IDS, None, maps, n_grid=(1.5,), **run)
    with pytest.raises(InvalidInputError, match="nr_subsets"):
        sensitivity_n_tokens(model, IDS, None, maps, nr_subsets=1, **run)
    with pytest.raises(InvalidInputError, match="draws"):
        sensitivity_n_tokens(model, IDS, None, maps, draws=_draws(4)[:3], **run)
    not_permutations = _draws(4)
    not_permutations[0] = torch.zeros(4, 6, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="permutations"):
        sensitivity_n_tokens(model, IDS, None, maps, draws=not_permutations, **run)
    with pytest.raises(InvalidInputError, match="baseline"):
        insertion_tokens(model, IDS, None, maps, baseline="mean", **run)
    with pytest.raises(InvalidInputError, match="baseline"):
        token_metric(pixel_flipping, model, IDS, None, maps, baseline=0.0, **run)
    with pytest.raises(InvalidInputError, match="draws"):
        insertion_tokens(model, IDS, None, maps, draws=[1], **run)
    with pytest.raises(InvalidInputError, match="groups"):
        token_metric("faithfulness_correlation", model, IDS, None, maps, draws=[1], **run)
    with pytest.raises(InvalidInputError, match="unknown metric"):
        token_metric("no_such_metric", model, IDS, None, maps, **run)
    with pytest.raises(UnsupportedOperationError):
        token_metric(lambda model, x, y, a, **kw: "a string", model, IDS, None, maps, **run)
    with pytest.raises(UnsupportedOperationError, match="one value per text"):
        token_metric(lambda model, x, y, a, **kw: a.sum(), model, IDS, None, maps, **run)
    with pytest.raises(InvalidInputError, match="padding"):
        token_localisation(maps, torch.ones_like(MASK), MASK)
    with pytest.raises(InvalidInputError, match="binary|0 and 1"):
        token_localisation(maps, torch.full(MASK.shape, 2), MASK)
    with pytest.raises(InvalidInputError, match="no real token"):
        token_localisation(maps, MASK, torch.zeros_like(MASK))
    with pytest.raises(InvalidInputError, match="shape"):
        token_localisation(maps[0], MASK[0])
    with pytest.raises(InvalidInputError, match="k must"):
        token_localisation(maps, MASK & False, MASK, k=0)


# --- end to end ---------------------------------------------------------------------------------

def test_gradient_x_input_finds_planted_evidence_on_a_trained_kim_cnn():
    from srdxai.data.text import Vocabulary, make_planted_evidence
    from srdxai.models.text import KimCNN
    from srdxai.text_training import train_text_classifier

    shape = {"length": (6, 12), "evidence": (1, 2)}
    train = make_planted_evidence("train", size=1200, **shape)
    val = make_planted_evidence("val", size=200, **shape)
    test = make_planted_evidence("test", size=200, **shape)
    vocab = Vocabulary.build(train.texts)

    def encoded(split):
        return (*vocab.encode(split.texts, 12), split.labels)

    torch.manual_seed(0)
    model = KimCNN(len(vocab), 2, embed_dim=16, widths=(2, 3), filters=16, dropout=0.0)
    result = train_text_classifier(model, encoded(train), encoded(val), epochs=3, lr=1e-2,
                                   batch_size=64, seed=0, progress=False)
    assert result.best_val_accuracy > 0.9
    ids, mask, labels = encoded(test)
    evidence = test.evidence_mask(12)
    maps = srdxai.explain(model, ids, labels, "gradient_x_input", attention_mask=mask)
    random_maps = torch.rand(maps.shape, generator=torch.Generator().manual_seed(0))
    ours = token_localisation(maps, evidence, mask, abs=True)
    chance = token_localisation(random_maps, evidence, mask, abs=True)
    # a random map puts about (evidence / tokens) ~ 0.16 of its mass on the evidence
    assert float(chance.mass_accuracy.mean()) < 0.25
    assert float(ours.mass_accuracy.mean()) > float(chance.mass_accuracy.mean()) + 0.25
    assert float(ours.rank_accuracy.mean()) > float(chance.rank_accuracy.mean()) + 0.4
    signed = token_localisation(maps, evidence, mask)
    assert float(signed.rank_accuracy.mean()) > 0.8
