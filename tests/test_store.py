"""The feature store: round trip, refusal to mix settings, bad images, and resume after real kills."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from baselines.hog import HOGFeaturizer
from extract.datasets import load_dataset
from extract.images import ImageDecodeError
from extract.pipeline import extract_to_store
from extract.store import SCHEMA_VERSION, FeatureStore, StoreError, StoreMismatchError, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


def _extract(tree, out, **kwargs):
    dataset = load_dataset(f"folder:{tree}")
    featurizer = kwargs.pop("featurizer", None) or HOGFeaturizer(32)
    return dataset, featurizer, extract_to_store(dataset, featurizer, out, progress=False, **kwargs)


def test_round_trip(image_tree, tmp_path):
    dataset, featurizer, path = _extract(image_tree, tmp_path / "shapes" / "hog.h5")
    with FeatureStore(path) as store:
        assert store.dataset == "shapes" and store.extractor == "hog"
        assert store.taps == ["hog"] and store.classes == ["circle", "square"]
        assert len(store) == len(dataset) == 24
        assert list(store.paths) == list(dataset.paths)
        np.testing.assert_array_equal(store.labels, dataset.labels)
        assert sorted(set(store.splits)) == ["test", "train"]
        assert store.fingerprint == json.loads(json.dumps(featurizer.fingerprint()))
        assert store.skipped == []
        features = store.features("hog")
        assert features.dtype == np.float32 and features.shape == (24, featurizer.dims["hog"])
        np.testing.assert_allclose(features[5], featurizer.prepare(dataset.read(5)), rtol=1e-6)
    with h5py.File(path) as raw:
        assert raw.attrs["schema_version"] == SCHEMA_VERSION and bool(raw.attrs["complete"])
        assert raw["layers/hog"].compression == "gzip" and raw["layers/hog"].chunks[1] == featurizer.dims["hog"]
    assert not path.with_name("hog.h5.partial").exists()


def test_up_to_date_store_is_not_rewritten(image_tree, tmp_path):
    _, _, path = _extract(image_tree, tmp_path / "hog.h5")
    before = path.stat().st_mtime_ns
    _extract(image_tree, path)
    assert path.stat().st_mtime_ns == before


def test_other_settings_are_refused_then_overwritten(image_tree, tmp_path):
    _, _, path = _extract(image_tree, tmp_path / "hog.h5")
    with pytest.raises(StoreMismatchError, match=r"side: 32 in the store, 40 now"):
        _extract(image_tree, path, featurizer=HOGFeaturizer(40))
    with FeatureStore(path) as store:  # the old store is intact
        assert store.fingerprint["side"] == 32
    _extract(image_tree, path, featurizer=HOGFeaturizer(40), overwrite=True)
    with FeatureStore(path) as store:
        assert store.fingerprint["side"] == 40


def test_other_image_list_is_refused(image_tree, tmp_path):
    _, _, path = _extract(image_tree, tmp_path / "hog.h5")
    smaller = load_dataset(f"folder:{image_tree}", limit=4)
    with pytest.raises(StoreMismatchError, match="another list of images"):
        extract_to_store(smaller, HOGFeaturizer(32), path, progress=False)


def test_corrupt_image_is_named_or_skipped(image_tree, tmp_path):
    bad = image_tree / "train" / "square" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(ImageDecodeError, match=r"train/square/002\.jpg"):
        _extract(image_tree, tmp_path / "hog.h5")
    assert not (tmp_path / "hog.h5").exists()
    _, _, path = _extract(image_tree, tmp_path / "hog.h5", on_error="skip")
    with FeatureStore(path) as store:
        assert len(store) == 23
        (skipped_path, reason), = store.skipped
        assert skipped_path == "train/square/002.jpg"
        assert "truncated" in reason.lower()
        assert "train/square/002.jpg" not in set(store.paths)


def test_unreadable_store_is_named(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(StoreError, match="broken.h5"):
        FeatureStore(path)


def test_unreadable_shard_is_redone(image_tree, tmp_path):
    dataset = load_dataset(f"folder:{image_tree}")
    featurizer = HOGFeaturizer(32)
    path = tmp_path / "hog.h5"
    with StoreWriter(path, dataset=dataset, extractor="hog", fingerprint=featurizer.fingerprint(), taps=["hog"]) as writer:
        rows = writer.pending_rows()[:8]
        writer.write_shard(rows, {"hog": np.stack([featurizer.prepare(dataset.read(int(r))) for r in rows])})
    shard, = path.with_name("hog.h5.partial").glob("shard-*.npz")
    shard.write_bytes(b"garbage")
    extract_to_store(dataset, featurizer, path, progress=False)
    with FeatureStore(path) as store:
        assert len(store) == 24
        np.testing.assert_allclose(store.features("hog")[0], featurizer.prepare(dataset.read(0)), rtol=1e-6)


# -- real interruptions -------------------------------------------------------------------------

EXTRACT = [sys.executable, "-m", "extract", "features", "--model", "efficientnet_lite0", "--layers", "stage3,pre_logits",
           "--batch-size", "4", "--checkpoint-seconds", "0", "--no-progress", "--threads", "2"]


def _run(tree, features_dir, **kwargs):
    return subprocess.Popen([*EXTRACT, "--dataset", f"folder:{tree}", "--features-dir", str(features_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_shards(partial: Path, count: int, process, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"extraction ended before it could be interrupted:\n{process.stdout.read()}")
        if len(list(partial.glob("shard-*.npz"))) >= count:
            return
        time.sleep(0.05)
    pytest.fail("no shards appeared")


@pytest.fixture(scope="module")
def kill_tree(tmp_path_factory):
    from conftest import make_image_tree

    return make_image_tree(tmp_path_factory.mktemp("kill") / "shapes", per_class={"train": 40, "test": 20})


@pytest.mark.slow
def test_resume_after_kill_9_and_ctrl_c(kill_tree, tmp_path):
    features = tmp_path / "features"
    store = features / "shapes" / "efficientnet_lite0.h5"
    partial = store.with_name(store.name + ".partial")

    first = _run(kill_tree, features)
    _wait_for_shards(partial, 3, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not store.exists()
    done_after_kill = sum(len(np.load(s)["rows"]) for s in partial.glob("shard-*.npz"))
    assert 0 < done_after_kill < 120

    second = _run(kill_tree, features)
    _wait_for_shards(partial, len(list(partial.glob("shard-*.npz"))) + 3, second)
    second.send_signal(signal.SIGINT)
    output, _ = second.communicate(timeout=60)
    assert second.returncode == 130, output
    assert "rerun" in output
    done_after_interrupt = sum(len(np.load(s)["rows"]) for s in partial.glob("shard-*.npz"))
    assert done_after_kill < done_after_interrupt < 120

    third = _run(kill_tree, features)
    output, _ = third.communicate(timeout=300)
    assert third.returncode == 0, output
    assert "resuming" in output

    clean_dir = tmp_path / "clean"
    clean = _run(kill_tree, clean_dir)
    output, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, output
    with FeatureStore(store) as resumed, FeatureStore(clean_dir / "shapes" / "efficientnet_lite0.h5") as reference:
        assert len(resumed) == len(reference) == 120
        assert list(resumed.paths) == list(reference.paths)  # no row lost, none duplicated, same order
        for tap in ("stage3", "pre_logits"):
            np.testing.assert_allclose(resumed.features(tap), reference.features(tap), rtol=1e-4, atol=1e-5)
    assert not partial.exists()
