"""Histogram of oriented gradients (Dalal & Triggs) with scikit-image, sized to the images."""

from __future__ import annotations

import numpy as np
from skimage.feature import hog

from extract import package_versions
from extract.datasets import ImageDataset
from extract.errors import UserError
from extract.images import fit_to_input

# Bump when a change to this code alters HOG's numbers (CONTRIBUTING.md): HOG stores made before are then refused.
FEATURES_VERSION = 1
MAX_SIDE = 128
CELLS_ACROSS = 16
MIN_CELL = 4
SIZE_PROBES = 32


class HOGFeaturizer:
    """HOG of a grayscale ``side`` x ``side`` centre crop: 9 orientations, 2x2-cell blocks, L2-Hys.

    ``side`` is the dataset's typical shorter side capped at 128 px, and cells are
    ``side / 16`` px (at least 4): 16x16 cells on photos (8100 values), 7x7 cells on
    28 px Fashion-MNIST (1296 values). Upscaling tiny images would only blur gradients.
    """

    taps = ["hog"]
    batch_size = 64

    def __init__(self, side: int = MAX_SIDE, *, orientations: int = 9, cells_per_block: int = 2, resize: str = "centre"):
        if side < 2 * MIN_CELL:
            raise UserError(f"HOG needs images of at least {2 * MIN_CELL} px. Received: side={side}")
        self.name = "hog"
        self.side = side
        self.cell = max(MIN_CELL, side // CELLS_ACROSS)
        self.orientations = orientations
        self.cells_per_block = cells_per_block
        self.resize = resize
        self.min_side = side
        self.dims = {"hog": len(self.prepare(np.zeros((side, side, 3), np.uint8)))}

    @classmethod
    def for_dataset(cls, dataset: ImageDataset, **kwargs) -> HOGFeaturizer:
        """Pick the working side from the shorter sides of the first images."""
        probes = [min(dataset.read(i, min_side=MAX_SIDE).shape[:2]) for i in range(min(SIZE_PROBES, len(dataset)))]
        side = int(min(MAX_SIDE, np.median(probes))) if probes else MAX_SIDE
        return cls(side, resize=dataset.resize, **kwargs)

    def fingerprint(self) -> dict:
        return {
            "baseline": "hog",
            "side": self.side,
            "pixels_per_cell": self.cell,
            "cells_per_block": self.cells_per_block,
            "orientations": self.orientations,
            "block_norm": "L2-Hys",
            "resize": self.resize,  # to side x side (extract.images.fit_to_input), then grayscale
            "features_version": FEATURES_VERSION,
            "versions": package_versions("scikit-image", "opencv-python-headless", "numpy", "pillow"),
        }

    def prepare(self, image: np.ndarray) -> np.ndarray:
        crop = fit_to_input(image, self.side, resize=self.resize)
        gray = crop.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return hog(
            gray,
            orientations=self.orientations,
            pixels_per_cell=(self.cell, self.cell),
            cells_per_block=(self.cells_per_block, self.cells_per_block),
            block_norm="L2-Hys",
            feature_vector=True,
        ).astype(np.float32)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        return {"hog": np.stack(batch).astype(np.float32)}
