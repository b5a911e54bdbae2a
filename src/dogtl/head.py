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
import os
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CacheError, DogtlError
from .precision import PRECISIONS, resolve_precision

log = logging.getLogger(__name__)

SCHEDULES = ("exp_range", "triangular", "triangular2", "constant")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
# The reference recipe: batch 16, RMSprop between 1e-4 and 1e-3.
RECIPE_BATCH_SIZE, RECIPE_BASE_LR, RECIPE_MAX_LR = 16, 1e-4, 1e-3
# Batch size when none is given: the largest of AUTO_BATCH_SIZES that still gives an epoch of at
# least AUTO_MIN_STEPS steps. Per-step costs (optimizer update, small matmuls) dominate a head
# epoch on CPU, so a Kaggle-size cache (9,200 training images -> 128) trains ~2x faster per
# epoch than at 64 and ~4x faster than at the recipe's 16; small caches, where the number of
# steps limits learning, keep 16. Learning rates left to their defaults are the recipe's scaled
# by sqrt(batch / 16) (the square-root rule for adaptive optimizers): on demo-like features of
# Kaggle size, batch 64 at the recipe's own rates gave a worse validation log loss than batch
# 16, and with scaled rates a better one (benchmarks/batch_quality.py measures it, also for 128).
AUTO_BATCH_SIZES = (16, 32, 64, 128)
AUTO_MIN_STEPS = 64
STEP_EPOCHS = 4  # default half cycle of the cyclical schedule, in epochs (the recipe: 2-8)
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]


def resolve_batch_size(batch_size: int | None, num_rows: int) -> int:
    """The batch size to use: `batch_size` if given, else the automatic choice (see AUTO_MIN_STEPS)."""
    if batch_size is not None:
        return batch_size
    fitting = [b for b in AUTO_BATCH_SIZES if num_rows >= b * AUTO_MIN_STEPS]
    return max(fitting, default=AUTO_BATCH_SIZES[0])


def parse_hidden(value) -> tuple[int, ...]:
    """'1024', '1024,512', 1024, [1024, 512], '' or 'none' (no hidden layer) -> a tuple of sizes."""
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, str):
        text = value.strip().lower()
        items = [] if text in ("", "none", "0") else [s.strip() for s in text.split(",")]
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    else:
        raise DogtlError(f"--hidden {value!r}: give layer sizes like 1024 or 1024,512 (or 'none')")
    try:
        sizes = tuple(int(s) for s in items)
    except (TypeError, ValueError):
        raise DogtlError(f"--hidden {value!r}: give layer sizes like 1024 or 1024,512 (or 'none')") from None
    if any(s < 1 for s in sizes):
        raise DogtlError(f"--hidden {value!r}: layer sizes must be at least 1")
    return sizes


@dataclass(frozen=True)
class HeadConfig:
    """Every setting of a head training run; written into the model's metadata."""

    cache: str = "cache/features.h5"
    out: str = "models/head.keras"
    epochs: int = 50
    batch_size: int | None = None  # None: resolve_batch_size's automatic choice (16 to 128)
    schedule: str = "exp_range"
    base_lr: float | None = None  # None: 1e-4 * sqrt(batch / 16)
    max_lr: float | None = None  # None: 1e-3 * sqrt(batch / 16)
    step_size: int | None = None  # iterations per half cycle; None: STEP_EPOCHS epochs
    gamma: float | None = None  # exp_range decay per iteration; None: 0.99994 per 16 images
    optimizer: str = "rmsprop"
    patience: int = 5  # 0: never stop early (the best epoch is still kept)
    hidden: tuple = (1024,)
    dropout: float = 0.5
    input_dropout: float = 0.5
    clean_only: bool = False
    label_smoothing: float = 0.0  # training loss only; validation log loss is never smoothed
    weight_decay: float = 0.0  # decoupled, on the Dense kernels: each step w -= lr * weight_decay * w
    precision: str = "auto"  # hidden-layer matmuls: auto (bfloat16 where the CPU has it), float32, bfloat16
    seed: int = 2018
    force: bool = False

    def __post_init__(self):
        object.__setattr__(self, "hidden", parse_hidden(self.hidden))
        _check_types(self)
        if self.epochs < 1:
            raise DogtlError(f"--epochs {self.epochs} must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise DogtlError(f"--batch-size {self.batch_size} must be at least 1")
        if self.schedule not in SCHEDULES:
            raise DogtlError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise DogtlError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        for name in ("base_lr", "max_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise DogtlError(f"--{name.replace('_', '-')} {value}: learning rates must be positive numbers")
        if self.base_lr is not None and self.max_lr is not None:
            _check_range(self.schedule, self.base_lr, self.max_lr, "")
        if self.step_size is not None and self.step_size < 1:
            raise DogtlError(f"--step-size {self.step_size} must be at least 1 iteration")
        if self.gamma is not None and not 0 < self.gamma <= 1:
            raise DogtlError(f"--gamma {self.gamma} must be in (0, 1]")
        if self.patience < 0:
            raise DogtlError(f"--patience {self.patience} must be >= 0 (0 never stops early)")
        for name in ("dropout", "input_dropout", "label_smoothing"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise DogtlError(f"--{name.replace('_', '-')} {value} must be in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise DogtlError(f"--weight-decay {self.weight_decay} must be a number >= 0")
        if self.precision not in PRECISIONS:
            raise DogtlError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def resolve(self, num_rows: int) -> "Resolved":
        """The values the automatic settings take for a training set of `num_rows` images."""
        from .schedules import RECIPE_GAMMA
        from .trainloop import steps_per_epoch

        batch = min(resolve_batch_size(self.batch_size, num_rows), num_rows)
        scale = math.sqrt(batch / RECIPE_BATCH_SIZE)
        base = self.base_lr if self.base_lr is not None else RECIPE_BASE_LR * scale
        top = self.max_lr if self.max_lr is not None else RECIPE_MAX_LR * scale
        if self.base_lr is None or self.max_lr is None:
            _check_range(self.schedule, base, top, f" (the default at batch {batch})")
        steps = steps_per_epoch(num_rows, batch)
        gamma = self.gamma if self.gamma is not None else RECIPE_GAMMA ** (batch / RECIPE_BATCH_SIZE)
        return Resolved(batch, steps, base, top, self.step_size or STEP_EPOCHS * steps, gamma,
                        resolve_precision(self.precision, batch))


@dataclass(frozen=True)
class Resolved:
    """What a run actually used (written into the metadata next to the settings)."""

    batch_size: int
    steps_per_epoch: int
    base_lr: float
    max_lr: float
    step_size: int
    gamma: float
    precision: str  # float32 or bfloat16


def _check_range(schedule: str, base: float, top: float, note: str) -> None:
    if schedule != "constant" and base > top:
        raise DogtlError(f"--base-lr {base:g} is above --max-lr {top:g}{note}: the cyclical schedule runs "
                         "from base up to max; lower --base-lr or raise --max-lr")


_TYPES = {"cache": str, "out": str, "epochs": int, "batch_size": (int, type(None)), "schedule": str,
          "base_lr": (float, type(None)), "max_lr": (float, type(None)), "step_size": (int, type(None)),
          "gamma": (float, type(None)), "optimizer": str,
          "patience": int, "dropout": float, "input_dropout": float, "clean_only": bool,
          "label_smoothing": float, "weight_decay": float, "precision": str, "seed": int, "force": bool}


def _check_types(config: HeadConfig) -> None:
    """Values from config files arrive untyped: refuse the wrong kind with the option's name."""
    for name, kind in _TYPES.items():
        value = getattr(config, name)
        if isinstance(value, (np.integer, np.floating, np.bool_)):  # e.g. from a numpy sweep grid
            value = value.item()
            object.__setattr__(config, name, value)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, name, float(value))
            ok = True
        if not ok:
            wanted = " or ".join(k.__name__ for k in kinds if k is not type(None))
            raise DogtlError(f"--{name.replace('_', '-')} {value!r}: expected {wanted}")


def load_config_file(path: str | Path) -> dict:
    """Settings from a TOML or JSON file: keys are option names with underscores (hyphens are
    accepted too), optionally under a [train_head] table. Unknown keys are refused."""
    from .settingsfile import read_table

    values = read_table(path, f"--config {path}", "a table of settings")
    for section in ("train_head", "train-head"):
        if isinstance(values.get(section), dict) and len(values) == 1:
            values = values[section]
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = set(HeadConfig.option_names())
    unknown = sorted(set(values) - known)
    if unknown:
        raise DogtlError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return values


@dataclass
class FitResult:
    model: object  # the Keras head with the best epoch's weights
    history: "object"  # pandas DataFrame, HISTORY_COLUMNS
    metrics: dict  # val_accuracy, val_log_loss, epochs_run, best_epoch, train_loss, train_accuracy
    seconds_per_epoch: float
    resolved: Resolved  # batch size, learning rates, step size and gamma actually used


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
    from .schedules import CyclicLR

    if config.schedule == "constant":
        return r.base_lr
    return CyclicLR(r.base_lr, r.max_lr, r.step_size, mode=config.schedule, gamma=r.gamma)


_BUILD_LOCK = threading.Lock()


@contextmanager
def _seeded_build(seed: int):
    """Seed Keras for a build whose weights depend on `seed` alone. Keras draws the seeds of
    unseeded initialisers and dropout layers from Python's global `random`, which other threads
    of the process (a threaded sweep worker's, a Dask worker's) draw from too. So during the
    build Keras gets a private generator with the very sequence `random.seed(seed)` gives the
    global one: the same weights whatever else runs, and one build at a time."""
    import keras

    try:
        from keras.src.random import seed_generator
    except ImportError:  # another Keras layout: only the global generator
        seed_generator = None
    private = seed_generator is not None and hasattr(seed_generator, "python_random")
    with _BUILD_LOCK:
        keras.utils.set_random_seed(seed)
        if not private:
            yield
            return
        saved = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = saved


def build_compiled_head(config: HeadConfig, feature_dim: int, num_classes: int, resolved: Resolved,
                        learning_rate=None):
    """The head of `config`, compiled with its optimizer and (cyclical) learning rate schedule
    (or `learning_rate`, a rate or Keras schedule, instead); its initial weights and dropout
    streams depend on `config.seed` alone."""
    from .models import build_head
    from .schedules import make_optimizer

    with _seeded_build(config.seed):
        model = build_head(feature_dim, num_classes, hidden=config.hidden, input_dropout=config.input_dropout,
                           dropout=config.dropout)
    lr = _schedule(config, resolved) if learning_rate is None else learning_rate
    decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}
    optimizer = make_optimizer(config.optimizer, lr, **decay)
    if decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model, lr


def scores(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(accuracy, multi-class log loss as scikit-learn defines it); nan if the outputs are not finite."""
    from sklearn.metrics import log_loss

    probs = np.asarray(probs, np.float64)
    if not np.isfinite(probs).all():
        return float("nan"), float("nan")
    probs = probs / probs.sum(axis=1, keepdims=True)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    return accuracy, float(log_loss(labels, probs, labels=list(range(num_classes))))


def fit_head(config: HeadConfig, train_features: np.ndarray, train_labels: np.ndarray,
             val_features: np.ndarray, val_labels: np.ndarray, num_classes: int,
             on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train a head from arrays: train_features [passes, rows, dim] (pass 0 clean), labels [rows],
    val_features [rows, dim] (clean). Only the training settings of `config` are used (not
    cache/out/force). Same inputs and seed give the same model on the same machine."""
    import pandas as pd

    from .models import set_head_precision
    from .trainloop import EpochRunner

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

    rows, best, best_epoch, best_weights, waited, seconds = [], math.inf, 0, None, 0, 0.0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        losses, accuracy = runner.run(epoch)
        val_accuracy, val_loss = scores(val_labels, runner.predict(val_features), num_classes)
        seconds += time.perf_counter() - started
        iteration = epoch * runner.steps - 1  # the last step of this epoch
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "accuracy": accuracy, "val_loss": val_loss,
               "val_accuracy": val_accuracy, "lr": float(lr(iteration)) if callable(lr) else float(lr)}
        rows.append(row)
        if on_epoch:
            on_epoch({**row, "epochs": config.epochs, "seconds": time.perf_counter() - started})
        if not math.isfinite(row["loss"]) or not math.isfinite(val_loss):
            log.warning("epoch %d: loss is not finite; training stopped (lower the learning rates)", epoch)
            break
        if val_loss < best:
            best, best_epoch, best_weights, waited = val_loss, epoch, model.get_weights(), 0
        else:
            waited += 1
            if config.patience and waited >= config.patience:
                break
    if best_weights is None:
        raise DogtlError(f"training diverged in epoch 1 (loss {rows[0]['loss']}): lower --base-lr/--max-lr "
                     f"(they were {resolved.base_lr:g} and {resolved.max_lr:g})")
    model.set_weights(best_weights)
    set_head_precision(model, "float32")  # the saved head computes like any other float32 model
    val_accuracy, val_loss = scores(val_labels, runner.predict(val_features), num_classes)
    best_row = rows[best_epoch - 1]
    metrics = {"val_accuracy": val_accuracy, "val_log_loss": val_loss, "epochs_run": len(rows),
               "best_epoch": best_epoch, "train_loss": best_row["loss"], "train_accuracy": best_row["accuracy"]}
    return FitResult(model, pd.DataFrame(rows, columns=HISTORY_COLUMNS), metrics, seconds / len(rows), resolved)


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
    return TrainingData(train, cache.labels[train_rows].astype(np.int32), val,
                        cache.labels[val_rows].astype(np.int32), list(cache.classes))


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {"model": out, "metadata": out.with_suffix(".json"), "history": out.with_suffix(".history.csv"),
            "plot": out.with_suffix(".png")}


def check_outputs(out: str | Path, force: bool) -> dict[str, Path]:
    """Refuse to overwrite any of the run's outputs without --force (before any training)."""
    from .artifacts import check_writable

    paths = output_paths(out)
    if paths["model"].suffix == ".keras":
        paths["model"].parent.mkdir(parents=True, exist_ok=True)
    check_writable(paths["model"], force)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise DogtlError(f"{existing[0]} exists: pass --force to overwrite it or choose another --out")
    return paths


def write_csv_atomic(frame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def train_head(config: HeadConfig, progress: Callable[[dict], None] | None = None) -> HeadResult:
    """Train a head on a feature cache and write model, metadata, history CSV and plot.

    `progress` gets one dict per epoch (HISTORY_COLUMNS plus epochs and seconds)."""
    from .artifacts import save_model
    from .cache import open_cache
    from .plots import plot_history

    started = time.perf_counter()
    paths = check_outputs(config.out, config.force)
    cache = open_cache(config.cache)
    data = load_training_data(cache, config.clean_only)
    log.info("training on %d images x %d passes, validating on %d", data.train_features.shape[1],
             data.train_features.shape[0], len(data.val_labels))
    fit = fit_head(config, data.train_features, data.train_labels, data.val_features, data.val_labels,
                   len(cache.classes), on_epoch=progress)
    fp = cache.fingerprint
    metadata = {
        "kind": "head", "classes": list(cache.classes), "backbone": fp.get("backbone"),
        "weights": fp.get("weights"), "image_size": fp.get("image_size"),
        "preprocessing": fp.get("preprocessing"), "feature_dim": cache.feature_dim,
        "cache": str(cache.path), "cache_fingerprint": fp, "settings": asdict(config), "metrics": fit.metrics,
        "train_images": int(data.train_features.shape[1]), "val_images": int(len(data.val_labels)),
        "passes_used": int(data.train_features.shape[0]), "resolved": asdict(fit.resolved),
        "history": paths["history"].name,
    }
    write_csv_atomic(fit.history, paths["history"])
    plot_history(fit.history, paths["plot"])
    save_model(fit.model, paths["model"], metadata)
    return HeadResult(paths["model"], fit.metrics, fit.history, paths["history"], paths["plot"],
                      time.perf_counter() - started, fit.seconds_per_epoch, int(data.train_features.shape[1]),
                      int(len(data.val_labels)), int(data.train_features.shape[0]), fit.resolved)
