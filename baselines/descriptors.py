"""Local descriptors: SIFT (OpenCV) on a dense multi-scale grid or at detected keypoints,
and SURF (mahotas) at detected keypoints or on a grid.

A :class:`DescriptorSpec` says how one image becomes one set of descriptors with their
positions; every encoder fed from the same spec gets the same arrays, so a run computes
each image's descriptors once (see ``baselines.local.SharedDescriptors``).

Dense SIFT follows PHOW (Bosch et al. 2007; VLFeat's ``vl_phow`` / ``vl_dsift``, the code
behind Chatfield et al. 2011): descriptors every ``step`` pixels at several spatial bin
sizes (4 x 4 bins per descriptor, so a bin size of 4 px is a 16 px patch), upright, on
the image smoothed by ``bin / 6`` px per scale. It is computed the way ``vl_dsift`` does
it, not keypoint by keypoint: 8 orientation planes of the gradient (linear in angle),
each filtered once with the bilinear bin kernel, then read at the 16 bin centres of
every grid point, weighted by a Gaussian window of 2 bins, L2-normalised, clipped at 0.2
and renormalised (Lowe 2004): faster than OpenCV's per-keypoint ``SIFT.compute`` on the same
grid (README > Baselines says by how much). Detected-keypoint SIFT is OpenCV's.
Descriptors are kept plain (SIFT); RootSIFT, where a paper used it, is the encoder's
choice (:func:`root_sift`), so one descriptor pass serves both kinds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import mahotas.features.surf as mahotas_surf
import numpy as np

from extract.errors import UserError

MIN_WORK_SIDE = 112
MAX_KEYPOINTS = 1000
KINDS = ("sift", "surf")


def gray_work_image(image: np.ndarray, side: int) -> np.ndarray:
    """Grayscale uint8, shorter side scaled into [MIN_WORK_SIDE, side] (aspect kept): photos
    come down to ``side``; tiny images (28 px Fashion-MNIST) go up to 112 px only."""
    height, width = image.shape[:2]
    scale = min(side, max(MIN_WORK_SIDE, min(height, width))) / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square root."""
    descriptors = np.asarray(descriptors, np.float32)
    return np.sqrt(descriptors / np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-12))


def dense_grid(height: int, width: int, *, step: int, margin: float) -> np.ndarray:
    """(y, x) centres every ``step`` px, at least ``margin`` px inside the image."""
    start = int(np.ceil(margin))
    ys = np.arange(start, max(start, height - start - 1) + 1, step)
    xs = np.arange(start, max(start, width - start - 1) + 1, step)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float32)


def _empty(width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, width), np.float32), np.zeros((0, 2), np.float32)


MAGNIF = 6.0  # vl_phow: smoothing sigma = bin size / magnif
WINDOW = 2.0  # Gaussian window, in bins (Lowe: half the descriptor width)
ORIENTATIONS = 8


def dense_sift(gray: np.ndarray, *, step: int, bin_size: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """SIFT descriptors (n, 128) on a grid every ``step`` px at one bin size, and their (y, x) centres."""
    image = gray.astype(np.float32) / 255.0
    sigma = np.sqrt(max((bin_size / MAGNIF) ** 2 - 0.25, 0.0))
    if sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    derivative = np.array([[-0.5, 0.0, 0.5]], np.float32)
    gx = cv2.filter2D(image, -1, derivative, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.filter2D(image, -1, derivative.T, borderType=cv2.BORDER_REPLICATE)
    magnitude, angle = cv2.cartToPolar(gx, gy)
    position = angle * (ORIENTATIONS / (2 * np.pi))  # in orientation bins, [0, 8)
    # Bilinear spatial binning: a triangle of half-width one bin, separable.
    triangle = (1.0 - np.abs(np.arange(-bin_size + 1, bin_size, dtype=np.float32)) / bin_size)
    centres = dense_grid(*image.shape, step=step, margin=margin).astype(np.int64)
    offsets = (np.arange(4) - 1.5) * bin_size
    oy, ox = np.meshgrid(np.round(offsets).astype(np.int64), np.round(offsets).astype(np.int64), indexing="ij")
    ys = centres[:, :1] + oy.ravel()[None]  # (n, 16)
    xs = centres[:, 1:] + ox.ravel()[None]
    window = np.exp(-0.5 * (((np.arange(4) - 1.5)[:, None] ** 2 + (np.arange(4) - 1.5)[None] ** 2) / WINDOW**2)).ravel().astype(np.float32)
    descriptors = np.empty((len(centres), 16, ORIENTATIONS), np.float32)
    for o in range(ORIENTATIONS):
        distance = np.abs(position - o)
        weight = np.maximum(0.0, 1.0 - np.minimum(distance, ORIENTATIONS - distance))
        plane = cv2.sepFilter2D(magnitude * weight, -1, triangle, triangle, borderType=cv2.BORDER_CONSTANT)
        descriptors[:, :, o] = plane[ys, xs] * window
    descriptors = descriptors.reshape(len(centres), 128)
    descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
    np.minimum(descriptors, 0.2, out=descriptors)
    descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
    return descriptors, centres.astype(np.float32)


def sift_descriptors(gray: np.ndarray, *, dense: bool, step: int = 8, bin_sizes=(4,)) -> tuple[np.ndarray, np.ndarray]:
    """(SIFT descriptors (n, 128), positions (n, 2) as (y, x) in [0, 1]).

    Dense: a grid every ``step`` px for each bin size (a descriptor spans 4 bins); the
    grid of the largest size sets the margin, so every scale covers the same centres.
    """
    height, width = gray.shape
    if dense:
        parts = [dense_sift(gray, step=step, bin_size=b, margin=2 * max(bin_sizes)) for b in bin_sizes]
        descriptors = np.concatenate([d for d, _ in parts])
        positions = np.concatenate([p for _, p in parts])
    else:
        keypoints, descriptors = cv2.SIFT_create(nfeatures=MAX_KEYPOINTS).detectAndCompute(gray, None)
        if descriptors is None or len(descriptors) == 0:
            return _empty(128)
        positions = np.array([(k.pt[1], k.pt[0]) for k in keypoints], np.float32)
    positions = positions / np.array([max(height - 1, 1), max(width - 1, 1)], np.float32)
    return descriptors.astype(np.float32), np.clip(positions, 0.0, 1.0)


def surf_descriptors(gray: np.ndarray, *, dense: bool, step: int = 8, bin_sizes=(4,)) -> tuple[np.ndarray, np.ndarray]:
    """(SURF descriptors (n, 64), positions (n, 2) as (y, x) in [0, 1]). A SURF window is
    20 scale units of 4x4 subregions, so bin size ``b`` is scale ``b / 5``."""
    image = gray.astype(np.float64)
    if dense:
        points = np.concatenate([mahotas_surf.dense(image, spacing=step, scale=b / 5.0, include_interest_point=True) for b in bin_sizes])
    else:
        points = mahotas_surf.surf(image, max_points=MAX_KEYPOINTS)
    if len(points) == 0:
        return _empty(64)
    positions = points[:, :2] / np.array(gray.shape[:2], dtype=np.float64)
    return points[:, 6:].astype(np.float32), np.clip(positions, 0.0, 1.0).astype(np.float32)


DESCRIBE = {"sift": sift_descriptors, "surf": surf_descriptors}


@dataclass(frozen=True)
class DescriptorSpec:
    """How an image becomes descriptors: kind, grid or detector, working side, grid step and scales."""

    kind: str = "sift"
    dense: bool = True
    side: int = 256
    step: int = 8
    bin_sizes: tuple[int, ...] = (4,)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"descriptor kind {self.kind!r} is not one of {KINDS}")
        if self.step < 1 or not self.bin_sizes or min(self.bin_sizes) < 1:
            raise UserError(f"a dense grid needs step >= 1 and bin sizes >= 1. Received: step={self.step}, bin_sizes={self.bin_sizes}")

    @property
    def width(self) -> int:
        return 128 if self.kind == "sift" else 64

    def settings(self) -> dict:
        settings = asdict(self)
        settings["bin_sizes"] = list(self.bin_sizes)
        if not self.dense:  # the grid does not apply to detected keypoints
            settings.update(step=None, bin_sizes=None, max_keypoints=MAX_KEYPOINTS)
        return settings

    def describe(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors (n, width) float32, positions (n, 2) (y, x) in [0, 1]) of an RGB image."""
        gray = gray_work_image(image, self.side)
        return DESCRIBE[self.kind](gray, dense=self.dense, step=self.step, bin_sizes=self.bin_sizes)
