"""Incremental extraction: a cache's cost grows with the change, not with the data set.

An image is known by its id and the SHA-256 of its file. When `extract-features` finds a
cache made with the same settings but another image list, that cache is the *base*: its rows
whose (id, content) are still in the data folder are copied, the other images (new, changed,
or unreadable last time) are computed, and the two are merged in the data folder's order.
Relabelled images (same id and content, another label) are copied: only their label row
changes. Augmented pass p of an image is keyed by (seed, p, its id) (data/augment.py) and its
validation side by its own draw (data/folders.py), and every backbone call holds exactly
`--batch-size` images (extract.py pads the last), so the result equals a fresh extraction of
the new image list row for row, bit for bit.

The base stays untouched at its path until the updated cache is renamed over it: a kill at
any moment leaves it valid, and the same command resumes the update (the computed images'
batches are in `<cache>.partial/` like any extraction's, with the list they number).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogtl.core.errors import CacheError
from dogtl.data.augment import image_keys
from dogtl.data.folders import content_hashes
from dogtl.features.cache import FeatureCache
from dogtl.features.fingerprint import LABELLED_LIST

SPLITS = ("labelled", "test")
COPY_ROWS = 4096  # rows of the updated cache assembled at a time
COPY_BYTES = 64 << 20  # at most this much per block (cut activations are ~0.5 MB a row)


@dataclass(frozen=True)
class ImageList:
    """One split's images as extraction sees them, in the data folder's order."""

    ids: tuple
    paths: tuple
    sha256: list  # of each file's bytes ("" for a file that cannot be read)
    keys: np.ndarray  # augmentation keys (data.augment.image_keys)
    classes: tuple = ()  # labelled only: each image's class name


def image_lists(dataset) -> dict:
    """{"labelled": ImageList, "test": ImageList} of a data folder (reads every file once)."""
    hashes = content_hashes([*dataset.paths, *dataset.test_paths])
    n = len(dataset.paths)
    return {"labelled": ImageList(dataset.ids, dataset.paths, hashes[:n], image_keys(dataset.ids),
                                  tuple(dataset.classes[y] for y in dataset.labels)),
            "test": ImageList(dataset.test_ids, dataset.test_paths, hashes[n:], image_keys(dataset.test_ids))}


def list_fingerprint(lists: dict) -> dict:
    """The fingerprint's image lists: order, ids, labels and file contents of each split."""
    def digest(lines) -> str:
        h = hashlib.sha256()
        for line in lines:
            h.update(line.encode() + b"\n")
        return h.hexdigest()[:16]

    lab, tst = lists["labelled"], lists["test"]
    return {"file_list": digest(f"L\t{i}\t{c}\t{s}" for i, c, s in zip(lab.ids, lab.classes, lab.sha256)),
            "num_images": len(lab.ids),
            "test_file_list": digest(f"T\t{i}\t{s}" for i, s in zip(tst.ids, tst.sha256)),
            "num_test_images": len(tst.ids)}


@dataclass
class Change:
    """What differs between the base and the data folder, per split (counts of images)."""

    added: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    removed: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    changed: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # same id, other content
    retried: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))  # unreadable last time
    relabelled: int = 0
    moved: int = 0  # unchanged images on the other side of the split (data.folders.split_validation's guard)

    def describe(self, split: str) -> str:
        """'+500 images, 3 relabelled, 12 removed' (empty when nothing changed)."""
        noun = "images" if split == "labelled" else "test images"
        parts = [f"+{self.added[split]} {noun}" if self.added[split] else ""]
        if split == "labelled":
            parts.append(f"{self.relabelled} relabelled" if self.relabelled else "")
        parts += [f"{self.changed[split]} changed" if self.changed[split] else "",
                  f"{self.removed[split]} removed" if self.removed[split] else "",
                  f"{self.retried[split]} unreadable retried" if self.retried[split] else ""]
        if split == "labelled" and self.moved:
            parts.append(f"{self.moved} unchanged moved between training and validation (a class would "
                         "otherwise be wholly in validation)")
        parts = [p for p in parts if p]
        if parts and split == "test" and not self.added[split]:
            parts[0] = f"test images: {parts[0]}"
        return ", ".join(parts)

    def summary(self, computing: int) -> str:
        """The line printed before an update: '+500 images, 3 relabelled, 12 removed: extracting 500'."""
        told = "; ".join(t for t in (self.describe(s) for s in SPLITS) if t) or "images reordered"
        return f"{told}: extracting {computing}"


@dataclass
class Plan:
    """Which images of this run's block (file numbers, per split) are computed, and which rows of
    the base the others are copied from."""

    todo: dict  # split -> file numbers to compute, ascending
    base_rows: dict  # split -> {file number: row of the base}
    change: Change | None = None  # None: a fresh extraction


def fresh_plan(blocks: dict) -> Plan:
    return Plan({s: np.asarray(blocks[s], dtype=np.int64) for s in SPLITS}, {s: {} for s in SPLITS})


def update_plan(base: FeatureCache, lists: dict, blocks: dict, is_val: np.ndarray) -> Plan:
    """What to compute and copy to bring `base` (same settings, other images) up to `lists`;
    `blocks` are this run's file numbers per split (all of them unless sharded)."""
    change, todo, base_rows = Change(), {}, {}
    skipped = {_resolved(line.split("\t")[0]) for line in base.skipped}
    for split in SPLITS:
        images, block = lists[split], blocks[split]
        ids = base.ids if split == "labelled" else base.test_ids
        hashes = base.column(split, "sha256")
        if hashes is None or len(hashes) != len(ids):
            raise CacheError(f"{base.path} records no file contents; rerun extract-features with --force")
        where = {image_id: (row, sha) for row, (image_id, sha) in enumerate(zip(ids, hashes))}
        here, todo[split], base_rows[split] = set(), [], {}
        for i in block:
            image_id, sha = images.ids[i], images.sha256[i]
            here.add(image_id)
            row, old = where.get(image_id, (None, None))
            if old == sha and sha:
                base_rows[split][i] = row
                continue
            todo[split].append(i)
            if old is not None:
                change.changed[split] += 1
            elif _resolved(images.paths[i]) in skipped:
                change.retried[split] += 1
            else:
                change.added[split] += 1
        change.removed[split] = sum(1 for image_id in ids if image_id not in here)
        todo[split] = np.asarray(todo[split], dtype=np.int64)
    kept = np.fromiter(base_rows["labelled"].keys(), np.int64)
    rows = np.fromiter(base_rows["labelled"].values(), np.int64)
    names = np.asarray(lists["labelled"].classes, dtype=object)
    change.relabelled = int(np.sum(names[kept] != np.asarray(base.classes, dtype=object)[base.labels[rows]]))
    change.moved = int(np.sum(is_val[kept] != base.is_val[rows]))
    return Plan(todo, base_rows, change)


def _resolved(path) -> str:
    return str(Path(path).resolve())


def merged_pass(base: FeatureCache, split: str, pass_index: int, out_files, base_rows: dict,
                computed, shape, dtype, key: str = "features"):
    """A callable streaming one pass of the updated cache as (rows, block) in row order
    (cache.write_cache's contract). Row r holds the image with file number out_files[r]: copied
    from the base when base_rows has it, else taken from `computed`, a callable yielding
    (file numbers, block) of the computed images in ascending order (one saved batch at a time)."""
    out_files = np.asarray(out_files, dtype=np.int64)
    from_base = np.array([base_rows.get(int(i), -1) for i in out_files], dtype=np.int64)
    row_bytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    step = max(1, min(COPY_ROWS, COPY_BYTES // row_bytes))

    def chunks():
        pending = iter(computed())
        carry_files, carry = np.zeros(0, np.int64), np.zeros((0, *shape), dtype)
        for start in range(0, len(out_files), step):
            stop = min(len(out_files), start + step)
            block = np.empty((stop - start, *shape), dtype)
            copied = from_base[start:stop] >= 0
            if copied.any():
                block[copied] = base.read_rows(split, pass_index, from_base[start:stop][copied], key)
            wanted = out_files[start:stop][~copied]
            while len(wanted) and (not len(carry_files) or carry_files[-1] < wanted[-1]):
                files, values = next(pending, (None, None))
                if files is None:
                    break
                carry_files, carry = np.concatenate([carry_files, files]), np.concatenate([carry, values])
            take = np.isin(carry_files, wanted)
            if int(take.sum()) != len(wanted):
                raise CacheError(f"pass {pass_index} of the computed {split} images is inconsistent; "
                                 "rerun extract-features with --force")
            block[~copied] = carry[take]
            carry_files, carry = carry_files[~take], carry[~take]
            yield np.arange(start, stop), block
    return chunks


def updates_after(base: FeatureCache, fingerprint: dict, change: Change) -> list:
    """The base's update history with this update appended (FeatureCache.updates)."""
    lists = ("file_list", "test_file_list")
    return [*base.updates, {"from": {k: base.fingerprint.get(k) for k in lists},
                            "to": {k: fingerprint.get(k) for k in lists},
                            "labelled": change.describe("labelled"), "test": change.describe("test")}]


def changes_since(cache: FeatureCache, recorded: dict) -> str | None:
    """How the labelled images of `cache` changed since the cache a model recorded
    ('+500 images, 3 relabelled; then 2 removed'), or None when its history does not say."""
    current, target, told = recorded.get(LABELLED_LIST[0]), cache.fingerprint.get(LABELLED_LIST[0]), []
    for update in cache.updates:
        if update["from"].get("file_list") == current and update["to"].get("file_list") != current:
            told.append(update["labelled"] or "images reordered")
            current = update["to"]["file_list"]
    return "; then ".join(told) if told and current == target else None
