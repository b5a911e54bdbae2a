"""What a saved model expects as input, checked before any image is read.

Head and fine-tuned models carry metadata (see artifacts.py): the backbone, weights, image
size and preprocessing their inputs come from, and the cache (with its validation split)
they were trained on. These checks turn a mismatch into one clear line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dogtl.core.artifacts import load_metadata
from dogtl.features.backbones import BackboneSpec, get_backbone
from dogtl.core.errors import CacheError, DogtlError

KINDS = ("head", "finetuned")


def check_metadata(path: str | Path, kinds=KINDS) -> tuple[dict, BackboneSpec, int]:
    """(metadata, backbone spec, image size) of a model file, or a DogtlError naming the problem."""
    meta = load_metadata(path)
    kind = meta.get("kind")
    if kind not in kinds:
        raise DogtlError(f"{path}: a {kind!r} model, but a {' or '.join(kinds)} model is needed here")
    missing = [k for k in ("classes", "backbone", "image_size", "preprocessing", "feature_dim", "weights")
               if k not in meta]
    if missing:
        raise DogtlError(f"{path}: metadata lacks {', '.join(missing)}; retrain the model with this dogtl")
    entries = meta.get("backbones") or [meta]  # a multi-backbone head checks every backbone
    checked = [_check_backbone(path, entry) for entry in entries]
    spec, size = checked[0]
    return meta, spec, size


def _check_backbone(path, meta: dict) -> tuple[BackboneSpec, int]:
    try:
        spec = get_backbone(meta["backbone"])
    except ValueError as e:
        raise DogtlError(f"{path}: {e}") from None
    size = int(meta["image_size"])
    if size < spec.min_size:
        raise DogtlError(f"{path}: image size {size} is too small for {spec.name} (at least {spec.min_size}); "
                         "the model does not match its backbone")
    if meta["preprocessing"] != spec.preprocessing:
        raise DogtlError(f"{path}: recorded preprocessing {meta['preprocessing']} is not {spec.name}'s "
                         f"({spec.preprocessing}); the model does not match its backbone")
    if int(meta["feature_dim"]) != spec.feature_dim:
        raise DogtlError(f"{path}: recorded feature size {meta['feature_dim']} but {spec.name} gives "
                         f"{spec.feature_dim}; the model does not match its backbone")
    return spec, size


def check_model_matches(model, meta: dict, path) -> None:
    """The loaded Keras model has the input and output sizes its metadata promises."""
    if isinstance(model.input, (list, tuple, dict)):  # one image input per backbone: see models.compose
        return
    inputs = model.input.shape
    outputs = model.output.shape[-1]
    if meta["kind"] == "head":
        want = (int(meta["feature_dim"]),)
        have = tuple(inputs[1:])
    else:
        want = (int(meta["image_size"]), int(meta["image_size"]), 3)
        have = tuple(inputs[1:])
    if have != want:
        raise DogtlError(f"{path}: the model takes inputs of shape {have} but its metadata says {want} "
                         f"({meta['backbone']} at {meta['image_size']} px); the files do not belong together")
    if outputs != len(meta["classes"]):
        raise DogtlError(f"{path}: the model has {outputs} outputs but its metadata lists "
                         f"{len(meta['classes'])} classes; the files do not belong together")


def backbone_weights(meta: dict, override: str | None = None) -> str:
    """The weights argument that rebuilds the backbone the model's features came from.

    A local weights file is identified by its hash; the path it was read from is recorded
    too (`weights_path`) and used again while the file there still has that hash. A renamed
    copy is the same file, as in cache fingerprints.
    """
    recorded = meta["weights"]
    if override is not None:
        if not same_weights(recorded, override):
            raise DogtlError(f"--weights {override} is not the backbone the model was trained on "
                             f"({recorded}); pass that one")
        return override
    if recorded in ("imagenet", "none"):
        return recorded
    name = recorded.split(":")[1] if recorded.startswith("file:") else recorded
    path = meta.get("weights_path")
    if not path:
        raise DogtlError(f"the model's backbone used the local weights file {name} ({recorded}); "
                         "pass it again with --weights PATH")
    if not Path(path).is_file():
        raise DogtlError(f"the model's backbone weights file {name} is no longer at {path}; "
                         "pass --weights PATH")
    if not same_weights(recorded, path):
        raise DogtlError(f"{path} is no longer the model's backbone weights file {name} ({recorded}): "
                         "its content changed; pass --weights PATH")
    return path


def same_weights(recorded: str, weights: str) -> bool:
    from dogtl.core.models import weights_identity
    from dogtl.features.fingerprint import fingerprint_differences

    return not fingerprint_differences({"weights": recorded}, {"weights": weights_identity(weights)})


def weights_path_to_record(weights: str) -> str | None:
    """Where a local weights file is, recorded beside its identity so that later stages find
    it again; None for 'imagenet' and 'none'."""
    return None if weights in ("imagenet", "none") else str(Path(weights).resolve())


def open_model_cache(meta: dict, override: str | Path | None = None, required: bool = True):
    """The feature cache the model was trained on (its validation split lives there).

    Returns None when it is not required and cannot be found. A cache that differs from
    the one recorded with the model is refused, naming the differences.
    """
    from dogtl.features.cache import open_cache
    from dogtl.features.fingerprint import IMAGE_LISTS, TEST_LIST, fingerprint_differences
    from dogtl.features.incremental import changes_since
    from dogtl.features.multicache import is_multi, open_model_caches

    if is_multi(meta):
        return open_model_caches(meta, override, required)
    if isinstance(override, (list, tuple)):
        override = override[0] if len(override) == 1 else override
    path = override or meta.get("cache")
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
    recorded = meta.get("cache_fingerprint")
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
    if list(cache.classes) != list(meta["classes"]):
        raise CacheError(f"{path}: its classes differ from the model's; pass --cache with the right file")
    return cache


def split_paths(cache, dataset) -> dict:
    """Image paths, labels and augmentation keys ("indices") of the cache's train and validation rows.

    `dataset`: the data folder (read as extraction read it: labels.csv's columns are in the
    fingerprint) or its Dataset. The keys are those the cache's augmented passes were drawn with
    (a function of the image id; format-1 caches: the file number at extraction), so
    fine-tuning's pass p of an image is the cache's pass p.
    """
    from dogtl.core.errors import DataError
    from dogtl.data.folders import Dataset, load_dataset

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
