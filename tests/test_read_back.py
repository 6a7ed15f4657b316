"""What offshelf reads back is checked, not trusted (issue #23, section 1): codebooks beside a
store, the raw baseline's size, and features that are not finite, at extraction and at probe time."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from baselines.__main__ import build
from extract.datasets import load_dataset
from extract.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]


# -- codebooks: recomputed and checked on load, relearned on any mismatch ---------------------------

def _forge(saved: dict, how: str, key: str) -> dict:
    """The codebook's arrays tampered with ``how``, its settings and recorded SHA-256 kept."""
    forged = dict(saved)
    array = saved[key].copy()
    if how == "nan":
        array[0, 0] = np.nan
    elif how == "zero":
        array[:] = 0
    elif how == "shuffled":
        array = array[::-1].copy()
    elif how == "cut":
        array = array[:2]
    forged[key] = array
    return forged


@pytest.mark.parametrize("encoding,key,how", [*(("vlad", "centers", how) for how in ("nan", "zero", "shuffled", "cut")),
                                              ("fisher", "means", "shuffled"), ("fisher", "pca_components", "nan")])
def test_a_tampered_codebook_is_named_and_relearned_not_reused(image_tree, tmp_path, caplog, encoding, key, how):
    dataset = load_dataset(f"folder:{image_tree}")
    path = tmp_path / "cb.npz"
    genuine = build(encoding, dataset, preset="fast", words=4, dense=True)
    genuine.fit_dataset(dataset, path)
    image = dataset.read(0)
    expected = genuine.prepare(image)[genuine.taps[0]]
    with np.load(path) as saved:
        np.savez(path, **_forge({k: saved[k] for k in saved.files}, how, key))

    again = build(encoding, dataset, preset="fast", words=4, dense=True)
    with caplog.at_level(logging.INFO, logger="baselines.local"):
        again.fit_dataset(dataset, path)
    assert "reusing codebook" not in caplog.text
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(path) in warning and "learning it again" in warning, warning
    assert again.codebook_sha256 == genuine.codebook_sha256  # relearned, seeded: the genuine codebook, the same fingerprint
    np.testing.assert_array_equal(again.prepare(image)[again.taps[0]], expected)
    with np.load(path) as saved:
        assert again.codebook_problem({k: saved[k] for k in saved.files}) is None  # the file is the genuine one again


# -- raw pixels: the size comes from the settings, never from the first image ----------------------

def test_raw_thumbnails_are_32_pixels_whatever_the_first_image(tmp_path):
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "test" / "a" / "0.png")  # the first image listed: 1x1
    dataset = load_dataset(f"folder:{root}")
    assert dataset.read(0).shape[:2] == (1, 1)
    raw = build("raw", dataset)
    assert raw.fingerprint()["side"] == 32 and raw.dims == {"raw": 1024}
    assert raw.prepare(dataset.read(1)).shape == (1024,)


# -- features that are not finite: stopped or skipped at extraction, refused at probe time ----------

@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory):
    """A saved Keras model whose convolution overflows float32 on any bright pixel (a black image stays 0)."""
    import keras

    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(2, 3, strides=2, use_bias=False, kernel_initializer=keras.initializers.Constant(1e37), name="huge")(inputs)
    path = tmp_path_factory.mktemp("model") / "huge.keras"
    keras.Model(inputs, conv).save(path)
    return path


def _half_black_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.zeros((20, 20, 3), np.uint8) if i % 2 == 0 else rng.integers(1, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_features_that_are_not_finite_stop_extraction_naming_the_first_image_and_tap(overflowing_model, tmp_path):
    from extract.errors import UserError
    from extract.extractor import CNNFeaturizer
    from extract.pipeline import extract_to_store

    dataset = load_dataset(f"folder:{_half_black_tree(tmp_path / 'half')}")
    featurizer = CNNFeaturizer(f"keras:{overflowing_model}", batch_size=4)
    bright = [p for p in dataset.paths if not p.endswith(("0.png", "2.png"))]
    with pytest.raises(UserError) as raised:
        extract_to_store(dataset, featurizer, tmp_path / "f" / "huge.h5", progress=False)
    message = str(raised.value)
    assert "\n" not in message and "not finite" in message and "'huge'" in message and "--on-error skip" in message
    assert f"the first {bright[0]} in tap" in message and "2 of 4 images of a batch" in message
    assert not (tmp_path / "f" / "huge.h5").exists()

    path = extract_to_store(dataset, featurizer, tmp_path / "g" / "huge.h5", progress=False, on_error="skip")
    with FeatureStore(path) as store:
        assert sorted(store.paths) == sorted(set(dataset.paths) - set(bright))
        assert np.isfinite(store.features("huge")).all()
        assert sorted(p for p, _ in store.skipped) == sorted(bright)
        assert {reason for _, reason in store.skipped} == {"features not finite (NaN or infinity) in tap 'huge'"}


def _store_with_nan(folder: Path) -> Path:
    from extract.datasets.base import ImageDataset
    from extract.store import StoreWriter

    labels = np.array([0, 1] * 6)
    dataset = ImageDataset("shapes", ("a", "b"), tuple(f"{i}.png" for i in range(12)), labels,
                           tuple(["train"] * 8 + ["test"] * 4), read=None)
    features = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32) + labels[:, None]
    features[3, 2] = np.nan
    with StoreWriter(folder / "shapes" / "forged.h5", dataset=dataset, extractor="forged", fingerprint={"baseline": "forged"},
                     taps=["x"]) as writer:  # a store written before extraction checked its features
        writer.write_shard(np.arange(12), {"x": features})
        return writer.finalize()


def test_features_that_are_not_finite_are_one_line_at_probe_time(tmp_path):
    path = _store_with_nan(tmp_path / "features")
    with FeatureStore(path) as store:
        np.testing.assert_array_equal(store.features("x", np.array([0, 1, 2])).shape, (3, 5))  # other rows read as they are
    result = subprocess.run([sys.executable, "-m", "classify", "probe", "--dataset", f"folder:{tmp_path / 'shapes'}",
                             "--features-dir", str(tmp_path / "features"), "--results-dir", str(tmp_path / "results"),
                             "--no-progress", "--cs", "0.1,1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and last[-1].startswith("error: "), result.stderr
    assert f"{path}: layer 'x' holds features that are not finite" in last[-1] and "the first 3.png" in last[-1]
