"""Stage two's settings: every train-head option, its default and its checks.

`HeadConfig` holds the hyperparameters of one head training; `resolve` turns its automatic
values (batch size, learning rates, step size, precision) into numbers for a given cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.head.precision import PRECISIONS, resolve_precision

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
        from dogtl.head.schedules import RECIPE_GAMMA
        from dogtl.head.trainloop import steps_per_epoch

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
    from dogtl.core.settingsfile import read_table

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
