"""Parallel gzip: a store's rows compressed in threads into whole HDF5 chunks."""

from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from extract.store.schema import GZIP_LEVEL


def shuffle_deflate(chunk: np.ndarray, level: int = GZIP_LEVEL) -> bytes:
    """One chunk through HDF5's shuffle filter, then its deflate filter (zlib at ``level``): the bytes
    h5py would store for it (``shuffle=True, compression="gzip"``)."""
    raw = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1, chunk.dtype.itemsize)
    return zlib.compress(np.ascontiguousarray(raw.T).tobytes(), level)


class ChunkWriter:
    """Rows of a new (n, D) dataset chunked by whole rows, shuffled and gzipped, arriving in blocks.

    While blocks come in row order from row 0, whole chunks are compressed in ``pool``'s threads
    (zlib lets go of the GIL) and stored as they are (``write_direct_chunk``); h5py alone compresses
    on one thread, which at GPU extraction rates took longer than the extraction. Rows out of that
    order (a resumed run's shards) go through h5py from then on. ``close()`` writes what is left."""

    def __init__(self, dataset, pool: ThreadPoolExecutor):
        self.dataset, self.pool = dataset, pool
        self.chunk_rows = dataset.chunks[0]
        self.direct = dataset.chunks[1] == dataset.shape[1]
        self.next_row = 0  # rows before it are written or being compressed; always a chunk boundary
        self.carry: list[np.ndarray] = []  # rows from next_row on: less than a chunk
        self.carried = 0
        self.in_flight: deque = deque()
        self.max_in_flight = 2 * pool._max_workers + 2  # compressed chunks waiting: a few MB at most

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows ``start .. start + len(block)``."""
        if not (self.direct and start == self.next_row + self.carried):
            self._leave_direct()
            self.dataset[start : start + len(block)] = block
            return
        self.carry.append(block)
        self.carried += len(block)
        if self.carried < self.chunk_rows:
            return
        rows = np.concatenate(self.carry)
        whole = len(rows) - len(rows) % self.chunk_rows
        for offset in range(0, whole, self.chunk_rows):
            self._submit(self.next_row + offset, rows[offset : offset + self.chunk_rows])
        self.next_row += whole
        self.carry = [rows[whole:]] if whole < len(rows) else []
        self.carried = len(rows) - whole

    def write_rows(self, where: np.ndarray, block: np.ndarray) -> None:
        """Rows at the increasing positions ``where``, not contiguous."""
        self._leave_direct()
        self.dataset[where] = block

    def _submit(self, row: int, chunk: np.ndarray) -> None:
        self.in_flight.append((row, self.pool.submit(shuffle_deflate, chunk)))
        while len(self.in_flight) > self.max_in_flight:
            self._store_one()

    def _store_one(self) -> None:
        row, future = self.in_flight.popleft()
        self.dataset.id.write_direct_chunk((row, 0), future.result())

    def _leave_direct(self) -> None:
        while self.in_flight:
            self._store_one()
        if self.carried:
            self.dataset[self.next_row : self.next_row + self.carried] = np.concatenate(self.carry)
            self.next_row += self.carried
            self.carry, self.carried = [], 0
        self.direct = False

    def close(self) -> None:
        if self.direct and self.carried and self.next_row + self.carried == self.dataset.shape[0]:
            rows = np.concatenate(self.carry)  # the edge chunk: stored whole, zero beyond the last row
            padded = np.zeros((self.chunk_rows, *rows.shape[1:]), rows.dtype)
            padded[: len(rows)] = rows
            self._submit(self.next_row, padded)
            self.next_row += self.carried
            self.carry, self.carried = [], 0
        self._leave_direct()
