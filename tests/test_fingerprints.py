"""A store's fingerprint names every package that computed its features, and the version of
offshelf's code that did (``features_version``, tests/test_versions.py): after an upgrade of any of
them, the next run refuses to mix old and new features."""

from __future__ import annotations

import json

import h5py
import pytest

from extract.datasets import load_dataset
from extract.extractor import CNNFeaturizer
from extract.pipeline import extract_to_store, store_path
from extract.store import StoreMismatchError, canonical_json


def _pretend_upgrade(path, package: str) -> None:
    """Rewrite the recorded version of ``package`` in the store, as if it had been made before an upgrade."""
    with h5py.File(path, "r+") as f:
        fingerprint = json.loads(f.attrs["fingerprint"])
        assert package in fingerprint["versions"], sorted(fingerprint["versions"])
        fingerprint["versions"][package] = "0.0.1"
        f.attrs["fingerprint"] = canonical_json(fingerprint)


@pytest.mark.parametrize("package", ["opencv-python-headless", "keras"])
def test_cnn_store_refuses_features_of_another_package_version(image_tree, tmp_path, package):
    dataset = load_dataset(f"folder:{image_tree}")
    featurizer = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem")
    path = extract_to_store(dataset, featurizer, tmp_path / "lite0.h5", progress=False)
    assert extract_to_store(dataset, featurizer, path, progress=False) == path  # same versions: up to date
    _pretend_upgrade(path, package)
    with pytest.raises(StoreMismatchError, match=rf"versions: .*'{package}': '0.0.1'"):
        extract_to_store(dataset, featurizer, path, progress=False)



def test_stores_of_other_weights_or_dtype_sit_beside_the_default_store(image_tree, tmp_path):
    """WEIGHTS=random and DTYPE=bfloat16 each get a store of their own beside the pretrained one (a
    random-weights control can then sit in the same report); the defaults keep the plain name, and
    asking again for the same settings finds the same store."""
    dataset = load_dataset(f"folder:{image_tree}").subset(list(range(4)))
    features = tmp_path / "features"
    variants = {
        "efficientnet_lite0": CNNFeaturizer("efficientnet_lite0", layers="stem"),
        "efficientnet_lite0-random": CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem"),
        "efficientnet_lite0-random-seed3": CNNFeaturizer("efficientnet_lite0", weights="random", seed=3, layers="stem"),
        "efficientnet_lite0-max-bfloat16": CNNFeaturizer("efficientnet_lite0", dtype="bfloat16", pooling="max", layers="stem"),
    }
    assert {name: featurizer.name for name, featurizer in variants.items()} == {name: name for name in variants}
    written = {extract_to_store(dataset, featurizer, store_path(features, dataset, featurizer), progress=False).name
               for featurizer in variants.values()}
    assert written == {f"{name}.h5" for name in variants}  # four stores, none refused by another
    again = CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem")
    assert extract_to_store(dataset, again, store_path(features, dataset, again), progress=False).name == "efficientnet_lite0-random.h5"
