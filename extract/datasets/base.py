"""The dataset contract shared by CNN extraction and the hand-crafted baselines."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from extract.images import read_image
from extract.errors import UserError

TRAIN_SPLIT = "train"


def index_digest(paths, labels, splits, targets=None) -> str:
    """SHA-256 of an ordered (path, label, split) index (and multi-label targets): a sample list's
    identity, which a store records and its reader checks against the index it reads."""
    digest = hashlib.sha256("".join(f"{p}\t{int(l)}\t{s}\n" for p, l, s in zip(paths, labels, splits)).encode())
    if targets is not None:
        digest.update(np.ascontiguousarray(targets, dtype=np.int8).tobytes())
    return digest.hexdigest()


def slugify(name: str) -> str:
    """A filesystem-safe name for output folders."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not slug:
        raise UserError(f"cannot make a folder name from dataset name {name!r}")
    return slug


@dataclass(frozen=True)
class ImageDataset:
    """Images with labels and splits.

    ``paths`` are stable identifiers (a file path, or ``file#row`` for array
    datasets); ``read(i, min_side=None)`` returns sample ``i`` as RGB ``uint8``
    (H, W, 3), allowed to decode large files at a reduced scale down to ``min_side``.
    """

    name: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    splits: tuple[str, ...]
    read: Callable[..., np.ndarray] = field(repr=False, compare=False)
    info: dict = field(default_factory=dict, compare=False)
    # Multi-label datasets (VOC): (N, C) int8, 1 present, 0 absent, -1 "difficult" (ignored
    # when scoring). ``labels`` then holds one present class per image, for counts and subsets.
    targets: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (len(self.paths) == len(self.labels) == len(self.splits)):
            raise UserError(
                f"dataset {self.name!r}: paths ({len(self.paths)}), labels ({len(self.labels)}) "
                f"and splits ({len(self.splits)}) differ in length"
            )
        if self.targets is not None and self.targets.shape != (len(self.paths), len(self.classes)):
            raise UserError(f"dataset {self.name!r}: targets of shape {self.targets.shape}, expected {(len(self.paths), len(self.classes))}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise UserError(f"dataset {self.name!r}: labels outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def resize(self) -> str:
        """How this dataset's images become square inputs (``extract.images.fit_to_input``): what the
        user chose (``--resize``), else ``warp`` for bounding-box crops (DeCAF warped them; a centre
        square would cut off a wide bird's ends), else ``centre``."""
        return self.info.get("resize", "centre")

    @property
    def split_names(self) -> list[str]:
        return sorted(set(self.splits), key=lambda s: (s != TRAIN_SPLIT, s))

    def counts(self) -> dict[str, Counter]:
        """Per split, the number of images of each class name."""
        table: dict[str, Counter] = {split: Counter() for split in self.split_names}
        for label, split in zip(self.labels, self.splits):
            table[split][self.classes[label]] += 1
        return table

    def digest(self) -> str:
        """SHA-256 of the ordered (path, label, split) index: the identity of the sample list."""
        return index_digest(self.paths, self.labels, self.splits, self.targets)

    def subset(self, indices, **info) -> ImageDataset:
        indices = np.asarray(indices, dtype=np.int64)
        read = self.read
        return replace(
            self,
            paths=tuple(self.paths[i] for i in indices),
            labels=self.labels[indices],
            splits=tuple(self.splits[i] for i in indices),
            targets=None if self.targets is None else self.targets[indices],
            read=lambda i, min_side=None: read(int(indices[i]), min_side=min_side),
            info={**self.info, **info},
        )


TEST_SPLITS = ("test", "val", "validation")  # where a dataset keeps its test images, in order of preference


def choose_splits(splits, train_split: str = TRAIN_SPLIT, test_split: str | None = None) -> tuple[str, str]:
    """The split that trains and the one that tests: ``train_split``, and ``test_split`` or else
    the first of ``TEST_SPLITS`` present. Domain datasets name domains here (``amazon``, ``webcam``)."""
    present = sorted(set(splits))
    if train_split not in present:
        raise UserError(f"no {train_split!r} split; the splits are {present}")
    if test_split is None:
        test_split = next((s for s in TEST_SPLITS if s in present), None)
        if test_split is None:
            raise UserError(f"no test split (looked for {', '.join(TEST_SPLITS)}); the splits are {present}")
    elif test_split not in present:
        raise UserError(f"no {test_split!r} split; the splits are {present}")
    return train_split, test_split


def balanced_subset(dataset: ImageDataset, limit: int, *, seed: int) -> ImageDataset:
    """A seeded, class-balanced subset: ``limit`` training images and ``limit // 2`` per other split."""
    if limit < 1:
        raise UserError(f"limit must be a positive number of images. Received: limit={limit}")
    rng = np.random.default_rng(seed)
    splits = np.asarray(dataset.splits)
    chosen = []
    for split in dataset.split_names:
        cap = limit if split == TRAIN_SPLIT else max(1, limit // 2)
        members = np.flatnonzero(splits == split)
        by_class = {c: rng.permutation(members[dataset.labels[members] == c]) for c in np.unique(dataset.labels[members])}
        # Deal images round-robin over classes in a seeded order, so every class gets
        # floor or ceil of cap / n_classes (less only where a class runs out).
        order = rng.permutation(sorted(by_class))
        taken = {c: 0 for c in order}
        remaining = min(cap, len(members))
        while remaining:
            progressed = False
            for c in order:
                if remaining and taken[c] < len(by_class[c]):
                    taken[c] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                break
        chosen.extend(idx for c in order for idx in by_class[c][: taken[c]])
    return dataset.subset(np.sort(np.asarray(chosen, dtype=np.int64)), limit=limit, subset_seed=seed)


def seeded_split(labels: np.ndarray, *, test_fraction: float, seed: int) -> list[str]:
    """Per class, put ``test_fraction`` of the items (at least one when possible) in "test"."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1). Received: test_fraction={test_fraction}")
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), TRAIN_SPLIT, dtype=object)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(len(members) - 1, max(1, round(len(members) * test_fraction))) if len(members) > 1 else 0
        splits[members[:n_test]] = "test"
    return [str(s) for s in splits]


def per_class_split(labels: np.ndarray, *, train: int, test: int | None, seed: int) -> list[str | None]:
    """The "N training images per class" protocols (Caltech-101, 15-Scene): per class, a seeded
    ``train`` images for training, then up to ``test`` (all the rest when None) for testing;
    other images get None and are left out."""
    rng = np.random.default_rng(seed)
    splits: list[str | None] = [None] * len(labels)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        for i in members[:train]:
            splits[i] = TRAIN_SPLIT
        for i in members[train : None if test is None else train + test]:
            splits[i] = "test"
    return splits


def file_dataset(name: str, root: Path, entries, *, classes=None, info=None, targets=None, read=None) -> ImageDataset:
    """An ``ImageDataset`` of image files from ``(relative path, class name, split)`` entries;
    entries with split None are left out. ``classes`` fixes the class order (default: sorted)."""
    kept = [(i, e) for i, e in enumerate(entries) if e[2] is not None]
    if not kept:
        raise UserError(f"{root}: no images found for dataset {name!r}")
    classes = tuple(classes) if classes is not None else tuple(sorted({c for _, (_, c, _) in kept}))
    index = {c: i for i, c in enumerate(classes)}
    paths = tuple(str(rel) for _, (rel, _, _) in kept)
    files = [root / p for p in paths]
    return ImageDataset(
        name=name,
        classes=classes,
        paths=paths,
        labels=np.array([index[c] for _, (_, c, _) in kept], dtype=np.int64),
        splits=tuple(s for _, (_, _, s) in kept),
        read=read or (lambda i, min_side=None: read_image(files[i], min_side=min_side)),
        info={"source": str(root), **(info or {})},
        targets=None if targets is None else np.asarray(targets)[[i for i, _ in kept]],
    )
