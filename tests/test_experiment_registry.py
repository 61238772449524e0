"""The experiment registry: every experiment is one module that states its data, methods,
units and report section; a new one (here a user's, defined in the test) runs through
``srdxai bench``'s runner and shows up in the report with its own section and figures."""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import pytest
import torch

from srdxai import metrics
from srdxai.errors import InvalidInputError
from srdxai.experiments import (
    EXPERIMENTS,
    BenchConfig,
    Experiment,
    UnitInputs,
    UnitResult,
    experiment,
    experiment_names,
    jobs,
    register_experiment,
    run,
)
from srdxai.experiments.config import DEFAULT_EXPERIMENTS
from srdxai.experiments.data import Source
from srdxai.report.render import build_report

FASHION = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists()
    and not os.environ.get("SRDXAI_FASHION_MNIST"),
    reason="Fashion-MNIST is not installed (make data)")


def test_the_shipped_experiments_are_registered_in_the_default_run_order():
    # evaluate (your model and data) runs only when asked for, with a setup
    assert experiment_names() == DEFAULT_EXPERIMENTS + ("evaluate",)
    assert BenchConfig().experiments == list(DEFAULT_EXPERIMENTS)
    assert experiment("evaluate").sources(BenchConfig()) == []
    positions = [e.report_position for e in EXPERIMENTS.values()]
    assert len(set(positions)) == len(positions)  # the report order is never ambiguous
    for name in DEFAULT_EXPERIMENTS:
        exp = experiment(name)
        assert exp.name == name and exp.title and type(exp).__module__.endswith(f"suite.{name}")
        for quick in (True, False):
            assert exp.sources(BenchConfig(quick=quick)), (name, quick)


def test_registration_errors_are_caught_when_the_module_is_imported():
    with pytest.raises(ValueError, match="registered twice"):
        register_experiment(type(experiment("gae")))
    with pytest.raises(ValueError, match="must set the class attribute name"):
        register_experiment(type("Nameless", (Experiment,), {"title": "x"}))
    with pytest.raises(ValueError, match="must set the class attribute title"):
        register_experiment(type("Untitled", (Experiment,), {"name": "untitled"}))
    with pytest.raises(InvalidInputError, match="unknown experiment 'tabel2'.*table2"):
        experiment("tabel2")


class Sharpness(Experiment):
    """A user's experiment: the sparseness of two methods' maps, a per-sample curve and one
    figure per unit, on one Fashion-MNIST CNN."""

    name = "sharpness"
    title = "Sharpness (a user's experiment)"
    report_position = 65
    metrics = ("sparseness",)
    note = "How concentrated each method's map is."

    def sources(self, config):
        return [Source("fmnist-vgg-relu", "fashion")]

    def methods(self, source, config):
        return [("Saliency", "saliency", {}), ("GradInput", "gradient_x_input", {})]

    def sample_count(self, source, config):
        return 4

    def run(self, unit: UnitInputs) -> UnitResult:
        from matplotlib.figure import Figure

        maps = unit.explain()
        values = metrics.sparseness(None, None, None, maps)
        figure = Figure(figsize=(2, 2))
        pixels = maps[0].abs().sum(0) if maps.dim() == 4 else maps[0].abs()
        figure.add_subplot().imshow(pixels.numpy())
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        name = f"{self.name}/{unit.job.source.model}/{unit.job.unit.method}/{unit.job.unit.unit}"
        return UnitResult(rows=unit.rows("sparseness", values),
                          curves=unit.curves("sorted_map", [0.0, 1.0],
                                             torch.stack([values, values], 1)),
                          artifacts={name: buffer.getvalue()})


@pytest.fixture
def user_experiment():
    register_experiment(Sharpness)
    try:
        yield EXPERIMENTS["sharpness"]
    finally:
        EXPERIMENTS.pop("sharpness")


def test_a_user_experiment_is_planned_from_its_own_module(user_experiment):
    planned = jobs(BenchConfig(experiments=["sharpness"], batch_size=3))
    assert [(j.unit.method, j.samples) for j in planned] == [
        ("Saliency", (0, 1, 2)), ("Saliency", (3,)), ("GradInput", (0, 1, 2)),
        ("GradInput", (3,))]
    assert jobs(BenchConfig(experiments=["sharpness"], models=["resnet*"])) == []


@FASHION
def test_a_user_experiment_runs_resumes_and_gets_its_report_section(user_experiment,
                                                                     tmp_path):
    config = BenchConfig(experiments=["sharpness"], batch_size=2)
    assert run(tmp_path, config, progress=False, stop_after=1) is None  # one unit, then stop
    db = run(tmp_path, config, progress=False)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT method, metric, sample FROM results ORDER BY method, sample")
    rows = rows.fetchall()
    artifacts = sorted(n for (n,) in con.execute("SELECT name FROM artifacts"))
    con.close()
    assert rows == [(m, "sparseness", s) for m in ("GradInput", "Saliency") for s in range(4)]
    assert len(artifacts) == 4 and all(a.startswith("sharpness/") for a in artifacts)

    _, md = build_report(tmp_path)
    text = md.read_text()
    section = text[text.index("## Sharpness (a user's experiment)"):]
    section = section[:section.index("\n## ")]
    assert "How concentrated each method's map is." in section
    assert "sparseness ↑" in section  # the direction comes from the metric registry
    assert section.count("![") == 1 + 4  # its mean curves and its four figures
    qualitative = text[text.index("## Qualitative grid"):]
    assert "sharpness/" not in qualitative  # the grid section leaves other experiments' PNGs
    assert "Your model and data" not in text  # an optional experiment not run: no section
    # the report's order: after Robustness (60-62), before Randomisation (70)
    assert (text.index("## Robustness") < text.index("## Sharpness")
            < text.index("## Randomisation"))


def test_a_new_module_in_the_packages_registers_without_any_other_edit(tmp_path, monkeypatch):
    """Dropping a module into srdxai.metrics or srdxai.experiments.suite is all it takes."""
    import sys

    import srdxai.experiments.suite as suite

    (tmp_path / "metric_pkg").mkdir()
    (tmp_path / "metric_pkg" / "made_up_metric.py").write_text(
        "from srdxai.metrics.registry import register_metric\n"
        "@register_metric(family='complexity', direction='lower')\n"
        "def made_up_metric(model, x, y, attributions=None, masks=None, explain=None):\n"
        "    '''A made-up metric for the test: the maps' sum.'''\n"
        "    return attributions.flatten(1).sum(1)\n")
    (tmp_path / "suite_pkg").mkdir()
    (tmp_path / "suite_pkg" / "made_up.py").write_text(
        "from srdxai.experiments.registry import Experiment, register_experiment\n"
        "@register_experiment\n"
        "class MadeUp(Experiment):\n"
        "    name, title = 'made_up', 'Made up'\n"
        "    def sources(self, config):\n"
        "        return []\n")
    monkeypatch.setattr(metrics, "__path__", [*metrics.__path__, str(tmp_path / "metric_pkg")])
    monkeypatch.setattr(suite, "__path__", [*suite.__path__, str(tmp_path / "suite_pkg")])
    try:
        metrics.load_metric_modules()
        suite.load_experiment_modules()
        assert metrics.made_up_metric(None, None, None, torch.ones(2, 3, 3)).tolist() == [9, 9]
        assert "made_up_metric" in metrics.__all__
        assert metrics.metric_info("made_up_metric").direction == "lower"
        assert experiment("made_up").title == "Made up"
    finally:
        metrics.METRICS.pop("made_up_metric", None)
        if "made_up_metric" in metrics.__all__:
            metrics.__all__.remove("made_up_metric")
        vars(metrics).pop("made_up_metric", None)
        EXPERIMENTS.pop("made_up", None)
        for name in ("srdxai.metrics.made_up_metric", "srdxai.experiments.suite.made_up"):
            sys.modules.pop(name, None)
