"""dogtl from Python: the stages as plain functions with the command line's defaults.

    import dogtl

    model = dogtl.fit(data="data", budget="30m")                # all of it in a time budget -> models/model.keras
    dogtl.extract_features(data="data", backbone="xception")   # stage 1 -> cache/features.h5
    head = dogtl.train_head(epochs=30)                           # stage 2 -> models/head.keras
    print(head.metrics["val_log_loss"])
    tuned = dogtl.finetune(epochs=5)                             # stage 3 -> models/finetuned.keras

Every function takes the command's options as keyword arguments (underscores for hyphens),
returns the stage's result object (metrics and paths), and raises `dogtl.DogtlError` with the
same one-line messages as the command line. `progress=True` shows a progress bar, in a
terminal or a Jupyter notebook; a callable gets the raw progress events instead. The `dogtl`
commands are a thin layer over exactly these functions.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _bar(progress, make):
    """The callback a stage reports progress to: `progress` itself if callable, the `update`
    of a bar made by `make()` if True, nothing if False."""
    if callable(progress):
        yield progress
    elif progress:
        with make() as bar:
            yield bar.update
    else:
        yield None


def _images(description: str):
    from dogtl.cli.common import ImageProgress

    return lambda: ImageProgress(description)


def extract_features(data="data", cache="cache/features.h5", *, force: bool = False, progress=True,
                     rotation: float = 45.0, zoom: float = 0.25, shift: float = 0.2, hflip: bool = True,
                     note=None, **settings):
    """Stage one: run the frozen backbone over every image (and augmented passes) into `cache`.
    `settings`: backbone, weights, image_size, passes, tta_passes, batch_size, val_fraction, seed,
    on_bad_image, dtype, shard, strategy, precision, cut_blocks, cut_dtype (see `dogtl extract-features
    --help`); `note` gets a line before the work starts (the disk the cut activations take)."""
    from dogtl.data.augment import AugmentConfig
    from dogtl.features.extract import ExtractConfig, extract_features as run

    config = ExtractConfig(data=str(data), cache=str(cache), force=force, **settings,
                           augmentation=AugmentConfig(rotation=rotation, zoom=zoom, shift=shift, hflip=hflip))
    with _bar(progress, _images("extracting")) as update:
        return run(config, progress=update, note=note)


def merge_cache(shards, out=None, *, copy: bool = False, force: bool = False):
    """Join the shard caches of a sharded extraction into one cache."""
    from dogtl.features.shards import merge_caches

    return merge_caches(shards, out, mode="copy" if copy else "virtual", force=force)


def train_head(cache="cache/features.h5", out="models/head.keras", *, force: bool = False, progress=True,
               **settings):
    """Stage two: train the head on cached features. `settings`: any train-head setting
    (`dogtl.head.settings.HEAD_SETTINGS`), e.g. epochs=30, hidden=(512,), max_lr=2e-3."""
    from dogtl.cli.common import EpochProgress
    from dogtl.head.settings import HeadConfig
    from dogtl.head.train import train_head as run

    config = HeadConfig(**settings)
    with _bar(progress, lambda: EpochProgress("training the head", config.epochs)) as update:
        return run(config, cache=cache, out=out, force=force, progress=update)


def lr_find(cache="cache/features.h5", out="models/lr-find.png", *, force: bool = False, **settings):
    """Learning-rate range test on the cached features; the result suggests base_lr and max_lr."""
    from dogtl.head.lrfind import lr_find as run
    from dogtl.head.settings import LRFindConfig

    return run(LRFindConfig(**settings), cache=cache, out=out, force=force)


def sweep(cache="cache/features.h5", *, params=(), space=None, out=None, force: bool = False, progress=True,
          **settings):
    """Train many heads and rank them by validation log loss. `params`: ["max_lr=1e-3,3e-3", ...]
    as `--param`; `space`: a TOML/JSON file; `settings`: trials, folds, epochs, jobs, backend, ..."""
    from dogtl.sweeps.run import SweepConfig, run_sweep

    cache = tuple(str(p) for p in cache) if isinstance(cache, (list, tuple)) else str(cache)
    config = SweepConfig(cache=cache, params=tuple(params), space=str(space) if space else None,
                         out=str(out) if out else None, force=force, **settings)

    def make():
        from dogtl.cli.sweep import TrialProgress

        return TrialProgress("trials" if not config.folds else "trial folds")

    with _bar(progress, make) as update:
        return run_sweep(config, progress=update)


def ensemble(models, out="models/ensemble.keras", *, force: bool = False):
    """Average the probabilities of several saved models into one model at `out` (an EnsembleResult)."""
    from dogtl.head.ensemble import combine_models

    return combine_models(models, out, force=force)


def finetune(data="data", head="models/head.keras", out="models/finetuned.keras", *, force: bool = False,
             progress=True, report=None, **settings):
    """Stage three: fine-tune the top backbone blocks with the trained head, on the images.
    `settings`: any finetune setting (`dogtl.finetuning.settings.FINETUNE_SETTINGS`); `report`
    gets one line per finished epoch."""
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.finetuning.train import finetune as run

    config = FinetuneConfig(data=str(data), head=str(head), out=str(out), force=force, **settings)
    with _bar(progress, _images("fine-tuning")) as update:
        return run(config, progress=update, report=report)


def evaluate(model="models/finetuned.keras", *, data=None, force: bool = False, progress=True, **settings):
    """Accuracy, log loss, top-k, per-class accuracy and confusions on the validation split."""
    from dogtl.evaluation.evaluate import EvaluateConfig, evaluate as run

    config = EvaluateConfig(model=str(model), data=str(data) if data else None, force=force, **settings)
    with _bar(progress, _images("evaluating")) as update:
        return run(config, progress=update)


def predict(images=(), *, model=None, data="data", out="submission.csv", force: bool = False, progress=True,
            **settings):
    """Top classes of the given image files (a list of `TopK`), or, without images, a Kaggle
    submission for the test images of `data` (a `Submission`)."""
    from dogtl.evaluation.predict import PredictConfig, predict_submission, predict_top_k

    config = PredictConfig(model=str(model) if model else None, data=str(data), out=str(out), force=force,
                           images=tuple(str(Path(p)) for p in images), **settings)
    with _bar(progress, _images("predicting")) as update:
        return (predict_top_k if config.images else predict_submission)(config, progress=update)


def fit(data="data", *, budget="30m", out="models/model.keras", force: bool = False, progress=False,
        started=None, **settings):
    """From a folder of images to the strongest model `budget` allows ("90s", "30m", "1h" or seconds):
    extract, search the head, fine-tune, evaluate; a rerun after a kill resumes. `settings`:
    backbone, weights, image_size, passes, hflip, val_fraction, seed (see `dogtl fit --help`);
    `progress` (a callable) gets fit's events; `started` (a time.time()) is when the budget began
    (default: now). Returns a FitResult (the model's path and metrics, and what was chosen and why)."""
    from dogtl.core.budget import parse_budget
    from dogtl.fit import FitConfig, fit as run

    config = FitConfig(data=str(data), out=str(out), budget=parse_budget(budget), force=force, **settings)
    return run(config, progress=progress if callable(progress) else None, started=started)


def demo(dir="demo", *, force: bool = False, note=None, **settings):
    """The whole pipeline on a small generated data set; returns where every artifact went.
    `note` gets one line per finished step (the CLI prints them)."""
    from dogtl.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(dir=str(dir), force=force, **settings), note=note)


__all__ = ["extract_features", "merge_cache", "train_head", "lr_find", "sweep", "ensemble", "finetune", "evaluate", "predict",
           "fit", "demo"]
