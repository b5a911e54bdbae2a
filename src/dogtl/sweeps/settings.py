"""The settings of a sweep, declared once (see core/settings.py); the search space itself comes
from `space` and `params` (sweeps/space.py), its settings being train-head's.

`SweepConfig`, the `dogtl sweep` options and `dogtl.sweep`'s defaults come from SWEEP_SETTINGS.
"""

from __future__ import annotations

import dataclasses

from dogtl.core.errors import DogtlError
from dogtl.core.settings import Setting, settings_class

DEFAULT_FUSE = 8

SWEEP_SETTINGS = (
    Setting("space", "path", None, "TOML or JSON file: train-head setting = list of candidates, e.g. max_lr = [1e-3, "
            "3e-3]; {low = 0.2, high = 0.6, log = false} is a range (random search); a single value is fixed.",
            optional=True),
    Setting("trials", "int", None, "Random search: this many trials, drawn with --seed (default: every combination "
            "of the grid).", optional=True, low=1),
    Setting("folds", "int", None, "Stratified K-fold cross-validation over all labelled images, reporting mean and "
            "spread (default: the cache's validation split).", optional=True, low=2,
            hint=" (leave it out to use the cache's validation split)"),
    Setting("epochs", "int", None, "Epochs per trial unless the space sets them (default: train-head's 50; early "
            "stopping usually ends sooner).", optional=True, low=1),
    Setting("jobs", "int", 1, "Parallel workers; each gets cores/N TensorFlow threads. -1: one per core."),
    Setting("backend", "str", None, "joblib backend for the workers: loky (default with --jobs > 1), "
            "multiprocessing, threading, or dask (with --scheduler; pip install 'dogtl[dask]').", optional=True),
    Setting("scheduler", "str", None, "Dask scheduler address for --backend dask, e.g. tcp://10.0.0.5:8786 (the "
            "cache must be at the same path on every machine). Without it, a local Dask cluster.", optional=True),
    Setting("fuse", "int", DEFAULT_FUSE, "Most trials trained side by side in one graph (those with the same hidden "
            "layers, batch size and optimizer); 1 trains each trial alone.", low=1),
    Setting("seed", "int", 2018, "Seed of the random search and of the folds."),
    Setting("out", "path", None, "Sweep folder (default: sweeps/sweep-<hash of these settings>). Rerunning the same "
            "command resumes an interrupted sweep.", optional=True),
    Setting("force", "bool", False, "Start over in --out, discarding its finished trials (also if it holds another "
            "sweep).", cli_names=("--force",)),
    Setting("ensemble", "int", None, "Also retrain the top K trials on the training split and write their ensemble "
            "(one model averaging their probabilities) as OUT/ensemble.keras, with its validation log loss next to "
            "the best single trial's.", optional=True, low=1, hint=" (the number of top trials to average)"),
    Setting("folds_in_train", "bool", False, "Folds over the cache's training split only (the validation split "
            "unseen): train-head --auto's search.", cli=False),
)


def _check(config) -> None:
    object.__setattr__(config, "params", tuple(config.params or ()))
    if config.jobs == 0 or config.jobs < -1:
        raise DogtlError(f"--jobs {config.jobs}: give 1 or more workers, or -1 for one per core")
    if config.scheduler and config.backend != "dask":
        raise DogtlError("--scheduler is the address of a Dask scheduler: pass it with --backend dask")


SweepConfig = settings_class(
    "SweepConfig", SWEEP_SETTINGS, "Every setting of a sweep (SWEEP_SETTINGS), the caches it trains on (one path "
    "or several) and its search space (`params`: 'name=v1,v2' options; `first`: trials, dicts of searched "
    "settings, run before the random sample, e.g. known-good ones).", {"check": _check, "__module__": __name__},
    extra_fields=(("cache", object, dataclasses.field(default="cache/features.h5")),
                  ("params", tuple, dataclasses.field(default=())),
                  ("first", tuple, dataclasses.field(default=()))))
