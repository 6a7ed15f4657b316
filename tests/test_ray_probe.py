"""Probes on Ray (issue #25 §4): ``python -m classify probe --workers 2`` writes the rows and
predictions of the same command run here, every number equal; a worker killed mid-job costs
only time; what cannot work is one line.

Real Ray (the local cluster of 2 CPUs of ``conftest.ray_cluster``), real stores, real kills.
``fit_seconds`` and ``created`` are the only columns that may differ between two runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ray")

from classify.cli import main as classify_main  # noqa: E402
from classify.evaluate import Evaluation, ProbeSettings, parse_protocol  # noqa: E402
from classify.probe import PARALLEL_MIN_ROWS  # noqa: E402
from extract.errors import UserError  # noqa: E402
from test_probe import _blobs, _store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# What two runs of the same probe may differ in: how long a fit took, and when the row was made.
VOLATILE_COLUMNS = ["fit_seconds", "created"]


def _layers(rows_per_class: int, *, wide: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Three classes, class c never in the training split (a warning per job); layers of rising signal,
    and with ``wide`` one of that many values (for the memory budget to stream)."""
    X, y = _blobs(n_per_class=rows_per_class, spread=0.4)
    splits = np.where((np.arange(len(y)) % 4 == 0) | (y == 2), "test", "train")
    rng = np.random.default_rng(3)
    layers = {name: X + rng.normal(0, noise, X.shape).astype(np.float32) for name, noise in (("low", 2.0), ("high", 0.0))}
    if wide:
        layers["wide"] = np.repeat(X, wide // X.shape[1], axis=1) + rng.normal(0, 1.0, (len(y), wide)).astype(np.float32)
    return layers, y, splits


def _probe(features: Path, results: Path, *options: str) -> pd.DataFrame:
    assert classify_main(["probe", "--dataset", "blobs", "--features-dir", str(features), "--results-dir", str(results),
                          "--classifier", "both", "--no-progress", *options]) == 0
    return pd.read_csv(results / "blobs" / "results.csv")


def _same_results(got: Path, want: Path) -> None:
    """results.csv row by row (all but ``VOLATILE_COLUMNS``), and every prediction file byte for byte."""
    a, b = pd.read_csv(got / "blobs" / "results.csv"), pd.read_csv(want / "blobs" / "results.csv")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a.drop(columns=VOLATILE_COLUMNS), b.drop(columns=VOLATILE_COLUMNS), check_exact=True)
    predictions = sorted(p.relative_to(want) for p in (want / "blobs" / "predictions").rglob("*.csv"))
    assert predictions and predictions == sorted(p.relative_to(got) for p in (got / "blobs" / "predictions").rglob("*.csv"))
    for path in predictions:
        assert (got / path).read_bytes() == (want / path).read_bytes(), path


def _ray_workers(pids) -> bool:
    return all(Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::") for pid in pids)


def test_probe_jobs_as_ray_tasks_write_the_rows_of_a_local_run(ray_cluster, tmp_path, caplog):
    """Two layers x two classifiers of a store large enough for local worker processes: with
    --workers 2 each job is a Ray task (its warnings arrive here from a Ray worker), every number the same."""
    layers, y, splits = _layers(PARALLEL_MIN_ROWS // 3 + 10)
    features = tmp_path / "features"
    _store(features / "blobs" / "toy.h5", layers["low"], y, splits, layers=layers)
    _probe(features, tmp_path / "local")
    caplog.clear()
    rows = _probe(features, tmp_path / "ray", "--workers", "2")
    warned = {r.process for r in caplog.records if "test classes have no training image" in r.getMessage()}
    assert len(rows) == 4 and warned and os.getpid() not in warned and _ray_workers(warned)
    _same_results(tmp_path / "ray", tmp_path / "local")


@pytest.mark.slow
def test_streamed_in_memory_and_few_shot_jobs_on_ray_equal_the_local_run(ray_cluster, tmp_path):
    """A memory budget under which the wide layer's fit streams (StreamingSGDProbe, chunked reads) and
    the others fit in memory, one job at a time (here, and on Ray as one task at a time, each
    spreading its C search's folds over 2 worker processes, as this process does: over
    PARALLEL_MIN_ROWS training rows); the given and the few-shot protocols: Ray's rows are the local ones."""
    layers, y, splits = _layers(PARALLEL_MIN_ROWS * 2 // 3 + 10, wide=8000)
    features = tmp_path / "features"
    _store(features / "blobs" / "toy.h5", layers["low"], y, splits, layers=layers)
    options = ["--memory-budget", "320M"]
    for protocol in ("given", "fewshot:2,5"):
        local = _probe(features, tmp_path / "local", *options, "--protocol", protocol)
        _probe(features, tmp_path / "ray", *options, "--protocol", protocol, "--workers", "2")
        _same_results(tmp_path / "ray", tmp_path / "local")
    given = local["protocol"] == "given"  # a few shots of the wide layer fit in memory
    assert set(local.loc[given & (local["layer"] == "wide"), "search"]) == {"stream"}
    assert set(local.loc[~given | (local["layer"] != "wide"), "search"]) == {"cv3"}
    assert set(local["protocol"]) == {"given", "2-shot", "5-shot"}


def test_a_worker_killed_in_a_job_costs_only_time(ray_cluster, tmp_path):
    """The task of one job kills its own worker process on its first attempt; Ray runs it again
    and the rows are those of the same jobs run here."""
    from classify.distributed import RayJobs

    marker = tmp_path / "killed-once"

    class KilledOnce(Evaluation):  # defined here, it travels to the workers by value
        def _job(self, job):
            if job == ("high", "svm", "standard") and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super()._job(job)

    layers, y, splits = _layers(PARALLEL_MIN_ROWS // 3 + 10)
    path = _store(tmp_path / "toy.h5", layers["low"], y, splits, layers=layers)
    settings, given = ProbeSettings(("logreg", "svm"), Cs=(0.01, 1.0, 100.0)), parse_protocol("given")
    local = Evaluation(path, given, settings).run(progress=False)
    with ExitStack() as stack:
        distributed = KilledOnce(path, given, settings, cluster=RayJobs(stack, 2, None)).run(progress=False)
    assert marker.exists() and int(marker.read_text()) != os.getpid()
    assert [{k: v for k, v in r.items() if k not in VOLATILE_COLUMNS} for r in distributed] == \
        [{k: v for k, v in r.items() if k not in VOLATILE_COLUMNS} for r in local]


@pytest.mark.slow  # five attempts, each a worker started and killed
def test_a_worker_killed_on_every_attempt_is_one_line(ray_cluster, tmp_path):
    from classify.distributed import RayJobs
    from extract.distributed import RESTARTS

    attempts = tmp_path / "attempts"

    class KilledAlways(Evaluation):
        def _job(self, job):
            with attempts.open("a") as record:
                record.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    layers, y, splits = _layers(10)
    path = _store(tmp_path / "toy.h5", layers["low"], y, splits)
    with ExitStack() as stack, pytest.raises(UserError, match=rf"^the Ray worker of probe job layer/logreg/standard died on each of "
                                                              rf"{RESTARTS + 1} attempts \(WorkerCrashedError\): killed, .*MEMORY_BUDGET$"):
        KilledAlways(path, parse_protocol("given"), ProbeSettings(), cluster=RayJobs(stack, 2, None)).run(progress=False)
    assert len(set(attempts.read_text().split())) == RESTARTS + 1  # each attempt in a worker of its own


def test_a_node_without_the_store_is_named_in_one_line(tmp_path):
    from classify.distributed import _job_on_node

    evaluation = Evaluation(tmp_path / "elsewhere" / "toy.h5", parse_protocol("given"), ProbeSettings())
    with pytest.raises(UserError, match=r"^a Ray worker on \S+ finds no store at \S+toy\.h5, which driver-host reads: .*shared file system") \
            as error:
        _job_on_node(lambda *_: None, evaluation, ("layer", "logreg", "standard"), "driver-host")
    assert "\n" not in str(error.value)


BLOCK_RAY = '''
import importlib.abc, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoRay())
from classify.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("without_ray, option, message", [
    (True, ["--workers", "2"], "error: workers / RAY_ADDRESS need Ray: pip install -e '.[ray]'"),
    (False, ["--ray-address", "127.0.0.1:1"], "error: no Ray cluster answers at RAY_ADDRESS='127.0.0.1:1' (Connection refused)"),
])
def test_no_ray_or_no_cluster_is_one_line(tmp_path, without_ray, option, message):
    layers, y, splits = _layers(10)
    _store(tmp_path / "features" / "blobs" / "toy.h5", layers["low"], y, splits, layers=layers)
    command = ["probe", "--dataset", "blobs", "--features-dir", str(tmp_path / "features"), "--results-dir", str(tmp_path / "results"),
               "--no-progress", *option]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", BLOCK_RAY, *command] if without_ray else [sys.executable, "-m", "classify", *command],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "results" / "blobs" / "results.csv").exists()
