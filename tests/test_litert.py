"""The CNN on LiteRT (extract/litert.py): the same features as the Keras runtime to float32
rounding, recorded in the fingerprint, a conversion cached and a bad cache file never read."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from extract.errors import UserError
from extract.extractor import CNNFeaturizer
from extract.litert import resolve_runtime

RNG = np.random.default_rng(7)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSHELF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "litert"


def _photos(featurizer: CNNFeaturizer, count: int = 3) -> np.ndarray:
    images = [data.coffee(), data.chelsea(), *(RNG.integers(0, 256, (300, 260, 3), dtype=np.uint8) for _ in range(count - 2))]
    return np.stack([featurizer.prepare(image) for image in images[:count]])


@pytest.mark.parametrize("views", ["centre", "flip"])
def test_litert_gives_the_keras_runtimes_features_on_every_tap(cache, views):
    litert = CNNFeaturizer("efficientnet_lite0", batch_size=4, views=views)
    keras_runtime = CNNFeaturizer("efficientnet_lite0", batch_size=4, views=views, runtime="keras")
    assert litert.runtime == "litert" and keras_runtime.runtime == "keras"
    photos = _photos(litert)
    got, expected = litert(photos), keras_runtime(photos)
    assert set(got) == set(expected) == set(litert.taps)
    for tap in litert.taps:
        assert got[tap].dtype == np.float32 and got[tap].shape == expected[tap].shape == (3, litert.dims[tap])
        scale = max(1.0, float(np.abs(expected[tap]).max()))
        assert np.abs(got[tap] - expected[tap]).max() <= 1e-4 * scale, tap
    assert not np.allclose(got["pre_logits"][0], got["pre_logits"][1])  # two photos, two rows
    # The runtime is part of how the features were computed: recorded for LiteRT, absent (as before it existed) for Keras.
    assert litert.fingerprint()["runtime"] == "litert" and "runtime" not in keras_runtime.fingerprint()
    assert litert.name == keras_runtime.name


def test_a_conversion_is_cached_and_a_bad_cache_file_is_converted_again(cache, tiny):
    first = CNNFeaturizer(tiny, batch_size=2)
    pixels = RNG.integers(0, 256, (2, first.input_size, first.input_size, 3), dtype=np.uint8)
    expected = CNNFeaturizer(tiny, batch_size=2, runtime="keras")(pixels)
    got = first(pixels)
    files = sorted(cache.glob("*.tflite"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    again = CNNFeaturizer(tiny, batch_size=2)(pixels)  # a second featurizer of the same model: read, not converted
    assert sorted(cache.glob("*.tflite")) == files and files[0].stat().st_mtime_ns == written
    blob = bytearray(files[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped byte in the weights
    files[0].write_bytes(bytes(blob))
    mended = CNNFeaturizer(tiny, batch_size=2)(pixels)
    assert len(list(cache.glob("*.tflite"))) == 1 and files[0].read_bytes() != bytes(blob)
    for tap in expected:
        for features in (got, again, mended):
            np.testing.assert_allclose(features[tap], expected[tap], rtol=1e-5, atol=1e-5)


def test_another_batch_shape_or_dtype_gets_its_own_conversion(cache, tiny):
    featurizer = CNNFeaturizer(tiny, batch_size=3)
    pixels = RNG.integers(0, 256, (5, featurizer.input_size, featurizer.input_size, 3), dtype=np.uint8)
    as_bytes, as_floats = featurizer(pixels), featurizer(pixels.astype(np.float32))  # 5 rows: passes of 3, the last padded
    assert len(list(cache.glob("*.tflite"))) == 2
    for tap in featurizer.taps:
        assert as_bytes[tap].shape == (5, featurizer.dims[tap])
        np.testing.assert_allclose(as_bytes[tap], as_floats[tap], rtol=1e-6, atol=1e-6)


def test_runtimes_that_cannot_run_say_what_to_set():
    assert resolve_runtime("auto", "tensorflow", "float32") == "litert"
    assert resolve_runtime("auto", "jax", "float32") == resolve_runtime("auto", "tensorflow", "bfloat16") == "keras"
    with pytest.raises(UserError, match="KERAS_BACKEND=tensorflow, or RUNTIME=keras"):
        resolve_runtime("litert", "jax", "float32")
    with pytest.raises(UserError, match="bfloat16.*RUNTIME=keras"):
        resolve_runtime("litert", "tensorflow", "bfloat16")
    with pytest.raises(UserError, match=r"runtime='tflite' is not one of \('auto', 'keras', 'litert'\)"):
        CNNFeaturizer("efficientnet_lite0", weights="random", layers="stem", runtime="tflite")


def test_the_featurizer_defaults_the_cache_is_keyed_by_are_cnnfeaturizers():
    import inspect

    from extract.litert import FEATURIZER_DEFAULTS

    from extract import cli, litert

    parameters = inspect.signature(CNNFeaturizer.__init__).parameters
    assert {name: p.default for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY} == FEATURIZER_DEFAULTS
    assert cli.RUNTIMES == litert.RUNTIMES  # the command line's copy, kept to parse without importing TensorFlow


TWIN = r"""
import json, sys
import numpy as np
from extract.cached import cnn_featurizer
featurizer = cnn_featurizer(sys.argv[1], batch_size=2)
pixels = np.load(sys.argv[2])
features = featurizer([featurizer.prepare(image) for image in pixels])
np.savez(sys.argv[3], **features)
print(json.dumps({"class": type(featurizer).__name__, "name": featurizer.name, "fingerprint": featurizer.fingerprint(),
                  "imported": sorted(m for m in ("tensorflow", "keras") if m in sys.modules)}))
"""


def _twin_run(tmp_path, backbone: str, images: np.ndarray) -> tuple[dict, dict]:
    """``cnn_featurizer`` in a second process, as a later run of the same command would."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    np.save(tmp_path / "images.npy", images)
    out = subprocess.run([sys.executable, "-c", TWIN, backbone, str(tmp_path / "images.npy"), str(tmp_path / "features.npz")],
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    features = np.load(tmp_path / "features.npz")
    return json.loads(out.stdout.splitlines()[-1]), {tap: features[tap] for tap in features.files}


def test_a_later_run_starts_without_tensorflow_and_gives_the_same_store_facts_and_features(cache, tiny, tmp_path):
    import json

    images = RNG.integers(0, 256, (3, 41, 37, 3), dtype=np.uint8)
    built = CNNFeaturizer(tiny, batch_size=2)
    expected = built([built.prepare(image) for image in images])  # converts, and records the twin
    assert len(list(cache.glob("featurizer-*.json"))) == 1
    facts, got = _twin_run(tmp_path, tiny, images)
    assert facts["class"] == "LiteRTFeaturizer" and facts["imported"] == []
    assert facts["name"] == built.name and facts["fingerprint"] == json.loads(json.dumps(built.fingerprint()))
    for tap in built.taps:
        np.testing.assert_allclose(got[tap], expected[tap], rtol=1e-6, atol=1e-7)


def test_a_changed_model_file_or_a_bad_record_builds_the_model_again(cache, tmp_path):
    import json
    import re

    import keras

    from extract.cached import cnn_featurizer

    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, name="conv")(inputs))), name="small")
    path = tmp_path / "small.keras"
    model.save(path)
    pixels = RNG.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    before = CNNFeaturizer(f"keras:{path}", batch_size=2)(pixels)
    assert type(cnn_featurizer(f"keras:{path}", batch_size=2)).__name__ == "LiteRTFeaturizer"
    model.get_layer("fc").set_weights([w + 1.0 for w in model.get_layer("fc").get_weights()])
    model.save(path)  # the same path, other weights: the record no longer applies
    changed = cnn_featurizer(f"keras:{path}", batch_size=2)
    assert isinstance(changed, CNNFeaturizer)
    assert not np.allclose(changed(pixels)["fc"], before["fc"])
    records = list(cache.glob("featurizer-*.json"))
    good = records[0].read_text()
    for record in records:
        record.write_text('{"name": 3}')  # not a record of this version
    assert isinstance(cnn_featurizer(f"keras:{path}", batch_size=2), CNNFeaturizer)
    outside = tmp_path / "keep.txt"
    outside.write_text("not the cache's")
    for record in records:  # a record naming a file outside the cache is not followed (nor is that file removed)
        record.write_text(re.sub(r'"[0-9a-f]{32}-[0-9a-f]{16}\.tflite"', json.dumps(f"../../{outside.name}"), good))
    assert isinstance(cnn_featurizer(f"keras:{path}", batch_size=2), CNNFeaturizer) and outside.exists()


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_a_batch_runs_a_few_images_per_invoke_with_its_rows_in_order(cache, fixed_batch):
    import keras

    from extract.litert import IMAGES_PER_INVOKE, litert_forward

    inputs = keras.Input((12, 12, 3))
    hidden = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    if fixed_batch:  # a graph that reshapes to the traced batch size cannot run fewer images at a time
        hidden = keras.layers.Lambda(lambda x: keras.ops.reshape(x, (6, -1)), output_shape=(400,))(hidden)
    else:
        hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    model = keras.Model(inputs, {"feature": keras.layers.Dense(5)(hidden)})
    pixels = RNG.integers(0, 256, (6, 12, 12, 3)).astype(np.float32)
    assert 6 % IMAGES_PER_INVOKE == 0 and 6 > IMAGES_PER_INVOKE
    got = litert_forward(model, ["feature"])(pixels)["feature"]
    expected = keras.ops.convert_to_numpy(model(pixels)["feature"])
    assert got.shape == (6, 5) and len(np.unique(got.round(4), axis=0)) == 6
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
