"""The simplest baselines: raw pixels and colour histograms."""

from __future__ import annotations

import cv2
import numpy as np

from extract import package_versions
from extract.images import fit_to_input

# Decoding (Pillow), resizing and colour conversion (OpenCV) compute these features.
VERSIONS = ("opencv-python-headless", "numpy", "pillow")
# Bump a baseline's version when a change to this code alters its numbers (CONTRIBUTING.md).
FEATURES_VERSION = {"raw": 1, "color": 1}


class RawPixels:
    """A grayscale thumbnail, ``side`` x ``side`` (32 by default), scaled to [0, 1]; made square as ``resize`` says."""

    batch_size = 256
    taps = ["raw"]

    def __init__(self, side: int = 32, *, resize: str = "centre"):
        self.name = "raw"
        self.side = side
        self.resize = resize
        self.min_side = side
        self.dims = {"raw": side * side}

    def fingerprint(self) -> dict:
        return {"baseline": "raw", "side": self.side, "resize": self.resize, "interpolation": "area/bicubic (OpenCV)", "gray": "ITU-R 601",
                "features_version": FEATURES_VERSION["raw"], "versions": package_versions(*VERSIONS)}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(fit_to_input(image, self.side, resize=self.resize), cv2.COLOR_RGB2GRAY)
        return (gray.astype(np.float32) / 255.0).ravel()

    def __call__(self, batch) -> dict[str, np.ndarray]:
        return {"raw": np.stack(batch)}


class ColorHistogram:
    """Joint HSV histogram, 16 hue x 4 saturation x 4 value bins (256), L1-normalised.

    Hue carries most of the colour identity (flowers, scenes), so it gets the finest bins.
    """

    batch_size = 256
    taps = ["hsv256"]
    bins = (16, 4, 4)
    side = 128

    def __init__(self, *, resize: str = "centre"):
        self.name = "color"
        self.resize = resize
        self.min_side = self.side
        self.dims = {"hsv256": int(np.prod(self.bins))}

    def fingerprint(self) -> dict:
        return {"baseline": "color", "space": "HSV", "bins": list(self.bins), "side": self.side, "resize": self.resize, "normalisation": "L1",
                "features_version": FEATURES_VERSION["color"], "versions": package_versions(*VERSIONS)}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(fit_to_input(image, self.side, resize=self.resize), cv2.COLOR_RGB2HSV)  # H in [0, 180)
        histogram = cv2.calcHist([hsv], [0, 1, 2], None, list(self.bins), [0, 180, 0, 256, 0, 256]).ravel()
        return (histogram / max(histogram.sum(), 1.0)).astype(np.float32)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        return {"hsv256": np.stack(batch)}
