"""Fine-tuning a registered backbone with a new softmax head, training only the chosen part.

``train``:

* ``head``: the backbone is frozen; only the new classifier learns (a linear probe
  trained by Adam, with dropout);
* ``top1`` / ``top2``: also the last one or two blocks, where a block is everything after
  one declared tap up to the next (Lite0 ``top2``: ``block7a_*`` and the head conv);
* ``all``: everything.

Unfrozen pretrained layers learn at ``backbone_lr_scale`` times the head's rate
(``LayerwiseAdam``). Frozen layers, BatchNorm statistics included, are not touched; the BatchNorm
layers of unfrozen blocks follow ``settings.batchnorm`` (``transfer.layers.BATCHNORM_POLICIES``).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from extract.backbones import get_backbone, layer_paths, tap_tensor
from transfer.layers import (
    BATCHNORM_POLICIES, DEFAULT_BATCHNORM, LayerwiseAdam, apply_batchnorm_policy, build_head, count_parameters, restore_layers, set_trainable,
)
from transfer.training import compile_and_fit, labelled_images, record, score_row
from extract.arguments import POSITIVE, SEEDS, check, number
from extract.errors import UserError

TRAIN_MODES = ("head", "top1", "top2", "all")
LEARNING_RATES = number(0, closed="neither")
LR_SCALES = number(0)  # 0 keeps the unfrozen pretrained layers still
DROPOUTS = number(0, 1, closed="left")


@dataclass(frozen=True)
class FinetuneSettings:
    train: str = "head"
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    backbone_lr_scale: float = 0.1
    dropout: float = 0.2
    weights: str = "imagenet"
    seed: int = 0
    init_from: str | None = None  # restore layers from another model's weights file first
    restore: tuple[str, ...] = ("*",)
    batchnorm: str = DEFAULT_BATCHNORM  # transfer.layers.BATCHNORM_POLICIES

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise UserError(f"train={self.train!r} is not one of {TRAIN_MODES}")
        if self.batchnorm not in BATCHNORM_POLICIES:
            raise UserError(f"batchnorm={self.batchnorm!r} is not one of {BATCHNORM_POLICIES}")
        for name, allowed in (("epochs", POSITIVE), ("batch_size", POSITIVE), ("learning_rate", LEARNING_RATES),
                              ("backbone_lr_scale", LR_SCALES), ("dropout", DROPOUTS), ("seed", SEEDS)):
            check("fine-tuning", name, getattr(self, name), allowed)


def unfrozen_layer_paths(spec, backbone: keras.Model, train: str) -> list[str]:
    """Layer paths of the backbone that ``train`` unfreezes."""
    if train == "head":
        return []
    taps = [info.layer for info in spec.feature_info if "/" not in info.layer]
    paths = layer_paths(backbone)
    paths = paths[: paths.index(taps[-1]) + 1]  # the layers the features come from; not the ImageNet head
    blocks = int(train.removeprefix("top")) if train != "all" else len(taps)
    if len(taps) <= blocks:
        return paths
    boundary = paths.index(taps[-blocks - 1])  # the tap that ends the last frozen block
    return paths[boundary + 1 :]


def build_finetune_model(model_name: str, n_classes: int, settings: FinetuneSettings):
    """Backbone + global pooling + dropout + softmax, with the parts ``settings.train`` leaves
    frozen frozen. Returns (model, backbone, spec, report lines, feature dimension)."""
    spec = get_backbone(model_name)
    keras.utils.set_random_seed(settings.seed)
    backbone, weights = spec.build(spec.default_weights if settings.weights == "default" else settings.weights)
    notes = [f"weights: {weights.get('weights')}"]
    if settings.init_from:
        notes.append(str(restore_layers(backbone, settings.init_from, settings.restore)))
    features = tap_tensor(backbone, spec.feature_info[-1].layer)
    outputs, _ = build_head(features, n_classes, dropout=settings.dropout)
    model = keras.Model(backbone.inputs, outputs, name=f"{spec.name}_finetune")
    set_trainable(backbone, ["*"], False)
    unfrozen = unfrozen_layer_paths(spec, backbone, settings.train)
    if unfrozen:
        changed = set_trainable(backbone, unfrozen, True).changed
        notes.append(f"unfrozen for {settings.train}: {len(changed)} layers, {changed[0]} .. {changed[-1]}")
        frozen = apply_batchnorm_policy(backbone, settings.batchnorm)
        notes.append(f"BatchNorm: {settings.batchnorm}" + (f" ({frozen} layers in inference mode)" if frozen else ""))
    trainable, frozen = count_parameters(model)
    notes.append(f"{trainable:,} trainable parameters, {frozen:,} frozen")
    return model, backbone, spec, notes, int(features.shape[-1])


def make_optimizer(backbone: keras.Model, settings: FinetuneSettings) -> LayerwiseAdam:
    """Adam at the head's rate, scaled by ``backbone_lr_scale`` for the unfrozen pretrained layers."""
    pretrained = {v.path for v in backbone.trainable_weights}
    return LayerwiseAdam({path: settings.backbone_lr_scale for path in pretrained}, learning_rate=settings.learning_rate)


def run_finetune(dataset, model_name: str, settings: FinetuneSettings, *, results_dir, progress: bool = True) -> dict:
    """Fine-tune on the training split, score on the test split, add the row to results.csv."""
    model, backbone, spec, notes, dim = build_finetune_model(model_name, len(dataset.classes), settings)
    for line in notes:
        print(line)
    data = labelled_images(dataset, spec.input_size, progress=progress)
    seconds, _ = compile_and_fit(model, data.x_train, data.y_train, optimizer=make_optimizer(backbone, settings),
                                 epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed, progress=progress)
    row = score_row(
        model, data, dataset.classes, dataset=dataset.name, features=spec.name, kind="finetune", layer=f"finetune:{settings.train}",
        classifier="softmax", seed=settings.seed, seconds=seconds, n_features=dim, settings=settings, results_dir=results_dir,
    )
    record(results_dir, [row])
    return row
