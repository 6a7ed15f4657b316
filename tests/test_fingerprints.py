"""A store's fingerprint names every package that computed its features, and the version of
offshelf's code that did (``features_version``, tests/test_versions.py): after an upgrade of any of
them, the next run refuses to mix old and new features; and the weights file they came from."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import h5py
import pytest

from conftest import ROOT
from extract.backbones.weights_files import _sha256_of, weights_record
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


# Keras reads KERAS_HOME when it is imported: a fresh Python, with a cache folder of the test's own.
KERAS_APPS_OFFLINE = textwrap.dedent('''
    import hashlib, json, urllib.error
    import keras, numpy as np
    from keras.src.utils import file_utils
    from extract.backbones import get_backbone
    from extract.backbones.keras_apps import APPS, WeightsUnavailableError, keras_cache
    from extract.backbones.weights_files import _sha256_of
    from extract.extractor import CNNFeaturizer

    cached = keras_cache() / APPS["mobilenetv2"].weights_file
    cached.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in (1, 2):  # two different weights files under the name keras.applications loads
        keras.utils.set_random_seed(seed)
        source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3))
        source.save(cached)  # Keras' legacy HDF5, the format of keras.applications' downloads
        featurizer = CNNFeaturizer("mobilenetv2", weights="imagenet", layers="pre_logits")
        again = CNNFeaturizer("mobilenetv2", weights="imagenet", layers="pre_logits")
        runs.append({"fingerprint": featurizer.fingerprint(), "again": again.fingerprint(),
                     "sha256": hashlib.sha256(cached.read_bytes()).hexdigest(), "hashed": _sha256_of.cache_info().misses,
                     "loaded": bool(np.array_equal(featurizer.model.get_layer("Conv1").get_weights()[0],
                                                   source.get_layer("Conv1").get_weights()[0]))})

    asked = []  # the files keras.applications wants for the other families: offline, it names them
    def offline(origin, target, *args):
        asked.append(target)
        raise urllib.error.URLError("no network in the tests")
    file_utils.urlretrieve = offline
    for name in sorted(set(APPS) - {"mobilenetv2"}):
        try:
            get_backbone(name).build("imagenet")
        except WeightsUnavailableError:
            pass
    print(json.dumps({"cache": str(keras_cache()), "runs": runs, "asked": asked,
                      "weights_files": {name: app.weights_file for name, app in APPS.items()},
                      "random": CNNFeaturizer("mobilenetv2", weights="random", layers="pre_logits").fingerprint()}))
''')


@pytest.mark.slow  # a fresh Python, MobileNetV2 built four times and the other families once each
def test_keras_applications_fingerprint_carries_the_sha256_of_the_cached_weights_file(tmp_path):
    done = subprocess.run([sys.executable, "-c", KERAS_APPS_OFFLINE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "KERAS_HOME": str(tmp_path / "keras")})
    assert done.returncode == 0, done.stderr[-3000:]
    made = json.loads(done.stdout.strip().splitlines()[-1])
    assert made["cache"] == str(tmp_path / "keras" / "models")
    first, second = made["runs"]
    for run in made["runs"]:
        assert run["loaded"]  # the features come from the file in the cache
        fingerprint = run["fingerprint"]
        assert fingerprint["weights"] == "imagenet" and fingerprint["weights_source"] == "keras.applications.MobileNetV2"
        assert fingerprint["weights_file"] == made["weights_files"]["mobilenetv2"]
        assert fingerprint["weights_sha256"] == run["sha256"] and run["again"] == fingerprint
    assert first["sha256"] != second["sha256"]
    assert {key for key in first["fingerprint"] if first["fingerprint"][key] != second["fingerprint"][key]} == {"weights_sha256"}
    assert (first["hashed"], second["hashed"]) == (1, 2)  # two featurizers per file, one hash per file
    assert "weights_sha256" not in made["random"] and "weights_file" not in made["random"]
    # Every family's weights_file is the file keras.applications caches: offline, it asked for exactly those.
    assert sorted(made["asked"]) == sorted(f"{made['cache']}/{file}" for name, file in made["weights_files"].items() if name != "mobilenetv2")


def test_a_weights_file_is_hashed_once_while_it_is_unchanged(tmp_path):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"first weights")
    hashed = _sha256_of.cache_info().misses
    assert weights_record(path)["weights_sha256"] == weights_record(path)["weights_sha256"] == hashlib.sha256(b"first weights").hexdigest()
    assert _sha256_of.cache_info().misses == hashed + 1
    stat = path.stat()
    path.write_bytes(b"other weights")  # same size, and the same modification time put back: the change time still moves
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_record(path)["weights_sha256"] == hashlib.sha256(b"other weights").hexdigest()
