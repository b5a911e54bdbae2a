"""The feature cache's file format: its names, its schema, and how damage to a file is found.

The cache's files are touched only by the features/cache* modules and features/partial.py:
partial.py keeps an extraction's finished batches, cachewriter.py writes the HDF5 file,
cache.py opens it for reading, this module says what it holds and checks it.

HDF5 schema (readable with plain h5py):
  attrs:  format="dogtl-features", format_version=2, complete=True,
          fingerprint=<JSON of every setting that produced it>, versions=<JSON>,
          weights_path=<where a local --weights file was; informational, optional>,
          updates=<JSON list of the incremental updates that led to this file; optional>
  classes                 (C,)           class names, sorted; labels index into it
  labelled/ids            (N,)           image ids (Kaggle id or "<class>/<stem>")
  labelled/labels         (N,)  int32
  labelled/is_val         (N,)  bool     the validation split every later stage uses
  labelled/index          (N,)  int64    the image's number in the data folder's file list
  labelled/key            (N,)  int64    its augmentation key, a function of its id (format 2)
  labelled/sha256         (N,)           SHA-256 of the image file (format 2)
  labelled/features       (1+K, N, D)    pass 0 clean, passes 1..K augmented
  test/ids, index, key, sha256 (M,)
  test/features           (1+T, M, D)    pass 0 clean, 1..T test-time augmentation
  skipped                 (S,)           "path<TAB>reason" for images that could not be read
  <split>/cut, cut_scale  optional: activations entering the top blocks (features/cut.py)

Damage is detected: every numeric dataset carries HDF5's fletcher32 checksum (a flipped byte
fails the read, reported as damaged instead of read as numbers), and the attribute
content_sha256 is a SHA-256 of the attributes and string datasets, which HDF5 cannot filter
(checked when the cache is opened). Caches written before checksums still open.

Format 1 (dogtl before incremental caches) keyed augmentation by `index` and drew the split
over the whole file list: such caches still open and every stage reads them (the key being
`index`), but extract-features cannot update them incrementally (features/incremental.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dogtl.core.errors import DamagedError

# local: h5py is imported where a file is read or written: argument checks import this module.

FORMAT = "dogtl-features"
FORMAT_VERSION = 2
SPLITS = ("labelled", "test")
STRING_COLUMNS = ("ids", "sha256")  # the per-row datasets stored as strings
RESUME_HINT = "incomplete, run extract-features again to resume"
DAMAGED_HINT = "damaged: rerun extract-features --force"
CHECKSUM = {"fletcher32": True}  # create_dataset options of every numeric dataset
DIGESTED_ATTRS = ("format", "format_version", "fingerprint", "versions", "weights_path", "merged_from", "updates")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def content_digest(f) -> str:
    """SHA-256 of what fletcher32 cannot cover: the digested attributes and every string dataset."""
    import h5py

    h = hashlib.sha256()
    for name in DIGESTED_ATTRS:
        if name in f.attrs:
            h.update(f"{name}={f.attrs[name]}\0".encode())
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                 and h5py.check_string_dtype(obj.dtype) is not None else None)
    for name in sorted(names):
        h.update(f"{name}:".encode())
        for value in f[name].asstr()[:]:
            h.update(value.encode() + b"\0")
    return h.hexdigest()


def read_block(path: Path, ds, *where):
    """ds[where], a checksum failure (or other read error) raised as DamagedError naming `path`."""
    try:
        return ds[where if len(where) != 1 else where[0]]
    except OSError as e:
        raise DamagedError(f"{path}: {DAMAGED_HINT} (reading {ds.name}: {str(e)[:120]})") from None


def damage(path: str | Path) -> str | None:
    """Read every numeric dataset of a complete cache through its checksum: None if all are
    intact, else what failed (a whole read of the file; extract-features --force runs it)."""
    import h5py

    names = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                         and obj.dtype.kind in "biuf" and not obj.is_virtual else None)
            for name in names:
                ds = f[name]
                rows = ds.chunks[0] if ds.chunks else len(ds) if ds.shape else 1
                for start in range(0, len(ds) if ds.shape else 1, max(1, rows)):
                    read_block(Path(path), ds, slice(start, start + rows)) if ds.shape else ds[()]
    except DamagedError as e:
        return str(e)
    except OSError as e:
        return f"{path}: {DAMAGED_HINT} ({str(e)[:120]})"
    return None


def is_cache_file(path: Path) -> bool:
    """Whether the file looks like an HDF5 file (ours, possibly damaged) rather than a foreign file."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False
