"""Stage three's settings: every finetune option, declared once (see core/settings.py).

The optimizer, schedule, learning-rate, step-size, gamma, epochs and patience settings are
train-head's own declarations (head/settings.py: the same names, checks and meanings); only
their defaults and help differ where the recipe's fine-tuning differs (SGD at a constant 1e-4,
patience 3, a fixed batch of images).
"""

from __future__ import annotations

from dataclasses import replace

from dogtl.core.distribute import STRATEGIES
from dogtl.core.precision import PRECISION_HELP, PRECISIONS
from dogtl.core.runtimes import RUNTIME_HELP, RUNTIMES
from dogtl.core.settings import Setting, settings_class
from dogtl.head.settings import HEAD_SETTINGS, RECIPE_BATCH_SIZE, STEP_EPOCHS, check_rate_range

# Settings that may change between a killed run and its resumption: the weights and cache
# files are pinned by content (the head's weights identity, the cache fingerprint), not path.
RESUMABLE = {"epochs", "patience", "force", "strategy", "weights", "cache"}

_HEAD = {s.name: s for s in HEAD_SETTINGS}
FINETUNE_SETTINGS = (
    Setting("data", "str", "data", "Data folder the cache was extracted from (the images are read again)."),
    Setting("head", "str", "models/head.keras", "Trained head (from train-head); its metadata names the backbone, "
            "weights, image size and cache."),
    Setting("out", "str", "models/finetuned.keras", "Where to write the fine-tuned model (+ .json metadata, "
            ".history.csv, .png)."),
    Setting("cache", "str", None, "Feature cache holding the train/validation split (default: the head's).",
            optional=True),
    Setting("weights", "str", None, "Only if the backbone came from a local weights file that has moved since "
            "extraction: that file again (default: the file recorded with the head, while its content is "
            "unchanged).", optional=True),
    Setting("trainable_blocks", "int", 2, "Top backbone blocks to unfreeze (xception: 2 = block13 + block14, the "
            "recipe's 'freeze the first 116 layers'). BatchNorm stays frozen.", low=0),
    replace(_HEAD["epochs"], default=10, help="Most epochs to run (early stopping may end sooner)."),
    Setting("batch_size", "int", 16, "Images per training step (the global batch under --strategy).", low=1),
    replace(_HEAD["optimizer"], default="sgd", help="sgd (momentum 0.9, the recipe's), rmsprop (rho 0.9) or adam."),
    replace(_HEAD["schedule"], default="constant", help="Learning-rate schedule: constant (--base-lr throughout), "
            "or triangular, triangular2, exp_range (cyclical between --base-lr and --max-lr, Smith 2017), as "
            "train-head."),
    replace(_HEAD["base_lr"], default=1e-4, optional=False, help="The learning rate of --schedule constant, and "
            "the lowest of the cycle."),
    replace(_HEAD["max_lr"], default=1e-3, optional=False, help="Peak learning rate of the cycle."),
    replace(_HEAD["step_size"], help=f"Iterations per half cycle (default: {STEP_EPOCHS} epochs' worth, as "
            "train-head)."),
    _HEAD["gamma"],
    Setting("augment", "bool", True, "Online augmentation, the cache's settings, fresh each epoch."),
    replace(_HEAD["patience"], default=3),
    Setting("seed", "int", None, "Shuffling seed (default: the cache's seed).", optional=True),
    Setting("deterministic", "bool", False, "Deterministic ops and seeded everything: the same command gives the "
            "same weights bit for bit on CPU, also after a kill and resume (slower; see docs/reliability.md).",
            searchable=False),
    Setting("force", "bool", False, "Overwrite --out; discard an unfinished run made with other settings."),
    Setting("strategy", "str", "default", "default (one device), mirrored (every local GPU) or multi-worker (hosts "
            "in TF_CONFIG). --batch-size is the global batch: with N devices, N x the batch and (linear scaling "
            "rule) N x --base-lr keeps them busy.", choices=STRATEGIES),
    Setting("precision", "str", "auto", PRECISION_HELP, choices=PRECISIONS),
    Setting("runtime", "str", "auto", RUNTIME_HELP + " Runs the frozen layers below --trainable-blocks (from images; "
            "TensorFlow trains the rest on their output).", choices=RUNTIMES, searchable=False),
    Setting("from_cache", "bool", False, "Train on the cache's cut activations (extract-features --cut-blocks N, "
            "with --trainable-blocks N) instead of the images: one cached pass per image and epoch, as train-head, "
            "no image decoded and no frozen layer run. The saved model is still the whole backbone + head."),
)


def _check(config) -> None:
    check_rate_range(config.schedule, config.base_lr, config.max_lr, "")


def _cycle_step_size(config, steps_per_epoch: int) -> int:
    return config.step_size or STEP_EPOCHS * steps_per_epoch


def _cycle_gamma(config) -> float:
    """exp_range's decay per iteration: train-head's default rule, the recipe's decay per
    image at any batch size."""
    from dogtl.head.schedules import RECIPE_GAMMA

    return config.gamma if config.gamma is not None else RECIPE_GAMMA ** (config.batch_size / RECIPE_BATCH_SIZE)


FinetuneConfig = settings_class(
    "FinetuneConfig", FINETUNE_SETTINGS, "Every setting of a fine-tuning run; written into the model's metadata.",
    {"check": _check, "cycle_step_size": _cycle_step_size, "cycle_gamma": _cycle_gamma, "__module__": __name__})
