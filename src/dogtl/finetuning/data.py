"""The images fine-tuning trains and validates on.

Training reads the images again with the extraction pipeline and augmentation: epoch e is
augmented pass 1 + e of the cache (fresh each epoch), on the cache's train/validation split.
"""

from __future__ import annotations

from functools import reduce

import numpy as np

from dogtl.core.distribute import data_sharding, drop_small_batches
from dogtl.core.errors import DataError, SettingError
from dogtl.data.augment import AugmentConfig, augment_preset
from dogtl.data.images import image_dataset
from dogtl.evaluation.inference import predict_images
from dogtl.core.metrics import scores

# local: tensorflow is imported inside `training_dataset`: importing this module must not load
# TensorFlow (finetuning/train.py starts a multi-worker run first).


def training_augmentation(augment: str, cached: dict, from_cache: bool):
    """The AugmentConfig fine-tuning trains with (None: clean images), for `--augment` and the
    cache's augmentation settings `cached`. From the cache the augmented passes are what
    extraction made: `light`/`recipe` must be them."""
    cached = AugmentConfig(**cached)
    wanted = augment_preset(augment, cached)
    if not from_cache:
        return wanted
    if wanted is not None and wanted != cached:
        raise SettingError(f"--augment {augment} with --from-cache, but the cache's passes were augmented with "
                           f"{cached.as_dict()}: pass --augment cache to train on them, or extract again with the "
                           f"augmentation you want")
    return wanted


def training_batches(paths, indices, spec, image_size: int, *, seed: int, augmentation, batch_size: int,
                     epochs):
    """Batches of (row, image) for the given epochs, each epoch reshuffled and freshly augmented.

    Epoch e is augmented pass 1 + e of the extraction pipeline (same function, same keys), so
    the first fine-tuning epoch sees exactly the images of the cache's first augmented pass.
    Rows index `paths`; the order of epoch e depends only on (seed, e), so a resumed run
    sees the same batches. Unreadable images raise (they were readable at extraction).
    """
    indices = np.asarray(indices)
    parts = []
    for epoch in epochs:
        order = np.random.default_rng([seed, epoch]).permutation(len(paths))
        parts.append(image_dataset(
            [paths[i] for i in order], spec, image_size, positions=order, indices=indices[order],
            pass_index=1 + epoch if augmentation is not None else 0, seed=seed, augmentation=augmentation,
            batch_size=batch_size, skip_bad=False))
    if not parts:
        raise ValueError("no epochs to run")
    return reduce(lambda a, b: a.concatenate(b), parts).map(lambda pos, index, image: (pos, image))


def training_dataset(paths, indices, labels, spec, image_size: int, *, seed: int, augmentation,
                     batch_size: int, epochs, strategy=None):
    """The (image, label) batches `fit` trains on: `training_batches` with the rows' labels,
    sharded over the workers of `strategy` (None: one device)."""
    import tensorflow as tf

    labels = tf.constant(np.asarray(labels, dtype=np.int64))
    ds = training_batches(paths, indices, spec, image_size, seed=seed, augmentation=augmentation,
                          batch_size=batch_size, epochs=epochs)
    ds = ds.map(lambda pos, image: (image, tf.gather(labels, pos)),
                num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    if strategy is not None:
        ds = drop_small_batches(ds, strategy).with_options(data_sharding())
    return ds


def reestimation_images(paths, spec, image_size: int, *, seed: int, limit: int, batch_size: int = 64):
    """Batches of up to `limit` clean training images, drawn at random by `seed`, for
    --batchnorm reestimate."""
    chosen = np.random.default_rng([seed, 1]).permutation(len(paths))[:limit]
    ds = image_dataset([paths[i] for i in chosen], spec, image_size, batch_size=batch_size, skip_bad=False)
    return (images for _, _, images in ds)


def validate(model, val: dict, spec, image_size: int, batch_size: int) -> tuple[np.ndarray, dict]:
    """(probabilities, scores) of `model` on the clean validation images of `val` (split_paths)."""
    probs, ok = predict_images(model, val["paths"], spec, image_size, batch_size=batch_size)
    if not ok.all():
        bad = val["paths"][int(np.flatnonzero(~ok)[0])]
        raise DataError(f"{bad}: cannot read this validation image any more; fix it or extract again")
    return probs, scores(val["labels"], probs)
