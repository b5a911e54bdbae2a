"""Validation reports: accuracy, log loss, top-k, per-class accuracy, most confused pairs.

A head model is evaluated on its cache's clean validation features (seconds); a fine-tuned
model (or a head with --data) on the validation images, through the extraction pipeline.
Writes `<prefix>.eval.json`, `<prefix>.eval.csv` (per class) and `<prefix>.eval.png`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from dogtl.core.errors import DataError
from dogtl.core.files import check_overwrite, write_csv_atomic, write_json_atomic
from dogtl.core.locks import hold, writes
from dogtl.core.metrics import log_loss
from dogtl.core.modelinfo import check_metadata
from dogtl.core.plots import plot_confusion
from dogtl.evaluation import tta
from dogtl.evaluation.inference import inference_fn, load_checked_model, load_image_model, predict_images
from dogtl.evaluation.settings import EvaluateConfig
from dogtl.features.modelcache import open_model_cache, split_paths

Progress = Callable[[int, int], None]


@dataclass
class Report:
    model: Path
    source: str  # "cached features" or "images"
    images: int
    accuracy: float
    log_loss: float
    top_k: int
    top_k_accuracy: float
    per_class: pd.DataFrame  # class, images, correct, accuracy
    confused: list[dict] = field(default_factory=list)  # true, predicted, count, fraction
    json_path: Path | None = None
    csv_path: Path | None = None
    png_path: Path | None = None
    tta: dict | None = None  # with --tta: accuracy, log_loss, top_k_accuracy and passes averaged
    runtime: str | None = None  # what ran the model on images (None: cached features)


def report_paths(model: str | Path, out: str | None) -> tuple[Path, Path, Path]:
    prefix = Path(out) if out else Path(model).with_suffix("")
    return tuple(prefix.with_name(prefix.name + ext) for ext in (".eval.json", ".eval.csv", ".eval.png"))


def metrics_report(probs: np.ndarray, labels: np.ndarray, classes: list[str], top_k: int = 5,
                   confused: int = 10) -> dict:
    """All numbers of a report from probabilities [n, C] and true labels (pure, no files)."""
    from sklearn.metrics import confusion_matrix

    num_classes = len(classes)
    labels = np.asarray(labels)
    predicted = np.argmax(probs, axis=1)
    k = min(top_k, num_classes)
    matrix = confusion_matrix(labels, predicted, labels=range(num_classes))
    counts = matrix.sum(axis=1)
    per_class = pd.DataFrame({"class": classes, "images": counts, "correct": np.diag(matrix),
                              "accuracy": np.where(counts > 0, np.diag(matrix) / np.maximum(counts, 1), np.nan)})
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    pairs = []
    for flat in np.argsort(-off, axis=None, kind="stable")[:confused]:
        t, p = np.unravel_index(flat, off.shape)
        if off[t, p] == 0:
            break
        pairs.append({"true": classes[t], "predicted": classes[p], "count": int(off[t, p]),
                      "fraction": float(off[t, p] / counts[t])})
    return {
        "images": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)),
        "log_loss": log_loss(labels, probs, num_classes),
        "top_k": k,
        "top_k_accuracy": float(np.mean(np.any(np.argsort(-probs, axis=1)[:, :k] == labels[:, None], axis=1))),
        "per_class": per_class, "confused": pairs, "matrix": matrix,
    }


@writes
def evaluate(config: EvaluateConfig, progress: Progress | None = None) -> Report:
    meta, spec, size = check_metadata(config.model)
    paths = report_paths(config.model, config.out)
    for p in paths:
        check_overwrite(p, config.force, "--out prefix")
    hold(paths[0], "the report")
    cache = open_model_cache(meta, config.cache)
    if not cache.is_val.any():
        raise DataError(f"{cache.path} has no validation split (--val-fraction 0): nothing to evaluate on")
    classes = list(meta.classes)
    if meta.kind == "head" and config.data is None:
        probs, labels, source = _on_cache(config, meta, cache), cache.labels[cache.is_val], "cached features"
        runtime = None
    else:
        probs, labels, source, runtime = _on_images(config, meta, cache, progress)
    tta = _tta(config, meta, cache, source, progress) if config.tta else None
    if tta is not None:
        more = metrics_report(tta.pop("probs"), labels, classes, config.top_k, config.confused)
        tta.update({k: more[k] for k in ("accuracy", "log_loss", "top_k_accuracy")})
    numbers = metrics_report(probs, labels, classes, config.top_k, config.confused)
    json_path, csv_path, png_path = paths
    write_csv_atomic(numbers["per_class"], csv_path)
    plot_confusion(numbers["matrix"], classes, numbers["confused"], png_path, title=Path(config.model).name)
    summary = {k: numbers[k] for k in ("images", "accuracy", "log_loss", "top_k", "top_k_accuracy", "confused")}
    summary.update(model=str(config.model), kind=meta.kind, source=source,
                   per_class=numbers["per_class"].to_dict(orient="records"), cache=str(cache.path),
                   **({"runtime": runtime, "precision": config.precision} if runtime else {}),
                   **({"tta": tta} if tta is not None else {}))
    write_json_atomic(json_path, summary)
    return Report(Path(config.model), source, numbers["images"], numbers["accuracy"], numbers["log_loss"],
                  numbers["top_k"], numbers["top_k_accuracy"], numbers["per_class"], numbers["confused"],
                  json_path, csv_path, png_path, tta, runtime)


def _on_cache(config, meta, cache):
    head = load_checked_model(config.model, meta)
    features = cache.features("labelled", passes=[0])[0][cache.is_val]
    return head.predict(features, batch_size=1024, verbose=0)


def _on_images(config, meta, cache, progress):
    val = split_paths(cache, config.data or "data")["val"]
    model, meta, spec, size = load_image_model(config.model, config.weights)
    probs, ok = predict_images(model, val["paths"], spec, size, batch_size=config.batch_size, progress=progress,
                               precision=config.precision, runtime=config.runtime)
    if not ok.all():
        bad = val["paths"][int(np.flatnonzero(~ok)[0])]
        raise DataError(f"{bad}: cannot read this validation image any more; fix it or extract again")
    return probs, val["labels"], "images", inference_fn(model, config.precision, config.runtime).runtime


def _tta(config, meta, cache, source, progress) -> dict | None:
    """Probabilities averaged over the clean and the cache's augmented passes of the validation
    rows: from the cached features (heads), or the same augmentations of the images."""
    if cache.num_passes < 2:
        raise DataError(f"{cache.path} holds no augmented passes (extracted with --passes 0): --tta has "
                        "nothing to average; re-extract with --passes 2 or more")
    if source == "cached features":
        head = load_checked_model(config.model, meta)
        return {"probs": tta.cached_probabilities(head, cache, rows=cache.is_val), "passes": cache.num_passes}

    val = split_paths(cache, config.data or "data")["val"]
    model, meta, spec, size = load_image_model(config.model, config.weights)
    augmentation, seed = tta.augmentation_of(meta)
    probs, _ = tta.image_probabilities(model, val["paths"], spec, size, passes=cache.num_passes, seed=seed,
                                       augmentation=augmentation, indices=val["indices"],
                                       batch_size=config.batch_size, progress=progress, precision=config.precision,
                                       runtime=config.runtime)
    return {"probs": probs, "passes": cache.num_passes}
