"""A featurizer that ran on LiteRT before, run again without TensorFlow or Keras.

``cnn_featurizer`` is how commands make a CNN featurizer: where ``extract.litert`` recorded a
``CNNFeaturizer``'s facts and its converted model under a key of everything that determines it
(``extract.litert.featurizer_key``: arguments, code, packages, model files), it returns that
record's ``LiteRTFeaturizer``; otherwise it builds the ``CNNFeaturizer``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from extract.litert import (FEATURIZER_DEFAULTS, cache_folder, input_key, keras_backend_configured, litert_runner, manifest_path,
                            read_manifest, read_verified, resolve_runtime)


class LiteRTFeaturizer:
    """A ``CNNFeaturizer`` whose LiteRT model was converted before, run again without importing
    TensorFlow or Keras (on 2 cores they cost about 5 s of a run's start): the same ``name``,
    ``taps``, fingerprint, ``prepare`` and features, read from the cache's record of it. An input
    shape it has no model for builds the ``CNNFeaturizer`` (``cnn_featurizer`` makes either)."""

    runtime = "litert"

    def __init__(self, backbone: str, arguments: dict, manifest: dict):
        self._arguments = (backbone, arguments)
        self._manifest = manifest
        self.name, self.taps, self.dims = manifest["name"], list(manifest["taps"]), dict(manifest["dims"])
        self.batch_size, self.input_size, self.min_side = manifest["batch_size"], manifest["input_size"], manifest["min_side"]
        self.views, self.view_count = manifest["views"], manifest["view_count"]
        self._runners: dict[str, Callable] = {}
        self._built = None

    def __reduce__(self):  # as CNNFeaturizer: pickled as its arguments, made again where it lands
        backbone, arguments = self._arguments
        return _made_again, (backbone, arguments)

    def fingerprint(self) -> dict:
        from extract import package_versions

        return {**self._manifest["fingerprint"], "versions": package_versions(*self._manifest["version_packages"])}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        from extract.images import model_input

        return model_input(image, self.input_size, self.views, **self._manifest["prepare"])

    def forward(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        key = input_key(pixels)
        if key not in self._runners:
            file_name = self._manifest["inputs"].get(key)
            flatbuffer = read_verified(cache_folder() / file_name) if file_name else None
            if flatbuffer is None:  # another shape, or a file gone: the model is built and converted
                if self._built is None:
                    from extract.extractor import CNNFeaturizer

                    backbone, arguments = self._arguments
                    self._built = CNNFeaturizer(backbone, **arguments)
                return self._built.forward(pixels)
            self._runners[key] = litert_runner(flatbuffer, self.taps)
        return self._runners[key](pixels)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        from extract.forward import forward_in_batches

        return forward_in_batches(self.forward, batch, batch_size=self.batch_size, view_count=self.view_count, taps=self.taps)


def cnn_featurizer(backbone: str, **arguments):
    """``CNNFeaturizer(backbone, **arguments)``, or where that featurizer ran on LiteRT before with
    everything that determines it unchanged (``featurizer_key``), its ``LiteRTFeaturizer``."""
    settings = {**FEATURIZER_DEFAULTS, **arguments}
    backend = keras_backend_configured()
    if set(settings) == set(FEATURIZER_DEFAULTS) and resolve_runtime(settings["runtime"], backend, settings["dtype"]) == "litert":
        manifest = read_manifest(manifest_path(backbone, settings, backend))
        if manifest is not None and manifest["inputs"]:
            return LiteRTFeaturizer(backbone, settings, manifest)
    from extract.extractor import CNNFeaturizer

    return CNNFeaturizer(backbone, **arguments)


def _made_again(backbone: str, arguments: dict):
    return cnn_featurizer(backbone, **arguments)
