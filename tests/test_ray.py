"""Extraction on Ray workers (issue #14): the same stores as one process, whatever the number of
workers and the order batches come back in; resume across kills of the driver and of a worker.

Real Ray (a local cluster of 2 CPUs started once for the module's tests), real processes, real
kills. The driver is this process, or ``python -m ...`` in a subprocess where it is killed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from baselines.hog import HOGFeaturizer  # noqa: E402
from extract.datasets import load_dataset  # noqa: E402
from extract.errors import UserError  # noqa: E402
from extract.images import read_image  # noqa: E402
from extract.pipeline import extract_to_store  # noqa: E402
from extract.store import FeatureStore, StoreWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
ENV.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from conftest import make_image_tree

    return make_image_tree(tmp_path_factory.mktemp("ray") / "shapes", per_class={"train": 12, "test": 6}, size=48)


def _same_store(path: Path, reference: Path, *, atol: float = 1e-5) -> None:
    with FeatureStore(path) as got, FeatureStore(reference) as want:
        assert list(got.paths) == list(want.paths)  # same rows, same order: none lost, none twice
        assert got.fingerprint == want.fingerprint and got.taps == want.taps
        assert got.skipped == want.skipped
        for tap in want.taps:
            np.testing.assert_allclose(got.features(tap), want.features(tap), rtol=1e-5, atol=atol)
        for stat in want.stats:
            np.testing.assert_allclose(got.stat(stat), want.stat(stat), rtol=1e-5)
    left = [p.name for p in path.parent.iterdir() if p.name.startswith((f"{path.name}.", f".{path.name}."))]
    assert left == []  # no lock, no .partial, no temporary file


@pytest.mark.slow
def test_cnn_features_from_1_2_3_workers_equal_one_process(ray_cluster, tree, tmp_path):
    from extract.extractor import CNNFeaturizer

    dataset = load_dataset(f"folder:{tree}")
    featurizer = CNNFeaturizer("efficientnet_lite0", layers="stage1,pre_logits", batch_size=8)
    reference = extract_to_store(dataset, featurizer, tmp_path / "local" / "lite0.h5", progress=False)
    for workers in (1, 2, 3):
        path = extract_to_store(dataset, featurizer, tmp_path / f"ray{workers}" / "lite0.h5", progress=False, workers=workers,
                                checkpoint_seconds=0)  # a shard per batch, in the order batches finish
        _same_store(path, reference)
        with FeatureStore(path) as store:
            assert store.run["ray_workers"] == workers


@pytest.mark.slow
def test_views_from_2_workers_equal_one_process(ray_cluster, tree, tmp_path):
    """A views featurizer travels as its arguments (views included) and each worker decodes at its min_side."""
    from extract.extractor import CNNFeaturizer

    dataset = load_dataset(f"folder:{tree}")
    featurizer = CNNFeaturizer("efficientnet_lite0", layers="stage1,pre_logits", batch_size=4, views="crops10")
    reference = extract_to_store(dataset, featurizer, tmp_path / "local" / "lite0.h5", progress=False)
    path = extract_to_store(dataset, featurizer, tmp_path / "ray" / "lite0.h5", progress=False, workers=2, checkpoint_seconds=0)
    _same_store(path, reference)
    with FeatureStore(path) as store:
        assert store.fingerprint["views"]["name"] == "crops10" and len(store) == len(dataset)


def test_store_begun_by_one_process_is_finished_by_ray(ray_cluster, tree, tmp_path):
    dataset, featurizer = load_dataset(f"folder:{tree}"), HOGFeaturizer(32)
    reference = extract_to_store(dataset, featurizer, tmp_path / "local" / "hog.h5", progress=False)
    store = tmp_path / "mixed" / "hog.h5"
    with StoreWriter(store, dataset=dataset, extractor=featurizer.name, fingerprint=featurizer.fingerprint(), taps=featurizer.taps) as writer:
        rows = writer.pending_rows()[[0, 3, 4, 20]]  # any rows: shards hold any set
        writer.write_shard(rows, featurizer([featurizer.prepare(dataset.read(int(r))) for r in rows]))
    extract_to_store(dataset, featurizer, store, progress=False, workers=2)
    _same_store(store, reference)


@pytest.mark.slow
def test_baselines_with_a_codebook_through_ray_equal_the_local_path(ray_cluster, tree, tmp_path):
    from baselines.__main__ import run_baselines

    dataset = load_dataset(f"folder:{tree}")
    options = dict(preset="fast", words=8, processes=0, progress=False)
    local = run_baselines(dataset, ["vlad", "hog"], features_dir=tmp_path / "local", **options)
    distributed = run_baselines(dataset, ["vlad", "hog"], features_dir=tmp_path / "ray", workers=2, **options)
    for got, want in zip(distributed, local):
        with FeatureStore(got) as store:
            assert store.run["ray_workers"] == 2
        for leftover in got.parent.glob("*.codebook.npz"):  # learned once, here, and shipped
            leftover.unlink()
        _same_store(got, want)


def _unseen_by_workers(tree: Path, variable: str):
    """The tree's dataset, read from the folder that ``$variable`` names: set in this process after
    the cluster started, so the workers look for the images elsewhere, as on a node without the share."""
    dataset = load_dataset(f"folder:{tree}")
    relative = list(dataset.paths)

    def read(i, min_side=None):
        return read_image(Path(os.environ.get(variable, "/nonexistent-share")) / relative[i], min_side=min_side)

    return dataclasses.replace(dataset, read=read)


@pytest.mark.slow
def test_a_path_workers_cannot_read_is_named_and_ship_bytes_sends_it(ray_cluster, tree, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSHELF_TEST_SHARE", str(tree))
    dataset = _unseen_by_workers(tree, "OFFSHELF_TEST_SHARE")
    featurizer = HOGFeaturizer(32)
    with pytest.raises(UserError, match=r"^a Ray worker on \S+ cannot read /nonexistent-share/\S+\.jpg \(file not found\), "
                                        r"which this machine reads: .*or pass --ship-bytes") as error:
        extract_to_store(dataset, featurizer, tmp_path / "unseen" / "hog.h5", progress=False, workers=2, on_error="skip")
    assert "\n" not in str(error.value)
    store = extract_to_store(dataset, featurizer, tmp_path / "shipped" / "hog.h5", progress=False, workers=2, ship_bytes=True)
    reference = extract_to_store(load_dataset(f"folder:{tree}"), featurizer, tmp_path / "local" / "hog.h5", progress=False)
    _same_store(store, reference)


def test_unreadable_images_are_skipped_with_their_reason_by_workers(ray_cluster, tmp_path):
    from conftest import make_image_tree

    tree = make_image_tree(tmp_path / "broken", per_class={"train": 6, "test": 2}, size=40)
    bad = tree / "train" / "circle" / "002.jpg"
    bad.write_bytes(b"not a jpeg")
    dataset, featurizer = load_dataset(f"folder:{tree}"), HOGFeaturizer(32)
    reference = extract_to_store(dataset, featurizer, tmp_path / "local" / "hog.h5", progress=False, on_error="skip")
    # decoded from the shipped bytes, the reason is the one decoding the file gives
    store = extract_to_store(dataset, featurizer, tmp_path / "ray" / "hog.h5", progress=False, on_error="skip", workers=2, ship_bytes=True)
    _same_store(store, reference)
    with FeatureStore(store) as done:
        assert [p for p, _ in done.skipped] == ["train/circle/002.jpg"]


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"MapWorker(MapBatches(_Featurize))" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_the_run_completes(ray_cluster, tmp_path):
    from conftest import make_image_tree

    class SlowHOG(HOGFeaturizer):  # defined here, it travels to the workers by value
        """HOG at 40 ms an image, so that a run lasts long enough to kill a worker in it."""

        def prepare(self, image):
            time.sleep(0.04)
            return super().prepare(image)

    tree = make_image_tree(tmp_path / "many", per_class={"train": 80, "test": 40}, size=40)
    dataset, featurizer = load_dataset(f"folder:{tree}"), SlowHOG(32)
    featurizer.batch_size = 8
    store = tmp_path / "ray" / "hog.h5"
    partial = store.with_name("hog.h5.partial")
    killed: list[int] = []
    finished = threading.Event()

    def kill_one_worker_after_the_first_shard() -> None:
        while not finished.is_set() and not killed:
            pids = _actor_pids()
            if pids and any(partial.glob("shard-*.npz")):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_after_the_first_shard)
    killer.start()
    try:
        extract_to_store(dataset, featurizer, store, progress=False, workers=2, checkpoint_seconds=0)
    finally:
        finished.set()
        killer.join()
    assert killed, "no worker was killed: the run ended first"
    reference = extract_to_store(dataset, HOGFeaturizer(32), tmp_path / "local" / "hog.h5", progress=False)
    _same_store(store, reference)


@pytest.fixture(scope="module")
def killed_tree(tmp_path_factory):
    """180 images and their one-process store: the reference of the driver-kill runs."""
    from conftest import make_image_tree
    from extract.extractor import CNNFeaturizer

    tree = make_image_tree(tmp_path_factory.mktemp("killed") / "many", per_class={"train": 60, "test": 30}, size=40)
    featurizer = CNNFeaturizer("efficientnet_lite0", layers="pre_logits", batch_size=4)
    reference = extract_to_store(load_dataset(f"folder:{tree}"), featurizer, tree.parent / "reference" / "lite0.h5", progress=False)
    return tree, reference


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        found = _stat(int(entry.name)) if entry.name.isdigit() else None
        if found is not None:
            children.setdefault(found[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return sorted(found)


def _alive(pids) -> list[int]:
    return [p for p in pids if (_stat(p) or ("Z",))[0] not in ("Z", "X")]


@pytest.mark.slow
def test_a_killed_driver_resumes_with_no_row_lost_or_twice(killed_tree, tmp_path):
    """SIGKILL of the driver's process group after its first shards takes the Ray cluster it
    started with it at once, workers too (each in a process group of its own); a rerun in one
    process finishes the store (Ray finishing a store begun elsewhere is the test above; both
    directions share the writer's resume)."""
    tree, reference = killed_tree
    features = tmp_path / "features"
    command = [sys.executable, "-m", "extract", "features", "--dataset", f"folder:{tree}", "--features-dir", str(features),
               "--layers", "pre_logits", "--batch-size", "4", "--checkpoint-seconds", "0", "--no-progress"]
    partial = features / "many" / "efficientnet_lite0.h5.partial"
    driver = subprocess.Popen([*command, "--workers", "2"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(partial.glob("shard-*.npz"))) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        cluster = _descendants(driver.pid)
        workers = [p for p in cluster if os.getpgid(p) != driver.pid]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert len(cluster) >= 4 and workers, cluster  # GCS, raylet, agents; and the workers in groups of their own
    deadline = time.monotonic() + 1.0
    while _alive(cluster) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _alive(cluster) == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in _alive(cluster)]
    done = sum(len(np.load(shard)["rows"]) for shard in partial.glob("shard-*.npz"))
    assert 0 < done < 180
    rerun = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"resuming \S+: \d+ of 180 rows already done", rerun.stderr)
    _same_store(features / "many" / "efficientnet_lite0.h5", reference)
