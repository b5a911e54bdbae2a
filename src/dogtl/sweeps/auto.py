"""`dogtl train-head --auto [--budget 2m] [--storage URL]`: a strong head without tuning, in a
budget that holds.

An Optuna study (TPE sampler) over AUTO_PARAMS (in sweeps/autosearch.py, with each trial's
work: the sweep's own space syntax: architecture, batch size, optimizer, peak and base learning
rates, dropout on the input and after the hidden layer, label smoothing, weight decay), each trial scored by 3-fold cross-validation over the
cache's training split (the validation split stays unseen until the end) with train-head's
own training (`fit_head`, early stopping included). Every epoch reports the fold's best
validation log loss so far to Optuna's median pruner, so a trial that trails the others at
the same fold and epoch stops there. The first two trials are train-head's own settings
(AUTO_FIRST: the linear head, and the recipe's hidden layer), which on the measured caches
beat most random draws. `linear=True` (fit's search) searches linear heads only
(LINEAR_PARAMS, LINEAR_FIRST first), in a study of its own.

The budget is wall-clock time from the command's start (Python and TensorFlow start-up
included) and is kept by deadlines the work checks after every epoch, never by predicting how
long trials take: the search may use the first SEARCH_SHARE of what is left after start-up,
and always leaves the retraining FINAL_FACTOR times its longest finished fold (before any
has finished, twice the longest set-up and first epoch); an epoch is
not started when the last one would not end by the deadline, and a trial caught by the
deadline is abandoned (recorded as failed, and queued to run first when the search resumes).
Then the best trials (at most AUTO_TOP, each within AUTO_MARGIN of the best's cross-validated
log loss) are retrained on the whole training split, best first,
until the budget's end, and saved as one ensemble model (head.ensemble) at --out; a member the
deadline cuts short is left out, except the first, which is kept at its best epoch so far.

The study lives in `<--out without .keras>.auto/study.db` (SQLite), so a killed or interrupted
search resumes: finished trials are kept and never retrained, and a trial that was running when
the process died is run again once its heartbeat is stale. `--storage URL` (any database
Optuna takes, e.g. sqlite:////shared/auto.db or postgresql://host/db) lets several processes or
hosts share one study: each runs trials of the same search (the study's name is derived from
the cache's fingerprint and the search settings, so only equal searches join) and each writes
its own ensemble of the best trials found by all.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.study import MaxTrialsCallback
from sqlalchemy.exc import SQLAlchemyError

from dogtl.core.artifacts import check_writable
from dogtl.core.budget import Deadline
from dogtl.core.errors import DogtlError
from dogtl.core.files import check_overwrite, write_csv_atomic
from dogtl.features.multicache import open_caches
from dogtl.head.ensemble import ensemble_of_trials
from dogtl.head.settings import HeadConfig
from dogtl.head.train import load_training_data
from dogtl.sweeps.autosearch import (AUTO_FIRST, AUTO_PARAMS, LINEAR_FIRST, LINEAR_PARAMS, AutoSearch, OutOfTime,
                                     describe, search_event, search_space)
from dogtl.sweeps.folds import make_folds
from dogtl.sweeps.records import digest

log = logging.getLogger(__name__)

AUTO_FOLDS = 3
AUTO_TOP = 5
# Ensemble members: the best trial and those whose cross-validated log loss is within this
# fraction of its (a trial much worse than the best pulls the average down: measured in
# benchmarks/quality.py, top-4-of-4 averaged 0.156 where the best trial alone gave 0.126).
AUTO_MARGIN = 0.10
AUTO_EPOCHS = 30
DEFAULT_BUDGET = 120.0
# After the retraining: scoring and saving the model, exiting. A share of the budget, but at
# least SAVE_MIN seconds: saving does not get faster with a smaller budget (an 8 s search in the
# test suite's process overran to 9.1 s with 0.24 s left for it).
SAVE_SHARE, SAVE_MIN = 0.03, 1.0
STARTUP_TRIALS = 6  # random draws before TPE models the results (Optuna's default is 10)
HEARTBEAT = 5  # seconds between a running trial's heartbeats; stale after 4 missed


@dataclass
class AutoResult:
    model_path: Path
    metrics: dict  # the ensemble's validation accuracy and log loss
    best_single: dict  # the best trial, retrained on the training split: its validation figures
    trials: int  # trials finished (complete or pruned), by this process and others
    seconds: float
    budget: float
    folder: Path
    results: object  # pandas DataFrame: the study's finished trials, best first
    storage: str = ""
    members: int = 0
    complete: int = 0
    pruned: int = 0
    ran_now: int = 0  # trials this process finished


def study_name(cache, folds: int, epochs: int, seed: int, params=AUTO_PARAMS, first=AUTO_FIRST) -> str:
    """Equal searches (same features, space, folds, epochs and seed) share one study name."""
    return "dogtl-auto-" + digest({"cache": cache.fingerprint, "params": params,
                                   "first": [name for name, _ in first], "folds": folds,
                                   "epochs": epochs, "seed": seed})[:12]


def open_study(storage: str, name: str, seed: int):
    """The study `name` in `storage`: created, or joined (another process's, or a killed run's)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # dogtl reports trials itself
    # SQLite: several processes wait for each other's writes rather than fail at once
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                storage, engine_kwargs=engine, heartbeat_interval=HEARTBEAT, grace_period=4 * HEARTBEAT,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError, SQLAlchemyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DogtlError(f"--storage {storage}: cannot open it as an Optuna database ({reason}); give a database "
                         "URL such as sqlite:////path/auto.db or postgresql://host/db") from None
    # Each process draws its own sequence (a shared or resumed study must not repeat earlier draws);
    # what a study contains is kept, not how it was drawn.
    process = int(digest([seed, socket.gethostname(), os.getpid(), time.time_ns()])[:8], 16)
    sampler = optuna.samplers.TPESampler(n_startup_trials=STARTUP_TRIALS, multivariate=True, constant_liar=True,
                                         seed=process)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    return optuna.create_study(storage=rdb, study_name=name, direction="minimize", sampler=sampler, pruner=pruner,
                               load_if_exists=True)


def results_frame(study):
    """The study's finished trials as a table, best first (pruned and failed ones last)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED", "FAIL"):
            continue
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     "val_log_loss": t.value if t.value is not None else float("nan"),
                     "val_accuracy": t.user_attrs.get("val_accuracy", float("nan")),
                     "settings": t.user_attrs.get("label", ""),
                     "seconds": t.duration.total_seconds() if t.duration else float("nan")})
    frame = pd.DataFrame(rows, columns=["trial", "state", "val_log_loss", "val_accuracy", "settings", "seconds"])
    return frame.sort_values(["val_log_loss", "trial"], na_position="last", kind="stable").reset_index(drop=True)


def auto_train(cache="cache/features.h5", out="models/head.keras", *, budget: float = DEFAULT_BUDGET,
               seed: int = 2018, force: bool = False, progress=None, storage: str | None = None,
               started: float | None = None, trials: int | None = None, epochs: int = AUTO_EPOCHS,
               top: int = AUTO_TOP, folds: int = AUTO_FOLDS, linear: bool = False) -> AutoResult:
    """Search within `budget` seconds of wall-clock time from `started` (a time.time(); default now),
    or until the study holds `trials` finished trials (by any process), then write the ensemble of
    the best `top` trials at `out`. `storage`: an Optuna database URL (default: SQLite in the auto
    folder). `progress` gets a ProgressEvent per event of the search (its detail: fold, trial,
    pruned, diverged, member). `linear`: linear heads only (LINEAR_PARAMS; fit's search)."""
    if budget <= 0:
        raise DogtlError(f"--budget {budget:g}: give the time the search may take, e.g. --budget 2m")
    if trials is not None and trials < 1:
        raise DogtlError(f"--trials {trials} must be at least 1 (or leave it out: as many as the budget allows)")
    started = time.time() if started is None else started
    end = Deadline.after(budget, started)
    out = Path(out)
    folder = _work_folder(out, force)
    opened = open_caches(cache)
    data = load_training_data(opened)
    splits = make_folds(data.train_labels, np.zeros(len(data.train_labels), bool), folds, seed)
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    params, first = (LINEAR_PARAMS, LINEAR_FIRST) if linear else (AUTO_PARAMS, AUTO_FIRST)
    name = study_name(opened, folds, epochs, seed, params, first)
    if force and storage:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
    study = open_study(url, name, seed)
    search = AutoSearch(data.train_features, data.train_labels, splits, len(opened.classes), epochs, seed, end,
                        progress, search_space(params), first)
    _optimize(study, search, trials)
    frame = results_frame(study)
    write_csv_atomic(frame, folder / "results.csv")
    close, configs = _best_trials(study, top, epochs, seed)
    rows = len(data.train_labels)
    del data, search.features  # the retraining reads the training split again

    def member(i, fit):
        if progress:
            progress(search_event(event="member", index=i + 1, trial=close[i].number if close else None,
                                  settings=describe(configs[i], rows), loss=fit.metrics["val_log_loss"],
                                  accuracy=fit.metrics["val_accuracy"], cut_short=fit.cut_short))

    finish = end.earlier(max(SAVE_SHARE * budget, SAVE_MIN))  # the rest: scoring and saving the model, exiting
    ensemble = ensemble_of_trials(opened, configs, out, force=force, stop=lambda last: finish.passed(last),
                                  on_member=member)
    states = frame["state"].value_counts()
    return AutoResult(out, ensemble.metrics, ensemble.member_metrics[0], int(states.get("complete", 0) +
                      states.get("pruned", 0)), time.time() - started, budget, folder, frame,
                      storage=url, members=len(ensemble.member_metrics),
                      complete=int(states.get("complete", 0)), pruned=int(states.get("pruned", 0)),
                      ran_now=len(search.ran))


def _work_folder(out: Path, force: bool) -> Path:
    """`<out without .keras>.auto`, made (emptied first with `force`) once `out` may be written."""
    if out.suffix == ".keras":
        out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out, force)
    check_overwrite(out.with_suffix(".json"), force)
    folder = out.with_suffix(".auto")
    if force and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _optimize(study, search: AutoSearch, trials: int | None) -> None:
    """Run trials into `study` until the search's deadline, or until it holds `trials` finished ones."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    callbacks = [search.finished] + ([MaxTrialsCallback(trials, states=finished)] if trials else [])
    while not search.out_of_time() and not (trials and len(study.get_trials(states=finished)) >= trials):
        try:
            study.optimize(search.objective, timeout=max(0.0, search.until.left()), callbacks=callbacks,
                           catch=(OutOfTime,))
            break
        except ValueError as e:  # SQLite has no row locks: two processes may take the same queued trial
            if not str(e).startswith("Cannot tell a"):
                raise
            log.info("another process finished the same trial first (%s); going on", e)


def _best_trials(study, top: int, epochs: int, seed: int) -> tuple[list, list]:
    """(trials, their HeadConfigs) to retrain: the best `top` within AUTO_MARGIN of the best, or,
    when no trial finished in time, no trial and train-head's first preset."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    complete.sort(key=lambda t: t.value)
    if not complete:  # train-head's first settings, as long as the budget allows
        return [], [HeadConfig(epochs=epochs, seed=seed, **AUTO_FIRST[0][1])]
    close = [t for t in complete if t.value <= complete[0].value * (1 + AUTO_MARGIN)][:top]
    return close, [HeadConfig(**t.user_attrs["settings"]) for t in close]
