"""Save and load trained probes as plain ``.npz`` arrays: no pickle, nothing executable.

A saved probe holds its normalisation (kind and statistics), the linear weights, the
class names, C, and the fingerprint, layer and dimension of the features it expects.
``SavedProbe.load`` checks every one of them against this format (a forged file is one line);
``SavedProbe.check_store`` refuses a store whose features were made otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classify import fusion
from classify.probe import NORMALIZATIONS, BlockNormalizer, signed_sqrt
from extract.fileio import read_arrays, save_arrays
from extract.store import FeatureStore, StoreMismatchError, canonical_json, check_same_settings
from extract.errors import UserError

FORMAT_VERSION = 1
REQUIRED = ("format_version", "coef", "intercept", "classes", "normalization", "C", "layer", "features", "fingerprint", "dim")


def save_probe(path: str | Path, probe, *, class_names, layer: str, features: str, fingerprint: dict) -> Path:
    """Write a fitted ``LinearProbe`` (or streaming probe) to ``path`` (.npz)."""
    path = Path(path)
    normalizer, model = probe.pipeline_["normalize"], probe.pipeline_["classify"]
    normalization = probe.normalization
    # A fused layer's blocks are normalised one by one, then weighted (classify.probe.BlockNormalizer).
    parts = normalizer.normalizers_ if isinstance(normalizer, BlockNormalizer) else [normalizer]
    stats = {}
    if isinstance(normalizer, BlockNormalizer):
        stats = {"blocks": np.asarray(normalizer.blocks, np.int64), "block_weights": np.asarray(normalizer.weights_, np.float64)}
    if normalization == "standard":
        stats |= {"mean": np.concatenate([p.mean_ for p in parts]).astype(np.float64),
                  "scale": np.concatenate([p.scale_ for p in parts]).astype(np.float64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_arrays(
        path,
        format_version=FORMAT_VERSION,
        coef=np.atleast_2d(model.coef_).astype(np.float64),
        intercept=np.atleast_1d(model.intercept_).astype(np.float64),
        classes=np.asarray([class_names[int(c)] for c in probe.classes_], dtype=str),
        normalization=normalization,
        C=probe.best_C_,
        layer=layer,
        features=features,
        fingerprint=canonical_json(fingerprint),
        dim=model.coef_.shape[-1],
        **stats,
    )
    return path


@dataclass
class SavedProbe:
    coef: np.ndarray
    intercept: np.ndarray
    classes: list[str]
    normalization: str
    C: float
    layer: str
    features: str
    fingerprint: dict
    dim: int
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    blocks: np.ndarray | None = None
    block_weights: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | Path) -> SavedProbe:
        """Read a probe, checking everything against the format: each array's header against its bytes
        before it is read (``read_arrays``), then every key, type, shape and value. A file that fails
        is one ``UserError`` naming it and what is wrong."""
        path = Path(path)
        data = read_arrays(path)

        def refuse(what: str) -> UserError:
            return UserError(f"{path} {what}; it is not a probe `classify probe --save-probes` wrote: save it again")

        missing = [key for key in REQUIRED if key not in data]
        if missing:
            raise refuse(f"lacks {missing}")
        if data["format_version"].shape != () or data["format_version"].dtype.kind not in "iu":
            raise refuse("has no whole-number format_version")
        if int(data["format_version"]) != FORMAT_VERSION:
            raise UserError(f"{path}: probe format {int(data['format_version'])}, this code reads {FORMAT_VERSION}")
        text = {key: data[key] for key in ("normalization", "layer", "features", "fingerprint")}
        if any(value.shape != () or value.dtype.kind != "U" for value in text.values()):
            raise refuse("has normalization, layer, features or fingerprint that is not one text")
        try:
            fingerprint = json.loads(str(data["fingerprint"]))
        except ValueError:
            raise refuse("has a fingerprint that is not JSON") from None
        if not isinstance(fingerprint, dict):
            raise refuse("has a fingerprint that is not a JSON object")
        normalization = str(data["normalization"])
        if normalization not in NORMALIZATIONS:
            raise refuse(f"has normalization {normalization!r}, not one of {NORMALIZATIONS}")
        numbers = {key: data[key] for key in ("coef", "intercept", "C", *(("mean", "scale") if normalization == "standard" else ()))}
        for key, value in numbers.items():
            if value.dtype.kind not in "fiu" or not np.isfinite(value).all():
                raise refuse(f"has {key} that is not finite numbers")
        coef, intercept, classes = data["coef"], data["intercept"], data["classes"]
        dim = int(data["dim"]) if data["dim"].shape == () and data["dim"].dtype.kind in "iu" else -1
        if coef.ndim != 2 or coef.shape[1] != dim or dim < 1:
            raise refuse(f"has coef of shape {coef.shape} for dim {data['dim']}")
        if classes.ndim != 1 or classes.dtype.kind != "U" or len(classes) < 2 or len(set(classes.tolist())) != len(classes):
            raise refuse(f"has classes {classes.tolist()!r}, not two or more distinct names")
        if len(coef) != (1 if len(classes) == 2 else len(classes)) or intercept.shape != (len(coef),):
            raise refuse(f"has coef of shape {coef.shape} and intercept of shape {intercept.shape} for {len(classes)} classes")
        if data["C"].shape != () or not float(data["C"]) > 0:
            raise refuse(f"has C={data['C']!r}, not one positive number")
        blocks = block_weights = None
        if "blocks" in data or "block_weights" in data:
            blocks, block_weights = data.get("blocks"), data.get("block_weights")
            if (blocks is None or block_weights is None or blocks.ndim != 1 or blocks.dtype.kind not in "iu" or len(blocks) < 2
                    or (blocks < 1).any() or int(blocks.sum()) != dim or block_weights.shape != blocks.shape
                    or block_weights.dtype.kind != "f" or not np.isfinite(block_weights).all() or not (block_weights > 0).all()):
                raise refuse(f"has blocks and block_weights that are not two or more positive widths summing to dim {dim}, "
                             "each with a positive finite weight")
        if normalization == "standard":
            if data["mean"].shape != (dim,) or data["scale"].shape != (dim,) or not (data["scale"] > 0).all():
                raise refuse(f"has a standard normalisation whose mean or scale is not {dim} numbers, every scale positive")
        return cls(
            coef=coef.astype(np.float64), intercept=intercept.astype(np.float64), classes=classes.tolist(),
            normalization=normalization, C=float(data["C"]), layer=str(data["layer"]), features=str(data["features"]),
            fingerprint=fingerprint, dim=dim,
            mean=data["mean"].astype(np.float64) if normalization == "standard" else None,
            scale=data["scale"].astype(np.float64) if normalization == "standard" else None,
            blocks=blocks, block_weights=None if block_weights is None else block_weights.astype(np.float64),
        )

    def check_store(self, store: FeatureStore) -> None:
        check_same_settings(self.fingerprint, store.fingerprint, subject=f"{store.path} holds features made with other settings than this probe's ({self.features})",
                            fix="Classify the store this probe was trained on, or train a probe on this one (make classify).")
        fusion.check_layer(store, self.layer)
        if fusion.dim(store, self.layer) != self.dim:
            raise StoreMismatchError(f"{store.path} layer {self.layer} has {fusion.dim(store, self.layer)} dimensions; the probe expects {self.dim}")

    def read_features(self, store: FeatureStore) -> np.ndarray:
        """The store's features of this probe's layer (a tap, or the taps of a fused layer side by side)."""
        return fusion.features(store, self.layer)

    def normalize(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise UserError(f"the probe expects (n, {self.dim}) features. Received: {X.shape}")
        if self.normalization == "standard":
            X = (X - self.mean) / self.scale
        if self.blocks is None:
            return self._rows(X)
        edges = np.cumsum([0, *self.blocks])
        return np.concatenate([self._rows(X[:, a:b]) * w for a, b, w in zip(edges[:-1], edges[1:], self.block_weights)], axis=1)

    def _rows(self, X: np.ndarray) -> np.ndarray:
        """The row-wise part of the normalisation (signed square root, l2) of one block."""
        if self.normalization == "sqrt":
            X = signed_sqrt(X)
        if self.normalization in ("l2", "sqrt"):
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            return X / np.where(norms == 0, 1.0, norms)
        return X

    def decision_function(self, X) -> np.ndarray:
        return self.normalize(X) @ self.coef.T + self.intercept

    def predict(self, X) -> list[str]:
        scores = self.decision_function(X)
        index = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else np.argmax(scores, axis=1)
        return [self.classes[i] for i in index]
