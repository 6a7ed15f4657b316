"""The dataset registry: every dataset by name, with its layout, protocol and where to get it.

``load_dataset("birds", data_dir=...)`` finds the dataset's folder (``data_dir``, the folder
inside it that the official archive creates, or the cache ``~/.cache/offshelf/<name>``),
reads its official layout and returns an ``ImageDataset`` with the standard splits.
``fetch_dataset`` downloads the official archives into the cache when online, checking
the published MD5 and refusing archive entries that would land outside the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from extract.datasets import fashion_mnist
from extract.datasets.base import ImageDataset, balanced_subset, slugify
from extract.datasets.cub import CROPS, load_cub
from extract.datasets.download import DatasetNotFoundError, Download, cache_root, fetch, safe_extract
from extract.datasets.folder import load_csv, load_folder
from extract.datasets.official import (
    load_caltech101, load_flowers102, load_mit67, load_office31, load_office_caltech10, load_scene15,
)
from extract.datasets.voc import load_voc2007
from extract.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    task: str
    protocol: str  # the standard protocol, in words
    # load(root, seed=..., crop=...) with the keywords it takes; None: the dataset finds its own
    # files (Fashion-MNIST also looks in the Debian package's folder)
    load: Callable[..., ImageDataset] | None
    folders: tuple[str, ...]  # where the official archives put the root, relative to DATA_DIR / the cache
    marker: str | None  # a file or folder that identifies the root; None: any existing folder
    downloads: tuple[Download, ...] = ()
    source: str = ""  # the official page; where to go when there is no checksummed download
    protocols: tuple[str, ...] = ("given",)  # what `make classify` runs when PROTOCOL is not set
    metric: str = "top1"
    takes_seed: bool = False
    default_limit: int | None = None


def domain_protocols(*domains: str) -> tuple[str, ...]:
    """Every ordered pair of domains, twice: the whole source domain trains (``transfer:``), and the
    Saenko et al. sampled protocol that DeCAF reports (``sampled:``)."""
    pairs = [(a, b) for a in domains for b in domains if a != b]
    return tuple(f"{kind}:{a}->{b}" for kind in ("transfer", "sampled") for a, b in pairs)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "birds", "CUB-200-2011", "fine-grained", "official train_test_split.txt (5,994 / 5,794)",
            load_cub, ("CUB_200_2011",), "images.txt",
            (Download("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78"),),
            "https://www.vision.caltech.edu/datasets/cub_200_2011/",
        ),
        DatasetSpec(
            "caltech101", "Caltech-101", "object", "30 train / up to 50 test images per class, seeded; no BACKGROUND_Google",
            load_caltech101, ("101_ObjectCategories", "caltech-101/101_ObjectCategories"), None,
            (Download("http://www.vision.caltech.edu/Image_Datasets/Caltech101/101_ObjectCategories.tar.gz", "b224c7392d521a49829488ab0f1120d9"),),
            "https://data.caltech.edu/records/mzrjq-6wc02", takes_seed=True,
        ),
        DatasetSpec(
            "voc2007", "Pascal VOC 2007", "object (multi-label)", "trainval / test, 20 classes, mAP (difficult ignored)",
            load_voc2007, ("VOCdevkit/VOC2007", "VOC2007"), "ImageSets/Main/trainval.txt",
            (Download("http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
             Download("http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f")),
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/", metric="mAP",
        ),
        DatasetSpec(
            "scene15", "15-Scene", "scene", "100 train images per class, seeded; the rest test",
            load_scene15, ("15-Scene", "scene_categories"), None, (),
            "https://figshare.com/articles/dataset/15-Scene_Image_Dataset/7007177", takes_seed=True,
        ),
        DatasetSpec(
            "mit67", "MIT Indoor-67", "scene", "official TrainImages.txt / TestImages.txt (80 / 20 per class)",
            load_mit67, ("indoorCVPR_09",), "TrainImages.txt", (),
            "https://web.mit.edu/torralba/www/indoor.html (indoorCVPR_09.tar, TrainImages.txt, TestImages.txt)",
        ),
        DatasetSpec(
            "office31", "Office-31", "domain adaptation", "domains amazon, dslr, webcam as splits; transfer:SOURCE->TARGET",
            load_office31, ("office31", "Office31", "domain_adaptation_images"), "amazon", (),
            "https://faculty.cc.gatech.edu/~judy/domainadapt/",
            protocols=domain_protocols("amazon", "dslr", "webcam"),
        ),
        DatasetSpec(
            "office_caltech10", "Office-Caltech-10", "domain adaptation", "domains amazon, caltech, dslr, webcam as splits",
            load_office_caltech10, ("office_caltech_10", "office_caltech10"), "amazon", (),
            "https://faculty.cc.gatech.edu/~judy/domainadapt/ (with Caltech-256's 10 shared classes)",
            protocols=domain_protocols("amazon", "caltech", "dslr", "webcam"),
        ),
        DatasetSpec(
            "flowers102", "Oxford Flowers-102", "fine-grained", "official setid.mat: train / val / test (10 / 10 / rest per class)",
            load_flowers102, ("flowers102", "flowers-102"), "setid.mat",
            (Download("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "52808999861908f626f3c1f4e79d11fa"),
             Download("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
             Download("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c")),
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        ),
        DatasetSpec(
            "hymenoptera", "Hymenoptera (ants / bees)", "object", "the given train / val folders",
            partial(load_folder, name="hymenoptera"), ("hymenoptera_data",), "train", (),
            "https://download.pytorch.org/tutorial/hymenoptera_data.zip", takes_seed=True,
        ),
        DatasetSpec(
            "fashion-mnist", "Fashion-MNIST", "object (offline default)", "official 60k / 10k; default subset 2,000 / 1,000",
            None, (), None, (), "https://github.com/zalandoresearch/fashion-mnist (Debian: dataset-fashion-mnist)",
            default_limit=2000,
        ),
    )
}
PATTERNS = ("folder:PATH", "csv:FILE")


def dataset_slug(spec: str, crop: str | None = None) -> str:
    """The folder name used under features/, results/ and reports/ for a dataset spec."""
    if spec.startswith(("folder:", "csv:")):
        path = Path(spec.split(":", 1)[1])
        return slugify(path.resolve().name if spec.startswith("folder:") else path.stem)
    return slugify(spec if crop is None else f"{spec}-{crop}")


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join([*DATASETS, *PATTERNS])}")
    return DATASETS[name]


def _how_to_get(spec: DatasetSpec) -> str:
    where = f"{cache_root() / spec.name}"
    layout = f"a folder holding {spec.marker}" if spec.marker else "the folder of class folders"
    if spec.downloads:
        files = ", ".join(f"{d.url} (MD5 {d.md5})" for d in spec.downloads)
        get = f"`python -m extract fetch --dataset {spec.name}` when online, or download {files}"
    else:
        get = f"download it from {spec.source}"
    return f"{get}; extract it into {where} or pass DATA_DIR=<{layout}>"


def _has_entry(folder: Path, name: str) -> bool:
    """``folder/name`` exists, in any case (``Amazon/`` for ``amazon``)."""
    return (folder / name).exists() or any(p.name.lower() == name.lower() for p in folder.iterdir())


def locate(spec: DatasetSpec, data_dir: str | Path | None = None) -> Path:
    """The dataset's root folder: ``data_dir`` itself or the archive folder inside it, else the cache."""
    bases = [Path(data_dir)] if data_dir is not None else [cache_root() / spec.name]
    for base in bases:
        for candidate in (*(base / folder for folder in spec.folders), base):  # the archive's folder first
            if candidate.is_dir() and (spec.marker is None or _has_entry(candidate, spec.marker)):
                return candidate
    looked = ", ".join(str(b / f) for b in bases for f in (*spec.folders, ""))
    raise DatasetNotFoundError(f"{spec.title} ({spec.name}) not found; looked in {looked}. To get it: {_how_to_get(spec)}")


def fetch_dataset(name: str, *, progress: bool = True) -> Path:
    """Download and extract the official files into the cache (a no-op when already there)."""
    spec = dataset_spec(name)
    if name == "fashion-mnist":
        return fashion_mnist.ensure_available()
    try:
        return locate(spec)
    except DatasetNotFoundError:
        if not spec.downloads:
            raise DatasetNotFoundError(f"{spec.title} has no checksummed download here; {_how_to_get(spec)}") from None
    folder = cache_root() / spec.name
    for download in spec.downloads:
        try:
            path = fetch(download, folder, progress=progress)
        except OSError as error:  # offline, or the server moved
            raise DatasetNotFoundError(f"cannot download {download.url} ({error}); {_how_to_get(spec)}") from None
        if download.is_archive:
            safe_extract(path, folder)
    return locate(spec)


def load_dataset(
    spec: str,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    full: bool = False,
    seed: int = 0,
    crop: str | None = None,
) -> ImageDataset:
    """Load a dataset by name or ``folder:PATH`` / ``csv:FILE``; ``limit`` (or the dataset's
    default subset unless ``full``) makes a seeded class-balanced subset: ``limit`` training
    images and ``limit // 2`` per other split. ``crop="bbox"`` crops birds to their boxes."""
    if crop is not None and spec != "birds":
        raise UserError(f"crop={crop!r} needs bounding boxes; only birds (CUB-200-2011) has them")
    default_limit = None
    if spec.startswith("folder:"):
        dataset = load_folder(spec.removeprefix("folder:"), seed=seed)
    elif spec.startswith("csv:"):
        dataset = load_csv(spec.removeprefix("csv:"), seed=seed)
    else:
        registered = dataset_spec(spec)
        default_limit = registered.default_limit
        if registered.load is None:
            dataset = fashion_mnist.load(data_dir)
        else:
            options = {"seed": seed} if registered.takes_seed else {}
            if crop is not None:
                options["crop"] = crop
            dataset = registered.load(locate(registered, data_dir), **options)
    if limit is None and not full:
        limit = default_limit
    if limit is not None:
        dataset = balanced_subset(dataset, limit, seed=seed)
    return dataset


__all__ = [
    "CROPS", "DATASETS", "DatasetNotFoundError", "DatasetSpec", "ImageDataset", "balanced_subset", "dataset_slug",
    "dataset_spec", "fetch_dataset", "load_dataset", "locate", "slugify",
]
