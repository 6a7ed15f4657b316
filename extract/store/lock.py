"""One writer per store: an exclusive ``flock`` that dies with its holder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from extract.store.schema import StoreLockedError


class StoreLock:
    """An exclusive lock on ``<store>.lock`` for the one process that writes a store.

    ``fcntl.flock`` is dropped by the kernel when its holder dies, so a lock left by a
    killed process is simply taken over. The file holds the holder's PID, for the message
    another writer gets, and is removed on release (a writer that locked a file already
    unlinked from the folder notices and locks the new one).
    """

    def __init__(self, store: str | Path):
        self.store = Path(store)
        self.path = self.store.with_name(self.store.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise StoreLockedError(
                    f"{self.store} is being written by {who} (lock {self.path}); "
                    "wait for it to finish or stop it, then rerun: the store has one writer at a time"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it while we waited for it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
