"""One trial of `train-head --auto`'s search (sweeps/auto.py): the space it draws from, the
presets it tries first, and each trial's cross-validation under the search's deadline, reported
epoch by epoch to Optuna's pruner."""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import optuna

from dogtl.core.budget import Deadline
from dogtl.core.errors import DogtlError
from dogtl.core.progress import Progress, ProgressEvent
from dogtl.head.settings import HeadConfig
from dogtl.head.train import fit_head
from dogtl.sweeps.records import training_settings
from dogtl.sweeps.space import build_space, format_value, parameters, trial_config

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
# `auto_train(linear=True)`, fit's search: linear heads only, the better start for fine-tuning
# (LP-FT, Kumar et al. 2022: a linear probe, then the whole network). On Fashion, fine-tuned the
# same way: linear heads 0.903-0.912 accuracy in five runs, heads with a hidden layer 0.887-0.891.
LINEAR_PARAMS = ("hidden=none",) + tuple(p for p in AUTO_PARAMS if p.split("=")[0] not in ("hidden", "dropout"))
LINEAR_FIRST = tuple(preset for preset in AUTO_FIRST if preset[1].get("hidden") == ())  # the linear preset
SEARCH_SHARE = 0.8  # of the budget left after start-up; the rest retrains the best trials
# The final retraining's first member is kept, cut short if need be. The search leaves time for
# it: this many times the longest fold it has finished (a member trains on all the training
# split's rows, 1.5x a fold's at 3 folds), and before any fold has finished, twice the longest
# set-up and first epoch. Measured on Fashion (2 cores, load 17): with the second rule alone, a
# 60 s budget left 5 s for the retraining and its member, cut short, scored 0.79 against the
# linear head's 0.87.
FINAL_FACTOR = 1.5


class OutOfTime(Exception):
    """The search's deadline came in the middle of a trial."""


def search_space(params=AUTO_PARAMS):
    return build_space(None, params)


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


def search_event(**e) -> ProgressEvent:
    """A ProgressEvent of the search: `e` ("event": fold, pruned, diverged, trial or member, and
    its figures) as its detail, and the line shown for it."""
    return ProgressEvent("auto", unit="", message=search_line(e), detail=e)


def search_line(e: dict) -> str | None:
    """The line shown for an event of the search (also fit's), or None for events not shown."""
    kind = e["event"]
    if kind == "fold":
        return (f"trial {e['trial']} fold {e['fold']}/{e['folds']}: {e['settings']}: val log loss {e['loss']:.4f}"
                f" acc {e['accuracy']:.4f} ({e['epochs']} epochs, {e['seconds']:.1f} s)")
    if kind == "pruned":
        return (f"trial {e['trial']} pruned at fold {e['fold']}/{e['folds']} epoch {e['epoch']}: val log loss "
                f"{e['loss']:.4f} trails the other trials")
    if kind == "diverged":
        return f"trial {e['trial']} fold {e['fold']}/{e['folds']}: {e['settings']}: {e['error']}"
    if kind == "trial":
        return (f"trial {e['trial']}: cross-validated log loss {e['loss']:.4f}  (best {e['best']:.4f}, trial "
                f"{e['best_trial']})")
    if kind == "member":
        source = f"trial {e['trial']}" if e["trial"] is not None else "no trial finished in time: train-head's settings"
        return (f"retrained {source} on the whole training split ({e['settings']}): val log loss {e['loss']:.4f}"
                f" acc {e['accuracy']:.4f}" + (" (cut short by the budget)" if e["cut_short"] else ""))
    return None


@dataclass
class AutoSearch:
    """What every trial of this process shares: the training split's features, the folds, the deadline."""

    features: np.ndarray  # [passes, rows, dim] of the cache's training split
    labels: np.ndarray
    folds: list  # (train rows, validation rows) into the training split
    num_classes: int
    epochs: int
    seed: int
    end: Deadline  # the whole command's
    progress: Progress | None
    space: object
    first: tuple = AUTO_FIRST  # the presets tried first, in order
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
            self.progress(search_event(**event))

    def config(self, trial):
        # The study's first trials (numbers are handed out atomically by the storage, so each runs
        # once however many processes share the study) are train-head's own settings; a trial
        # re-run for one whose process died keeps its preset in its user attributes.
        preset = trial.user_attrs.get("preset")
        if preset is None and trial.number < len(self.first):
            preset = self.first[trial.number][0]
            trial.set_user_attr("preset", preset)
        base = {"epochs": self.epochs, "seed": self.seed}
        if preset is not None:
            return HeadConfig(**{**base, **dict(self.first)[preset]}), preset
        return trial_config(base, _suggest(trial, self.space)), None

    def objective(self, trial) -> float:
        """The trial's mean validation log loss over the folds (Optuna minimises it)."""
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
                raise OutOfTime
            m = self._fold(trial, config, settings, f, train_rows, val_rows)
            losses.append(m["val_log_loss"])
            accuracies.append(m["val_accuracy"])
        trial.set_user_attr("val_accuracy", float(np.mean(accuracies)))
        return float(np.mean(losses))

    def _fold(self, trial, config, settings: str, f: int, train_rows, val_rows) -> dict:
        """Fold `f` of the trial: the head trained on its rows, each epoch's best validation log loss
        so far reported to the pruner; its metrics."""
        best = math.inf

        def on_epoch(event):
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
                raise OutOfTime

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
        trial.set_user_attr(f"fold_{f + 1}", {"val_log_loss": m["val_log_loss"], "val_accuracy": m["val_accuracy"],
                                              "epochs_run": m["epochs_run"],
                                              "seconds": seconds})
        self.say(event="fold", trial=trial.number, fold=f + 1, folds=len(self.folds), settings=settings,
                 loss=m["val_log_loss"], accuracy=m["val_accuracy"], epochs=m["epochs_run"],
                 seconds=seconds)
        return m

    def finished(self, study, trial) -> None:
        """Optuna's callback after each trial of this process, once its state is stored."""
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
