"""Writing a complete cache file: the header, every split, atomically.

Passes are streamed one batch at a time (from partial.py's saved batches, or another cache's
rows), into `<cache>.tmp`, which is renamed to the cache path when complete: a file at the
cache path is always complete, and memory never holds more than one batch of features.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dogtl.core.errors import CacheError
from dogtl.core.files import atomic_path
from dogtl.core.temporaries import fixed_temporary
from dogtl.features.cacheformat import CHECKSUM, FORMAT, FORMAT_VERSION, RESUME_HINT, STRING_COLUMNS, content_digest
from dogtl.features.cut import stored_layout

# local: h5py is imported where a file is read or written: argument checks import this module.


def _fill_pass(ds, p: int, source, n: int, dim, where: str) -> None:
    """Copy one pass into ds[p]: an array [n, dim] (dim: an int or a row shape), or (rows, block)
    chunks in row order."""
    shape = (dim,) if isinstance(dim, (int, np.integer)) else tuple(dim)
    value = source() if callable(source) else source
    if hasattr(value, "shape"):
        value = np.asarray(value)
        if value.shape != (n, *shape):
            raise ValueError(f"{where} pass {p}: features of shape {value.shape}, expected {(n, *shape)}")
        if n:
            ds[p] = value
        return
    filled = 0
    for rows, block in value:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            continue
        if rows[0] != filled or np.any(np.diff(rows) != 1) or block.shape != (len(rows), *shape):
            raise CacheError(f"{where} pass {p}: saved batches are inconsistent (rows {rows[0]}.."
                             f"{rows[-1]} after {filled}); rerun extract-features with --force")
        ds[p, filled:filled + len(rows)] = block
        filled += len(rows)
    if filled != n:
        raise CacheError(f"{where} pass {p}: {filled} of {n} rows saved; {RESUME_HINT}")


def _write_header(f, fingerprint: dict, versions: dict, classes, skipped) -> None:
    """The attributes and class/skipped lists every cache file starts with (marked incomplete)."""
    import h5py

    strings = h5py.string_dtype()
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["complete"] = False
    f.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    f.attrs["versions"] = json.dumps(versions, sort_keys=True)
    f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=strings)
    f.create_dataset("skipped", data=np.array(list(skipped), dtype=object), dtype=strings)


def create_numeric(group, name: str, **kwargs):
    """A numeric dataset with its checksum (chunked, as HDF5 filters need)."""
    return group.create_dataset(name, **CHECKSUM, **kwargs)


@contextmanager
def cache_file_writer(path: str | Path, fingerprint: dict, versions: dict, classes, skipped):
    """An open HDF5 file, its header written, for the block to add the splits to. It appears at
    `path`, marked complete and fsynced, only when the block ends without error; until then it
    is `<path>.tmp`, which the next write overwrites."""
    import h5py

    path = Path(path)
    with atomic_path(path, tmp=fixed_temporary(path), durable=True) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_header(f, fingerprint, versions, classes, skipped)
            yield f
            f.attrs["content_sha256"] = content_digest(f)
            f.attrs["complete"] = True


def write_cache(path: Path, *, fingerprint: dict, versions: dict, classes, labelled: dict,
                test: dict, skipped: list[str], weights_path: str | None = None, updates=None) -> None:
    """Write the complete cache atomically.

    `labelled`/`test` map dataset names to arrays ("ids" as strings). Their "features" entry
    is a list with one item per pass: an array [rows, dim], or a callable returning such an
    array or an iterable of (row numbers, feature block) in row order, so a pass is copied
    one batch at a time and memory does not grow with the number of images. `updates`: the
    incremental updates that led to this cache (FeatureCache.updates).
    """
    import h5py

    str_dtype = h5py.string_dtype()
    dim = int(fingerprint["feature_dim"])
    streamed = stored_layout(fingerprint)
    with cache_file_writer(path, fingerprint, versions, classes, skipped) as f:
        if weights_path:
            f.attrs["weights_path"] = weights_path
        if updates:
            f.attrs["updates"] = json.dumps(updates, sort_keys=True)
        for split, arrays in (("labelled", labelled), ("test", test)):
            g = f.create_group(split)
            n = len(arrays["ids"])
            for key, value in arrays.items():
                if key == "features" or key in streamed:
                    continue
                if key in STRING_COLUMNS:
                    g.create_dataset(key, data=np.array(list(value), dtype=object), dtype=str_dtype)
                else:
                    create_numeric(g, key, data=np.asarray(value))
            passes = arrays["features"]
            ds = create_numeric(g, "features", shape=(len(passes), n, dim),
                                  dtype=fingerprint.get("dtype", "float32"),
                                  chunks=(1, max(1, min(n, 1024)), dim) if n else None)
            for p, source in enumerate(passes):
                _fill_pass(ds, p, source, n, dim, split)
            for key, (shape, dtype) in streamed.items():  # one chunk per image: read a batch at a time
                ds = create_numeric(g, key, shape=(len(arrays[key]), n, *shape), dtype=dtype,
                                    chunks=(1, 1, *shape) if n else None)
                for p, source in enumerate(arrays[key]):
                    _fill_pass(ds, p, source, n, shape, f"{split} {key}")
