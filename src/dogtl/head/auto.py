"""`dogtl train-head --auto [--budget 2m] [--storage URL]`: a strong head without tuning, in a
budget that holds.

An Optuna study (TPE sampler) over AUTO_PARAMS (the sweep's own space syntax: architecture,
batch size, optimizer, peak and base learning rates, dropout on the input and after the hidden
layer, label smoothing, weight decay), each trial scored by 3-fold cross-validation over the
cache's training split (the validation split stays unseen until the end) with train-head's
own training (`fit_head`, early stopping included). Every epoch reports the fold's best
validation log loss so far to Optuna's median pruner, so a trial that trails the others at
the same fold and epoch stops there. The first two trials are train-head's own settings
(AUTO_FIRST: the linear head, and the recipe's hidden layer), which on the measured caches
beat most random draws.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dogtl.core.budget import Deadline
from dogtl.core.errors import DogtlError

log = logging.getLogger(__name__)

AUTO_PARAMS = (
    "hidden=none,512",
    "batch_size=32,64",
    "optimizer=adam,rmsprop",
    "max_lr=log:1e-3..3e-2",
    "base_lr=log:1e-5..5e-4",
    "input_dropout=0.0..0.6",
    "dropout=0.1..0.6",
    "label_smoothing=0.0..0.15",
    "weight_decay=0,1e-4,1e-3",
)
# Tried first, before the sampler's draws: train-head's own settings with a linear head, and the
# recipe's head. A random draw rarely lands on them, and on the measured caches they beat most
# draws (benchmarks/quality.py: the linear head at defaults was the best head on two caches).
AUTO_FIRST = (("linear head, train-head's defaults", {"hidden": ()}),
              ("the recipe's head, train-head's defaults", {}))
AUTO_FOLDS = 3
AUTO_TOP = 5
# Ensemble members: the best trial and those whose cross-validated log loss is within this
# fraction of its (a trial much worse than the best pulls the average down: measured in
# benchmarks/quality.py, top-4-of-4 averaged 0.156 where the best trial alone gave 0.126).
AUTO_MARGIN = 0.10
AUTO_EPOCHS = 30
DEFAULT_BUDGET = 120.0
SEARCH_SHARE = 0.8  # of the budget left after start-up; the rest retrains the best trials
# The final retraining's first member is kept, cut short if need be. The search leaves time for
# it: this many times the longest fold it has finished (a member trains on all the training
# split's rows, 1.5x a fold's at 3 folds), and before any fold has finished, twice the longest
# set-up and first epoch. Measured on Fashion (2 cores, load 17): with the second rule alone, a
# 60 s budget left 5 s for the retraining and its member, cut short, scored 0.79 against the
# linear head's 0.87.
FINAL_FACTOR = 1.5
SAVE_SHARE = 0.03  # of the budget, after the retraining: scoring and saving the model, exiting
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


class _OutOfTime(Exception):
    """The search's deadline came in the middle of a trial."""


def search_space():
    from dogtl.sweeps.space import build_space

    return build_space(None, AUTO_PARAMS)


def describe(config, rows: int) -> str:
    """A trial's settings as a user reads them: every automatic value resolved for `rows` training
    images (the batch size and rates a default picks), a linear head as `linear`, and no
    setting that does nothing (dropout after a hidden layer that is not there)."""
    r = config.resolve(rows)
    parts = [f"head {'x'.join(map(str, config.hidden)) if config.hidden else 'linear'}",
             f"batch {r.batch_size}", config.optimizer,
             f"lr {r.base_lr:.2g}..{r.max_lr:.2g}" if config.schedule != "constant" else f"lr {r.base_lr:.2g}",
             f"input dropout {config.input_dropout:.2g}"]
    if config.hidden:
        parts.append(f"dropout {config.dropout:.2g}")
    parts += [f"label smoothing {config.label_smoothing:.2g}", f"weight decay {config.weight_decay:g}"]
    return ", ".join(parts)


def _suggest(trial, space) -> dict:
    """The trial's values of the space's parameters, drawn by the study's sampler. Optuna's
    categorical choices must be plain values, so non-numeric candidates go by their text."""
    from dogtl.sweeps.space import format_value, parameters

    values = {}
    for p in space.params:
        if p.is_range:
            if parameters()[p.name].kind == "int":
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        else:
            plain = all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in p.values)
            choices = list(p.values) if plain else [format_value(v) for v in p.values]
            picked = trial.suggest_categorical(p.name, choices)
            values[p.name] = p.values[choices.index(picked)]
    return values


@dataclass
class _Search:
    """What every trial of this process shares: the training split's features, the folds, the deadline."""

    features: np.ndarray  # [passes, rows, dim] of the cache's training split
    labels: np.ndarray
    folds: list  # (train rows, validation rows) into the training split
    num_classes: int
    epochs: int
    seed: int
    end: Deadline  # the whole command's
    progress: Callable[[dict], None] | None
    space: object
    ran: list = field(default_factory=list)  # numbers of the trials this process finished
    reserve: float = 0.0  # seconds kept for the final retraining: measured, see `out_of_time`

    def __post_init__(self):
        self.until = self.end.share(SEARCH_SHARE)

    def out_of_time(self, need: float = 0.0) -> bool:
        """Whether work that takes `need` seconds would end after the search's deadline: its share
        of the budget, and never so late that the final retraining's first epoch would not fit."""
        return self.until.passed(need) or self.end.passed(need + self.reserve)

    def say(self, **event) -> None:
        if self.progress:
            self.progress(event)

    def config(self, trial):
        from dogtl.head.settings import HeadConfig
        from dogtl.sweeps.space import trial_config

        # The study's first trials (numbers are handed out atomically by the storage, so each runs
        # once however many processes share the study) are train-head's own settings; a trial
        # re-run for one whose process died keeps its preset in its user attributes.
        preset = trial.user_attrs.get("preset")
        if preset is None and trial.number < len(AUTO_FIRST):
            preset = AUTO_FIRST[trial.number][0]
            trial.set_user_attr("preset", preset)
        base = {"epochs": self.epochs, "seed": self.seed}
        if preset is not None:
            return HeadConfig(**{**base, **dict(AUTO_FIRST)[preset]}), preset
        return trial_config(base, _suggest(trial, self.space)), None

    def objective(self, trial) -> float:
        import optuna

        from dogtl.head.train import fit_head
        from dogtl.sweeps.records import training_settings

        config, preset = self.config(trial)
        rows = len(self.folds[0][0])
        try:
            config.resolve(rows)
        except DogtlError as e:  # a combination train-head refuses (e.g. base rate above max)
            trial.set_user_attr("error", str(e))
            raise optuna.TrialPruned(str(e)) from None
        settings = describe(config, rows)
        trial.set_user_attr("settings", training_settings(config))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("label", settings + (f" ({preset})" if preset else ""))
        losses, accuracies = [], []
        for f, (train_rows, val_rows) in enumerate(self.folds):
            if self.out_of_time():
                trial.set_user_attr("out_of_time", True)
                raise _OutOfTime
            best = math.inf

            def on_epoch(event, f=f):
                nonlocal best
                row = event.record
                if row.epoch == 1:  # a head's set-up and first epoch: the least the final retraining needs
                    self.reserve = max(self.reserve, 2 * (time.perf_counter() - started))
                best = min(best, row.val_loss) if math.isfinite(row.val_loss) else best
                step = f * self.epochs + row.epoch
                if math.isfinite(best):
                    trial.report(best, step)
                    if trial.should_prune():
                        self.say(event="pruned", trial=trial.number, fold=f + 1, folds=len(self.folds),
                                 epoch=row.epoch, loss=best, settings=settings)
                        raise optuna.TrialPruned(f"fold {f + 1} epoch {row.epoch}: val log loss {best:.4f}")
                if self.out_of_time(event.seconds):
                    trial.set_user_attr("out_of_time", True)
                    raise _OutOfTime

            passes = self.features[:1] if config.clean_only else self.features
            started = time.perf_counter()
            try:
                fit = fit_head(config, passes[:, train_rows], self.labels[train_rows],
                               self.features[0, val_rows].astype(np.float32), self.labels[val_rows],
                               self.num_classes, on_epoch=on_epoch)
            except DogtlError as e:  # diverged: a result of the search, not a failure of it
                trial.set_user_attr("error", str(e))
                self.say(event="diverged", trial=trial.number, fold=f + 1, folds=len(self.folds),
                         settings=settings, error=str(e))
                raise optuna.TrialPruned(str(e)) from None
            m = fit.metrics
            seconds = time.perf_counter() - started
            self.reserve = max(self.reserve, FINAL_FACTOR * seconds)
            losses.append(m["val_log_loss"])
            accuracies.append(m["val_accuracy"])
            trial.set_user_attr(f"fold_{f + 1}", {"val_log_loss": m["val_log_loss"], "val_accuracy": m["val_accuracy"],
                                                  "epochs_run": m["epochs_run"],
                                                  "seconds": seconds})
            self.say(event="fold", trial=trial.number, fold=f + 1, folds=len(self.folds), settings=settings,
                     loss=m["val_log_loss"], accuracy=m["val_accuracy"], epochs=m["epochs_run"],
                     seconds=seconds)
        trial.set_user_attr("val_accuracy", float(np.mean(accuracies)))
        return float(np.mean(losses))

    def finished(self, study, trial) -> None:
        """Optuna's callback after each trial of this process, once its state is stored."""
        import optuna

        if trial.state == optuna.trial.TrialState.COMPLETE:
            self.ran.append(trial.number)
            best = study.best_trial
            self.say(event="trial", trial=trial.number, loss=trial.value, accuracy=trial.user_attrs.get("val_accuracy"),
                     settings=trial.user_attrs.get("label", ""), best=best.value, best_trial=best.number)
        elif trial.state == optuna.trial.TrialState.PRUNED:
            self.ran.append(trial.number)
        elif trial.user_attrs.get("out_of_time"):  # cut by the deadline, not by its results: next run first
            attrs = {k: v for k, v in trial.user_attrs.items() if k == "preset"}
            study.enqueue_trial(trial.params, user_attrs=attrs)
        if self.out_of_time():
            study.stop()


def study_name(cache, folds: int, epochs: int, seed: int) -> str:
    """Equal searches (same features, space, folds, epochs and seed) share one study name."""
    from dogtl.sweeps.records import digest

    return "dogtl-auto-" + digest({"cache": cache.fingerprint, "params": AUTO_PARAMS,
                                   "first": [name for name, _ in AUTO_FIRST], "folds": folds,
                                   "epochs": epochs, "seed": seed})[:12]


def open_study(storage: str, name: str, seed: int):
    """The study `name` in `storage`: created, or joined (another process's, or a killed run's)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    from dogtl.sweeps.records import digest

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
    import pandas as pd

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
               top: int = AUTO_TOP, folds: int = AUTO_FOLDS) -> AutoResult:
    """Search within `budget` seconds of wall-clock time from `started` (a time.time(); default now),
    or until the study holds `trials` finished trials (by any process), then write the ensemble of
    the best `top` trials at `out`. `storage`: an Optuna database URL (default: SQLite in the auto
    folder). `progress` gets one dict per event (fold, trial, pruned, diverged, member)."""
    import optuna
    from optuna.study import MaxTrialsCallback

    from dogtl.core.artifacts import check_writable
    from dogtl.core.files import check_overwrite, write_csv_atomic
    from dogtl.features.multicache import open_caches
    from dogtl.head.ensemble import ensemble_of_trials
    from dogtl.head.settings import HeadConfig
    from dogtl.head.train import load_training_data
    from dogtl.sweeps.folds import make_folds

    if budget <= 0:
        raise DogtlError(f"--budget {budget:g}: give the time the search may take, e.g. --budget 2m")
    if trials is not None and trials < 1:
        raise DogtlError(f"--trials {trials} must be at least 1 (or leave it out: as many as the budget allows)")
    started = time.time() if started is None else started
    end = Deadline.after(budget, started)
    out = Path(out)
    if out.suffix == ".keras":
        out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out, force)
    check_overwrite(out.with_suffix(".json"), force)
    folder = out.with_suffix(".auto")
    if force and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    opened = open_caches(cache)
    data = load_training_data(opened)
    splits = make_folds(data.train_labels, np.zeros(len(data.train_labels), bool), folds, seed)
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    name = study_name(opened, folds, epochs, seed)
    if force and storage:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
    study = open_study(url, name, seed)
    search = _Search(data.train_features, data.train_labels, splits, len(opened.classes), epochs, seed, end,
                     progress, search_space())
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    callbacks = [search.finished] + ([MaxTrialsCallback(trials, states=finished)] if trials else [])
    while not search.out_of_time() and not (trials and len(study.get_trials(states=finished)) >= trials):
        try:
            study.optimize(search.objective, timeout=max(0.0, search.until.left()), callbacks=callbacks,
                           catch=(_OutOfTime,))
            break
        except ValueError as e:  # SQLite has no row locks: two processes may take the same queued trial
            if not str(e).startswith("Cannot tell a"):
                raise
            log.info("another process finished the same trial first (%s); going on", e)
    frame = results_frame(study)
    write_csv_atomic(frame, folder / "results.csv")
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    complete.sort(key=lambda t: t.value)
    if complete:
        close = [t for t in complete if t.value <= complete[0].value * (1 + AUTO_MARGIN)][:top]
        configs = [HeadConfig(**t.user_attrs["settings"]) for t in close]
    else:  # no trial finished in time: train-head's first settings, as long as the budget allows
        close, configs = [], [HeadConfig(epochs=epochs, seed=seed, **AUTO_FIRST[0][1])]
    rows = len(data.train_labels)
    del data, search.features  # the retraining reads the training split again

    def member(i, fit):
        if progress:
            progress({"event": "member", "index": i + 1, "trial": close[i].number if close else None,
                      "settings": describe(configs[i], rows), "loss": fit.metrics["val_log_loss"],
                      "accuracy": fit.metrics["val_accuracy"], "cut_short": fit.cut_short})

    finish = end.earlier(SAVE_SHARE * budget)  # the rest: scoring and saving the model, exiting
    ensemble = ensemble_of_trials(opened, configs, out, force=force, stop=lambda last: finish.passed(last),
                                  on_member=member)
    states = frame["state"].value_counts()
    return AutoResult(out, ensemble.metrics, ensemble.member_metrics[0], int(states.get("complete", 0) +
                      states.get("pruned", 0)), time.time() - started, budget, folder, frame,
                      storage=url, members=len(ensemble.member_metrics),
                      complete=int(states.get("complete", 0)), pruned=int(states.get("pruned", 0)),
                      ran_now=len(search.ran))
