"""Models are plain Keras 3: the JAX backend (the GPU machines have JAX but no TensorFlow)
gives the same features, with TensorFlow made unimportable in that process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, WITHOUT_TENSORFLOW
from extract.extractor import CNNFeaturizer

pytest.importorskip("jax", reason="jax is in the test extra; install it to check the JAX backend")

JAX_RUN = WITHOUT_TENSORFLOW + textwrap.dedent('''
    import keras
    import numpy as np
    from extract.extractor import CNNFeaturizer
    from transfer.layers import LayerwiseAdam

    assert keras.backend.backend() == "jax"
    images = np.load(sys.argv[1])
    featurizer = CNNFeaturizer("efficientnet_lite0", layers="stem,stage4,pre_logits", batch_size=len(images))
    np.savez(sys.argv[2], **featurizer(list(images)))

    # training works too: a frozen-by-multiplier layer stays put under the JAX optimizer
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="c")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(x))
    model.compile(LayerwiseAdam({v.path: 0.0 for v in model.get_layer("c").trainable_weights}, learning_rate=0.01),
                  "sparse_categorical_crossentropy")
    before = model.get_layer("c").get_weights()[0].copy()
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 8, 8, 3)).astype("float32"), rng.integers(0, 2, 8), epochs=1, verbose=0)
    assert np.array_equal(before, model.get_layer("c").get_weights()[0])
    assert "tensorflow" not in sys.modules
    print("jax ok")
''')


@pytest.mark.slow
def test_lite0_features_agree_between_tensorflow_and_jax(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", JAX_RUN, str(tmp_path / "images.npy"), str(tmp_path / "jax.npz")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "jax ok" in done.stdout, done.stderr[-3000:]
    jax_features = np.load(tmp_path / "jax.npz")
    tf_features = CNNFeaturizer("efficientnet_lite0", layers="stem,stage4,pre_logits", batch_size=4)(list(images))
    for tap, values in tf_features.items():
        np.testing.assert_allclose(jax_features[tap], values, rtol=1e-4, atol=1e-4)


def test_fingerprint_names_only_the_active_backends_packages():
    featurizer = CNNFeaturizer("efficientnet_lite0", layers="-1", weights="random")
    versions = featurizer.fingerprint()["versions"]
    assert "tensorflow-cpu" in versions and "jax" not in versions and "jaxlib" not in versions  # jax is installed here
