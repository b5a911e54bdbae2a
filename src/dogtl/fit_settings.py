"""`dogtl fit`'s settings, declared once (see core/settings.py): `FitConfig`, the `dogtl fit`
options and `dogtl.api.fit`'s defaults come from FIT_SETTINGS. Apart from fitting.py, which
imports every stage, so that `dogtl --help` need not.
"""

from __future__ import annotations

from pathlib import Path

from dogtl.core.backbones import backbone_help
from dogtl.core.settings import Setting, settings_class

BACKBONE = "mobilenet_v2"  # the cheapest registered backbone: most epochs per minute on CPUs
PASSES = 2  # augmented passes at extraction, on top of the clean one

FIT_SETTINGS = (
    Setting("data", "path", "data", "Data folder: Kaggle layout (labels.csv, train/, test/) or one sub-folder per "
            "class."),
    Setting("budget", "duration", 1800.0, "Wall-clock time the whole command may take, start-up included: 90s, 30m, "
            "1h (a bare number is seconds)."),
    Setting("out", "path", "models/model.keras", "The final model (+ .json metadata); the work is kept beside it in "
            "OUT-without-.keras.fit/."),
    Setting("backbone", "str", BACKBONE, backbone_help() + " The default is the cheapest per image: the most "
            "fine-tuning epochs in a budget on CPUs."),
    Setting("weights", "str", "imagenet", "'imagenet' (downloaded by Keras), 'none' (random, for smoke tests) or PATH "
            "to a local no-top weights file."),
    Setting("image_size", "int", None, "Input size in pixels. Default: the images' own (median) size rounded to 32 "
            "px, from 96 up to the backbone's own size.", optional=True),
    Setting("passes", "int", PASSES, "Augmented passes cached per image (light augmentation: rotation 10 degrees, "
            "zoom and shift 0.1).", low=0),
    Setting("hflip", "bool", True, "Mirror images in augmentation (turn off for digits, text, anything with a "
            "handedness)."),
    Setting("val_fraction", "float", 0.1, "Stratified validation fraction: what fit chooses on and reports.",
            low=0, high=1, low_open=True, high_open=True, hint=": fit needs a validation split to choose and report"),
    Setting("seed", "int", 2018, "Seed of the split, augmentation and search."),
    Setting("trials", "int", None, "At most this many head-search trials (default: as many as its share of the "
            "budget allows).", optional=True, low=1),
    Setting("epochs", "int", None, "At most this many fine-tuning epochs (default: as many as the budget allows).",
            optional=True, low=1, hint=" (or leave it out: as many as fit the budget)"),
    Setting("force", "bool", False, "Start over: replace --out and discard the work folder of an earlier fit.",
            cli_names=("--force",)),
)

FitConfig = settings_class("FitConfig", FIT_SETTINGS, "fit's settings (FIT_SETTINGS); `budget` in seconds.", {
    "__module__": __name__,
    "folder": property(lambda self: Path(self.out).with_suffix(".fit"), doc="The work folder beside --out."),
})
