"""dogtl from Python: the stages as plain functions with the command line's defaults.

    import dogtl

    model = dogtl.fit(data="data", budget="30m")                # all of it in a time budget -> models/model.keras
    dogtl.extract_features(data="data", backbone="xception")   # stage 1 -> cache/features.h5
    head = dogtl.train_head(epochs=30)                           # stage 2 -> models/head.keras
    print(head.metrics["val_log_loss"])
    tuned = dogtl.finetune(epochs=5)                             # stage 3 -> models/finetuned.keras

Every function takes the command's options as keyword arguments (underscores for hyphens),
returns the stage's result object (metrics and paths), and raises `dogtl.DogtlError` with the
same one-line messages as the command line. `progress=True` prints plain progress lines on
stderr; a callable gets the stage's `dogtl.core.progress.ProgressEvent`s instead (images done,
finished epochs with their figures, a sweep's finished runs, lines to show). `track=True`
(train_head, sweep, finetune, evaluate) records the run in MLflow, as `--track` does
(`dogtl.core.tracking`). The `dogtl` commands are a thin layer over exactly these functions.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from dogtl.core import tracking
from dogtl.core.progress import PlainRenderer, counting
from dogtl.core.settings import defaults
from dogtl.demo_settings import DEMO_SETTINGS, DemoConfig
from dogtl.evaluation.settings import EvaluateConfig, PredictConfig
from dogtl.features.settings import EXTRACT_SETTINGS, ExtractConfig
from dogtl.features.shards import merge_caches
from dogtl.finetuning.settings import FinetuneConfig, recipe_settings
from dogtl.fit_settings import FIT_SETTINGS, FitConfig
from dogtl.head.settings import HeadConfig, LRFindConfig
from dogtl.sweeps.settings import SweepConfig

# local: each function imports the modules that run its stage when it is called: they load
# TensorFlow, Keras, h5py, pandas or sklearn, which neither `import dogtl` nor the command line's
# --help and option checks need. The settings above are light.

_EXTRACT, _DEMO, _FIT = defaults(EXTRACT_SETTINGS), defaults(DEMO_SETTINGS), defaults(FIT_SETTINGS)


def _progress(progress):
    """The callback a stage reports its ProgressEvents to: `progress` itself if callable, plain
    lines on stderr if True (the command line draws bars instead), nothing if False."""
    return progress if callable(progress) else PlainRenderer() if progress else None


def extract_features(data=_EXTRACT["data"], cache=_EXTRACT["cache"], *, progress=True, note=None, **settings):
    """Stage one: run the frozen backbone over every image (and augmented passes) into `cache`.
    `settings`: any extract-features setting (`dogtl.features.settings.EXTRACT_SETTINGS`: backbone,
    weights, passes, batch_size, rotation, force, ...); `note` gets a line before the work starts (what
    changed when a cache whose images changed is updated; the disk the cut activations take). Returns
    an ExtractSummary: status "written", "updated" or "up to date"."""
    from dogtl.features.extract import extract_features as run  # local: see the note above

    config = ExtractConfig(data=data, cache=cache, **settings)
    return run(config, progress=counting(_progress(progress), "extract"), note=note)


def merge_cache(shards, out=None, *, copy: bool = False, force: bool = False):
    """Join the shard caches of a sharded extraction into one cache."""
    return merge_caches(shards, out, mode="copy" if copy else "virtual", force=force)


def train_head(cache="cache/features.h5", out="models/head.keras", *, force: bool = False, progress=True,
               track: bool = False, **settings):
    """Stage two: train the head on cached features. `settings`: any train-head setting
    (`dogtl.head.settings.HEAD_SETTINGS`), e.g. epochs=30, hidden=(512,), max_lr=2e-3."""
    from dogtl.head.train import train_head as run  # local: see the note above

    config = HeadConfig(**settings)
    params = {**asdict(config), "cache": cache, "out": out}
    with tracking.start("train-head", f"train-head {Path(out).name}", track, params) as tracked:
        result = run(config, cache=cache, out=out, force=force, progress=tracking.tee(
            _progress(progress), lambda e: tracked.epoch({**e.record.as_row(), "seconds": e.seconds})))
        tracked.params({"resolved": asdict(result.resolved)})
        tracked.result(result.metrics, tracking.model_files(result.model_path))
        return result


def lr_find(cache="cache/features.h5", out="models/lr-find.png", *, force: bool = False, **settings):
    """Learning-rate range test on the cached features; the result suggests base_lr and max_lr."""
    from dogtl.head.lrfind import lr_find as run  # local: see the note above

    return run(LRFindConfig(**settings), cache=cache, out=out, force=force)


def sweep(cache="cache/features.h5", *, params=(), progress=True, track: bool = False, **settings):
    """Train many heads and rank them by validation log loss. `params`: ["max_lr=1e-3,3e-3", ...]
    as `--param`; `settings`: any sweep setting (`dogtl.sweeps.settings.SWEEP_SETTINGS`: space,
    trials, folds, epochs, jobs, backend, out, force, ...)."""
    from dogtl.sweeps.run import run_sweep  # local: see the note above

    cache = tuple(str(p) for p in cache) if isinstance(cache, (list, tuple)) else str(cache)
    config = SweepConfig(cache=cache, params=tuple(params), **settings)
    with tracking.start("sweep", "sweep", track, {k: v for k, v in asdict(config).items() if k != "force"}) as tracked:
        result = run_sweep(config, progress=tracking.tee(_progress(progress),
                                                         tracking.trial_observer(tracked, config.folds)))
        tracked.tags({"mlflow.runName": f"sweep {result.out.name}", "dogtl.out": str(result.out)})
        best = result.results.iloc[0] if len(result.results) else {}
        tracked.result({"val_log_loss": best.get("val_log_loss"), "val_accuracy": best.get("val_accuracy"),
                        "trials": result.trials, "seconds": result.seconds},
                       [result.results_path, result.best_path, result.plot_path,
                        *(tracking.model_files(result.ensemble.model_path)[:2] if result.ensemble else [])])
        return result


def ensemble(models, out="models/ensemble.keras", *, force: bool = False):
    """Average the probabilities of several saved models into one model at `out` (an EnsembleResult)."""
    from dogtl.head.ensemble import combine_models  # local: see the note above

    return combine_models(models, out, force=force)


def finetune(data="data", head="models/head.keras", out="models/finetuned.keras", *, force: bool = False,
             progress=True, recipe=None, track: bool = False, **settings):
    """Stage three: fine-tune backbone blocks with the trained head, on the images (or cached cut
    activations, from_cache=True). `settings`: any finetune setting
    (`dogtl.finetuning.settings.FINETUNE_SETTINGS`); `recipe`: a named set of them replacing the
    defaults ("reference": the reference recipe's fine-tuning), `settings` still winning;
    `progress` events include each finished epoch (`event.line()` is the line the command prints)."""
    from dogtl.finetuning.train import finetune as run  # local: see the note above

    config = FinetuneConfig(data=str(data), head=str(head), out=str(out), force=force,
                            **{**recipe_settings(recipe), **settings})
    params = {k: v for k, v in asdict(config).items() if k != "force"}
    with tracking.start("finetune", f"finetune {Path(out).name}", track, params) as tracked:
        result = run(config, progress=_progress(progress))
        b = result.before  # step 0: the head it started from
        tracked.epoch({"val_loss": b["val_log_loss"], "val_accuracy": b["val_accuracy"]}, step=0)
        tracked.history(result.history.to_dict("records"))
        tracked.result({**result.after, "head_val_log_loss": b["val_log_loss"],
                        "head_val_accuracy": b["val_accuracy"], "best_epoch": result.best_epoch,
                        "epochs_run": result.epochs_run}, tracking.model_files(result.model_path))
        return result


def evaluate(model=None, *, progress=True, track: bool = False, **settings):
    """Accuracy, log loss, top-k, per-class accuracy and confusions on the validation split of
    `model` (default: models/finetuned.keras, else models/head.keras). `settings`: any evaluate
    setting (`dogtl.evaluation.settings.EVALUATE_SETTINGS`: data, top_k, tta, force, ...)."""
    from dogtl.evaluation.evaluate import evaluate as run  # local: see the note above
    from dogtl.evaluation.predict import resolve_model  # local: see the note above

    config = EvaluateConfig(model=resolve_model(model), **settings)
    params = {k: v for k, v in asdict(config).items() if k != "force"}
    with tracking.start("evaluate", f"evaluate {Path(config.model).name}", track, params) as tracked:
        report = run(config, progress=counting(_progress(progress), "evaluate"))
        tracked.result({"val_accuracy": report.accuracy, "val_log_loss": report.log_loss,
                        f"val_top_{report.top_k}_accuracy": report.top_k_accuracy,
                        **tracking.numbers(report.tta or {}, "tta_val_")},
                       [report.json_path, report.csv_path, report.png_path])
        return report


def predict(images=(), *, progress=True, **settings):
    """Top classes of the given image files (a list of `TopK`), or, without images, a Kaggle
    submission for the test images of `data` (a `Submission`). `settings`: any predict setting
    (`dogtl.evaluation.settings.PREDICT_SETTINGS`: model, data, out, tta, force, ...)."""
    from dogtl.evaluation.predict import predict_submission, predict_top_k  # local: see the note above

    config = PredictConfig(images=tuple(str(Path(p)) for p in images), **settings)
    return (predict_top_k if config.images else predict_submission)(config,
                                                                    progress=counting(_progress(progress), "predict"))


def fit(data=_FIT["data"], *, progress=True, started=None, **settings):
    """From a folder of images to the strongest model `budget` allows ("90s", "30m", "1h" or seconds):
    extract, search the head, fine-tune, evaluate; a rerun after a kill resumes. `settings`: any
    fit setting (`dogtl.fit_settings.FIT_SETTINGS`: budget, out, backbone, weights, image_size,
    passes, force, ...); `progress` as for the other stages; `started` (a time.time()) is
    when the budget began (default: now). Returns a FitResult (the model's path and metrics, and
    what was chosen and why)."""
    from dogtl.fitting import fit as run  # local: see the note above

    return run(FitConfig(data=data, **settings), progress=_progress(progress), started=started)


def demo(dir=_DEMO["dir"], *, note=None, **settings):
    """The whole pipeline on a small generated data set; returns where every artifact went.
    `settings`: any demo setting (`dogtl.demo_settings.DEMO_SETTINGS`: backbone, image_size, weights,
    force, ...); `note` gets one line per finished step (the CLI prints them)."""
    from dogtl.demo import run_demo  # local: see the note above

    return run_demo(DemoConfig(dir=dir, **settings), note=note)


__all__ = ["extract_features", "merge_cache", "train_head", "lr_find", "sweep", "ensemble", "finetune", "evaluate", "predict",
           "fit", "demo"]
