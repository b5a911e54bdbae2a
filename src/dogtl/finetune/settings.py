"""Stage three's settings: every finetune option, its default and its checks.

The optimizer, schedule, learning-rate, step-size, gamma and patience options have
train-head's names and meanings (head/settings.py); only their defaults differ where the
recipe's fine-tuning differs (SGD at a constant 1e-4, patience 3).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields

from dogtl.core.errors import DogtlError
from dogtl.head.settings import OPTIMIZERS, RECIPE_BATCH_SIZE, SCHEDULES, STEP_EPOCHS

# Settings that may change between a killed run and its resumption: the weights and cache
# files are pinned by content (the head's weights identity, the cache fingerprint), not path.
RESUMABLE = {"epochs", "patience", "force", "strategy", "weights", "cache"}


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning run; written into the model's metadata."""

    data: str = "data"
    head: str = "models/head.keras"
    out: str = "models/finetuned.keras"
    cache: str | None = None  # default: the cache recorded with the head (holds the split)
    weights: str | None = None  # default: the file recorded with the head, while its hash matches
    trainable_blocks: int = 2
    epochs: int = 10
    batch_size: int = 16  # the global batch under a distribution strategy
    optimizer: str = "sgd"  # sgd (momentum 0.9), rmsprop or adam
    schedule: str = "constant"  # constant (base_lr throughout) | triangular | triangular2 | exp_range
    base_lr: float = 1e-4  # the constant rate, and the cycle's lowest
    max_lr: float = 1e-3  # the cycle's peak
    step_size: int | None = None  # iterations per half cycle; None: STEP_EPOCHS epochs
    gamma: float | None = None  # exp_range decay per iteration; None: train-head's rule
    augment: bool = True
    patience: int = 3  # epochs without a better validation log loss before stopping; 0: never
    seed: int | None = None  # shuffling seed (default: the cache's seed)
    force: bool = False
    strategy: str = "default"  # default | mirrored | multi-worker

    def __post_init__(self):
        from dogtl.core.distribute import check_strategy

        _check_types(self)
        check_strategy(self.strategy)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise DogtlError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise DogtlError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise DogtlError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        for name in ("base_lr", "max_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise DogtlError(f"--{name.replace('_', '-')} {value}: learning rates must be positive numbers")
        if self.schedule != "constant" and self.base_lr > self.max_lr:
            raise DogtlError(f"--base-lr {self.base_lr:g} is above --max-lr {self.max_lr:g}: the cyclical "
                             "schedule runs from base up to max; lower --base-lr or raise --max-lr")
        if self.step_size is not None and self.step_size < 1:
            raise DogtlError(f"--step-size {self.step_size} must be at least 1 iteration")
        if self.gamma is not None and not 0 < self.gamma <= 1:
            raise DogtlError(f"--gamma {self.gamma} must be in (0, 1]")
        if self.patience < 0:
            raise DogtlError(f"--patience {self.patience} must be >= 0 (0 never stops early)")
        if self.trainable_blocks < 0:
            raise DogtlError(f"--trainable-blocks {self.trainable_blocks} must be >= 0")

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def cycle_step_size(self, steps_per_epoch: int) -> int:
        return self.step_size or STEP_EPOCHS * steps_per_epoch

    def cycle_gamma(self) -> float:
        """exp_range's decay per iteration: train-head's default rule, the recipe's decay per
        image at any batch size."""
        from dogtl.head.schedules import RECIPE_GAMMA

        return self.gamma if self.gamma is not None else RECIPE_GAMMA ** (self.batch_size / RECIPE_BATCH_SIZE)


def _check_types(config: FinetuneConfig) -> None:
    """Values from a --config file arrive untyped: refuse the wrong kind naming the option
    (an int is taken where a float is expected)."""
    hints = typing.get_type_hints(FinetuneConfig)
    for name, hint in hints.items():
        value = getattr(config, name)
        kinds = typing.get_args(hint) or (hint,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, name, float(value))
        elif not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(k.__name__ for k in kinds if k is not type(None))
            raise DogtlError(f"--{name.replace('_', '-')} {value!r}: expected {wanted}")
