"""The metric registry: every metric declares its family, direction and needs where it is
defined, the declarations are honest, and the report and the CLI read them."""

from __future__ import annotations

import inspect

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import srdxai
from srdxai import metrics
from srdxai.cli import cli
from srdxai.errors import InvalidInputError, SrdxaiError
from srdxai.metrics.registry import register_metric, row_direction
from srdxai.report import tables

#: public functions with the metric call that are not metrics of their own
NOT_METRICS = {"faithfulness_correlations"}  # several readings of faithfulness_correlation


def _metric_functions() -> set[str]:
    found = set()
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        if inspect.isfunction(obj) and list(inspect.signature(obj).parameters)[:4] == [
                "model", "x", "y", "attributions"]:
            found.add(name)
    return found - NOT_METRICS


def test_every_public_metric_is_registered_with_complete_metadata():
    assert set(metrics.METRICS) == _metric_functions()
    for info in metrics.METRICS.values():
        assert info.function is getattr(metrics, info.name)
        assert info.family in metrics.FAMILIES
        assert info.direction in ("higher", "lower")
        assert info.summary.endswith(".") and len(info.summary) > 20, info.name
        # a metric returning curves labels their axes (tests/test_report_figures.py: the report)
        returns_curves = "Result" in info.returns and info.name != "gae"
        assert (info.axes is not None) == returns_curves, info.name


def test_the_bench_rows_take_their_direction_from_the_metric_that_writes_them():
    expected = {"fidelity": "higher", "fidelity[abs]": "higher", "mufidelity": "higher",
                "pointing_game": "higher", "pointing_game_15px": "higher",
                "attribution_localisation": "higher", "sparseness": "higher",
                "stability": "lower", "auc_insertion": "higher", "auc_deletion": "lower",
                "sensitivity_n_mean": "higher", "gae": "higher", "contrastiveness": "higher"}
    for row, way in expected.items():
        assert row_direction(row) == way, row
        assert tables.direction(row) == way, row
    # experiment-level rows no metric writes keep the report's own declarations
    assert row_direction("accuracy") is None and tables.direction("accuracy") == "higher"
    assert tables.direction("pcc_to_target") == "lower"


def test_a_registration_error_is_caught_at_import_time():
    with pytest.raises(ValueError, match="unknown metric family"):
        register_metric(family="vibes", direction="higher")
    with pytest.raises(ValueError, match="direction"):
        register_metric(family="complexity", direction="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown needs"):
        register_metric(family="complexity", direction="lower", needs=("gpu",))
    with pytest.raises(ValueError, match="registered twice"):
        register_metric(family="complexity", direction="lower")(metrics.sparseness)
    with pytest.raises(ValueError, match="axes must be"):
        register_metric(family="faithfulness", direction="lower", axes=("x", "y", "sqrt"))
    with pytest.raises(ValueError, match="axes must be"):
        register_metric(family="faithfulness", direction="lower",
                        axes=("x", "y"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="unknown metric 'fidelty'"):
        metrics.metric_info("fidelty")


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0])
    maps = srdxai.explain(model, x, y, "gradient_x_input")
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 4:10, 4:10] = True

    def explain(m, xx, yy):
        return srdxai.explain(m, xx, yy, "gradient_x_input")

    return model, x, y, maps, masks, explain


SMALL = {"faithfulness_correlation": {"nr_runs": 4, "subset_size": 8},
         "mu_fidelity": {"nr_samples": 4}, "sensitivity_n": {"nr_subsets": 4},
         "local_lipschitz_estimate": {"nr_samples": 2}, "max_sensitivity": {"nr_samples": 2},
         "avg_sensitivity": {"nr_samples": 2}, "pixel_flipping": {"features_in_step": 64},
         "insertion": {"step": 64}, "deletion": {"step": 64}, "top_k_intersection": {"k": 20},
         "smooth_mprt": {"nr_samples": 2},
         "monotonicity_correlation": {"nr_samples": 2, "features_in_step": 64}}


@pytest.mark.parametrize("name", sorted(metrics.METRICS))
def test_needs_are_honest(case, name):
    """A metric runs with exactly what it declares, and refuses (clearly) without it."""
    model, x, y, maps, masks, explain = case
    info = metrics.METRICS[name]
    given = {"masks": masks, "explain": explain}
    options = SMALL.get(name, {})
    kwargs = {need: given[need] for need in info.needs if need in given}
    info.function(model, x, y, maps, **kwargs, **options)  # what it declares is enough
    for need in info.needs:
        if need == "model":
            continue
        missing = {k: v for k, v in kwargs.items() if k != need}
        with pytest.raises(SrdxaiError, match=need):  # even with the maps given
            info.function(model, x, y, maps, **missing, **options)


def test_srdxai_metrics_lists_them_family_by_family():
    result = CliRunner().invoke(cli, ["metrics"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == [m.name for m in metrics.by_family()]
    families = [line.split()[1] for line in lines]
    assert families == sorted(families, key=metrics.FAMILIES.index)
    stability = next(line for line in lines if line.startswith("local_lipschitz_estimate"))
    assert "lower is better" in stability and "needs model, explain" in stability
    # the columns line up, also after the longest name (relative_representation_stability)
    family_starts = {line.index(f" {info.family} ") for line, info in
                     zip(lines, metrics.by_family(), strict=True)}
    assert family_starts == {max(len(m.name) for m in metrics.by_family())}
    needs_starts = {line.index(" needs ") for line in lines}
    assert len(needs_starts) == 1, needs_starts
