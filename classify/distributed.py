"""Probe jobs as Ray tasks, on the cluster ``make extract WORKERS=N`` / ``RAY_ADDRESS=`` uses.

``RayJobs`` joins or starts the cluster through ``extract.distributed.connect`` (the same
``RAY_ADDRESS`` handling, fate sharing and one-line errors) and runs ``Evaluation`` jobs, one
(layer, classifier, normalisation) per task, in place of the local worker processes. The
evaluation a job needs (settings, protocol, the store's path and identity) travels once through
the object store; each task reads its layer's rows from the store path itself, as a local worker
process does, so a remote cluster needs the stores, and the results folder its tasks write the
predictions into, at the same paths on every node (a shared file system). A task whose worker is
killed is run again (``RESTARTS`` times): a killed worker costs only time.
"""

from __future__ import annotations

import socket
from pathlib import Path

from extract.distributed import RESTARTS, connect, user_error
from extract.errors import UserError


def _job_on_node(function, evaluation, job, driver: str):
    """``function(evaluation, job)`` in a Ray task; a node without the store at its path says so in one line."""
    if not Path(evaluation.path).is_file():
        raise UserError(f"a Ray worker on {socket.gethostname()} finds no store at {evaluation.path}, which {driver} reads: "
                        "tasks read each store by its path, so every node needs FEATURES_DIR and RESULTS_DIR at the same "
                        "paths (a shared file system); or probe on this machine, without WORKERS / RAY_ADDRESS")
    return function(evaluation, job)


class RayJobs:
    """Ray tasks on the cluster at ``address`` (a local one of this machine's CPUs without it), ``workers``
    at once (default: one per CPU of the cluster), each asking one CPU, or up to ``widest`` (the
    workers one node holds) for a task that spreads its C search's splits over processes. A cluster
    started here is shut down on leaving ``stack``."""

    def __init__(self, stack, workers: int | None, address: str | None):
        self.ray = connect(stack, address)
        self.workers = workers or max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        node_cpus = max((int(node["Resources"].get("CPU", 0)) for node in self.ray.nodes() if node["Alive"]), default=1)
        self.widest = max(1, min(self.workers, node_cpus))
        self._task = self.ray.remote(max_retries=RESTARTS)(_job_on_node)

    def map(self, function, evaluation, jobs, at_once: int, cpus: int = 1):
        """``function(evaluation, job)`` of each of ``jobs`` as Ray tasks of ``cpus`` CPUs, at most ``at_once``
        running; their results in the order of ``jobs``, each as soon as it and those before it are done."""
        task = self._task.options(num_cpus=cpus)
        ray, driver = self.ray, socket.gethostname()
        shared = ray.put(evaluation)
        todo, running, finished, submitted = iter(jobs), {}, {}, []
        try:
            while True:
                while len(running) < at_once and (job := next(todo, None)) is not None:
                    running[task.remote(function, shared, job, driver)] = len(submitted)
                    submitted.append(job)
                if len(finished) + len(running) == 0:
                    return
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    finished[running.pop(ref)] = ref
                given = len(submitted) - len(running) - len(finished)
                while given in finished:
                    yield self._result(finished.pop(given), submitted[given])
                    given += 1
        finally:
            for ref in running:  # the caller stopped (an error, an interrupted run): the tasks it started too
                ray.cancel(ref)

    def _result(self, ref, job):
        """A task's result; a ``UserError`` it raised as itself, one line, not under Ray's wrappers, and so
        a worker lost on every attempt."""
        lost = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except (lost.WorkerCrashedError, lost.OutOfMemoryError, lost.NodeDiedError) as error:
            raise UserError(f"the Ray worker of probe job {'/'.join(job)} died on each of {RESTARTS + 1} attempts "
                            f"({type(error).__name__}): killed, by hand or for memory; give the workers more memory, or "
                            "run fewer at once (WORKERS) or in a smaller MEMORY_BUDGET") from None
        except Exception as error:
            user = user_error(error)
            if user is None:
                raise
            raise type(user)(*user.args) from None
