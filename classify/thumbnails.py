"""Thumbnails of a dataset's images, for the HTML page and the projector's sprite.

One JPEG per image, at most ``THUMB_SIDE`` pixels on its longer side (never enlarged: a 28-pixel
Fashion-MNIST image stays 28 pixels and the page scales it up), in ``reports/<dataset>/thumbs/``,
named by a hash of the image's path in the store. A thumbnail is written once: later runs find it
on disk and read no image. The images are read back through the dataset registry, with the same
dataset spec (and ``--crop``, ``--data-dir``) as ``make extract``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from extract.errors import UserError
from extract.fileio import atomic_write

log = logging.getLogger(__name__)

THUMB_SIDE = 96
FOLDER = "thumbs"
JPEG_QUALITY = 85


def thumb_name(path: str) -> str:
    """The thumbnail of the image stored as ``path``, relative to the report folder."""
    return f"{FOLDER}/{hashlib.sha1(str(path).encode()).hexdigest()[:16]}.jpg"


@dataclass(frozen=True)
class ImageSource:
    """Where a dataset's images are read back from: the dataset spec, crop and data folder they were extracted with."""

    dataset: str
    crop: str | None = None
    data_dir: str | None = None

    def reader(self) -> Callable[[str], np.ndarray]:
        """A function from a store's image path to the image (RGB uint8), reduced towards ``THUMB_SIDE``
        where the decoder can; KeyError for a path the dataset does not have."""
        from extract.datasets import load_dataset

        dataset = load_dataset(self.dataset, data_dir=self.data_dir, full=True, crop=self.crop)
        index = {path: i for i, path in enumerate(dataset.paths)}
        return lambda path: dataset.read(index[path], min_side=THUMB_SIDE)


def thumbnail(image: np.ndarray) -> Image.Image:
    picture = Image.fromarray(np.asarray(image, np.uint8))
    picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return picture


def ensure_thumbnails(report_dir: Path, paths: Iterable[str], source: ImageSource | None, *, progress: bool = False) -> set[str]:
    """Write the thumbnails of ``paths`` that are not on disk yet (reading the dataset only then);
    returns the paths that still have none (the dataset or the image could not be read)."""
    report_dir = Path(report_dir)
    missing = [p for p in dict.fromkeys(map(str, paths)) if not (report_dir / thumb_name(p)).is_file()]
    if not missing:
        return set()
    if source is None:
        return set(missing)
    try:
        read = source.reader()
    except (UserError, OSError) as error:
        log.warning("no thumbnails for %d images: %s", len(missing), error)
        return set(missing)
    (report_dir / FOLDER).mkdir(parents=True, exist_ok=True)
    unreadable = set()
    for path in tqdm(missing, desc="thumbnails", disable=not progress):
        try:
            picture = thumbnail(read(path))
        except (KeyError, UserError, OSError, ValueError):
            unreadable.add(path)
            continue
        target = report_dir / thumb_name(path)
        atomic_write(target, lambda tmp: picture.save(tmp, quality=JPEG_QUALITY), durable=False)
    if unreadable:
        log.warning("no thumbnail for %d images not found in %s (e.g. %s)", len(unreadable), source.dataset, next(iter(unreadable)))
    return unreadable


def data_uri(file: Path) -> str:
    """A thumbnail file as a ``data:`` URI, for pages that must hold their images (notebook cells)."""
    return "data:image/jpeg;base64," + base64.b64encode(Path(file).read_bytes()).decode()
