"""The model zoo: architectures, `srdxai train`, shipped weights, the verifying registry."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import srdxai
from srdxai.cli import cli
from srdxai.data.fashion import ClutteredFashionMNIST, fashion_mnist_root, normalize
from srdxai.errors import InvalidInputError, SrdxaiError, UnknownModelError
from srdxai.methods import METHODS
from srdxai.models import class_names, list_models, load, model_info, shipped
from srdxai.models.zoo import ACTIVATIONS, SmallResNet, SmallVGG, small_vit
from srdxai.training import TrainConfig, evaluate, sha256_file, train
from test_methods_common import FAST_OPTIONS

HAVE_FASHION = (fashion_mnist_root() / "t10k-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST is not installed (apt-get install "
    "dataset-fashion-mnist, or set SRDXAI_FASHION_MNIST)")
SHIPPED = sorted(shipped.cards())


# --- architectures ---------------------------------------------------------------------------

@pytest.mark.parametrize("activation", sorted(ACTIVATIONS) + ["swish"])
@pytest.mark.parametrize("build", [SmallVGG, SmallResNet, small_vit])
def test_every_architecture_takes_every_activation(build, activation):
    torch.manual_seed(0)
    model = build(10, activation).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    expected = ACTIVATIONS["silu" if activation == "swish" else activation]().__class__
    assert any(isinstance(m, expected) for m in model.modules())


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="unknown activation 'mish'"):
        SmallVGG(10, "mish")


def test_vit_base_matches_timm_names_and_shapes():
    try:
        from _compat import import_torchvision

        import_torchvision()
        import timm
    except ImportError as error:
        pytest.skip(f"timm is not usable here: {error}")
    from srdxai.models.zoo import vit_base_patch16_224

    ours = vit_base_patch16_224().state_dict()
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in theirs.items()}


# --- training --------------------------------------------------------------------------------

TINY = {"epochs": 1, "train_size": 256, "batch_size": 64, "test_size": 128}


@needs_fashion
def test_train_writes_weights_and_a_true_card_deterministically(tmp_path):
    model, card = train(TrainConfig(arch="vgg", activation="tanh", **TINY), tmp_path / "a",
                        progress=False)
    weights = tmp_path / "a" / "fmnist-vgg-tanh.pt"
    assert card["sha256"] == sha256_file(weights)
    on_disk = json.loads((tmp_path / "a" / "fmnist-vgg-tanh.json").read_text())
    assert on_disk == card
    assert card["architecture"] == "vgg" and card["activation"] == "tanh"
    assert card["data"]["train_size"] == 256 and card["data"]["test_size"] == 128
    assert card["training"]["epochs"] == 1
    # the card's accuracy is the model's accuracy on those test samples
    test = ClutteredFashionMNIST("test", size=128).batch(range(128))
    assert evaluate(model, test.images, test.labels) == pytest.approx(card["test_accuracy"],
                                                                        abs=1e-4)
    assert not list((tmp_path / "a").glob("*.part"))
    _, again = train(TrainConfig(arch="vgg", activation="tanh", **TINY), tmp_path / "b",
                     progress=False)
    assert again["sha256"] == card["sha256"]  # same seeds, same weights, byte for byte


@needs_fashion
def test_train_command_line(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--arch", "resnet", "--activation", "swish",
                                      "--epochs", "1", "--train-size", "128", "--test-size",
                                      "64", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "fmnist-resnet-silu: test accuracy" in result.output
    assert (tmp_path / "fmnist-resnet-silu.pt").is_file()
    bad = CliRunner().invoke(cli, ["train", "--epochs", "0", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "epochs must be a positive int" in bad.output


# --- the registry ----------------------------------------------------------------------------

def test_zoo_is_shipped_small_and_complete():
    names = set(SHIPPED)
    expected = {f"fmnist-resnet-{a}" for a in ACTIVATIONS} | {"fmnist-vgg-relu",
                                                              "fmnist-vit-gelu"}
    assert expected <= names
    total = sum((shipped.WEIGHTS_DIR / f"{n}.pt").stat().st_size for n in names)
    assert total < 30e6
    assert set(list_models()) >= names | {"efficientnet-lite0"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_verified_and_reproduces_its_subset_accuracy(name):
    card = shipped.cards()[name]
    assert card["sha256"] == sha256_file(shipped.WEIGHTS_DIR / card["weights"])
    model = load(name)
    info = model_info(name)
    assert info.input_size == 64 and class_names(name)[0] == "T-shirt/top"
    if card["architecture"] in ("vgg", "resnet") and card["activation"] == "relu":
        assert card["test_accuracy"] >= 0.80, "the ReLU CNNs must reach 80 %"
    assert card["test_accuracy"] > 0.5  # clearly above chance (10 %)
    if not HAVE_FASHION:
        pytest.skip("Fashion-MNIST is not installed: accuracy not re-measured")
    n = card["test_subset"]["size"]
    test = ClutteredFashionMNIST("test", seed=card["data"]["data_seed"], size=n).batch(range(n))
    assert evaluate(model, test.images, test.labels) == pytest.approx(
        card["test_subset"]["accuracy"], abs=1.5 / n)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_its_card_accuracy_on_the_whole_test_split(name):
    if not HAVE_FASHION:
        pytest.skip("Fashion-MNIST is not installed")
    card = shipped.cards()[name]
    ds = ClutteredFashionMNIST("test", seed=card["data"]["data_seed"])
    test = ds.batch(range(len(ds)))
    assert evaluate(load(name), test.images, test.labels) == pytest.approx(
        card["test_accuracy"], abs=1.5 / len(ds))


def _copy(name, tmp_path):
    for suffix in (".pt", ".json"):
        shutil.copy(shipped.WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return shipped._spec(tmp_path / f"{name}.json")


def test_corrupt_weights_fail_the_checksum_with_a_clear_error(tmp_path):
    spec = _copy("fmnist-resnet-relu", tmp_path)
    path = tmp_path / "fmnist-resnet-relu.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SrdxaiError, match="fails its checksum"):
        spec.load(None)
    path.unlink()
    with pytest.raises(SrdxaiError, match="missing"):
        spec.load(None)


def test_mismatched_or_unreadable_checkpoint_is_a_clear_error(tmp_path):
    other = tmp_path / "vgg.pt"
    torch.save(SmallVGG(10).state_dict(), other)
    with pytest.raises(SrdxaiError, match="does not match its architecture"):
        load("fmnist-resnet-relu", weights_path=other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SrdxaiError, match="probably corrupt"):
        load("fmnist-resnet-relu", weights_path=junk)
    torch.save({"a": [1, 2]}, tmp_path / "notensors.pt")
    with pytest.raises(SrdxaiError):
        load("fmnist-resnet-relu", weights_path=tmp_path / "notensors.pt")
    with pytest.raises(UnknownModelError, match="fmnist-resnet-relu"):
        load("fmnist-resnet-mish")


def test_loaded_model_on_its_data_predicts_well():
    model = load("fmnist-resnet-relu")
    if not HAVE_FASHION:
        pytest.skip("Fashion-MNIST is not installed")
    b = ClutteredFashionMNIST("val", size=200).batch(range(200))
    with torch.no_grad():
        accuracy = (model(normalize(b.images)).argmax(1) == b.labels).float().mean()
    assert accuracy > 0.75


# --- every method on every shipped model -----------------------------------------------------

# On the ViT: the CAMs read the patch tokens of the LayerNorm feeding the last attention;
# FullGrad places the token biases on the patch grid; SRD explains token vectors; the LRP
# composites use their transformer rules.
CAM_METHODS = {"gradcam", "gradcam_pp", "xgradcam", "layercam", "scorecam", "ablationcam",
               "fullgrad"}
# (the LRP composites run on the shipped ViT with their transformer rules since 2026-12-05)
NOT_FOR_VIT: set[str] = set()  # every method explains the shipped ViT
VIT_ONLY = {"attention_rollout", "transformer_attribution", "srd_tokens"}  # token methods


@pytest.mark.parametrize("name", SHIPPED)
def test_srd_and_the_baselines_run_on_every_shipped_model(name):
    model = load(name)
    x = normalize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    vit = shipped.cards()[name]["architecture"] == "vit"
    for method in sorted(METHODS):
        if vit and method in NOT_FOR_VIT:
            with pytest.raises(srdxai.SrdxaiError,
                               match="transformer|linear layer on a tensor|no layer rule|"
                                     "LayerNorm"):
                srdxai.explain(model, x, [0, 3], method)
            continue
        if not vit and method in VIT_ONLY:
            refused = "Vision Transformers only|use method='srd'"
            with pytest.raises(srdxai.SrdxaiError, match=refused):
                srdxai.explain(model, x, [0, 3], method)
            continue
        maps = srdxai.explain(model, x, [0, 3], method, **FAST_OPTIONS.get(method, {}))
        assert maps.shape == (2, 64, 64), method
        assert torch.isfinite(maps).all(), method
        if method not in CAM_METHODS:  # a CAM is relu(sum): all-negative sums give 0 by design
            assert maps.abs().sum() > 0, method


def test_models_command_lists_the_zoo():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0 and "efficientnet-lite0" in result.output
    assert all(name in result.output for name in SHIPPED)
    table = CliRunner().invoke(cli, ["models", "--markdown"])
    assert table.exit_code == 0
    for name, card in shipped.cards().items():
        assert f"| `{name}` |" in table.output and f"{card['test_accuracy']:.3f}" in table.output


def test_efficientnet_packaged_weights_are_checksum_verified(tmp_path, monkeypatch):
    from srdxai.models import efficientnet

    try:
        original = efficientnet.default_weights_path()
    except ImportError as error:
        pytest.skip(f"EfficientNet-Lite0 packages missing: {error}")
    copy = tmp_path / original.name
    data = bytearray(original.read_bytes())
    data[-100] ^= 0x01
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(efficientnet, "default_weights_path", lambda: copy)
    with pytest.raises(SrdxaiError, match="fails its checksum.*force-reinstall"):
        load("efficientnet-lite0")
