"""keras.applications families as backbones: ResNet50, VGG16, MobileNetV2, EfficientNetB0, ConvNeXtTiny.

Each is built on top of this project's input (RGB in [0, 255]) with the family's own
preprocessing as a layer, through ``input_tensor``: one flat graph, so every inner layer
can be tapped without "Graph disconnected" errors. ImageNet weights come from the Keras
cache (``~/.keras/models``, or ``$KERAS_HOME/models``), downloaded by Keras when online;
offline without them the error names the file and where to put it. The fingerprint records
the cached file's name and SHA-256, as for every other weights file: features of another
download (a new release of the weights, a file put there by hand) are not mixed with them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import keras

from extract.backbones.registry import BackboneSpec, FeatureInfo, register_backbone
from extract.backbones.weights_files import load_weights_file, weights_record
from extract.errors import UserError

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="offshelf")
class ImagePreprocessing(keras.layers.Layer):
    """keras.applications' ``preprocess_input`` as a layer, on RGB in [0, 255].

    ``caffe``: RGB to BGR, minus the ImageNet mean (ResNet50, VGG16); ``tf``: scaled to
    [-1, 1] (MobileNetV2).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf"):
            raise UserError(f"mode={mode!r} is not one of ('caffe', 'tf')")
        self.mode = mode

    def call(self, x):
        if self.mode == "tf":
            return x / 127.5 - 1.0
        bgr = keras.ops.flip(x, axis=-1)
        return bgr - keras.ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=x.dtype)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class KerasApp:
    constructor: str  # attribute of keras.applications
    preprocessing: str  # "caffe", "tf", or "inside" (the model normalises itself)
    taps: tuple[FeatureInfo, ...]
    weights_file: str  # the name keras.applications caches its ImageNet weights under
    include_top: bool = False  # VGG16: its fc6/fc7 are the classic off-the-shelf features
    constructor_kwargs: tuple = ()


def _stages(names_channels, strides) -> tuple[FeatureInfo, ...]:
    return tuple(FeatureInfo(tap, layer, channels, stride) for (tap, layer, channels), stride in zip(names_channels, strides))


APPS = {
    "resnet50": KerasApp("ResNet50", "caffe", _stages(
        [("stem", "conv1_relu", 64), ("stage1", "conv2_block3_out", 256), ("stage2", "conv3_block4_out", 512),
         ("stage3", "conv4_block6_out", 1024), ("stage4", "conv5_block3_out", 2048)], (2, 4, 8, 16, 32)),
        weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16": KerasApp("VGG16", "caffe", (
        *_stages([("pool1", "block1_pool", 64), ("pool2", "block2_pool", 128), ("pool3", "block3_pool", 256),
                  ("pool4", "block4_pool", 512), ("pool5", "block5_pool", 512)], (2, 4, 8, 16, 32)),
        FeatureInfo("fc6", "fc1", 4096, 32), FeatureInfo("fc7", "fc2", 4096, 32),
    ), weights_file="vgg16_weights_tf_dim_ordering_tf_kernels.h5", include_top=True),
    "mobilenetv2": KerasApp("MobileNetV2", "tf", _stages(
        [("stage1", "expanded_conv_project_BN", 16), ("stage2", "block_2_add", 24), ("stage3", "block_5_add", 32),
         ("stage4", "block_12_add", 96), ("stage5", "block_16_project_BN", 320), ("pre_logits", "out_relu", 1280)],
        (2, 4, 8, 16, 32, 32)),
        weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    "efficientnetb0": KerasApp("EfficientNetB0", "inside", _stages(
        [("stem", "stem_activation", 32), ("stage1", "block1a_project_bn", 16), ("stage2", "block2b_add", 24),
         ("stage3", "block3b_add", 40), ("stage4", "block4c_add", 80), ("stage5", "block5c_add", 112),
         ("stage6", "block6d_add", 192), ("stage7", "block7a_project_bn", 320), ("pre_logits", "top_activation", 1280)],
        (2, 2, 4, 8, 16, 16, 32, 32, 32)), weights_file="efficientnetb0_notop.h5"),
    "convnext_tiny": KerasApp("ConvNeXtTiny", "inside", _stages(
        [("stem", "convnext_tiny_stem", 96), ("stage1", "convnext_tiny_stage_0_block_2_identity", 96),
         ("stage2", "convnext_tiny_stage_1_block_2_identity", 192), ("stage3", "convnext_tiny_stage_2_block_8_identity", 384),
         ("stage4", "convnext_tiny_stage_3_block_2_identity", 768)], (4, 4, 8, 16, 32)),
        weights_file="convnext_tiny_notop.h5"),
}
INPUT_SIZE = 224


class WeightsUnavailableError(UserError, FileNotFoundError):
    pass


def keras_cache() -> Path:
    """The folder keras.applications keeps its downloads in: ``$KERAS_HOME/models``, else
    ``~/.keras/models``, and ``/tmp/.keras/models`` where that home is read-only (Keras' rule)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    if os.path.isdir(home) and not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def _build_app(name: str, app: KerasApp, weights: str | None) -> keras.Model:
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="rgb_0_255")
    x = inputs if app.preprocessing == "inside" else ImagePreprocessing(app.preprocessing, name="preprocess")(inputs)
    constructor = getattr(keras.applications, app.constructor)
    try:
        return constructor(include_top=app.include_top, weights=weights, input_tensor=x, **dict(app.constructor_kwargs))
    except Exception as error:  # Keras raises a bare Exception when get_file cannot download
        if weights != "imagenet" or "fetch failure" not in str(error).lower():
            raise
        url = re.search(r"https?://\S+?(?=[:\s]|$)", str(error))
        filename = url.group(0).rsplit("/", 1)[-1] if url else "the weights file"
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} are not in the Keras cache and could not be downloaded (offline?). "
            f"Put {filename} (from {url.group(0) if url else 'keras.applications'}) in {keras_cache()}, "
            f"or pass WEIGHTS=path/to/file.weights.h5, or WEIGHTS=random"
        ) from None


def _cached_weights_record(name: str, app: KerasApp) -> dict:
    """``weights_record`` of the file keras.applications has just loaded its ImageNet weights from."""
    path = keras_cache() / app.weights_file
    if not path.is_file():  # a Keras upgrade renamed its weights files
        raise RuntimeError(f"keras.applications.{app.constructor} loaded ImageNet weights, but not from {path}: "
                           f"set {name}'s weights_file in {__file__} to the name Keras now caches them under")
    return weights_record(path, source="imagenet")


def _builder(name: str, app: KerasApp):
    def build(weights: str | None) -> tuple[keras.Model, dict]:
        if weights in (None, "random"):
            return _build_app(name, app, None), {"weights": "random"}
        if weights == "imagenet":
            model = _build_app(name, app, "imagenet")
            return model, {**_cached_weights_record(name, app), "weights_source": f"keras.applications.{app.constructor}"}
        model = _build_app(name, app, None)
        return model, load_weights_file(model, weights)

    return build


for _name, _app in APPS.items():
    register_backbone(BackboneSpec(
        name=_name,
        build=_builder(_name, _app),
        input_size=INPUT_SIZE,
        feature_info=_app.taps,
        preprocessing={"caffe": "RGB->BGR minus ImageNet mean (caffe)", "tf": "x / 127.5 - 1", "inside": "the model's own layers"}[_app.preprocessing],
        crop_pct=0.875,
        interpolation="bilinear",
        default_weights="imagenet",
        offline_weights=False,
        notes=f"keras.applications.{_app.constructor}; ImageNet weights from the Keras cache",
    ))
