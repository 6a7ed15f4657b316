"""Hand-crafted baselines: documented shapes, codebooks learned on one split only and written
atomically, descriptors computed once for every encoder, the registry, scikit-learn's contract."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.utils.estimator_checks import parametrize_with_checks

from baselines.__main__ import build, codebook_path, run_baselines
from baselines.descriptors import DescriptorSpec, dense_sift, sift_descriptors, surf_descriptors
from baselines.encoders import VLAD, BagOfWords, FisherVector
from baselines.hog import HOGFeaturizer
from baselines.local import LocalFeaturizer, fit_codebooks
from baselines.registry import DENSE_GRID, PHOW_BINS, PRESETS, REGISTRY, build_baseline, list_baselines
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


def _upright_sift(gray, centres, bin_size, window_at):
    """Upright SIFT at each integer (y, x) centre, pixel by pixel as OpenCV's calcSIFTDescriptor
    computes it for a keypoint of size 2 * bin_size / 3 (its bins are 3 * size / 2 px) with
    SIFT_create(sigma=bin_size / 6), whose first octave is then the image smoothed by
    sqrt(sigma^2 - 0.5^2), as ours is: every pixel within 2.5 bins adds its gradient (central
    differences, angle with y up) trilinearly to the 4 x 4 x 8 bins, weighted by a Gaussian of 2 bins
    taken at the pixel (``window_at="pixel"``, OpenCV) or at the bin's centre (``"bin"``, vl_dsift's
    fast window, ours); then L2, clipped at 0.2 of the norm, L2 (float64)."""
    smooth = np.sqrt(max((bin_size / 6) ** 2 - 0.25, 0.01))
    image = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), smooth).astype(np.float64)
    reach = np.arange(-int(2.5 * bin_size), int(2.5 * bin_size) + 1)
    i, j = (a.ravel() for a in np.meshgrid(reach, reach, indexing="ij"))
    row_bin, col_bin = i / bin_size + 1.5, j / bin_size + 1.5
    inside = (row_bin > -1) & (row_bin < 4) & (col_bin > -1) & (col_bin < 4)
    i, j, row_bin, col_bin = i[inside], j[inside], row_bin[inside], col_bin[inside]
    y, x = (centres[:, :1].astype(int) + i), (centres[:, 1:].astype(int) + j)  # (keypoints, pixels)
    dx, dy = image[y, x + 1] - image[y, x - 1], image[y - 1, x] - image[y + 1, x]
    magnitude = np.hypot(dx, dy)
    if window_at == "pixel":
        magnitude = magnitude * np.exp(-((i / bin_size) ** 2 + (j / bin_size) ** 2) / 8)
    angle_bin = np.degrees(np.arctan2(dy, dx)) % 360 / 45
    r0, c0, o0 = (np.floor(b).astype(int) for b in (row_bin, col_bin, angle_bin))
    fractions = [(1 - (b - b0), b - b0) for b, b0 in ((row_bin, r0), (col_bin, c0), (angle_bin, o0))]  # weight of bin b0, b0 + 1
    histogram = np.zeros((len(centres), 6, 6, 8))  # a bin on each side, as OpenCV's, for the spill-over
    keypoint = np.arange(len(centres))[:, None]
    for dr, dc, do in itertools.product((0, 1), repeat=3):
        weight = fractions[0][dr] * fractions[1][dc] * fractions[2][do]
        np.add.at(histogram, (keypoint, r0 + dr + 1, c0 + dc + 1, (o0 + do) % 8), magnitude * weight)
    histogram = histogram[:, 1:5, 1:5]
    if window_at == "bin":
        centre = np.arange(4) - 1.5
        histogram = histogram * np.exp(-(centre[:, None] ** 2 + centre[None] ** 2) / 8)[:, :, None]
    histogram = histogram.reshape(len(centres), 128)
    histogram = np.minimum(histogram, 0.2 * np.linalg.norm(histogram, axis=1, keepdims=True))
    return histogram / np.linalg.norm(histogram, axis=1, keepdims=True)


@pytest.mark.parametrize("bin_size", sorted(set(PHOW_BINS) | set(DENSE_GRID["bin_sizes"])))
def test_dense_sift_is_opencvs_sift_with_vl_dsifts_window(bin_size):
    """Dense SIFT against OpenCV's SIFT.compute, keypoint by keypoint, on the same grid.

    They differ by one documented choice: vl_dsift's fast window (vl_phow's default) weights a
    bin by the Gaussian at its centre, OpenCV weights each pixel. ``_upright_sift`` computes both,
    so the bound has two parts, each derived:
    - the reference with OpenCV's window is OpenCV's descriptor: OpenCV stores 512 x the value
      rounded and saturated to a byte, so equal within 1 (a sum rounded on the other side of .5);
    - ours, its 8 angle bins mirrored (OpenCV's y axis points up, ours and VLFeat's down), is the
      reference with the bin-centre window: float32 filtering against float64 sums and
      cartToPolar's angle approximation, measured under 2e-4; 1e-3 allowed.
    So ours differs from OpenCV by the window alone (on this photo 0.06-0.07 in L2 on average, 0.15 at
    most), which is what the last assertion bounds. Grid centres at least 3 bins + 4 px from the
    border: the 2.5-bin support, the gradient's 1 px and the smoothing kernel stay inside."""
    from skimage import data

    gray = cv2.resize(data.camera(), (128, 128), interpolation=cv2.INTER_AREA)
    ours, centres = dense_sift(gray, step=8, bin_size=bin_size, margin=3 * bin_size + 4)
    keypoints = [cv2.KeyPoint(float(x), float(y), 2 * bin_size / 3, 0) for y, x in centres]
    computed, opencv = cv2.SIFT_create(sigma=bin_size / 6).compute(gray, keypoints)
    assert len(computed) == len(centres) >= 16
    as_opencv_stores = lambda d: np.minimum(np.round(512 * d), 255)  # noqa: E731
    pixel_window, bin_window = (_upright_sift(gray, centres, bin_size, window) for window in ("pixel", "bin"))
    assert np.abs(as_opencv_stores(pixel_window) - opencv).max() <= 1
    mirrored = ours.reshape(-1, 16, 8)[:, :, (-np.arange(8)) % 8].reshape(-1, 128)
    np.testing.assert_allclose(mirrored, bin_window, atol=1e-3, rtol=0)
    # hence: |stored(ours) - OpenCV| / 512 <= the window's part + 1e-3 * sqrt(128) + 2 roundings of sqrt(128) / 512
    window = np.linalg.norm(bin_window - pixel_window, axis=1)
    difference = np.linalg.norm(as_opencv_stores(mirrored) - opencv, axis=1) / 512
    assert (difference <= window + 1e-3 * np.sqrt(128) + 2 * np.sqrt(128) / 512).all()


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


GRAY_601 = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, the grey every baseline uses


def test_raw_pixels_are_the_grey_thumbnail():
    """A 96 x 128 image: the centre 96 x 96 square, averaged over 3 x 3 blocks (area resampling
    at a factor of 3), grey, in [0, 1]. OpenCV rounds the resampled RGB and the grey to uint8:
    within 1 level of the exact value."""
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3)).astype(np.uint8)
    blocks = image[:, 16:112].reshape(32, 3, 32, 3, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(RawPixels(32).prepare(image), (blocks @ GRAY_601).ravel() / 255, atol=1.01 / 255, rtol=0)
    # at the thumbnail's own size nothing is resampled: the grey itself
    np.testing.assert_allclose(RawPixels(32).prepare(image[:32, :32]), (image[:32, :32] @ GRAY_601).ravel() / 255, atol=0.51 / 255, rtol=0)


def test_hog_is_scikit_images_on_the_grey_centre_square():
    """The documented settings (9 orientations, side / 16 px cells but at least 4, 2 x 2-cell
    blocks, L2-Hys) on the grey centre square, computed here with skimage directly."""
    from skimage.feature import hog

    rng = np.random.default_rng(1)
    for side, cell, dims in ((128, 8, 8100), (28, 4, 1296)):  # photos: 16 x 16 cells; Fashion-MNIST: 7 x 7 cells
        image = rng.integers(0, 256, (side, side + 32, 3)).astype(np.uint8)  # its centre square is side x side: not resampled
        grey = image[:, 16 : 16 + side].astype(np.float32) @ GRAY_601.astype(np.float32)
        expected = hog(grey, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), block_norm="L2-Hys")
        assert expected.shape == (dims,)
        np.testing.assert_allclose(HOGFeaturizer(side).prepare(image), expected, rtol=1e-5, atol=1e-6)


def test_color_histogram_puts_each_colour_in_its_hsv_bin():
    """Half pure red (hue 0, full saturation and value) and half pure blue (OpenCV hue 120 of 180):
    half the mass in bin (0, 3, 3), half in bin (120 * 16 // 180, 3, 3) = (10, 3, 3) of 16 x 4 x 4."""
    image = np.zeros((128, 128, 3), np.uint8)
    image[:64, :, 0] = 255
    image[64:, :, 2] = 255
    histogram = ColorHistogram().prepare(image)
    expected = np.zeros((16, 4, 4), np.float32)
    expected[0, 3, 3] = expected[10, 3, 3] = 0.5
    np.testing.assert_array_equal(histogram, expected.ravel())


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
    from classify.report.sections import describe_baseline

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
