"""Hand-crafted baselines: documented shapes, codebooks learned on training images only, blank images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from baselines.__main__ import build
from baselines.hog import HOGFeaturizer
from baselines.local import LocalFeaturizer, sift_descriptors, surf_descriptors, training_descriptors
from baselines.simple import ColorHistogram, RawPixels
from extract.datasets import load_dataset
from extract.pipeline import extract_to_store
from extract.store import FeatureStore


def _textured(size=128, seed=0):
    rng = np.random.default_rng(seed)
    image = np.kron(rng.integers(0, 255, (size // 8, size // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    return image


@pytest.mark.parametrize("describe,width", [(surf_descriptors, 64), (sift_descriptors, 128)])
@pytest.mark.parametrize("dense", [False, True])
def test_local_descriptor_shapes(describe, width, dense):
    gray = _textured()[:, :, 0]
    descriptors, positions = describe(gray, dense=dense)
    assert descriptors.dtype == np.float32 and descriptors.shape[1] == width and len(descriptors) > 10
    assert positions.shape == (len(descriptors), 2) and positions.min() >= 0 and positions.max() <= 1
    if dense:  # a regular grid covering the image, whatever its texture
        assert len(descriptors) >= (128 // 16) ** 2
        flat_descriptors, _ = describe(np.full_like(gray, 100), dense=True)
        assert len(flat_descriptors) == len(descriptors)


def test_blank_images_give_zero_features_not_crashes(tmp_path):
    for split, count in (("train", 6), ("test", 2)):
        for name in ("a", "b"):
            folder = tmp_path / "blank" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = _textured(seed=i) if name == "a" else np.full((64, 64, 3), 127, np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    dataset = load_dataset(f"folder:{tmp_path / 'blank'}")
    featurizer = LocalFeaturizer("sift", "bow", words=8)
    featurizer.fit_dataset(dataset, tmp_path / "codebook.npz")
    path = extract_to_store(dataset, featurizer, tmp_path / "sift_bow.h5", progress=False)
    with FeatureStore(path) as store:
        assert store.taps == ["bow8", "bow8_spm"] and store.dim("bow8") == 8 and store.dim("bow8_spm") == 40
        empty = store.stat("n_descriptors") == 0
        blank = np.array(["/b/" in f"/{p}" for p in store.paths])
        np.testing.assert_array_equal(empty, blank)
        assert np.all(store.features("bow8")[blank] == 0)
        np.testing.assert_allclose(store.features("bow8")[~blank].sum(axis=1), 1.0, rtol=1e-5)


def test_codebook_never_sees_test_images(image_tree, monkeypatch):
    dataset = load_dataset(f"folder:{image_tree}")
    seen = []
    original = dataset.read

    def spy(i, min_side=None):
        seen.append(dataset.splits[i])
        return original(i, min_side=min_side)

    object.__setattr__(dataset, "read", spy)
    training_descriptors(dataset, lambda gray: sift_descriptors(gray, dense=True), seed=0)
    assert seen and set(seen) == {"train"}


def test_codebook_is_saved_and_reused(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    first = LocalFeaturizer("sift", "vlad", words=4, dense=True)
    first.fit_dataset(dataset, tmp_path / "cb.npz")
    second = LocalFeaturizer("sift", "vlad", words=4, dense=True)
    second.fit_dataset(dataset, tmp_path / "cb.npz")
    assert first.codebook_sha256 == second.codebook_sha256
    image = dataset.read(0)
    np.testing.assert_allclose(first.prepare(image)["vlad4"], second.prepare(image)["vlad4"], rtol=1e-6)
    assert first.prepare(image)["vlad4"].shape == (4 * 128,)


def test_fisher_vector_shape(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    fisher = LocalFeaturizer("sift", "fisher", words=2, dense=True)
    fisher.fit_dataset(dataset, tmp_path / "fv.npz")
    assert fisher.prepare(dataset.read(0))["fv2"].shape == (2 * (2 * 64 + 1),)


def test_simple_baselines_shapes():
    image = _textured(96)
    assert RawPixels(32).prepare(image).shape == (1024,)
    histogram = ColorHistogram().prepare(image)
    assert histogram.shape == (256,) and histogram.sum() == pytest.approx(1.0)
    assert HOGFeaturizer(128).prepare(image).shape == (8100,)  # 16x16 cells of 8 px, 15x15 blocks of 2x2x9
    assert HOGFeaturizer(28).prepare(image).shape == (1296,)  # Fashion-MNIST: 7x7 cells of 4 px


def test_unknown_baseline(image_tree):
    with pytest.raises(ValueError, match="unknown baseline 'sift_magic'"):
        build("sift_magic", load_dataset(f"folder:{image_tree}"))
