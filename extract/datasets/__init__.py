"""Datasets by name: ``fashion-mnist`` or ``folder:PATH``."""

from __future__ import annotations

from pathlib import Path

from extract.datasets import fashion_mnist
from extract.datasets.base import ImageDataset, balanced_subset, slugify
from extract.datasets.folder import load_folder

DEFAULT_LIMITS = {"fashion-mnist": 2000}
NAMES = ("fashion-mnist", "folder:PATH")


def dataset_slug(spec: str) -> str:
    """The folder name used under features/, results/ and reports/ for a dataset spec."""
    if spec.startswith("folder:"):
        return slugify(Path(spec.removeprefix("folder:")).resolve().name)
    return slugify(spec)


def load_dataset(
    spec: str,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    full: bool = False,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset by spec; ``limit`` (or the dataset's default subset unless ``full``) makes a
    seeded class-balanced subset: ``limit`` training images and ``limit // 2`` per other split."""
    if spec == "fashion-mnist":
        dataset = fashion_mnist.load(data_dir)
    elif spec.startswith("folder:"):
        dataset = load_folder(spec.removeprefix("folder:"), seed=seed)
    else:
        raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(NAMES)}")
    if limit is None and not full:
        limit = DEFAULT_LIMITS.get(spec)
    if limit is not None:
        dataset = balanced_subset(dataset, limit, seed=seed)
    return dataset


__all__ = ["ImageDataset", "balanced_subset", "dataset_slug", "load_dataset", "slugify"]
