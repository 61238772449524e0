"""``srdxai explain`` on the user's own model: built by a function of theirs or from a timm
architecture name, with a weight file, their input size and normalisation, their class names;
the maps as figures and ``.npy``; one comparison grid for several methods; clear errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import srdxai
from srdxai.cli import cli
from srdxai.models import user

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

NET_CODE = textwrap.dedent('''
    import torch
    from torch import nn

    def make_net(num_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def not_a_model():
        return 42
''')


@pytest.fixture
def project(tmp_path) -> dict[str, Path]:
    """A user's project: the model code, trained weights (here: altered random ones, so that
    loading them matters), class names and a photo that is not square."""
    code = tmp_path / "net.py"
    code.write_text(NET_CODE)
    namespace: dict = {}
    exec(NET_CODE, namespace)  # the same builder, to make the weights
    model = namespace["make_net"]()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.05)
    weights = tmp_path / "net.pt"
    # a training checkpoint, as DataParallel scripts save it
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                           model.state_dict().items()}}, weights)
    classes = tmp_path / "classes.txt"
    classes.write_text("tabby\nespresso\nrocket\n")
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
    return {"code": code, "weights": weights, "classes": classes, "photo": photo,
            "trained": model}


def _run(args):
    return CliRunner().invoke(cli, ["explain", *map(str, args)])


def test_your_builder_weights_classes_and_preprocessing(project, tmp_path):
    out = tmp_path / "out"
    result = _run([project["photo"], "--builder", f"{project['code']}:make_net",
                   "--weights", project["weights"], "--classes", project["classes"],
                   "--size", 32, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                   "--method", "gradient_x_input", "--top-k", 3, "--out", out])
    assert result.exit_code == 0, (result.output, result.exception)
    line = result.stdout.strip()
    assert line.endswith(f"-> {out / 'photo_gradient_x_input.png'}")
    assert all(name in line for name in ("tabby", "espresso", "rocket"))
    assert line.count(" | ") == 2  # three classes
    assert (out / "photo_gradient_x_input.png").read_bytes()[:8] == PNG_SIGNATURE

    # the map is the method on the trained model, fed the centre crop, normalised as asked
    picture = np.asarray(Image.open(project["photo"]).convert("RGB"))
    spec = user.image_spec(32, (0.5,) * 3, (0.25,) * 3)
    x = user.preprocess(picture, spec)
    expected = srdxai.explain(project["trained"].eval(), x, method="gradient_x_input")[0]
    saved = np.load(out / "photo_gradient_x_input.npy")
    assert saved.shape == (32, 32)
    np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_builder_module_on_the_path_and_a_comparison_grid(project, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(project["code"].parent))
    out = tmp_path / "out"
    result = _run([project["photo"], "--builder", "net:make_net", "--num-classes", 3,
                   "--weights", project["weights"], "--size", 32,
                   "--method", "saliency,gradient_x_input", "--out", out])
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted(p.name for p in out.iterdir()) == [
        "photo_saliency-gradient_x_input.gradient_x_input.npy",
        "photo_saliency-gradient_x_input.png",
        "photo_saliency-gradient_x_input.saliency.npy"]
    assert "class 0" in result.stdout or "class 1" in result.stdout  # no names given


def test_a_timm_architecture_by_name(tmp_path):
    from _compat import import_torchvision

    try:
        import_torchvision()
        import timm
    except ImportError:
        pytest.skip("timm is not installed")
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    weights = tmp_path / "r18.pt"
    torch.save(model.state_dict(), weights)
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 50, 3),
                                                      dtype=np.uint8)).save(photo)
    result = _run([photo, "--arch", "timm:resnet18", "--num-classes", 4, "--weights", weights,
                   "--size", 64, "--method", "srd", "--out", tmp_path / "out"])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = np.load(tmp_path / "out" / "p_srd.npy")
    x = user.preprocess(np.asarray(Image.open(photo).convert("RGB")), user.image_spec(64))
    with torch.no_grad():
        logits = model(x)[0]
    # SRD's map sums to the explained logit (float32 here)
    assert saved.sum() == pytest.approx(float(logits.max()), rel=1e-3, abs=1e-4)


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "efficientnet-lite0", "--arch", "resnet18"], "drop it"),
    (["--weights", "w.pt"], "give --arch or --builder"),
    (["--arch", "resnet18", "--builder", "net:make_net"], "exactly one"),
    (["--builder", "{code}:not_a_model"], "not a torch.nn.Module"),
    (["--builder", "{code}:missing"], "no function 'missing'"),
    (["--builder", "no_such_module_xyz:make"], "cannot import the builder module"),
    (["--builder", "{code}:make_net", "--weights", "{dir}/nothing.pt"], "missing"),
    (["--builder", "{code}:make_net", "--num-classes", "5", "--weights", "{weights}"],
     "does not match"),
    (["--builder", "{code}:make_net", "--classes", "{dir}/two.txt"], "has 2 class names"),
    (["--builder", "{code}:make_net", "--mean", "0.5,0.5"], "three comma-separated"),
    (["--builder", "{code}:make_net", "--std", "0.2,0,0.2"], "std finite and > 0"),
    (["--builder", "{code}:make_net", "--target", "7"], "out of range"),
    (["--builder", "{code}:make_net", "--method", "saliency,saliency"], "twice"),
    (["--arch", "torchvision:no_such_net_xyz"], "no_such_net_xyz"),
])
def test_clear_errors(project, tmp_path, args, message):
    (tmp_path / "two.txt").write_text("a\nb\n")
    filled = [a.format(code=project["code"], dir=tmp_path, weights=project["weights"])
              for a in args]
    result = _run([project["photo"], *filled, "--out", tmp_path / "out"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("srdxai: error: ")
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_centre_crop_keeps_the_middle_of_the_shorter_side():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, 50:150] = 255  # the central square is white, the sides black
    cropped = user.centre_crop(image, 64, crop_fraction=1.0)
    assert cropped.shape == (64, 64, 3)
    # only the white middle is left (the antialiasing filter blends the outermost columns)
    assert cropped[:, 1:-1].min() >= 250 and cropped.min() >= 200
    tall = user.centre_crop(np.zeros((300, 120, 3), dtype=np.uint8), 56)
    assert tall.shape == (56, 56, 3)


def test_read_class_names(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("cat\n dog \n\n")
    assert user.read_class_names(path) == ["cat", "dog"]
    with pytest.raises(srdxai.SrdxaiError, match="3 outputs"):
        user.read_class_names(path, 3)
