"""The sampling options object every sampling metric shares, and smooth MPRT's batched
denoising (one explain call per chunk of noisy copies, not one per noise draw)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import srdxai
from srdxai import metrics
from srdxai.errors import InvalidInputError
from srdxai.metrics import Sampling


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3)).eval()


def explain(model, x, y):
    return srdxai.explain(model, x, y, "gradient_x_input")


@pytest.fixture(scope="module")
def case():
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    return small_cnn(), x, torch.tensor([0, 2, 1])


#: every metric that takes the sampling object, with cheap options
SAMPLED = {
    "faithfulness_correlation": {"nr_runs": 5, "subset_size": 10},
    "mu_fidelity": {"nr_samples": 5},
    "sensitivity_n": {"nr_subsets": 3, "n_grid": [2, 8]},
    "local_lipschitz_estimate": {"nr_samples": 3},
    "max_sensitivity": {"nr_samples": 3},
    "avg_sensitivity": {"nr_samples": 3},
    "random_logit": {},
    "smooth_mprt": {"nr_samples": 2, "steps": 2},
    "infidelity": {"perturbation": "gaussian", "nr_samples": 3},
    "monotonicity_correlation": {"nr_samples": 2, "features_in_step": 16},
    "road": {"percentages": [10, 50], "readout": "logit", "noise": 0.5},
    "region_perturbation": {"patch_size": 4, "baseline": "uniform"},
    "selectivity": {"patch_size": 4, "baseline": "uniform"},
    "relative_input_stability": {"nr_samples": 3},
    "relative_output_stability": {"nr_samples": 3},
    "relative_representation_stability": {"nr_samples": 3},
}


def _values(result):
    if isinstance(result, torch.Tensor):
        return result
    for field in ("similarity", "curve"):
        if hasattr(result, field):
            value = getattr(result, field)
            return value["spearman"] if isinstance(value, dict) else value
    raise AssertionError(type(result))


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_one_object_or_keywords_give_the_same_draws(case, name):
    model, x, y = case
    fn = metrics.METRICS[name].function
    maps = explain(model, x, y)
    options = SAMPLED[name]
    by_object = fn(model, x, y, maps, explain=explain, **options,
                   sampling=Sampling(seed=4, batch_size=2))
    by_keywords = fn(model, x, y, maps, explain=explain, **options, seed=4, batch_size=2)
    other_seed = fn(model, x, y, maps, explain=explain, **options, sampling=Sampling(seed=5))
    a, b, c = _values(by_object), _values(by_keywords), _values(other_seed)
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert not torch.equal(a.nan_to_num(7.0), c.nan_to_num(7.0)), "the seed must matter"
    # a generator wins over the seed, and is advanced: the next call sees other draws
    g = torch.Generator().manual_seed(4)
    first = _values(fn(model, x, y, maps, explain=explain, **options, generator=g))
    second = _values(fn(model, x, y, maps, explain=explain, **options, generator=g))
    assert not torch.equal(first.nan_to_num(7.0), second.nan_to_num(7.0))


def test_giving_a_field_twice_or_an_unknown_keyword_is_refused(case):
    model, x, y = case
    maps = explain(model, x, y)
    with pytest.raises(InvalidInputError, match=r"\['seed'\] inside sampling= or as keywords"):
        metrics.faithfulness_correlation(model, x, y, maps, nr_runs=4, subset_size=8,
                                         sampling=Sampling(seed=1), seed=2)
    with pytest.raises(TypeError, match="unexpected keyword.*'sead'.*sampling options"):
        metrics.faithfulness_correlation(model, x, y, maps, sead=2)
    with pytest.raises(InvalidInputError, match="sampling must be a srdxai.metrics.Sampling"):
        metrics.insertion(model, x, y, maps, sampling={"seed": 1})
    with pytest.raises(InvalidInputError, match="takes no explicit draws"):
        metrics.random_logit(model, x, y, maps, explain=explain, draws=torch.zeros(3))


@pytest.mark.parametrize("field, value, message", [
    ("seed", 1.5, "seed must be an int or None"), ("seed", True, "seed must be an int"),
    ("generator", 3, "generator must be a torch.Generator"),
    ("batch_size", 0, "batch_size must be a positive int"),
    ("batch_size", 2.0, "batch_size must be a positive int"),
    ("progress", "yes", "progress must be True or False")])
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(InvalidInputError, match=message):
        Sampling(**{field: value})
    with pytest.raises(InvalidInputError, match=message):
        Sampling().replace(**{field: value})


def test_sampling_is_immutable_and_its_seed_reproduces():
    run = Sampling(seed=3)
    with pytest.raises(AttributeError):
        run.seed = 4  # type: ignore[misc]
    assert torch.equal(torch.rand(5, generator=run.make_generator()),
                       torch.rand(5, generator=run.make_generator()))
    fresh = Sampling(seed=None)
    assert not torch.equal(torch.rand(5, generator=fresh.make_generator()),
                           torch.rand(5, generator=fresh.make_generator()))


def _denoised_by_loop(model, x, y, nr_samples, magnitude, seed):
    """Smooth MPRT's denoised map from its definition: draw s is one N(0, 1) tensor of x's
    shape (float64, drawn in order from a generator seeded with ``seed``), scaled per sample by
    ``magnitude * (max - min)``; the map is the mean over the draws, one explain call each."""
    g = torch.Generator().manual_seed(seed)
    scale = magnitude * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    total = 0
    for _ in range(nr_samples):
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
        total = total + explain(model, x + scale.view(-1, 1, 1, 1) * noise, y).double()
    return total / nr_samples


def test_smooth_mprt_denoises_in_batched_calls_equal_to_a_loop_over_draws(case):
    model, x, y = case
    calls = []

    def counting(m, xx, yy):
        calls.append(xx.shape[0])
        return explain(m, xx, yy)

    results = {}
    for size in (1, 4, None):
        calls.clear()
        results[size] = metrics.smooth_mprt(model, x, y, explain=counting, nr_samples=5,
                                            steps=2, measures=("spearman",), keep_maps=True,
                                            seed=7, batch_size=size)
        per_model = math.ceil(5 * 3 / (size or 15))
        assert len(calls) == 3 * per_model, (size, calls)  # original + 2 steps; no draw loop
    for size in (1, 4):
        assert torch.allclose(results[size].maps, results[None].maps, rtol=1e-6, atol=1e-9)
    expected = _denoised_by_loop(model, x, y, 5, 0.1, 7)
    expected = expected if expected.dim() == 3 else expected.sum(1)  # the kept pixel maps
    assert torch.allclose(results[None].original, expected, rtol=1e-5, atol=1e-7)


def test_no_metric_repeats_the_sampling_fields_in_its_signature():
    import inspect

    fields = {"seed", "generator", "draws", "batch_size", "progress"}
    for info in metrics.METRICS.values():
        parameters = inspect.signature(info.function).parameters
        assert not fields & set(parameters), (info.name, fields & set(parameters))
        if "model" in info.needs:  # it runs the model: batch size and progress apply
            assert "sampling" in parameters, info.name
    assert SAMPLED.keys() <= metrics.METRICS.keys()
