"""Official layouts of the object, scene and domain datasets, each with its standard split.

* Caltech-101: ``<class>/image_*.jpg``; 30 training images per class, up to 50 test
  images from the rest (seeded); ``BACKGROUND_Google`` left out.
* 15-Scene: ``<class>/*.jpg``; 100 training images per class (seeded), the rest test.
* MIT Indoor-67: ``Images/<class>/*.jpg`` with the official ``TrainImages.txt`` and
  ``TestImages.txt`` (80 / 20 per class).
* Office-31 and Office-Caltech-10: one folder per domain (``amazon/[images/]<class>/*``);
  each domain is a split, so protocols say ``transfer:amazon->webcam``.
* Flowers-102: ``jpg/image_*.jpg``, ``imagelabels.mat``, ``setid.mat`` (train/val/test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.datasets.base import ImageDataset, file_dataset, per_class_split
from extract.datasets.folder import images_in, visible_dirs
from extract.errors import UserError

CALTECH_BACKGROUND = "BACKGROUND_Google"
CALTECH_TRAIN, CALTECH_TEST = 30, 50
SCENE15_TRAIN = 100
OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICE_CALTECH_DOMAINS = ("amazon", "caltech", "dslr", "webcam")


def _class_images(root: Path, exclude=()) -> list[tuple[str, str]]:
    """(relative path, class) of every image in ``root/<class>/``, sorted."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found = [(str(f.relative_to(root)), class_dir.name)
             for class_dir in visible_dirs(root) if class_dir.name not in exclude for f in images_in(class_dir)]
    if not found:
        raise UserError(f"{root} holds no <class>/<image> files")
    return found


def _per_class_protocol(name: str, root: Path, train: int, test: int | None, seed: int, exclude=()) -> ImageDataset:
    images = _class_images(root, exclude)
    classes = sorted({c for _, c in images})
    labels = np.array([classes.index(c) for _, c in images])
    splits = per_class_split(labels, train=train, test=test, seed=seed)
    info = {"layout": "ROOT/<class>", "split_seed": seed, "train_per_class": train, "test_per_class": test}
    return file_dataset(name, root, [(p, c, s) for (p, c), s in zip(images, splits)], info=info)


def load_caltech101(root: Path, *, seed: int = 0) -> ImageDataset:
    return _per_class_protocol("caltech101", root, CALTECH_TRAIN, CALTECH_TEST, seed, exclude=(CALTECH_BACKGROUND,))


def load_scene15(root: Path, *, seed: int = 0) -> ImageDataset:
    return _per_class_protocol("scene15", root, SCENE15_TRAIN, None, seed)


def load_mit67(root: Path) -> ImageDataset:
    entries = []
    for listing, split in (("TrainImages.txt", "train"), ("TestImages.txt", "test")):
        path = root / listing
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: MIT-67 needs the official TrainImages.txt and TestImages.txt beside Images/")
        entries += [(f"Images/{line.strip()}", line.strip().split("/", 1)[0], split) for line in path.read_text().splitlines() if line.strip()]
    return file_dataset("mit67", root, entries, info={"layout": "Images/<class> + TrainImages.txt/TestImages.txt"})


def _domain_folder(name: str, root: Path, domain: str, domains: tuple[str, ...]) -> Path:
    """The folder of ``domain`` under the names people have: any case, with or without "10"
    (``caltech``, ``Caltech``, ``caltech10``, ``Caltech10``)."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found = visible_dirs(root)
    matches = [d for d in found if d.name.lower() in (domain, f"{domain}10")]
    if len(matches) != 1:
        problem = "has no folder" if not matches else f"has several folders ({', '.join(d.name for d in matches)})"
        raise UserError(f"{root} {problem} for the {name} domain {domain!r}: expected one folder per domain "
                        f"{', '.join(domains)} (any case, e.g. {domain}/ or {domain.capitalize()}/); found: "
                        f"{', '.join(d.name for d in found) or 'no folders'}")
    folder = matches[0]
    return folder / "images" if (folder / "images").is_dir() else folder  # Office-31 as distributed: <domain>/images/<class>


def _load_domains(name: str, root: Path, domains: tuple[str, ...]) -> ImageDataset:
    entries = []
    for domain in domains:
        folder = _domain_folder(name, root, domain, domains)
        entries += [(str((folder / p).relative_to(root)), c, domain) for p, c in _class_images(folder)]
    return file_dataset(name, root, entries, info={"layout": "<domain>/[images/]<class>", "domains": list(domains)})


def load_office31(root: Path) -> ImageDataset:
    return _load_domains("office31", root, OFFICE31_DOMAINS)


def load_office_caltech10(root: Path) -> ImageDataset:
    return _load_domains("office_caltech10", root, OFFICE_CALTECH_DOMAINS)


def load_flowers102(root: Path) -> ImageDataset:
    from scipy.io import loadmat

    for required in ("imagelabels.mat", "setid.mat", "jpg"):
        if not (root / required).exists():
            raise FileNotFoundError(f"{root / required} is missing: Flowers-102 needs jpg/, imagelabels.mat and setid.mat")
    labels = loadmat(root / "imagelabels.mat")["labels"].ravel()
    sets = loadmat(root / "setid.mat")
    split_of = {}
    for key, split in (("trnid", "train"), ("valid", "val"), ("tstid", "test")):
        split_of.update({int(i): split for i in sets[key].ravel()})
    entries = [(f"jpg/image_{i:05d}.jpg", f"class_{int(labels[i - 1]):03d}", split_of.get(i)) for i in range(1, len(labels) + 1)]
    return file_dataset("flowers102", root, entries, info={"layout": "jpg/ + imagelabels.mat + setid.mat"})
