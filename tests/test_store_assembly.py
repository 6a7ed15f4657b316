"""Assembling a store compresses its chunks in threads: the file holds exactly what h5py's own
(single-threaded) gzip would have written, whatever order the shards' rows come in."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from extract.store import chunks
from extract.datasets import load_dataset
from extract.store import CHUNK_BYTES, FeatureStore, StoreWriter

WIDE = CHUNK_BYTES // (4 * 3)  # 3 rows per chunk: the 24 images fill 8 chunks, the 22 kept ones 7 and an edge chunk of 1


@pytest.fixture
def dataset(image_tree):
    return load_dataset(f"folder:{image_tree}")  # 24 images


@pytest.fixture
def compressed_here(monkeypatch) -> list[int]:
    """Rows of each chunk that the store compressed itself (in its threads) rather than through h5py."""
    calls: list[int] = []
    real = chunks.shuffle_deflate

    def counted(chunk, *args):
        calls.append(len(chunk))
        return real(chunk, *args)

    monkeypatch.setattr(chunks, "shuffle_deflate", counted)
    return calls


def features(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"wide": np.maximum(rng.normal(size=(n, WIDE)), 0).astype(np.float32),
            "narrow": rng.normal(size=(n, 5)).astype(np.float32)}


def assemble(dataset, path, shards: list[np.ndarray], values: dict[str, np.ndarray], skipped=()) -> None:
    with StoreWriter(path, dataset=dataset, extractor="x", fingerprint={"x": 1}, taps=["narrow", "wide"]) as writer:
        for rows in shards:
            writer.write_shard(rows, {k: v[rows] for k, v in values.items()}, [s for s in skipped if s[0] in rows])
        for row, reason in skipped:
            if not any(row in rows for rows in shards):
                writer.write_shard([], {k: v[:0] for k, v in values.items()}, [(row, reason)])
        writer.finalize()


def h5py_chunks(array: np.ndarray, chunk_rows: int, tmp_path) -> list[bytes]:
    """The stored bytes of each chunk when h5py itself compresses ``array``."""
    with h5py.File(tmp_path / "reference.h5", "w") as f:
        f.create_dataset("a", data=array, chunks=(chunk_rows, array.shape[1]), compression="gzip", compression_opts=4, shuffle=True)
    with h5py.File(tmp_path / "reference.h5", "r") as f:
        return [f["a"].id.read_direct_chunk((row, 0))[1] for row in range(0, len(array), chunk_rows)]


def test_in_order_shards_give_h5py_s_own_chunks(dataset, tmp_path, compressed_here):
    n = len(dataset)
    values = features(n)
    skipped = [(5, "broken"), (17, "broken")]
    kept = np.asarray([r for r in range(n) if r not in (5, 17)])
    assemble(dataset, tmp_path / "s.h5", [kept[:7], kept[7:8], kept[8:20], kept[20:]], values, skipped)
    with FeatureStore(tmp_path / "s.h5") as store, h5py.File(tmp_path / "s.h5", "r") as f:
        for name in ("wide", "narrow"):
            np.testing.assert_array_equal(store.features(name), values[name][kept])
        wide = f["layers/wide"]
        assert wide.chunks == (3, WIDE) and wide.compression == "gzip" and wide.shuffle
        stored = [wide.id.read_direct_chunk((row, 0))[1] for row in range(0, len(kept), 3)]
        assert stored == h5py_chunks(values["wide"][kept], 3, tmp_path)  # the edge chunk too
    assert sorted(compressed_here) == [3] * 8 + [22]  # every chunk, wide (the edge one padded) and narrow (one chunk)


def test_shards_out_of_order_are_assembled_through_h5py(dataset, tmp_path, compressed_here):
    n = len(dataset)
    values = features(n, seed=1)
    rows = np.arange(n)
    # scattered rows from the first shard on
    assemble(dataset, tmp_path / "s.h5", [rows[12:], rows[[0, 2, 4, 6]], rows[[1, 3, 5, 7, 8, 9, 10, 11]]], values)
    with FeatureStore(tmp_path / "s.h5") as store:
        for name in ("wide", "narrow"):
            np.testing.assert_array_equal(store.features(name), values[name])
    assert compressed_here == []


def test_shards_in_order_then_out_of_order_switch_to_h5py_without_losing_a_row(dataset, tmp_path, compressed_here):
    values = features(len(dataset), seed=2)
    rows = np.arange(len(dataset))
    # Shards are read in the order of their first row: 13 rows in order (4 wide chunks compressed here,
    # one row carried), then scattered rows, as a resumed run that redid skipped rows leaves them.
    assemble(dataset, tmp_path / "s.h5", [rows[:7], rows[7:13], rows[[13, 15, 17, 19]], rows[[14, 16, 18]], rows[20:]], values)
    with FeatureStore(tmp_path / "s.h5") as store:
        for name in ("wide", "narrow"):
            np.testing.assert_array_equal(store.features(name), values[name])
    assert compressed_here == [3, 3, 3, 3]
