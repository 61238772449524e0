"""Metrics never score a non-finite value silently: NaN/Inf options are refused, a model output
that overflows raises NonFiniteError naming the metric and the samples, and NaN comes back only
where docs/metrics.md defines it as the answer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import srdxai
from srdxai import metrics as M
from srdxai.errors import InvalidInputError, InvalidTargetError, NonFiniteError

torch.manual_seed(0)
NET = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(), nn.Linear(4, 3)).eval()
X = torch.randn(4, 3, 8, 8)
Y = torch.tensor([0, 1, 2, 0])
A = torch.rand(4, 8, 8)


def explain(model, x, y):
    return srdxai.explain(model, x, y, "gradient")


class Overflows(nn.Module):
    """NET, except that the logits become Inf wherever an input value exceeds ``limit`` and for
    the samples listed in ``always``: a model that breaks on out-of-range inputs."""

    def __init__(self, limit: float = 5.0, always: tuple[int, ...] = ()):
        super().__init__()
        self.net, self.limit, self.always = NET, limit, always

    def forward(self, x):
        out = self.net(x)
        big = x.flatten(1).abs().amax(1) > self.limit
        for i in self.always:
            if i < len(big):
                big = big.clone()
                big[i] = True
        return torch.where(big[:, None], torch.full_like(out, math.inf), out)


BAD_OPTIONS = {
    "faithfulness baseline nan": lambda: M.faithfulness_correlation(
        NET, X, Y, A, baseline=math.nan, subset_size=4, nr_runs=3),
    "faithfulness baseline -inf": lambda: M.faithfulness_correlation(
        NET, X, Y, A, baseline=-math.inf, subset_size=4, nr_runs=3),
    "pixel flipping baseline tensor nan": lambda: M.pixel_flipping(
        NET, X, Y, A, baseline=torch.full((3, 1, 1), math.nan), features_in_step=16),
    "insertion baseline nan": lambda: M.insertion(NET, X, Y, A, baseline=math.nan),
    "deletion baseline string": lambda: M.deletion(NET, X, Y, A, baseline="nan"),
    "sensitivity-n baseline inf": lambda: M.sensitivity_n(
        NET, X, Y, A, baseline=math.inf, nr_subsets=3),
    "gae mask_value nan": lambda: M.gae(NET, X, Y, explain=explain, mask_value=math.nan),
    "lipschitz std nan": lambda: M.local_lipschitz_estimate(
        NET, X, Y, A, explain=explain, nr_samples=2, perturb_std=math.nan),
    "lipschitz std 0": lambda: M.local_lipschitz_estimate(
        NET, X, Y, A, explain=explain, nr_samples=2, perturb_std=0.0),
    "lipschitz mean inf": lambda: M.local_lipschitz_estimate(
        NET, X, Y, A, explain=explain, nr_samples=2, perturb_mean=math.inf),
    "max sensitivity bound nan": lambda: M.max_sensitivity(
        NET, X, Y, A, explain=explain, nr_samples=2, lower_bound=math.nan),
    "avg sensitivity bound 0": lambda: M.avg_sensitivity(
        NET, X, Y, A, explain=explain, nr_samples=2, lower_bound=0.0),
    "avg sensitivity upper inf": lambda: M.avg_sensitivity(
        NET, X, Y, A, explain=explain, nr_samples=2, lower_bound=0.0, upper_bound=math.inf),
    "robustness draws nan": lambda: M.max_sensitivity(
        NET, X, Y, A, explain=explain, draws=torch.full((2, *X.shape), math.nan)),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_non_finite_options_are_refused(case):
    with pytest.raises(InvalidInputError,
                       match="NaN or Inf|finite number|must be a number|unknown baseline"):
        BAD_OPTIONS[case]()


OVERFLOWING = {
    "faithfulness correlation": lambda m: M.faithfulness_correlation(
        m, X, Y, A, baseline=100.0, subset_size=4, nr_runs=3),
    "pixel flipping": lambda m: M.pixel_flipping(m, X, Y, A, baseline=100.0,
                                                 features_in_step=16),
    "insertion": lambda m: M.insertion(m, X, Y, A, baseline=100.0),
    "deletion": lambda m: M.deletion(m, X, Y, A, baseline=100.0),
    "sensitivity-n": lambda m: M.sensitivity_n(m, X, Y, A, baseline=100.0, nr_subsets=3),
}


@pytest.mark.parametrize("metric", list(OVERFLOWING))
def test_overflow_on_perturbed_inputs_raises_naming_metric(metric):
    # X stays within |5| (randn), so only the perturbed copies overflow
    assert X.abs().max() < 5
    with pytest.raises(NonFiniteError, match=rf"{metric}.*NaN or Inf.*samples 0.*baseline"):
        OVERFLOWING[metric](Overflows())


@pytest.mark.parametrize("metric", ["faithfulness correlation", "deletion", "sensitivity-n"])
def test_overflow_on_the_clean_inputs_names_the_sample(metric):
    # sample 2 overflows even unperturbed (the predicted class is needed first: y=None)
    call = {"faithfulness correlation": lambda m: M.faithfulness_correlation(
                m, X, None, A, baseline=0.0, subset_size=4, nr_runs=3),
            "deletion": lambda m: M.deletion(m, X, None, A),
            "sensitivity-n": lambda m: M.sensitivity_n(m, X, None, A, nr_subsets=3)}[metric]
    with pytest.raises(NonFiniteError, match=r"of samples 2\)") as info:
        call(Overflows(always=(2,)))
    assert metric in str(info.value)


def test_robustness_and_gae_check_model_outputs():
    with pytest.raises(NonFiniteError, match="local_lipschitz_estimate.*samples 1"):
        M.local_lipschitz_estimate(Overflows(always=(1,)), X, None, A, explain=explain,
                                   nr_samples=2)
    with pytest.raises(NonFiniteError, match="max_sensitivity"):
        M.max_sensitivity(Overflows(limit=1.5), X, Y, A, explain=explain, nr_samples=2,
                          lower_bound=4.0, nan_when_prediction_changes=True)
    with pytest.raises(NonFiniteError, match="gae"):
        M.gae(Overflows(always=(3,)), X, Y, explain=explain)


def test_defined_nans_are_the_documented_ones():
    zero = torch.zeros(4, 8, 8)
    # a constant map has no correlation
    assert M.faithfulness_correlation(NET, X, Y, zero, subset_size=4, nr_runs=3).isnan().all()
    # an all-zero map has no distribution
    assert M.complexity(NET, X, Y, zero).isnan().all()
    # an all-zero reference map has no relative change (Quantus: NaN or Inf)
    scores = M.max_sensitivity(NET, X, Y, zero, explain=explain, nr_samples=2)
    assert scores.isnan().all()
    assert not scores.isinf().any()
    # the same metrics on ordinary maps are finite
    assert torch.isfinite(M.faithfulness_correlation(NET, X, Y, A, subset_size=4,
                                                     nr_runs=3)).all()
    assert torch.isfinite(M.max_sensitivity(NET, X, Y, A, explain=explain, nr_samples=2)).all()


def test_finite_check_of_logits_whose_sum_overflows():
    from srdxai.metrics.common import check_finite_logits

    # finite logits whose sum overflows (the quick check) are looked at closely and pass
    huge = torch.full((3, 4), 3e38)
    owners = torch.tensor([7, 8, 9])
    assert check_finite_logits(huge, "m", owners) is huge
    for bad in (math.inf, -math.inf, math.nan):
        out = huge.clone()
        out[1, 2] = bad
        with pytest.raises(NonFiniteError, match=r"1 of 3 inputs \(of samples 8\)"):
            check_finite_logits(out, "m", owners)
        # without owners the rows are named
        with pytest.raises(NonFiniteError, match=r"of samples 1\)"):
            check_finite_logits(out, "m")
    # +Inf and -Inf in one row sum to NaN; in different rows both are named
    out = torch.zeros(3, 4)
    out[0, 0], out[2, 1] = math.inf, -math.inf
    with pytest.raises(NonFiniteError, match=r"2 of 3 inputs \(of samples 7, 9\)"):
        check_finite_logits(out, "m", owners)


@pytest.mark.parametrize("metric", ["deletion", "faithfulness correlation"])
def test_a_target_one_past_the_last_class_is_refused(metric):
    y = torch.tensor([0, 1, 3, 0])  # NET has 3 outputs: class 3 is one past the last
    call = {"deletion": lambda: M.deletion(NET, X, y, A),
            "faithfulness correlation": lambda: M.faithfulness_correlation(
                NET, X, y, A, subset_size=4, nr_runs=3)}[metric]
    with pytest.raises(InvalidTargetError, match=r"classes >= the model's 3 outputs: \[3\]"):
        call()


@pytest.mark.parametrize("held", [4096, 7])
def test_a_non_finite_output_in_a_later_chunk_names_its_sample(monkeypatch, held):
    # only sample 3's perturbed copies overflow (its baseline is 50; the others' 0), in chunks
    # of 5 inputs: the logits of consecutive chunks are checked together (all of them, or
    # blocks of 7 rows, so that a block ends inside a chunk's successor), and the error still
    # names sample 3 alone
    from srdxai.metrics import common

    monkeypatch.setattr(common, "_PENDING_ROWS", held)
    base = torch.zeros(4, 3, 8, 8)
    base[3] = 50.0
    with pytest.raises(NonFiniteError, match=r"pixel flipping.*of samples 3\)"):
        M.pixel_flipping(Overflows(limit=40.0), X, Y, A, baseline=base, features_in_step=8,
                         batch_size=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_all_finite_is_the_elementwise_test_also_where_the_sum_overflows(dtype):
    # one sum decides the usual case; finite values whose sum overflows are still finite, and
    # one NaN or Inf among them is still found
    from srdxai.metrics.common import all_finite

    big = torch.finfo(dtype).max
    assert all_finite(torch.randn(4, 3, 8, 8).to(dtype))
    assert all_finite(torch.full((2, 5), big, dtype=dtype))  # the sum is inf, the values not
    assert all_finite(torch.tensor([big, -big, big], dtype=dtype))
    for bad in (math.nan, math.inf, -math.inf):
        values = torch.full((2, 5), big, dtype=dtype)
        values[1, 3] = bad
        assert not all_finite(values)
        assert not all_finite(torch.randn(3, 4).to(dtype).index_fill_(1, torch.tensor([2]), bad))
    assert all_finite(torch.tensor([2**62, -(2**62)]))  # integers are finite
    # a map holding NaN or Inf is still refused by name
    with pytest.raises(InvalidInputError, match="attributions contain NaN or Inf"):
        M.pixel_flipping(NET, X, Y, A.index_fill(1, torch.tensor([2]), math.inf))
