"""Image-folder trees: ``ROOT/<split>/<class>/*`` or ``ROOT/<class>/*``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.datasets.base import ImageDataset, seeded_split, slugify
from extract.images import read_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
DEFAULT_TEST_FRACTION = 0.25


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def load_folder(root: str | Path, *, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> ImageDataset:
    """Read a folder tree. Split folders are detected when every top-level folder holds only
    folders; otherwise the top level is the classes and a seeded per-class split is made."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    top = _visible_dirs(root)
    if not top:
        raise ValueError(f"{root} holds no class folders: expected ROOT/<class>/* or ROOT/<split>/<class>/*")
    split_layout = all(_visible_dirs(d) and not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir()) for d in top)
    entries: list[tuple[str, str, Path]] = []  # (split, class, file)
    if split_layout:
        for split_dir in top:
            for class_dir in _visible_dirs(split_dir):
                entries.extend((split_dir.name, class_dir.name, f) for f in _images_in(class_dir))
    else:
        entries.extend(("", class_dir.name, f) for class_dir in top for f in _images_in(class_dir))
    if not entries:
        raise ValueError(f"{root} holds no image files with suffixes {sorted(IMAGE_SUFFIXES)}")
    classes = tuple(sorted({c for _, c, _ in entries}))
    labels = np.array([classes.index(c) for _, c, _ in entries], dtype=np.int64)
    if split_layout:
        splits = [s for s, _, _ in entries]
        info = {"source": str(root), "layout": "ROOT/<split>/<class>"}
    else:
        splits = seeded_split(labels, test_fraction=test_fraction, seed=seed)
        info = {"source": str(root), "layout": "ROOT/<class>", "split_seed": seed, "test_fraction": test_fraction}
    files = [f for _, _, f in entries]
    return ImageDataset(
        name=slugify(root.resolve().name),
        classes=classes,
        paths=tuple(str(f.relative_to(root)) for f in files),
        labels=labels,
        splits=tuple(splits),
        read=lambda i, min_side=None: read_image(files[i], min_side=min_side),
        info=info,
    )
