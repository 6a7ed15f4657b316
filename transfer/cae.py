"""A convolutional autoencoder for pretraining without labels, and the classifier of the
original TensorFlow 1 recipe built on its encoder.

Encoder, as in the original: conv 5x5 stride 2 with 16 filters, conv 5x5 stride 2 with 32
filters, then a dense code. The decoder mirrors it (dense, two transposed convolutions).
The model takes RGB in [0, 255] like every backbone here and works on luminance scaled to
[0, 1]; the input side must be a multiple of 4 (28 for Fashion-MNIST).
"""

from __future__ import annotations

import keras
import numpy as np

from extract.arguments import check, whole
from extract.backbones.saved import CAE_CODE_LAYER, Grayscale
from extract.errors import UserError

CONV_FILTERS = (16, 32)
KERNEL = 5
CODE_UNITS = 128
ENCODER_PATTERNS = ("conv1", "conv2")


def check_input_size(owner: str, input_size: int) -> None:
    """The autoencoder halves the image twice: its side is a multiple of 4."""
    check(owner, "input_size", input_size, whole(4))
    if input_size % 4:
        raise UserError(f"{owner}: input_size={input_size!r} must be a multiple of 4 (the autoencoder halves the image twice), e.g. 28")


def _preprocessed_input(input_size: int):
    check_input_size("the autoencoder", input_size)
    inputs = keras.Input((input_size, input_size, 3), name="rgb_0_255")
    x = keras.layers.Rescaling(1 / 255, name="scale")(Grayscale(name="gray")(inputs))
    return inputs, x


def _convolutions(x):
    for index, filters in enumerate(CONV_FILTERS, start=1):
        x = keras.layers.Conv2D(filters, KERNEL, strides=2, padding="same", activation="relu", name=f"conv{index}")(x)
    return x


def build_autoencoder(input_size: int = 28, code_units: int = CODE_UNITS) -> keras.Model:
    inputs, x = _preprocessed_input(input_size)
    x = _convolutions(x)
    spatial = x.shape[1:]
    code = keras.layers.Dense(code_units, activation="relu", name=CAE_CODE_LAYER)(keras.layers.Flatten(name="flatten")(x))
    y = keras.layers.Dense(int(np.prod(spatial)), activation="relu", name="decode_dense")(code)
    y = keras.layers.Reshape(spatial, name="decode_reshape")(y)
    y = keras.layers.Conv2DTranspose(CONV_FILTERS[0], KERNEL, strides=2, padding="same", activation="relu", name="deconv2")(y)
    y = keras.layers.Conv2DTranspose(1, KERNEL, strides=2, padding="same", activation="sigmoid", name="deconv1")(y)
    return keras.Model(inputs, y, name="conv_autoencoder")


def reconstruction_target(images: np.ndarray) -> np.ndarray:
    """What the autoencoder must reproduce: luminance in [0, 1], (n, S, S, 1)."""
    gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return (gray / 255.0)[..., None]


def build_recipe_classifier(input_size: int, n_classes: int, hidden_units: int = 256, dropout: float = 0.3) -> keras.Model:
    """The original recipe's classifier: the encoder's conv layers (same names, so they can be
    restored from the autoencoder) and new dense layers."""
    inputs, x = _preprocessed_input(input_size)
    x = keras.layers.Flatten(name="flatten")(_convolutions(x))
    x = keras.layers.Dense(hidden_units, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="fc2")(x)
    return keras.Model(inputs, outputs, name="recipe_classifier")
