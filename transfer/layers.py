"""Layer-level transfer in Keras 3: restore chosen layers from another model's weights,
freeze and unfreeze by pattern, and an Adam that gives pretrained layers a smaller step.

The TensorFlow 1 recipe this replaces was ``tf.train.Saver(var_list=conv_vars).restore(...)``
then ``AdamOptimizer.minimize(loss, var_list=fc_vars)``. Here: ``restore_layers(model,
"autoencoder.keras", ["conv*"])`` then ``set_trainable(model, ["conv*"], False)``.

Layers are addressed by path: their name, or ``outer/inner`` inside nested models, and
patterns are shell globs over those paths (``conv*``, ``resnet50/conv5_*``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from extract.backbones import layer_paths
from extract.backbones.weights_files import read_weights_file
from extract.errors import UserError


def _layers_by_path(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Every layer that owns weights directly (not nested models themselves), by path."""
    found = {}
    for path in layer_paths(model):
        layer = model
        for part in path.split("/"):
            layer = layer.get_layer(part)
        if not isinstance(layer, keras.Model) and layer.weights:
            found[path] = layer
    return found


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass
class RestoreReport:
    source: str
    restored: list[tuple[str, str]] = field(default_factory=list)  # (target layer, source layer)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why)
    parameters: int = 0

    def __str__(self) -> str:
        lines = [f"restored {len(self.restored)} layers ({self.parameters:,} values) from {self.source}"]
        lines += [f"  restored {t}" + (f" <- {s}" if s != t else "") for t, s in self.restored]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def source_weights(path: str | Path, like: keras.Model) -> dict[str, list[np.ndarray]]:
    """Per layer path, the weight arrays stored in a weights file (``read_weights_file``).

    A ``.keras`` file carries its architecture and layer names, so it can feed any model.
    A ``.weights.h5`` file stores weights by position only: it is read into a clone of
    ``like``, so it must come from the same architecture.
    """
    source = read_weights_file(path, like, copy=True)
    return {name: [np.asarray(w) for w in layer.get_weights()] for name, layer in _layers_by_path(source).items()}


def restore_layers(model: keras.Model, source: str | Path, patterns=("*",), *, skip_mismatch: bool = False) -> RestoreReport:
    """Copy the weights of ``model``'s layers that match ``patterns`` from ``source``.

    Layers are paired by path, else by their own name when that is unique in the source
    (an encoder layer ``conv1`` restored into a classifier's ``conv1``). A layer the source
    lacks is listed as skipped; a shape mismatch raises, or is listed with
    ``skip_mismatch``. Raises when nothing at all is restored.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    stored = source_weights(source, like=model)
    by_leaf: dict[str, list[str]] = {}
    for name in stored:
        by_leaf.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    report = RestoreReport(str(source))
    for path, layer in _layers_by_path(model).items():
        if not _matches(path, patterns):
            continue
        leaf = path.rsplit("/", 1)[-1]
        origin = path if path in stored else (by_leaf[leaf][0] if len(by_leaf.get(leaf, [])) == 1 else None)
        if origin is None:
            report.skipped.append((path, "no layer of that name in the source"))
            continue
        arrays = stored[origin]
        expected = [tuple(w.shape) for w in layer.weights]
        found = [a.shape for a in arrays]
        if expected != found:
            message = f"shape mismatch: the model has {expected}, {source} has {found} in {origin!r}"
            if not skip_mismatch:
                raise UserError(f"cannot restore {path}: {message}; pass skip_mismatch to skip it")
            report.skipped.append((path, message))
            continue
        layer.set_weights(arrays)
        report.restored.append((path, origin))
        report.parameters += sum(a.size for a in arrays)
    if not report.restored:
        raise UserError(f"no layer matching {patterns} was restored from {source}:\n{report}")
    return report


@dataclass
class TrainableReport:
    changed: list[str]
    trainable_parameters: int
    frozen_parameters: int

    def __str__(self) -> str:
        return (f"{len(self.changed)} layers changed; {self.trainable_parameters:,} trainable and "
                f"{self.frozen_parameters:,} frozen parameters")


def count_parameters(model: keras.Model) -> tuple[int, int]:
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    frozen = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
    return trainable, frozen


def set_trainable(model: keras.Model, patterns, trainable: bool) -> TrainableReport:
    """Freeze (``trainable=False``) or unfreeze the layers whose path matches ``patterns``.

    Frozen BatchNorm layers also stop updating their moving statistics (Keras runs them in
    inference mode), so frozen layers come out of training bit-identical.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    layers = _layers_by_path(model)
    matched = [path for path in layers if _matches(path, patterns)]
    if not matched:
        raise UserError(f"no layer matches {patterns}; layers: {list(layers)[:12]}...")
    before = {path: layer.trainable for path, layer in layers.items()}
    if trainable:
        # A layer inside a frozen nested model stays frozen until the nested model is trainable
        # too; setting that flag makes all its layers trainable, so the others are put back.
        for path in matched:
            parent = model
            for part in path.split("/")[:-1]:
                parent = parent.get_layer(part)
                parent.trainable = True
        for path, layer in layers.items():
            layer.trainable = before[path]
    for path in matched:
        layers[path].trainable = trainable
    changed = [path for path in matched if before[path] != trainable]
    return TrainableReport(changed, *count_parameters(model))


@keras.saving.register_keras_serializable(package="offshelf")
class LayerwiseAdam(keras.optimizers.Adam):
    """Adam whose step is scaled per variable: ``multipliers`` maps variable paths to factors.

    Fine-tuning gives unfrozen pretrained layers a smaller step than the new head. Adam is
    invariant to gradient scale, so the scale goes on the learning rate, per variable.
    """

    def __init__(self, multipliers: dict[str, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.multipliers = dict(multipliers or {})

    def build(self, var_list):
        super().build(var_list)
        self._factors = [self.multipliers.get(v.path, 1.0) for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        # The backend may pass its own variable object here; the index maps it back.
        factor = self._factors[self._get_variable_index(variable)]
        if factor != 1.0:
            learning_rate = learning_rate * factor
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "multipliers": self.multipliers}


# How BatchNormalization layers of a pretrained network behave while some of its layers train:
# "frozen" keeps every one in inference mode with its pretrained statistics and scales (Keras'
# advice for fine-tuning on small data: a batch of a few dozen images gives noisy statistics, and
# the frozen layers computed the cached activations with the pretrained ones); "train" lets the
# BatchNorm layers of the unfrozen blocks update their statistics and scales as ordinary layers.
BATCHNORM_POLICIES = ("frozen", "train")
DEFAULT_BATCHNORM = "frozen"


def apply_batchnorm_policy(model: keras.Model, policy: str) -> int:
    """Apply ``policy`` (``BATCHNORM_POLICIES``) to ``model`` after its trainable layers are set:
    "frozen" freezes every BatchNormalization (in nested models too). Returns how many it froze."""
    if policy not in BATCHNORM_POLICIES:
        raise UserError(f"batchnorm={policy!r} is not one of {BATCHNORM_POLICIES}")
    if policy == "train":
        return 0
    frozen = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            frozen += apply_batchnorm_policy(layer, policy)
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            layer.trainable = False
            frozen += 1
    return frozen


def build_head(features, n_classes: int, *, dropout: float) -> tuple[object, keras.layers.Dense]:
    """The new classifier on a backbone's top features: global average pooling (spatial features),
    dropout, and a softmax layer. Returns (the outputs, the softmax layer)."""
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
    x = keras.layers.Dropout(dropout, name="head_dropout")(features)
    head = keras.layers.Dense(n_classes, activation="softmax", name="head_classifier")
    return head(x), head
