"""``srdxai bench`` on your model and your data (the ``evaluate`` experiment): a builder file
or an ``nn.Module``, a folder of images (labels from class folders, masks from ``masks/``) or
an iterable of tensors; every named method and metric; resume, a 2-process ``torchrun`` run,
saved maps and recomputing metrics from them without explaining again; and the refusals."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import srdxai
from srdxai.cli import cli
from srdxai.errors import InvalidInputError
from srdxai.experiments import BenchConfig, jobs
from srdxai.experiments.own import ImageFolder, OwnSetup, evaluate, saved_maps

BUILDER = '''
import torch
from torch import nn

def make_net(num_classes=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, num_classes))
'''


def small_net(num_classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, num_classes)).eval()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three images per class folder, 20x24, each with a mask (a rectangle)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        (root / "masks" / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(
                root / cls / f"{k}.png")
            mask = np.zeros((20, 24), np.uint8)
            mask[4:14, 6:18] = 255
            Image.fromarray(mask).save(root / "masks" / cls / f"{k}.png")
    (tmp_path / "net.py").write_text(BUILDER)
    return root


def _rows(db: Path, metric: str | None = None) -> dict[tuple[str, int, str], float]:
    con = sqlite3.connect(db)
    try:
        query = "SELECT method, sample, metric, value FROM results"
        found = con.execute(query).fetchall()
    finally:
        con.close()
    return {(m, s, k): v for m, s, k, v in found if metric is None or k == metric}


def _bench(tmp_path: Path, run: str, *extra: str) -> None:
    result = CliRunner().invoke(cli, [
        "bench", str(tmp_path / run), "--builder", f"{tmp_path / 'net.py'}:make_net",
        "--num-classes", "2", "--data", str(tmp_path / "data"), "--size", "16",
        "--batch-size", "4", "--quiet", *extra])
    assert result.exit_code == 0, result.output


def test_the_folder_gives_labels_from_class_folders_and_masks_prepared_like_the_images(
        folder, tmp_path):
    data = ImageFolder(folder, size=16)
    assert len(data) == 6 and data.has_masks
    x, y, masks = data.batch([0, 3, 5])
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 1, 1]  # cat, dog (sorted folders)
    # the mask goes through the image's own resize and central crop: an image that is white
    # exactly where its mask is comes out white exactly where the prepared mask is
    assert masks is not None and masks.shape == (3, 16, 16) and masks.dtype == torch.bool
    white = np.zeros((20, 24, 3), np.uint8)
    white[4:14, 6:18] = 255
    Image.fromarray(white).save(folder / "cat" / "0.png")
    from srdxai.models.user import prepare

    seen = torch.from_numpy(prepare(white, data.spec)[..., 0] > 127)
    assert torch.equal(ImageFolder(folder, size=16).batch([0])[2][0], seen)
    assert 60 < int(seen.sum()) < 140  # about (10 x 12) * (16 / 18)^2
    assert ImageFolder(folder, 16, class_names=["dog", "cat"]).batch([0])[1].tolist() == [1]


def test_a_bench_run_on_your_model_and_folder_scores_every_method_and_metric(folder, tmp_path):
    _bench(tmp_path, "run", "--methods", "saliency,srd", "--metrics",
           "faithfulness_correlation,pointing_game,insertion,model_parameter_randomisation",
           "--save-maps")
    rows = _rows(tmp_path / "run" / "results.sqlite")
    metrics = {k for _, _, k in rows}
    assert metrics == {"faithfulness_correlation", "pointing_game", "insertion",
                       "model_parameter_randomisation[ssim]",
                       "model_parameter_randomisation[spearman_abs]",
                       "model_parameter_randomisation[spearman]",
                       "model_parameter_randomisation[hog_cosine]"}
    assert {(m, s) for m, s, _ in rows} == {(m, s) for m in ("saliency", "srd")
                                           for s in range(6)}
    # the stored maps are the maps: recompute one sample's SRD map
    maps = saved_maps(tmp_path / "run")
    samples, srd_maps = maps[(f"{tmp_path / 'net.py'}:make_net", "srd")]
    assert samples.tolist() == list(range(6)) and srd_maps.shape == (6, 16, 16)
    data = ImageFolder(folder, size=16)
    x, y, _ = data.batch([4])
    sys.path.insert(0, str(tmp_path))
    try:
        import net  # the builder file

        model = net.make_net(2).eval()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("net", None)
    again = srdxai.explain(model, x, y, "srd")
    assert np.allclose(srd_maps[4], again[0].detach().numpy(), rtol=1e-5, atol=1e-7)
    # the report has the section, with the directions of the registry
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "run" / "report.md").read_text()
    section = text[text.index("## Your model and data"):]
    assert "faithfulness\\_correlation ↑" in section or "faithfulness_correlation ↑" in section
    assert "model\\_parameter\\_randomisation[ssim] ↓" in section or (
        "model_parameter_randomisation[ssim] ↓" in section)
    # and only it: the paper's experiments, none of them run, are not listed as "not run"
    html = (tmp_path / "run" / "report.html").read_text()
    assert "not run" not in text.lower() and "not run" not in html.lower()
    assert "## Table 2" not in text and "Sections: Your model and data." in text


def test_metrics_recomputed_from_saved_maps_equal_the_first_run_without_explaining(
        folder, tmp_path, monkeypatch):
    first = evaluate(tmp_path / "first", setup=OwnSetup(
        builder=f"{tmp_path / 'net.py'}:make_net", num_classes=2, data=str(folder), size=16,
        methods=["saliency", "gradient_x_input"], metrics=["faithfulness_correlation"],
        save_maps=True), progress=False)
    assert first is not None

    def refuse(*args, **kwargs):
        raise AssertionError("a run with maps_from must not explain")

    monkeypatch.setattr(srdxai, "explain", refuse)
    second = evaluate(tmp_path / "second", setup=OwnSetup(
        builder=f"{tmp_path / 'net.py'}:make_net", num_classes=2, data=str(folder), size=16,
        methods=["saliency", "gradient_x_input"],
        metrics=["faithfulness_correlation", "sparseness"], maps_from=str(tmp_path / "first")),
        progress=False)
    assert second is not None
    before = _rows(first, "faithfulness_correlation")
    after = _rows(second, "faithfulness_correlation")
    assert before.keys() == after.keys() and all(before[k] == after[k] for k in before)
    assert len(_rows(second, "sparseness")) == 12
    other = OwnSetup(builder=f"{tmp_path / 'net.py'}:make_net", num_classes=2,
                     data=str(folder), size=20, methods=["saliency"],
                     maps_from=str(tmp_path / "first"))
    with pytest.raises(InvalidInputError, match="another size"):
        evaluate(tmp_path / "third", setup=other, progress=False)


def test_the_python_api_takes_a_module_and_an_iterable_and_resumes(tmp_path):
    model = small_net(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, 12, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    masks = torch.zeros(5, 12, 12, dtype=torch.bool)
    masks[:, 3:9, 3:9] = True
    items = [(x[:2], y[:2], masks[:2]), (x[2], y[2], masks[2]), (x[3:], y[3:], masks[3:])]
    db = evaluate(tmp_path, model, items, methods=["saliency", "gradcam"],
                  metrics=["pointing_game", "sparseness", "road"], batch_size=2,
                  progress=False)
    assert db is not None
    rows = _rows(db)
    assert len(rows) == 2 * 5 * 3
    # every value equals the metric called directly on the same maps
    maps = srdxai.explain(model, x, y, "gradcam")
    direct = srdxai.metrics.pointing_game(model, x, y, maps, masks)
    assert [rows[("gradcam", s, "pointing_game")] for s in range(5)] == direct.tolist()
    # resuming computes nothing new; another model is refused by the configuration hash
    assert evaluate(tmp_path, model, items, methods=["saliency", "gradcam"],
                    metrics=["pointing_game", "sparseness", "road"], batch_size=2,
                    progress=False) == db
    with pytest.raises(InvalidInputError, match="not both"):
        evaluate(tmp_path / "x", model, items, setup=OwnSetup(data="d"), progress=False)
    with pytest.raises(srdxai.SrdxaiError, match="configuration"):
        evaluate(tmp_path, small_net(4), items, methods=["saliency", "gradcam"],
                 metrics=["pointing_game", "sparseness", "road"], batch_size=2,
                 progress=False)


def test_fingerprints_follow_the_weights_and_hash_any_dtype():
    from srdxai.experiments.own import model_fingerprint

    model = small_net()
    assert model_fingerprint(model) == model_fingerprint(small_net())
    assert model_fingerprint(model) != model_fingerprint(small_net(4))
    assert model_fingerprint(small_net().to(torch.bfloat16)) != model_fingerprint(model)


@pytest.mark.parametrize("setup, message", [
    (dict(methods=["salency"]), "unknown method"),
    (dict(metrics=["fidelty"]), "unknown metric"),
    (dict(metrics=["gae"]), "mosaics of four images"),
    (dict(targets="random"), "targets must be"),
])
def test_bad_setups_are_refused_before_any_work(folder, tmp_path, setup, message):
    own = OwnSetup(builder=f"{tmp_path / 'net.py'}:make_net", data=str(folder), **setup)
    with pytest.raises(InvalidInputError, match=message):
        jobs(BenchConfig(experiments=["evaluate"], own=own))


def test_data_problems_are_named(folder, tmp_path):
    (folder / "masks" / "dog" / "2.png").unlink()
    with pytest.raises(InvalidInputError, match="lacks the mask of 1 image"):
        ImageFolder(folder)
    loose = tmp_path / "loose"
    (loose / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(loose / "cat" / "a.png")
    Image.new("RGB", (8, 8)).save(loose / "b.png")
    with pytest.raises(InvalidInputError, match="outside a class folder"):
        ImageFolder(loose)
    with pytest.raises(InvalidInputError, match="holds no images"):
        ImageFolder(_empty(tmp_path))
    with pytest.raises(InvalidInputError, match="not in the class names file"):
        ImageFolder(_classed(tmp_path), class_names=["dog"])
    no_masks = _classed(tmp_path)
    own = OwnSetup(builder=f"{tmp_path / 'net.py'}:make_net", data=str(no_masks),
                   metrics=["pointing_game"])
    with pytest.raises(InvalidInputError, match="pointing_game needs object masks"):
        jobs(BenchConfig(experiments=["evaluate"], own=own))


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _classed(tmp_path: Path) -> Path:
    root = tmp_path / "classed"
    if not root.exists():
        (root / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    return root


def test_the_cli_refuses_own_options_without_a_model(folder, tmp_path):
    result = CliRunner().invoke(cli, ["bench", str(tmp_path / "r"), "--data", str(folder)])
    assert result.exit_code != 0 and "give your model with --arch or --builder" in result.output
    result = CliRunner().invoke(cli, ["bench", str(tmp_path / "r"), "--builder", "x.py:f"])
    assert result.exit_code != 0 and "--data DIR" in result.output


@pytest.mark.slow
def test_two_gloo_processes_shard_your_evaluation(folder, tmp_path):
    args = ["bench", str(tmp_path / "two"), "--builder", f"{tmp_path / 'net.py'}:make_net",
            "--num-classes", "2", "--data", str(folder), "--size", "16", "--batch-size", "2",
            "--methods", "saliency,srd", "--metrics", "faithfulness_correlation", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "srdxai", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _bench(tmp_path, "one", "--methods", "saliency,srd", "--metrics",
           "faithfulness_correlation", "--batch-size", "2")
    two, one = _rows(tmp_path / "two" / "results.sqlite"), _rows(
        tmp_path / "one" / "results.sqlite")
    assert two.keys() == one.keys()
    assert all(abs(two[k] - one[k]) <= 1e-6 * max(1.0, abs(one[k])) for k in one)
    con = sqlite3.connect(tmp_path / "two" / "results.sqlite")
    ranks = {r for (r,) in con.execute("SELECT DISTINCT rank FROM units")}
    con.close()
    assert ranks == {0, 1}


def test_a_model_handed_over_from_python_cannot_be_resumed_without_it(folder, tmp_path):
    from srdxai.experiments import run

    own = OwnSetup(model_fingerprint="0" * 16, data=str(folder), methods=["saliency"],
                   metrics=["sparseness"])
    with pytest.raises(InvalidInputError, match=r"model \(model\) was handed over from Python"):
        run(tmp_path / "r", BenchConfig(experiments=["evaluate"], own=own), progress=False)
