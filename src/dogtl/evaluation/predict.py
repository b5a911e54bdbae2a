"""The predict command: Kaggle submissions for a test folder, top-k classes for single images.

A fine-tuned model reads the test images. A head model uses the cached test features of
its cache when they are there (seconds), otherwise it runs behind the same backbone that
made its features. Rows are clipped to [1e-15, 1] and renormalised (the Kaggle metric is
log loss), columns follow sample_submission.csv exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dogtl.core.errors import DataError, DogtlError
from dogtl.core.files import check_overwrite, write_csv_atomic
from dogtl.core.locks import hold, writes
from dogtl.core.metrics import clip_rows
from dogtl.core.modelinfo import check_metadata
from dogtl.data.folders import IMAGE_SUFFIXES, SAMPLE_SUBMISSION, check_submission_columns
from dogtl.data.images import decode_error
from dogtl.evaluation.inference import Progress, inference_fn, load_checked_model, load_image_model, predict_images
from dogtl.evaluation.settings import PredictConfig
from dogtl.evaluation.tta import augmentation_keys, augmentation_of, image_probabilities
from dogtl.features.modelcache import open_model_cache

log = logging.getLogger(__name__)
DEFAULT_MODELS = ("models/finetuned.keras", "models/head.keras")


@dataclass
class Submission:
    path: Path
    model: Path
    rows: int
    columns: list[str]
    source: str  # "cached features" or "images"
    passes: int
    skipped: list[str] = field(default_factory=list)  # "path\treason"
    filled: int = 0  # rows written with uniform probabilities for unreadable images
    runtime: str | None = None  # what ran the model on images


@dataclass
class TopK:
    path: str
    classes: list[str]
    probabilities: list[float]
    error: str | None = None


def resolve_model(model: str | None) -> Path:
    if model is not None:
        return Path(model)
    for candidate in DEFAULT_MODELS:
        if Path(candidate).exists():
            return Path(candidate)
    raise DogtlError("no model found at models/finetuned.keras or models/head.keras: train one first "
                     "(dogtl train-head) or name it (e.g. dogtl evaluate path/to/model.keras)")


def test_images(root: str | Path):
    """(ids, paths, sample_submission or None) of a data folder's test/ images."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{test} not found: a submission needs the test images in {test}/ "
                        "(or pass image paths to see their top classes)")
    paths = sorted(p for p in test.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{test} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    sample = root / SAMPLE_SUBMISSION
    return [p.stem for p in paths], paths, sample if sample.exists() else None


# ----------------------------------------------------------------------------- submission

@writes
def predict_submission(config: PredictConfig, progress: Progress | None = None) -> Submission:
    model_path = resolve_model(config.model)
    meta, spec, size = check_metadata(model_path)
    out = check_overwrite(config.out, config.force)
    hold(out, "the submission")
    ids, paths, sample, reasons = _test_set(config, meta)
    classes = list(meta.classes)
    columns = check_submission_columns(sample, classes) if sample is not None else sorted(classes)

    probs, ok, source, passes, runtime = None, None, "images", 0, None
    if meta.kind == "head" and config.use_cache:
        probs, ok, passes = _from_cache(config, meta, model_path, ids, paths, required=reasons is not None)
        if probs is not None:
            source = "cached features"
    if probs is None:
        probs, ok, passes, runtime = _from_images(config, model_path, paths, progress)

    skipped = [f"{paths[i]}\t{(reasons or {}).get(ids[i]) or decode_error(paths[i]) or 'unreadable'}"
               for i in np.flatnonzero(~ok)]
    if skipped and config.on_bad_image == "fail":
        first = skipped[0].replace("\t", ": cannot read image (", 1)
        raise DataError(f"{first}); {len(skipped)} unreadable test image(s): fix or remove them, "
                        "or pass --on-bad-image skip/uniform")
    filled = 0
    if config.on_bad_image == "uniform":
        probs[~ok] = 1.0 / len(classes)
        filled, ok = int((~ok).sum()), np.ones_like(ok)
    order = [classes.index(c) for c in columns]
    table = pd.DataFrame(clip_rows(probs[ok][:, order]), columns=columns)
    table.insert(0, "id", [i for i, good in zip(ids, ok) if good])
    write_csv_atomic(table, out, float_format="%.8g")
    return Submission(out, model_path, len(table), columns, source, passes, skipped, filled, runtime)


def _test_set(config, meta):
    """(ids, paths, sample submission or None, reasons or None) of the test images: those in
    data/test/, or, for a head model when there is no data/test/, the ones its cache holds
    features of (then `reasons` gives why the cache skipped some, and the cache is required)."""
    if (Path(config.data) / "test").is_dir() or meta.kind != "head" or not config.use_cache:
        return (*test_images(config.data), None)
    cache = open_model_cache(meta, config.cache, required=config.cache is not None)
    if cache is None or not len(cache.test_ids):
        where = f"its cache {cache.path} holds no test features" if cache is not None else "its cache is not there"
        raise DataError(f"{Path(config.data) / 'test'} not found and {where}: a submission needs the test "
                        "images in DATA/test/ (pass --data DATA), or image files to see their top classes")
    reasons = {}
    for line in cache.skipped:
        path, _, reason = line.partition("\t")
        if Path(path).parent.name == "test":
            reasons[Path(path).stem] = reason
    ids = sorted([*cache.test_ids, *reasons])
    sample = Path(config.data) / SAMPLE_SUBMISSION
    log.info("%s/test not found: predicting the %d test images of %s from their cached features",
             config.data, len(ids), cache.path)
    return ids, [Path(config.data) / "test" / i for i in ids], sample if sample.is_file() else None, reasons


def _from_cache(config, meta, model_path, ids, paths, required: bool = False):
    """Head predictions from the cache's test features; (None, None, 0) when it cannot serve them
    (or an error, when `required`: the images are not there)."""
    cache = open_model_cache(meta, config.cache, required=required or config.cache is not None)
    if cache is None:
        log.info("no cache for %s: computing features from the images", model_path)
        return None, None, 0
    skipped_ids = {Path(line.split("\t")[0]).stem for line in cache.skipped
                   if Path(line.split("\t")[0]).parent.name == "test"}
    if set(cache.test_ids) | skipped_ids != set(ids) or len(cache.test_ids) == 0:
        log.warning("%s was made from other test images than %s/test: computing from the images",
                    cache.path, config.data)
        return None, None, 0
    if config.tta and cache.num_test_passes < 2:
        if required:
            raise DataError(f"{cache.path} holds no test-time augmentation passes and there are no test images "
                            f"in {config.data}/test to compute them from: drop --tta or pass --data")
        log.info("%s holds no test-time augmentation passes: computing them from the images", cache.path)
        return None, None, 0
    head = load_checked_model(model_path, meta)
    passes = list(range(cache.num_test_passes)) if config.tta else [0]
    features = cache.features("test", passes=passes)
    mean = np.mean([head.predict(f, batch_size=1024, verbose=0) for f in features], axis=0)
    where = {image_id: k for k, image_id in enumerate(cache.test_ids)}
    probs = np.full((len(ids), mean.shape[1]), np.nan)
    ok = np.array([i in where for i in ids])
    probs[ok] = mean[[where[i] for i in ids if i in where]]
    return probs, ok, len(passes)


def _from_images(config, model_path, paths, progress):
    model, meta, spec, size = load_image_model(model_path, config.weights)
    augmentation, seed = augmentation_of(meta)
    passes = 1 + (config.tta_passes if config.tta else 0)
    probs, ok = image_probabilities(model, paths, spec, size, passes=passes, seed=seed, augmentation=augmentation,
                                    indices=augmentation_keys(meta, paths),
                                    batch_size=config.batch_size, progress=progress, precision=config.precision,
                                    runtime=config.runtime)
    return probs, ok, passes, inference_fn(model, config.precision, config.runtime).runtime


# ----------------------------------------------------------------------------- single images

def predict_top_k(config: PredictConfig, progress: Progress | None = None) -> list[TopK]:
    """Top-k classes with probabilities for each file in config.images."""
    model_path = resolve_model(config.model)
    paths = [Path(p) for p in config.images]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise DataError(f"no such image file: {', '.join(absent[:3])}")
    model, meta, spec, size = load_image_model(model_path, config.weights)
    augmentation, seed = augmentation_of(meta)
    passes = 1 + (config.tta_passes if config.tta else 0)
    keys = augmentation_keys(meta, paths)
    runs = [predict_images(model, paths, spec, size, indices=keys, pass_index=p, seed=seed, augmentation=augmentation,
                           batch_size=config.batch_size, progress=progress, precision=config.precision,
                           runtime=config.runtime)
            for p in range(passes)]
    probs = np.mean([r[0] for r in runs], axis=0)
    ok = np.logical_and.reduce([r[1] for r in runs])
    classes = list(meta.classes)
    k = min(config.top_k, len(classes))
    results = []
    for path, row, good in zip(paths, probs, ok):
        if not good:
            results.append(TopK(str(path), [], [], decode_error(path) or "unreadable"))
            continue
        top = np.argsort(-row)[:k]
        results.append(TopK(str(path), [classes[j] for j in top], [float(row[j]) for j in top]))
    return results
