"""``srdxai bench``: units, seeds, resuming after a kill, and a 2-process (gloo) run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srdxai.errors import InvalidInputError
from srdxai.experiments import BenchConfig, jobs, merge, run
from srdxai.experiments.registry import unit_seed
from srdxai.experiments.store import rank_path

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists()
    and not os.environ.get("SRDXAI_FASHION_MNIST"),
    reason="Fashion-MNIST is not installed (make data)")

# A small run: Table 2 on the two Fashion-MNIST CNNs, 4 samples each in units of 2.
ARGS = ["--experiments", "table2", "--quick", "--samples", "4", "--batch-size", "2",
        "--models", "fmnist-*"]
CONFIG = BenchConfig(experiments=["table2"], quick=True, samples=4, batch_size=2,
                     models=["fmnist-*"])


def _bench(run_dir: Path, *extra: str, launcher: list[str] | None = None,
           threads: str = "1") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
    cmd = (launcher or [sys.executable, "-m"]) + ["srdxai", "bench", str(run_dir), *ARGS,
                                                   "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _results(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return sorted(con.execute(
            "SELECT experiment, model, method, metric, sample, value, seed FROM results"))
    finally:
        con.close()


def _units(db: Path) -> int:
    # read-only: a plain connect would create an empty file, which bench then refuses
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:  # not created yet
        return 0
    try:
        return con.execute("SELECT count(*) FROM units").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _close(a: list[tuple], b: list[tuple], rel: float = 1e-6) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra[:5] == rb[:5] and ra[6] == rb[6], (ra, rb)
        if ra[5] is None or rb[5] is None:
            assert ra[5] is None and rb[5] is None, (ra, rb)
        else:
            assert abs(ra[5] - rb[5]) <= rel * max(1.0, abs(rb[5])), (ra, rb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple]:
    """An uninterrupted one-process run."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _finish(_bench(run_dir))
    return _results(run_dir / "results.sqlite")


def test_units_and_seeds():
    all_jobs = jobs(CONFIG)
    assert len(all_jobs) == 2 * 19 * 2 and all_jobs == jobs(CONFIG)  # one fixed order
    assert len({j.unit for j in all_jobs}) == len(all_jobs)
    # every method of a batch sees the same random draws
    seeds = {}
    for j in all_jobs:
        seeds.setdefault((j.unit.model, j.unit.unit), set()).add(unit_seed(CONFIG, j))
    assert all(len(s) == 1 for s in seeds.values())
    assert len({next(iter(s)) for s in seeds.values()}) == len(seeds)


def test_table2_scores_every_protocol_metric(reference):
    from srdxai.experiments.protocol import DEFAULT_VARIANTS

    metrics = {r[3] for r in reference}
    assert metrics == {"pointing_game", "pointing_game_15px", "attribution_localisation",
                       "sparseness", "fidelity", "mufidelity", "stability",
                       *(f"fidelity[{v}]" for v in DEFAULT_VARIANTS)}
    per_row = {}
    for _, model, method, metric, _, value, _ in reference:
        per_row.setdefault((model, method, metric), []).append(value)
    assert all(len(v) == 4 for v in per_row.values())  # every sample of every row
    # the absolute reading is the default's drops read against |map|: identical for the
    # unsigned SmoothGrad-abs, different for the signed SmoothGrad
    abs_row = per_row[("fmnist-resnet-relu", "SmoothGrad-abs", "fidelity[abs]")]
    assert abs_row == per_row[("fmnist-resnet-relu", "SmoothGrad-abs", "fidelity")]
    assert per_row[("fmnist-resnet-relu", "SmoothGrad-signed", "fidelity[abs]")] != (
        per_row[("fmnist-resnet-relu", "SmoothGrad-signed", "fidelity")])


def test_a_killed_run_resumes_to_the_same_database(tmp_path, reference):
    proc = _bench(tmp_path)
    db = rank_path(tmp_path, 0)
    deadline = time.monotonic() + 300
    while _units(db) < 5:  # kill it between or inside units, whatever it is doing
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _units(db)
    assert 5 <= done < len(jobs(CONFIG)) and not (tmp_path / "results.sqlite").exists()
    _finish(_bench(tmp_path))  # resume
    assert _units(tmp_path / "results.sqlite") == len(jobs(CONFIG))
    assert _results(tmp_path / "results.sqlite") == reference  # nothing lost, nothing twice


def test_two_gloo_processes_give_the_one_process_table(tmp_path, reference):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m"]
    _finish(_bench(tmp_path, launcher=launcher))
    assert rank_path(tmp_path, 0).exists() and rank_path(tmp_path, 1).exists()
    merged = _results(tmp_path / "results.sqlite")
    # both ranks did work, and together exactly the one-process run's
    con = sqlite3.connect(tmp_path / "results.sqlite")
    ranks = {r for (r,) in con.execute("SELECT DISTINCT rank FROM units")}
    con.close()
    assert ranks == {0, 1}
    _close(merged, reference)


def test_resuming_with_other_options_is_refused(tmp_path):
    run(tmp_path, CONFIG, progress=False, stop_after=1)
    other = BenchConfig(experiments=["table2"], quick=True, samples=6, batch_size=2,
                        models=["fmnist-*"])
    with pytest.raises(InvalidInputError, match="another configuration"):
        run(tmp_path, other, progress=False)


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown experiment"):
        run(tmp_path, BenchConfig(experiments=["tabel2"]), progress=False)
    with pytest.raises(InvalidInputError, match="no results.rank"):
        merge(tmp_path)


def test_curve_and_gae_experiments_write_rows_curves_and_render(tmp_path):
    from srdxai.report.render import build_report

    config = BenchConfig(experiments=["sensitivity_n", "insertion_deletion", "gae"],
                         quick=True, samples=4, batch_size=4)
    db = run(tmp_path, config, progress=False)
    con = sqlite3.connect(db)
    metrics = {m for (m,) in con.execute("SELECT DISTINCT metric FROM results")}
    curves = {c for (c,) in con.execute("SELECT DISTINCT curve FROM curves")}
    models = {m for (m,) in con.execute(
        "SELECT DISTINCT model FROM results WHERE experiment = 'gae'")}
    con.close()
    assert {"sensitivity_n_mean", "auc_insertion", "auc_deletion", "gae", "local_consistency",
            "contrastiveness"} <= metrics
    assert curves == {"sensitivity_n", "insertion", "deletion"}
    assert "fmnist-vit-gelu" in models  # GAE also on the small ViT
    html, md = build_report(tmp_path)
    text = md.read_text()
    for section in ("## Sensitivity-n", "## Insertion / deletion", "## GAE"):
        assert section in text and f"{section} (not run)" not in text


def test_randomisation_experiment_writes_rows_curves_figures_and_its_section(tmp_path):
    from srdxai.experiments.suite.randomisation import RANDOMISATION_METHODS
    from srdxai.report.render import build_report

    config = BenchConfig(experiments=["randomisation"], quick=True, samples=2, batch_size=2,
                         models=["fmnist-vgg-relu"])
    db = run(tmp_path, config, progress=False)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT method, metric, sample FROM results").fetchall()
    curves = con.execute("SELECT curve, x FROM curves").fetchall()
    figures = [n for (n,) in con.execute("SELECT name FROM artifacts")]
    con.close()
    methods = {m[0] for m in RANDOMISATION_METHODS}
    assert {r[0] for r in rows} == methods
    assert {r[1] for r in rows} == {"mprt_ssim", "mprt_spearman_abs", "mprt_spearman",
                                    "mprt_hog_cosine", "random_logit_ssim", "emprt"}
    assert len(rows) == len(methods) * 6 * 4  # half the samples, at least 4, as every curve run
    assert {c for c, _ in curves} == {"mprt_ssim", "mprt_spearman_abs", "mprt_spearman",
                                      "mprt_hog_cosine"}
    assert all(json.loads(xs) == [1, 2, 3, 4, 5, 6, 7] for _, xs in curves)  # 7 VGG layers
    assert sorted(figures) == sorted(f"randomisation/fmnist-vgg-relu/{m}" for m in methods)
    _, md = build_report(tmp_path)
    text = md.read_text()
    assert "## Randomisation (sanity checks)" in text and "(not run)" not in text.split(
        "## Randomisation (sanity checks)")[1].split("\n")[0]
    assert "mprt_ssim ↓" in text and "random_logit_ssim ↓" in text and "emprt ↑" in text


def test_quick_options_reach_every_row():
    from srdxai.experiments.config import method_options

    assert method_options("integrated_gradients", {}, quick=True) == {"steps": 16}
    assert method_options("integrated_gradients", {}, quick=False) == {}
    assert method_options("layercam", {"layer": "low"}, quick=True) == {"layer": "low"}
    quick_jobs = jobs(BenchConfig(experiments=["table2"], quick=True, samples=2))
    ig = next(j for j in quick_jobs if j.method == "integrated_gradients")
    assert dict(ig.options) == {"steps": 16}


def test_quick_table2_includes_efficientnet_on_the_composites_without_the_costliest_rows():
    from srdxai.experiments.suite.table2 import QUICK_SKIPPED_ON_IMAGENET, TABLE2_METHODS

    quick = jobs(BenchConfig(experiments=["table2"], quick=True, batch_size=8))
    lite = [j for j in quick if j.unit.model == "efficientnet-lite0"]
    rows = {j.unit.method for j in lite}
    assert rows == {m[0] for m in TABLE2_METHODS} - set(QUICK_SKIPPED_ON_IMAGENET)
    assert {s for j in lite for s in j.samples} == set(range(32))
    full = jobs(BenchConfig(experiments=["table2"], batch_size=8))
    assert {j.unit.method for j in full if j.unit.model == "efficientnet-lite0"} == {
        m[0] for m in TABLE2_METHODS}
    narrowed = jobs(BenchConfig(experiments=["table2", "activation"], quick=True,
                                models=["fmnist-resnet-*", "fmnist-vgg-relu"]))
    assert {j.unit.model for j in narrowed} == {
        "fmnist-vgg-relu", "fmnist-resnet-relu", "fmnist-resnet-elu", "fmnist-resnet-leaky_relu",
        "fmnist-resnet-silu", "fmnist-resnet-gelu", "fmnist-resnet-tanh"}


def test_a_model_filter_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(InvalidInputError, match="no model of table2 matches --models"):
        run(tmp_path, BenchConfig(experiments=["table2"], models=["resnet9000"]),
            progress=False)
    assert not (tmp_path / "results.sqlite").exists()
