"""Save and load trained probes as plain ``.npz`` arrays: no pickle, nothing executable.

A saved probe holds its normalisation (kind and statistics), the linear weights, the
class names, C, and the fingerprint, layer and dimension of the features it expects.
``SavedProbe.check_store`` refuses a store whose features were made otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classify import fusion
from classify.probe import BlockNormalizer, signed_sqrt
from extract.store import FeatureStore, StoreMismatchError, canonical_json, fingerprint_differences
from extract.errors import UserError

FORMAT_VERSION = 1


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
    np.savez(
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
        with np.load(path, allow_pickle=False) as data:
            if int(data["format_version"]) != FORMAT_VERSION:
                raise UserError(f"{path}: probe format {int(data['format_version'])}, this code reads {FORMAT_VERSION}")
            return cls(
                coef=data["coef"], intercept=data["intercept"], classes=data["classes"].tolist(),
                normalization=str(data["normalization"]), C=float(data["C"]), layer=str(data["layer"]),
                features=str(data["features"]), fingerprint=json.loads(str(data["fingerprint"])), dim=int(data["dim"]),
                mean=data["mean"] if "mean" in data else None, scale=data["scale"] if "scale" in data else None,
                blocks=data["blocks"] if "blocks" in data else None,
                block_weights=data["block_weights"] if "block_weights" in data else None,
            )

    def check_store(self, store: FeatureStore) -> None:
        differences = fingerprint_differences(self.fingerprint, store.fingerprint)
        if differences:
            raise StoreMismatchError(
                f"{store.path} holds features made otherwise than this probe's ({self.features}):\n  " + "\n  ".join(differences)
            )
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
