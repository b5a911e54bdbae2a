"""Stage one: run the frozen backbone once over every image (+ augmented passes).

Work is saved one batch at a time (cache.PartialCache), so a rerun of a killed
extraction resumes at the first unsaved batch of each pass; pass p of an image depends
only on (seed, p, its id) and every backbone call holds exactly --batch-size images, so
resumed features equal those of an uninterrupted run. A cache made with the same settings
from other images is updated: only new or changed images are computed (incremental.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from dogtl.data.augment import AugmentConfig
from dogtl.features.backbones import check_image_size, get_backbone
from dogtl.features.cache import open_cache
from dogtl.features.cacheformat import FORMAT_VERSION, damage, is_cache_file
from dogtl.features.cachewriter import write_cache
from dogtl.features.fingerprint import IMAGE_KEY, IMAGE_LISTS, fingerprint_differences
from dogtl.features.partial import PartialCache, space_needed
from dogtl.features.incremental import (Change, fresh_plan, image_lists, list_fingerprint, merged_pass, update_plan,
                                        updates_after)
from dogtl.data.folders import KAGGLE_COLUMNS, Dataset, load_dataset, split_validation
from dogtl.core.errors import CacheError, DataError, DogtlError, SettingError
from dogtl.core.files import check_overwrite
from dogtl.core.diskspace import require_free_space
from dogtl.core.locks import hold, writes

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (images done, images in total)


@dataclass(frozen=True)
class ExtractConfig:
    data: str = "data"
    cache: str = "cache/features.h5"
    backbone: str = "xception"
    weights: str = "imagenet"
    image_size: int | None = None
    passes: int = 5
    tta_passes: int = 0
    batch_size: int = 32
    val_fraction: float = 0.1
    seed: int = 2018
    on_bad_image: str = "skip"
    dtype: str = "float16"
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    force: bool = False
    shard: str | None = None  # "I/N": extract the I-th of N shards (see shards.py)
    strategy: str = "default"  # default | mirrored | multi-worker (see distribute.py)
    precision: str = "auto"  # the backbone's arithmetic (core/precision.py); recorded resolved
    runtime: str = "auto"  # what runs the backbone (core/runtimes.py); recorded resolved, never refused
    cut_blocks: int | str = 0  # also store the activations entering the top N blocks or 'all' (features/cut.py)
    cut_dtype: str = "float16"  # or int8 (per-image, per-channel scales)
    id_column: str | None = None  # labels.csv's columns, when they are not recognised by name
    label_column: str | None = None

    def __post_init__(self):
        from dogtl.core.distribute import check_strategy
        from dogtl.features.shards import parse_shard

        parse_shard(self.shard)
        check_strategy(self.strategy)
        if self.passes < 0 or self.tta_passes < 0:
            raise SettingError(f"--passes {self.passes} / --tta-passes {self.tta_passes} must be >= 0")
        if self.batch_size < 1:
            raise SettingError(f"--batch-size {self.batch_size} must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SettingError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.on_bad_image not in ("skip", "fail"):
            raise SettingError(f"--on-bad-image {self.on_bad_image!r} must be 'skip' or 'fail'")
        if self.dtype not in ("float16", "float32"):
            raise SettingError(f"--dtype {self.dtype!r} must be 'float16' or 'float32'")
        from dogtl.core.precision import check_precision
        from dogtl.core.settings import parse_blocks
        from dogtl.features.cut import CUT_DTYPES

        check_precision(self.precision)
        from dogtl.core.runtimes import check_runtime

        check_runtime(self.runtime)
        try:
            object.__setattr__(self, "cut_blocks", parse_blocks(self.cut_blocks))
        except SettingError as e:
            raise SettingError(f"--cut-blocks {self.cut_blocks!r}: expected {e}") from None
        if self.cut_dtype not in CUT_DTYPES:
            raise SettingError(f"--cut-dtype {self.cut_dtype!r} must be one of {', '.join(CUT_DTYPES)}")
        if self.cut_blocks and self.strategy != "default":
            raise SettingError(f"--cut-blocks runs on one device only: drop --strategy {self.strategy}")


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
    import h5py
    import keras
    import tensorflow as tf

    from dogtl import __version__

    return {"dogtl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__}


def make_fingerprint(config: ExtractConfig, dataset: Dataset, lists: dict, backbone=None) -> dict:
    """`lists`: incremental.image_lists(dataset); `backbone` (the built model) is needed only with
    --cut-blocks, for the cut's shape."""
    from dogtl.core.models import weights_identity
    from dogtl.core.runtimes import plan
    from dogtl.features.cut import cut_info

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
        "precision": plan(config.runtime, config.precision, None if config.strategy == "default" else config.strategy)[1],
        **({"cut": cut_info(backbone, spec, config.cut_blocks, config.cut_dtype)} if config.cut_blocks else {}),
        "data_layout": dataset.layout,
        **({"columns": dict(zip(("id", "label"), dataset.columns))} if dataset.columns != KAGGLE_COLUMNS else {}),
        "image_key": IMAGE_KEY,
        **list_fingerprint(lists),
        # A shard is this extraction's I-th of N parts: otherwise the same fingerprint.
        **({"shard": _shard(config).as_dict()} if config.shard else {}),
    }


def _shard(config: ExtractConfig):
    from dogtl.features.shards import parse_shard

    return parse_shard(config.shard)


def _check_existing(path: Path, partial: PartialCache, fingerprint: dict, force: bool):
    """(the up-to-date cache if there is one, the cache to update if it differs only in its
    images); refuses others unless forced, and --force recomputes everything.

    A file at `path` that is our format but unreadable is a damaged copy, worth nothing, and
    is replaced; a file that is not an HDF5 file at all is never overwritten without --force.
    """
    base = None
    if path.exists():
        if path.is_dir():
            raise CacheError(f"--cache {path} is a folder: pass a file name such as {path / 'features.h5'}")
        try:
            existing, problem = open_cache(path), None
        except CacheError as e:
            existing, problem = None, str(e)
        if existing is not None and not fingerprint_differences(existing.fingerprint, fingerprint):
            problem = damage(path) if force else None  # --force redoes a cache whose checksums fail
            if problem is None:  # (a finished run's leftovers went when the lock was taken: core.locks)
                return existing, None
            existing = None
        if existing is not None and not force:
            if existing.format_version < FORMAT_VERSION:
                raise CacheError(f"{path} is a format-{existing.format_version} cache (made before incremental "
                                 "caches: augmentation and the validation split keyed by file number, not image "
                                 "id), which cannot be updated; every stage still reads it. Pass --force to "
                                 "extract it again (later changes then cost only the new images), or --cache OTHER.h5")
            if fingerprint_differences(existing.fingerprint, fingerprint, ignore=IMAGE_LISTS):
                diff = "; ".join(fingerprint_differences(existing.fingerprint, fingerprint))
                raise CacheError(f"{path} was made with other settings ({diff}). "
                                 "Pass --force to replace it, or --cache OTHER.h5")
            base = existing  # the same settings, other images: kept at `path` until the update replaces it
        elif existing is None and not is_cache_file(path):
            check_overwrite(path, force, "--cache", detail=" and is not a dogtl feature cache")
        if base is None:
            log.warning("replacing %s (%s)", path, problem or "--force")
            path.unlink()
    if partial.exists():
        diff = fingerprint_differences(partial.fingerprint(), fingerprint)
        if diff and not force and not fingerprint_differences(partial.fingerprint(), fingerprint, ignore=IMAGE_LISTS):
            raise CacheError(
                f"{partial.dir} holds an unfinished extraction of other images ({'; '.join(diff)}). Put the "
                "images back as they were and rerun to finish it, then rerun for the change; or delete that "
                f"folder to start over{' from ' + str(path) if base is not None else ''} (--force recomputes everything)"
            )
        if diff and not force:
            raise CacheError(
                f"{partial.dir} holds an unfinished extraction with other settings ({'; '.join(diff)}). "
                "Rerun it with those settings to finish it, or pass --force to discard it"
            )
        if diff:
            partial.remove()
    return None, base


def _check_plan(partial: PartialCache, plan, lists: dict) -> str:
    """An unfinished run's batches number the images it was computing: resume them only for the
    same list (the cache it updates could have been replaced since)."""
    import hashlib

    h = hashlib.sha256()
    for split, todo in plan.todo.items():
        for i in todo:
            h.update(f"{split}\t{lists[split].ids[i]}\t{lists[split].sha256[i]}\n".encode())
    digest = h.hexdigest()
    if partial.exists() and partial.load_json("plan.json") != digest:
        log.warning("%s was computing other images (the cache it updates changed since): starting over",
                    partial.dir)
        partial.remove()
    return digest


@writes
def extract_features(config: ExtractConfig, progress: Progress | None = None,
                     note: Callable[[str], None] | None = None) -> ExtractSummary:
    """`note` gets a line before the work starts: what changed when a cache is updated, the disk
    the cut activations take."""
    started = time.perf_counter()
    spec = get_backbone(config.backbone)
    image_size = check_image_size(spec, config.image_size)
    from dogtl.core.distribute import agree, extraction_progress, make_strategy, replicated_infer, scope, worker
    from dogtl.features.shards import shard_path

    strategy = make_strategy(config.strategy)  # first: multi-worker must start before any TensorFlow work
    dataset = load_dataset(config.data, config.id_column, config.label_column)
    lists = image_lists(dataset)  # ids, file contents and augmentation keys
    # The split is drawn over every labelled image before any work, so an image's split does not
    # depend on which other images were unreadable (nor, being its own draw, on the others at all).
    is_val = dataset.is_val if dataset.is_val is not None else \
        split_validation(dataset.ids, dataset.labels, config.val_fraction, config.seed)
    _note_layout(dataset, is_val, note)
    shard = _shard(config)
    # This run's block of each split's file numbers (all of them unless sharded).
    lab, tst = range(len(dataset.ids)), range(len(dataset.test_ids))
    if shard is not None:
        lab, tst = shard.rows(len(lab)), shard.rows(len(tst))
    path = worker(strategy).private_path(shard_path(config.cache, shard) if shard else config.cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    hold(path, "the feature shard" if shard else "the feature cache")  # one writer per cache or shard file
    if config.weights == "none":
        config = replace(config, weights=str(_random_backbone(config, spec, image_size, dataset.paths, path, note)))
    backbone = None
    if config.cut_blocks:  # the cut's shape is part of the fingerprint
        from dogtl.core.models import build_backbone

        backbone = build_backbone(spec, config.weights, image_size)
    fingerprint = make_fingerprint(config, dataset, lists, backbone)
    partial = PartialCache(path)
    existing, base = _check_existing(path, partial, fingerprint, config.force)
    agree(strategy, extraction_progress(existing, partial, {"labelled": config.passes, "test": config.tta_passes}),
          "what is already extracted")
    if existing is not None:
        return ExtractSummary(path, "up to date", len(existing.ids), len(existing.test_ids),
                              existing.num_passes - 1, existing.num_test_passes - 1, existing.skipped,
                              time.perf_counter() - started, path.stat().st_size)
    blocks = {"labelled": lab, "test": tst}
    plan = update_plan(base, lists, blocks, is_val) if base is not None else fresh_plan(blocks)
    todo = plan.todo  # file numbers the backbone runs on; the others are copied from `base`
    computing = len(todo["labelled"]) + len(todo["test"])
    if plan.change is not None and note:
        note(plan.change.summary(computing))
    digest = _check_plan(partial, plan, lists)

    from dogtl.core.modelinfo import weights_path_to_record
    from dogtl.core.models import build_backbone
    from dogtl.core.runtimes import frozen_forward
    from dogtl.features.cut import cut_bytes, extraction_model, stored_layout

    if backbone is None:
        with scope(strategy):  # the model's variables on every replica
            backbone = build_backbone(spec, config.weights, image_size)  # a bad weights file fails before any write
    if config.cut_blocks and note:
        size = cut_bytes(fingerprint["cut"], (1 + config.passes) * len(todo["labelled"])
                         + (1 + config.tta_passes) * len(todo["test"]))
        note(f"cut activations (top {config.cut_blocks} blocks, {fingerprint['cut']['shape']} in "
             f"{config.cut_dtype}): {size / 1e6:,.1f} MB in the cache, as much again while extracting")
    require_free_space(path.parent, space_needed(path, fingerprint, (len(todo["labelled"]), len(todo["test"])),
                                                 (len(lab), len(tst))),
                       f"extract-features --cut-blocks {config.cut_blocks} (features and cut activations)"
                       if config.cut_blocks else "extract-features")
    model = extraction_model(backbone, spec, config.cut_blocks) if config.cut_blocks else backbone
    forward = frozen_forward(model, runtime=config.runtime, precision=config.precision, strategy=strategy,
                             label=f"{spec.name}-{image_size}" + (f"-cut{config.cut_blocks}" if config.cut_blocks else ""),
                             tf_call=None if strategy is None else replicated_infer(strategy, backbone), note=note)
    fingerprint = {**fingerprint, "runtime": forward.runtime}
    partial.start(fingerprint)
    partial.save_json("plan.json", digest)
    runner = _PassRunner(config, spec, image_size, partial, forward, progress)
    runner.cut_dtype = config.cut_dtype if config.cut_blocks else None
    copied = {split: np.fromiter(plan.base_rows[split], np.int64) for split in todo}  # file numbers
    # Positions number the images computed (todo); augmentation keys are functions of their ids.
    with forward:
        good = runner.run({split: ([lists[split].paths[i] for i in todo[split]], extra, lists[split].keys[todo[split]])
                           for split, extra in (("labelled", config.passes), ("test", config.tta_passes))},
                          on_clean_pass=None if shard else  # a shard may hold one class; merge-cache checks
                          lambda split, readable: _check_clean_pass(
                              split, np.concatenate([todo[split][readable], copied[split]]), dataset, config, partial))

    out, skipped, arrays = {}, [], {}
    for split, passes in (("labelled", config.passes), ("test", config.tta_passes)):
        images, readable = lists[split], np.asarray(good[split], dtype=np.int64)
        unreadable = np.setdiff1d(np.arange(len(todo[split])), readable)
        skipped += [f"{images.paths[i]}\t{_reason(images.paths[i])}" for i in todo[split][unreadable]]
        out[split] = at = np.sort(np.concatenate([todo[split][readable], copied[split]]))  # file numbers
        arrays[split] = {"ids": [images.ids[i] for i in at], "index": at, "key": images.keys[at],
                         "sha256": [images.sha256[i] for i in at]}
        layout = {"features": ((int(fingerprint["feature_dim"]),), config.dtype), **stored_layout(fingerprint)}
        for key, (shape, dtype) in layout.items():
            arrays[split][key] = [merged_pass(base, split, p, at, plan.base_rows[split],
                                              _computed(partial, split, p, todo[split], key), shape, dtype, key)
                                  for p in range(1 + passes)]
    lab_at = out["labelled"]
    write_cache(
        path, fingerprint=fingerprint, versions={**versions(), "runtime": forward.version}, classes=list(dataset.classes),
        labelled={**arrays["labelled"], "labels": dataset.labels[lab_at].astype(np.int32), "is_val": is_val[lab_at]},
        test=arrays["test"], skipped=skipped, weights_path=weights_path_to_record(config.weights),
        updates=updates_after(base, fingerprint, plan.change) if base is not None else None,
    )
    partial.remove()
    return ExtractSummary(path, "updated" if base is not None else "written", len(lab_at), len(out["test"]),
                          config.passes, config.tta_passes, skipped, time.perf_counter() - started,
                          path.stat().st_size, runner.resumed, plan.change, computing, forward.runtime)


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
    from dogtl.features.random_backbone import CALIBRATION_IMAGES, calibrate_random_backbone, random_backbone_path

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
    from dogtl.features.signal import spread

    problem = spread(features for _, features in partial.iter_pass("labelled", 0)).degenerate()
    if problem:
        raise DogtlError(f"{config.backbone} with --weights {config.weights} gives degenerate features: {problem}. A "
                         "head cannot learn from them: the weights carry no signal (a broken or mismatched file?"
                         + (" values too small for --dtype float16?" if config.dtype == "float16" else "")
                         + "). Rerun with other --weights (imagenet, or a trained weights file) and --force")


def _reason(path) -> str:
    from dogtl.data.images import decode_error

    return decode_error(path) or "unreadable"


class _PassRunner:
    """Runs the backbone over every pass, saving each finished batch.

    All passes of both splits form one stream of batches (images.multi_pass_dataset), each
    pass starting at its first unsaved batch; a batch may end one pass and begin the next (its
    rows are saved per pass), so a small update's passes share batches instead of each
    padding its own. Every pass covers every file it is given,
    positions numbering them; unreadable files are missing from every pass. Progress counts
    image-passes: `total` is (1 + passes) x images (+ the test images' passes); skipped
    images count as done, so the count ends exactly at `total`.
    """

    def __init__(self, config, spec, image_size, partial, infer, progress):
        self.config, self.spec, self.image_size = config, spec, image_size
        self.partial, self.infer, self.progress = partial, infer, progress
        self.total, self.done, self.resumed = 0, 0, 0
        self.warned = False
        self.cut_dtype = None  # with --cut-blocks: infer gives (features, cut activations), stored in this

    def _advance(self, n: int, resumed: bool = False):
        self.done += n
        if resumed:
            self.resumed += n
        if self.progress:
            self.progress(min(self.done, self.total), self.total)

    def run(self, splits: dict, on_clean_pass=None) -> dict:
        """Extracts what is missing; returns {split: positions of the readable files}.

        `splits` maps a split to (paths, extra passes, augmentation keys): positions number
        `paths` from 0, the augmentation key of position i is keys[i].
        """
        from dogtl.data.images import multi_pass_dataset

        self.good, self.on_clean_pass = {}, on_clean_pass
        segments = []
        for split, (paths, extra, keys) in splits.items():
            paths = [str(p) for p in paths]
            n = len(paths)
            self.total += (1 + extra) * n
            readable = self.partial.load_json(f"{split}-readable.json")
            if readable is not None:
                self.good[split] = np.asarray(readable, dtype=np.int64)
            for p in range(1 + extra):
                start = n if (p == 0 and readable is not None) else min(self.partial.covered(split, p), n)
                segments.append(_Segment(split, p, paths, start, np.asarray(keys, dtype=np.int64)))
        self._advance(sum(s.start for s in segments), resumed=True)

        ds = multi_pass_dataset([(s.pass_index, range(s.start, len(s.paths)), s.keys[s.start:], s.paths[s.start:])
                                 for s in segments],
                                self.spec, self.image_size, seed=self.config.seed,
                                augmentation=self.config.augmentation, batch_size=self.config.batch_size)
        current = 0
        for tags, pos, _, images in ds if ds is not None else []:
            tags, pos = tags.numpy(), pos.numpy()
            out = self._infer(images)  # one call, whichever passes the batch spans
            for k in np.unique(tags):
                for s in segments[current:k]:
                    self._finish(s)
                current = k
                rows = tags == k
                self._batch(segments[k], pos[rows], tuple(o[rows] for o in out) if isinstance(out, tuple) else out[rows])
        for s in segments[current:]:
            self._finish(s)
        return {split: self.good[split].tolist() for split in splits}

    def _batch(self, s, pos, out):
        """Check and save one pass's rows `pos` of a batch, `out` the backbone's outputs for them."""
        if s.pass_index == 0:
            if self.config.on_bad_image == "fail" and (pos[0] != s.expected or pos[-1] - pos[0] != len(pos) - 1):
                self._fail(s, pos)
        else:  # exactly the files readable in the clean pass
            good = self.good[s.split]
            if not np.array_equal(pos, good[(good >= s.expected) & (good <= pos[-1])]):
                self._fail(s, pos)
        extra = {}
        if self.cut_dtype:
            from dogtl.features.cut import encode

            out, extra = out[0], encode(np.asarray(out[1]).astype(np.float32), self.cut_dtype)
        features = self._store(np.asarray(out).astype(np.float32))  # computed perhaps in bfloat16/float16
        self.partial.write(s.split, s.pass_index, pos, features, **extra)
        self._advance(int(pos[-1]) + 1 - s.expected)
        s.expected = int(pos[-1]) + 1

    def _infer(self, images):
        """The backbone's outputs (arrays) on a batch padded to --batch-size: every call has the same
        shape, so an image's features do not depend on the batch it lands in (a last batch of one
        image runs other kernels, a bit apart), and resumed, sharded and incremental runs give the
        same bits."""
        import tensorflow as tf

        n = int(images.shape[0])
        pad = self.config.batch_size - n
        if pad > 0:
            images = tf.concat([images, tf.zeros([pad, *images.shape[1:]], images.dtype)], 0)
        out = self.infer(images)
        return tuple(np.asarray(o)[:n] for o in out) if isinstance(out, (tuple, list)) else np.asarray(out)[:n]

    def _finish(self, s):
        """After the last batch of a pass: unreadable files at its end, the clean pass's record."""
        if s.finished:
            return
        s.finished = True
        n = len(s.paths)
        if s.pass_index == 0:
            if self.config.on_bad_image == "fail" and s.expected != n:
                self._fail(s, np.array([n]))
            if s.split not in self.good:  # not yet recorded: this run finished the clean pass
                self.good[s.split] = self.partial.positions(s.split, 0)
                self.partial.save_json(f"{s.split}-readable.json", self.good[s.split].tolist())
            if self.on_clean_pass:
                self.on_clean_pass(s.split, self.good[s.split])
        elif np.any(self.good[s.split] >= s.expected):
            self._fail(s, np.array([n]))
        self._advance(n - s.expected)

    def _store(self, features: np.ndarray) -> np.ndarray:
        """Features in the stored dtype; float16 overflow is an error, underflow a warning."""
        with np.errstate(over="ignore"):  # reported below, as one error naming the fix
            stored = features.astype(self.config.dtype)
        if not np.isfinite(stored).all():
            raise DogtlError(f"backbone features reach {np.abs(features).max():.3g}, beyond --dtype "
                             f"{self.config.dtype}: rerun with --dtype float32 --force")
        if not self.warned and np.any(features) and not np.any(stored):
            self.warned = True
            log.warning("features are too small for %s (max %.3g) and are stored as zeros: use --dtype float32",
                        self.config.dtype, np.abs(features).max())
        return stored

    def _fail(self, s, pos):
        seen = set(pos.tolist())
        if s.pass_index == 0:
            missing = next(p for p in range(s.expected, int(pos[-1]) + 1) if p not in seen)
            raise DataError(f"{s.paths[missing]}: cannot read image ({_reason(s.paths[missing])}); "
                            "rerun with --on-bad-image skip to go on without it (work done is kept)")
        good = self.good[s.split]
        missing = [int(p) for p in good[good >= s.expected] if p not in seen]
        if missing:
            raise DataError(f"{s.paths[missing[0]]}: readable in the clean pass but not in pass {s.pass_index} "
                            f"({_reason(s.paths[missing[0]])}); did it change during the run? rerun with --force")
        extra = next(int(p) for p in pos if p not in set(good.tolist()))
        raise DataError(f"{s.paths[extra]}: unreadable in the clean pass but readable in pass {s.pass_index}; "
                        "did it change during the run? rerun with --force")


@dataclass
class _Segment:
    """One pass of one split, from its first unsaved position."""

    split: str
    pass_index: int
    paths: list
    start: int
    keys: np.ndarray  # augmentation key of each position
    expected: int = -1  # next position not yet accounted for
    finished: bool = False

    def __post_init__(self):
        self.expected = self.start
