"""Frozen CNN feature extraction: chosen taps of a registered backbone, pooled, in one forward pass."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from extract import package_versions
from extract.arguments import FRACTION, POSITIVE, SEEDS, check
from extract.backbones import FeatureInfo, get_backbone, layer_paths, tap_tensor
from extract.backbones.weights_files import WEIGHTS_SUFFIXES
from extract.forward import forward_in_batches
from extract.images import RESIZES, VIEW_COUNTS, check_views, model_input, views_side
from extract.litert import litert_forward, resolve_runtime, save_manifest
from extract.errors import UserError

# Bump when a change to this code (decoding, resizing, preprocessing, pooling, the models) alters CNN
# features (CONTRIBUTING.md): every CNN store made before is then refused, and no baseline store.
FEATURES_VERSION = 1
POOLINGS = ("avg", "max", "avgmax", "spp")
# The model's weights and arithmetic. bfloat16 halves the memory traffic and runs on the
# tensor cores of a GPU; the stored features are float32 either way.
DTYPES = ("float32", "bfloat16")
WHOLE_IMAGE = 1.0


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", text).strip("_.") or "_"


def store_name(spec, *, pooling: str, views: str, requested_weights, weights: dict,
               dtype: str) -> str:
    """The store's file name (without ``.h5``): the backbone, then each setting that differs from
    its default, so that stores of different settings sit side by side instead of refusing each
    other: ``efficientnet_lite0``, ``efficientnet_lite0-max-crops10``, ``efficientnet_lite0-random``,
    ``efficientnet_lite0-bfloat16``. The fingerprint still decides whether a store holds what a run
    asks for; the name only keeps different asks apart. A ``LAYERS`` subset keeps the name (quick
    runs and the transfer commands find the store by it; a second subset asks for ``OVERWRITE=1``).
    """
    parts = [spec.name]
    if pooling != "avg":
        parts.append(pooling)
    if views != "centre":
        parts.append(views)
    # ImageNet, a saved model's own, a backbone's default: no suffix.
    own_weights = requested_weights in (None, "default", "imagenet", spec.default_weights)
    if not own_weights and weights.get("weights") == "random":
        parts.append("random" if not weights.get("seed") else f"random-seed{weights['seed']}")
    elif not own_weights:  # a weights file: named by its file and its first hash digits
        file_name = Path(str(weights.get("weights_file") or requested_weights)).name
        stem = next((file_name.removesuffix(suffix) for suffix in WEIGHTS_SUFFIXES if file_name.endswith(suffix)), file_name)
        parts.append(f"weights-{_name_part(stem)}" + (f"-{weights['weights_sha256'][:8]}" if weights.get("weights_sha256") else ""))
    if dtype != "float32":
        parts.append(dtype)
    return "-".join(parts)


def select_taps(feature_info: Sequence[FeatureInfo], layers=None, layer_names: Sequence[str] = ()) -> list[FeatureInfo]:
    """One rule for choosing taps.

    ``None`` (or "all") means all; an int ``n`` means the last ``n``; a string is a
    comma-separated list; list items may be tap names, glob patterns (``stage*``) or
    integer indices (negative counts from the top). An item that names no declared tap
    may name any Keras layer in ``layer_names`` (globs too, ``outer/inner`` inside nested
    models); such taps get their channels and stride from the layer's output later
    (-1 until then). The result keeps low-to-high order.
    """
    names = [info.name for info in feature_info]
    if layers is None or layers == "all":
        return list(feature_info)
    if isinstance(layers, str):
        text, layers = layers, [item.strip() for item in layers.split(",") if item.strip()]
        if not layers:
            raise UserError(f"layers={text!r} names no tap; taps: {names} (or leave it out for all of them)")
        if len(layers) == 1 and layers[0].lstrip("-").isdigit() and not layers[0].startswith("-"):
            layers = int(layers[0])
    if isinstance(layers, int):
        if not 1 <= layers <= len(names):
            raise UserError(f"layers={layers} must be between 1 and {len(names)} (the number of taps)")
        return list(feature_info[-layers:])
    chosen: set[int] = set()
    extra: dict[str, FeatureInfo] = {}
    for item in layers:
        if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            index = int(item)
            if not -len(names) <= index < len(names):
                raise UserError(f"tap index {index} is out of range for {len(names)} taps: {names}")
            chosen.add(index % len(names))
            continue
        matches = [i for i, name in enumerate(names) if fnmatch.fnmatchcase(name, item)]
        if matches:
            chosen.update(matches)
            continue
        layer_matches = [path for path in layer_names if fnmatch.fnmatchcase(path, item)]
        if not layer_matches:
            raise UserError(f"no tap or layer matches {item!r}; taps: {names}; any Keras layer name also works (see `make layers`)")
        extra.update({path: FeatureInfo(path, path, -1, -1) for path in layer_matches})
    declared = [feature_info[i] for i in sorted(chosen)]
    if not extra:
        return declared
    depth = {path: i for i, path in enumerate(layer_names)}
    merged = {info.layer: info for info in [*declared, *extra.values()]}
    return sorted(merged.values(), key=lambda info: depth.get(info.layer, len(depth)))


class SpatialPyramidPooling(keras.layers.Layer):
    """Average pooling over 1x1 and 2x2 grids, concatenated: 5 x C values."""

    def call(self, x):
        height, width = x.shape[1], x.shape[2]
        parts = [keras.ops.mean(x, axis=(1, 2))]
        for row in range(2):
            for col in range(2):
                # Adaptive bins, as torch's adaptive_avg_pool2d: [floor(i*H/2), ceil((i+1)*H/2)).
                top, bottom = (row * height) // 2, math.ceil((row + 1) * height / 2)
                left, right = (col * width) // 2, math.ceil((col + 1) * width / 2)
                parts.append(keras.ops.mean(x[:, top:bottom, left:right, :], axis=(1, 2)))
        return keras.ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 5 * input_shape[-1])


class GlobalAvgMaxPooling(keras.layers.Layer):
    """Global average and global max pooling, concatenated: 2 x C values."""

    def call(self, x):
        return keras.ops.concatenate([keras.ops.mean(x, axis=(1, 2)), keras.ops.max(x, axis=(1, 2))], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[-1])


def pooling_layer(pooling: str, name: str) -> keras.layers.Layer:
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)
    if pooling == "spp":
        return SpatialPyramidPooling(name=name)
    if pooling == "avgmax":
        return GlobalAvgMaxPooling(name=name)
    raise UserError(f"pooling={pooling!r} is not one of {POOLINGS}")


POOLED_WIDTH = {"avg": 1, "max": 1, "avgmax": 2, "spp": 5}
# Only the active backend's packages compute the features: installing jax beside
# TensorFlow must not change a TensorFlow store's fingerprint.
BACKEND_PACKAGES = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "jax": ("jax", "jaxlib"), "torch": ("torch",)}


@contextlib.contextmanager
def dtype_policy(dtype: str):
    """Layers built inside get ``dtype`` weights and arithmetic (Keras' global dtype policy,
    restored on exit); float32, the default, leaves the policy alone."""
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not one of {DTYPES}")
    if dtype == "float32":
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def compile_forward(model: keras.Model, runtime: str = "keras", taps: Sequence[str] = (), on_convert=None):
    """A fast inference call: numpy in, dict of float32 numpy out. ``runtime="litert"`` runs
    ``model`` (outputs ``taps``) on LiteRT (``extract.litert.litert_forward``, which calls
    ``on_convert`` with each conversion); ``keras`` on the active backend.

    On this project's CPUs a ``tf.function`` call beat ``model.predict`` and XLA was
    slower for convnets, so TensorFlow runs a plain graph function; JAX is jitted, and runs
    on JAX's default device (the GPU where there is one). Outputs of a bfloat16 model are
    cast to float32 on the device (a float32 model's are left as they are).
    """
    if runtime == "litert":
        return litert_forward(model, taps, on_convert=on_convert)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def call(x):
            outputs = model(tf.cast(x, tf.float32), training=False)
            return {k: v if v.dtype == tf.float32 else tf.cast(v, tf.float32) for k, v in outputs.items()}

        # uint8 pixels cross into the graph (a quarter of the bytes) and are cast there.
        graph_call = tf.function(call, reduce_retracing=True)
        return lambda batch: {k: v.numpy() for k, v in graph_call(tf.constant(batch)).items()}
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def jax_call(batch):
            outputs, _ = model.stateless_call(trainable, frozen, batch.astype("float32"), training=False)
            return {k: v if v.dtype == np.float32 else v.astype(np.float32) for k, v in outputs.items()}

        return lambda batch: {k: np.asarray(v) for k, v in jax_call(batch).items()}

    def eager_call(batch):
        outputs = model(np.asarray(batch, np.float32), training=False)
        return {k: keras.ops.convert_to_numpy(keras.ops.cast(v, "float32")) for k, v in outputs.items()}

    return eager_call


class CNNFeaturizer:
    """Pooled features of chosen taps of a registered backbone, computed in one forward pass.

    Images go in as RGB uint8 of any size; each is resized and centre-cropped as the
    backbone's evaluation transform prescribes (``prepare``), then batched (``__call__``).
    With ``views`` other than ``centre`` (``extract.images.view_inputs``), ``prepare`` makes
    every view of the image from its one decode, ``__call__`` runs the views of the whole
    batch in one forward pass and returns, per image and tap, the mean of its views' pooled
    features: one row per image, as with one view. ``batch_size`` is the images of each forward pass:
    a call with fewer is padded to it (one static shape, traced once), one with more runs in several.
    ``runtime`` is what runs the model (``extract.litert.RUNTIMES``): ``auto``, LiteRT where it can
    (TensorFlow backend, float32), else Keras; the fingerprint records LiteRT.
    """

    def __init__(
        self,
        backbone: str,
        *,
        layers=None,
        pooling: str = "avg",
        weights: str | None = "imagenet",
        seed: int = 0,
        batch_size: int = 32,
        crop_pct: float | None = None,
        resize: str = "centre",
        fold_batchnorm: bool = True,
        dtype: str = "float32",
        views: str = "centre",
        runtime: str = "auto",
    ):
        check_views(views)
        for name, value, allowed in (("batch_size", batch_size, POSITIVE), ("seed", seed, SEEDS)):
            check("CNNFeaturizer", name, value, allowed)
        check("CNNFeaturizer", "crop_pct", crop_pct, FRACTION, optional=True)
        if pooling not in POOLINGS:
            raise UserError(f"pooling={pooling!r} is not one of {POOLINGS}")
        self._arguments = (backbone, dict(layers=layers, pooling=pooling, weights=weights, seed=seed, batch_size=batch_size,
                                          crop_pct=crop_pct, resize=resize, fold_batchnorm=fold_batchnorm, dtype=dtype,
                                          views=views, runtime=runtime))
        self.spec = get_backbone(backbone)
        self.views, self.view_count = views, VIEW_COUNTS[views]
        self.pooling = pooling
        self.batch_size = batch_size
        self.input_size = self.spec.input_size
        # Features see the whole image (the square centre of it) unless asked otherwise; the
        # backbone's ImageNet evaluation crop (spec.crop_pct) cost 1-2 points on Fashion-MNIST.
        self.crop_pct = WHOLE_IMAGE if crop_pct is None else crop_pct
        if resize not in RESIZES:
            raise UserError(f"resize={resize!r} is not one of {RESIZES}")
        self.resize = resize
        self.min_side = views_side(self.input_size, views)  # decoded large enough for the square the views come from
        if dtype not in DTYPES:
            raise UserError(f"dtype={dtype!r} is not one of {DTYPES}; bfloat16 is faster on a GPU, float32 is exact")
        self.dtype = dtype
        self.runtime = resolve_runtime(runtime, keras.backend.backend(), dtype)
        with dtype_policy(dtype):
            self._build(backbone, layers, pooling, weights, seed, fold_batchnorm)
        self.name = store_name(self.spec, pooling=pooling, views=views, requested_weights=weights,
                               weights=self.weights, dtype=dtype)
        self._forward = None

    def _build(self, backbone, layers, pooling, weights, seed, fold_batchnorm) -> None:
        keras.utils.set_random_seed(seed)
        weights = self.spec.default_weights if weights == "default" else weights
        # Inference reads a BatchNorm-folded model where the backbone has one (same numbers up to
        # float rounding, faster); ``backbone`` (the trainable form, real BatchNorm) is then built
        # only if something asks for it or a tap reads a layer that folding changes.
        self._backbone, folded_layers = None, frozenset()
        if fold_batchnorm and self.spec.build_inference is not None:
            inference, self.weights, folded_layers = self.spec.build_inference(weights)

            def build_backbone(spec=self.spec):
                with dtype_policy(self.dtype):
                    keras.utils.set_random_seed(seed)  # random weights: the same seeded initialisation
                    return spec.build(weights)[0]

            self._build_backbone = build_backbone
        else:
            self._backbone, self.weights = self.spec.build(weights)
            inference = self._backbone
        if self.weights.get("weights") == "random":
            self.weights["seed"] = seed
        selected = select_taps(self.spec.feature_info, layers, layer_paths(inference))
        self.batchnorm_folded = bool(folded_layers) and not any(info.layer.split("/")[0] in folded_layers for info in selected)
        source = inference if self.batchnorm_folded else self.backbone
        outputs, self.feature_info, self.dims = {}, [], {}
        for info in selected:
            tensor = tap_tensor(source, info.layer)
            if info.channels == -1:  # a layer named directly: shape facts from its output
                stride = self.input_size // tensor.shape[1] if len(tensor.shape) == 4 and tensor.shape[1] else 0
                info = FeatureInfo(info.name, info.layer, int(tensor.shape[-1]), stride)
            elif tensor.shape[-1] != info.channels:
                raise UserError(
                    f"{backbone}: tap {info.name} declares {info.channels} channels but layer "
                    f"{info.layer!r} gives {tensor.shape[-1]}"
                )
            spatial = len(tensor.shape) == 4
            outputs[info.name] = pooling_layer(pooling, f"pool_{info.name.replace('/', '_')}")(tensor) if spatial else tensor
            self.feature_info.append(info)
            self.dims[info.name] = info.channels * (POOLED_WIDTH[pooling] if spatial else 1)
        self.taps = [info.name for info in self.feature_info]
        self.model = keras.Model(source.inputs, outputs, name=f"{self.spec.name}_features")

    def __reduce__(self):
        """Pickled as its arguments (a few bytes, not a Keras model): unpickling builds it again,
        as a Ray worker does (``extract.distributed``), which then checks the fingerprint."""
        backbone, kwargs = self._arguments
        return _rebuild, (type(self), backbone, kwargs)

    @property
    def backbone(self) -> keras.Model:
        """The backbone as ``spec.build`` makes it (real BatchNorm layers), with the same weights."""
        if self._backbone is None:
            self._backbone = self._build_backbone()
        return self._backbone

    def fingerprint(self) -> dict:
        return {
            "model": self.spec.name,
            **self.weights,
            "input_size": self.input_size,
            "preprocessing": {
                "resize": self.resize,  # centre, warp or pad (extract.images.fit_to_input), with OpenCV
                "crop_pct": self.crop_pct,
                "interpolation": self.spec.interpolation,
                "normalisation": self.spec.preprocessing,
            },
            "pooling": self.pooling,
            # Folding changes features at float32 rounding only, but says how they were computed.
            **({"batchnorm": "folded"} if self.batchnorm_folded else {}),
            # Only where it is not float32: stores written before the option existed stay valid.
            **({"dtype": self.dtype} if self.dtype != "float32" else {}),
            # Only where it is not Keras: stores of the Keras runtime written before it existed stay valid.
            **({"runtime": self.runtime} if self.runtime != "keras" else {}),
            # Likewise only where there is more than the one centre view.
            **({"views": {"name": self.views, "count": self.view_count, "from_side": self.min_side}} if self.views != "centre" else {}),
            "taps": {info.name: info.layer for info in self.feature_info},
            "keras_backend": keras.backend.backend(),
            "features_version": FEATURES_VERSION,
            "versions": package_versions("keras", *BACKEND_PACKAGES.get(keras.backend.backend(), ()), "numpy", "pillow",
                                         "opencv-python-headless", "h5py"),
        }

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The model input, (S, S, 3); with views, all of them, (views, S, S, 3)."""
        return model_input(image, self.input_size, self.views, crop_pct=self.crop_pct, interpolation=self.spec.interpolation,
                           resize=self.resize)

    def forward(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The compiled model on one batch of model inputs, exactly as ``__call__`` shapes them."""
        if self._forward is None:
            self._forward = compile_forward(self.model, self.runtime, self.taps,
                                            on_convert=lambda *converted: save_manifest(self, *converted))
        return self._forward(pixels)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        return forward_in_batches(self.forward, batch, batch_size=self.batch_size, view_count=self.view_count, taps=self.taps)


def _rebuild(cls, backbone: str, kwargs: dict) -> CNNFeaturizer:
    return cls(backbone, **kwargs)
