"""What every training run here shares: images as arrays, a seeded fit, and results.csv rows."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
from sklearn.metrics import accuracy_score
from tqdm.auto import tqdm

from classify.metrics import mean_per_class_accuracy
from classify.results import update_results, write_predictions
from extract.datasets import ImageDataset
from extract.datasets.base import choose_splits
from extract.images import fit_to_input
from extract.parallel import decode_pool
from extract.errors import UserError

# The version of the training code: bump it when a change to transfer/ (training, a head, the
# BatchNorm policy, a schedule, the rule of thumb's protocol) alters a trained run's numbers
# (CONTRIBUTING.md). It is part of every trained row's settings, so older rows are trained again.
# 3: the BatchNorm policy (transfer.layers) is one for finetune and the rule of thumb: frozen by default.
TRAINED_VERSION = 3


def image_arrays(dataset: ImageDataset, rows, size: int, *, progress: bool = True) -> np.ndarray:
    """Images ``rows`` of ``dataset`` as uint8 (n, size, size, 3), made square as the dataset says (``resize``)."""
    rows = np.asarray(rows)

    def load(row: int) -> np.ndarray:
        return fit_to_input(dataset.read(int(row), min_side=size), size, resize=dataset.resize)

    with decode_pool() as pool:
        images = list(tqdm(pool.map(load, rows), total=len(rows), desc=f"{dataset.name}: images", disable=not progress))
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


def split_rows(dataset: ImageDataset, split: str) -> np.ndarray:
    rows = np.flatnonzero(np.asarray(dataset.splits) == split)
    if not len(rows):
        raise UserError(f"{dataset.name} has no {split!r} split; its splits are {dataset.split_names}")
    return rows


@dataclass(frozen=True)
class LabelledImages:
    """A dataset's training and test images as uint8 arrays, with their labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_paths: np.ndarray
    train_split: str
    test_split: str


def labelled_images(dataset: ImageDataset, size: int, *, progress: bool = True) -> LabelledImages:
    """The ``train`` split and the test split (``test``, else ``val``), fitted to ``size``."""
    train, test = choose_splits(dataset.splits)
    train_rows, test_rows = split_rows(dataset, train), split_rows(dataset, test)
    return LabelledImages(
        image_arrays(dataset, train_rows, size, progress=progress), dataset.labels[train_rows],
        image_arrays(dataset, test_rows, size, progress=progress), dataset.labels[test_rows],
        np.asarray(dataset.paths)[test_rows], train, test,
    )


def compile_and_fit(model: keras.Model, x, y, *, optimizer, epochs: int, batch_size: int, seed: int,
                    loss="sparse_categorical_crossentropy", progress: bool = True) -> tuple[float, dict]:
    """Seeded training; returns (seconds, Keras history). XLA stays off: on CPUs it made convnet
    training slower, not faster."""
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"] if "categorical" in str(loss) else None, jit_compile=False)
    start = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=1 if progress else 0)
    return time.perf_counter() - start, history.history


def score_row(model: keras.Model, data: LabelledImages, classes, *, dataset: str, features: str, kind: str, layer: str,
              classifier: str, seed: int, seconds: float, n_features: int, settings, results_dir: Path) -> dict:
    """A results.csv row (the probes' columns) for a trained softmax classifier; predictions CSV beside it.
    ``settings`` (the run's settings dataclass) is written out in the row's ``settings`` column, part of
    its key: a rerun with the same settings replaces its row, other settings get a row of their own."""
    x_test, y_test = data.x_test, data.y_test
    predicted = np.argmax(model.predict(x_test, batch_size=64, verbose=0), axis=1) if len(x_test) else np.zeros(0, int)
    true_names = np.asarray([classes[i] for i in y_test])
    predicted_names = np.asarray([classes[i] for i in predicted])
    row = {
        "dataset": dataset, "features": features, "kind": kind, "layer": layer, "layer_depth": 0, "classifier": classifier,
        "protocol": "given", "train_split": data.train_split, "test_split": data.test_split, "normalization": "none", "search": "none",
        "Cs": "", "selection": "fixed schedule, nothing chosen on held-out data", "C": float("nan"), "cv_score": float("nan"),
        "converged": True, "cv_splits": 0, "seed": seed, "repeats": 1, "n_train": len(data.x_train), "n_test": len(x_test),
        "classes_unseen_in_train": len(set(true_names) - {classes[i] for i in data.y_train}),
        "n_features": n_features, "top1": float(accuracy_score(true_names, predicted_names)), "top1_std": 0.0,
        "mean_per_class_acc": mean_per_class_accuracy(true_names, predicted_names), "mean_per_class_acc_std": 0.0,
        "mAP": np.nan, "mAP_voc07": np.nan, "images_without_features": 0, "fit_seconds": round(seconds, 3),
        "store_fingerprint": "", "settings": settings_text(settings), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_predictions(results_dir, row, data.test_paths, true_names, predicted_names)
    return row


def settings_text(settings) -> str:
    """A run's settings as ``name=value`` pairs (the seed has its own column), with ``TRAINED_VERSION``."""
    values = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in asdict(settings).items() if k != "seed"}
    return " ".join(f"{k}={'' if v is None else v}" for k, v in {**values, "version": TRAINED_VERSION}.items())


def record(results_dir: Path, rows: list[dict]) -> Path:
    path = Path(results_dir) / "results.csv"
    update_results(path, rows)
    return path
