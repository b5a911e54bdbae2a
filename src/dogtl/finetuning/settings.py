"""Stage three's settings: every finetune option, declared once (see core/settings.py).

The optimizer, schedule, learning-rate, step-size, gamma, warm-up, label-smoothing, weight-decay,
epochs and patience settings are train-head's own declarations (head/settings.py: the same
names, checks and meanings); only their defaults, help and (optimizer, schedule) extra choices
differ. The defaults are the recipe measured best on shifted domains (docs/finetuning.md);
`RECIPES["reference"]` is the reference recipe's fine-tuning (SGD at a constant 1e-4, the top
2 blocks, its augmentation), one `--recipe reference` away.
"""

from __future__ import annotations

from dataclasses import replace

from dogtl.core.distribute import STRATEGIES
from dogtl.core.errors import SettingError
from dogtl.core.precision import PRECISION_HELP, PRECISIONS
from dogtl.core.runtimes import RUNTIME_HELP, RUNTIMES
from dogtl.core.settings import Setting, settings_class
from dogtl.data.augment import AUGMENT_PRESETS
from dogtl.head.settings import (HEAD_SETTINGS, OPTIMIZERS, RECIPE_BATCH_SIZE, SCHEDULES, STEP_EPOCHS,
                                 check_rate_range)

FINETUNE_OPTIMIZERS = OPTIMIZERS + ("adamw",)
FINETUNE_SCHEDULES = SCHEDULES + ("cosine", "one_cycle")
AUGMENTS = tuple(AUGMENT_PRESETS)  # data/augment.py: augment_preset
BATCHNORM = ("frozen", "reestimate")
ONE_CYCLE_WARMUP = 0.3  # one_cycle's default warm-up: this fraction of the run (PyTorch's OneCycleLR pct_start)

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
    Setting("trainable_blocks", "blocks", "all", "Top backbone blocks to unfreeze, or all (the whole backbone, its stem "
            "too). xception 2 = block13 + block14, the recipe's 'freeze the first 116 layers'. BatchNorm stays "
            "frozen (see --batchnorm)."),
    replace(_HEAD["epochs"], default=5, help="Most epochs to run (early stopping may end sooner); the cosine and "
            "one_cycle schedules span exactly this many."),
    Setting("batch_size", "int", 32, "Images per training step (the global batch under --strategy).", low=1),
    replace(_HEAD["optimizer"], default="adamw", choices=FINETUNE_OPTIMIZERS,
            help="sgd (momentum 0.9, the recipe's), rmsprop (rho 0.9), adam, or adamw (Adam with decoupled weight "
            "decay, --weight-decay)."),
    replace(_HEAD["schedule"], default="cosine", choices=FINETUNE_SCHEDULES,
            help="Learning-rate schedule: constant (--base-lr throughout); triangular, triangular2, exp_range "
            "(cyclical between --base-lr and --max-lr, Smith 2017, as train-head); cosine (linear warm-up from "
            "--base-lr to --max-lr over --warmup-epochs, then a half cosine down to --base-lr at the last epoch, "
            "Keras's CosineDecay); one_cycle (a half cosine up from --base-lr to --max-lr over --warmup-epochs, "
            f"or the first {ONE_CYCLE_WARMUP:.0%} of the run when 0, then a half cosine down to 0)."),
    replace(_HEAD["base_lr"], default=1e-6, optional=False, help="The lowest rate of the cyclical, cosine and "
            "one_cycle schedules (where they start and end), and the rate of --schedule constant (pass one: the "
            "default is the cosine's floor)."),
    replace(_HEAD["max_lr"], default=3e-4, optional=False, help="Peak learning rate of the cyclical, cosine and "
            "one_cycle schedules."),
    replace(_HEAD["step_size"], help=f"Iterations per half cycle (default: {STEP_EPOCHS} epochs' worth, as "
            "train-head)."),
    _HEAD["gamma"],
    replace(_HEAD["warmup_epochs"], default=1, help="Epochs of warm-up: cosine and one_cycle rise from --base-lr to "
            "--max-lr over them; the other schedules ramp up linearly from near 0 (0: none)."),
    Setting("block_lr_decay", "float", 1.0, "Discriminative learning rates (ULMFiT): the top block and the head "
            "train at the schedule's rate, each block below at this times the rate of the block above (1: one rate "
            "for all).", low=0, low_open=True, high=1),
    Setting("unfreeze_every", "int", 0, "Gradual unfreezing: the top block and the head train from the start, and "
            "every this many epochs the next block down thaws, until --trainable-blocks train (0: all from the "
            "start). Blocks not yet thawed still cost their backward pass.", low=0),
    replace(_HEAD["label_smoothing"], help="Smooth the training targets: (1 - e) on the true class, e spread over "
            "all classes. Validation log loss is never smoothed."),
    replace(_HEAD["weight_decay"], default=None, optional=True, low=0,
            help="Decoupled weight decay on every unfrozen kernel, each at its own layer's rate: every step "
            "w -= lr * weight_decay * w. Default: 0.004 (Keras's AdamW default) with adamw, 0 otherwise."),
    Setting("ema_epochs", "float", 1.0, "Polyak averaging: validate, keep and save an exponential moving average of "
            "the weights over about this many epochs (Keras's use_ema, momentum 1 - 1 / (this x steps per epoch)), "
            "not the last step's weights; smoother and better on validation than them (0: the raw weights).", low=0),
    Setting("calibrate", "bool", True, "Temperature scaling (Guo et al. 2017): judge the head and each epoch by their "
            "validation log loss at the one temperature that fits the validation split best, and fold the kept "
            "model's into its last layer (the same predicted classes, calibrated probabilities). Fine-tuned networks "
            "grow overconfident while still gaining accuracy: without it the best log loss comes epochs before the "
            "best accuracy."),
    Setting("augment", "str", "none", "Online augmentation: " + "; ".join(
        f"{name} ({what})" for name, what in {**AUGMENT_PRESETS, "none": "measured best over the default 5 epochs"}.items())
            + ". With --from-cache: none trains on the clean pass, anything else on the cache's augmented passes "
            "(light or recipe must then be them).", choices=AUGMENTS),
    Setting("batchnorm", "str", "frozen", "frozen: BatchNorm keeps the backbone's statistics (inference mode); "
            "reestimate: before training, the statistics of the unfrozen blocks' and the head's BatchNorm layers "
            "are re-estimated on the clean training images of the new domain, then kept frozen.", choices=BATCHNORM),
    replace(_HEAD["patience"], default=0, help="Stop after this many epochs without a better validation log loss "
            "(0, the default: never; a decaying schedule's best epochs come last). The best epoch is kept."),
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
            "with --trainable-blocks N or fewer) instead of the images: one cached pass per image and epoch, as "
            "train-head, no image decoded and no frozen layer below the cut run. The saved model is still the whole "
            "backbone + head."),
)


def _check(config) -> None:
    check_rate_range(config.schedule, config.base_lr, config.max_lr, f" (--schedule {config.schedule})")
    if config.batchnorm == "reestimate" and config.strategy != "default":
        raise SettingError(f"--batchnorm reestimate runs on one device: drop --strategy {config.strategy}")


def _resolved_weight_decay(config) -> float:
    return config.weight_decay if config.weight_decay is not None else (0.004 if config.optimizer == "adamw" else 0.0)


def _ema_momentum(config, steps_per_epoch: int) -> float | None:
    """The optimizer's ema_momentum per step for --ema-epochs (None: no averaging)."""
    return 1 - 1 / max(1.0, config.ema_epochs * steps_per_epoch) if config.ema_epochs else None


def _cycle_step_size(config, steps_per_epoch: int) -> int:
    return config.step_size or STEP_EPOCHS * steps_per_epoch


def _cycle_gamma(config) -> float:
    """exp_range's decay per iteration: train-head's default rule, the recipe's decay per
    image at any batch size."""
    from dogtl.core.schedules import RECIPE_GAMMA  # local: imports Keras; `dogtl --help` reads these settings

    return config.gamma if config.gamma is not None else RECIPE_GAMMA ** (config.batch_size / RECIPE_BATCH_SIZE)


FinetuneConfig = settings_class(
    "FinetuneConfig", FINETUNE_SETTINGS, "Every setting of a fine-tuning run; written into the model's metadata.",
    {"check": _check, "cycle_step_size": _cycle_step_size, "cycle_gamma": _cycle_gamma,
     "resolved_weight_decay": _resolved_weight_decay, "ema_momentum": _ema_momentum, "__module__": __name__})

# Named sets of settings (`--recipe NAME`, `dogtl.finetune(recipe=NAME)`): each replaces the defaults
# of the settings it names; options given explicitly (or in --config) still win.
RECIPES = {
    "reference": dict(trainable_blocks=2, optimizer="sgd", schedule="constant", base_lr=1e-4, batch_size=16,
                      epochs=10, patience=3, warmup_epochs=0, block_lr_decay=1.0, unfreeze_every=0,
                      label_smoothing=0.0, weight_decay=None, ema_epochs=0.0, calibrate=False, augment="recipe",
                      batchnorm="frozen"),
}


def recipe_settings(name: str | None) -> dict:
    """The settings of recipe `name` (None: none)."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise SettingError(f"--recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])
