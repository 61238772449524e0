"""The benchmark report: statistics, tables, the paper's numbers and the HTML/Markdown writer."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sqlite3
from html import escape
from pathlib import Path

import pytest

from srdxai.errors import InvalidInputError
from srdxai.experiments.store import SCHEMA
from srdxai.experiments.suite.gae import GAE_METRICS
from srdxai.report import blocks, paper, tables
from srdxai.report.render import build_report
from srdxai.report.tables import Cell, cell_stats, format_cell, metric_table, t_quantile

# --- synthetic databases ----------------------------------------------------------------------


def _png_bytes(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


class Db:
    """A results.sqlite written row by row, so tests control the rowid order."""

    def __init__(self, run_dir: Path, config: dict | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "results.sqlite"
        self.conn = sqlite3.connect(self.path)
        self.conn.executescript(SCHEMA)
        self.conn.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("config", json.dumps(config or {"quick": True, "seed": 0})),
            ("config_hash", "abc123"), ("code_version", "0.test"),
            ("created", "2024-01-02T03:04:05+00:00")])
        self.conn.commit()

    def add(self, experiment: str, model: str, method: str, metric: str,
            values: list[float | None]) -> Db:
        self.conn.executemany(
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, 0, 'abc123', '0.test')",
            [(experiment, model, method, metric, s, v) for s, v in enumerate(values)])
        self.conn.commit()
        return self

    def curve(self, experiment: str, model: str, method: str, curve: str,
              xs: list[list[float]], ys: list[list[float]]) -> Db:
        self.conn.executemany("INSERT INTO curves VALUES (?, ?, ?, ?, ?, ?, ?)", [
            (experiment, model, method, curve, s, json.dumps(x), json.dumps(y))
            for s, (x, y) in enumerate(zip(xs, ys, strict=True))])
        self.conn.commit()
        return self

    def artifact(self, name: str, data: bytes, kind: str = "png") -> Db:
        self.conn.execute("INSERT INTO artifacts VALUES (?, ?, ?)", (name, kind, data))
        self.conn.commit()
        return self

    def close(self) -> Path:
        self.conn.close()
        return self.path


ARTIFACT = _png_bytes()


def _full_run(run_dir: Path) -> Path:
    """A database with every experiment the report knows, plus one it does not."""
    db = Db(run_dir, {"quick": True, "seed": 7, "experiments": ["table2", "activation"]})
    for model in ("fmnist-vgg-relu", "fmnist-resnet-relu"):
        # Saliency: better fidelity, worse stability; SRD-input the other way round.
        for method, fid, stab in (("Saliency", 0.50, 0.40), ("SRD-input", 0.20, 0.10)):
            db.add("table2", model, method, "pointing_game", [1.0, 0.0, 1.0, 1.0])
            db.add("table2", model, method, "attribution_localisation", [0.3, 0.4, 0.5, 0.6])
            db.add("table2", model, method, "sparseness", [0.6, 0.6, 0.7, 0.7])
            db.add("table2", model, method, "fidelity", [fid - 0.01, fid + 0.01, fid, fid])
            db.add("table2", model, method, "stability", [stab, stab + 0.02, stab - 0.02, stab])
    for act in ("relu", "silu"):
        model = f"fmnist-resnet-{act}"
        db.add("activation", model, "-", "accuracy", [1.0, 1.0, 0.0, 1.0])
        db.add("activation", model, "GradInput", "fidelity", [0.01, 0.03, 0.02, None])
        db.add("activation", model, "SRD-input", "fidelity", [0.10, 0.12, 0.11, 0.13])
    xs = [[0.0, 0.5, 1.0]] * 3
    for method, shift in (("Saliency", 0.0), ("SRD-input", 0.1)):
        db.curve("sensitivity_n", "fmnist-vgg-relu", method, "sensitivity_n", xs,
                 [[0.1 + shift, 0.2 + shift, 0.3 + shift]] * 3)
        db.add("sensitivity_n", "fmnist-vgg-relu", method, "sensitivity_n_mean",
               [0.2 + shift, 0.25 + shift, 0.3 + shift])
        db.curve("insertion_deletion", "fmnist-vgg-relu", method, "insertion", xs,
                 [[0.0, 0.6 + shift, 1.0]] * 3)
        db.curve("insertion_deletion", "fmnist-vgg-relu", method, "deletion", xs,
                 [[1.0, 0.4 - shift, 0.0]] * 3)
        db.add("insertion_deletion", "fmnist-vgg-relu", method, "auc_insertion",
               [0.5 + shift, 0.6 + shift, 0.55 + shift])
        db.add("insertion_deletion", "fmnist-vgg-relu", method, "auc_deletion",
               [0.4 - shift, 0.5 - shift, 0.45 - shift])
        for metric in GAE_METRICS:
            db.add("gae", "fmnist-vgg-relu", method, metric, [0.3 + shift, 0.4 + shift])
        db.add("attack", "fmnist-vgg-relu", method, "topk_intersection", [0.5, 0.7])
        db.add("randomisation", "fmnist-vgg-relu", method, "mprt_ssim", [0.2 + shift, 0.3])
        db.add("randomisation", "fmnist-vgg-relu", method, "random_logit_ssim",
               [0.5, 0.6 + shift])
        db.curve("randomisation", "fmnist-vgg-relu", method, "mprt_ssim",
                 [[1.0, 2.0, 3.0]] * 2, [[0.9, 0.5, 0.2 + shift]] * 2)
        db.add("apop", "fmnist-vgg-relu", method, "apop_accuracy", [0.9, 0.8])
        db.add("evaluate", "my-net", method, "road", [0.3 + shift, 0.4])
        db.add("text_sensitivity_n", "rt-kim-cnn", method, "sensitivity_n_mean",
               [0.8 + shift, 0.9])
        db.curve("text_sensitivity_n", "rt-kim-cnn", method, "sensitivity_n_tokens",
                 [[1.0, 2.0, 4.0]] * 2, [[0.9, 0.8 - shift, 0.7]] * 2)
        db.add("text_localisation", "planted-kim-cnn", method, "relevance_rank_accuracy",
               [1.0, 0.5 + shift])
    db.add("noise", "fmnist-vgg-relu", "Saliency", "ssim_to_target", [0.77])  # n = 1
    db.add("newexp", "fmnist-vgg-relu", "Saliency", "brand_new_metric", [1.0, 2.0, 3.0])
    db.artifact("qualitative/grid.png", ARTIFACT)
    db.artifact("randomisation/fmnist-vgg-relu/Saliency", ARTIFACT)
    db.artifact("notes.txt", b"not shown", kind="text")
    db.artifact("text_sensitivity_n/tokens/rt-kim-cnn/Saliency", json.dumps([{
        "tokens": ["a", "<b>film"], "scores": [0.5, -0.2], "predicted": "positive",
        "probability": 0.9, "target": "positive", "true_label": "positive",
        "method": "Saliency", "title": "test text 0: a film"}]).encode(), kind="json")
    return db.close()


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str, str]:
    run_dir = tmp_path_factory.mktemp("full")
    _full_run(run_dir)
    html_path, md_path = build_report(run_dir)
    assert (html_path, md_path) == (run_dir / "report.html", run_dir / "report.md")
    return run_dir, html_path.read_text("utf-8"), md_path.read_text("utf-8")


def _md_table(md: str, title: str) -> list[list[str]]:
    """The rows (header first) of the Markdown table titled ``title``."""
    lines = md.splitlines()
    start = lines.index(f"**{title}**") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


# --- statistics -------------------------------------------------------------------------------

@pytest.mark.parametrize(("df", "expected"), [
    (1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (29, 2.045), (30, 2.042), (60, 2.000),
    (120, 1.980), (1000, 1.962), (10**6, 1.960)])
def test_t_quantile_matches_the_published_table(df, expected):
    assert t_quantile(df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_other_levels_and_the_switch_to_the_expansion_are_continuous():
    assert t_quantile(1, 0.99) == pytest.approx(63.657, abs=1e-3)
    assert t_quantile(10, 0.90) == pytest.approx(1.812, abs=1e-3)
    assert t_quantile(1000) - t_quantile(1001) == pytest.approx(2e-6, abs=1e-6)
    values = [t_quantile(df) for df in range(1, 60)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("df", [0, -3, 2.5, True])
def test_t_quantile_rejects_bad_degrees_of_freedom(df):
    with pytest.raises(InvalidInputError, match="degrees of freedom"):
        t_quantile(df)


def test_cell_stats_by_hand():
    # mean 3, sample sd sqrt(2.5), t(4) = 2.776445: half-width 2.776445 * sqrt(2.5 / 5)
    mean, half, n, interval = cell_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, n, interval) == (3.0, 5, None)
    assert half == pytest.approx(2.776445 * math.sqrt(0.5), rel=1e-6)
    # two values: sd sqrt(2), t(1) = 12.706205, half-width 12.706205 * sqrt(2) / sqrt(2)
    assert cell_stats([2.0, 4.0]).half_width == pytest.approx(12.706205, rel=1e-6)
    assert cell_stats([7.0, 7.0, 7.0]) == (7.0, 0.0, 3, None)


def test_hits_and_misses_get_wilsons_interval():
    # 3 of 4 at 95 %: z = 1.959964, centre (0.75 + z^2/8) / (1 + z^2/4) = 0.62752,
    # spread z sqrt(0.75 * 0.25 / 4 + z^2 / 64) / (1 + z^2/4) = 0.32691
    stats = cell_stats([1.0, 0.0, 1.0, 1.0])
    assert stats.mean == 0.75
    low, high = stats.interval
    assert low == pytest.approx(0.30064, abs=1e-4) and high == pytest.approx(0.95443, abs=1e-4)
    # all hits: the t interval collapses to 1 +- 0; Wilson's does not, and stays in [0, 1]
    low, high = cell_stats([1.0] * 8).interval
    assert high == 1.0 and low == pytest.approx(0.6756, abs=1e-4)
    assert cell_stats([0.0, 0.5, 1.0]).interval is None  # not a proportion
    assert format_cell(Cell(0.75, 0.5, 4, interval=(0.3006, 0.9544))) == "0.750 [0.301, 0.954]"


def test_cell_stats_skips_nan_none_and_inf():
    assert cell_stats([1.0, None, math.nan, 3.0, math.inf]) == cell_stats([1.0, 3.0])
    one = cell_stats([None, 0.25])
    assert one.mean == 0.25 and one.n == 1 and math.isnan(one.half_width)
    empty = cell_stats([None, math.nan])
    assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.half_width)


def test_format_cell_shows_n_for_a_single_value_and_odd_counts():
    assert format_cell(tables.Cell(0.5, math.nan, 1)) == "0.500 (n=1)"
    assert format_cell(tables.Cell(0.5, 0.01, 4), typical_n=4) == "0.500 ± 0.010"
    assert format_cell(tables.Cell(0.5, 0.01, 3), typical_n=4) == "0.500 ± 0.010 (n=3)"
    assert format_cell(tables.Cell(math.nan, math.nan, 0, missing=2)) == "— (2 NaN)"
    assert [tables.format_number(v) for v in (-0.00041, 2.5e-5, 12345.0, 0.0)] == [
        "-0.0004", "2.50e-05", "1.23e+04", "0.000"]


# --- metric tables ----------------------------------------------------------------------------

def test_best_marks_follow_each_metrics_direction_and_mark_ties(tmp_path):
    db = Db(tmp_path)
    db.add("table2", "m", "A", "fidelity", [0.5, 0.7])      # mean 0.6
    db.add("table2", "m", "B", "fidelity", [0.2, 0.4])      # mean 0.3
    db.add("table2", "m", "C", "fidelity", [0.7, 0.5])      # mean 0.6: tie with A
    db.add("table2", "m", "A", "stability", [0.5, 0.5])
    db.add("table2", "m", "B", "stability", [0.1, 0.3])     # lowest: best
    db.add("table2", "m", "C", "stability", [0.9, 0.9])
    db.add("table2", "m", "A", "no_direction", [1.0, 1.0])
    db.add("table2", "m", "B", "no_direction", [2.0, 2.0])
    db.add("table2", "m", "A", "auc_deletion", [0.2, 0.2])  # the only method: nothing to beat
    table = metric_table(db.close(), "table2")
    best = {(meth, k) for (_, meth, k), c in table.cells.items() if c.best}
    assert best == {("A", "fidelity"), ("C", "fidelity"), ("B", "stability")}
    assert tables.direction("stability") == "lower"
    assert tables.direction("accuracy") == "higher"
    assert tables.direction("no_direction") is None


def test_rows_follow_first_appearance_and_nan_is_skipped_and_counted(tmp_path):
    db = Db(tmp_path)
    db.add("table2", "vgg", "Zeta", "sparseness", [0.2, None, 0.4])
    db.add("table2", "vgg", "Alpha", "sparseness", [0.1, 0.1, 0.1])
    db.add("table2", "resnet", "Alpha", "fidelity", [0.3, math.nan])
    db.add("other", "vgg", "Beta", "fidelity", [1.0])
    table = metric_table(db.close(), "table2")
    assert table.models == ["vgg", "resnet"]
    assert table.methods == ["Zeta", "Alpha"]  # not alphabetical
    assert table.metrics == ["sparseness", "fidelity"]
    assert table.rows == [("vgg", "Zeta"), ("vgg", "Alpha"), ("resnet", "Alpha")]
    zeta = table.cell("vgg", "Zeta", "sparseness")
    assert (zeta.mean, zeta.n, zeta.missing) == (pytest.approx(0.3), 2, 1)
    alpha = table.cell("resnet", "Alpha", "fidelity")
    assert (alpha.n, alpha.missing) == (1, 1)
    assert math.isnan(alpha.half_width)
    assert metric_table(db.path, "never_run").empty


# --- the paper's numbers ----------------------------------------------------------------------

def test_paper_table2_is_complete_and_transcribed():
    assert len(paper.PAPER_TABLE2) == 2 * len(paper.PAPER_TABLE2_METHODS) == 34
    for (model, method), row in paper.PAPER_TABLE2.items():
        assert model in paper.PAPER_MODELS and method in paper.PAPER_TO_SRDXAI
        assert list(row) == list(paper.PAPER_METRICS)
        for metric, value in row.items():
            # every unreadable entry explains itself
            assert not math.isnan(value) or (model, method, metric) in paper.PAPER_TABLE2_NOTES
    for key in paper.PAPER_TABLE2_NOTES:
        assert key[2] in paper.PAPER_TABLE2[key[:2]]
    assert paper.PAPER_METRIC_KEYS["Sta."] == "stability"
    assert paper.PAPER_TABLE2[("VGG16", "Saliency")]["pointing_game"] == 0.793
    assert paper.PAPER_TABLE2[("VGG16", "GradInput")]["fidelity"] == 0.013
    assert paper.PAPER_TABLE2[("ResNet50", "Smoothgrad")]["fidelity"] == 0.002
    assert paper.PAPER_TABLE2[("ResNet50", "SRD-high")]["sparseness"] == 0.628
    assert paper.PAPER_TABLE2[("ResNet50", "SRD-input")]["stability"] == 0.104
    assert math.isnan(paper.PAPER_TABLE2[("ResNet50", "SRD-input")]["sparseness"])
    assert paper.PAPER_TABLE2[("VGG16", "SRD-input")]["stability"] == 0.099


def test_paper_activation_table_is_transcribed():
    assert list(paper.PAPER_ACTIVATION_ACCURACY.values()) == [0.780, 0.746, 0.785, 0.756,
                                                              0.767, 0.685]
    assert list(paper.PAPER_ACTIVATION_FIDELITY) == list(paper.PAPER_ACTIVATION_METHODS)
    assert paper.PAPER_ACTIVATION_FIDELITY["SRD(Ours)"]["Swish"] == 0.194
    assert paper.PAPER_ACTIVATION_FIDELITY["GradInput"]["Swish"] == -0.024
    lrp = paper.PAPER_ACTIVATION_FIDELITY["LRPz+"]
    assert lrp["ReLU"] == 0.039 and all(math.isnan(lrp[a]) for a in paper.PAPER_ACTIVATIONS[1:])
    assert set(paper.ACTIVATION_NAMES.values()) == set(paper.PAPER_ACTIVATIONS)


# --- the report -------------------------------------------------------------------------------

SECTIONS = ("Your model and data", "Table 2", "Activation functions", "Sensitivity-n",
            "Insertion / deletion", "GAE", "Robustness", "Randomisation (sanity checks)",
            "Qualitative grid")


def test_every_section_renders_when_its_experiment_ran(full_report):
    _, html, md = full_report
    for title in SECTIONS + ("Experiment 'newexp'",):
        assert f"## {title}" in md
        assert f"<h2>{escape(title)}</h2>" in html
    assert "not run" not in md.lower() and "not run" not in html.lower()
    for sub in ("attack", "noise", "apop"):
        assert f"### Robustness: {sub}" in md
    assert "brand_new_metric" in md  # an unknown experiment gets a generic table
    assert "road ↓" in md  # a row named after a metric takes its registered direction
    assert "0.770 (n=1)" in md       # a single sample has no interval


def test_header_shows_the_run(full_report):
    _, html, md = full_report
    for text in ("abc123", "0.test", "2024-01-02T03:04:05+00:00", '"seed": 7', "Rows: 166 results"):
        assert text in md
    assert "&quot;seed&quot;: 7" in html


def test_table2_bolds_the_best_in_each_metrics_direction(full_report):
    _, html, md = full_report
    rows = _md_table(md, "Table 2 (ours): fmnist-vgg-relu")
    header, body = rows[0], {r[0]: r for r in rows[1:]}
    assert header == ["method", "pointing_game ↑", "attribution_localisation ↑",
                      "sparseness ↑", "fidelity ↑", "stability ↓"]
    fid, stab = header.index("fidelity ↑"), header.index("stability ↓")
    assert body["Saliency"][fid].startswith("**0.500 ± ")
    assert not body["Saliency"][stab].startswith("**")
    assert body["SRD-input"][stab].startswith("**0.100 ± ")
    assert not body["SRD-input"][fid].startswith("**")
    # identical means tie: both bold
    assert body["Saliency"][1].startswith("**") and body["SRD-input"][1].startswith("**")
    assert "<td><b>0.100 ± " in html


def test_paper_tables_are_titled_as_the_papers(full_report):
    _, html, md = full_report
    for text in (f"Paper's Table 2 (not our numbers) — {paper.PAPER_SOURCE}",
                 "Paper's activation table (not our numbers) — "
                 f"{paper.PAPER_ACTIVATION_SOURCE}"):
        assert f"**{text}**" in md
        assert f"<caption>{escape(text)}</caption>" in html
    rows = _md_table(md, f"Paper's Table 2 (not our numbers) — {paper.PAPER_SOURCE}")
    assert rows[1][:2] == ["Saliency", "0.793"]
    grad_input = next(r for r in rows if r[0] == "GradInput")
    assert grad_input[4].startswith("0.013 [")  # the interpreted entry points to its note
    assert "lost its leading dot" in md


def test_activation_table_has_activation_columns_and_accuracy(full_report):
    _, _, md = full_report
    rows = _md_table(md, "Fidelity per activation function (ours)")
    assert rows[0] == ["method", "ReLU", "Swish"]
    assert [r[0] for r in rows[1:]] == ["GradInput", "SRD-input", "accuracy"]
    assert rows[-1][1].startswith("0.750 [0.301, 0.954]")  # accuracy (0/1): Wilson; not best
    srd = rows[2]
    assert srd[1].startswith("**0.115 ± ") and srd[2].startswith("**")
    assert rows[1][1].endswith("(n=3)")  # GradInput lost one NaN sample


def test_activation_columns_fall_back_to_model_names_when_activations_clash(tmp_path):
    db = Db(tmp_path)
    for model in ("fmnist-vgg-relu", "fmnist-resnet-relu"):
        db.add("activation", model, "SRD-input", "fidelity", [0.1, 0.2])
    db.close()
    _, md_path = build_report(tmp_path)
    rows = _md_table(md_path.read_text(), "Fidelity per activation function (ours)")
    assert rows[0] == ["method", "fmnist-vgg-relu", "fmnist-resnet-relu"]


def test_html_is_self_contained_and_embeds_figures_and_artifacts(full_report):
    _, html, _ = full_report
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html, flags=re.I)
    assert links and all(v.startswith(("data:", "#")) for v in links), links
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert base64.b64encode(ARTIFACT).decode() in html
    # sensitivity-n, insertion/deletion, GAE bars and the artifact
    assert html.count('src="data:image/png;base64,') >= 4
    # every table scrolls sideways inside its box instead of being cut at the page's edge
    assert html.count("<table>") == html.count('<div class="scroll"><table>') > 0
    assert ".scroll { overflow-x: auto" in html


def test_markdown_figures_are_written_next_to_it(full_report):
    run_dir, _, md = full_report
    refs = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert len(refs) >= 4
    for ref in refs:
        assert (run_dir / ref).read_bytes().startswith(blocks.PNG_SIGNATURE)
    grid = [r for r in refs if "artifact" in r]
    assert len(grid) == 2 and all((run_dir / r).read_bytes() == ARTIFACT for r in grid)
    # the cascading-randomisation figure sits in its section, not in the qualitative grid
    randomisation = md.split("## Randomisation (sanity checks)")[1].split("\n## ")[0]
    qualitative = md.split("## Qualitative grid")[1]
    assert "artifact-randomisation" in randomisation
    assert "artifact-randomisation" not in qualitative and "artifact-qualitative" in qualitative
    assert "not shown" not in md  # only kind 'png' artifacts
    assert list(run_dir.rglob("*.tmp")) == []


def test_absent_experiments_are_listed_as_not_run(tmp_path):
    db = Db(tmp_path)
    db.add("table2", "m", "Saliency", "fidelity", [0.1, 0.2])
    db.curve("sensitivity_n", "m", "Saliency", "sensitivity_n", [[1, 2]], [[0.1, 0.2]])
    db.close()
    html_path, md_path = build_report(tmp_path)
    md, html = md_path.read_text(), html_path.read_text()
    for title in ("Activation functions", "Insertion / deletion", "GAE", "Robustness",
                  "Qualitative grid"):
        assert f"{title} (not run)" in md
        assert f"{title}</a> (not run)" in html
    for title in ("Table 2", "Sensitivity-n"):  # a curves-only experiment counts as run
        assert f"{title} (not run)" not in md
    assert "Not run: results.sqlite has no rows for experiment 'gae'." in md


def test_a_failed_write_keeps_the_old_report_and_leaves_no_temp_files(tmp_path, monkeypatch):
    _full_run(tmp_path)
    build_report(tmp_path)
    before = (tmp_path / "report.html").read_bytes()
    from srdxai.report import figures

    real_replace = figures.os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "report.html":
            raise OSError("disk full")
        real_replace(src, dst)

    # new rows, so the report that fails to be written differs from the one on disk
    db = sqlite3.connect(tmp_path / "results.sqlite")
    db.execute("INSERT INTO results VALUES ('table2', 'fmnist-vgg-relu', 'GradCAM', "
               "'fidelity', 0, 0.9, 0, 'abc123', '0.test')")
    db.commit()
    db.close()
    monkeypatch.setattr(figures.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        build_report(tmp_path)
    assert (tmp_path / "report.html").read_bytes() == before
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []


def test_missing_database_names_the_path_and_what_to_run(tmp_path):
    with pytest.raises(InvalidInputError) as err:
        build_report(tmp_path)
    assert str(tmp_path / "results.sqlite") in str(err.value)
    assert f"srdxai bench {tmp_path}" in str(err.value)
    assert not (tmp_path / "results.sqlite").exists()  # looking does not create it
    (tmp_path / "results.rank0.sqlite").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="srdxai merge"):
        build_report(tmp_path)
    with pytest.raises(InvalidInputError, match="no results database"):
        metric_table(tmp_path / "results.sqlite", "table2")


def test_empty_or_foreign_database_is_a_clear_error(tmp_path):
    Db(tmp_path).close()
    with pytest.raises(InvalidInputError, match="holds no results yet") as err:
        build_report(tmp_path)
    assert str(tmp_path / "results.sqlite") in str(err.value)
    assert "srdxai bench" in str(err.value)
    (tmp_path / "results.sqlite").write_bytes(b"this is not sqlite at all, just text......")
    with pytest.raises(InvalidInputError, match="not a readable SQLite"):
        build_report(tmp_path)
    (tmp_path / "results.sqlite").unlink()
    sqlite3.connect(tmp_path / "results.sqlite").execute("CREATE TABLE x (a)").connection.close()
    with pytest.raises(InvalidInputError, match="not a srdxai results database"):
        build_report(tmp_path)


def test_a_database_written_by_the_result_store(tmp_path):
    from srdxai.experiments.store import ResultStore, Row, Unit

    with ResultStore(tmp_path / "results.sqlite", {"quick": True}, "h1", "v1") as store:
        store.write_unit(Unit("table2", "fmnist-vgg-relu", "Saliency", 0), 0, 0, 0.1,
                         [Row("fidelity", 0, 0.2), Row("fidelity", 1, math.nan),
                          Row("fidelity", 2, 0.4)])
        store.put_artifact("grid.png", "png", ARTIFACT)
    _, md_path = build_report(tmp_path)
    md = md_path.read_text()
    assert "0.300 (n=2)" not in md and "0.300 ± " in md  # NaN stored as NULL, skipped
    assert "Saliency · fidelity: 1" in md


def test_mean_curve_on_shared_and_on_different_grids():
    # the mean stops where a sample's values end (a mean over fewer samples jumps there)
    same = tables.CurveSet("m", "A", "c", [[0, 1], [0, 1]], [[0.0, 1.0], [1.0, math.nan]])
    x, y, n, interpolated, cut = blocks.mean_curve(same)
    assert list(x) == [0, 1] and y[0] == 0.5 and math.isnan(y[1]) and n == 2
    assert cut and not interpolated
    # a sample with no value anywhere (a constant map's correlations) leaves the others' mean,
    # and a value missing between two (one undefined correlation) only that point's
    blank = tables.CurveSet("m", "A", "c", [[0, 1, 2]] * 3,
                            [[0.0, 1.0, 2.0], [math.nan] * 3, [2.0, math.nan, 4.0]])
    x, y, n, _, cut = blocks.mean_curve(blank)
    assert list(y) == [1.0, 1.0, 3.0] and n == 3 and not cut
    # a point where every sample has no value (n = all features) is no cut either
    ends = tables.CurveSet("m", "A", "c", [[0, 1]] * 2, [[0.0, math.nan], [1.0, math.nan]])
    _, y, _, _, cut = blocks.mean_curve(ends)
    assert y[0] == 0.5 and math.isnan(y[1]) and not cut
    mixed = tables.CurveSet("m", "A", "c", [[0, 1, 2], [0.5, 2.5]], [[0, 1, 2], [0.5, 2.5]])
    x, y, n, interpolated, cut = blocks.mean_curve(mixed)
    assert interpolated and list(x) == [0.5, 1.0, 2.0]  # only where both samples have data
    assert list(y) == pytest.approx([0.5, 1.0, 2.0]) and not cut


def test_metric_families_named_per_setting_have_a_direction():
    from srdxai.report.tables import direction

    assert direction("ssim_noise_0.1") == "higher" and direction("pcc_noise_0.2") == "higher"
    assert direction("sensitivity_n_mean") == "higher"
    assert direction("apop_zeros") is None and direction("stability") == "lower"


def test_rows_that_are_the_same_computation_are_named(tmp_path):
    db = Db(tmp_path / "run")
    for metric, values in (("pointing_game", [1.0, 0.0, 1.0]), ("fidelity", [0.2, None, 0.4])):
        db.add("table2", "vgg", "GradCAM", metric, values)
        db.add("table2", "vgg", "SRD-low", metric, values)  # the same numbers, sample by sample
        db.add("table2", "vgg", "Saliency", metric, [v if v is None else v + 0.1
                                                      for v in values])
        db.add("table2", "resnet", "GradCAM", metric, values)
        db.add("table2", "resnet", "SRD-low", metric, [1.0, 1.0, 1.0][:len(values)])
    assert tables.identical_methods(db.path, "table2") == [("vgg", "SRD-low", "GradCAM")]
    html_text = build_report(tmp_path / "run")[0].read_text()
    assert "vgg: SRD-low equals GradCAM on every metric and sample" in html_text
    assert "resnet: SRD-low equals" not in html_text


# --- the evaluation protocol (issue: the SRD paper's protocol) ----------------------------------

def _protocol_run(run_dir: Path, config: dict | None = None) -> Path:
    """Three methods on two samples' worth of draws: SRD-high beats Saliency by exactly 0.1
    on every sample (a paired difference with zero spread), LRP-z+ ties SRD-high on average
    only; the 'abs' variant reverses the order."""
    from srdxai.experiments import BenchConfig

    db = Db(run_dir, config if config is not None else BenchConfig(quick=True).public())
    fid = {"SRD-high": [0.5, 0.2, 0.4, 0.3], "Saliency": [0.4, 0.1, 0.3, 0.2],
           "LRP-z+": [0.7, 0.0, 0.6, 0.1], "absLRP": [0.0, 0.0, 0.1, 0.1]}
    for method, values in fid.items():
        db.add("table2", "fmnist-vgg-relu", method, "fidelity", values)
        db.add("table2", "fmnist-vgg-relu", method, "fidelity[abs]", [1 - v for v in values])
        db.add("table2", "fmnist-vgg-relu", method, "pointing_game", [1.0, 0.0, 1.0, 1.0])
    return db.close()


def test_paired_differences_pair_samples(tmp_path):
    diffs = tables.paired_differences(_protocol_run(tmp_path), "table2", "fidelity", "SRD-high")
    saliency = diffs[("fmnist-vgg-relu", "Saliency")]
    assert saliency.mean == pytest.approx(0.1) and saliency.half_width == pytest.approx(0.0)
    assert saliency.n == 4
    lrp = diffs[("fmnist-vgg-relu", "LRP-z+")]
    assert lrp.mean == pytest.approx(0.0) and lrp.half_width > 0.3  # same mean, wide spread
    assert ("fmnist-vgg-relu", "SRD-high") not in diffs


def test_table2_section_states_the_protocol_marks_rows_and_ranks_variants(tmp_path):
    _protocol_run(tmp_path)
    html_path, md_path = build_report(tmp_path)
    md = md_path.read_text()
    assert "faithfulness correlation with black baseline, signed maps" in md
    assert "a lower bound" in md  # quick: 10 stability draws
    assert "absLRP §" in md and "Saliency §" not in md
    assert "SRD-high − method, fidelity (paired)" in md
    row = next(line for line in md.splitlines() if line.startswith("| Saliency |")
               and "0.100" in line)
    assert "*" in row  # the interval (zero width) excludes 0
    ranking = md[md.index("What decides the ranking: fmnist-vgg-relu"):]
    lrp = next(line for line in ranking.splitlines() if line.startswith("| LRP-z+ |"))
    cells = [c.strip() for c in lrp.strip("|").split("|")]
    assert cells[1] == "**1 (0.350)**"  # tied with SRD-high for the best fidelity
    assert cells[2] == "3 (0.650)"  # tied with SRD-high, below absLRP and Saliency on abs


def test_protocol_of_an_older_run_is_said_to_be_unrecorded(tmp_path):
    _protocol_run(tmp_path, {"quick": True})
    _, md_path = build_report(tmp_path)
    assert "Protocol: not recorded" in md_path.read_text()


def test_activation_table_marks_lrp_zplus_beyond_relu_and_pairs_srd(tmp_path):
    db = Db(tmp_path, {"quick": True})
    for model in ("fmnist-resnet-relu", "fmnist-resnet-elu"):
        db.add("activation", model, "LRP-z+", "fidelity", [0.2, 0.3, 0.1])
        db.add("activation", model, "SRD-input", "fidelity", [0.3, 0.4, 0.2])
        db.add("activation", model, "absLRP", "fidelity", [0.0, 0.1, 0.1])
    db.close()
    _, md_path = build_report(tmp_path)
    md = md_path.read_text()
    table = md[md.index("**Fidelity per activation function (ours)**"):]
    lrp = next(line for line in table.splitlines() if line.startswith("| LRP-z+ |"))
    relu, elu = [c.strip() for c in lrp.strip("|").split("|")][1:3]
    assert "§" not in relu and elu.endswith("§")
    assert "| absLRP § |" in table
    paired = md[md.index("SRD-input − method, fidelity (paired)"):]
    row = next(line for line in paired.splitlines() if line.startswith("| LRP-z+ |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert all(c.startswith("0.100 ± ") and c.endswith("\\*") for c in cells)  # +0.1 always


def test_the_text_sections_embed_their_token_maps(tmp_path):
    run = tmp_path / "run"
    _full_run(run)
    build_report(run)
    md, html = (run / "report.md").read_text(), (run / "report.html").read_text()
    text = md.split("## Sensitivity-n on text")[1].split("\n## ")[0]
    assert "Token attributions, rt-kim-cnn" in text and "srdx-tokens" in text
    assert "&lt;b&gt;film" in html and "<b>film" not in html  # the token is escaped
    assert "## Token localisation (planted evidence)" in md


def test_many_curves_wrap_into_rows_of_three_and_ragged_tails_are_noted(tmp_path):
    import struct

    def size(figure):  # a PNG's width and height, from its header
        return struct.unpack(">II", figure.png[16:24])

    db = Db(tmp_path)
    names = ["road", "pixel_flipping", "irof", "region_perturbation",
             "model_parameter_randomisation[ssim]", "sensitivity_n", "selectivity"]
    for name in names:
        db.curve("evaluate", "m", "A", name, [[1, 2, 3]] * 2, [[0.1, 0.2, 0.3], [0.2, 0.3, 0.4]])
    db.curve("evaluate", "two", "A", "road", [[1, 2, 3]] * 2, [[0.1, 0.2, 0.3]] * 2)
    db.curve("evaluate", "two", "A", "irof", [[1, 2, 3]] * 2,
             [[0.9, 0.8, 0.7], [0.9, 0.8, math.nan]])  # one image has two superpixels
    db.close()
    out = blocks.curve_figures(db.path, "evaluate", blocks.FigureNames())
    figures = [b for b in out if isinstance(b, blocks.Figure)]
    notes = [b.text for b in out if isinstance(b, blocks.Text)]
    (wide, tall), (two_wide, two_tall) = size(figures[0]), size(figures[1])
    assert wide == two_wide * 1.5 and tall > 2.5 * two_tall  # 3 across, 3 rows; 2 in one row
    assert len(notes) == 1 and notes[0].startswith("two: a mean curve stops where the first")
