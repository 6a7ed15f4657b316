"""Local-descriptor baselines: one featurizer (one store) per encoding, descriptors shared.

A :class:`LocalFeaturizer` pairs a :class:`~baselines.descriptors.DescriptorSpec` with an
encoder of ``baselines.encoders``. Its codebook is learned on a seeded sample of one
declared split's images only (``train``; ``amazon`` on Office, where domains are the
splits), saved beside the store (``*.codebook.npz``, written atomically) and reused when
its settings match; a corrupt codebook file is reported and relearned.

:class:`SharedDescriptors` is the one ``prepare`` of a group of featurizers: each image's
descriptors are computed once per spec and handed to every encoder that uses them (see
``extract.pipeline.extract_group``). :func:`fit_codebooks` likewise describes the
codebook sample once for every encoder of the group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from baselines.descriptors import DescriptorSpec, root_sift
from baselines.encoders import VLAD, BagOfWords, FisherVector, chi2_map
from extract import package_versions
from extract.datasets import ImageDataset
from extract.datasets.base import TRAIN_SPLIT
from extract.errors import UserError
from extract.images import ImageDecodeError
from extract.pipeline import ImageMapper
from extract.fileio import ArrayFileError, read_arrays, save_arrays

log = logging.getLogger(__name__)

CODEBOOK_IMAGES = 400
CODEBOOK_DESCRIPTORS = 100_000
# Office-31 / Office-Caltech: no train split; Saenko et al. 2010 built their SURF codebook on amazon.
FALLBACK_CODEBOOK_SPLIT = "amazon"
ENCODINGS = ("bow", "vlad", "fisher")
FEATURE_PACKAGES = ("opencv-python-headless", "mahotas", "scikit-learn", "numpy", "pillow")
# Bump a descriptor's or an encoding's version when a change to this code alters its numbers (CONTRIBUTING.md):
# the stores and codebooks made before it are then refused and relearned, and no others.
DESCRIPTOR_VERSIONS = {"sift": 1, "surf": 1}
ENCODING_VERSIONS = {"bow": 1, "vlad": 1, "fisher": 1}
PYRAMID_NAMES = {1: "", 2: "_spm2", 3: "_spm"}


def codebook_split(dataset: ImageDataset, split: str | None = None) -> str:
    """The split codebooks are learned on: ``split``, else ``train``, else ``amazon``."""
    present = sorted(set(dataset.splits))
    if split is None:
        split = TRAIN_SPLIT if TRAIN_SPLIT in present else FALLBACK_CODEBOOK_SPLIT
    if split not in present:
        raise UserError(f"{dataset.name} has no {split!r} split to learn codebooks from; its splits: {', '.join(present)}. "
                         f"Choose one with --codebook-split (CODEBOOK_SPLIT=)")
    return split


def array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class LocalFeaturizer:
    """Descriptors of ``spec`` encoded by ``encoding``: ``bow``, ``vlad`` or ``fisher``.

    Layers (``k`` words or modes): ``bow{k}`` (one histogram), ``bow{k}_spm`` (3-level
    pyramid; ``_spm2`` for 1x1 + 2x2) and, with ``chi2``, ``bow{k}_spm_chi2`` (the
    pyramid through the chi2 kernel map; the plain one stays for comparison);
    ``vlad{k}``; ``fv{k}`` (``fv{k}_sp`` with a spatial layout). ``root``: RootSIFT before
    encoding. Stats: ``n_descriptors`` per image; an image without any gets zeros. ``words_given``:
    the codebook size was chosen (``--words``), not the preset's: more words than the codebook
    sample has descriptors is then refused, where a preset's are padded with unreachable words.
    """

    batch_size = 64
    stats = ["n_descriptors"]

    def __init__(self, name: str, spec: DescriptorSpec, encoding: str, *, words: int, levels: int = 1, chi2: bool = False,
                 root: bool = False, pca_dim: int = 64, layout=((1, 1),), preset: str = "custom", seed: int = 0,
                 split: str = TRAIN_SPLIT, codebook_images: int = CODEBOOK_IMAGES, codebook_descriptors: int = CODEBOOK_DESCRIPTORS,
                 words_given: bool = False):
        if encoding not in ENCODINGS:
            raise UserError(f"encoding={encoding!r} is not one of {ENCODINGS}")
        if encoding == "bow" and levels not in PYRAMID_NAMES:
            raise UserError(f"a pyramid of 1, 2 or 3 levels. Received levels={levels}")
        self.name, self.spec, self.encoding = name, spec, encoding
        self.words, self.levels, self.chi2, self.root = int(words), int(levels), bool(chi2), bool(root)
        self.pca_dim, self.layout = int(pca_dim), tuple(tuple(int(v) for v in grid) for grid in layout)
        self.preset, self.seed, self.split, self.words_given = preset, seed, split, words_given
        self.codebook_images, self.codebook_descriptors = codebook_images, codebook_descriptors
        self.min_side = spec.side
        if encoding == "bow":
            self.taps = [f"bow{self.words}"]
            if self.levels > 1:
                self.taps.append(f"bow{self.words}{PYRAMID_NAMES[self.levels]}")
                if self.chi2:
                    self.taps.append(f"bow{self.words}{PYRAMID_NAMES[self.levels]}_chi2")
        elif encoding == "vlad":
            self.taps = [f"vlad{self.words}"]
        else:
            self.taps = [f"fv{self.words}" + ("_sp" if self.layout != ((1, 1),) else "")]
        self.encoder = None
        self.codebook_sha256 = None

    # -- settings --------------------------------------------------------------------------
    def make_encoder(self):
        if self.encoding == "bow":
            return BagOfWords(self.words, levels=self.levels, seed=self.seed)
        if self.encoding == "vlad":
            return VLAD(self.words, seed=self.seed)
        return FisherVector(self.words, pca_dim=self.pca_dim, layout=self.layout, seed=self.seed)

    def settings(self) -> dict:
        """Everything that determines the codebook and the features, with its preset."""
        encoder = {"type": type(self.make_encoder()).__name__, **self.make_encoder().get_params()}
        encoder["layout"] = [list(g) for g in self.layout] if self.encoding == "fisher" else None
        return {"baseline": self.name, "preset": self.preset, "descriptor": self.spec.settings(),
                "features_version": {"descriptor": DESCRIPTOR_VERSIONS[self.spec.kind], "encoding": ENCODING_VERSIONS[self.encoding]},
                "root_sift": self.root, "encoding": self.encoding, "encoder": encoder,
                "kernel_map": {"chi2": "AdditiveChi2Sampler(sample_steps=2)"} if self.chi2 else None, "seed": self.seed,
                "codebook_sample": {"split": self.split, "images": self.codebook_images, "descriptors": self.codebook_descriptors}}

    def fingerprint(self) -> dict:
        if self.codebook_sha256 is None:
            raise RuntimeError(f"{self.name}: the codebook must be fitted (fit_codebooks or fit_dataset) before extraction")
        return {**self.settings(), "codebook_sha256": self.codebook_sha256, "versions": package_versions(*FEATURE_PACKAGES)}

    # -- codebook --------------------------------------------------------------------------
    def _input(self, descriptors: np.ndarray) -> np.ndarray:
        return root_sift(descriptors) if self.root else descriptors

    def fit_codebook(self, images: list[tuple[np.ndarray, np.ndarray]]) -> LocalFeaturizer:
        self.encoder = self.make_encoder().fit([self._input(d) for d, _ in images])
        self.codebook_sha256 = array_digest(*self._arrays().values())
        return self

    def _arrays(self) -> dict[str, np.ndarray]:
        encoder = self.encoder
        if self.encoding == "fisher":
            return {"pca_components": encoder.pca_.components_, "pca_mean": encoder.pca_.mean_, "pca_variance": encoder.pca_.explained_variance_,
                    "means": encoder.means_, "variances": encoder.variances_, "weights": encoder.weights_}
        return {"centers": encoder.cluster_centers_}

    def _restore(self, saved: dict[str, np.ndarray]) -> None:
        encoder = self.make_encoder()
        if self.encoding == "fisher":
            from sklearn.decomposition import PCA

            components = saved["pca_components"]
            encoder.pca_ = PCA(components.shape[0], whiten=True)
            encoder.pca_.components_, encoder.pca_.mean_ = components, saved["pca_mean"]
            encoder.pca_.explained_variance_, encoder.pca_.n_components_ = saved["pca_variance"], components.shape[0]
            encoder.pca_.n_features_in_ = components.shape[1]
            encoder.means_, encoder.variances_, encoder.weights_ = saved["means"], saved["variances"], saved["weights"]
            encoder.n_features_in_ = components.shape[1]
        else:
            encoder.cluster_centers_ = saved["centers"]
            encoder.center_norms_ = (saved["centers"] ** 2).sum(axis=1)
            encoder.n_features_in_ = saved["centers"].shape[1]
        self.encoder = encoder
        self.codebook_sha256 = array_digest(*(saved[key] for key in self._array_names()))

    def _array_names(self) -> tuple[str, ...]:
        if self.encoding == "fisher":
            return "pca_components", "pca_mean", "pca_variance", "means", "variances", "weights"
        return ("centers",)

    def codebook_problem(self, saved: dict[str, np.ndarray]) -> str | None:
        """What is wrong with a saved codebook's arrays, or None: its own word is not taken. Every
        array is present, floating point, finite and of the shape these settings learn; variances
        and mixture weights are positive; and the digest recomputed from the arrays is the one recorded."""
        missing = [key for key in self._array_names() if key not in saved]
        if missing:
            return f"lacks {missing}"
        arrays = {key: saved[key] for key in self._array_names()}
        for key, array in arrays.items():
            if array.dtype.kind != "f":
                return f"holds {key} of dtype {array.dtype}"
            if not np.isfinite(array).all():
                return f"holds {int((~np.isfinite(array)).sum())} non-finite values in {key}"
        width = self.spec.width
        if self.encoding == "fisher":
            components = arrays["pca_components"]
            reduced = components.shape[0] if components.ndim == 2 else -1
            modes = len(arrays["weights"]) if arrays["weights"].ndim == 1 else -1
            expected = {"pca_components": (reduced, width), "pca_mean": (width,), "pca_variance": (reduced,),
                        "means": (modes, reduced), "variances": (modes, reduced), "weights": (modes,)}
            if not (1 <= reduced <= self.pca_dim and 1 <= modes <= self.words):
                return f"holds {reduced} PCA components and {modes} modes; these settings learn up to {self.pca_dim} and {self.words}"
        else:
            expected = {"centers": (self.words, width)}
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                return f"holds {key} of shape {arrays[key].shape}; these settings learn {shape}"
        if self.encoding == "fisher":
            if (arrays["pca_variance"] <= 0).any() or (arrays["variances"] <= 0).any() or (arrays["weights"] <= 0).any():
                return "holds variances or mixture weights that are not positive"
            if not np.isclose(float(arrays["weights"].sum()), 1.0, atol=1e-3):
                return f"holds mixture weights summing to {float(arrays['weights'].sum()):.4g}, not 1"
        recorded = str(saved.get("sha256", ""))
        if array_digest(*arrays.values()) != recorded:
            return f"holds arrays whose SHA-256 is not the recorded {recorded[:12]!r}"
        return None

    def codebook_settings(self, dataset: ImageDataset) -> dict:
        return {**self.settings(), "train_images": dataset.digest()}

    def load_codebook(self, dataset: ImageDataset, path: Path) -> bool:
        """Reuse the codebook at ``path`` if its settings match and its arrays check out
        (``codebook_problem``); a file that is unreadable or fails a check is named in a warning and relearned."""
        if not path.is_file():
            return False
        try:
            saved = read_arrays(path)
            settings = json.loads(str(saved["settings"]))
        except (ArrayFileError, KeyError, ValueError) as error:
            log.warning("codebook %s is unreadable (%s: %s); learning it again", path, type(error).__name__, error)
            path.unlink(missing_ok=True)
            return False
        if settings != json.loads(json.dumps(self.codebook_settings(dataset))):
            log.info("%s was made with other settings; learning a new codebook", path)
            return False
        problem = self.codebook_problem(saved)
        if problem is not None:
            log.warning("codebook %s %s; learning it again", path, problem)
            path.unlink(missing_ok=True)
            return False
        self._restore(saved)
        log.info("reusing codebook %s", path)
        return True

    def save_codebook(self, dataset: ImageDataset, path: Path) -> None:
        """Atomically: a kill mid-write leaves the old file or none, never a truncated one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = json.dumps(self.codebook_settings(dataset), sort_keys=True)
        save_arrays(path, settings=settings, sha256=self.codebook_sha256, **self._arrays())

    def fit_dataset(self, dataset: ImageDataset, codebook_path: Path, **kwargs) -> None:
        """This featurizer alone: ``fit_codebooks(dataset, [self], [codebook_path])``."""
        fit_codebooks(dataset, [self], [Path(codebook_path)], **kwargs)

    # -- features --------------------------------------------------------------------------
    def encode(self, descriptors: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        if self.encoder is None:
            raise RuntimeError(f"{self.name}: fit the codebook before encoding")
        vector = self.encoder.encode(self._input(descriptors), positions)
        if self.encoding == "bow":
            features = {self.taps[0]: vector[: self.words] * (2 ** (self.levels - 1) if self.levels > 1 else 1)}
            if self.levels > 1:
                features[self.taps[1]] = vector
                if self.chi2:
                    features[self.taps[2]] = chi2_map(vector)[0]
        else:
            features = {self.taps[0]: vector}
        return {**features, "n_descriptors": np.float32(len(descriptors))}

    def prepare(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return self.encode(*self.spec.describe(image))

    def __call__(self, batch: list[dict]) -> dict[str, np.ndarray]:
        return {key: np.stack([item[key] for item in batch]).astype(np.float32) for key in (*self.taps, *self.stats)}


class SharedDescriptors:
    """``prepare`` of a group: per image, each spec's descriptors once, then every member's
    encoding (members without a spec, e.g. HOG, use their own ``prepare``)."""

    def __init__(self, featurizers):
        self.featurizers = list(featurizers)

    def __call__(self, image: np.ndarray) -> list:
        described: dict[DescriptorSpec, tuple] = {}
        items = []
        for featurizer in self.featurizers:
            spec = getattr(featurizer, "spec", None)
            if spec is None:
                items.append(featurizer.prepare(image))
                continue
            if spec not in described:
                described[spec] = spec.describe(image)
            items.append(featurizer.encode(*described[spec]))
        return items


class _SampleDescriptors:
    """Picklable job: an image's descriptors under each spec, subsampled to ``cap`` per image."""

    def __init__(self, specs, cap: int, seed: int):
        self.specs, self.cap, self.seed = list(specs), cap, seed

    def __call__(self, item):
        row, image = item
        out = []
        for spec in self.specs:
            descriptors, positions = spec.describe(image)
            if len(descriptors) > self.cap:
                keep = np.sort(np.random.default_rng([self.seed, row]).choice(len(descriptors), self.cap, replace=False))
                descriptors, positions = descriptors[keep], positions[keep]
            out.append((descriptors, positions))
        return out


class _WithRow:
    """Wraps a dataset so ``read`` returns (row, image): the sampler seeds per row."""

    def __init__(self, dataset):
        self.dataset = dataset

    def read(self, row, min_side=None):
        return row, self.dataset.read(row, min_side=min_side)


def sample_rows(dataset: ImageDataset, split: str, *, images: int, seed: int) -> np.ndarray:
    candidates = np.flatnonzero(np.asarray(dataset.splits) == split)
    return np.sort(np.random.default_rng(seed).permutation(candidates)[:images])


def fit_codebooks(dataset: ImageDataset, featurizers, paths, *, processes: int = 0, pool=None, threads: int | None = None) -> None:
    """Learn (or reuse) each featurizer's codebook on a seeded sample of its split's images.

    Featurizers sharing a descriptor spec, split, seed and sample size are fitted on one
    pass over the sample: each image is described once for all of them. Test images are
    never read. Each codebook is saved atomically at its path.
    """
    todo = [(f, Path(p)) for f, p in zip(featurizers, paths) if not f.load_codebook(dataset, Path(p))]
    groups: dict[tuple, list] = {}
    for featurizer, path in todo:
        key = (featurizer.split, featurizer.seed, featurizer.codebook_images, featurizer.codebook_descriptors, featurizer.min_side)
        groups.setdefault(key, []).append((featurizer, path))
    for (split, seed, n_images, n_descriptors, min_side), members in groups.items():
        rows = sample_rows(dataset, codebook_split(dataset, split), images=n_images, seed=seed)
        specs = list(dict.fromkeys(f.spec for f, _ in members))
        log.info("describing %d %s images of %s once for the codebooks of %s", len(rows), split, dataset.name, ", ".join(f.name for f, _ in members))
        sampler = _SampleDescriptors(specs, max(1, n_descriptors // max(len(rows), 1)), seed)
        started = time.monotonic()
        with ImageMapper(_WithRow(dataset), sampler, min_side=min_side, processes=processes, pool=pool, threads=threads) as mapper:
            results = [future.result() for future in [mapper.submit(r) for r in rows]]
        for row, result in zip(rows, results):
            if isinstance(result, ImageDecodeError):
                log.warning("codebook sample: leaving out %s", result)
        results = [r for r in results if not isinstance(r, ImageDecodeError)]
        log.info("described the codebook sample in %.1f s", time.monotonic() - started)
        samples = {}
        for featurizer, _ in members:  # every member's sample checked before any codebook is learned
            images = samples[featurizer] = [result[specs.index(featurizer.spec)] for result in results]
            found = sum(len(d) for d, _ in images)
            if found < 2:
                raise UserError(f"{dataset.name}: too few descriptors in the {split!r} images to learn the {featurizer.name} codebook")
            if featurizer.words_given and featurizer.words > found:
                raise UserError(f"{featurizer.name} would learn {featurizer.words} words from {found} descriptors of {len(images)} "
                                f"{codebook_split(dataset, split)!r} images; give --words {found} or fewer")
        for featurizer, path in members:
            images = samples[featurizer]
            started = time.monotonic()
            featurizer.fit_codebook(images).save_codebook(dataset, path)
            log.info("learned the %s codebook (%d) on %d descriptors in %.1f s", featurizer.name, featurizer.words,
                     sum(len(d) for d, _ in images), time.monotonic() - started)
