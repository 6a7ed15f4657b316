"""Datasets: folder layouts, seeded splits and subsets, and the official Fashion-MNIST files."""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections import Counter

import numpy as np
import pytest

from conftest import make_image_tree
from extract.datasets import dataset_slug, fashion_mnist, load_dataset
from extract.datasets.base import balanced_subset
from extract.fileio import file_digest


def test_folder_with_split_folders(image_tree):
    dataset = load_dataset(f"folder:{image_tree}")
    assert dataset.name == "shapes" and dataset.classes == ("circle", "square")
    assert Counter(dataset.splits) == {"train": 16, "test": 8}
    assert dataset.paths[0] == "test/circle/000.jpg"
    assert dataset.read(0).shape == (48, 48, 3)


def test_folder_without_split_folders_gets_a_seeded_split(tmp_path):
    root = make_image_tree(tmp_path / "flat", per_class={"all": 12})
    for class_dir in (root / "all").iterdir():
        class_dir.rename(root / class_dir.name)
    (root / "all").rmdir()
    first = load_dataset(f"folder:{root}", seed=1)
    assert Counter(first.splits) == {"train": 18, "test": 6}
    assert first.splits == load_dataset(f"folder:{root}", seed=1).splits
    assert first.splits != load_dataset(f"folder:{root}", seed=2).splits
    for c in (0, 1):  # stratified
        assert sum(1 for s, l in zip(first.splits, first.labels) if l == c and s == "test") == 3


def test_balanced_subset_is_seeded_and_balanced(tmp_path):
    root = make_image_tree(tmp_path / "many", per_class={"train": 20, "test": 10})
    dataset = load_dataset(f"folder:{root}")
    subset = balanced_subset(dataset, 10, seed=0)
    counts = Counter(zip(subset.splits, subset.labels.tolist()))
    assert counts == {("train", 0): 5, ("train", 1): 5, ("test", 0): 3, ("test", 1): 2} or counts == {
        ("train", 0): 5, ("train", 1): 5, ("test", 0): 2, ("test", 1): 3}
    assert subset.paths == balanced_subset(dataset, 10, seed=0).paths
    assert subset.paths != balanced_subset(dataset, 10, seed=1).paths
    np.testing.assert_array_equal(subset.read(0), dataset.read(dataset.paths.index(subset.paths[0])))


def test_dataset_slug_is_filesystem_safe():
    assert dataset_slug("folder:../shared/data/flowers17") == "flowers17"
    assert dataset_slug("fashion-mnist") == "fashion-mnist"


def test_unknown_dataset_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_dataset(f"folder:{tmp_path / 'absent'}")


# -- Fashion-MNIST --------------------------------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_idx_parser_round_trip():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(fashion_mnist.parse_idx(gzip.compress(_idx(images)), "x"), images)
    with pytest.raises(ValueError, match="header says"):
        fashion_mnist.parse_idx(_idx(images)[:-5], "x")


def test_repacked_gzip_is_verified_against_the_official_md5(tmp_path):
    """A copy whose gzip header lost its file name (as Debian's) passes only with the official stream."""
    payload = b"\0\0\x08\x01" + struct.pack(">I", 3) + b"abc"
    official_bytes = gzip.compress(payload, mtime=1504176606)
    name = b"train-labels-idx1-ubyte\0"
    official_bytes = official_bytes[:3] + b"\x08" + official_bytes[4:10] + name + official_bytes[10:]
    official = fashion_mnist.OfficialFile("train-labels-idx1-ubyte.gz", hashlib.md5(official_bytes).hexdigest(), 1504176606)
    repacked = tmp_path / official.name
    repacked.write_bytes(official_bytes[:3] + b"\0" + b"\x11\x22\x33\x44" + official_bytes[8:10] + official_bytes[10 + len(name):])
    assert fashion_mnist.verify(repacked, official)
    tampered = bytearray(repacked.read_bytes())
    tampered[-9] ^= 1
    repacked.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="does not match the official MD5"):
        fashion_mnist.verify(repacked, official)



def test_file_digest_is_hashlibs_over_the_whole_file(tmp_path):
    """The one file checksum (downloads' MD5, weights files' SHA-256) covers every byte, past the first block."""
    data = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 5, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_digest(path) != hashlib.sha256(data).hexdigest()

def test_data_dir_without_the_files_says_how_to_fix(tmp_path):
    with pytest.raises(fashion_mnist.DatasetNotFoundError, match="DATA_DIR=.*train-images-idx3-ubyte.gz is missing"):
        fashion_mnist.locate(tmp_path)


def test_real_fashion_mnist_default_subset():
    try:
        fashion_mnist.locate(download=False)
    except fashion_mnist.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed here (`make setup` installs it): {error}")
    dataset = load_dataset("fashion-mnist")
    assert Counter(dataset.splits) == {"train": 2000, "test": 1000}
    assert Counter(dataset.labels[np.asarray(dataset.splits) == "train"].tolist()) == {c: 200 for c in range(10)}
    assert dataset.read(0).shape == (28, 28, 3)
    full = load_dataset("fashion-mnist", full=True)
    assert len(full) == 70000 and full.paths[0] == "train-images-idx3-ubyte#0" and full.labels[0] == 9
