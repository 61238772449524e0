"""Self-checks of the LSTM SRD oracle (tests/srd_lstm_oracle.py), independent of srdxai's
implementation: the oracle's recomputed forward equals the model's logits (right, left and
middle padding, no mask), the map sums to the target logit and so does every cut between steps
(several seeds, targets and masks, padding included), padding tokens get exactly 0 and a padded
gap changes nothing, a batch is per sample (one target or one per sample), one LSTM step with
tiny hand-set numbers gives the hand-derived relevances, and deliberately wrong rules (the sums
split entry by entry, relevance for the gates, the bias of ``hh`` at the first step treated as a
source) give a different map or break conservation. The maps are non-trivial: non-zero at every
real token and different between targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import srd_lstm_oracle as ora
import srd_token_oracle as tok
from small_text_models import TinyLSTM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)

DT = torch.float64

IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 0, 0, 0], [12, 13, 14, 15, 0, 0],
                    [21, 22, 23, 0, 0, 0]])
# ids are non-zero under every mask below, so only the mask makes a token padding
IDS_FULL = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 17, 18, 19], [12, 13, 14, 15, 16, 1],
                         [21, 22, 23, 24, 25, 26]])
MASKS = {
    "none": torch.ones(4, 6, dtype=torch.bool),
    "right": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                           [1, 0, 0, 0, 0, 0]], dtype=torch.bool),
    "left": torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1],
                          [0, 0, 0, 1, 1, 0]], dtype=torch.bool),
    "middle": torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 1],
                            [1, 0, 0, 0, 0, 1]], dtype=torch.bool),
}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _model_logits(model: TinyLSTM, ids: Tensor, mask: Tensor | None) -> Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_recomputed_forward_equals_the_models_logits(seed: int, mask_name: str) -> None:
    model = ora.tiny_lstm(seed)
    mask = MASKS[mask_name]
    got = ora.oracle_lstm_logits(model, IDS_FULL, mask)
    want = _model_logits(model, IDS_FULL, mask)
    assert got.dtype == DT
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_recomputed_forward_without_a_mask_reads_padding_from_the_ids() -> None:
    model = ora.tiny_lstm(3)
    torch.testing.assert_close(ora.oracle_lstm_logits(model, IDS, None),
                               _model_logits(model, IDS, None), rtol=1e-12, atol=1e-12)


def test_the_models_biases_are_random_and_non_zero() -> None:
    model = ora.tiny_lstm(0)
    for layer in (model.ih, model.hh, model.fc):
        assert float(layer.bias.detach().abs().min()) > 1e-4
    other = ora.tiny_lstm(1)
    assert not torch.equal(model.hh.bias, other.hh.bias)


# --------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_the_map_and_every_cut_sum_to_the_target_logit(seed: int, mask_name: str) -> None:
    model = ora.tiny_lstm(seed)
    mask = MASKS[mask_name]
    for n in range(IDS_FULL.shape[0]):
        for target in range(3):
            tr = ora.srd_lstm_oracle_trace(model, IDS_FULL[n], mask[n], target)
            logit = tr.target_logit
            tol = 1e-9 * abs(logit)
            assert abs(float(tr.r_e.sum()) - logit) <= tol, (n, target)
            assert abs(tr.lost) <= tol
            # the cut after step t: the states carry what the later tokens did not take
            for t in range(IDS_FULL.shape[1]):
                cut = tr.r_h[t + 1] + tr.r_c[t + 1] + float(tr.r_e[t + 1:].sum())
                assert abs(cut - logit) <= tol, (n, target, t)
            # the constant initial states get nothing; padding tokens get exactly 0
            assert tr.r_h[0] == 0.0 and tr.r_c[0] == 0.0
            assert bool((tr.r_e[~mask[n]] == 0).all())


def test_a_padded_gap_changes_nothing_for_the_real_tokens() -> None:
    model = ora.tiny_lstm(4)
    real = torch.tensor([[3, 5, 7]])
    gapped = torch.tensor([[9, 3, 30, 5, 31, 32, 7, 33]])
    gmask = torch.tensor([[0, 1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    for target in range(3):
        a = ora.srd_lstm_oracle(model, real, torch.ones_like(real, dtype=torch.bool), target)
        b = ora.srd_lstm_oracle(model, gapped, gmask, target)
        torch.testing.assert_close(b[0, gmask[0]], a[0], rtol=1e-12, atol=1e-12)
        assert bool((b[0, ~gmask[0]] == 0).all())


def test_a_sample_without_real_tokens_has_a_zero_map() -> None:
    model = ora.tiny_lstm(0)
    tr = ora.srd_lstm_oracle_trace(model, IDS_FULL[0], torch.zeros(6, dtype=torch.bool), 1)
    assert bool((tr.r_e == 0).all())
    assert tr.lost == pytest.approx(tr.target_logit, rel=1e-12)


# --------------------------------------------------------------------------- batch


def test_a_batch_is_per_sample() -> None:
    model = ora.tiny_lstm(5)
    mask = MASKS["middle"]
    targets = [2, 0, 1, 2]
    batch = ora.srd_lstm_oracle(model, IDS_FULL, mask, targets)
    assert batch.shape == IDS_FULL.shape and batch.dtype == DT
    as_tensor = ora.srd_lstm_oracle(model, IDS_FULL, mask, torch.tensor(targets))
    assert torch.equal(batch, as_tensor)
    for n, target in enumerate(targets):
        alone = ora.srd_lstm_oracle(model, IDS_FULL[n:n + 1], mask[n:n + 1], target)
        torch.testing.assert_close(batch[n:n + 1], alone, rtol=0, atol=0)
    one = ora.srd_lstm_oracle(model, IDS_FULL, mask, 1)
    assert torch.equal(one, ora.srd_lstm_oracle(model, IDS_FULL, mask, [1] * 4))
    with pytest.raises(ValueError):
        ora.srd_lstm_oracle(model, IDS_FULL, mask, [0, 1])


# --------------------------------------------------------------------------- hand check


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_model() -> TinyLSTM:
    """E = H = 1, one class: every vector is a scalar except the 4-entry ``z``."""
    model = TinyLSTM(vocab=4, dim=1, hidden=1, classes=1).double().eval()
    with torch.no_grad():
        model.embedding.weight.copy_(torch.tensor([[0.0], [1.0], [0.6], [0.5]], dtype=DT))
        model.ih.weight.copy_(torch.tensor([[0.5], [-0.3], [0.8], [0.2]], dtype=DT))
        model.ih.bias.copy_(torch.tensor([0.1, 0.2, -0.1, 0.3], dtype=DT))
        model.hh.weight.copy_(torch.tensor([[0.4], [0.6], [-0.5], [0.7]], dtype=DT))
        model.hh.bias.copy_(torch.tensor([-0.2, 0.1, 0.3, 0.05], dtype=DT))
        model.fc.weight.copy_(torch.tensor([[1.5]], dtype=DT))
        model.fc.bias.copy_(torch.tensor([0.25], dtype=DT))
    return model


def test_two_steps_by_hand() -> None:
    wi, bi = [0.5, -0.3, 0.8, 0.2], [0.1, 0.2, -0.1, 0.3]
    wh, bh = [0.4, 0.6, -0.5, 0.7], [-0.2, 0.1, 0.3, 0.05]
    e0, e1 = 1.0, 0.6                                    # tokens 1 and 2
    # step 0: h = c = 0, so z0 = ih(e0) + hh's bias and c_new = q
    i0, f0, g0, o0 = (wi[k] * e0 + bi[k] + bh[k] for k in range(4))
    c0 = _sig(i0) * math.tanh(g0)
    h0 = _sig(o0) * math.tanh(c0)
    # step 1
    a = [wi[k] * e1 + bi[k] for k in range(4)]
    b = [wh[k] * h0 + bh[k] for k in range(4)]
    z = [a[k] + b[k] for k in range(4)]
    i1, f1, g1, o1 = z
    p, q = _sig(f1) * c0, _sig(i1) * math.tanh(g1)
    c1 = p + q
    h1 = _sig(o1) * math.tanh(c1)
    logit = 1.5 * h1 + 0.25
    # backward: h1 -> tanh(c1) -> c1 = p + q (scalars: mu = p / c1, q / c1)
    r_p, r_q = logit * p / c1, logit * q / c1
    zz = sum(v * v for v in z)
    mu_a = sum(a[k] * z[k] for k in range(4)) / zz      # z1 = a + b, shared by vectors
    mu_b = sum(b[k] * z[k] for k in range(4)) / zz
    r_e1 = r_q * mu_a
    r_h0, r_c0 = r_q * mu_b, r_p                         # via hh and via the gated p
    r_e0 = r_h0 + r_c0                                   # step 0 gives everything to e0
    assert 0.05 < abs(mu_a) and 0.05 < abs(mu_b) and 0.05 < abs(p / c1) < 0.95  # not trivial

    model = _hand_model()
    got = ora.srd_lstm_oracle(model, torch.tensor([[1, 2]]), torch.tensor([[True, True]]), 0)
    torch.testing.assert_close(got, torch.tensor([[r_e0, r_e1]], dtype=DT), rtol=1e-12,
                               atol=1e-14)
    tr = ora.srd_lstm_oracle_trace(model, torch.tensor([1, 2]), None, 0)
    assert tr.target_logit == pytest.approx(logit, rel=1e-13)
    assert tr.r_h[1] == pytest.approx(r_h0, rel=1e-12)
    assert tr.r_c[1] == pytest.approx(r_c0, rel=1e-12)
    # the same with padding before, between and after (token 3 masked out)
    padded = ora.srd_lstm_oracle(model, torch.tensor([[3, 1, 3, 2, 3]]),
                                 torch.tensor([[False, True, False, True, False]]), 0)
    torch.testing.assert_close(padded, torch.tensor([[0.0, r_e0, 0.0, r_e1, 0.0]], dtype=DT),
                               rtol=1e-12, atol=1e-14)


def test_the_sharing_rule_on_tiny_vectors() -> None:
    # z = a + b by vectors: mu_a = <a, z> / ||z||^2 = (1*3 + 0*1) / 10
    z_a, z_b = torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([2.0, 1.0], dtype=DT)
    mu = tok.shares(z_a + z_b, [z_a, z_b], [True, True])
    assert mu == pytest.approx([0.3, 0.7], rel=1e-14)
    # a constant second operand (hh's bias at t = 0) joins the first one: mu_a = 1
    assert tok.shares(z_a + z_b, [z_a, z_b], [True, False]) == pytest.approx([1.0, 0.0])


# --------------------------------------------------------------------------- wrong variants


def _entrywise(y: Tensor, contributions: list[Tensor], dependent: list[bool]) -> list[float]:
    """Wrong: each entry split by its own ratio c_k / y_k, averaged over the entries."""
    if not all(dependent):
        return tok.shares(y, contributions, dependent)
    return [float((c / y).mean()) for c in contributions]


def _bias_as_source(y: Tensor, contributions: list[Tensor], dependent: list[bool]
                    ) -> list[float]:
    """Wrong: a constant operand (hh's bias at t = 0) shares like an input-dependent one."""
    return tok.shares(y, contributions, [True] * len(contributions))


@pytest.mark.parametrize("seed", [0, 1])
def test_entrywise_sums_conserve_but_change_the_map(seed: int) -> None:
    model = ora.tiny_lstm(seed)
    mask = MASKS["right"]
    right = ora.srd_lstm_oracle(model, IDS_FULL, mask, 1)
    wrong = ora.srd_lstm_oracle(model, IDS_FULL, mask, 1, sum_rule=_entrywise)
    logits = ora.oracle_lstm_logits(model, IDS_FULL, mask)[:, 1]
    torch.testing.assert_close(wrong.sum(1), logits, rtol=1e-9, atol=1e-12)
    assert _rel(wrong, right) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_relevance_for_the_gates_conserves_but_changes_the_map(seed: int) -> None:
    model = ora.tiny_lstm(seed)
    mask = MASKS["left"]
    right = ora.srd_lstm_oracle(model, IDS_FULL, mask, 2)
    wrong = ora.srd_lstm_oracle(model, IDS_FULL, mask, 2, gate_share=0.5)
    logits = ora.oracle_lstm_logits(model, IDS_FULL, mask)[:, 2]
    torch.testing.assert_close(wrong.sum(1), logits, rtol=1e-9, atol=1e-12)
    assert _rel(wrong, right) > 1e-3


def test_the_bias_of_hh_as_a_source_breaks_conservation() -> None:
    model = ora.tiny_lstm(0)
    mask = MASKS["left"]
    logits = ora.oracle_lstm_logits(model, IDS_FULL, mask)[:, 0]
    wrong = ora.srd_lstm_oracle(model, IDS_FULL, mask, 0, sum_rule=_bias_as_source)
    gap = (wrong.sum(1) - logits).abs() / logits.abs()
    assert float(gap.min()) > 1e-6
    tr = ora.srd_lstm_oracle_trace(model, IDS_FULL[0], mask[0], 0, sum_rule=_bias_as_source)
    assert abs(tr.lost) > 1e-6 * abs(tr.target_logit)


# --------------------------------------------------------------------------- non-trivial


@pytest.mark.parametrize("seed", [0, 6])
def test_the_map_is_non_trivial(seed: int) -> None:
    model = ora.tiny_lstm(seed)
    mask = MASKS["right"]
    maps = [ora.srd_lstm_oracle(model, IDS_FULL, mask, k) for k in range(3)]
    for m in maps:
        assert bool((m[mask].abs() > 1e-8).all())
        assert bool((m[~mask] == 0).all())
    for k in range(3):
        for j in range(k):
            assert _rel(maps[k], maps[j]) > 1e-2
    # not a multiple of the target logit spread evenly over the real tokens
    first = maps[0][0]
    assert float(first.max() - first.min()) > 1e-3 * float(first.abs().max())
