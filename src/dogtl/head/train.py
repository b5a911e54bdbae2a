"""Stage two: train the dense head on cached features, with cyclical learning rates.

`fit_head` trains on arrays in memory (what a sweep calls many times); `train_head`
reads the cache, checks it, calls `fit_head` and writes the model, its metadata, the
per-epoch history CSV and a PNG plot. Each epoch every training image contributes one of
its cached passes (clean or augmented), drawn per image and epoch; validation always
uses the clean pass. Training stops early on validation log loss and keeps the best
epoch's weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dogtl.core.artifacts import check_writable, save_model
from dogtl.core.early_stopping import EarlyStopping
from dogtl.core.epochs import EpochRecord, history_frame
from dogtl.core.errors import CacheError, DogtlError
from dogtl.core.files import atomic_paths, check_overwrite, write_csv_atomic
from dogtl.core.locks import hold, writes
from dogtl.core.metadata import ModelMetadata
from dogtl.core.metrics import at_chance, chance_scores, scores
from dogtl.core.models import build_head, set_head_precision
from dogtl.core.plots import plot_history
from dogtl.core.progress import Progress, ProgressEvent
from dogtl.features.multicache import head_inputs, open_caches
from dogtl.features.signal import spread
from dogtl.head.settings import HeadConfig, Resolved
from dogtl.head.trainloop import EpochRunner

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    model: object  # the Keras head with the best epoch's weights
    history: "object"  # pandas DataFrame, core.epochs.HISTORY_COLUMNS
    metrics: dict  # val_accuracy, val_log_loss, epochs_run, best_epoch, train_loss, train_accuracy
    seconds_per_epoch: float
    resolved: Resolved  # batch size, learning rates, step size and gamma actually used
    cut_short: bool = False  # `stop` ended it before early stopping or the last epoch


@dataclass
class HeadResult:
    model_path: Path
    metrics: dict
    history: "object"
    history_path: Path
    plot_path: Path
    seconds: float
    seconds_per_epoch: float
    train_images: int
    val_images: int
    passes: int
    resolved: Resolved


def _schedule(config: HeadConfig, r: Resolved):
    from dogtl.core.schedules import CyclicLR, Warmup  # local: it imports Keras

    lr = r.base_lr if config.schedule == "constant" else CyclicLR(r.base_lr, r.max_lr, r.step_size,
                                                                 mode=config.schedule, gamma=r.gamma)
    return Warmup(lr, config.warmup_epochs * r.steps_per_epoch) if config.warmup_epochs else lr


def build_compiled_head(config: HeadConfig, feature_dim: int, num_classes: int, resolved: Resolved,
                        learning_rate=None):
    """The head of `config`, compiled with its optimizer and (cyclical) learning rate schedule
    (or `learning_rate`, a rate or Keras schedule, instead); its initial weights and dropout
    streams depend on `config.seed` alone."""
    from dogtl.core.schedules import make_optimizer  # local: it imports Keras

    model = build_head(feature_dim, num_classes, hidden=config.hidden, input_dropout=config.input_dropout,
                       dropout=config.dropout, seed=config.seed)
    lr = _schedule(config, resolved) if learning_rate is None else learning_rate
    decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}
    optimizer = make_optimizer(config.optimizer, lr, **decay)
    if decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model, lr


def fit_head(config: HeadConfig, train_features: np.ndarray, train_labels: np.ndarray,
             val_features: np.ndarray, val_labels: np.ndarray, num_classes: int,
             on_epoch: Progress | None = None,
             stop: Callable[[float], bool] | None = None) -> FitResult:
    """Train a head from arrays: train_features [passes, rows, dim] (pass 0 clean), labels [rows],
    val_features [rows, dim] (clean). Same inputs and seed give the same model on the same machine.
    `stop(seconds of the last epoch)`, asked after each epoch, ends training there when True (a
    deadline: the best epoch so far is kept, and the result is marked `cut_short`). `on_epoch` gets
    each finished epoch's ProgressEvent."""
    if train_features.ndim != 3 or val_features.ndim != 2 or train_features.shape[2] != val_features.shape[1]:
        raise ValueError(f"features of shapes {train_features.shape} (train) and {val_features.shape} (val) "
                         "do not fit: expected [passes, rows, dim] and [rows, dim]")
    if not len(val_labels):
        raise DogtlError("no validation images: early stopping and the metrics need some")
    resolved = config.resolve(train_features.shape[1])
    model, lr = build_compiled_head(config, train_features.shape[2], num_classes, resolved)
    runner = EpochRunner(model, train_features, train_labels, resolved.batch_size, config.seed,
                         label_smoothing=config.label_smoothing, precision=resolved.precision)
    val_labels = np.asarray(val_labels)

    stopping, best_weights, rows, seconds, cut_short = EarlyStopping(config.patience), None, [], 0.0, False
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        losses, accuracy = runner.run(epoch)
        val = scores(val_labels, runner.predict(val_features), num_classes)
        seconds += time.perf_counter() - started
        iteration = epoch * runner.steps - 1  # the last step of this epoch
        row = EpochRecord(epoch, float(np.mean(losses)), accuracy, val["val_log_loss"], val["val_accuracy"],
                          float(lr(iteration)) if callable(lr) else float(lr))
        rows.append(row)
        best = stopping.update(epoch, row.val_loss if math.isfinite(row.loss) else math.nan)
        if best:
            best_weights = model.get_weights()
        if on_epoch:
            on_epoch(ProgressEvent("train-head", epoch, config.epochs, "epochs", row,
                                   time.perf_counter() - started, best))
        if stopping.stopped:
            if not math.isfinite(row.loss) or not math.isfinite(row.val_loss):
                log.warning("epoch %d: loss is not finite; training stopped (lower the learning rates)", epoch)
            break
        if stop is not None and epoch < config.epochs and stop(time.perf_counter() - started):
            cut_short = True
            break
    if best_weights is None:
        raise DogtlError(f"training diverged in epoch 1 (loss {rows[0].loss}): lower --base-lr/--max-lr "
                         f"(they were {resolved.base_lr:g} and {resolved.max_lr:g})")
    model.set_weights(best_weights)
    set_head_precision(model, "float32")  # the saved head computes like any other float32 model
    best_row = rows[stopping.best_epoch - 1]
    metrics = {**scores(val_labels, runner.predict(val_features), num_classes), "epochs_run": len(rows),
               "best_epoch": stopping.best_epoch, "train_loss": best_row.loss, "train_accuracy": best_row.accuracy}
    return FitResult(model, history_frame([r.as_row() for r in rows]), metrics, seconds / len(rows), resolved,
                     cut_short)


@dataclass
class TrainingData:
    """The arrays a head trains on, read from a cache: training rows with the passes
    used, and the validation rows' clean pass."""

    train_features: np.ndarray  # [passes, rows, dim], float16 if the cache stores float16
    train_labels: np.ndarray
    val_features: np.ndarray  # [rows, dim] float32
    val_labels: np.ndarray
    classes: list = field(default_factory=list)


def load_training_data(cache, clean_only: bool = False) -> TrainingData:
    """Split an opened cache into training passes and clean validation features, checking
    that there is something to train and validate on."""
    is_val = np.asarray(cache.is_val, bool)
    train_rows, val_rows = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if not len(val_rows):
        raise CacheError(f"{cache.path}: has no validation images (extracted with --val-fraction 0?); "
                         "re-extract with --val-fraction 0.1")
    if not len(train_rows):
        raise CacheError(f"{cache.path}: every labelled image is in the validation split; "
                         "re-extract with a smaller --val-fraction")
    if len(np.unique(cache.labels[train_rows])) < 2:
        raise CacheError(f"{cache.path}: the training split holds fewer than two classes; add images")
    store = np.float16 if cache.fingerprint.get("dtype") == "float16" else np.float32
    passes = 1 if clean_only else cache.num_passes
    train = np.empty((passes, len(train_rows), cache.feature_dim), store)
    val = None
    for p in range(passes):
        block = cache.features("labelled", passes=[p])[0]
        train[p] = block[train_rows]
        if p == 0:
            val = block[val_rows].astype(np.float32)
    if not np.isfinite(val).all() or not all(np.isfinite(train[p]).all() for p in range(passes)):
        raise CacheError(f"{cache.path}: features contain NaN or infinity; re-extract with --force")
    problem = spread(np.array_split(train[0], max(1, len(train_rows) // 4096))).degenerate()
    if problem:
        raise CacheError(f"{cache.path} holds degenerate features: {problem}. A head cannot learn from them: "
                         "re-extract with weights that carry signal (--weights imagenet, a trained weights file, or "
                         "--weights none, which now calibrates its random backbone on the images) and --force")
    return TrainingData(train, cache.labels[train_rows].astype(np.int32), val,
                        cache.labels[val_rows].astype(np.int32), list(cache.classes))


def _warn_at_chance(metrics: dict, chance: dict) -> None:
    """Say so when the head is no better than knowing the class frequencies: its features carry
    no information about the classes (or training went wrong), and the figures alone hide it."""
    metrics["chance_log_loss"], metrics["chance_accuracy"] = chance["val_log_loss"], chance["val_accuracy"]
    if at_chance(metrics, chance):
        log.warning("the head is at chance level: validation log loss %.4f against %.4f for the class frequencies "
                    "alone (accuracy %.4f against %.4f): its features tell the classes apart hardly at all. Check the "
                    "backbone weights (--weights none is for smoke tests), the labels and the learning rates "
                    "(dogtl lr-find)", metrics["val_log_loss"], chance["val_log_loss"], metrics["val_accuracy"],
                    chance["val_accuracy"])


def head_metadata(cache, config: HeadConfig, fit: FitResult, data: TrainingData) -> ModelMetadata:
    """What a saved head records: the cache(s) it is bound to, its settings and its validation figures."""
    features = data.train_features[:1] if config.clean_only else data.train_features
    return ModelMetadata(kind="head", classes=list(cache.classes), backbones=head_inputs(cache),
                         settings=asdict(config), metrics=fit.metrics, train_images=int(features.shape[1]),
                         val_images=int(len(data.val_labels)), passes_used=int(features.shape[0]),
                         resolved=asdict(fit.resolved))


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {"model": out, "metadata": out.with_suffix(".json"), "history": out.with_suffix(".history.csv"),
            "plot": out.with_suffix(".png")}


def check_outputs(out: str | Path, force: bool) -> dict[str, Path]:
    """Refuse to overwrite any of the run's outputs without --force (before any training)."""
    paths = output_paths(out)
    check_writable(paths["model"], force)
    for path in paths.values():
        check_overwrite(path, force)
    return paths


@writes
def train_head(config: HeadConfig, cache: str | Path = "cache/features.h5", out: str | Path = "models/head.keras",
               force: bool = False, progress: Progress | None = None) -> HeadResult:
    """Train a head on the feature cache `cache` and write model, metadata, history CSV and plot
    at `out` (existing files only with `force`).

    `progress` gets one ProgressEvent per epoch (its EpochRecord and seconds)."""
    started = time.perf_counter()
    paths = check_outputs(out, force)
    hold(paths["model"], "the model")
    cache = open_caches(cache)  # one path, or several concatenated per row
    data = load_training_data(cache, config.clean_only)
    log.info("training on %d images x %d passes, validating on %d", data.train_features.shape[1],
             data.train_features.shape[0], len(data.val_labels))
    fit = fit_head(config, data.train_features, data.train_labels, data.val_features, data.val_labels,
                   len(cache.classes), on_epoch=progress)
    _warn_at_chance(fit.metrics, chance_scores(data.train_labels, data.val_labels, len(cache.classes)))
    metadata = head_metadata(cache, config, fit, data)
    metadata.history = paths["history"].name
    # All four files or none (bar the microseconds between renames): a kill between them would
    # leave some, and the rerun would refuse to overwrite them.
    with atomic_paths(paths["history"], paths["plot"]) as (history_tmp, plot_tmp):
        write_csv_atomic(fit.history, history_tmp)
        plot_history(fit.history, plot_tmp, title=f"train-head {paths['model'].name}: {cache.path.name}, "
                     f"{len(data.train_labels)} training images", best_epoch=fit.metrics["best_epoch"])
        save_model(fit.model, paths["model"], metadata)
    return HeadResult(paths["model"], fit.metrics, fit.history, paths["history"], paths["plot"],
                      time.perf_counter() - started, fit.seconds_per_epoch, int(data.train_features.shape[1]),
                      int(len(data.val_labels)), int(data.train_features.shape[0]), fit.resolved)
