"""Decode and featurize on a Ray cluster; this process stays the one writer of the stores.

``extract_group(..., workers=N, ray_address=ADDR)`` takes its batches from here instead of
from local threads. The driver turns the rows still to do into a Ray Data dataset (one
block per batch of row indices, or with ``ship_bytes`` of row indices and each image's
encoded bytes), and ``map_batches`` runs them through a pool of ``N`` stateful actors
(``_Featurize``): each actor builds the featurizers once (a CNN featurizer pickles as its
arguments and is rebuilt there; fitted codebooks travel once through the object store),
checks that its fingerprint equals the driver's, then per batch reads, prepares and
featurizes, and returns one pickled record: the rows, the rows that decoded, one
``{layer: features}`` per store, and the decode errors. The driver writes the records into
the stores' shards in whatever order they arrive (each row carries its index; the store's
assembly orders rows), so resume, the lock, the fingerprint check and the atomic
publication are the local path's.

Resources: one actor per GPU (``num_gpus=1``) when the cluster has GPUs; otherwise each
actor asks a fraction of a CPU, so that the actors never take every CPU from the tasks
Ray Data itself runs (whole-CPU actors on a 2-CPU cluster deadlocked), and limits its own
TensorFlow, BLAS and OpenCV threads to its share of the machine. A killed actor is
restarted by Ray (``RESTARTS`` times) and its batches are recomputed; a killed driver
loses only the rows since its last shard.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import warnings
from contextlib import ExitStack

import numpy as np

from extract.parallel import host_cores
from extract.errors import UserError
from extract.images import MISSING, ImageDecodeError, decode_array, encoded_image, shipped_bytes

log = logging.getLogger(__name__)

RESTARTS = 4  # per actor, and retries per batch: a worker killed mid-run is replaced and its batches redone
CPU_SHARE = 0.5  # of the cluster's CPUs the actors ask for together (at most 1 CPU each); the rest is Ray Data's
SHIP_BYTES = "--ship-bytes (SHIP_BYTES=1)"
CONNECT_SECONDS = 5.0  # for a HOST:PORT to answer at all; ray.init waits on one where nothing listens


def _quiet_environment() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no internet here, and none needed
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # not its notes on actor arguments, which this module keeps alive


def connect(stack: ExitStack, address: str | None):
    """``ray.init``: the cluster at ``address`` (``auto``: the one this machine belongs to), or a
    local one with this machine's CPUs. A cluster started here is shut down on leaving ``stack``."""
    _quiet_environment()
    try:
        import ray
    except ImportError:
        raise UserError("workers / RAY_ADDRESS need Ray: pip install -e '.[ray]' (ray[data]==2.60.0)") from None
    if ray.is_initialized():
        return ray
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address:
            check_listening(address)
            ray.init(address=address, **options)
        else:
            os.environ.pop("RAY_ADDRESS", None)  # or ray.init would join that cluster instead
            ray.init(num_cpus=host_cores(), **fate_sharing(), **options)
    except ConnectionError as error:
        raise UserError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address!r} ({error}); start one with "
                        "`ray start --head`, or leave RAY_ADDRESS unset for a local one") from None
    stack.callback(ray.shutdown)
    return ray


def fate_sharing() -> dict:
    """``ray.init`` options by which a local cluster dies with this process. Its GCS and raylet do
    already (Ray starts them with ``PR_SET_PDEATHSIG``); its workers, each in a process group of its
    own, noticed the raylet gone only 2-10 s later. So each worker of this job asks the kernel, as it
    starts, for SIGKILL when the raylet dies, and none is prestarted before the job (it would not)."""
    if not sys.platform.startswith("linux"):
        return {}

    def die_with_the_raylet() -> None:  # defined in here, it travels by value: workers run it before they can import offshelf
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG

    return {"runtime_env": {"worker_process_setup_hook": die_with_the_raylet},
            "_system_config": {"enable_worker_prestart": False, "prestart_worker_first_driver": False}}


def check_listening(address: str, seconds: float = CONNECT_SECONDS) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) where nothing accepts a connection within ``seconds``
    is one line here; ``auto`` and other forms are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
        return
    except TimeoutError:
        reason = f"no answer in {seconds:g} s"
    except OSError as error:
        reason = error.strerror or str(error)
    raise UserError(f"no Ray cluster answers at RAY_ADDRESS={address!r} ({reason}); start one with `ray start --head`, "
                    "or leave RAY_ADDRESS unset for a local one")


def plan(resources: dict, workers: int | None) -> tuple[int, dict, int]:
    """(actors, their Ray resources, threads each) for a cluster with ``resources``."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if workers is None:
        workers = gpus if gpus else max(1, int(cpus // 2))
    if gpus:
        return workers, {"num_gpus": 1, "num_cpus": min(1.0, CPU_SHARE * cpus / workers)}, max(1, int(cpus // workers))
    return workers, {"num_cpus": min(1.0, CPU_SHARE * cpus / workers)}, max(1, round(cpus / workers))


def _limit_threads(threads: int) -> None:
    """This worker's share of the machine: TensorFlow's, BLAS/OpenMP's and OpenCV's thread pools."""
    from extract.litert import limit_threads
    from extract.parallel import limit_native_threads

    threads = max(1, min(threads, host_cores()))
    limit_native_threads(threads)
    limit_threads(threads)
    if "tensorflow" not in sys.modules:  # read when TensorFlow starts, if it does (a cached LiteRT model needs none)
        os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow has started its thread pools already
        pass


class _Featurize:
    """A Ray Data actor: the featurizers, built once; per batch of rows, one pickled record."""

    def __init__(self, job, fingerprints, threads: int, ship_bytes: bool):
        import ray

        _limit_threads(threads)
        self.dataset, self.prepare, self.featurizers, self.positions, self.min_side = ray.get(job[0])
        for featurizer, expected in zip(self.featurizers, fingerprints):
            from extract.store import check_same_settings

            check_same_settings(expected, featurizer.fingerprint(), subject=f"a Ray worker on {socket.gethostname()} would compute {featurizer.name} "
                                "otherwise than the driver", fix="Install the same packages and weights on every node.")
        self.ship_bytes = ship_bytes
        # A batch's images are decoded and prepared in threads, as in one process (its share of
        # the cores plus two for file reads): a GPU worker would otherwise wait on one core decoding.
        from extract.parallel import decode_pool

        self.threads = decode_pool(threads + 2)

    def _read(self, row: int, kind: str | None, data: bytes | None) -> np.ndarray:
        if kind == "array":
            return decode_array(data)
        if kind == "file":
            with shipped_bytes(data):
                return self.dataset.read(row, min_side=self.min_side)
        return self.dataset.read(row, min_side=self.min_side)

    def _prepared(self, row: int, kind: str | None, data: bytes | None):
        """One image's prepared items (one per store), or its decode error."""
        try:
            image = self._read(row, kind, data)
        except ImageDecodeError as error:
            return error
        prepared = self.prepare(image)
        return [prepared[p] for p in self.positions]

    def __call__(self, batch: dict) -> dict:
        rows = [int(r) for r in batch["row"]]
        kinds = batch["kind"] if self.ship_bytes else [None] * len(rows)
        blobs = batch["data"] if self.ship_bytes else [None] * len(rows)
        good, items, errors = [], [], []
        for row, result in zip(rows, self.threads.map(self._prepared, rows, kinds, blobs)):
            if isinstance(result, ImageDecodeError):
                errors.append((row, result.path, result.reason))
            else:
                items.append(result)
                good.append(row)
        parts = [f([item[j] for item in items]) if items else None for j, f in enumerate(self.featurizers)]
        record = pickle.dumps((rows, good, parts, errors, socket.gethostname()), protocol=5)
        return {"record": np.array([record], dtype=object)}


def user_error(error: BaseException) -> UserError | None:
    """The ``UserError`` a worker raised, from under Ray's wrappers."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


class RayBatches:
    """The batches of ``extract_group`` computed by ``workers`` Ray actors, in the order they finish:
    ``(rows, good_rows, parts, errors)``. ``workers``: how many actors were used. A context of its
    own: ``close()`` stops the pipeline and shuts down a cluster started here."""

    def __init__(self, dataset, featurizers, todo, prepare, batches, *, workers, address, ship_bytes, on_error):
        self.dataset, self.todo, self.on_error = dataset, todo, on_error
        self.names = [[*featurizers[i].taps, *getattr(featurizers[i], "stats", [])] for i in todo]
        self._stack = ExitStack()
        try:
            self._iter = self._run(dataset, featurizers, todo, prepare, batches, workers, address, ship_bytes)
        except BaseException:
            self._stack.close()
            raise
        self.workers = self._workers

    def _run(self, dataset, featurizers, todo, prepare, batches, workers, address, ship_bytes):
        connect(self._stack, address)  # a started or joined cluster; `import ray.data` binds `ray` too
        import pyarrow as pa
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.enable_auto_log_stats = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # one block per batch: a small run has fewer batches than workers, and that is fine
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
        self._workers, resources, threads = plan(ray.cluster_resources(), workers)
        members = [featurizers[i] for i in todo]
        min_side = featurizers[0].min_side
        job = ray.put((dataset, prepare, members, todo, min_side))
        self._early: list = []  # rows the driver could not read itself (--ship-bytes)
        blocks = []
        for rows in batches:
            columns = {"row": pa.array(rows, pa.int64())}
            if ship_bytes:
                kept, kinds, data = [], [], []
                for row in rows:
                    try:
                        kind, blob = encoded_image(dataset.read, int(row), min_side=min_side)
                    except ImageDecodeError as error:
                        error.row = int(row)
                        self._early.append(error)
                        continue
                    kept.append(row)
                    kinds.append(kind)
                    data.append(blob)
                if not kept:
                    continue
                columns = {"row": pa.array(kept, pa.int64()), "kind": pa.array(kinds, pa.string()), "data": pa.array(data, pa.large_binary())}
            blocks.append(ray.put(pa.table(columns)))
        log.info("Ray: %d workers, each %s, %d threads%s", self._workers, resources, threads, ", images shipped from here" if ship_bytes else "")
        if not blocks:
            return iter(())
        with warnings.catch_warnings():  # Ray 2.60 deprecates max_restarts here, and has no named parameter for it yet
            warnings.simplefilter("ignore", DeprecationWarning)
            data = ray.data.from_arrow_refs(blocks).map_batches(
                _Featurize, batch_size=max(len(b) for b in batches), batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self._workers),
                fn_constructor_kwargs={"job": [job], "fingerprints": [f.fingerprint() for f in members], "threads": threads,
                                       "ship_bytes": ship_bytes},
                max_restarts=RESTARTS, max_task_retries=RESTARTS, **resources)
        return data.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)

    def __iter__(self):
        if self._early:
            rows = [e.row for e in self._early]
            yield rows, [], [None] * len(self.todo), self._early
        try:
            for batch in self._iter:
                for record in batch["record"]:
                    yield self._unpack(record)
        except Exception as error:
            user = user_error(error)
            if user is None:
                raise
            raise type(user)(*user.args) if not isinstance(user, ImageDecodeError) else user from None

    def _unpack(self, record: bytes):
        rows, good, parts, errors, host = pickle.loads(record)
        decode_errors = []
        for row, path, reason in errors:
            error = ImageDecodeError(path, reason)
            error.row = row
            if self._readable_here(row, reason):
                raise UserError(f"a Ray worker on {host} cannot read {path} ({reason}), which this machine reads: workers open "
                                f"images by path, so every worker needs them at the same path (a shared file system), "
                                f"or pass {SHIP_BYTES} to send each image's bytes from here")
            decode_errors.append(error)
        parts = [{name: part[name] for name in names} if part is not None else {} for part, names in zip(parts, self.names)]
        return rows, good, parts, decode_errors

    def _readable_here(self, row: int, reason: str) -> bool:
        if not (reason.startswith(MISSING) or reason.startswith("PermissionError")):
            return False
        try:
            self.dataset.read(row, min_side=64)
        except ImageDecodeError:
            return False
        return True

    def close(self) -> None:
        try:
            close = getattr(getattr(self, "_iter", None), "close", None)
            if close is not None:  # stops the pipeline and its actors, even on a cluster that stays up
                close()
        finally:
            self._stack.close()
