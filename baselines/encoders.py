"""Encoders of local descriptors, with scikit-learn's estimator contract.

``fit(X)`` learns the codebook from descriptors and returns self; ``transform(X)`` turns
images' descriptors into one row per image; fitted attributes end in ``_``. ``X`` is
either a list of images, each ``(descriptors (n, d), positions (n, 2))`` or just the
descriptors (positions then default to the image centre), or a 2-D array, read as one
image per row holding that one descriptor. ``fit`` pools the descriptors of all images.

Spatial layouts are lists of grids ``(rows, cols)``; a descriptor at (y, x) in [0, 1]
falls in one cell of each grid.

- :class:`BagOfWords`: hard-assignment histograms over a k-means vocabulary, and the
  spatial pyramid of Lazebnik et al. (CVPR 2006): levels 1x1, 2x2, 4x4, each cell's
  counts divided by the image's descriptor count, level ``l`` of top level ``L`` weighted
  ``1 / 2^(L - l + 1)`` (``1 / 2^L`` for level 0: 1/4, 1/4, 1/2 for L = 2), so that a
  histogram intersection of two such vectors is their pyramid match kernel.
- :class:`VLAD`: Jegou et al. 2010, intra-normalised (Arandjelovic & Zisserman 2013),
  then signed square root and L2.
- :class:`FisherVector`: improved Fisher vectors (Perronnin et al. 2010) over a
  diagonal GMM of PCA-reduced descriptors, first and second order, signed square root
  and L2 per spatial cell, as in Chatfield et al. (BMVC 2011); the cells' vectors are
  concatenated and scaled so the whole has unit norm.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from extract.arguments import POSITIVE, SEEDS, Several, check_params, whole
from extract.errors import UserError

CENTRE = np.array([[0.5, 0.5]], np.float32)


def as_images(X) -> list[tuple[np.ndarray, np.ndarray]]:
    """``X`` as a list of (descriptors float32 (n, d), positions (n, 2)); see the module doc."""
    if isinstance(X, (list, tuple)) and not (len(X) and not isinstance(X[0], tuple) and np.ndim(X[0]) == 1):
        images = []
        for item in X:
            descriptors, positions = item if isinstance(item, tuple) else (item, None)
            descriptors = np.asarray(descriptors, np.float32)
            if descriptors.ndim != 2:
                raise UserError(f"each image's descriptors must be 2-D (n, d). Received shape {descriptors.shape}")
            if positions is None:
                positions = np.repeat(CENTRE, len(descriptors), axis=0)
            images.append((descriptors, np.asarray(positions, np.float32)))
        return images
    X = check_array(X, dtype=np.float32)
    return [(row[None], CENTRE) for row in X]


def stacked(images) -> np.ndarray:
    return np.concatenate([d for d, _ in images]) if images else np.zeros((0, 0), np.float32)


def cell_index(positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The cell of ``grid`` (rows, cols) each (y, x) position falls in, row-major."""
    rows, cols = grid
    r = np.minimum((positions[:, 0] * rows).astype(np.int64), rows - 1)
    c = np.minimum((positions[:, 1] * cols).astype(np.int64), cols - 1)
    return r * cols + c


def nearest(descriptors: np.ndarray, centers: np.ndarray, center_norms: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each descriptor (squared Euclidean), by one matrix product."""
    return np.argmax(descriptors @ centers.T - 0.5 * center_norms, axis=1)


def _is_images(X) -> bool:
    return isinstance(X, (list, tuple)) and not (len(X) and not isinstance(X[0], tuple) and np.ndim(X[0]) == 1)


class _Encoder(TransformerMixin, BaseEstimator):
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]  # codes are float32 whatever the input
        return tags

    def _fit_input(self, X) -> np.ndarray:
        check_params(type(self).__name__, self.get_params(deep=False), self._parameter_ranges)
        if _is_images(X):
            descriptors = stacked(as_images(X))
            self.n_features_in_ = descriptors.shape[1]
        else:
            descriptors = validate_data(self, X, dtype=np.float32)
        if len(descriptors) < 2:
            raise UserError(f"{type(self).__name__} needs at least 2 descriptors to fit. Received {len(descriptors)}")
        return descriptors

    def _images(self, X):
        check_is_fitted(self)
        if not _is_images(X):
            X = validate_data(self, X, dtype=np.float32, reset=False)
        images = as_images(X)
        for descriptors, _ in images:
            if len(descriptors) and descriptors.shape[1] != self.n_features_in_:
                raise UserError(f"descriptors of width {descriptors.shape[1]}; {type(self).__name__} was fitted on width {self.n_features_in_}")
        return images

    def transform(self, X) -> np.ndarray:
        images = self._images(X)
        return np.stack([self.encode(d, p) for d, p in images]) if images else np.zeros((0, self.dim), np.float32)


def _kmeans(n_clusters: int, descriptors: np.ndarray, seed: int, *, max_iter: int = 20) -> np.ndarray:
    """Lloyd's k-means from ``n_clusters`` distinct descriptors chosen at random (seeded).

    Random-selection start, as VLFeat's ``vl_kmeans`` offers: scikit-learn's k-means++ start
    took many times as long as the 20 Lloyd iterations on 100,000 SIFT-like descriptors."""
    from sklearn.cluster import KMeans

    k = min(n_clusters, len(descriptors))
    start = descriptors[np.sort(np.random.default_rng(seed).choice(len(descriptors), k, replace=False))]
    centers = KMeans(k, init=start, n_init=1, max_iter=max_iter, random_state=seed).fit(descriptors).cluster_centers_
    if k < n_clusters:  # fewer descriptors than words (tiny tests): unreachable extra words
        centers = np.concatenate([centers, np.full((n_clusters - k, centers.shape[1]), 1e6, centers.dtype)])
    return centers.astype(np.float32)


class _Vocabulary(_Encoder):
    """An encoder over ``n_words`` k-means centres of the training descriptors."""

    def fit(self, X, y=None):
        self.cluster_centers_ = _kmeans(self.n_words, self._fit_input(X), self.seed)
        self.center_norms_ = (self.cluster_centers_**2).sum(axis=1)
        return self


class BagOfWords(_Vocabulary):
    """Visual-word histograms over a k-means vocabulary of ``n_words``, in a spatial pyramid of ``levels`` levels.

    ``levels=1``: one L1-normalised histogram; ``levels=3``: 1x1 + 2x2 + 4x4 cells (21
    histograms) weighted as Lazebnik et al. 2006. An image without descriptors gets zeros.
    """

    _parameter_ranges = {"n_words": POSITIVE, "levels": POSITIVE, "seed": SEEDS}

    def __init__(self, n_words: int = 1000, *, levels: int = 1, seed: int = 0):
        self.n_words = n_words
        self.levels = levels
        self.seed = seed

    @property
    def dim(self) -> int:
        return self.n_words * sum(4**level for level in range(self.levels))

    def level_weights(self) -> list[float]:
        top = self.levels - 1
        return [1.0 / 2**top if level == 0 else 1.0 / 2 ** (top - level + 1) for level in range(self.levels)]

    def encode(self, descriptors: np.ndarray, positions: np.ndarray) -> np.ndarray:
        parts = []
        words = nearest(descriptors, self.cluster_centers_, self.center_norms_) if len(descriptors) else np.zeros(0, np.int64)
        for level, weight in enumerate(self.level_weights()):
            side = 2**level
            cells = cell_index(positions, (side, side)) if len(descriptors) else words
            counts = np.bincount(cells * self.n_words + words, minlength=side * side * self.n_words).astype(np.float32)
            parts.append(weight * counts / max(len(descriptors), 1))
        return np.concatenate(parts)


class VLAD(_Vocabulary):
    """VLAD over ``n_words`` k-means centres: per-word residual sums, intra-normalised, signed sqrt, L2."""

    _parameter_ranges = {"n_words": POSITIVE, "seed": SEEDS}

    def __init__(self, n_words: int = 64, *, seed: int = 0):
        self.n_words = n_words
        self.seed = seed

    @property
    def dim(self) -> int:
        return self.n_words * self.n_features_in_

    def encode(self, descriptors: np.ndarray, positions: np.ndarray) -> np.ndarray:
        centers = self.cluster_centers_
        vlad = np.zeros_like(centers)
        if len(descriptors):
            words = nearest(descriptors, centers, self.center_norms_)
            order = np.argsort(words, kind="stable")
            present, starts = np.unique(words[order], return_index=True)
            sums = np.add.reduceat(descriptors[order], starts, axis=0)
            vlad[present] = sums - np.bincount(words, minlength=len(centers))[present, None] * centers[present]
            vlad /= np.maximum(np.linalg.norm(vlad, axis=1, keepdims=True), 1e-12)
        vlad = np.sign(vlad) * np.sqrt(np.abs(vlad))
        return (vlad / max(float(np.linalg.norm(vlad)), 1e-12)).ravel().astype(np.float32)


class FisherVector(_Encoder):
    """Improved Fisher vectors: PCA to ``pca_dim`` (whitened), a diagonal GMM of ``n_modes``,
    gradients with respect to means and variances, per cell of each grid in ``layout``.

    ``layout=((1, 1), (3, 1))`` is Chatfield et al.'s 1x1 + 3 horizontal stripes:
    ``n_modes * 2 * pca_dim * 4`` values. The GMM is fitted by EM (``max_iter``) on up to
    ``gmm_descriptors`` of the descriptors, started from k-means.
    """

    _parameter_ranges = {"n_modes": POSITIVE, "pca_dim": POSITIVE, "layout": Several(Several(POSITIVE, 2, 2)), "max_iter": POSITIVE,
                         "gmm_descriptors": whole(2), "seed": SEEDS}

    def __init__(self, n_modes: int = 16, *, pca_dim: int = 64, layout=((1, 1),), max_iter: int = 20, gmm_descriptors: int = 50_000, seed: int = 0):
        self.n_modes = n_modes
        self.pca_dim = pca_dim
        self.layout = layout
        self.max_iter = max_iter
        self.gmm_descriptors = gmm_descriptors
        self.seed = seed

    def fit(self, X, y=None):
        descriptors = self._fit_input(X)
        self.pca_ = PCA(min(self.pca_dim, *descriptors.shape), whiten=True, random_state=self.seed).fit(descriptors)
        reduced = self.pca_.transform(descriptors)
        if len(reduced) > self.gmm_descriptors:  # EM costs n x modes x dims per iteration
            reduced = reduced[np.sort(np.random.default_rng(self.seed).choice(len(reduced), self.gmm_descriptors, replace=False))]
        # Started from k-means, as VLFeat's vl_gmm can be (scikit-learn's k-means++ start alone was slow: README > Baselines).
        modes = min(self.n_modes, len(reduced))
        means = _kmeans(modes, reduced, self.seed, max_iter=10)
        assignment = nearest(reduced, means, (means**2).sum(axis=1))
        counts = np.bincount(assignment, minlength=modes).astype(np.float64)
        sums = np.zeros_like(means, dtype=np.float64)
        np.add.at(sums, assignment, reduced.astype(np.float64) ** 2)
        variances = np.where(counts[:, None] > 1, sums / np.maximum(counts[:, None], 1) - means.astype(np.float64) ** 2, 1.0)
        gmm = GaussianMixture(modes, covariance_type="diag", init_params="random_from_data", means_init=means,
                              weights_init=np.maximum(counts, 1) / np.maximum(counts, 1).sum(),
                              precisions_init=1.0 / np.maximum(variances, 1e-4), max_iter=self.max_iter,
                              reg_covar=1e-4, random_state=self.seed)
        with warnings.catch_warnings():  # EM stops at max_iter by design, converged or not
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm.fit(reduced)
        self.means_ = gmm.means_.astype(np.float32)
        self.variances_ = gmm.covariances_.astype(np.float32)
        self.weights_ = gmm.weights_.astype(np.float32)
        self.n_iter_ = gmm.n_iter_
        return self

    @property
    def n_cells(self) -> int:
        return sum(rows * cols for rows, cols in self.layout)

    @property
    def dim(self) -> int:
        return self.n_cells * 2 * self.means_.size

    def posteriors(self, reduced: np.ndarray) -> np.ndarray:
        """(n, K) soft assignments of PCA-reduced descriptors to the GMM's modes."""
        precisions = 1.0 / self.variances_
        log_likelihood = (-0.5 * ((reduced**2) @ precisions.T - 2.0 * reduced @ (self.means_ * precisions).T
                                  + (self.means_**2 * precisions).sum(axis=1))
                          - 0.5 * np.log(self.variances_).sum(axis=1) + np.log(self.weights_))
        log_likelihood -= log_likelihood.max(axis=1, keepdims=True)
        q = np.exp(log_likelihood)
        return q / q.sum(axis=1, keepdims=True)

    def _fisher(self, x: np.ndarray, q: np.ndarray) -> np.ndarray:
        size = self.means_.size
        if len(x) == 0:
            return np.zeros(2 * size, np.float32)
        n = float(len(x))
        sigma = np.sqrt(self.variances_)
        q_sum = q.sum(axis=0)[:, None]
        qx, qxx = q.T @ x, q.T @ (x * x)
        first = (qx - q_sum * self.means_) / (sigma * n * np.sqrt(self.weights_)[:, None])
        second = ((qxx - 2.0 * self.means_ * qx + q_sum * self.means_**2) / self.variances_ - q_sum) / (n * np.sqrt(2.0 * self.weights_)[:, None])
        fv = np.concatenate([first.ravel(), second.ravel()])
        fv = np.sign(fv) * np.sqrt(np.abs(fv))
        return fv / max(float(np.linalg.norm(fv)), 1e-12)

    def encode(self, descriptors: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if len(descriptors) == 0:
            return np.zeros(self.dim, np.float32)
        x = self.pca_.transform(descriptors).astype(np.float32)
        q = self.posteriors(x)
        parts = []
        for grid in self.layout:
            cells = cell_index(positions, tuple(grid))
            parts += [self._fisher(x[cells == c], q[cells == c]) for c in range(grid[0] * grid[1])]
        return (np.concatenate(parts) / np.sqrt(self.n_cells)).astype(np.float32)


def chi2_map(features: np.ndarray, *, sample_steps: int = 2) -> np.ndarray:
    """Explicit feature map of the additive chi-squared kernel (Vedaldi & Zisserman 2012),
    scikit-learn's ``AdditiveChi2Sampler``: a linear model on it acts like a chi2-kernel SVM.
    Stateless: each row is mapped on its own. ``2 * sample_steps - 1`` values per input."""
    from sklearn.kernel_approximation import AdditiveChi2Sampler

    return AdditiveChi2Sampler(sample_steps=sample_steps).fit_transform(np.atleast_2d(features)).astype(np.float32)
