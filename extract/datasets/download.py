"""Checksummed downloads and archive extraction that cannot write outside its target folder."""

from __future__ import annotations

import logging
import os
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from extract.errors import UserError
from extract.fileio import file_digest

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 30
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset is not on disk; the message says what to download and where to put it."""


def cache_root() -> Path:
    """``$OFFSHELF_CACHE``, else ``$XDG_CACHE_HOME/offshelf``, else ``~/.cache/offshelf``."""
    root = os.environ.get("OFFSHELF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offshelf"
    return Path(root)


@dataclass(frozen=True)
class Download:
    """One official file: where it lives and its published MD5 (the checksum every mirror lists)."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]

    @property
    def is_archive(self) -> bool:
        return self.filename.endswith(ARCHIVE_SUFFIXES)


def fetch(download: Download, folder: Path, *, progress: bool = True) -> Path:
    """Download into ``folder`` (kept when already there and verified); refuse a checksum mismatch."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / download.filename
    if target.is_file() and file_digest(target, "md5") == download.md5:
        return target
    partial = target.with_name(target.name + ".part")
    log.info("downloading %s", download.url)
    with urllib.request.urlopen(download.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=download.filename, disable=not progress) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))
    found = file_digest(partial, "md5")
    if found != download.md5:
        partial.unlink()
        raise UserError(f"{download.url}: MD5 {found} does not match the published {download.md5}; nothing was kept")
    os.replace(partial, target)
    return target


def _inside(root: Path, name: str) -> bool:
    return (root / name).resolve().is_relative_to(root)


def check_archive(archive: Path, folder: Path) -> None:
    """Raise ``ValueError`` naming the first entry that would land outside ``folder``
    (absolute paths, ``..``, links pointing out) or is not a plain file, folder or link."""
    root = folder.resolve()
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not _inside(root, member.name):
                    raise UserError(f"{archive}: entry {member.name!r} would be written outside {folder}; refusing to extract")
                if member.issym() and not _inside(root, str(Path(member.name).parent / member.linkname)):
                    raise UserError(f"{archive}: link {member.name!r} -> {member.linkname!r} points outside {folder}; refusing to extract")
                if member.islnk() and not _inside(root, member.linkname):
                    raise UserError(f"{archive}: hard link {member.name!r} -> {member.linkname!r} points outside {folder}; refusing to extract")
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise UserError(f"{archive}: entry {member.name!r} is a device or FIFO; refusing to extract")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                if not _inside(root, name):
                    raise UserError(f"{archive}: entry {name!r} would be written outside {folder}; refusing to extract")
    else:
        raise UserError(f"{archive} is neither a tar nor a zip archive")


def safe_extract(archive: Path, folder: Path) -> None:
    """Extract after ``check_archive``; tar members also pass Python's ``data`` filter."""
    check_archive(archive, folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    else:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(folder)
