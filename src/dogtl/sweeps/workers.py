"""Running a sweep's tasks: in this process, on joblib workers, or on a Dask cluster.

A task is the runs of one fold that can share one graph (`plan_tasks`). Each worker process
reads the cache once (`_worker_data`) and gives TensorFlow its share of the cores."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.features.multicache import as_paths, open_caches
from dogtl.head.settings import HeadConfig
from dogtl.head.train import fit_head
from dogtl.sweeps.fused import NotFusable, TrialOutcome, fuse_key, train_fused
from dogtl.sweeps.records import digest, make_record

log = logging.getLogger(__name__)


@dataclass
class _WorkerData:
    features: np.ndarray  # [passes, rows, dim], the cache's precision
    labels: np.ndarray
    num_classes: int
    tensor: object = None  # the features as one TensorFlow tensor, made on first use
    subsets: dict = field(default_factory=dict)

    def as_tensor(self):
        if self.tensor is None:
            import tensorflow as tf

            self.tensor = tf.convert_to_tensor(self.features)
        return self.tensor

    def subset(self, rows: np.ndarray, passes: int) -> np.ndarray:
        """features[:passes, rows], kept for the next trial on the same fold."""
        key = (passes, digest(rows.tolist()))
        if key not in self.subsets:
            self.subsets.clear()
            self.subsets[key] = self.features[:passes, rows]
        return self.subsets[key]


_DATA: dict = {}  # one cache per worker process, loaded on its first task


def load_labelled(cache) -> np.ndarray:
    """Every labelled pass [passes, rows, dim], float16 if the cache stores float16 (half the memory)."""
    store = np.float16 if cache.fingerprint.get("dtype") == "float16" else np.float32
    out = np.empty((cache.num_passes, len(cache.labels), cache.feature_dim), store)
    for p in range(cache.num_passes):
        out[p] = cache.features("labelled", passes=[p])[0]
    if not all(np.isfinite(out[p]).all() for p in range(len(out))):
        raise DogtlError(f"{cache.path}: features contain NaN or infinity; re-extract with --force")
    return out


def _worker_data(path) -> _WorkerData:
    key = tuple((str(Path(p).resolve()), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in as_paths(path))
    if key not in _DATA:
        _DATA.clear()
        cache = open_caches(path)
        _DATA[key] = _WorkerData(load_labelled(cache), np.asarray(cache.labels, np.int32), len(cache.classes))
    return _DATA[key]


def _set_threads(threads: int | None, host_threads: dict | None = None) -> None:
    """Give this worker's TensorFlow `threads` threads (before TensorFlow starts; later calls are no-ops)."""
    if host_threads is not None:  # dask: the cores of this machine shared by its dask worker threads
        try:
            from distributed import get_worker

            host = get_worker().address.split("://")[-1].rsplit(":", 1)[0]
        except (ImportError, ValueError):
            host = socket.gethostname()
        threads = max(1, (os.cpu_count() or 1) // max(1, host_threads.get(host, 1)))
    if not threads:
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import tensorflow as tf

    try:
        if tf.config.threading.get_intra_op_parallelism_threads() != threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:  # TensorFlow already started in this process: keep its threads
        log.debug("TensorFlow threads already set in process %d", os.getpid())


def run_task(task: dict, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the runs of one task (one fold; several trials, fused when they can be) and return
    their records. Runs on a joblib/dask worker or in the calling process."""
    _set_threads(task.get("threads"), task.get("host_threads"))
    data = _worker_data(task["cache"])
    train_rows, val_rows = np.asarray(task["train_rows"]), np.asarray(task["val_rows"])
    units = task["units"]
    configs = [HeadConfig(**u["settings"]) for u in units]
    dim = data.features.shape[2]
    shape = (len(train_rows), len(val_rows), dim, data.num_classes)
    records = []

    def done(unit, outcome: TrialOutcome, fused: bool):
        record = make_record(unit, {"metrics": outcome.metrics, "history": outcome.history,
                                "seconds": outcome.seconds, "error": outcome.error}, *shape, fused=fused)
        records.append(record)
        if on_done:
            on_done(record)

    if task["fuse"] and fuse_key(configs[0]) is not None:
        try:
            train_fused(configs, data.as_tensor(), data.labels, train_rows, val_rows, data.num_classes,
                        on_done=lambda i, outcome: done(units[i], outcome, True))
            return records
        except NotFusable as e:  # raised before any training: train them one by one instead
            log.warning("training %d trial(s) one at a time: the fused path does not reproduce %s", len(units), e)
    val_x = data.features[0, val_rows].astype(np.float32)
    val_y, train_y = data.labels[val_rows], data.labels[train_rows]
    for unit, config in zip(units, configs):
        started = time.perf_counter()
        train_x = data.subset(train_rows, 1 if config.clean_only else data.features.shape[0])
        try:
            fit = fit_head(config, train_x, train_y, val_x, val_y, data.num_classes)
            outcome = TrialOutcome(config, fit.metrics, fit.history.to_dict("records"))
        except DogtlError as e:  # diverged: a result of the sweep, not a failure of it
            nan = float("nan")
            outcome = TrialOutcome(config, {"val_accuracy": nan, "val_log_loss": nan, "epochs_run": 0,
                                            "best_epoch": 0}, [], error=str(e))
        outcome.seconds = time.perf_counter() - started
        done(unit, outcome, False)
    return records


def plan_tasks(units: list[dict], folds: list, fuse: int, jobs: int) -> list[dict]:
    """Group pending runs into tasks: runs of one fold with equal `fuse_key` share a task of at
    most `fuse` runs; big groups are split until there is a task for every worker."""
    buckets: dict = {}
    for unit in units:
        key = fuse_key(HeadConfig(**unit["settings"])) if fuse > 1 else None
        bucket = (unit["fold"], key if key is not None else ("single", unit["key"]))
        buckets.setdefault(bucket, []).append(unit)
    chunks = []
    for (fold, key), members in buckets.items():
        size = fuse if key and key[0] != "single" else 1
        chunks += [(fold, key, members[i:i + size]) for i in range(0, len(members), size)]
    while len(chunks) < jobs:
        biggest = max(range(len(chunks)), key=lambda i: len(chunks[i][2]), default=None)
        if biggest is None or len(chunks[biggest][2]) < 2:
            break
        fold, key, members = chunks.pop(biggest)
        half = (len(members) + 1) // 2
        chunks += [(fold, key, members[:half]), (fold, key, members[half:])]
    chunks.sort(key=lambda c: -len(c[2]))  # big groups first: better balance across workers
    return [{"fold": fold, "units": members, "fuse": fuse > 1 and key is not None and key[0] != "single",
             "train_rows": folds[fold][0], "val_rows": folds[fold][1]} for fold, key, members in chunks]


def job_count(jobs: int) -> int:
    """--jobs as a number of workers (-1: one per core)."""
    import joblib

    return joblib.cpu_count() if jobs == -1 else jobs


def check_backend(backend: str | None) -> None:
    """Refuse an unknown joblib backend, or dask without the extra, before any work. Whether
    joblib knows the name (its own backends and any added with `joblib.register_parallel_backend`)
    is joblib's public answer: `parallel_config` raises ValueError for an unknown one."""
    if backend is None:
        return
    if backend == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise DogtlError("--backend dask needs Dask: pip install 'dogtl[dask]'") from None
        return
    import joblib

    try:
        with joblib.parallel_config(backend=backend):
            pass
    except ValueError:
        raise DogtlError(f"--backend {backend}: not a joblib backend; choose one of "
                         "dask, loky, multiprocessing, sequential, threading") from None


def _dask_client(scheduler: str | None, jobs: int):
    """A client of the scheduler at `scheduler`, or of a local cluster of `jobs` one-thread workers."""
    from distributed import Client

    try:
        if scheduler:
            return Client(scheduler, timeout="20s")
        logging.getLogger("distributed").setLevel(logging.WARNING)  # a cluster the user did not ask to watch
        return Client(n_workers=max(1, jobs), threads_per_worker=1, processes=True, dashboard_address=None)
    except (OSError, TimeoutError) as e:
        raise DogtlError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({e})") from None


def _dask_host_threads(client) -> dict:
    threads: dict = {}
    for address, info in client.scheduler_info().get("workers", {}).items():
        host = info.get("host") or address.split("://")[-1].rsplit(":", 1)[0]
        threads[host] = threads.get(host, 0) + int(info.get("nthreads", 1))
    return threads


def execute(tasks: list[dict], on_record: Callable[[dict], None], jobs: int = 1, backend: str | None = None,
            scheduler: str | None = None) -> None:
    """Run the tasks in this process (jobs 1, no backend) or on `jobs` workers of a joblib
    `backend` (dask: on the cluster at `scheduler`, or a local one)."""
    if not tasks:
        return
    if jobs == 1 and backend is None:
        for task in tasks:
            run_task({**task, "threads": None}, on_done=on_record)
        return
    import joblib

    jobs = job_count(jobs)
    client = None
    backend = backend or "loky"
    extra = {"threads": max(1, joblib.cpu_count() // jobs)}
    if backend == "dask":
        client = _dask_client(scheduler, jobs)
        extra = {"threads": None, "host_threads": _dask_host_threads(client)}
    try:
        with joblib.parallel_config(backend=backend):
            parallel = joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")
            for records in parallel(joblib.delayed(run_task)({**task, **extra}) for task in tasks):
                for record in records:
                    on_record(record)
    finally:
        if client is not None:
            client.close()
