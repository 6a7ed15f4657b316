"""CUB-200-2011 (``birds``) in its official layout, optionally cropped to the bird.

Files read, relative to the ``CUB_200_2011`` folder: ``images.txt`` (id, path under
``images/``), ``image_class_labels.txt`` (id, class id), ``train_test_split.txt`` (id, 1 for
train), ``classes.txt`` (class id, name), and for ``crop="bbox"`` ``bounding_boxes.txt``
(id, x, y, width, height in pixels).

A copy holding only some classes works: classes whose ``images/<class>`` folder is absent
are left out (and counted in ``info``); nothing assumes 200 classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from extract.datasets.base import ImageDataset, file_dataset
from extract.images import read_image
from extract.errors import UserError

log = logging.getLogger(__name__)

CROPS = ("bbox",)
# DeCAF (Donahue et al., 2014) cropped CUB images to the box enlarged by 1.5 times.
BOX_ENLARGEMENT = 1.5


def _table(path: Path, columns: int) -> dict[int, list[str]]:
    """``id value...`` lines as {id: [values]}; a wrong line is an error naming file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not an official CUB-200-2011 folder")
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns or not parts[0].isdigit():
            raise UserError(f"{path}:{number}: expected {columns} space-separated fields starting with an id, got {line!r}")
        rows[int(parts[0])] = parts[1:]
    return rows


def enlarged_box(box, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``box`` (x, y, w, h) scaled about its centre, clipped to the image."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    half_w, half_h = w * scale / 2, h * scale / 2
    left, top = max(0, int(round(cx - half_w))), max(0, int(round(cy - half_h)))
    right, bottom = min(width, int(round(cx + half_w))), min(height, int(round(cy + half_h)))
    if right - left < 1 or bottom - top < 1:
        return 0, 0, width, height
    return left, top, right, bottom


def load_cub(root: Path, *, crop: str | None = None) -> ImageDataset:
    if crop is not None and crop not in CROPS:
        raise UserError(f"crop={crop!r} is not one of {CROPS} (or none)")
    images = _table(root / "images.txt", 2)
    labels = _table(root / "image_class_labels.txt", 2)
    is_train = _table(root / "train_test_split.txt", 2)
    class_names = _table(root / "classes.txt", 2)
    boxes = None
    if crop == "bbox":
        box_file = root / "bounding_boxes.txt"
        if not box_file.is_file():
            raise FileNotFoundError(f"CROP=bbox needs {box_file}, which is missing; run without CROP or add the official box file")
        boxes = {i: tuple(float(v) for v in values[0].split()) for i, values in _table(box_file, 2).items()}

    entries, ids, absent = [], [], set()
    for image_id, (relative,) in sorted(images.items()):
        if image_id not in labels or image_id not in is_train:
            raise UserError(f"{root}: image id {image_id} ({relative}) has no class label or no train/test flag")
        name = class_names[int(labels[image_id][0])][0]
        if not (root / "images" / Path(relative).parent).is_dir():
            absent.add(name)
            continue
        entries.append((f"images/{relative}", name, "train" if is_train[image_id][0] == "1" else "test"))
        ids.append(image_id)
    if absent:
        log.info("%s: %d classes have no image folder and are left out", root, len(absent))
    present = sorted({name for _, name, _ in entries})  # "001.Black_footed_Albatross": the id order
    info = {"layout": "CUB_200_2011", "classes_absent": len(absent), "crop": crop}
    read = None
    if boxes is not None:
        files = [root / rel for rel, _, _ in entries]
        image_boxes = []
        for image_id, (rel, _, _) in zip(ids, entries):
            if image_id not in boxes:
                raise UserError(f"{root / 'bounding_boxes.txt'} has no box for image id {image_id} ({rel})")
            image_boxes.append(boxes[image_id])

        def read(i: int, min_side: int | None = None) -> np.ndarray:
            # Full-resolution decode: the box is in original pixels, and a reduced decode would
            # shrink the crop below the size the model needs.
            rgb = read_image(files[i])
            left, top, right, bottom = enlarged_box(image_boxes[i], BOX_ENLARGEMENT, rgb.shape[1], rgb.shape[0])
            return np.ascontiguousarray(rgb[top:bottom, left:right])

        info["box_enlargement"] = BOX_ENLARGEMENT
        info["resize"] = "warp"
    return file_dataset("birds" if crop is None else f"birds-{crop}", root, entries, classes=present, info=info, read=read)
