"""Fashion-MNIST from the official files, found offline first and always checksum-verified.

Sources, in order: ``data_dir`` (when given it must hold the files), the local cache,
the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
then the official download URLs (into the cache).

Every file is checked against the official MD5 published by Zalando Research. Debian
ships the same archives repacked: the gzip header lost the stored file name and got a
new timestamp, while the compressed stream is byte-identical. For such a copy the
official header is rebuilt (name and original timestamp) and the official MD5 must
then match, so every source is held to the same published checksums.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.datasets.base import ImageDataset
from extract.datasets.download import DatasetNotFoundError, Download, cache_root, fetch
from extract.errors import UserError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
URL_BASES = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)


@dataclass(frozen=True)
class OfficialFile:
    name: str
    md5: str
    gzip_mtime: int  # the timestamp in the official gzip header, used to verify repacked copies


FILES = {
    "train_images": OfficialFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 1504176606),
    "train_labels": OfficialFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 1504176606),
    "test_images": OfficialFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 1504176627),
    "test_labels": OfficialFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 1504176627),
}


def cache_dir() -> Path:
    return cache_root() / "fashion-mnist"


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _with_official_header(data: bytes, official: OfficialFile) -> bytes:
    """Rebuild the official gzip header (FNAME flag, name, timestamp) around the same stream."""
    flags = data[3]
    if len(data) < 18 or data[:3] != b"\x1f\x8b\x08" or flags & ~0x01:
        return data  # other header fields present: not a plain repack
    name = official.name.removesuffix(".gz").encode() + b"\0"
    header = data[:3] + bytes([flags | 0x08]) + struct.pack("<I", official.gzip_mtime) + data[8:10]
    return header + name + data[10:]


def verify(path: Path, official: OfficialFile) -> bytes:
    """Return the file's bytes if they match the official MD5 (directly or as a header-only repack)."""
    data = path.read_bytes()
    if _md5(data) == official.md5 or _md5(_with_official_header(data, official)) == official.md5:
        return data
    raise UserError(f"{path} does not match the official MD5 {official.md5} of {official.name}")


def _find_in(folder: Path) -> dict[str, bytes] | str:
    """The verified files in ``folder``, or a reason why the folder does not qualify."""
    found = {}
    for key, official in FILES.items():
        path = folder / official.name
        if not path.is_file():
            return f"{path} is missing"
        try:
            found[key] = verify(path, official)
        except ValueError as error:
            return str(error)
    return found


def _download_into(folder: Path) -> dict[str, bytes] | str:
    folder.mkdir(parents=True, exist_ok=True)
    for official in FILES.values():
        target = folder / official.name
        if target.is_file():
            try:
                verify(target, official)
                continue
            except ValueError:
                target.unlink()
        errors = []
        for base in URL_BASES:
            try:
                fetch(Download(base + official.name, official.md5), folder, progress=False)
                break
            except (OSError, ValueError) as error:  # unreachable, or not the official bytes
                errors.append(f"{base}{official.name}: {error}")
        else:
            return "download failed: " + "; ".join(errors)
    return _find_in(folder)


def locate(data_dir: str | Path | None = None, *, download: bool = True) -> tuple[Path, dict[str, bytes]]:
    """Find verified Fashion-MNIST files: (folder, {key: gzip bytes})."""
    if data_dir is not None:
        found = _find_in(Path(data_dir))
        if isinstance(found, str):
            raise DatasetNotFoundError(f"DATA_DIR={data_dir} does not hold the official Fashion-MNIST files: {found}")
        return Path(data_dir), found
    reasons = []
    for folder in (cache_dir(), DEBIAN_DIR):
        found = _find_in(folder)
        if not isinstance(found, str):
            return folder, found
        reasons.append(found)
    if download:
        found = _download_into(cache_dir())
        if not isinstance(found, str):
            return cache_dir(), found
        reasons.append(found)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Tried: " + "; ".join(reasons) + ". Fix: on Debian, "
        f"`apt-get install {DEBIAN_PACKAGE}`; or put the four official .gz files in a folder "
        f"and pass DATA_DIR=that/folder; or copy them to {cache_dir()}."
    )


def ensure_available(*, install_with_apt: bool = True) -> Path:
    """Used by ``make setup``: find the files, else install the Debian package when possible."""
    try:
        folder, _ = locate()
        return folder
    except DatasetNotFoundError as error:
        can_apt = shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
        if not (install_with_apt and can_apt):
            raise
        print(f"{error}\nInstalling the Debian package {DEBIAN_PACKAGE} with apt-get...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], check=False)
        if not (DEBIAN_DIR / FILES["train_images"].name).is_file():
            subprocess.run(["apt-get", "update", "-q"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], check=True)
        folder, _ = locate(download=False)
        print(f"Installed {DEBIAN_PACKAGE}: Fashion-MNIST is in {folder}", file=sys.stderr)
        return folder


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Decode an IDX file (the MNIST format), gzip-compressed or not."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{name}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{name}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)


def load(data_dir: str | Path | None = None) -> ImageDataset:
    folder, files = locate(data_dir)
    images, labels, paths, splits = [], [], [], []
    for split, prefix in (("train", "train"), ("test", "test")):
        split_images = parse_idx(files[f"{prefix}_images"], FILES[f"{prefix}_images"].name)
        split_labels = parse_idx(files[f"{prefix}_labels"], FILES[f"{prefix}_labels"].name)
        if len(split_images) != len(split_labels):
            raise UserError(f"{folder}: {len(split_images)} {split} images but {len(split_labels)} labels")
        stem = FILES[f"{prefix}_images"].name.removesuffix(".gz")
        images.append(split_images)
        labels.append(split_labels)
        paths.extend(f"{stem}#{i}" for i in range(len(split_images)))
        splits.extend([split] * len(split_images))
    pixels = np.concatenate(images)

    def read(i: int, min_side: int | None = None) -> np.ndarray:
        return np.repeat(pixels[i][:, :, None], 3, axis=2)

    return ImageDataset(
        name="fashion-mnist",
        classes=CLASSES,
        paths=tuple(paths),
        labels=np.concatenate(labels).astype(np.int64),
        splits=tuple(splits),
        read=read,
        info={"source": str(folder)},
    )
