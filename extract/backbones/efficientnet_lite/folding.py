"""BatchNorm folded into the convolution before it, for an inference-only EfficientNet-Lite."""

from __future__ import annotations

import keras
import numpy as np

from extract.backbones.efficientnet_lite.architecture import BN_EPSILON, LITE_VARIANTS, build_efficientnet_lite
from extract.errors import UserError


def batchnorm_pairs(model: keras.Model) -> dict[str, str]:
    """``{batchnorm layer: the convolution it normalises}`` for every BatchNormalization of
    ``model`` (or every ``Identity`` left in its place in a folded model)."""
    pairs = {}
    for layer in model.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Identity)):
            source = layer.input._keras_history.operation
            if not isinstance(source, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
                raise UserError(f"{model.name}: {layer.name} follows {source.name}, not a convolution; it cannot be folded")
            pairs[layer.name] = source.name
    return pairs


def fold_conv_batchnorm(kernel: np.ndarray, depthwise: bool, gamma, beta, mean, var, epsilon: float = BN_EPSILON) -> list[np.ndarray]:
    """[kernel, bias] of the convolution that computes BatchNorm(conv(x)) at inference:
    ``kernel * s`` and ``beta - mean * s`` with ``s = gamma / sqrt(var + epsilon)``, in float64."""
    gamma, beta, mean, var = (np.asarray(a, np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + epsilon)
    kernel = np.asarray(kernel, np.float64) * (scale[:, None] if depthwise else scale)  # (k, k, C, 1) or (k, k, in, out)
    return [kernel.astype(np.float32), (beta - mean * scale).astype(np.float32)]


def _folded_like(model: keras.Model) -> keras.Model:
    has_top = any(layer.name == "predictions" for layer in model.layers)
    top = model.get_layer("predictions") if has_top else None
    return build_efficientnet_lite(model.name, include_top=has_top, input_shape=tuple(model.input.shape[1:]), fold_batchnorm=True,
                                   classes=top.units if top else 1000, classifier_activation=top.activation if top else None)


def fold_batchnorm(model: keras.Model) -> tuple[keras.Model, frozenset[str]]:
    """An inference-only copy of an EfficientNet-Lite with each BatchNormalization folded
    into the convolution before it (``fold_conv_batchnorm``). The same function up to
    float32 rounding, with about 50 fewer passes over the activations, and TensorFlow's graph
    optimiser fuses each convolution with its bias and ReLU6. For inference only: training
    needs the real BatchNormalization layers, which ``model`` keeps.

    Returns the folded model and the names of the convolutions whose output now includes
    their BatchNormalization (a tap on one of those must read ``model``).
    """
    if model.name not in LITE_VARIANTS:
        raise UserError(f"fold_batchnorm expects an EfficientNet-Lite model, got {model.name!r}")
    folded = _folded_like(model)
    pairs = batchnorm_pairs(model)
    for bn_name, conv_name in pairs.items():
        conv = model.get_layer(conv_name)
        folded.get_layer(conv_name).set_weights(fold_conv_batchnorm(
            conv.get_weights()[0], isinstance(conv, keras.layers.DepthwiseConv2D), *model.get_layer(bn_name).get_weights(),
            epsilon=model.get_layer(bn_name).epsilon))
    for layer in model.layers:
        if layer.weights and layer.name not in pairs and layer.name not in pairs.values():
            folded.get_layer(layer.name).set_weights(layer.get_weights())
    return folded, frozenset(pairs.values())
