"""The image-inference engine: a saved model ready to run on image files, and its forward pass.

A fine-tuned model runs on images as saved. A head runs behind the backbone(s) that made its
features, rebuilt from the weights recorded with it (one per cache for a head on several
caches), composed with the head by core/models.compose. Predict, evaluate, fine-tuning's
validation and serving all run models on images through this module, so the pixels are the
ones extraction fed the backbone.
"""

from __future__ import annotations

import weakref
from typing import Callable

import numpy as np

from dogtl.core.artifacts import load_model
from dogtl.core.backbones import get_backbone
from dogtl.core.metadata import ModelMetadata
from dogtl.core.modelinfo import check_metadata, check_model_matches
from dogtl.core.models import build_backbone, compose, input_name, renamed
from dogtl.core.runtimes import frozen_forward
from dogtl.data.multiimages import model_image_dataset
from dogtl.features.modelweights import backbone_weights, same_weights

Progress = Callable[[int, int], None]
_INFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_checked_model(path, meta: ModelMetadata):
    """The Keras model of a model file, uncompiled, checked against its metadata `meta`: the one
    way dogtl loads a head or fine-tuned model to predict with or to build on."""
    model, _ = load_model(path, compile=False)
    check_model_matches(model, meta, path)
    return model


def load_image_model(path, weights: str | None = None):
    """(model on preprocessed images, metadata, spec, image size) for a head or fine-tuned file;
    for a head on several caches, lists of specs and sizes (one image input per backbone).
    `weights`: a local weights file replacing the recorded one of the backbone(s) that used it."""
    meta, spec, size = check_metadata(path)
    if meta.kind != "head":
        return load_checked_model(path, meta), meta, spec, size
    if meta.is_multi:
        backbones, specs, sizes = _backbones(meta, weights)
        names = [input_name(k, s, z) for k, (s, z) in enumerate(zip(specs, sizes))]
        head = load_checked_model(path, meta)
        return compose(backbones, head, name="multi_on_images", input_names=names), meta, specs, sizes
    backbone = build_backbone(spec, backbone_weights(meta.backbones[0], weights), size)
    return compose(backbone, load_checked_model(path, meta), name="head_on_images"), meta, spec, size


def _backbones(meta: ModelMetadata, weights: str | None):
    """([backbone], [spec], [size]) of a multi-backbone head's caches, in order; two backbones of
    one architecture get distinct names (Keras needs them side by side)."""
    specs, sizes, backbones, names = [], [], [], set()
    for entry in meta.backbones:
        spec, size = get_backbone(entry.backbone), int(entry.image_size)
        override = weights if weights is not None and same_weights(entry.weights, weights) else None
        backbone = build_backbone(spec, backbone_weights(entry, override), size)
        if backbone.name in names:
            backbone = renamed(backbone, f"{backbone.name}_{len(backbones)}")
        names.add(backbone.name)
        specs.append(spec)
        sizes.append(size)
        backbones.append(backbone)
    return backbones, specs, sizes


def inference_fn(model, precision: str = "float32", runtime: str = "tensorflow"):
    """The model's forward pass on numpy batches (core/runtimes.frozen_forward), one per model,
    precision and runtime: traced, or converted and loaded, once."""
    fns = _INFERENCE.setdefault(model, {})
    if (precision, runtime) not in fns:
        size = "x".join(str(t.shape[1]) for t in model.inputs)
        fns[precision, runtime] = frozen_forward(model, runtime=runtime, precision=precision,
                                                 label=f"{model.name}-{size}")
    return fns[precision, runtime]


def predict_images(model, paths, spec, image_size, *, indices=None, pass_index: int = 0, seed: int = 0,
                   augmentation=None, batch_size: int = 32, progress: Progress | None = None,
                   precision: str | None = None, runtime: str | None = None):
    """Class probabilities [n, C] for image files (rows of unreadable ones are NaN) and a read mask.

    Uses the pipeline of extraction, so the pixels are the ones the head was trained on;
    pass p > 0 is the same augmentation as the cache's pass p for the same indices.
    `precision` (PRECISIONS) and `runtime` (RUNTIMES): compute in them (`inference_fn(model,
    precision, runtime).runtime` says which runtime ran it); both None: TensorFlow, in the
    precision the caller has set the model up in.
    """
    if precision is None and runtime is None:
        return _predict_images(model, paths, spec, image_size, indices=indices, pass_index=pass_index, seed=seed,
                               augmentation=augmentation, batch_size=batch_size, progress=progress,
                               infer=inference_fn(model))
    with inference_fn(model, precision or "auto", runtime or "auto") as infer:
        return _predict_images(model, paths, spec, image_size, indices=indices, pass_index=pass_index,
                               seed=seed, augmentation=augmentation, batch_size=batch_size,
                               progress=progress, infer=infer)


def _predict_images(model, paths, spec, image_size, *, indices, pass_index, seed, augmentation, batch_size,
                    progress, infer):
    n = len(paths)
    num_classes = model.output.shape[-1]
    probs = np.full((n, num_classes), np.nan)
    ok = np.zeros(n, dtype=bool)
    if n == 0:
        return probs, ok
    ds = model_image_dataset(paths, spec, image_size, indices=indices, pass_index=pass_index, seed=seed,
                             augmentation=augmentation, batch_size=batch_size, skip_bad=True)
    for positions, _, images in ds:
        positions = positions.numpy()
        probs[positions] = np.asarray(infer(images), dtype=np.float64)
        ok[positions] = True
        done = int(positions[-1]) + 1
        if progress:
            progress(done, n)
    return probs, ok
