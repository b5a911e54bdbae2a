"""Stage one's settings: every extract-features option, declared once (see core/settings.py).

`ExtractConfig`, the `dogtl extract-features` options and `dogtl.extract_features`'s defaults
all come from EXTRACT_SETTINGS; the augmentation options are data/augment.py's own.
"""

from __future__ import annotations

from dogtl.core.distribute import STRATEGIES
from dogtl.core.errors import SettingError
from dogtl.core.precision import PRECISION_HELP, PRECISIONS
from dogtl.core.runtimes import RUNTIME_HELP, RUNTIMES
from dogtl.core.settings import Setting, choices_help, settings_class
from dogtl.data.augment import AUGMENT_SETTINGS, AugmentConfig
from dogtl.core.backbones import backbone_help
from dogtl.features.cut import CUT_DTYPES
from dogtl.features.shards import parse_shard

DTYPES = ("float16", "float32")
BAD_IMAGE = ("skip", "fail")
STRATEGY_NOTES = {"default": "one device", "mirrored": "every local GPU", "multi-worker": "hosts in TF_CONFIG"}

EXTRACT_SETTINGS = (
    Setting("data", "path", "data", "Data folder: Kaggle layout (labels.csv, train/, test/), ImageFolder layout "
            "(train/<class>/, val/<class>/ as the validation split, test/) or one sub-folder per class. Images: JPEG, "
            "PNG, GIF, BMP or WebP."),
    Setting("cache", "path", "cache/features.h5", "HDF5 file to write the features to."),
    Setting("id_column", "str", None, "Kaggle layout: labels.csv's column of image ids (default: recognised by name, "
            "e.g. id, image, filename, or the first of two columns). Ids may name the file with or without its "
            "extension.", optional=True),
    Setting("label_column", "str", None, "Kaggle layout: labels.csv's column of class names (default: recognised by "
            "name, e.g. breed, label, class, or the second of two columns).", optional=True),
    Setting("backbone", "str", "xception", backbone_help()),  # checked by core.backbones.get_backbone
    Setting("weights", "str", "imagenet", "'imagenet' (downloaded by Keras), 'none' (random, for smoke tests) or "
            "PATH to a local no-top weights file."),
    Setting("image_size", "int", None, "Square input size in pixels (default: the backbone's own, 299 for "
            "xception).", optional=True),
    Setting("passes", "int", 5, "Augmented passes over every labelled image, on top of the clean pass.", low=0),
    Setting("tta_passes", "int", 0, "Augmented passes over test images, for test-time augmentation.", low=0),
    Setting("batch_size", "int", 32, "Images per backbone call.", low=1),
    Setting("val_fraction", "float", 0.1, "Validation fraction, stored in the cache for every later stage. Each "
            "image's side is its own seeded draw, so it stays put when other images are added or removed; each class "
            "gives this fraction on average (a small class may give none) and keeps at least one training image. The "
            "ImageFolder layout's val/ folder is used instead when there is one.", low=0, high=1, high_open=True),
    Setting("seed", "int", 2018, "Seed of the split and of every augmentation."),
    Setting("on_bad_image", "str", "skip", "'skip' unreadable images (listed in the summary and the cache) or 'fail' "
            "on the first.", choices=BAD_IMAGE),
    Setting("dtype", "str", "float16", "Stored feature precision: float16 (half the disk) or float32.", choices=DTYPES),
    *AUGMENT_SETTINGS,
    Setting("force", "bool", False, "Replace a cache (or unfinished extraction) made with other settings, recomputing "
            "every image. Not needed when only the images changed: see below.", cli_names=("--force",)),
    Setting("shard", "str", None, "I/N: extract only the I-th of N disjoint shards (one per machine) into "
            "CACHE-STEM.shard-I-of-N.h5; join them with `dogtl merge-cache`.", optional=True),
    Setting("strategy", "str", "default", f"{choices_help(STRATEGIES, STRATEGY_NOTES)}. --batch-size is then the "
            "global batch, split over all replicas.", choices=STRATEGIES),
    Setting("precision", "str", "auto", PRECISION_HELP + " Recorded in the cache: a cache made at another precision "
            "is refused.", choices=PRECISIONS),
    Setting("runtime", "str", "auto", RUNTIME_HELP + " Recorded in the cache, not refused: runtimes give the same "
            "features to float rounding.", choices=RUNTIMES),
    Setting("cut_blocks", "blocks", 0, "Also store, for every pass, the activations entering the top N backbone "
            "blocks, so `finetune --from-cache --trainable-blocks M` trains the top M <= N blocks without the images "
            "(xception at 299 px, 2: 19x19x728 values, ~526 KB per image and pass in float16). 'all': the "
            "preprocessed, augmented images themselves (the whole backbone trains from the cache, skipping only "
            "decoding and augmentation). Says how much disk that takes and refuses to start without the room."),
    Setting("cut_dtype", "str", "float16", "Stored precision of the cut activations: float16, or int8 with a scale "
            "per image and channel (half the disk).", choices=CUT_DTYPES),
)


def _check(config) -> None:
    parse_shard(config.shard)
    if config.cut_blocks and config.strategy != "default":
        raise SettingError(f"--cut-blocks runs on one device only: drop --strategy {config.strategy}")


def _augmentation(config) -> AugmentConfig:
    return AugmentConfig(**{s.name: getattr(config, s.name) for s in AUGMENT_SETTINGS})


ExtractConfig = settings_class(
    "ExtractConfig", EXTRACT_SETTINGS, "Every setting of an extraction (EXTRACT_SETTINGS); the cache's fingerprint "
    "records those that shape the features.",
    {"check": _check, "augmentation": property(_augmentation), "__module__": __name__})
