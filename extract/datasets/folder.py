"""Your own images: folder trees (``ROOT/<split>/<class>/*`` or ``ROOT/<class>/*``) and CSV
lists (columns ``path,label[,split]``, UTF-8, relative paths relative to the CSV file's folder)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from extract.datasets.base import TRAIN_SPLIT, ImageDataset, file_dataset, seeded_split, slugify
from extract.images import read_image
from extract.errors import UserError

log = logging.getLogger(__name__)
# The splits `classify` tests on; a split layout with none of them gets one held out from train.
EVALUATION_SPLITS = ("test", "val", "validation")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
DEFAULT_TEST_FRACTION = 0.25


def visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders, sorted, without hidden ones."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (at any depth), sorted, without hidden ones.

    Dangling and looping symbolic links with an image suffix are listed too, so that they
    are reported as missing (``make data-info``, ``/skipped``) instead of silently left out.
    """
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists()))
    )


def load_folder(root: str | Path, *, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION, name: str | None = None) -> ImageDataset:
    """Read a folder tree. Split folders are detected when every top-level folder holds only
    folders; otherwise the top level is the classes and a seeded per-class split is made."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    top = visible_dirs(root)
    if not top:
        raise UserError(f"{root} holds no class folders: expected ROOT/<class>/* or ROOT/<split>/<class>/*")
    split_layout = all(visible_dirs(d) and not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir()) for d in top)
    entries: list[tuple[str, str, Path]] = []  # (split, class, file)
    if split_layout:
        for split_dir in top:
            for class_dir in visible_dirs(split_dir):
                entries.extend((split_dir.name, class_dir.name, f) for f in images_in(class_dir))
    else:
        entries.extend(("", class_dir.name, f) for class_dir in top for f in images_in(class_dir))
    if not entries:
        raise UserError(f"{root} holds no image files with suffixes {sorted(IMAGE_SUFFIXES)}")
    classes = tuple(sorted({c for _, c, _ in entries}))
    labels = np.array([classes.index(c) for _, c, _ in entries], dtype=np.int64)
    if split_layout:
        splits = [s for s, _, _ in entries]
        info = {"source": str(root), "layout": "ROOT/<split>/<class>"}
        if TRAIN_SPLIT in splits and not set(splits) & set(EVALUATION_SPLITS):
            # Decided here, not by `classify` after minutes of extraction: hold out test images.
            train = np.flatnonzero(np.asarray(splits) == TRAIN_SPLIT)
            for i, split in zip(train, seeded_split(labels[train], test_fraction=test_fraction, seed=seed)):
                splits[i] = split
            log.info("%s has a train folder but no %s folder: testing on a seeded, stratified %d%% of train (seed %d)",
                     root, " or ".join(EVALUATION_SPLITS[:2]), round(100 * test_fraction), seed)
            info.update(split_seed=seed, test_fraction=test_fraction, test_split="held out from train")
    else:
        splits = seeded_split(labels, test_fraction=test_fraction, seed=seed)
        info = {"source": str(root), "layout": "ROOT/<class>", "split_seed": seed, "test_fraction": test_fraction}
    files = [f for _, _, f in entries]
    return ImageDataset(
        name=name or slugify(root.resolve().name),
        classes=classes,
        paths=tuple(str(f.relative_to(root)) for f in files),
        labels=labels,
        splits=tuple(splits),
        read=lambda i, min_side=None: read_image(files[i], min_side=min_side),
        info=info,
    )


def load_csv(csv_file: str | Path, *, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> ImageDataset:
    """Read a CSV of ``path,label[,split]``; without a split column a seeded per-class split is made.

    The file is UTF-8 (an Excel byte-order mark is allowed). A relative path is relative to the
    CSV's folder; an absolute one, or one with ``..``, is read where it points. Every path is
    resolved (symbolic links too), and a file listed twice, under two labels, two splits or two
    spellings of its path, is refused: it would leak between the splits."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"dataset CSV not found: {csv_file}")
    data = csv_file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(f"{csv_file}:{line}: byte 0x{data[error.start]:02x} is not UTF-8; save the file as UTF-8 "
                        "(in Excel: CSV UTF-8)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [c.strip() for c in next(reader, [])]
    if header[:2] != ["path", "label"] or not set(header) <= {"path", "label", "split"} or len(set(header)) != len(header):
        raise UserError(f"{csv_file}: header must be path,label[,split]. Received: {','.join(header)!r}")
    rows, number = [], reader.line_num
    for cells in reader:
        start, number = number + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise UserError(f"{csv_file}:{start}: {len(cells)} fields where the header has {len(header)} ({','.join(header)}); "
                            "quote a value that holds a comma")
        row = {k: v.strip() for k, v in zip(header, cells)}
        if not row["path"] or not row["label"] or ("split" in header and not row["split"]):
            raise UserError(f"{csv_file}:{start}: empty path, label or split")
        rows.append((start, row))
    if not rows:
        raise UserError(f"{csv_file} lists no images")
    seen: dict[Path, tuple[int, dict]] = {}
    for line, row in rows:
        file = (csv_file.parent / row["path"]).resolve()
        if file in seen:
            first, other = seen[file]
            raise UserError(f"{csv_file}:{line}: {row['path']!r} ({row['label']}{', ' + row['split'] if 'split' in row else ''}) is the file "
                            f"{other['path']!r} of line {first} ({other['label']}{', ' + other['split'] if 'split' in other else ''}) "
                            "again; list each image once")
        seen[file] = (line, row)
    info = {"layout": "csv: path,label[,split]"}
    if "split" in header:
        splits = [row["split"] for _, row in rows]
    else:
        classes = sorted({row["label"] for _, row in rows})
        labels = np.array([classes.index(row["label"]) for _, row in rows])
        splits = seeded_split(labels, test_fraction=test_fraction, seed=seed)
        info.update(split_seed=seed, test_fraction=test_fraction)
    entries = [(row["path"], row["label"], split) for (_, row), split in zip(rows, splits)]
    return file_dataset(slugify(csv_file.stem), csv_file.parent, entries, info=info)
