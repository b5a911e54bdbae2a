"""Stage one: run the frozen backbone once over every image (+ augmented passes).

Work is saved one batch at a time (cache.PartialCache), so a rerun of a killed
extraction resumes at the first unsaved batch of each pass; pass p of an image depends
only on (seed, p, its id) and every backbone call holds exactly --batch-size images, so
resumed features equal those of an uninterrupted run (passes.py). A cache made with the same
settings from other images is updated: only new or changed images are computed
(incremental.py); reuse.py decides what an earlier run left is worth.

`extract_features` reads as its steps: locate the images and the file, plan what to compute,
build the backbone's forward pass, run the passes, write the cache.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from dogtl.core.diskspace import require_free_space
from dogtl.core.distribute import agree, extraction_progress, make_strategy, replicated_infer, scope, worker
from dogtl.core.errors import CacheError, DataError, DogtlError
from dogtl.core.locks import hold, writes
from dogtl.core.modelinfo import weights_path_to_record
from dogtl.core.models import backbone_identity, build_backbone, weights_identity
from dogtl.core.runtimes import frozen_forward, plan as runtime_plan
from dogtl.data.folders import KAGGLE_COLUMNS, Dataset, load_dataset, split_validation
from dogtl.core.backbones import check_image_size, get_backbone
from dogtl.features.cachewriter import write_cache
from dogtl.features.fingerprint import IMAGE_KEY
from dogtl.features.partial import PartialCache, space_needed
from dogtl.features.cut import cut_bytes, cut_info, extraction_model, stored_layout
from dogtl.features.incremental import (Change, fresh_plan, image_lists, list_fingerprint, merged_pass, update_plan,
                                        updates_after)
from dogtl.features.passes import PassRunner, unreadable_reason
from dogtl.features.random_backbone import CALIBRATION_IMAGES, calibrate_random_backbone, random_backbone_path
from dogtl.features.reuse import check_existing, check_plan
from dogtl.features.settings import ExtractConfig
from dogtl.features.shards import parse_shard, shard_path
from dogtl.features.signal import spread
from dogtl.core.version import __version__

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (images done, images in total)


@dataclass
class ExtractSummary:
    path: Path
    status: str  # "written", "updated" (an existing cache, for other images) or "up to date"
    images: int
    test_images: int
    passes: int
    tta_passes: int
    skipped: list[str]
    seconds: float
    file_bytes: int
    resumed: int = 0  # images found already done in an interrupted earlier run
    change: Change | None = None  # an update of an existing cache: what changed (None: a fresh extraction)
    computed: int = 0  # images (labelled and test) the backbone ran on, the others copied from the old cache
    runtime: str | None = None  # what ran the backbone (None: nothing to extract)


def versions() -> dict:
    import h5py  # local: importing extract must not load TensorFlow before make_strategy (multi-worker)
    import keras
    import tensorflow as tf

    return {"dogtl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__}


def make_fingerprint(config: ExtractConfig, dataset: Dataset, lists: dict, backbone=None) -> dict:
    """`lists`: incremental.image_lists(dataset); `backbone` (the built model) is needed only with
    --cut-blocks, for the cut's shape."""
    spec = get_backbone(config.backbone)
    return {
        "backbone": spec.name,
        "weights": weights_identity(config.weights),
        "image_size": check_image_size(spec, config.image_size),
        "preprocessing": spec.preprocessing,
        "feature_dim": spec.feature_dim,
        "augmentation": config.augmentation.as_dict(),
        "passes": config.passes,
        "tta_passes": config.tta_passes,
        "seed": config.seed,
        "val_fraction": config.val_fraction if dataset.is_val is None else "the data's own validation folder",
        "dtype": config.dtype,
        "precision": runtime_plan(config.runtime, config.precision, None if config.strategy == "default" else config.strategy)[1],
        **({"cut": cut_info(backbone, spec, config.cut_blocks, config.cut_dtype)} if config.cut_blocks else {}),
        "data_layout": dataset.layout,
        **({"columns": dict(zip(("id", "label"), dataset.columns))} if dataset.columns != KAGGLE_COLUMNS else {}),
        "image_key": IMAGE_KEY,
        **list_fingerprint(lists),
        # A shard is this extraction's I-th of N parts: otherwise the same fingerprint.
        **({"shard": parse_shard(config.shard).as_dict()} if config.shard else {}),
    }


@dataclass
class _Job:
    """One extraction as it is planned: where the images and the file are, and what to compute."""

    config: ExtractConfig
    spec: object  # core.backbones.BackboneSpec
    image_size: int
    dataset: Dataset
    lists: dict  # incremental.image_lists: ids, file contents and augmentation keys per split
    is_val: np.ndarray
    shard: object  # shards.Shard or None
    blocks: dict  # split -> this run's file numbers (all of them unless sharded)
    path: Path
    backbone: object = None  # built before the plan only with --cut-blocks (the cut's shape is fingerprinted)
    fingerprint: dict | None = None
    partial: PartialCache | None = None
    base: object = None  # the cache this run updates (same settings, other images), or None
    plan: object = None  # incremental.Plan: `todo` file numbers computed, `base_rows` copied
    digest: str = ""

    @property
    def computing(self) -> int:
        return len(self.plan.todo["labelled"]) + len(self.plan.todo["test"])


@writes
def extract_features(config: ExtractConfig, progress: Progress | None = None,
                     note: Callable[[str], None] | None = None) -> ExtractSummary:
    """`note` gets a line before the work starts: what changed when a cache is updated, the disk
    the cut activations take."""
    started = time.perf_counter()
    spec = get_backbone(config.backbone)
    image_size = check_image_size(spec, config.image_size)
    strategy = make_strategy(config.strategy)  # first: multi-worker must start before any TensorFlow work
    job = _locate(config, spec, image_size, strategy, note)
    existing = _plan(job, strategy, note)
    if existing is not None:
        return ExtractSummary(job.path, "up to date", len(existing.ids), len(existing.test_ids),
                              existing.num_passes - 1, existing.num_test_passes - 1, existing.skipped,
                              time.perf_counter() - started, job.path.stat().st_size)
    forward = _forward(job, strategy, note)
    runner = PassRunner(job.config, spec, image_size, job.partial, forward, progress)
    runner.cut_dtype = job.config.cut_dtype if job.config.cut_blocks else None
    good = _run_passes(job, runner, forward)
    lab_at, test_at, skipped = _write(job, good, forward)
    c = job.config
    return ExtractSummary(job.path, "updated" if job.base is not None else "written", len(lab_at), len(test_at),
                          c.passes, c.tta_passes, skipped, time.perf_counter() - started,
                          job.path.stat().st_size, runner.resumed, job.plan.change, job.computing, forward.runtime)


def _locate(config: ExtractConfig, spec, image_size: int, strategy, note) -> _Job:
    """The images, their validation split, this run's shard of them and the file it writes (held)."""
    dataset = load_dataset(config.data, config.id_column, config.label_column)
    lists = image_lists(dataset)  # ids, file contents and augmentation keys
    # The split is drawn over every labelled image before any work, so an image's split does not
    # depend on which other images were unreadable (nor, being its own draw, on the others at all).
    is_val = dataset.is_val if dataset.is_val is not None else \
        split_validation(dataset.ids, dataset.labels, config.val_fraction, config.seed)
    _note_layout(dataset, is_val, note)
    shard = parse_shard(config.shard)
    # This run's block of each split's file numbers (all of them unless sharded).
    lab, tst = range(len(dataset.ids)), range(len(dataset.test_ids))
    if shard is not None:
        lab, tst = shard.rows(len(lab)), shard.rows(len(tst))
    path = worker(strategy).private_path(shard_path(config.cache, shard) if shard else config.cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    hold(path, "the feature shard" if shard else "the feature cache")  # one writer per cache or shard file
    if config.weights == "none":
        config = replace(config, weights=str(_random_backbone(config, spec, image_size, dataset.paths, path, note)))
    return _Job(config, spec, image_size, dataset, lists, is_val, shard, {"labelled": lab, "test": tst}, path)


def _plan(job: _Job, strategy, note):
    """Fingerprint the settings, weigh what an earlier run left and plan the images to compute;
    returns the cache when it is already up to date (nothing planned then)."""
    c = job.config
    if c.cut_blocks:  # the cut's shape is part of the fingerprint
        job.backbone = build_backbone(job.spec, c.weights, job.image_size)
    job.fingerprint = make_fingerprint(c, job.dataset, job.lists, job.backbone)
    job.partial = PartialCache(job.path)
    existing, job.base = check_existing(job.path, job.partial, job.fingerprint, c.force)
    agree(strategy, extraction_progress(existing, job.partial, {"labelled": c.passes, "test": c.tta_passes}),
          "what is already extracted")
    if existing is not None:
        return existing
    job.plan = update_plan(job.base, job.lists, job.blocks, job.is_val) if job.base is not None \
        else fresh_plan(job.blocks)
    if job.plan.change is not None and note:
        note(job.plan.change.summary(job.computing))
    job.digest = check_plan(job.partial, job.plan, job.lists)
    return None


def _forward(job: _Job, strategy, note):
    """The backbone's frozen forward pass (runtimes.frozen_forward), once the disk has room for
    the work; the unfinished cache is started with its fingerprint, the runtime included."""
    c, spec, todo = job.config, job.spec, job.plan.todo
    backbone, identity = job.backbone, None
    if backbone is None and strategy is None:  # built only when no converted copy is cached (frozen_forward)
        backbone = functools.partial(build_backbone, spec, c.weights, job.image_size)
        identity = backbone_identity(spec, job.fingerprint["weights"], job.image_size)
    elif backbone is None:
        with scope(strategy):  # the model's variables on every replica
            backbone = build_backbone(spec, c.weights, job.image_size)
    if c.cut_blocks and note:
        size = cut_bytes(job.fingerprint["cut"], (1 + c.passes) * len(todo["labelled"])
                         + (1 + c.tta_passes) * len(todo["test"]))
        note(f"cut activations (top {c.cut_blocks} blocks, {job.fingerprint['cut']['shape']} in "
             f"{c.cut_dtype}): {size / 1e6:,.1f} MB in the cache, as much again while extracting")
    require_free_space(job.path.parent, space_needed(job.path, job.fingerprint,
                                                     (len(todo["labelled"]), len(todo["test"])),
                                                     (len(job.blocks["labelled"]), len(job.blocks["test"]))),
                       f"extract-features --cut-blocks {c.cut_blocks} (features and cut activations)"
                       if c.cut_blocks else "extract-features")
    model = extraction_model(backbone, spec, c.cut_blocks) if c.cut_blocks else backbone
    forward = frozen_forward(model, runtime=c.runtime, precision=c.precision, strategy=strategy,
                             label=f"{spec.name}-{job.image_size}" + (f"-cut{c.cut_blocks}" if c.cut_blocks else ""),
                             tf_call=None if strategy is None else replicated_infer(strategy, backbone), note=note,
                             identity=identity)  # a bad weights file fails here, before any write
    job.fingerprint = {**job.fingerprint, "runtime": forward.runtime}
    job.partial.start(job.fingerprint)
    job.partial.save_json("plan.json", job.digest)
    return forward


def _run_passes(job: _Job, runner: PassRunner, forward) -> dict:
    """Every pass over the planned images: {split: positions (in todo) of the readable ones}."""
    c, todo, lists = job.config, job.plan.todo, job.lists
    copied = _copied(job)
    # Positions number the images computed (todo); augmentation keys are functions of their ids.
    with forward:
        return runner.run({split: ([lists[split].paths[i] for i in todo[split]], extra, lists[split].keys[todo[split]])
                           for split, extra in (("labelled", c.passes), ("test", c.tta_passes))},
                          on_clean_pass=None if job.shard else  # a shard may hold one class; merge-cache checks
                          lambda split, readable: _check_clean_pass(
                              split, np.concatenate([todo[split][readable], copied[split]]), job.dataset, c,
                              job.partial))


def _copied(job: _Job) -> dict:
    """The file numbers copied from the cache being updated, per split."""
    return {split: np.fromiter(job.plan.base_rows[split], np.int64) for split in job.plan.todo}


def _write(job: _Job, good: dict, forward) -> tuple:
    """The finished cache, the computed passes merged with those copied from the cache updated:
    (labelled file numbers, test file numbers, skipped lines)."""
    c, todo, copied, plan, base = job.config, job.plan.todo, _copied(job), job.plan, job.base
    out, skipped, arrays = {}, [], {}
    for split, passes in (("labelled", c.passes), ("test", c.tta_passes)):
        images, readable = job.lists[split], np.asarray(good[split], dtype=np.int64)
        unreadable = np.setdiff1d(np.arange(len(todo[split])), readable)
        skipped += [f"{images.paths[i]}\t{unreadable_reason(images.paths[i])}" for i in todo[split][unreadable]]
        out[split] = at = np.sort(np.concatenate([todo[split][readable], copied[split]]))  # file numbers
        arrays[split] = {"ids": [images.ids[i] for i in at], "index": at, "key": images.keys[at],
                         "sha256": [images.sha256[i] for i in at]}
        layout = {"features": ((int(job.fingerprint["feature_dim"]),), c.dtype), **stored_layout(job.fingerprint)}
        for key, (shape, dtype) in layout.items():
            arrays[split][key] = [merged_pass(base, split, p, at, plan.base_rows[split],
                                              _computed(job.partial, split, p, todo[split], key), shape, dtype, key)
                                  for p in range(1 + passes)]
    lab_at = out["labelled"]
    write_cache(
        job.path, fingerprint=job.fingerprint, versions={**versions(), "runtime": forward.version},
        classes=list(job.dataset.classes),
        labelled={**arrays["labelled"], "labels": job.dataset.labels[lab_at].astype(np.int32),
                  "is_val": job.is_val[lab_at]},
        test=arrays["test"], skipped=skipped, weights_path=weights_path_to_record(c.weights),
        updates=updates_after(base, job.fingerprint, plan.change) if base is not None else None,
    )
    job.partial.remove()
    return lab_at, out["test"], skipped


def _computed(partial: PartialCache, split: str, pass_index: int, todo: np.ndarray, key: str):
    """A callable streaming the saved batches of one pass as (file numbers, block)."""
    def chunks():
        for positions, values in partial.iter_pass(split, pass_index, key):
            if len(positions) and positions.max() >= len(todo):
                raise CacheError(f"pass {pass_index} of {split} images is inconsistent; rerun with --force")
            yield todo[positions], values
    return chunks


def _note_layout(dataset: Dataset, is_val, note) -> None:
    """Say how the data folder was read where dogtl had to choose: columns, validation split."""
    if note and dataset.columns != KAGGLE_COLUMNS:
        note(f"{dataset.root / 'labels.csv'}: image ids from column {dataset.columns[0]!r}, labels from "
             f"{dataset.columns[1]!r} (--id-column / --label-column choose others)")
    if note and dataset.is_val is not None:
        note(f"validation split: the data's own validation folder ({int(is_val.sum())} images; --val-fraction "
             "is not used)")


def _random_backbone(config: ExtractConfig, spec, image_size: int, paths, path: Path, note) -> Path:
    """`--weights none`: the random backbone calibrated on labelled images (whatever the split:
    its statistics hold no labels, and the clean pass stays the same for every --seed), kept
    beside the cache (made again only with --force: a resumed or repeated run uses the same one)."""
    weights = random_backbone_path(path)
    if config.force or not weights.is_file():
        calibrate_random_backbone(spec, image_size, paths, weights, what="extract-features --weights none")
    if note:
        note(f"note: --weights none: a random backbone, its BatchNorm statistics taken from "
             f"{min(CALIBRATION_IMAGES, len(paths))} labelled images (kept as {weights}; later stages use it). "
             "Good for smoke tests, not for accuracy: use --weights imagenet or a trained weights file for real "
             "features")
    return weights


def _check_clean_pass(split, readable, dataset, config, partial):
    """After the clean pass: two classes readable, and features a head can learn from."""
    if split != "labelled":
        return
    if len(np.unique(dataset.labels[np.asarray(readable, dtype=np.int64)])) < 2:
        raise DataError(f"fewer than two classes have readable images in {config.data}: "
                        "fix the images (see --on-bad-image)")
    problem = spread(features for _, features in partial.iter_pass("labelled", 0)).degenerate()
    if problem:
        raise DogtlError(f"{config.backbone} with --weights {config.weights} gives degenerate features: {problem}. A "
                         "head cannot learn from them: the weights carry no signal (a broken or mismatched file?"
                         + (" values too small for --dtype float16?" if config.dtype == "float16" else "")
                         + "). Rerun with other --weights (imagenet, or a trained weights file) and --force")
