"""What every training run here shares: images as arrays, a seeded fit, and results.csv rows."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from classify.evaluate import update_results
from classify.metrics import mean_per_class_accuracy, top1
from extract.datasets import ImageDataset
from extract.images import fit_to_input
from extract.pipeline import decode_pool


def image_arrays(dataset: ImageDataset, rows, size: int, *, progress: bool = True) -> np.ndarray:
    """Images ``rows`` of ``dataset`` as uint8 (n, size, size, 3): the square centre, resized."""
    rows = np.asarray(rows)

    def load(row: int) -> np.ndarray:
        return fit_to_input(dataset.read(int(row), min_side=size), size)

    with decode_pool() as pool:
        images = list(tqdm(pool.map(load, rows), total=len(rows), desc=f"{dataset.name}: images", disable=not progress))
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


def split_rows(dataset: ImageDataset, split: str) -> np.ndarray:
    rows = np.flatnonzero(np.asarray(dataset.splits) == split)
    if not len(rows):
        raise ValueError(f"{dataset.name} has no {split!r} split; its splits are {dataset.split_names}")
    return rows


def test_split(dataset: ImageDataset) -> str:
    for name in ("test", "val", "validation"):
        if name in dataset.split_names:
            return name
    raise ValueError(f"{dataset.name} has no test split (looked for test, val); its splits are {dataset.split_names}")


def compile_and_fit(model: keras.Model, x, y, *, optimizer, epochs: int, batch_size: int, seed: int,
                    loss="sparse_categorical_crossentropy", progress: bool = True) -> tuple[float, dict]:
    """Seeded training; returns (seconds, Keras history). XLA stays off: it was 2-10x slower
    for convnets on our CPUs."""
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"] if "categorical" in str(loss) else None, jit_compile=False)
    start = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=1 if progress else 0)
    return time.perf_counter() - start, history.history


def score_row(model: keras.Model, x_test, y_test, classes, *, dataset: str, features: str, kind: str, layer: str,
              classifier: str, seed: int, n_train: int, train_split: str, test_split: str, seconds: float,
              n_features: int, paths=None, predictions_dir: Path | None = None) -> dict:
    """A results.csv row (the probes' columns) for a trained softmax classifier; predictions CSV beside it."""
    predicted = np.argmax(model.predict(x_test, batch_size=64, verbose=0), axis=1) if len(x_test) else np.zeros(0, int)
    true_names = np.asarray([classes[i] for i in y_test])
    predicted_names = np.asarray([classes[i] for i in predicted])
    if predictions_dir is not None and paths is not None:
        out = predictions_dir / features / f"{layer}__{classifier}__given.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"path": paths, "label": true_names, "predicted": predicted_names}).to_csv(out, index=False)
    return {
        "dataset": dataset, "features": features, "kind": kind, "layer": layer, "layer_depth": 0, "classifier": classifier,
        "protocol": "given", "train_split": train_split, "test_split": test_split, "normalization": "none", "search": "none",
        "C": float("nan"), "converged": True, "cv_splits": 0, "seed": seed, "repeats": 1, "n_train": n_train, "n_test": len(x_test),
        "n_features": n_features, "top1": top1(true_names, predicted_names), "top1_std": 0.0,
        "mean_per_class_acc": mean_per_class_accuracy(true_names, predicted_names), "mean_per_class_acc_std": 0.0,
        "mAP": np.nan, "mAP_voc07": np.nan, "images_without_features": 0, "fit_seconds": round(seconds, 3),
        "store_fingerprint": "", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record(results_dir: Path, rows: list[dict]) -> Path:
    path = Path(results_dir) / "results.csv"
    update_results(path, rows)
    return path
