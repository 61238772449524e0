"""Datasets: cluttered Fashion-MNIST, ImageNet composites, and the loaders for the originals."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from srdxai.data.composites import PHOTO_LABELS, ImageNetComposites
from srdxai.data.fashion import (
    MASK_OPACITY,
    ClutteredFashionMNIST,
    fashion_mnist_root,
    load_fashion_mnist,
)
from srdxai.data.originals import CIFAR100, ImageNetS, read_synsets
from srdxai.errors import InvalidInputError, MissingDependencyError, SrdxaiError

HAVE_FASHION = (fashion_mnist_root() / "t10k-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST is not installed (apt-get install "
    "dataset-fashion-mnist, or set SRDXAI_FASHION_MNIST)")


# --- cluttered Fashion-MNIST -----------------------------------------------------------------

@needs_fashion
def test_splits_follow_the_originals():
    train, _ = load_fashion_mnist("train")
    val, _ = load_fashion_mnist("val")
    test, labels = load_fashion_mnist("test")
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.shape[1:] == (28, 28) and set(np.unique(labels)) == set(range(10))


@needs_fashion
def test_same_seed_gives_identical_tensors_and_other_seeds_differ():
    a = ClutteredFashionMNIST("test", seed=3).batch([0, 5, 17])
    b = ClutteredFashionMNIST("test", seed=3).batch([17, 0, 5])
    assert torch.equal(a.images[0], b.images[1]) and torch.equal(a.images[2], b.images[0])
    assert torch.equal(a.masks[1], b.masks[2]) and torch.equal(a.boxes[0], b.boxes[1])
    c = ClutteredFashionMNIST("test", seed=4).batch([0])
    assert not torch.equal(a.images[0], c.images[0])
    # a sample does not depend on the dataset's size limit
    d = ClutteredFashionMNIST("test", seed=3, size=20).batch([5])
    assert torch.equal(d.images[0], a.images[1])


@needs_fashion
def test_masks_align_with_the_object_pixels():
    """The mask is where the item changed the image, and has the item's shape."""
    from PIL import Image

    ds = ClutteredFashionMNIST("val", seed=1)
    batch = ds.batch(range(30))
    for k in range(30):
        mask, box = batch.masks[k], batch.boxes[k]
        with_item, _ = ds._render(k)
        without_item, _ = ds._render(k, draw_item=False)  # same draws, same noise
        changed = torch.from_numpy(np.abs(with_item - without_item).max(0))
        # Outside the mask the item's opacity is <= MASK_OPACITY, so no channel moves by more.
        assert float(changed[~mask].max()) <= MASK_OPACITY + 1e-6
        # Inside it, the item (a colour >= 0.5 per channel at opacity > 0.1) shows nearly
        # everywhere (it can only hide where clutter already had its colour).
        assert float((changed[mask] > 0.01).float().mean()) > 0.95
        # The box bounds the mask tightly.
        x0, y0, x1, y1 = box.tolist()
        assert int(mask[y0:y1, x0:x1].sum()) == int(mask.sum())
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
        # The mask has the garment's shape: shrunk back to 28 x 28 it matches the original
        # item's silhouette (IoU > 0.7; the item's own bounding box may be smaller than 28 x 28,
        # so compare within the item's box).
        item = ds.items[k] > 255 * MASK_OPACITY
        rows, cols = np.nonzero(item)
        item_box = item[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        crop = mask[y0:y1, x0:x1].numpy().astype(np.uint8) * 255
        shrunk = np.asarray(Image.fromarray(crop).resize(item_box.shape[::-1],
                                                         Image.Resampling.BILINEAR)) > 127
        iou = (shrunk & item_box).sum() / (shrunk | item_box).sum()
        assert iou > 0.7, (k, iou)


@needs_fashion
def test_labels_are_the_items_labels_and_images_are_rgb_in_range():
    ds = ClutteredFashionMNIST("test", size=50)
    _, labels = load_fashion_mnist("test")
    b = ds.batch(range(50))
    assert torch.equal(b.labels, torch.from_numpy(labels[:50].astype(np.int64)))
    assert b.images.shape == (50, 3, 64, 64) and b.images.dtype == torch.float32
    assert float(b.images.min()) >= 0 and float(b.images.max()) <= 1
    sample = ds[3]
    assert torch.equal(sample["image"], b.images[3]) and int(sample["label"]) == labels[3]


@needs_fashion
def test_bad_arguments_are_clear_errors():
    with pytest.raises(InvalidInputError, match="unknown split"):
        ClutteredFashionMNIST("valid")
    with pytest.raises(InvalidInputError, match="canvas"):
        ClutteredFashionMNIST("test", canvas=16)
    with pytest.raises(InvalidInputError, match="indices"):
        ClutteredFashionMNIST("test", size=10).batch([10])


def test_missing_or_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(MissingDependencyError, match="dataset-fashion-mnist"):
        ClutteredFashionMNIST("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(SrdxaiError, match="corrupt"):
        ClutteredFashionMNIST("test", root=tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 5, 28, 28) + bytes(28 * 28 * 4))  # one item short
    with pytest.raises(SrdxaiError, match="truncated"):
        load_fashion_mnist("test", tmp_path)


# --- ImageNet composites ---------------------------------------------------------------------

def test_composites_are_deterministic_with_box_masks():
    ds = ImageNetComposites(count=20, seed=0)
    a, b = ds.batch(range(10)), ImageNetComposites(count=20, seed=0).batch(range(10))
    assert np.array_equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not np.array_equal(ImageNetComposites(count=20, seed=1).batch([0]).images[0],
                              a.images[0])
    assert a.images.shape == (10, 224, 224, 3) and a.images.dtype == np.uint8
    for k in range(10):
        x0, y0, x1, y1 = a.boxes[k].tolist()
        assert 96 <= max(x1 - x0, y1 - y0) <= 150
        assert int(a.masks[k].sum()) == (x1 - x0) * (y1 - y0)
        assert a.masks[k, y0:y1, x0:x1].all()
        assert int(a.labels[k]) == PHOTO_LABELS[a.photos[k]]
    assert set(a.photos) == set(PHOTO_LABELS)  # balanced: every photo within 5 samples


def test_composite_mask_covers_the_photo_pixels():
    """The box holds the sample's photo: a crop of >= 80 % per side (maybe mirrored) resized to
    the box, so it is close to the whole photo resized to the box, and far from the others."""
    from PIL import Image

    from srdxai.data.composites import _sources

    ds = ImageNetComposites(count=10, seed=2)
    b = ds.batch(range(10))
    photos, _ = _sources()
    for k in range(10):
        x0, y0, x1, y1 = b.boxes[k].tolist()
        region = b.images[k, y0:y1, x0:x1].astype(np.float32)

        distance = {}
        for name in PHOTO_LABELS:
            whole = np.asarray(Image.fromarray(photos[name]).resize((x1 - x0, y1 - y0)),
                               np.float32)
            distance[name] = min(np.abs(region - whole).mean(),
                                 np.abs(region - whole[:, ::-1]).mean())
        own = distance.pop(b.photos[k])
        assert own < 40, (k, own)
        assert all(own < d for d in distance.values())


# --- loaders for the originals ---------------------------------------------------------------

def _write_imagenet_s(root, wnids=("n00000002", "n00000001")):
    from PIL import Image

    (root / "LOC_synset_mapping.txt").write_text(
        "n00000001 first class\nn00000002 second class\nn00000003 third\n")
    for wnid in wnids:
        (root / "validation" / wnid).mkdir(parents=True)
        (root / "validation-segmentation" / wnid).mkdir(parents=True)
        image = np.zeros((300, 400, 3), np.uint8)
        image[100:200, 150:250] = 255
        Image.fromarray(image).save(root / "validation" / wnid / "a.JPEG")
        seg = np.zeros((300, 400, 3), np.uint8)
        seg[100:200, 150:250, 0] = 7  # class id 7 (R + 256 G)
        seg[0:10, 0:10, 0], seg[0:10, 0:10, 1] = 1000 % 256, 1000 // 256  # ignore label
        Image.fromarray(seg).save(root / "validation-segmentation" / wnid / "a.png")


def test_imagenet_s_loader_maps_wnids_and_masks(tmp_path):
    _write_imagenet_s(tmp_path)
    ds = ImageNetS(tmp_path)
    assert len(ds) == 2
    s = ds[0]
    assert s.label == 0 and ds[1].label == 1  # sorted folders; indices from the synset file
    assert s.image.shape == (3, 224, 224) and s.mask.shape == (224, 224)
    # 300x400 -> 256x341, centre crop 224: the 100x100 square becomes 85x85 around the centre
    rows, cols = np.nonzero(s.mask.numpy())
    assert 80 <= rows.max() - rows.min() + 1 <= 90 and 80 <= cols.max() - cols.min() + 1 <= 90
    assert abs(rows.mean() - 111.5) < 3 and abs(cols.mean() - 111.5) < 3
    assert not s.mask[0, 0]  # the ignore label (1000) is not object
    # the white square is where the mask is (normalised white is > 2)
    assert float(s.image[0][s.mask].mean()) > 2 and float(s.image[0][~s.mask].mean()) < 0


def test_imagenet_s_errors_are_clear(tmp_path):
    with pytest.raises(SrdxaiError, match="does not exist"):
        ImageNetS(tmp_path)
    _write_imagenet_s(tmp_path, wnids=("n00000009",))
    with pytest.raises(SrdxaiError, match="not in the synset list"):
        ImageNetS(tmp_path)
    (tmp_path / "bad.txt").write_text("hello world\n")
    with pytest.raises(SrdxaiError, match="not a synset list"):
        read_synsets(tmp_path / "bad.txt")


def _write_cifar(folder, n=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": list(range(n)), b"coarse_labels": [i % 2 for i in range(n)],
             b"filenames": [b"x.png"] * n}
    with open(folder / "test", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return entry


def test_cifar100_loader_reads_the_python_pickle(tmp_path):
    entry = _write_cifar(tmp_path / "cifar-100-python")
    ds = CIFAR100(tmp_path, "test")
    assert ds.images.shape == (6, 3, 32, 32) and ds.labels.tolist() == list(range(6))
    raw = entry[b"data"][2].reshape(3, 32, 32).astype(np.float32) / 255
    expected = (raw[0] - 0.5071) / 0.2673
    assert np.allclose(ds.images[2, 0].numpy(), expected, atol=1e-6)
    assert CIFAR100(tmp_path / "cifar-100-python", "test", labels="coarse").labels.tolist() == \
        [0, 1, 0, 1, 0, 1]


def test_cifar100_refuses_a_pickle_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(SrdxaiError, match="refusing to load builtins.print"):
        CIFAR100(tmp_path)
    with pytest.raises(SrdxaiError, match="does not exist"):
        CIFAR100(tmp_path, "train")
    with pytest.raises(InvalidInputError):
        CIFAR100(tmp_path, "val")


def test_composite_labels_are_efficientnet_predictions_and_it_finds_them():
    """Each photo's label is EfficientNet-Lite0's top-1 class for the whole clean photo resized
    to 224 x 224 (how the labels were chosen; `preprocess` centre-crops instead), and the pasted
    photos are still recognised on the textures often enough to evaluate on."""
    try:
        from srdxai.models import load, model_info, preprocess
        from srdxai.models.base import normalize, resize_image
        model = load("efficientnet-lite0")
    except ImportError as error:
        pytest.skip(f"EfficientNet-Lite0 packages missing: {error}")
    from srdxai.data.composites import _sources

    photos, _ = _sources()
    with torch.no_grad():
        for name, label in PHOTO_LABELS.items():
            whole = normalize(resize_image(photos[name], 224), model_info("efficientnet-lite0"))
            assert int(model(whole).argmax()) == label, name
        b = ImageNetComposites(count=40).batch(range(40))
        x = torch.cat([preprocess(image) for image in b.images])
        hits = (model(x).argmax(1) == b.labels).float().mean()
    assert hits >= 0.4, float(hits)


def test_read_image_scales_16_bit_greyscale_and_refuses_unknown_ranges(tmp_path):
    from PIL import Image

    from srdxai.data import read_image
    from srdxai.errors import InvalidInputError

    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # Pillow's I;16: clipped to white by
    rgb = read_image(tmp_path / "deep.png")             # convert("RGB")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all()

    Image.fromarray(np.random.rand(8, 8).astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(InvalidInputError, match="floating-point"):
        read_image(tmp_path / "float.tiff")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match="cannot read image"):
        read_image(tmp_path / "broken.png")
    eight = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), eight)
