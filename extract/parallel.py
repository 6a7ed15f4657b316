"""Threads and processes: how many cores this process has, the decoding thread pool, spawned
worker processes and the native (BLAS, OpenMP, OpenCV) thread pools of a worker.

Workers are spawned, never forked: a child forked after the parent used OpenMP (as
scikit-learn's k-means does) can wait forever. A job given to a process pool is pickled once to
a file that each worker reads once (``run_pickled_job``), not once per task.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 2


def decode_threads() -> int:
    """Decoding threads by default: one per core, plus two that cover waits on file reads.
    A GPU host has many cores and a model that needs none of them: every one decodes."""
    return host_cores() + 2


def decode_pool(threads: int | None = None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads or decode_threads(), thread_name_prefix="decode")


_JOBS: dict[str, object] = {}


def limit_native_threads(blas: int) -> None:
    """A worker process's BLAS/OpenMP pools to ``blas`` threads and OpenCV's to one: the worker's
    callers (a process pool, Ray) supply the parallelism."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(blas)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def _one_native_thread() -> None:
    """Spawned workers: one BLAS/OpenMP thread each (the pool supplies the parallelism)."""
    limit_native_threads(1)


def run_pickled_job(job_file: str, image: np.ndarray):
    job = _JOBS.get(job_file)
    if job is None:  # first task of this job in this worker
        _JOBS.clear()
        with open(job_file, "rb") as handle:
            job = _JOBS[job_file] = pickle.load(handle)
    return job(image)


def process_pool(processes: int) -> ProcessPoolExecutor:
    """``processes`` spawned workers (never forked; see the module docstring)."""
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_one_native_thread)
