"""Hand-crafted baselines: documented shapes, codebooks learned on one split only and written
atomically, descriptors computed once for every encoder, the registry, scikit-learn's contract."""

from __future__ import annotations

import json
import logging
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.utils.estimator_checks import parametrize_with_checks

from baselines.__main__ import build, codebook_path, run_baselines
from baselines.descriptors import DescriptorSpec, sift_descriptors, surf_descriptors
from baselines.encoders import VLAD, BagOfWords, FisherVector
from baselines.hog import HOGFeaturizer
from baselines.local import LocalFeaturizer, fit_codebooks
from baselines.registry import PRESETS, REGISTRY, build_baseline, list_baselines
from baselines.simple import ColorHistogram, RawPixels
from extract.datasets import load_dataset
from extract.pipeline import extract_to_store, store_path
from extract.store import FeatureStore, StoreMismatchError


def _textured(size=128, seed=0):
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 255, (size // 8, size // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)


@pytest.mark.parametrize("describe,width", [(surf_descriptors, 64), (sift_descriptors, 128)])
@pytest.mark.parametrize("dense", [False, True])
def test_local_descriptor_shapes(describe, width, dense):
    gray = _textured()[:, :, 0]
    descriptors, positions = describe(gray, dense=dense, step=8, bin_sizes=(4, 6))
    assert descriptors.dtype == np.float32 and descriptors.shape[1] == width and len(descriptors) > 10
    assert positions.shape == (len(descriptors), 2) and positions.min() >= 0 and positions.max() <= 1
    if dense:  # a regular grid at every scale, covering the image whatever its texture
        flat_descriptors, _ = describe(np.full_like(gray, 100), dense=True, step=8, bin_sizes=(4, 6))
        assert len(flat_descriptors) == len(descriptors)
        if describe is sift_descriptors:  # the same grid of centres at both scales
            assert len(descriptors) % 2 == 0 and len(descriptors) // 2 == ((128 - 2 * 2 * 6 - 1) // 8 + 1) ** 2


def test_dense_sift_is_a_sift_descriptor():
    """Unit L2 norm, no bin above 0.2 before renormalisation, and rotating the image by 90
    degrees moves the energy to the orientation bins 2 away (8 bins of 45 degrees)."""
    gray = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1)).astype(np.uint8)  # a horizontal ramp
    descriptors, _ = sift_descriptors(gray, dense=True, step=16, bin_sizes=(4,))
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)
    along_x = descriptors.reshape(len(descriptors), 16, 8).sum(axis=(0, 1))
    rotated, _ = sift_descriptors(np.ascontiguousarray(np.rot90(gray)), dense=True, step=16, bin_sizes=(4,))
    along_y = rotated.reshape(len(rotated), 16, 8).sum(axis=(0, 1))
    assert np.argmax(along_x) in (0, 7) or np.argmax(along_x) == 0
    assert abs(int(np.argmax(along_y)) - int(np.argmax(along_x))) % 8 in (2, 6)


def _two_class_tree(root, *, splits=(("train", 6), ("test", 2))):
    for split, count in splits:
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = _textured(64, seed=i) if name == "a" else np.full((64, 64, 3), 127, np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def test_blank_images_give_zero_features_not_crashes(tmp_path):
    dataset = load_dataset(f"folder:{_two_class_tree(tmp_path / 'blank')}")
    featurizer = LocalFeaturizer("sift_bow", DescriptorSpec("sift", dense=False), "bow", words=8, levels=3, chi2=True)
    featurizer.fit_dataset(dataset, tmp_path / "codebook.npz")
    path = extract_to_store(dataset, featurizer, tmp_path / "sift_bow.h5", progress=False)
    with FeatureStore(path) as store:
        assert store.taps == ["bow8", "bow8_spm", "bow8_spm_chi2"]
        assert (store.dim("bow8"), store.dim("bow8_spm"), store.dim("bow8_spm_chi2")) == (8, 8 * 21, 3 * 8 * 21)
        empty = store.stat("n_descriptors") == 0
        blank = np.array(["/b/" in f"/{p}" for p in store.paths])
        np.testing.assert_array_equal(empty, blank)
        assert np.all(store.features("bow8")[blank] == 0) and np.all(store.features("bow8_spm_chi2")[blank] == 0)
        np.testing.assert_allclose(store.features("bow8")[~blank].sum(axis=1), 1.0, rtol=1e-5)
        # Lazebnik et al.'s weights: 1/4 (1x1) + 1/4 (2x2) + 1/2 (4x4), each level summing to its weight
        spm = store.features("bow8_spm")[~blank]
        np.testing.assert_allclose([spm[:, :8].sum(1), spm[:, 8:40].sum(1), spm[:, 40:].sum(1)], [[0.25] * len(spm), [0.25] * len(spm), [0.5] * len(spm)], rtol=1e-5)


def test_codebook_never_sees_test_images(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    seen = []
    original = dataset.read

    def spy(i, min_side=None):
        seen.append(dataset.splits[i])
        return original(i, min_side=min_side)

    object.__setattr__(dataset, "read", spy)
    featurizers = [build(name, dataset, preset="fast", words=4, dense=True) for name in ("sift_bow", "vlad", "fisher")]
    fit_codebooks(dataset, featurizers, [tmp_path / f"{f.name}.npz" for f in featurizers])
    assert seen and set(seen) == {"train"}
    assert len(seen) == 16  # one pass over the sample serves all three codebooks


def test_codebook_is_saved_reused_and_relearned_when_corrupt(image_tree, tmp_path, caplog):
    dataset = load_dataset(f"folder:{image_tree}")
    path = tmp_path / "cb.npz"
    first = build("vlad", dataset, preset="fast", words=4, dense=True)
    first.fit_dataset(dataset, path)
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, renamed into place
    second = build("vlad", dataset, preset="fast", words=4, dense=True)
    with caplog.at_level(logging.INFO, logger="baselines.local"):
        second.fit_dataset(dataset, path)
    assert "reusing codebook" in caplog.text and first.codebook_sha256 == second.codebook_sha256
    image = dataset.read(0)
    np.testing.assert_array_equal(first.prepare(image)["vlad4"], second.prepare(image)["vlad4"])
    assert first.prepare(image)["vlad4"].shape == (4 * 128,)

    path.write_bytes(path.read_bytes()[:100])  # a kill mid-write of the old, in-place np.savez
    caplog.clear()
    third = build("vlad", dataset, preset="fast", words=4, dense=True)
    with caplog.at_level(logging.INFO, logger="baselines.local"):
        third.fit_dataset(dataset, path)
    assert "cb.npz is unreadable" in caplog.text and "learning it again" in caplog.text
    assert third.codebook_sha256 == first.codebook_sha256  # relearned, seeded: the same codebook
    with np.load(path) as saved:
        assert str(saved["sha256"]) == first.codebook_sha256


def test_fisher_vector_shape_and_layout(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    spec = DescriptorSpec("sift", dense=True, side=112, step=8, bin_sizes=(4, 6))
    fisher = LocalFeaturizer("fv", spec, "fisher", words=2, pca_dim=16, layout=((1, 1), (3, 1)))
    fisher.fit_dataset(dataset, tmp_path / "fv.npz")
    vector = fisher.prepare(dataset.read(0))["fv2_sp"]
    assert vector.shape == (4 * 2 * 2 * 16,)  # 1x1 + 3 stripes, means and variances, 2 modes, 16 dims
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-5)
    np.testing.assert_allclose([np.linalg.norm(part) for part in vector.reshape(4, -1)], 0.5, rtol=1e-5)


def test_simple_baselines_shapes():
    image = _textured(96)
    assert RawPixels(32).prepare(image).shape == (1024,)
    histogram = ColorHistogram().prepare(image)
    assert histogram.shape == (256,) and histogram.sum() == pytest.approx(1.0)
    assert HOGFeaturizer(128).prepare(image).shape == (8100,)  # 16x16 cells of 8 px, 15x15 blocks of 2x2x9
    assert HOGFeaturizer(28).prepare(image).shape == (1296,)  # Fashion-MNIST: 7x7 cells of 4 px


# -- the registry ---------------------------------------------------------------------------
def test_registry_lists_and_refuses(image_tree):
    assert list_baselines() == ["hog", "surf_bow", "sift_bow", "vlad", "fisher", "color", "raw"]
    assert list_baselines("s*") == ["surf_bow", "sift_bow"]
    dataset = load_dataset(f"folder:{image_tree}")
    with pytest.raises(ValueError, match="unknown baseline 'sift_magic'"):
        build("sift_magic", dataset)
    with pytest.raises(ValueError, match="unknown preset 'slow'; valid: paper, fast, full"):
        build_baseline("sift_bow", dataset, preset="slow")


@pytest.mark.parametrize("name", list_baselines())
def test_every_registered_baseline_makes_a_store(name, image_tree, tmp_path):
    """Each entry, fast preset, small codebooks: a store whose fingerprint records every setting,
    the versions of the packages that computed it and the version of the code that did (``features_version``)."""
    dataset = load_dataset(f"folder:{image_tree}")
    featurizer = build(name, dataset, preset="fast", words=4, dense=True)
    assert featurizer.name.startswith(REGISTRY[name].store)
    path = store_path(tmp_path, dataset, featurizer)
    if hasattr(featurizer, "spec"):
        featurizer.fit_dataset(dataset, codebook_path(path))
        assert featurizer.fingerprint()["preset"] == "fast" and featurizer.fingerprint()["codebook_sample"]["split"] == "train"
    extract_to_store(dataset, featurizer, path, progress=False)
    with FeatureStore(path) as store:
        assert len(store) == len(dataset) and store.taps == featurizer.taps
        assert "numpy" in store.fingerprint["versions"] and store.fingerprint["features_version"]
        for tap in store.taps:
            assert np.isfinite(store.features(tap)).all()


def test_a_changed_package_version_refuses_the_store(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    featurizer = build("sift_bow", dataset, preset="fast", words=4)
    featurizer.fit_dataset(dataset, tmp_path / "cb.npz")
    path = extract_to_store(dataset, featurizer, tmp_path / "sift_bow.h5", progress=False)
    with FeatureStore(path) as store:
        assert set(store.fingerprint["versions"]) == {"opencv-python-headless", "mahotas", "scikit-learn", "numpy", "pillow"}
    copy = tmp_path / "copy" / "sift_bow.h5"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    with h5py.File(copy, "r+") as handle:
        fingerprint = json.loads(handle.attrs["fingerprint"])
        fingerprint["versions"]["opencv-python-headless"] = "4.0.0"
        handle.attrs["fingerprint"] = json.dumps(fingerprint)
    with pytest.raises(StoreMismatchError, match="versions"):
        extract_to_store(dataset, featurizer, copy, progress=False)
    extract_to_store(dataset, featurizer, path, progress=False)  # the untouched store is up to date


# -- descriptors computed once -------------------------------------------------------------------
def test_descriptors_once_equal_each_store_alone(image_tree, tmp_path):
    """One pass (in 2 spawned processes) over shared dense SIFT writes the same three stores
    as encoding each alone, and learns the same codebooks."""
    dataset = load_dataset(f"folder:{image_tree}")
    names = ["sift_bow", "vlad", "fisher"]
    options = {"preset": "fast", "words": 4, "dense": True}
    shared = run_baselines(dataset, names, features_dir=tmp_path / "shared", processes=2, progress=False, **options)
    for name, shared_path in zip(names, shared):
        alone = build(name, dataset, **options)
        path = store_path(tmp_path / "alone", dataset, alone)
        alone.fit_dataset(dataset, codebook_path(path))  # learned again, on its own
        with np.load(codebook_path(shared_path)) as saved:
            assert str(saved["sha256"]) == alone.codebook_sha256
        extract_to_store(dataset, alone, path, progress=False)
        with FeatureStore(shared_path) as a, FeatureStore(path) as b:
            assert a.fingerprint == b.fingerprint and a.taps == b.taps
            for tap in a.taps:  # processes run single-threaded BLAS: equal up to float32 rounding
                np.testing.assert_allclose(a.features(tap), b.features(tap), rtol=1e-5, atol=1e-6)
            assert a.run["shared_with"] == [n for n in ("sift_bow_dense_fast", "sift_vlad_dense_fast", "sift_fisher_dense_fast") if n != a.extractor]
    # in one process the shared pass is bit-identical to each store alone
    threads = run_baselines(dataset, names, features_dir=tmp_path / "threads", processes=0, progress=False, **options)
    for path in threads:
        with FeatureStore(path) as a, FeatureStore(tmp_path / "alone" / path.parent.name / path.name) as b:
            for tap in a.taps:
                np.testing.assert_array_equal(a.features(tap), b.features(tap))


# -- scikit-learn's estimator contract -------------------------------------------------------------
# Encoders read a 2-D array as one image per row holding that one descriptor (see
# baselines.encoders), so the generic checks apply. Left out, with the reason:
# - check_fit2d_1sample: a codebook needs at least 2 descriptors; fit says so in a ValueError.
EXPECTED_FAILED = {"check_fit2d_1sample": "a codebook needs at least 2 descriptors"}


@parametrize_with_checks([BagOfWords(4, levels=2), VLAD(3), FisherVector(2, pca_dim=2, max_iter=5)],
                         expected_failed_checks=lambda estimator: EXPECTED_FAILED)
def test_encoders_follow_the_scikit_learn_contract(estimator, check):
    check(estimator)


def test_presets_record_their_settings():
    paper = PRESETS["paper"]
    assert paper["sift"].dense and paper["sift"].bin_sizes == (4, 6, 8, 10)
    assert paper["sift_bow"]["levels"] == 3 and paper["sift_bow"]["chi2"]
    assert paper["fisher"]["words"] == 256 and paper["fisher"]["pca_dim"] == 80
    assert not paper["surf"].dense  # DeCAF's SURF baseline: detected keypoints
    assert PRESETS["full"]["fisher"]["layout"] == ((1, 1), (3, 1)) and PRESETS["full"]["sift"].step == 3


def test_the_report_names_each_baselines_encoding_and_preset(image_tree):
    from classify.report import describe_baseline

    dataset = load_dataset(f"folder:{image_tree}")
    preset, descriptor, encoding = describe_baseline(build("sift_bow", dataset).settings())
    assert preset == "paper" and descriptor == "SIFT, dense, step 6 px, bins 4/6/8/10 px, shorter side 256 px"
    assert encoding == "bag of 400 words, 3-level spatial pyramid; chi2 kernel map layer; codebook on `train`"
    assert describe_baseline(build("fisher", dataset).settings())[2].startswith("improved Fisher vector, 256 modes, PCA-80, layout 1x1")
    assert describe_baseline(build("vlad", dataset, preset="fast").settings())[:2] == ("fast", "RootSIFT, detected keypoints (up to 1000), shorter side 256 px")


def test_buffered_features_are_flushed_by_size_too(image_tree, tmp_path, monkeypatch):
    """Large features (40,960-dim Fisher vectors) are written out as shards once the buffer
    passes FLUSH_BYTES, not only every checkpoint_seconds: memory stays bounded."""
    import extract.pipeline as pipeline
    from extract.store import StoreWriter

    shards = []
    original = StoreWriter.write_shard
    monkeypatch.setattr(StoreWriter, "write_shard", lambda self, rows, *a, **k: (shards.append(len(rows)), original(self, rows, *a, **k))[1])
    monkeypatch.setattr(pipeline, "FLUSH_BYTES", 1)
    dataset = load_dataset(f"folder:{image_tree}")
    featurizer = RawPixels(8)
    featurizer.batch_size = 5
    path = extract_to_store(dataset, featurizer, tmp_path / "raw.h5", progress=False, checkpoint_seconds=1e9)
    assert shards == [5, 5, 5, 5, 4]
    with FeatureStore(path) as store:
        assert len(store) == 24
