"""`dogtl sweep`: many head trainings on one feature cache, ranked by validation log loss.

A sweep is a search space (`space.py`) expanded to trials (grid, or a seeded random
sample), each evaluated on the cache's validation split or on K stratified folds of all
labelled images (the cache holds every pass of every labelled image, so folds cost no
re-extraction). Each (trial, fold) run is written to `OUT/trials/<key>.json` the moment it
finishes (atomically), so an interrupted sweep resumes by skipping them; the key hashes the
trial's settings, the fold and the cache fingerprint.

Why it is fast (measured by benchmarks/bench_sweep.py):
- One process per worker for the whole sweep: TensorFlow starts, and the cache is read,
  once per worker, not once per trial.
- Trials sharing hidden layers, batch size and optimizer train side by side in one graph
  (`fused.py`): one trace per group, every trial's step in one step loop.
- With `--jobs N` each worker gets cores/N TensorFlow threads, so N workers do not
  oversubscribe the cores; `--backend` picks any joblib backend (dask: other machines).

Outputs in OUT: results.csv (sorted by validation log loss), best.toml (the best trial's
settings, for `dogtl train-head --config`), sweep.png (each parameter against validation
log loss) and sweep.json (what was swept, to recognise a resumed sweep).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.core.files import write_csv_atomic, write_json_atomic
from dogtl.core.locks import hold, writes
from dogtl.core.plots import plot_sweep
from dogtl.core.progress import Progress, ProgressEvent
from dogtl.features.multicache import as_paths, cache_value, open_caches
from dogtl.head.ensemble import ensemble_of_trials
from dogtl.sweeps.folds import make_folds
from dogtl.sweeps.records import digest, training_settings, trial_key
from dogtl.sweeps.results import summarise, write_best_config
from dogtl.sweeps.space import SearchSpace, build_space, format_value, grid, sample, trial_config
from dogtl.sweeps.workers import check_backend, execute, job_count, plan_tasks

from dogtl.sweeps.settings import SweepConfig

log = logging.getLogger(__name__)


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
    ensemble: object = None  # head.ensemble.EnsembleResult with --ensemble K


def _spec(config: SweepConfig, space: SearchSpace, cache, base: dict) -> dict:

    return {"cache": ", ".join(str(Path(p).resolve()) for p in as_paths(config.cache)),
            "cache_fingerprint": digest(cache.fingerprint)[:16],
            "space": space.to_json(), "trials": config.trials, "folds": config.folds,
            "seed": config.seed, "base": base, **({"folds_in_train": True} if config.folds_in_train else {}),
            **({"first": [dict(t) for t in config.first]} if config.first else {})}


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
    out = Path(config.out) if config.out else Path("sweeps") / f"sweep-{digest(spec)[:8]}"
    hold(out, "the sweep folder")
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
    write_json_atomic(spec_path, {"spec": spec, "settings": asdict(config)})
    return out


# -- the command -----------------------------------------------------------------------------

def _expand(config: SweepConfig, space: SearchSpace, base: dict) -> tuple[list[dict], list[str]]:
    """The trials to run (a random sample, the grid, or train-head's defaults) and the refused ones."""
    if config.trials:
        trials, dropped = sample(space, base, config.trials, config.seed)
        first = [dict(t) for t in config.first]
        return first + [t for t in trials if t not in first], dropped
    if space.params:
        return grid(space, base)
    return [{}], []


def _checked_folds(config: SweepConfig, cache) -> list:
    folds = make_folds(cache.labels, cache.is_val, config.folds, config.seed, config.folds_in_train)
    for train_rows, val_rows in folds:
        if not len(val_rows):
            raise DogtlError(f"{cache.path}: has no validation images (extracted with --val-fraction 0?); "
                             "pass --folds K or re-extract with --val-fraction 0.1")
        if len(np.unique(cache.labels[train_rows])) < 2:
            raise DogtlError(f"{cache.path}: the training rows hold fewer than two classes; add images")
    return folds


def _unique(keys: list, *columns: list) -> tuple[list, ...]:
    """Trials that come out identical (e.g. layers=0 with any hidden size) run once."""
    first: dict = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    keep = sorted(first.values())
    return tuple([column[i] for i in keep] for column in (keys, *columns))


def _finished_and_pending(keys, trials, configs, folds: int, trial_dir: Path) -> tuple[list[dict], list[dict]]:
    """Records of (trial, fold) runs an earlier run of this sweep finished, and the runs still to do."""
    records, pending = [], []
    for key, trial, c in zip(keys, trials, configs):
        for f in range(folds):
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
    return records, pending


@dataclass
class _Tally:
    """The sweep's progress as runs finish: each record is saved the moment it arrives."""

    trial_dir: Path
    records: list
    total: int
    labels: dict  # trial key -> its searched values, for progress lines
    progress: Progress | None
    skipped: int = 0
    macs: float = 0.0
    fused: int = 0
    best: float = math.inf

    def __post_init__(self):
        self.skipped = len(self.records)
        self.best = min([r["metrics"]["val_log_loss"] for r in self.records
                         if math.isfinite(r["metrics"]["val_log_loss"])], default=math.inf)
        self._report(None)

    @property
    def done(self) -> int:
        return len(self.records)

    def _report(self, record: dict | None) -> None:
        if self.progress:
            self.progress(ProgressEvent("sweep", self.done, self.total, "runs", detail={
                "skipped": self.skipped, "record": record, "best": self.best,
                "label": self.labels.get(record["trial"], "") if record else None}))

    def add(self, record: dict) -> None:
        write_json_atomic(self.trial_dir / f"{record['key']}.json", record)
        self.records.append(record)
        self.macs += record["macs"]
        self.fused += bool(record["fused"])
        if math.isfinite(record["metrics"]["val_log_loss"]):
            self.best = min(self.best, record["metrics"]["val_log_loss"])
        self._report(record)


def _write_best(config: SweepConfig, frame, settings: dict, cache, out: Path) -> Path:
    best, path = frame.iloc[0], out / "best.toml"
    how = f"{config.folds}-fold cross-validation" if config.folds else "the cache's validation split"

    write_best_config({"cache": cache_value(cache), **settings}, path,
                      f"dogtl sweep {out}: best of {len(frame)} trials on {how}\n"
                      f"validation log loss {best['val_log_loss']:.4f}, accuracy {best['val_accuracy']:.4f}\n"
                      f"train it: dogtl train-head --config {path}")
    return path


@writes
def run_sweep(config: SweepConfig, progress: Progress | None = None) -> SweepResult:
    """Expand the space, run every unfinished (trial, fold), then rank the trials and write
    results.csv, best.toml and sweep.png in the sweep folder.

    `progress` gets a ProgressEvent (unit "runs") first and after each finished run, its `detail`:
    skipped, record (the run), best (lowest validation log loss so far) and label (the trial's
    searched values)."""

    started = time.perf_counter()
    space = build_space(config.space, config.params)
    check_backend(config.backend)
    cache = open_caches(config.cache)
    base = {} if config.epochs is None else {"epochs": config.epochs}
    trials, dropped = _expand(config, space, base)
    folds = _checked_folds(config, cache)
    trials, configs, refused = _resolvable(trials, base, [len(train) for train, _ in folds])
    out = _prepare_out(config, _spec(config, space, cache, base))
    keyed = {**cache.fingerprint, "folds_in_train": True} if config.folds_in_train else cache.fingerprint
    keys = [trial_key(c, keyed, config.folds, config.seed) for c in configs]
    keys, trials, configs = _unique(keys, trials, configs)
    records, pending = _finished_and_pending(keys, trials, configs, len(folds), out / "trials")
    tasks = plan_tasks(pending, folds, config.fuse, job_count(config.jobs))
    for task in tasks:
        task["cache"] = [str(Path(p).resolve()) for p in as_paths(config.cache)]
    labels = {k: ", ".join(f"{n}={format_value(t.get(n))}" for n in space.searched) or "defaults"
              for k, t in zip(keys, trials)}
    tally = _Tally(out / "trials", records, len(keys) * len(folds), labels, progress)
    execute(tasks, tally.add, config.jobs, config.backend, config.scheduler)

    frame = summarise(tally.records, trials, keys, space)
    results_path = out / "results.csv"
    write_csv_atomic(frame, results_path)
    best_settings, best_path, plot_path = None, None, None
    if np.isfinite(frame["val_log_loss"].astype(float)).any():
        best_settings = training_settings(configs[keys.index(frame.iloc[0]["trial"])])
        best_path = _write_best(config, frame, best_settings, cache, out)
        plot_path = out / "sweep.png"
        plot_sweep(frame, space.searched, plot_path)
    ensemble = None
    if config.ensemble and best_settings is not None:

        finite = frame[np.isfinite(frame["val_log_loss"].astype(float))]
        top = [configs[keys.index(t)] for t in finite["trial"][:config.ensemble]]
        ensemble = ensemble_of_trials(cache, top, out / "ensemble.keras", force=True)
    return SweepResult(out, frame, best_settings, results_path, best_path, plot_path, len(keys),
                       tally.done - tally.skipped, tally.skipped, dropped + refused, time.perf_counter() - started,
                       tally.macs, tally.fused, ensemble)
