"""A saved model's feature cache(s) found again, and the image files of their rows.

A head (and a model fine-tuned from it) records the cache it was trained on, whose validation
split evaluate, predict, finetune and export use again; a head on several caches records each
(core.metadata: one backbone entry per cache). A cache that is not the one recorded is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dogtl.core.errors import CacheError, DataError
from dogtl.core.metadata import BackboneInput, ModelMetadata
from dogtl.data.folders import Dataset, load_dataset
from dogtl.features.cache import open_cache
from dogtl.features.fingerprint import IMAGE_LISTS, TEST_LIST, fingerprint_differences
from dogtl.features.incremental import changes_since
from dogtl.features.multicache import as_paths, combine


def open_model_cache(meta: ModelMetadata, override=None, required: bool = True):
    """The feature cache the model was trained on (its validation split lives there): one
    FeatureCache, or a MultiCache for a head on several caches.

    `override`: a path (a list of paths, in the order of the head's caches, for several).
    Returns None when it is not required and cannot be found. A cache that differs from
    the one recorded with the model is refused, naming the differences.
    """
    if meta.is_multi:
        return _open_model_caches(meta, override, required)
    if isinstance(override, (list, tuple)):
        override = override[0] if len(override) == 1 else override
    entry = meta.backbones[0] if meta.backbones else BackboneInput()
    return _open_one(entry, meta.classes, override, required)


def _open_model_caches(meta: ModelMetadata, override, required: bool):
    entries = meta.backbones
    paths = as_paths(override) if override is not None else [None] * len(entries)
    if len(paths) != len(entries):
        raise CacheError(f"the model was trained on {len(entries)} caches ({', '.join(e.cache for e in entries)}): "
                         f"pass --cache once for each, in that order (got {len(paths)})")
    caches = []
    for entry, path in zip(entries, paths):
        cache = _open_one(entry, meta.classes, path, required)
        if cache is None:
            return None
        caches.append(cache)
    return combine(caches)


def _open_one(entry: BackboneInput, classes, override, required: bool):
    path = override or entry.cache
    if not path:
        if required:
            raise CacheError("the model's metadata names no feature cache: pass --cache FILE")
        return None
    if not Path(path).exists() and not required:
        return None
    try:
        cache = open_cache(path)
    except CacheError as e:
        if not required:
            return None
        raise CacheError(f"{e} (the cache the model was trained on; pass --cache FILE if it moved)") from None
    recorded = entry.cache_fingerprint
    if recorded:  # test images arriving (or changing) later do not concern what the model learnt
        diff = fingerprint_differences(recorded, cache.fingerprint, ignore=TEST_LIST)
        change = None if fingerprint_differences(recorded, cache.fingerprint, ignore=IMAGE_LISTS) else \
            changes_since(cache, recorded)
        if change:
            raise CacheError(f"{path} was updated since the model was trained on it ({change}); retrain the "
                             "model on it, or pass --cache with the cache it was trained on")
        if diff:
            raise CacheError(f"{path} is not the cache the model was trained on ({'; '.join(diff[:3])}); "
                             "pass --cache with the right file or retrain the model")
    if list(cache.classes) != list(classes):
        raise CacheError(f"{path}: its classes differ from the model's; pass --cache with the right file")
    return cache


def split_paths(cache, dataset) -> dict:
    """Image paths, labels and augmentation keys ("indices") of the cache's train and validation rows.

    `dataset`: the data folder (read as extraction read it: labels.csv's columns are in the
    fingerprint) or its Dataset. The keys are those the cache's augmented passes were drawn with
    (a function of the image id; format-1 caches: the file number at extraction), so
    fine-tuning's pass p of an image is the cache's pass p.
    """
    if not isinstance(dataset, Dataset):
        columns = getattr(cache, "caches", [cache])[0].fingerprint.get("columns") or {}
        dataset = load_dataset(dataset, columns.get("id"), columns.get("label"))

    if list(dataset.classes) != list(cache.classes):
        raise DataError(f"{dataset.root}: its classes differ from those of the cache {cache.path}; "
                        "pass the --data folder the cache was extracted from")
    where = {image_id: k for k, image_id in enumerate(dataset.ids)}
    missing = [i for i in cache.ids if i not in where]
    if missing:
        raise DataError(f"{dataset.root}: {len(missing)} images of the cache are missing "
                        f"(e.g. {missing[0]}); pass the --data folder the cache was extracted from")
    index = np.array([where[i] for i in cache.ids], dtype=np.int64)
    keys = cache.augmentation_keys("labelled")
    keys = index if keys is None else keys
    out = {}
    for name, mask in (("train", ~cache.is_val), ("val", cache.is_val)):
        rows = np.flatnonzero(mask)
        out[name] = {"paths": [dataset.paths[i] for i in index[rows]], "labels": cache.labels[rows].astype(np.int64),
                     "indices": keys[rows], "rows": rows}
    return out
