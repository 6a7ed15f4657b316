"""The original recipe, end to end: pretrain a convolutional autoencoder without labels,
restore its conv layers into a classifier, freeze them, train the dense layers.

Beside it, on the same labelled images and test split: a linear probe on the encoder's
stored features (the off-the-shelf way), and the same classifier trained from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from extract.arguments import POSITIVE, SEEDS, check
from transfer.cae import ENCODER_PATTERNS, build_autoencoder, build_recipe_classifier, check_input_size, reconstruction_target
from transfer.finetune import LEARNING_RATES
from transfer.layers import restore_layers, set_trainable
from transfer.training import compile_and_fit, labelled_images, record, score_row


@dataclass(frozen=True)
class RecipeSettings:
    input_size: int = 28
    pretrain_epochs: int = 5
    train_epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        check_input_size("the recipe", self.input_size)
        for name, allowed in (("pretrain_epochs", POSITIVE), ("train_epochs", POSITIVE),
                              ("batch_size", POSITIVE), ("learning_rate", LEARNING_RATES), ("seed", SEEDS)):
            check("the recipe", name, getattr(self, name), allowed)


def pretrain_cae(images: np.ndarray, path: Path, settings: RecipeSettings, *, progress: bool = True) -> tuple[Path, list[float]]:
    """Train the autoencoder to reconstruct ``images`` (no labels) and save it as ``.keras``;
    returns the path and the reconstruction loss of each epoch."""
    keras.utils.set_random_seed(settings.seed)  # the initial weights too
    model = build_autoencoder(settings.input_size)
    _, history = compile_and_fit(
        model, images, reconstruction_target(images), optimizer=keras.optimizers.Adam(settings.learning_rate),
        epochs=settings.pretrain_epochs, batch_size=settings.batch_size, seed=settings.seed, loss="binary_crossentropy",
        progress=progress,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path, [float(v) for v in history["loss"]]


def train_classifier(dataset, checkpoint: Path | None, settings: RecipeSettings, *, results_dir: Path, progress: bool = True) -> tuple[dict, keras.Model]:
    """With a checkpoint: conv layers restored from it and frozen, dense layers trained.
    Without: the same classifier, every layer trained from a random start."""
    keras.utils.set_random_seed(settings.seed)
    model = build_recipe_classifier(settings.input_size, len(dataset.classes))
    if checkpoint is not None:
        print(restore_layers(model, checkpoint, ENCODER_PATTERNS))
        print(f"froze {ENCODER_PATTERNS}: {set_trainable(model, ENCODER_PATTERNS, False)}")
    data = labelled_images(dataset, settings.input_size, progress=progress)
    seconds, _ = compile_and_fit(model, data.x_train, data.y_train, optimizer=keras.optimizers.Adam(settings.learning_rate),
                                 epochs=settings.train_epochs, batch_size=settings.batch_size, seed=settings.seed, progress=progress)
    name = "restored conv (frozen) + dense" if checkpoint is not None else "from scratch"
    row = score_row(
        model, data, dataset.classes, dataset=dataset.name, features="cae-recipe" if checkpoint is not None else "scratch-cnn",
        kind="trained", layer=name, classifier="softmax", seed=settings.seed, seconds=seconds,
        n_features=int(model.get_layer("fc1").input.shape[-1]), settings=settings, results_dir=results_dir,
    )
    record(results_dir, [row])
    return row, model
