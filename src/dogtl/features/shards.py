"""Sharded extraction for many machines without a cluster manager, and merging the shards.

`extract-features --shard I/N` extracts the I-th of N contiguous, disjoint blocks of the
labelled images (and of the test images) into a complete cache of its own, beside the cache
it is part of (`features.h5` -> `features.shard-I-of-N.h5`). Its fingerprint is that of the
whole extraction plus {"shard": {"index": I, "count": N}}, and augmented pass p of image i
is keyed by i's number in the whole data folder, so every shard's numbers are those of an
unsharded run. Each shard computes the validation split over the whole data folder too.

`merge_caches` joins one complete set of shards into one cache, equal to the cache a single
machine would have written: the rows of the shards in order, the split unchanged, the
skipped images in the single run's order. "virtual" mode writes an HDF5 virtual dataset that
reads the shards' features in place (seconds, no copy; the shards must stay beside it);
"copy" mode copies them, one block at a time, into a self-contained file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dogtl.features.cache import open_cache
from dogtl.features.cacheformat import SPLITS, STRING_COLUMNS, read_block
from dogtl.features.cachewriter import cache_file_writer, create_numeric, write_cache
from dogtl.features.fingerprint import fingerprint_differences
from dogtl.features.cut import stored_layout
from dogtl.core.errors import CacheError, DogtlError, SettingError
from dogtl.core.files import check_overwrite
from dogtl.core.locks import hold, writes

SHARD_NAME = re.compile(r"^(?P<stem>.*)\.shard-(?P<index>\d+)-of-(?P<count>\d+)$")
COPY_BLOCK = 4096  # rows copied at a time in copy mode
COPY_BYTES = 64 << 20  # at most this much per block (cut activations are ~0.5 MB a row)


@dataclass(frozen=True)
class Shard:
    index: int  # 1..count
    count: int

    def __post_init__(self):
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise DogtlError(f"--shard {self.index}/{self.count}: use I/N with 1 <= I <= N (shards count from 1)")

    def rows(self, n: int) -> range:
        """This shard's block of n images: the same split of 0..n-1 on every machine."""
        return range((self.index - 1) * n // self.count, self.index * n // self.count)

    def as_dict(self) -> dict:
        return {"index": self.index, "count": self.count}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
    """'I/N' -> Shard (None for None or '')."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise DogtlError(f"--shard {text!r}: write it as I/N, e.g. --shard 1/4 for the first of four shards")
    return Shard(int(m[1]), int(m[2]))


def shard_path(cache: str | Path, shard: Shard) -> Path:
    """cache/features.h5 -> cache/features.shard-I-of-N.h5"""
    cache = Path(cache)
    return cache.with_name(f"{cache.stem}.shard-{shard.index}-of-{shard.count}{cache.suffix}")


def merged_path(shard_file: str | Path) -> Path:
    """cache/features.shard-I-of-N.h5 -> cache/features.h5 (the default --out of merge-cache)."""
    shard_file = Path(shard_file)
    m = SHARD_NAME.match(shard_file.stem)
    if not m:
        raise DogtlError(f"{shard_file}: not named like a shard (NAME.shard-I-of-N.h5): pass --out FILE")
    return shard_file.with_name(m["stem"] + shard_file.suffix)


@dataclass
class MergeSummary:
    path: Path
    mode: str
    shards: int
    images: int
    test_images: int
    skipped: int
    file_bytes: int


@dataclass
class _Part:
    shard: Shard
    cache: object  # FeatureCache
    index: dict  # split -> int64 image numbers in the whole data folder
    skipped: dict  # split -> list of "path<TAB>reason"


def _open_shards(paths) -> list[_Part]:
    """The shards, sorted, after refusing foreign, duplicate, missing and damaged ones."""
    import h5py

    if not paths:
        raise DogtlError("merge-cache needs the shard files: dogtl merge-cache cache/features.shard-*-of-N.h5")
    parts, first = [], None
    for path in map(Path, paths):
        cache = open_cache(path)  # refuses missing, unfinished and damaged files, naming them
        info = cache.fingerprint.get("shard")
        if not info:
            raise CacheError(f"{path} is a whole cache, not a shard (extracted without --shard): nothing to merge")
        shard = Shard(int(info["index"]), int(info["count"]))
        if first is None:
            first = (path, cache, shard)
        elif shard.count != first[2].count:
            raise CacheError(f"{path} is shard {shard} but {first[0]} is shard {first[2]}: merge the shards of "
                             "one extraction (the same --shard I/N count)")
        else:
            diff = fingerprint_differences({**first[1].fingerprint, "shard": None}, {**cache.fingerprint, "shard": None})
            if diff:
                raise CacheError(f"{path} is a shard of another extraction than {first[0]} "
                                 f"({'; '.join(diff[:3])}): merge the shards of one extract-features command")
        fp = cache.fingerprint
        expected = {"labelled": shard.rows(int(fp["num_images"])), "test": shard.rows(int(fp["num_test_images"]))}
        with h5py.File(path, "r") as f:
            index = {s: read_block(path, f[s]["index"], slice(None)).astype(np.int64) for s in SPLITS}
        for s in SPLITS:
            r = expected[s]
            if len(index[s]) and (index[s].min() < r.start or index[s].max() >= r.stop or np.any(np.diff(index[s]) <= 0)):
                raise CacheError(f"{path}: its {s} rows are not those of shard {shard}; extract it again with --force")
        n_skipped = len(expected["labelled"]) - len(index["labelled"])
        if not 0 <= n_skipped <= len(cache.skipped):
            raise CacheError(f"{path}: its list of skipped images does not match its rows; extract it again with --force")
        skipped = {"labelled": cache.skipped[:n_skipped], "test": cache.skipped[n_skipped:]}
        parts.append(_Part(shard, cache, index, skipped))

    by_index = {}
    for part in parts:
        if part.shard.index in by_index:
            raise CacheError(f"shard {part.shard} given twice ({by_index[part.shard.index].cache.path} and "
                             f"{part.cache.path}): pass each shard once")
        by_index[part.shard.index] = part
    count = parts[0].shard.count
    missing = [i for i in range(1, count + 1) if i not in by_index]
    if missing:
        names = ", ".join(f"{i}/{count}" for i in missing)
        raise CacheError(f"shard{'s' if len(missing) > 1 else ''} {names} missing: run extract-features --shard "
                         f"{missing[0]}/{count} (same other options) and pass every shard file")
    return [by_index[i] for i in range(1, count + 1)]


@writes
def merge_caches(shards, out: str | Path | None = None, mode: str = "virtual", force: bool = False) -> MergeSummary:
    """Join a complete set of shard caches into one cache at `out` (see the module docstring)."""
    if mode not in ("virtual", "copy"):
        raise SettingError(f"merge mode {mode!r} must be 'virtual' or 'copy'")
    parts = _open_shards(shards)
    out = Path(out) if out is not None else merged_path(parts[0].cache.path)
    if any(out.resolve() == p.cache.path.resolve() for p in parts):
        raise DogtlError(f"--out {out} is one of the shards: pass another file name")
    if out.is_dir():
        raise DogtlError(f"--out {out} is a folder: pass a file name such as {out / 'features.h5'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    hold(out, "the merged cache")
    check_overwrite(out, force)

    first = parts[0].cache
    fingerprint = {k: v for k, v in first.fingerprint.items() if k != "shard"}
    labels = np.concatenate([p.cache.labels for p in parts]).astype(np.int32)
    if len(np.unique(labels)) < 2:
        raise CacheError("fewer than two classes have readable images in these shards: fix the images "
                         "(see --on-bad-image) and extract again")
    skipped = [line for s in SPLITS for p in parts for line in p.skipped[s]]
    arrays = {
        "labelled": {"ids": [i for p in parts for i in p.cache.ids], "labels": labels,
                     "is_val": np.concatenate([p.cache.is_val for p in parts]),
                     "index": np.concatenate([p.index["labelled"] for p in parts])},
        "test": {"ids": [i for p in parts for i in p.cache.test_ids],
                 "index": np.concatenate([p.index["test"] for p in parts])},
    }
    for split in SPLITS:  # format 2's augmentation keys and file contents
        for name in ("key", "sha256"):
            columns = [p.cache.column(split, name) for p in parts]
            if all(c is not None for c in columns):
                arrays[split][name] = np.concatenate(columns)
    if mode == "copy":
        for split in SPLITS:
            passes = parts[0].cache.shapes[split][0]
            arrays[split]["features"] = [_copy_pass(parts, split, k) for k in range(passes)]
            for key in stored_layout(fingerprint):
                arrays[split][key] = [_copy_pass(parts, split, k, key) for k in range(passes)]
        write_cache(out, fingerprint=fingerprint, versions=first.versions, classes=first.classes,
                    labelled=arrays["labelled"], test=arrays["test"], skipped=skipped,
                    weights_path=first.weights_path)
    else:
        _write_virtual(out, parts, fingerprint, first.versions, first.classes, arrays, skipped)
    merged = open_cache(out)
    return MergeSummary(out, mode, len(parts), len(merged.ids), len(merged.test_ids), len(skipped),
                        out.stat().st_size)


def _copy_pass(parts, split: str, pass_index: int, key: str = "features"):
    """A callable streaming one pass of every shard as (merged rows, block) in row order."""
    import h5py

    def chunks():
        offset = 0
        for part in parts:
            with h5py.File(part.cache.path, "r") as f:
                ds = f[split][key]
                n = ds.shape[1]
                row = int(np.prod(ds.shape[2:])) * ds.dtype.itemsize
                step = max(1, min(COPY_BLOCK, COPY_BYTES // max(1, row)))
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    yield np.arange(offset + start, offset + stop), read_block(part.cache.path, ds, pass_index,
                                                                               slice(start, stop))
                offset += n
    return chunks


def _write_virtual(out: Path, parts, fingerprint, versions, classes, arrays, skipped) -> None:
    """The cache's schema (cacheformat.py) with features as virtual datasets over the shards' files.

    Source files are recorded relative to `out`'s folder when they are beside it or below it
    (HDF5 looks for relative sources next to the merged file), else as absolute paths.
    """
    import h5py

    strings = h5py.string_dtype()
    datasets = {"features": ((int(fingerprint["feature_dim"]),), fingerprint.get("dtype", "float32")),
                **stored_layout(fingerprint)}
    with cache_file_writer(out, fingerprint, versions, classes, skipped) as f:
        f.attrs["merged_from"] = json.dumps([str(_source_name(out, p.cache.path)) for p in parts])
        for split in SPLITS:
            g = f.create_group(split)
            for key, value in arrays[split].items():
                if key in STRING_COLUMNS:
                    g.create_dataset(key, data=np.array(list(value), dtype=object), dtype=strings)
                else:
                    create_numeric(g, key, data=np.asarray(value))
            passes = parts[0].cache.shapes[split][0]
            n = len(arrays[split]["ids"])
            for key, (shape, dtype) in datasets.items():
                if n == 0:  # nothing to map: an ordinary empty dataset, as a single run writes
                    create_numeric(g, key, shape=(passes, 0, *shape), dtype=dtype)
                    continue
                layout = h5py.VirtualLayout(shape=(passes, n, *shape), dtype=dtype)
                offset = 0
                for part in parts:
                    rows = part.cache.shapes[split][1]
                    if rows:
                        source = h5py.VirtualSource(str(_source_name(out, part.cache.path)), f"{split}/{key}",
                                                    shape=(passes, rows, *shape), dtype=dtype)
                        layout[:, offset:offset + rows] = source
                    offset += rows
                # Rows whose shard went missing read as NaN, never as plausible zeros.
                g.create_virtual_dataset(key, layout, fillvalue=np.nan if dtype != "int8" else 0)


def _source_name(out: Path, source: Path) -> Path:
    folder, source = out.resolve().parent, source.resolve()
    try:
        return source.relative_to(folder)
    except ValueError:
        return source
