"""Pascal VOC 2007 classification: 20 classes, multi-label, trainval / test, scored by mAP.

Layout (the official tars extract to ``VOCdevkit/VOC2007``): ``JPEGImages/<id>.jpg``,
``Annotations/<id>.xml`` and ``ImageSets/Main/{trainval,test}.txt``. An image's target for
a class is 1 when it holds a non-difficult object of the class, -1 when all its objects of
the class are marked difficult (ignored when scoring, as the VOC devkit does), 0 otherwise.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from extract.datasets.base import ImageDataset, file_dataset
from extract.errors import UserError

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_SETS = {"trainval": "train", "test": "test"}


def image_targets(annotation: Path) -> np.ndarray:
    """The (20,) int8 target row of one annotation file."""
    try:
        tree = ElementTree.parse(annotation)
    except (OSError, ElementTree.ParseError) as error:
        raise UserError(f"cannot read VOC annotation {annotation}: {error}") from None
    row = np.zeros(len(CLASSES), dtype=np.int8)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASSES:
            raise UserError(f"{annotation}: unknown VOC class {name!r}")
        c = CLASSES.index(name)
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        row[c] = 1 if not difficult or row[c] == 1 else -1
    return row


def load_voc2007(root: Path) -> ImageDataset:
    entries, targets = [], []
    for image_set, split in IMAGE_SETS.items():
        listing = root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not listing.is_file():
            if split == "test":  # the test tar is a separate download
                continue
            raise FileNotFoundError(f"{listing} is missing: not a VOC2007 folder")
        for image_id in listing.read_text().split():
            row = image_targets(root / "Annotations" / f"{image_id}.xml")
            if not row.any():
                raise UserError(f"{root / 'Annotations' / image_id}.xml lists no object")
            present = np.flatnonzero(row == 1)
            entries.append((f"JPEGImages/{image_id}.jpg", CLASSES[present[0] if len(present) else np.flatnonzero(row)[0]], split))
            targets.append(row)
    return file_dataset("voc2007", root, entries, classes=CLASSES, targets=np.stack(targets),
                        info={"layout": "VOCdevkit/VOC2007", "multilabel": True})
