"""Files written so that a kill, a full disk or a concurrent reader never sees half of one, and
arrays read back without trusting what the file says about itself.

Every output offshelf publishes (stores, their shards and manifests, codebooks, saved probes,
embeddings, thumbnails, results.csv) goes through ``atomic_write``: a temporary file beside
the target, fsync'ed, renamed over it, and the folder fsync'ed. A full disk, a file-size limit
or a read-only or foreign folder (``DISK_ERRNOS``) is the user's to fix: it is raised as an
``OSError`` naming the target, which the command line turns into one line with the fix.

``file_digest`` is the one checksum of a file: downloads check theirs with it, and a store's
fingerprint records the SHA-256 of the weights file its features came from.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import logging
import os
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np

from extract.errors import UserError

log = logging.getLogger(__name__)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of the bytes of ``path`` by ``algorithm`` (a ``hashlib`` name: ``sha256``, ``md5``).
    An integrity check, not a security one, so MD5 works where FIPS mode forbids it for security."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A full disk, a file-size limit, a read-only or foreign folder: the user's to fix, not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def temporary_path(target: Path) -> Path:
    """A unique name beside ``target`` for writing it: hidden, and with ``target``'s suffix, which
    writers that pick their format by suffix (``np.savez``, PIL) need."""
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{target.suffix}")


def remove_temporaries(target: Path) -> None:
    """The temporary files of ``target`` that killed writers left: call only while holding the
    lock that writers of ``target`` hold (no live writer then has one open)."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        log.info("removing %s, left by an interrupted run", leftover)
        leftover.unlink(missing_ok=True)


def atomic_write(target: str | Path, write, *, durable: bool = True) -> Path:
    """Call ``write(tmp_path)``, fsync the result, rename it onto ``target`` and fsync the folder:
    a kill at any moment leaves the old file or the new one, never a torn one. ``durable=False``
    skips the fsyncs, for caches that are rebuilt from their sources (thumbnails): a crash may
    then lose the file, never tear it.

    A disk error (``DISK_ERRNOS``) is raised as an ``OSError`` naming ``target``; the
    temporary file is removed whatever happens."""
    target = Path(target)
    tmp = temporary_path(target)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as error:
        if error.errno in DISK_ERRNOS:
            raise OSError(error.errno, os.strerror(error.errno), str(target)) from None
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    if durable:
        fsync_dir(target.parent)
    return target


def atomic_write_text(target: str | Path, text: str) -> Path:
    """``text`` as UTF-8 at ``target``, atomically (``atomic_write``)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(target, write)


def save_arrays(target: str | Path, **arrays) -> Path:
    """``np.savez`` of ``arrays`` at ``target`` (an ``.npz``), atomically (``atomic_write``);
    ``read_arrays`` reads it back."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    return atomic_write(target, write)


class ArrayFileError(UserError):
    """An ``.npz`` of arrays (a codebook, a saved probe) that is not what it claims to be. Names the file."""


# Deflate expands at most about 1,032-fold: a member declaring more than this per stored byte lies.
DEFLATE_RATIO = 1100


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, nothing executable (no pickles), each member's header checked
    against the bytes the member holds before anything is allocated: a forged header that declares
    terabytes is refused, not read. Any fault is one ``ArrayFileError`` naming the file."""
    path = Path(path)
    arrays = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name == info.filename:
                    raise ValueError(f"member {info.filename!r} is not a .npy array")
                if info.compress_size > size or info.file_size > DEFLATE_RATIO * info.compress_size + (1 << 20):
                    raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes in {info.compress_size}")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"member {info.filename!r} has .npy format version {version}")
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                    if dtype.hasobject:
                        raise ValueError(f"member {info.filename!r} holds Python objects")
                    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize + member.tell()
                    if declared > info.file_size:
                        raise ValueError(f"{name!r} declares shape {shape} of {dtype} ({declared} bytes) in a member of {info.file_size}")
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, zlib.error) as error:
        raise ArrayFileError(f"{path} is not a readable array file ({type(error).__name__}: {error})") from None
    return arrays


class GuardedFile(io.RawIOBase):
    """A file for ``h5py.File(fileobj)`` that keeps the first write error instead of handing
    it to HDF5. HDF5 cannot close a file whose writes failed, and the process then dies in
    the library's exit handler (a segfault on a full disk); this way the file closes, and
    ``check()`` raises the error afterwards."""

    def __init__(self, path: Path):
        self._file = open(path, "w+b", buffering=0)
        self.path = path
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self._file.write(data)
            except OSError as error:
                self.error = error
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._file.truncate(size)
            except OSError as error:
                self.error = error
        return self.tell() if size is None else size

    def close(self) -> None:
        self._file.close()
        super().close()

    def check(self) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(self.path))
