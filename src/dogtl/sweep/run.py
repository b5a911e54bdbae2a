"""`dogtl sweep`: many head trainings on one feature cache, ranked by validation log loss.

A sweep is a search space (`searchspace.py`) expanded to trials (grid, or a seeded random
sample), each evaluated on the cache's validation split or on K stratified folds of all
labelled images (the cache holds every pass of every labelled image, so folds cost no
re-extraction). Each (trial, fold) run is written to `OUT/trials/<key>.json` the moment it
finishes (atomically), so an interrupted sweep resumes by skipping them; the key hashes the
trial's settings, the fold and the cache fingerprint.

Why it is fast (measured by benchmarks/bench_sweep.py):
- One process per worker for the whole sweep: TensorFlow starts, and the cache is read,
  once per worker, not once per trial.
- Trials sharing hidden layers, batch size and optimizer train side by side in one graph
  (`fusedheads.py`): one model build and graph trace per group, batched matrix products.
- With `--jobs N` each worker gets cores/N TensorFlow threads, so N workers do not
  oversubscribe the cores; `--backend` picks any joblib backend (dask: other machines).

Outputs in OUT: results.csv (sorted by validation log loss), best.toml (the best trial's
settings, for `dogtl train-head --config`), sweep.png (each parameter against validation
log loss) and sweep.json (what was swept, to recognise a resumed sweep).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.head.settings import HeadConfig
from dogtl.sweep.space import SearchSpace, build_space, format_value, grid, sample, trial_config

log = logging.getLogger(__name__)

DEFAULT_FUSE = 8
NOT_SETTINGS = ("out", "force")  # HeadConfig fields that say nothing about the training


@dataclass(frozen=True)
class SweepConfig:
    """Every setting of a sweep (the search space itself comes from `space` and `params`)."""

    cache: str = "cache/features.h5"
    out: str | None = None  # None: sweeps/sweep-<hash of the sweep's settings>
    space: str | None = None  # TOML or JSON file
    params: tuple = ()  # "name=v1,v2" options
    trials: int | None = None  # random search; None: the whole grid
    folds: int | None = None  # K-fold cross-validation; None: the cache's validation split
    epochs: int | None = None  # base epochs per trial (the space may set its own)
    jobs: int = 1
    backend: str | None = None  # joblib backend; None: in this process (jobs 1) or loky
    scheduler: str | None = None  # dask scheduler address
    seed: int = 2018  # random search and folds
    fuse: int = DEFAULT_FUSE  # most trials in one graph; 1: each trial alone (head.fit_head)
    force: bool = False

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(self.params or ()))
        if self.trials is not None and self.trials < 1:
            raise DogtlError(f"--trials {self.trials} must be at least 1")
        if self.folds is not None and self.folds < 2:
            raise DogtlError(f"--folds {self.folds} must be at least 2 "
                             "(leave it out to use the cache's validation split)")
        if self.epochs is not None and self.epochs < 1:
            raise DogtlError(f"--epochs {self.epochs} must be at least 1")
        if self.jobs == 0 or self.jobs < -1:
            raise DogtlError(f"--jobs {self.jobs}: give 1 or more workers, or -1 for one per core")
        if self.fuse < 1:
            raise DogtlError(f"--fuse {self.fuse} must be at least 1")
        if self.scheduler and self.backend != "dask":
            raise DogtlError("--scheduler is the address of a Dask scheduler: pass it with --backend dask")


@dataclass
class SweepResult:
    out: Path
    results: object  # pandas DataFrame, one row per trial, best first
    best_settings: dict | None
    results_path: Path
    best_path: Path | None
    plot_path: Path | None
    trials: int
    runs: int  # (trial, fold) trainings run now
    skipped: int  # found finished from an earlier run
    dropped: list = field(default_factory=list)  # combinations train-head would refuse
    seconds: float = 0.0
    macs: float = 0.0  # multiply-adds of the runs done now
    fused_runs: int = 0


# -- folds -----------------------------------------------------------------------------------

def make_folds(labels: np.ndarray, is_val: np.ndarray, folds: int | None,
               seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) per fold: the cache's own split, or K stratified,
    disjoint folds covering every labelled row once."""
    from sklearn.model_selection import StratifiedKFold

    labels, is_val = np.asarray(labels), np.asarray(is_val, bool)
    if not folds:
        return [(np.flatnonzero(~is_val), np.flatnonzero(is_val))]
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < folds:
        k = int(np.flatnonzero(counts == present.min())[0])
        raise DogtlError(f"--folds {folds}: class #{k} has only {present.min()} labelled image(s); "
                         f"every class needs at least one per fold (use --folds {max(2, present.min())} or fewer)"
                         if present.min() >= 2 else
                         f"--folds {folds}: class #{k} has a single labelled image; cross-validation needs "
                         "at least 2 per class (leave out --folds to use the cache's validation split)")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in splitter.split(np.zeros(len(labels)), labels)]


# -- identities, records ---------------------------------------------------------------------

def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def training_settings(config: HeadConfig) -> dict:
    """The settings that determine a trial's training (cache included, out/force not)."""
    settings = asdict(config)
    for name in NOT_SETTINGS:
        settings.pop(name, None)
    settings["hidden"] = list(config.hidden)
    return settings


def trial_key(config: HeadConfig, fingerprint: dict, folds: int | None, seed: int) -> str:
    settings = training_settings(config)
    settings.pop("cache")  # the fingerprint identifies the features, wherever the file is
    return _digest({"settings": settings, "cache": fingerprint, "folds": folds or 0,
                    "fold_seed": seed if folds else None})[:12]


def head_macs(dim: int, hidden, num_classes: int) -> int:
    """Multiply-adds of one feature vector through the head's Dense layers."""
    sizes = [dim, *hidden, num_classes]
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


# -- the work, on whichever worker runs it ----------------------------------------------------

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
        key = (passes, _digest(rows.tolist()))
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


def _worker_data(path: str) -> _WorkerData:
    from dogtl.features.cache import open_cache

    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _DATA:
        _DATA.clear()
        cache = open_cache(path)
        _DATA[key] = _WorkerData(load_labelled(cache), np.asarray(cache.labels, np.int32), len(cache.classes))
    return _DATA[key]


def _set_threads(threads: int | None, host_threads: dict | None = None) -> None:
    """Give this worker's TensorFlow `threads` threads (before TensorFlow starts; later calls are no-ops)."""
    if host_threads is not None:  # dask: the cores of this machine shared by its dask worker threads
        import socket

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


def _record(unit: dict, outcome, n_train: int, n_val: int, dim: int, num_classes: int, fused: bool) -> dict:
    config = HeadConfig(**unit["settings"])
    resolved = config.resolve(n_train)
    epochs = int(outcome["metrics"].get("epochs_run") or 0)
    per_row = head_macs(dim, config.hidden, num_classes)
    macs = epochs * (3 * resolved.steps_per_epoch * resolved.batch_size + n_val) * per_row
    return {**unit, **outcome, "fused": fused, "macs": macs, "train_images": n_train, "val_images": n_val}


def run_task(task: dict, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the runs of one task (one fold; several trials, fused when they can be) and return
    their records. Runs on a joblib/dask worker or in the calling process."""
    from dogtl.sweep.fused import NotFusable, TrialOutcome, fuse_key, train_fused
    from dogtl.head.train import fit_head

    _set_threads(task.get("threads"), task.get("host_threads"))
    data = _worker_data(task["cache"])
    train_rows, val_rows = np.asarray(task["train_rows"]), np.asarray(task["val_rows"])
    units = task["units"]
    configs = [HeadConfig(**u["settings"]) for u in units]
    dim = data.features.shape[2]
    shape = (len(train_rows), len(val_rows), dim, data.num_classes)
    records = []

    def done(unit, outcome: TrialOutcome, fused: bool):
        record = _record(unit, {"metrics": outcome.metrics, "history": outcome.history,
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


# -- planning --------------------------------------------------------------------------------

def plan_tasks(units: list[dict], folds: list, fuse: int, jobs: int) -> list[dict]:
    """Group pending runs into tasks: runs of one fold with equal `fuse_key` share a task of at
    most `fuse` runs; big groups are split until there is a task for every worker."""
    from dogtl.sweep.fused import fuse_key

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


def _spec(config: SweepConfig, space: SearchSpace, cache_path: Path, fingerprint: dict, base: dict) -> dict:
    return {"cache": str(cache_path.resolve()), "cache_fingerprint": _digest(fingerprint)[:16],
            "space": space.to_json(), "trials": config.trials, "folds": config.folds,
            "seed": config.seed, "base": {k: v for k, v in base.items() if k != "cache"}}


def _resolvable(trials: list[dict], base: dict, train_sizes: list[int]):
    """The trials whose automatic settings resolve on every fold (a default base rate, scaled with
    the batch size, may land above a searched max rate), with their HeadConfigs; and why others not."""
    kept, configs, refused = [], [], []
    for trial in trials:
        config = trial_config(base, trial)
        try:
            for rows in train_sizes:
                config.resolve(rows)
        except DogtlError as e:
            refused.append(str(e))
            continue
        kept.append(trial)
        configs.append(config)
    if not kept:
        raise DogtlError(f"no trial of the space is a valid train-head setting here (e.g. {refused[0]})")
    return kept, configs, refused


def _prepare_out(config: SweepConfig, spec: dict) -> Path:
    """The sweep folder: new, or holding this very sweep (resumed); another sweep needs --force."""
    out = Path(config.out) if config.out else Path("sweeps") / f"sweep-{_digest(spec)[:8]}"
    spec_path = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise DogtlError(f"--out {out} is a file: give a folder for the sweep")
    if spec_path.exists():
        try:
            old = json.loads(spec_path.read_text()).get("spec")
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old != spec and not config.force:
            what = "another" if old is not None else "a damaged"
            raise DogtlError(f"{out} holds {what} sweep (its sweep.json differs): pass --force to replace it "
                             "or choose another --out")
        if config.force:
            shutil.rmtree(out / "trials", ignore_errors=True)
    elif out.is_dir() and any(out.iterdir()) and not config.force:
        raise DogtlError(f"{out} is not empty and holds no sweep: pass --force to use it or choose another --out")
    (out / "trials").mkdir(parents=True, exist_ok=True)
    # spec: what identifies the sweep; settings: how it was last run (jobs, backend... may change)
    _write_json_atomic(spec_path, {"spec": spec, "settings": asdict(config)})
    return out


def _job_count(jobs: int) -> int:
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


def _execute(config: SweepConfig, tasks: list[dict], on_record: Callable[[dict], None]) -> None:
    """Run the tasks in this process (jobs 1, no backend) or on joblib workers."""
    if not tasks:
        return
    if config.jobs == 1 and config.backend is None:
        for task in tasks:
            run_task({**task, "threads": None}, on_done=on_record)
        return
    import joblib

    jobs = _job_count(config.jobs)
    client = None
    backend = config.backend or "loky"
    extra = {"threads": max(1, joblib.cpu_count() // jobs)}
    if backend == "dask":
        client = _dask_client(config.scheduler, jobs)
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


# -- results ---------------------------------------------------------------------------------

def summarise(records: list[dict], trials: list[dict], keys: list[str], space: SearchSpace):
    """One row per trial: its parameters, mean and spread over folds, time; best first."""
    import pandas as pd

    by_trial: dict = {}
    for r in records:
        by_trial.setdefault(r["trial"], []).append(r)
    rows = []
    for trial, key in zip(trials, keys):
        runs = by_trial.get(key)
        if not runs:
            continue
        loss = np.array([r["metrics"]["val_log_loss"] for r in runs], float)
        acc = np.array([r["metrics"]["val_accuracy"] for r in runs], float)
        errors = sorted({r["error"] for r in runs if r.get("error")})
        row = {"trial": key}
        row.update({name: format_value(trial.get(name)) for name in space.names})
        row.update({
            "val_log_loss": float(loss.mean()),
            "val_log_loss_std": float(loss.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "val_accuracy": float(acc.mean()),
            "val_accuracy_std": float(acc.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "epochs_run": float(np.mean([r["metrics"].get("epochs_run", 0) for r in runs])),
            "best_epoch": float(np.mean([r["metrics"].get("best_epoch", 0) for r in runs])),
            "seconds": float(sum(r["seconds"] for r in runs)),
            "folds": len(runs), "error": "; ".join(errors),
        })
        rows.append(row)
    columns = ["trial", *space.names, "val_log_loss", "val_log_loss_std", "val_accuracy", "val_accuracy_std",
               "epochs_run", "best_epoch", "seconds", "folds", "error"]
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.sort_values("val_log_loss", na_position="last", kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_best_config(settings: dict, path: Path, comment: str = "") -> None:
    """The best trial's settings as TOML that `dogtl train-head --config FILE` reads (None values,
    which mean train-head's default, are left out)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"{name} = {_toml_value(value)}" for name, value in settings.items() if value is not None]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def plot_sweep(frame, names: list[str], path: Path) -> None:
    """One panel per searched parameter: its value against validation log loss (mean, with the
    spread over folds as error bars). Categorical values get one column each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[np.isfinite(frame["val_log_loss"].astype(float))]
    names = names or ["trial"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = ok[name].astype(str) if name in ok else ok["trial"].astype(str)
        numeric = _numeric(values)
        y = ok["val_log_loss"].astype(float).to_numpy()
        err = ok["val_log_loss_std"].astype(float).fillna(0).to_numpy()
        if numeric is not None:
            ax.errorbar(numeric, y, yerr=err if err.any() else None, fmt="o", alpha=0.75, capsize=2)
            positive = numeric[numeric > 0]
            if len(positive) == len(numeric) and len(numeric) and positive.max() / positive.min() >= 20:
                ax.set_xscale("log")
        else:
            labels = sorted(set(values), key=_natural)
            x = np.array([labels.index(v) for v in values], float)
            jitter = (np.random.default_rng(0).random(len(x)) - 0.5) * 0.15
            ax.errorbar(x + jitter, y, yerr=err if err.any() else None, fmt="o", alpha=0.75, capsize=2)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0)
        if len(y):
            best = int(np.argmin(y))
            ax.plot([numeric[best] if numeric is not None else x[best]], [y[best]], marker="*", markersize=14,
                    color="tab:red", linestyle="none", label="best")
        ax.set_xlabel(name)
        ax.set_ylabel("validation log loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{len(ok)} trials" + (f" ({len(frame) - len(ok)} diverged)" if len(frame) > len(ok) else ""))
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _natural(text: str):
    try:
        return (0, float(text.split("x")[0]), text)
    except ValueError:
        return (1, 0.0, text)


def _numeric(values):
    try:
        return np.array([float(v) for v in values], float)
    except ValueError:
        return None


# -- the command -----------------------------------------------------------------------------

def run_sweep(config: SweepConfig, progress: Callable[[dict], None] | None = None) -> SweepResult:
    """Expand the space, run every unfinished (trial, fold), then rank the trials and write
    results.csv, best.toml and sweep.png in the sweep folder.

    `progress` gets a dict after each finished run: done, total, skipped, record (the run),
    best (lowest validation log loss so far) and label (the trial's searched values)."""
    from dogtl.features.cache import open_cache

    started = time.perf_counter()
    space = build_space(config.space, config.params)
    check_backend(config.backend)
    cache = open_cache(config.cache)
    base = {"cache": str(cache.path)}
    if config.epochs is not None:
        base["epochs"] = config.epochs
    if config.trials:
        trials, dropped = sample(space, base, config.trials, config.seed)
    elif space.params:
        trials, dropped = grid(space, base)
    else:
        trials, dropped = [{}], []
    folds = make_folds(cache.labels, cache.is_val, config.folds, config.seed)
    for f, (train_rows, val_rows) in enumerate(folds):
        if not len(val_rows):
            raise DogtlError(f"{cache.path}: has no validation images (extracted with --val-fraction 0?); "
                             "pass --folds K or re-extract with --val-fraction 0.1")
        if len(np.unique(cache.labels[train_rows])) < 2:
            raise DogtlError(f"{cache.path}: the training rows hold fewer than two classes; add images")
    trials, configs, refused = _resolvable(trials, base, [len(train) for train, _ in folds])
    dropped += refused
    spec = _spec(config, space, cache.path, cache.fingerprint, base)
    out = _prepare_out(config, spec)
    trial_dir = out / "trials"
    keys = [trial_key(c, cache.fingerprint, config.folds, config.seed) for c in configs]
    first = {}  # trials that come out identical (e.g. layers=0 with any hidden size) run once
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    keep = sorted(first.values())
    keys, trials, configs = [keys[i] for i in keep], [trials[i] for i in keep], [configs[i] for i in keep]

    records, pending = [], []
    for key, trial, c in zip(keys, trials, configs):
        for f in range(len(folds)):
            unit_key = f"{key}-f{f}"
            path = trial_dir / f"{unit_key}.json"
            if path.exists():
                try:
                    records.append(json.loads(path.read_text()))
                    continue
                except json.JSONDecodeError:
                    log.warning("%s is damaged; running that trial again", path)
            pending.append({"key": unit_key, "trial": key, "fold": f, "params": trial,
                            "settings": training_settings(c)})
    skipped = len(records)
    total = len(keys) * len(folds)
    jobs = _job_count(config.jobs)
    tasks = plan_tasks(pending, folds, config.fuse, jobs)
    for task in tasks:
        task["cache"] = str(Path(config.cache).resolve())
    labels = {k: ", ".join(f"{n}={format_value(t.get(n))}" for n in space.searched) or "defaults"
              for k, t in zip(keys, trials)}
    state = {"done": skipped, "best": min([r["metrics"]["val_log_loss"] for r in records
                                           if math.isfinite(r["metrics"]["val_log_loss"])], default=math.inf),
             "macs": 0.0, "fused": 0}
    if progress:
        progress({"done": skipped, "total": total, "skipped": skipped, "record": None, "best": state["best"],
                  "label": None})

    def on_record(record: dict) -> None:
        _write_json_atomic(trial_dir / f"{record['key']}.json", record)
        records.append(record)
        state["done"] += 1
        state["macs"] += record["macs"]
        state["fused"] += bool(record["fused"])
        loss = record["metrics"]["val_log_loss"]
        if math.isfinite(loss):
            state["best"] = min(state["best"], loss)
        if progress:
            progress({"done": state["done"], "total": total, "skipped": skipped, "record": record,
                      "best": state["best"], "label": labels.get(record["trial"], "")})

    _execute(config, tasks, on_record)

    frame = summarise(records, trials, keys, space)
    results_path = out / "results.csv"
    tmp = results_path.with_name("results.csv.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, results_path)
    best_settings, best_path, plot_path = None, None, None
    finite = frame[np.isfinite(frame["val_log_loss"].astype(float))]
    if len(finite):
        best = finite.iloc[0]
        best_settings = training_settings(configs[keys.index(best["trial"])])
        best_path = out / "best.toml"
        how = (f"{config.folds}-fold cross-validation" if config.folds else "the cache's validation split")
        write_best_config(best_settings, best_path,
                          f"dogtl sweep {out}: best of {len(frame)} trials on {how}\n"
                          f"validation log loss {best['val_log_loss']:.4f}, accuracy {best['val_accuracy']:.4f}\n"
                          f"train it: dogtl train-head --config {best_path}")
        plot_path = out / "sweep.png"
        plot_sweep(frame, space.searched, plot_path)
    return SweepResult(out, frame, best_settings, results_path, best_path, plot_path, len(keys),
                       len(records) - skipped, skipped, dropped, time.perf_counter() - started, state["macs"],
                       state["fused"])
