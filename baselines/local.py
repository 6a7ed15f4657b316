"""Local descriptors (SURF from mahotas, SIFT from OpenCV) and their encodings:
bag of visual words (with an optional 1x1 + 2x2 spatial pyramid), VLAD and Fisher vectors.

Encoders are scikit-learn style: ``fit`` learns the codebook from training descriptors
only and returns self; ``transform`` refuses to run unfitted. A featurizer first fits
its encoder on a seeded sample of training-split images (``fit_dataset``), saves the
codebook beside the store, and reuses it on the next run when its settings match.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import cv2
import mahotas
import mahotas.features.surf as mahotas_surf
import numpy as np
import sklearn
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.utils.validation import check_is_fitted
from skimage.feature import fisher_vector, learn_gmm

from extract.datasets import ImageDataset
from extract.datasets.base import TRAIN_SPLIT
from extract.images import fit_to_input

log = logging.getLogger(__name__)

# Descriptors are computed on the image scaled so its shorter side is in [MIN, MAX]:
# photos come down to 256 px; tiny images (28 px Fashion-MNIST) go up to 112 px only.
WORK_SIDE = 256
MIN_WORK_SIDE = 112
DENSE_STEP = 8
DENSE_SIZE = 16
MAX_KEYPOINTS = 1000
CODEBOOK_IMAGES = 400
CODEBOOK_DESCRIPTORS = 100_000


def _gray_work_image(image: np.ndarray) -> np.ndarray:
    """Grayscale, shorter side clamped to [MIN_WORK_SIDE, WORK_SIDE] (aspect kept), uint8."""
    height, width = image.shape[:2]
    scale = min(WORK_SIDE, max(MIN_WORK_SIDE, min(height, width))) / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)


def surf_descriptors(gray: np.ndarray, *, dense: bool) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors (n, 64), positions (n, 2) as (y, x) in [0, 1])."""
    image = gray.astype(np.float64)
    if dense:
        points = mahotas_surf.dense(image, spacing=DENSE_STEP, scale=DENSE_SIZE / 8.0, include_interest_point=True)
    else:
        points = mahotas_surf.surf(image, max_points=MAX_KEYPOINTS)
    if len(points) == 0:
        return np.zeros((0, 64), np.float32), np.zeros((0, 2), np.float32)
    positions = points[:, :2] / np.array(gray.shape[:2], dtype=np.float64)
    return points[:, 6:].astype(np.float32), positions.astype(np.float32)


def sift_descriptors(gray: np.ndarray, *, dense: bool) -> tuple[np.ndarray, np.ndarray]:
    """(RootSIFT descriptors (n, 128), positions (n, 2) as (y, x) in [0, 1])."""
    sift = cv2.SIFT_create(nfeatures=MAX_KEYPOINTS)
    if dense:
        height, width = gray.shape
        keypoints = [cv2.KeyPoint(float(x), float(y), DENSE_SIZE)
                     for y in range(DENSE_SIZE // 2, height - DENSE_SIZE // 2 + 1, DENSE_STEP)
                     for x in range(DENSE_SIZE // 2, width - DENSE_SIZE // 2 + 1, DENSE_STEP)]
        keypoints, descriptors = sift.compute(gray, keypoints)
    else:
        keypoints, descriptors = sift.detectAndCompute(gray, None)
    if descriptors is None or len(descriptors) == 0:
        return np.zeros((0, 128), np.float32), np.zeros((0, 2), np.float32)
    # RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square root.
    descriptors = np.sqrt(descriptors / np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-12))
    positions = np.array([(k.pt[1], k.pt[0]) for k in keypoints], np.float32) / np.array(gray.shape, np.float32)
    return descriptors.astype(np.float32), positions


DESCRIPTORS = {"surf": surf_descriptors, "sift": sift_descriptors}


def pyramid_cells(positions: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 1x1 + 2x2 spatial pyramid cells (Lazebnik et al. 2006)."""
    cells = [np.ones(len(positions), bool)]
    for row in range(2):
        for col in range(2):
            cells.append((np.minimum(positions[:, 0] * 2, 1.999).astype(int) == row) & (np.minimum(positions[:, 1] * 2, 1.999).astype(int) == col))
    return cells


class BagOfWords(TransformerMixin, BaseEstimator):
    """Hard-assignment visual-word histograms, L1-normalised (term frequencies)."""

    def __init__(self, n_words: int = 1000, *, seed: int = 0):
        self.n_words = n_words
        self.seed = seed

    def fit(self, descriptors, y=None):
        descriptors = np.asarray(descriptors, np.float32)
        k = min(self.n_words, len(descriptors))
        self.kmeans_ = MiniBatchKMeans(k, random_state=self.seed, batch_size=4096, n_init=3).fit(descriptors)
        return self

    def histogram(self, descriptors) -> np.ndarray:
        check_is_fitted(self, "kmeans_")
        counts = np.zeros(self.n_words, np.float32)
        if len(descriptors):
            np.add.at(counts, self.kmeans_.predict(np.asarray(descriptors, np.float32)), 1.0)
            counts /= counts.sum()
        return counts

    def transform(self, descriptors) -> np.ndarray:
        return self.histogram(descriptors)[None]


class VLAD(TransformerMixin, BaseEstimator):
    """Vector of locally aggregated descriptors (Jegou et al. 2010): per-word residual sums,
    intra-normalised, then signed square root and L2 (Arandjelovic & Zisserman 2013)."""

    def __init__(self, n_words: int = 64, *, seed: int = 0):
        self.n_words = n_words
        self.seed = seed

    def fit(self, descriptors, y=None):
        self.kmeans_ = MiniBatchKMeans(self.n_words, random_state=self.seed, batch_size=4096, n_init=3).fit(np.asarray(descriptors, np.float32))
        return self

    def encode(self, descriptors) -> np.ndarray:
        check_is_fitted(self, "kmeans_")
        centers = self.kmeans_.cluster_centers_
        vlad = np.zeros_like(centers, dtype=np.float32)
        if len(descriptors):
            words = self.kmeans_.predict(np.asarray(descriptors, np.float32))
            np.add.at(vlad, words, descriptors - centers[words])
            vlad /= np.maximum(np.linalg.norm(vlad, axis=1, keepdims=True), 1e-12)
        vlad = np.sign(vlad) * np.sqrt(np.abs(vlad))
        return (vlad / max(np.linalg.norm(vlad), 1e-12)).ravel().astype(np.float32)

    def transform(self, descriptors) -> np.ndarray:
        return self.encode(descriptors)[None]


class FisherVector(TransformerMixin, BaseEstimator):
    """Improved Fisher vectors (Perronnin et al. 2010) of PCA-reduced descriptors, with
    scikit-image's ``fisher_vector`` over a diagonal GMM learned on training descriptors."""

    def __init__(self, n_modes: int = 16, *, pca_dim: int = 64, seed: int = 0):
        self.n_modes = n_modes
        self.pca_dim = pca_dim
        self.seed = seed

    def fit(self, descriptors, y=None):
        descriptors = np.asarray(descriptors, np.float32)
        self.pca_ = PCA(min(self.pca_dim, descriptors.shape[1]), whiten=True, random_state=self.seed).fit(descriptors)
        reduced = self.pca_.transform(descriptors).astype(np.float64)
        self.gmm_ = learn_gmm(reduced, n_modes=self.n_modes, gm_args={"covariance_type": "diag", "random_state": self.seed, "max_iter": 100})
        return self

    @property
    def dim(self) -> int:
        return self.n_modes * (2 * self.pca_.n_components_ + 1)

    def encode(self, descriptors) -> np.ndarray:
        check_is_fitted(self, "gmm_")
        if len(descriptors) == 0:
            return np.zeros(self.dim, np.float32)
        reduced = self.pca_.transform(np.asarray(descriptors, np.float32)).astype(np.float64)
        return fisher_vector(reduced, self.gmm_, improved=True).astype(np.float32)

    def transform(self, descriptors) -> np.ndarray:
        return self.encode(descriptors)[None]


def training_descriptors(dataset: ImageDataset, describe, *, seed: int) -> np.ndarray:
    """Descriptors of a seeded sample of training-split images only, capped in number."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(np.asarray(dataset.splits) == TRAIN_SPLIT)
    if len(candidates) == 0:
        raise ValueError(f"{dataset.name} has no {TRAIN_SPLIT!r} split to learn a codebook from")
    chosen = rng.permutation(candidates)[:CODEBOOK_IMAGES]
    per_image = max(1, CODEBOOK_DESCRIPTORS // len(chosen))
    parts = []
    for row in chosen:
        descriptors, _ = describe(_gray_work_image(dataset.read(int(row), min_side=WORK_SIDE)))
        if len(descriptors) > per_image:
            descriptors = descriptors[rng.choice(len(descriptors), per_image, replace=False)]
        parts.append(descriptors)
    stacked = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    if len(stacked) < 2:
        raise ValueError(f"{dataset.name}: too few descriptors in the training images to learn a codebook")
    return stacked


def array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class LocalFeaturizer:
    """SURF or SIFT descriptors, detected or on a dense grid, encoded as BoW (+ pyramid), VLAD or Fisher.

    Layers: ``bow{k}`` and ``bow{k}_spm`` for ``encoding="bow"``, ``vlad{k}``, or ``fv{k}``.
    Stats: ``n_descriptors`` per image; an image without any gets all-zero features.
    """

    batch_size = 64
    stats = ["n_descriptors"]
    min_side = WORK_SIDE

    def __init__(self, descriptor: str, encoding: str, *, words: int | None = None, dense: bool = False, seed: int = 0):
        if descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor={descriptor!r} is not one of {sorted(DESCRIPTORS)}")
        defaults = {"bow": 1000, "vlad": 64, "fisher": 16}
        if encoding not in defaults:
            raise ValueError(f"encoding={encoding!r} is not one of {sorted(defaults)}")
        self.descriptor, self.encoding, self.dense, self.seed = descriptor, encoding, dense, seed
        self.words = words or defaults[encoding]
        suffix = "_dense" if dense else ""
        self.name = f"{descriptor}_{'bow' if encoding == 'bow' else encoding}{suffix}"
        prefix = {"bow": "bow", "vlad": "vlad", "fisher": "fv"}[encoding]
        self.taps = [f"{prefix}{self.words}", f"{prefix}{self.words}_spm"] if encoding == "bow" else [f"{prefix}{self.words}"]
        self.encoder = None
        self.codebook_sha256 = None

    def describe(self, gray: np.ndarray):
        return DESCRIPTORS[self.descriptor](gray, dense=self.dense)

    def settings(self) -> dict:
        return {"baseline": self.name, "descriptor": self.descriptor, "dense": self.dense, "encoding": self.encoding,
                "words": self.words, "work_side": [MIN_WORK_SIDE, WORK_SIDE], "seed": self.seed,
                "dense_grid": {"step": DENSE_STEP, "size": DENSE_SIZE} if self.dense else None,
                "codebook_sample": {"images": CODEBOOK_IMAGES, "descriptors": CODEBOOK_DESCRIPTORS, "split": TRAIN_SPLIT}}

    def fit_dataset(self, dataset: ImageDataset, codebook_path: Path) -> None:
        """Learn the codebook on training images, or reuse the saved one made with the same settings."""
        settings = {**self.settings(), "train_images": dataset.digest()}
        make = {"bow": BagOfWords, "vlad": VLAD, "fisher": FisherVector}[self.encoding]
        if codebook_path.is_file():
            with np.load(codebook_path, allow_pickle=False) as saved:
                if json.loads(str(saved["settings"])) == settings:
                    self.encoder = self._restore(make, saved)
                    self.codebook_sha256 = str(saved["sha256"])
                    log.info("reusing codebook %s", codebook_path)
                    return
        log.info("learning the %s codebook (%d words) on training images of %s", self.name, self.words, dataset.name)
        self.encoder = make(self.words, seed=self.seed).fit(training_descriptors(dataset, self.describe, seed=self.seed))
        arrays = self._arrays()
        self.codebook_sha256 = array_digest(*arrays.values())
        codebook_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(codebook_path, settings=json.dumps(settings, sort_keys=True), sha256=self.codebook_sha256, **arrays)

    def _arrays(self) -> dict[str, np.ndarray]:
        if self.encoding == "fisher":
            gmm = self.encoder.gmm_
            return {"pca_components": self.encoder.pca_.components_, "pca_mean": self.encoder.pca_.mean_,
                    "pca_variance": self.encoder.pca_.explained_variance_, "means": gmm.means_,
                    "covariances": gmm.covariances_, "weights": gmm.weights_}
        return {"centers": self.encoder.kmeans_.cluster_centers_}

    def _restore(self, make, saved):
        encoder = make(self.words, seed=self.seed)
        if self.encoding == "fisher":
            from sklearn.mixture import GaussianMixture

            encoder.pca_ = PCA(saved["pca_components"].shape[0], whiten=True)
            encoder.pca_.components_, encoder.pca_.mean_ = saved["pca_components"], saved["pca_mean"]
            encoder.pca_.explained_variance_ = saved["pca_variance"]
            encoder.pca_.n_components_ = saved["pca_components"].shape[0]
            gmm = GaussianMixture(len(saved["weights"]), covariance_type="diag")
            gmm.means_, gmm.covariances_, gmm.weights_ = saved["means"], saved["covariances"], saved["weights"]
            gmm.precisions_cholesky_ = 1.0 / np.sqrt(saved["covariances"])
            encoder.gmm_ = gmm
        else:
            kmeans = MiniBatchKMeans(len(saved["centers"]))
            kmeans.cluster_centers_ = saved["centers"]
            kmeans._n_threads = 1  # set by fit in scikit-learn; predict needs it on a restored model
            encoder.kmeans_ = kmeans
        return encoder

    def fingerprint(self) -> dict:
        if self.codebook_sha256 is None:
            raise RuntimeError(f"{self.name}: fit_dataset must run before extraction")
        return {**self.settings(), "codebook_sha256": self.codebook_sha256,
                "versions": {"opencv": cv2.__version__, "mahotas": mahotas.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}}

    def prepare(self, image: np.ndarray) -> dict[str, np.ndarray]:
        descriptors, positions = self.describe(_gray_work_image(image))
        if self.encoding == "bow":
            cells = [self.encoder.histogram(descriptors[mask]) for mask in pyramid_cells(positions)]
            # Pyramid levels weighted as Lazebnik et al.: 1/2 for 1x1 and 2x2 alike at L=1.
            spm = np.concatenate([0.5 * cells[0], *(0.5 * c for c in cells[1:])])
            features = {self.taps[0]: cells[0], self.taps[1]: spm}
        else:
            features = {self.taps[0]: self.encoder.encode(descriptors)}
        return {**features, "n_descriptors": np.float32(len(descriptors))}

    def __call__(self, batch: list[dict]) -> dict[str, np.ndarray]:
        return {key: np.stack([item[key] for item in batch]).astype(np.float32) for key in (*self.taps, *self.stats)}
