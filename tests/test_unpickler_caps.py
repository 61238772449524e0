"""The bounded unpickler behind the CIFAR-100 loader: hostile pickles cost neither memory nor time.

Each hostile file below is a few hundred bytes that the plain unpickler (or numpy on what it
returns) turns into minutes of CPU, terabytes of allocation or an uncaught MemoryError; each
must be a typed error within a fraction of a second, and genuine CIFAR-like pickles must still
load.
"""

from __future__ import annotations

import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from srdxai.data import safe_pickle
from srdxai.data.originals import CIFAR100
from srdxai.data.safe_pickle import PickledArray, load_pickle
from srdxai.errors import InvalidInputError, SrdxaiError

SECONDS = 2.0  # far above what a refusal takes, far below what the attacks cost unchecked


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _cifar(n: int = 4, seed: int = 0, str_keys: bool = False) -> dict:
    """What the CIFAR-100 python files hold (their Python 2 str keys read back as bytes)."""
    rng = np.random.default_rng(seed)
    entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
             b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
             b"filenames": [f"img_{i}.png".encode() for i in range(n)],
             b"batch_label": b"testing batch 1 of 1"}
    return {k.decode(): v for k, v in entry.items()} if str_keys else entry


def _refused(folder: Path, raw: bytes, match: str) -> InvalidInputError:
    (folder / "test").write_bytes(raw)
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=match) as err:
        CIFAR100(folder)
    assert time.perf_counter() - start < SECONDS
    assert isinstance(err.value, SrdxaiError) and str(folder / "test") in str(err.value)
    return err.value


def _aliased_lists(levels: int) -> list:
    """L[k+1] = [L[k], L[k]]: the pickle memo keeps it tiny, a walk over it takes 2**levels."""
    nested: list = []
    for _ in range(levels):
        nested = [nested, nested]
    return nested


# --- genuine pickles ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("str_keys", [False, True])
def test_genuine_cifar_pickles_load(tmp_path, protocol, str_keys):
    entry = _cifar(str_keys=str_keys)
    (tmp_path / "test").write_bytes(pickle.dumps(entry, protocol=protocol))
    ds = CIFAR100(tmp_path)
    key = "fine_labels" if str_keys else b"fine_labels"
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == entry[key]
    raw = entry["data" if str_keys else b"data"][1].reshape(3, 32, 32) / 255
    assert np.allclose(ds.images[1, 2].numpy(), (raw[2] - 0.4409) / 0.2762, atol=1e-6)
    coarse = CIFAR100(tmp_path, labels="coarse").labels.tolist()
    assert coarse == entry["coarse_labels" if str_keys else b"coarse_labels"]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("array", [
    np.arange(12, dtype=">f4").reshape(3, 4),
    np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    np.array([True, False]),
    np.zeros((0, 3072), np.uint8),
    np.float64(2.5),
], ids=["big-endian", "fortran", "bool", "empty", "scalar"])
def test_numeric_arrays_round_trip(tmp_path, protocol, array):
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(array, protocol=protocol))
    got = load_pickle(tmp_path / "a.pkl")
    got = got.array() if isinstance(got, PickledArray) else got
    assert got.dtype == array.dtype and np.array_equal(got, array)


# --- hostile pickles ------------------------------------------------------------------------


def test_shared_nested_lists_are_refused_without_walking_them(tmp_path):
    labels = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                           b"fine_labels": _aliased_lists(60)}, protocol=2)
    _refused(tmp_path, labels, "fine_labels holds a list")
    data = pickle.dumps({b"data": _aliased_lists(60), b"fine_labels": [0, 1]}, protocol=2)
    assert len(data) < 600
    _refused(tmp_path, data, "data is a list, not a numpy array")


def test_a_tiny_file_claiming_a_4_tib_array_is_refused_before_allocating(tmp_path):
    shape = (2**40).to_bytes(6, "little")
    raw = (b"\x80\x02" + _global("numpy.core.multiarray", "_reconstruct")
           + _global("numpy", "ndarray") + b"\x8a\x06" + shape + b"\x85U\x01f\x87R.")
    assert len(raw) < 100
    _refused(tmp_path, raw, r"an array claims 4\.0 TiB \(shape \(1099511627776,\) of float32\)")


def test_an_array_whose_state_claims_more_than_its_bytes_is_refused(tmp_path):
    # a genuine pickle of a small array, with the shape in its state grown to 2**40 x 3072
    raw = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}, protocol=2)
    grown = raw.replace(b"K\x01M\x00\x0c\x86", b"\x8a\x06" + (2**40).to_bytes(6, "little")
                        + b"M\x00\x0c\x86")
    assert grown != raw
    _refused(tmp_path, grown, "an array claims 3.0 PiB")
    small = raw.replace(b"K\x01M\x00\x0c\x86", b"K\x02M\x00\x0c\x86")
    _refused(tmp_path, small, r"needs 6\.0 KiB but the file holds 3\.0 KiB")


def test_object_arrays_are_refused(tmp_path):
    raw = pickle.dumps({b"data": np.array([None, None], dtype=object)}, protocol=2)
    _refused(tmp_path, raw, "refusing numpy dtype 'O8'")


def test_an_aliased_tuple_as_dict_key_is_refused_before_hashing(tmp_path):
    # T0 = (), T[k+1] = (T[k], T[k]), {T60: 1}: hashing T60 walks 2**60 tuples
    levels = b"".join(b"h" + bytes([k + 1]) + b"h" + bytes([k + 1]) + b"\x86q" + bytes([k + 2])
                      for k in range(60))
    raw = b"\x80\x02}q\x00)q\x01" + levels + b"K\x01s."
    _refused(tmp_path, raw, "a dict key is a tuple")


@pytest.mark.parametrize(("raw", "match"), [
    (b"\x80\x02Nr" + struct.pack("<I", 0xFFFFFFF0) + b".", "memo index 4294967280 out of range"),
    (b"\x80\x04\x8e" + struct.pack("<Q", 2**50) + b"abc.", "expected 1125899906842624 bytes"),
    (b"\x80\x03B" + struct.pack("<I", 2**31) + b"abc.", "expected 2147483648 bytes"),
    (b"\x80\x02" + _global("_codecs", "encode") + b"X\x03\x00\x00\x00abcX\x03\x00\x00\x00hex"
     b"\x86R.", "refusing _codecs.encode other than"),
    (b"\x80\x02" + _global("builtins", "bytes") + b"J\x00\x00\x00\x40\x85R.",
     "refusing bytes.. with arguments"),
    (b"\x80\x02" + _global("builtins", "list") + b"X\x03\x00\x00\x00abc\x85R.",
     "refusing to load builtins.list"),
    (b"\x80\x02" + _global("numpy", "dtype") + b"X\x05\x00\x00\x00V9999\x85R.",
     "refusing numpy dtype 'V9999'"),
    (b"\x80\x02\x8f.", "refusing pickle opcode EMPTY_SET"),
], ids=["memo-index", "bytes8-length", "bytes4-length", "hex-codec", "bytes-n", "list-call",
        "void-dtype", "set"])
def test_small_files_that_would_allocate_or_run_much_are_refused(tmp_path, raw, match):
    _refused(tmp_path, raw, match)


def test_file_size_and_opcode_count_are_capped(tmp_path, monkeypatch):
    raw = pickle.dumps(_cifar(n=8), protocol=4)
    (tmp_path / "test").write_bytes(raw)
    monkeypatch.setattr(safe_pickle, "MAX_FILE_BYTES", len(raw) - 1)
    with pytest.raises(InvalidInputError, match="files over .* are not read"):
        CIFAR100(tmp_path)
    monkeypatch.setattr(safe_pickle, "MAX_FILE_BYTES", len(raw))
    assert len(CIFAR100(tmp_path)) == 8
    monkeypatch.setattr(safe_pickle, "MAX_OPCODES", 20)
    with pytest.raises(InvalidInputError, match="more than 20 pickle opcodes"):
        CIFAR100(tmp_path)


def test_labels_out_of_range_or_mismatched_are_clear_errors(tmp_path):
    entry = _cifar()
    entry[b"fine_labels"][0] = 100
    _refused(tmp_path, pickle.dumps(entry, protocol=2), r"fine labels must lie in 0\.\.99")
    entry = _cifar()
    entry[b"fine_labels"].append(3)
    _refused(tmp_path, pickle.dumps(entry, protocol=2), r"one label per image \(4\), found 5")
    entry = _cifar()
    entry[b"data"] = entry[b"data"].astype(np.int64)
    _refused(tmp_path, pickle.dumps(entry, protocol=2), "is not N x 3072 uint8")
