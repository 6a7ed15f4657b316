"""Views at extraction (issue #21): several views of each image (its mirror, corner and centre
crops) featurized in one forward pass and averaged per tap into one row of the store.

A tiny saved Keras model (``keras:PATH``, 32 x 32 input, not mirror-symmetric) stands in for a
backbone, so every check runs real TensorFlow in well under a second; ``centre`` is also checked
on EfficientNet-Lite0, the default backbone.
"""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest

from extract.cli import main as extract_main
from extract.datasets import load_dataset
from extract.errors import UserError
from extract.extractor import CNNFeaturizer
from extract.images import PAD_VALUE, VIEW_COUNTS, VIEWS, fit_to_input, view_inputs, views_side
from extract.pipeline import extract_to_store, store_path
from extract.store import FeatureStore, StoreMismatchError

from conftest import TINY_SIZE as SIZE

SIDE = 37  # round(32 / 0.875): the square the crops are cut from
RNG = np.random.default_rng(0)



def _coordinates(height: int, width: int) -> np.ndarray:
    """An image whose pixel (r, c) holds (r, c, 7): every crop says where it was cut."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def _origins(crops: np.ndarray) -> list[tuple[int, int]]:
    return [(int(crop[0, 0, 0]), int(crop[0, 0, 1])) for crop in crops]


def test_crops_are_the_four_corners_and_the_centre_of_the_larger_square():
    assert views_side(224, "crops5") == views_side(224, "crops10") == 256 and views_side(224, "flip") == 224
    assert views_side(SIZE, "crops5") == SIDE
    # The square is the image itself (SIDE x SIDE: nothing resampled), so each crop's pixels say where it came from.
    square = _coordinates(SIDE, SIDE)
    crops = view_inputs(square, SIZE, "crops5", resize="warp")
    assert crops.shape == (5, SIZE, SIZE, 3) and crops.dtype == np.uint8
    assert _origins(crops) == [(0, 0), (0, 5), (5, 0), (5, 5), (2, 2)]
    for crop, (top, left) in zip(crops, _origins(crops)):
        np.testing.assert_array_equal(crop, square[top : top + SIZE, left : left + SIZE])
    ten = view_inputs(square, SIZE, "crops10", resize="warp")
    np.testing.assert_array_equal(ten[:5], crops)
    np.testing.assert_array_equal(ten[5:], crops[:, :, ::-1])  # the same crops, mirrored left to right
    assert ten[5][0, 0, 1] == SIZE - 1  # the mirror of the top-left crop starts at its right edge


def test_crops_follow_the_resize_mode():
    # centre: the crops come from the centre square of the shorter side (columns 11..47 of 60)
    wide = _coordinates(SIDE, 60)
    assert _origins(view_inputs(wide, SIZE, "crops5", resize="centre")) == [(0, 11), (0, 16), (5, 11), (5, 16), (2, 13)]
    # pad: from the whole image padded to a square; the top-left crop starts in the padding (3 rows above a 31-row image)
    short = _coordinates(31, SIDE)
    crops = view_inputs(short, SIZE, "crops5", resize="pad")
    assert tuple(crops[0][0, 0]) == PAD_VALUE and tuple(crops[0][3, 0]) == (0, 0, 7)
    # warp: from the whole image stretched to the square; compare with cutting fit_to_input's larger square directly
    photo = RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    large = fit_to_input(photo, SIDE, resize="warp")
    crops = view_inputs(photo, SIZE, "crops5", resize="warp")
    for crop, (top, left) in zip(crops, [(0, 0), (0, 5), (5, 0), (5, 5), (2, 2)]):
        np.testing.assert_array_equal(crop, large[top : top + SIZE, left : left + SIZE])


def test_centre_and_flip_inputs():
    photo = RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    centre = fit_to_input(photo, SIZE)
    np.testing.assert_array_equal(view_inputs(photo, SIZE, "centre"), centre[None])
    flip = view_inputs(photo, SIZE, "flip")
    np.testing.assert_array_equal(flip[0], centre)
    np.testing.assert_array_equal(flip[1], centre[:, ::-1])


def test_centre_keeps_todays_name_fingerprint_and_features(tiny):
    default, centre = CNNFeaturizer(tiny, batch_size=4), CNNFeaturizer(tiny, batch_size=4, views="centre")
    assert centre.name == default.name == "keras-tiny" and centre.min_side == SIZE
    assert centre.fingerprint() == default.fingerprint() and "views" not in centre.fingerprint()
    photos = [RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8) for _ in range(3)]
    prepared = [centre.prepare(p) for p in photos]
    for photo, item in zip(photos, prepared):
        np.testing.assert_array_equal(item, fit_to_input(photo, SIZE))  # one (S, S, 3) input, as before views existed
    got = centre(prepared)
    direct = centre.model([np.stack(prepared).astype(np.float32)], training=False)  # the model itself, no batching or padding
    for tap in centre.taps:
        np.testing.assert_allclose(got[tap], np.asarray(direct[tap]), rtol=1e-6, atol=1e-7)


def test_batch_size_is_the_images_of_each_forward_pass(tiny):
    """More images than ``batch_size`` in one call run in passes of ``batch_size`` (the last one padded),
    with the features of the model run on all of them at once."""
    featurizer = CNNFeaturizer(tiny, batch_size=2)
    prepared = [featurizer.prepare(RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(5)]
    featurizer(prepared[:1])  # compiles the forward pass
    forward, passes = featurizer._forward, []
    featurizer._forward = lambda batch: (passes.append(len(batch)), forward(batch))[1]
    got = featurizer(prepared)
    assert passes == [2, 2, 2]
    direct = featurizer.model([np.stack(prepared).astype(np.float32)], training=False)
    for tap in featurizer.taps:
        assert got[tap].shape == (5, featurizer.dims[tap])
        np.testing.assert_allclose(got[tap], np.asarray(direct[tap]), rtol=1e-6, atol=1e-7)


def test_centre_keeps_efficientnet_lite0s_name_and_fingerprint():  # a random-weights store: named so, views or not
    featurizer = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem", views="centre")
    assert featurizer.name == "efficientnet_lite0-random" and featurizer.min_side == 224
    assert set(featurizer.fingerprint()) == {"model", "weights", "seed", "input_size", "preprocessing", "pooling", "batchnorm", "taps",
                                             "keras_backend", "runtime", "features_version", "versions"}


def _one_at_a_time(featurizer: CNNFeaturizer, views: np.ndarray) -> dict[str, np.ndarray]:
    """The mean over ``views`` of the features of each, computed alone (batch of one)."""
    each = [featurizer([view]) for view in views]
    return {tap: np.mean([e[tap][0] for e in each], axis=0) for tap in featurizer.taps}


@pytest.mark.parametrize("views", ["flip", "crops5", "crops10"])
def test_views_features_are_the_mean_of_each_view_featurized_alone(tiny, views):
    featurizer = CNNFeaturizer(tiny, batch_size=3, views=views)
    single = CNNFeaturizer(tiny, batch_size=1)
    photos = [RNG.integers(0, 256, (45, 60, 3), dtype=np.uint8) for _ in range(2)]  # 2 images in a batch of 3: padded
    prepared = [featurizer.prepare(p) for p in photos]
    assert all(p.shape == (VIEW_COUNTS[views], SIZE, SIZE, 3) for p in prepared)
    got = featurizer(prepared)
    for i, item in enumerate(prepared):
        expected = _one_at_a_time(single, item)
        for tap in featurizer.taps:
            assert got[tap].shape == (2, featurizer.dims[tap]) and got[tap].dtype == np.float32
            np.testing.assert_allclose(got[tap][i], expected[tap], rtol=1e-5, atol=1e-6)
    centre = single([fit_to_input(photos[0], SIZE)])
    assert not np.allclose(got["fc"][0], centre["fc"][0], rtol=1e-3)  # the views do change the features


def test_the_flip_view_is_the_image_and_its_mirror(tiny):
    featurizer, single = CNNFeaturizer(tiny, batch_size=2, views="flip"), CNNFeaturizer(tiny, batch_size=1)
    photo = RNG.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    got = featurizer([featurizer.prepare(photo)])
    image, mirror = single([photo]), single([np.ascontiguousarray(photo[:, ::-1])])
    for tap in featurizer.taps:
        np.testing.assert_allclose(got[tap][0], (image[tap][0] + mirror[tap][0]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(image["fc"], mirror["fc"], rtol=1e-3)  # the network is not mirror-symmetric


def test_views_store_has_one_row_per_image_and_carries_its_views(tiny, image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    featurizer = CNNFeaturizer(tiny, pooling="max", batch_size=5, views="crops10")
    assert featurizer.name == "keras-tiny-max-crops10" and featurizer.min_side == SIDE
    path = extract_to_store(dataset, featurizer, store_path(tmp_path, dataset, featurizer), progress=False)
    assert path.name == "keras-tiny-max-crops10.h5"
    with FeatureStore(path) as store:
        assert len(store) == len(dataset) == 24 and store.extractor == "keras-tiny-max-crops10"
        assert store.fingerprint["views"] == {"name": "crops10", "count": 10, "from_side": SIDE}
        assert store.fingerprint == json.loads(json.dumps(featurizer.fingerprint()))
        expected = featurizer([featurizer.prepare(dataset.read(7, min_side=featurizer.min_side))])
        for tap in store.taps:
            np.testing.assert_allclose(store.features(tap)[7], expected[tap][0], rtol=1e-5, atol=1e-6)
    with pytest.raises(StoreMismatchError, match=r"views: .*crops10.* in the store, .*crops5.* now"):
        extract_to_store(dataset, CNNFeaturizer(tiny, pooling="max", views="crops5"), path, progress=False)


def test_an_interrupted_views_run_resumes_to_the_same_store(tiny, image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    featurizer = CNNFeaturizer(tiny, batch_size=4, views="crops5")
    reference = extract_to_store(dataset, featurizer, tmp_path / "whole" / "tiny.h5", progress=False)

    def read(row, min_side=None):  # Ctrl-C while the image of row 13 is being read
        if row == 13:
            raise KeyboardInterrupt
        return dataset.read(row, min_side=min_side)

    path = tmp_path / "resumed" / "tiny.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(dataclasses.replace(dataset, read=read), featurizer, path, progress=False, threads=1, checkpoint_seconds=0)
    assert not path.exists() and list(path.with_name("tiny.h5.partial").glob("shard-*.npz"))
    extract_to_store(dataset, featurizer, path, progress=False)
    with FeatureStore(path) as got, FeatureStore(reference) as want:
        assert got.run["resumed_from"] >= 4 and list(got.paths) == list(want.paths) and got.fingerprint == want.fingerprint
        for tap in want.taps:
            np.testing.assert_array_equal(got.features(tap), want.features(tap))


def test_a_pickled_views_featurizer_is_rebuilt_with_the_same_fingerprint_and_features(tiny):
    """What a Ray worker receives (``extract.distributed``): the featurizer's arguments, views included."""
    featurizer = CNNFeaturizer(tiny, batch_size=2, views="crops10")
    rebuilt = pickle.loads(pickle.dumps(featurizer))
    assert rebuilt.views == "crops10" and rebuilt.name == featurizer.name and rebuilt.fingerprint() == featurizer.fingerprint()
    photo = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    item = featurizer.prepare(photo)
    np.testing.assert_array_equal(rebuilt.prepare(photo), item)
    got, want = rebuilt([item]), featurizer([item])
    for tap in featurizer.taps:
        np.testing.assert_array_equal(got[tap], want[tap])


def test_a_bad_views_value_is_one_line_naming_it_and_the_choices(image_tree, tmp_path, capsys):
    with pytest.raises(UserError, match="views='mirror'"):
        CNNFeaturizer("efficientnet_lite0", weights="random", views="mirror")
    features = tmp_path / "features"
    code = extract_main(["features", "--dataset", f"folder:{image_tree}", "--features-dir", str(features), "--views", "crops7"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and "'crops7'" in error
    assert all(choice in error for choice in VIEWS)
    assert not features.exists()  # nothing written


def test_several_view_settings_extract_a_store_each_and_a_bad_one_writes_none(tiny, image_tree, tmp_path, capsys):
    features = tmp_path / "features"
    argv = ["features", "--dataset", f"folder:{image_tree}", "--features-dir", str(features), "--model", tiny, "--no-progress"]
    code = extract_main([*argv, "--views", "centre,crops7"])
    assert code == 2 and "'crops7'" in capsys.readouterr().err and not features.exists()
    assert extract_main([*argv, "--views", "centre,flip"]) == 0
    stores = sorted(p.name for p in (features / image_tree.name).glob("*.h5"))
    assert stores == ["keras-tiny-flip.h5", "keras-tiny.h5"]
    with FeatureStore(features / image_tree.name / "keras-tiny-flip.h5") as flipped, FeatureStore(features / image_tree.name / "keras-tiny.h5") as centre:
        assert flipped.fingerprint["views"]["name"] == "flip" and "views" not in centre.fingerprint
        assert not np.allclose(flipped.features("fc"), centre.features("fc"))  # the tiny model is not mirror-symmetric
