"""Stage two's settings: every train-head option, its default and its checks.

`HeadConfig` holds the hyperparameters of one head training; `resolve` turns its automatic
values (batch size, learning rates, step size, precision) into numbers for a given cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dogtl.core.errors import DogtlError
from dogtl.core.settings import Setting, read_settings_file, settings_class
from dogtl.core.precision import HEAD_PRECISIONS, resolve

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


HEAD_SETTINGS = (
    Setting("epochs", "int", 50, "Most epochs to run (early stopping usually ends sooner).", low=1),
    Setting("batch_size", "int", None, "Feature vectors per step. Default: the recipe's 16, raised to 32, 64 or 128 "
            "while an epoch keeps at least 64 steps (128 for a Kaggle-size cache: ~4x faster per epoch than 16).",
            optional=True, low=1),
    Setting("schedule", "str", "exp_range", "Learning-rate schedule: exp_range, triangular, triangular2 (cyclical, "
            "Smith 2017) or constant (--base-lr throughout).", choices=SCHEDULES),
    Setting("base_lr", "float", None, "Lowest learning rate of the cycle, the rate of --schedule constant. Default: "
            "the recipe's 1e-4 at batch 16, times sqrt(batch size / 16).", optional=True, low=0, low_open=True),
    Setting("max_lr", "float", None, "Peak learning rate of the cycle (`dogtl lr-find` suggests one). Default: the "
            "recipe's 1e-3 at batch 16, times sqrt(batch size / 16).", optional=True, low=0, low_open=True),
    Setting("step_size", "int", None, "Iterations per half cycle (default: 4 epochs' worth; the recipe uses 2-8 "
            "epochs).", optional=True, low=1),
    Setting("gamma", "float", None, "exp_range: the cycle's amplitude is multiplied by gamma every iteration "
            "(default: 0.99994 per 16 images, the recipe's decay per epoch at any batch size).", optional=True,
            low=0, low_open=True, high=1),
    Setting("warmup_epochs", "int", 0, "Epochs over which the learning rate ramps up linearly from near 0 to the "
            "schedule's (0: none). Helps large batches and high --max-lr start stably.", low=0),
    Setting("optimizer", "str", "rmsprop", "rmsprop (rho 0.9, the recipe's), adam, or sgd (momentum 0.9).",
            choices=OPTIMIZERS),
    Setting("patience", "int", 5, "Stop after this many epochs without a better validation log loss (0: never); "
            "the best epoch's weights are kept.", low=0),
    Setting("hidden", "hidden", (1024,), "Hidden Dense relu layers of the head, comma-separated sizes (e.g. 1024 or "
            "1024,512), or 'none'."),
    Setting("dropout", "float", 0.5, "Dropout rate after each hidden layer.", low=0, high=1, high_open=True),
    Setting("input_dropout", "float", 0.5, "Dropout rate on the batch-normalised input features.", low=0, high=1,
            high_open=True),
    Setting("clean_only", "bool", False, "Train on the clean pass only. By default, every epoch each training image "
            "contributes one of its cached passes (clean or augmented), drawn at random per image and epoch."),
    Setting("label_smoothing", "float", 0.0, "Smooth the training targets: (1 - e) on the true class, e spread over "
            "all classes (0.1 is common). Validation log loss is never smoothed.", low=0, high=1, high_open=True),
    Setting("weight_decay", "float", 0.0, "Decoupled weight decay on the Dense kernels: every step "
            "w -= lr * weight_decay * w (0: none).", low=0),
    Setting("precision", "str", "auto", "Number format of the hidden layers' matrix products: auto (bfloat16 at "
            "batches of 64 and up on CPUs that multiply it in hardware, ~1.4x faster per epoch there; float32 "
            "elsewhere), float32 or bfloat16. Weights, normalisation and softmax stay float32, and the saved model "
            "is float32.", choices=HEAD_PRECISIONS),
    Setting("seed", "int", 2018, "Seed of initialisation, dropout and pass sampling: the same seed and cache give the "
            "same metrics."),
)


def _check(config) -> None:
    if config.base_lr is not None and config.max_lr is not None:
        check_rate_range(config.schedule, config.base_lr, config.max_lr, "")


def _resolve(config, num_rows: int) -> "Resolved":
    """The values the automatic settings take for a training set of `num_rows` images."""
    # local: both import Keras, which `dogtl --help` (it reads these settings) must not load
    from dogtl.core.schedules import RECIPE_GAMMA
    from dogtl.head.trainloop import steps_per_epoch

    batch = min(resolve_batch_size(config.batch_size, num_rows), num_rows)
    scale = math.sqrt(batch / RECIPE_BATCH_SIZE)
    base = config.base_lr if config.base_lr is not None else RECIPE_BASE_LR * scale
    top = config.max_lr if config.max_lr is not None else RECIPE_MAX_LR * scale
    if config.base_lr is None or config.max_lr is None:
        check_rate_range(config.schedule, base, top, f" (the default at batch {batch})")
    steps = steps_per_epoch(num_rows, batch)
    gamma = config.gamma if config.gamma is not None else RECIPE_GAMMA ** (batch / RECIPE_BATCH_SIZE)
    return Resolved(batch, steps, base, top, config.step_size or STEP_EPOCHS * steps, gamma,
                    resolve(config.precision, head_batch=batch))


HeadConfig = settings_class(
    "HeadConfig", HEAD_SETTINGS,
    "The hyperparameters of one head training (HEAD_SETTINGS); written into the model's metadata.",
    {"check": _check, "resolve": _resolve, "__module__": __name__})


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


def check_rate_range(schedule: str, base: float, top: float, note: str) -> None:
    """The cyclical schedules run from the base rate up to the max: refuse base above max."""
    if schedule != "constant" and base > top:
        raise DogtlError(f"--base-lr {base:g} is above --max-lr {top:g}{note}: the cyclical schedule runs "
                         "from base up to max; lower --base-lr or raise --max-lr")


LRFIND_SHARED = ("batch_size", "optimizer", "hidden", "dropout", "input_dropout", "clean_only", "seed")
LRFIND_SETTINGS = tuple(s for s in HEAD_SETTINGS if s.name in LRFIND_SHARED) + (
    Setting("start_lr", "float", 1e-7, "First (tiny) learning rate of the ramp.", low=0, low_open=True),
    Setting("end_lr", "float", 1.0, "Last (large) learning rate of the ramp, if the loss has not diverged before.",
            low=0, low_open=True),
    Setting("steps", "int", 300, "Steps of the exponential ramp from --start-lr to --end-lr.", low=10),
)


def _check_lrfind(config) -> None:
    if config.end_lr <= config.start_lr:
        raise DogtlError(f"--end-lr {config.end_lr} must be above --start-lr {config.start_lr}")


def _head_config(config) -> HeadConfig:
    """The train-head settings the range test trains with (a constant schedule it ramps itself)."""
    return HeadConfig(schedule="constant", base_lr=config.start_lr, max_lr=config.end_lr,
                      **{name: getattr(config, name) for name in LRFIND_SHARED})


LRFindConfig = settings_class("LRFindConfig", LRFIND_SETTINGS,
                              "The settings of a learning-rate range test: train-head's head options and the ramp.",
                              {"check": _check_lrfind, "head_config": _head_config, "__module__": __name__})


def load_config_file(path: str | Path) -> dict:
    """train-head settings from a TOML or JSON file (see `core.settings.read_settings_file`)."""
    return read_settings_file(path, HEAD_SETTINGS, "train_head")
