"""Saved Keras models as backbones: ``keras:PATH`` (any ``.keras`` model) and ``cae:PATH``
(the encoder of a convolutional autoencoder trained by ``python -m transfer pretrain-cae``).

A saved model receives RGB pixels in [0, 255] and holds its own preprocessing, as every
backbone here does. Its default taps are the last layer of each spatial resolution and
every dense layer: the stage outputs of a convnet. Any other layer, also inside nested
models (``outer/inner``), can be tapped by name with ``LAYERS=``.
"""

from __future__ import annotations

from pathlib import Path

import keras

from extract.backbones.registry import BackboneSpec, FeatureInfo, register_factory
from extract.backbones.weights_files import weights_record
from extract.datasets.base import slugify
from extract.errors import UserError

CAE_CODE_LAYER = "code"


@keras.saving.register_keras_serializable(package="offshelf")
class Grayscale(keras.layers.Layer):
    """RGB to one luminance channel (ITU-R 601 weights)."""

    def call(self, x):
        weights = keras.ops.convert_to_tensor([0.299, 0.587, 0.114], dtype=x.dtype)
        return keras.ops.sum(x * weights, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)


def default_taps(model: keras.Model) -> tuple[FeatureInfo, ...]:
    """The last layer at each spatial resolution, and every dense layer, top-level only."""
    size = model.input_shape[1]
    taps: list[FeatureInfo] = []
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for index, layer in enumerate(layers):
        shape = layer.output.shape
        following = layers[index + 1].output.shape if index + 1 < len(layers) else None
        at_input_resolution = len(shape) == 4 and shape[1] == size and not layer.weights  # preprocessing
        if len(shape) == 4 and not at_input_resolution and (following is None or len(following) != 4 or following[1] != shape[1]):
            taps.append(FeatureInfo(layer.name, layer.name, int(shape[-1]), size // shape[1]))
        elif len(shape) == 2 and isinstance(layer, keras.layers.Dense):
            taps.append(FeatureInfo(layer.name, layer.name, int(shape[-1]), 0))
    if not taps:
        raise UserError(f"{model.name}: no convolutional or dense layer to tap")
    return tuple(taps)


def load_saved(path: Path, truncate_at: str | None = None) -> keras.Model:
    if not path.is_file():
        raise FileNotFoundError(f"saved model not found: {path}")
    if path.suffix != ".keras":
        raise UserError(f"{path}: a saved-model backbone must be a .keras file (weights-only files need their architecture)")
    model = keras.saving.load_model(path, compile=False)
    if len(model.input_shape) != 4 or model.input_shape[1] != model.input_shape[2] or model.input_shape[3] != 3:
        raise UserError(f"{path}: expected a square RGB input (None, S, S, 3), found {model.input_shape}")
    if truncate_at is not None:
        model = keras.Model(model.inputs, model.get_layer(truncate_at).output, name=f"{model.name}_encoder")
    return model


def saved_model_spec(path: str, *, prefix: str, truncate_at: str | None = None) -> BackboneSpec:
    file = Path(path)
    template = load_saved(file, truncate_at)

    def build(weights: str | None) -> tuple[keras.Model, dict]:
        model = load_saved(file, truncate_at)
        if weights == "random":  # same architecture, fresh initialisation: the untrained control
            return keras.models.clone_model(model), {"weights": "random", "architecture": file.name}
        if weights not in (None, "imagenet", "default"):
            raise UserError(f"{prefix}:{path} carries its own weights; pass WEIGHTS=random for a fresh initialisation, not {weights!r}")
        return model, weights_record(file)

    return BackboneSpec(
        name=f"{prefix}-{slugify(file.stem)}",
        build=build,
        input_size=int(template.input_shape[1]),
        feature_info=default_taps(template),
        preprocessing="the saved model's own layers",
        crop_pct=1.0,
        default_weights="default",
        offline_weights=True,
        notes=f"saved Keras model {file}",
    )


register_factory("keras", lambda path: saved_model_spec(path, prefix="keras"))
register_factory("cae", lambda path: saved_model_spec(path, prefix="cae", truncate_at=CAE_CODE_LAYER))
