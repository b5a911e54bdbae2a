"""The settings of evaluate and predict, declared once (see core/settings.py).

`EvaluateConfig` / `PredictConfig`, the commands' options and `dogtl.evaluate` / `dogtl.predict`'s
defaults all come from these declarations. The model is no option here: both commands take it
as an argument (or --model), defaulting to the fine-tuned model, else the head.
"""

from __future__ import annotations

import dataclasses

from dogtl.core.precision import PRECISION_HELP, PRECISIONS
from dogtl.core.runtimes import RUNTIME_HELP, RUNTIMES
from dogtl.core.settings import Setting, settings_class

ON_BAD_TEST_IMAGE = ("skip", "uniform", "fail")
_WEIGHTS_HELP = "Only if the backbone came from a local weights file: that file again."
_ON_IMAGES = dict(
    precision=Setting("precision", "str", "auto", PRECISION_HELP + " (On images only; cached features are read as "
                      "stored.)", choices=PRECISIONS),
    runtime=Setting("runtime", "str", "auto", RUNTIME_HELP + " (On images only.)", choices=RUNTIMES),
)

EVALUATE_SETTINGS = (
    Setting("model", "path", "models/finetuned.keras", "Model to evaluate.", cli=False),
    Setting("data", "path", None, "Data folder: evaluate on the validation images (default for fine-tuned models: "
            "data/; head models use cached features unless given).", optional=True),
    Setting("cache", "path", None, "Feature cache holding the validation split (default: the model's).",
            optional=True),
    Setting("out", "path", None, "Report prefix: writes PREFIX.eval.json, .eval.csv, .eval.png (default: next to "
            "the model).", optional=True),
    Setting("top_k", "int", 5, "k of the top-k accuracy.", low=1),
    Setting("confused", "int", 10, "How many most confused class pairs to list.", low=1),
    Setting("batch_size", "int", 32, "Images per model call.", low=1),
    Setting("weights", "str", None, _WEIGHTS_HELP, optional=True),
    Setting("tta", "bool", False, "Also report test-time augmentation: probabilities averaged over the clean and "
            "augmented passes of the validation images (cached for head models: seconds), beside the plain "
            "figures.", cli_names=("--tta",)),
    Setting("force", "bool", False, "Overwrite existing reports.", cli_names=("--force",)),
    _ON_IMAGES["precision"],
    _ON_IMAGES["runtime"],
)

EvaluateConfig = settings_class(
    "EvaluateConfig", EVALUATE_SETTINGS, "Every setting of an evaluation (EVALUATE_SETTINGS).",
    {"__module__": __name__})

PREDICT_SETTINGS = (
    Setting("model", "path", None, "Model to predict with (default: models/finetuned.keras, else "
            "models/head.keras).", optional=True, cli=False),
    Setting("data", "path", "data", "Data folder whose test/ images get a submission row each (columns as its "
            "sample_submission.csv). A head model whose cache holds the test features needs no images."),
    Setting("cache", "path", None, "Head models: feature cache with the test features (default: the head's own).",
            optional=True),
    Setting("use_cache", "bool", True, "Head models: use cached test features when they fit; --no-cache runs the "
            "backbone on the images.", cli_names=("--use-cache/--no-cache",)),
    Setting("out", "path", "submission.csv", "Submission CSV to write."),
    Setting("tta", "bool", False, "Average over the clean and augmented passes (the cache's, or computed with the "
            "cache's augmentation).", cli_names=("--tta",)),
    Setting("tta_passes", "int", 4, "Augmented passes to compute when they are not cached.", low=1),
    Setting("top_k", "int", 5, "Classes to print per image (with IMAGES).", low=1),
    Setting("batch_size", "int", 32, "Images per model call.", low=1),
    Setting("weights", "str", None, _WEIGHTS_HELP, optional=True),
    Setting("on_bad_image", "str", "skip", "Unreadable test images: 'skip' (listed; the submission has a row for "
            "every readable image and none for them), 'uniform' (listed; their row gets 1/classes for every class, "
            "so Kaggle accepts the file) or 'fail' (error, nothing written).", choices=ON_BAD_TEST_IMAGE),
    Setting("force", "bool", False, "Overwrite --out.", cli_names=("--force",)),
    _ON_IMAGES["precision"],
    _ON_IMAGES["runtime"],
)

PredictConfig = settings_class(
    "PredictConfig", PREDICT_SETTINGS, "Every setting of a prediction (PREDICT_SETTINGS); `images`, when given: "
    "top-k for these files instead of a submission.", {"__module__": __name__},
    extra_fields=(("images", tuple, dataclasses.field(default=())),))
