"""The feature cache: the only code that touches its files.

While extracting, finished batches are saved as small files in `<cache>.partial/`,
each written to a temporary name and renamed, so a kill at any moment loses at most
the batch in flight. When every pass is done they are streamed, one part file
at a time, into one HDF5 file written as `<cache>.tmp` and renamed: a file at the cache
path is always complete, and memory never holds more than one batch of features.

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

import json
import re
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogtl.core.errors import CacheError, DamagedError, SettingError
from dogtl.core.files import atomic_path, write_text_atomic
from dogtl.core.temporaries import fixed_temporary, progress_folder

FORMAT = "dogtl-features"
FORMAT_VERSION = 2
SPLITS = ("labelled", "test")
STRING_COLUMNS = ("ids", "sha256")  # the per-row datasets stored as strings
RESUME_HINT = "incomplete, run extract-features again to resume"
DAMAGED_HINT = "damaged: rerun extract-features --force"
CHECKSUM = {"fletcher32": True}  # create_dataset options of every numeric dataset
DIGESTED_ATTRS = ("format", "format_version", "fingerprint", "versions", "weights_path", "merged_from", "updates")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Settings that do not change the features: differences are reported, never refused. The runtime
# gives the same features to float rounding (docs/runtimes.md), as TensorFlow does on another CPU.
INFORMATIONAL = {"versions", "batch_size", "runtime"}
# The fingerprint's image lists: labelled (what a head learnt from) and test. A cache that
# differs from the data folder only in these is updated incrementally.
LABELLED_LIST = ("file_list", "num_images")
TEST_LIST = ("test_file_list", "num_test_images")
IMAGE_LISTS = LABELLED_LIST + TEST_LIST
IMAGE_KEY = "image id"  # fingerprint["image_key"]: what augmentation and the split are keyed by
# Settings older caches do not record, and the value they had.
_DEFAULTS = {"precision": "float32", "image_key": "file number"}
_HINTS = {"file_list": " (labelled images, labels or files changed)", "num_images": " (labelled images)",
          "test_file_list": " (test images or files changed)", "num_test_images": " (test images)",
          "image_key": " (what augmentation and the validation split are keyed by)"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _comparable(key: str, value):
    if value is None and key in _DEFAULTS:
        return _DEFAULTS[key]
    # A local weights file is identified by its content; its name may change.
    if key == "weights" and isinstance(value, str) and value.startswith("file:"):
        return value.rsplit(":sha256:", 1)[-1]
    return value


def fingerprint_differences(stored: dict, wanted: dict, ignore=()) -> list[str]:
    """One 'setting: cache has X, now Y' line per setting that changes the features (and is
    not in `ignore`)."""
    stored, wanted = _flat(stored), _flat(wanted)
    keys = sorted(k for k in set(stored) | set(wanted) if k.split(".")[0] not in INFORMATIONAL and k not in ignore)

    def shown(d, k):
        return d.get(k, _DEFAULTS.get(k))

    return [f"{k}{_HINTS.get(k, '')}: cache has {shown(stored, k)!r}, now {shown(wanted, k)!r}"
            for k in keys if _comparable(k, stored.get(k)) != _comparable(k, wanted.get(k))]


def partial_dir(path: Path) -> Path:
    return progress_folder(path)


class PartialCache:
    """Finished batches of an extraction in progress, as crash-safe .npz files."""

    PART = re.compile(r"^(labelled|test)-p(\d+)-(\d{9})-(\d{9})\.npz$")

    def __init__(self, path: Path):
        self.dir = partial_dir(path)

    def exists(self) -> bool:
        return (self.dir / "fingerprint.json").exists()

    def start(self, fingerprint: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir / "fingerprint.json", json.dumps(fingerprint, sort_keys=True, indent=1),
                          durable=True)

    def fingerprint(self) -> dict:
        try:
            return json.loads((self.dir / "fingerprint.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{self.dir}: damaged progress files ({e}); rerun with --force to start over") from None

    def _parts(self, split: str, pass_index: int) -> list[tuple[int, int, Path]]:
        parts = []
        for p in self.dir.iterdir():
            m = self.PART.match(p.name)
            if m and m[1] == split and int(m[2]) == pass_index:
                parts.append((int(m[3]), int(m[4]), p))
        return sorted(parts)

    def covered(self, split: str, pass_index: int) -> int:
        """Every position before this one is done (saved, or found unreadable)."""
        return max((end for _, end, _ in self._parts(split, pass_index)), default=0)

    def write(self, split: str, pass_index: int, positions: np.ndarray, features: np.ndarray, **extra) -> None:
        start, end = int(positions[0]), int(positions[-1]) + 1
        name = f"{split}-p{pass_index}-{start:09d}-{end:09d}.npz"
        # Not durable: once renamed, a batch survives any kill of this process (the kernel holds it),
        # and fsyncing every batch stalls the model on a busy disk. A batch damaged by an OS crash
        # fails its zip CRC check when read and is then removed and redone. The fixed temporary
        # name lets the batch a killed run was writing be overwritten when it is redone.
        with atomic_path(self.dir / name, tmp=fixed_temporary(self.dir / name)) as tmp, open(tmp, "wb") as f:
            np.savez(f, positions=positions, features=features, **extra)

    def _load(self, part: Path, *keys):
        try:
            with np.load(part) as z:
                return tuple(z[k] for k in keys)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            part.unlink(missing_ok=True)  # a damaged batch is simply redone on the next run
            raise CacheError(f"{part}: damaged batch removed ({e}); {RESUME_HINT}") from None

    def positions(self, split: str, pass_index: int) -> np.ndarray:
        """The saved positions of one pass, in order (features are not read)."""
        chunks = [self._load(p, "positions")[0] for _, _, p in self._parts(split, pass_index)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)

    def iter_pass(self, split: str, pass_index: int, key: str = "features"):
        """(positions, features) (or another saved array) of one pass, one saved batch at a time, in order."""
        for _, _, p in self._parts(split, pass_index):
            yield self._load(p, "positions", key)

    def save_json(self, name: str, value) -> None:
        write_text_atomic(self.dir / name, json.dumps(value), durable=True)

    def load_json(self, name: str):
        p = self.dir / name
        return json.loads(p.read_text()) if p.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def space_needed(path: Path, fingerprint: dict, computed: tuple[int, int], stored: tuple[int, int]) -> int:
    """Bytes an extraction still needs on disk: the batch files of the (labelled, test) images it
    computes, less those already saved, and the cache file of all the images it stores, which
    they (and an updated cache's rows) are copied into at the end; the old cache stays until the
    final rename, so its room is not counted as free."""
    def size(images: int, test_images: int) -> int:
        item = np.dtype(fingerprint.get("dtype", "float32")).itemsize
        image_passes = (1 + int(fingerprint["passes"])) * images + (1 + int(fingerprint["tta_passes"])) * test_images
        features = item * int(fingerprint["feature_dim"]) * image_passes
        if fingerprint.get("cut"):  # activations entering the top blocks (features/cut.py)
            from dogtl.features.cut import cut_bytes

            features += cut_bytes(fingerprint["cut"], image_passes)
        return features

    folder = partial_dir(path)
    saved = sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0
    return max(0, size(*computed) - saved) + size(*stored)


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


def content_digest(f) -> str:
    """SHA-256 of what fletcher32 cannot cover: the digested attributes and every string dataset."""
    import hashlib

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

    from dogtl.features.cut import stored_layout

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


class CacheShapes:
    """What the shapes {split: (passes, rows, dim)} say, for one cache or several side by side."""

    @property
    def num_passes(self) -> int:
        """Labelled passes, clean included."""
        return self.shapes["labelled"][0]

    @property
    def num_test_passes(self) -> int:
        return self.shapes["test"][0]

    @property
    def feature_dim(self) -> int:
        return self.shapes["labelled"][2]


@dataclass
class FeatureCache(CacheShapes):
    """A complete cache, opened for reading. Features are read on demand."""

    path: Path
    fingerprint: dict
    versions: dict
    classes: list[str]
    ids: np.ndarray
    labels: np.ndarray
    is_val: np.ndarray
    test_ids: np.ndarray
    skipped: list[str]
    shapes: dict = field(default_factory=dict)
    weights_path: str | None = None  # where a local weights file was at extraction (not in the fingerprint)
    format_version: int = FORMAT_VERSION
    # The incremental updates that led to this cache, oldest first: {"from": {file_list, test_file_list}
    # before, "to": {...} after, "labelled": "+500 images, 3 relabelled, ...", "test": "..."}. Empty for a
    # fresh extraction (features/incremental.py).
    updates: list = field(default_factory=list)

    def column(self, split: str, name: str) -> np.ndarray | None:
        """A per-row dataset of `split` ("index", "key", "sha256", ...); None when this cache has none."""
        import h5py

        with h5py.File(self.path, "r") as f:
            if name not in f[split]:
                return None
            ds = f[split][name]
            return ds.asstr()[:] if name in STRING_COLUMNS else read_block(self.path, ds, slice(None))

    def augmentation_keys(self, split: str = "labelled") -> np.ndarray | None:
        """The key augmented pass p of each row was drawn with: `key` (format 2), or `index` (format
        1: the file number at extraction); None for a cache holding neither."""
        keys = self.column(split, "key")
        return self.column(split, "index") if keys is None else keys

    def read_rows(self, split: str, pass_index: int, rows, key: str = "features") -> np.ndarray:
        """Pass `pass_index` of the given rows (any order) of `features` or another per-pass dataset:
        one read of the span they cover when they are near each other, else one read per row."""
        import h5py

        rows = np.asarray(rows, dtype=np.int64)
        with h5py.File(self.path, "r") as f:
            ds = f[split][key]
            if not len(rows):
                return np.empty((0, *ds.shape[2:]), ds.dtype)
            lo, hi = int(rows.min()), int(rows.max()) + 1
            if hi - lo <= 2 * len(rows) + 64:
                return read_block(self.path, ds, pass_index, slice(lo, hi))[rows - lo]
            return np.stack([read_block(self.path, ds, pass_index, int(r)) for r in rows])

    def features(self, split: str = "labelled", passes=None) -> np.ndarray:
        """float32 features [passes, rows, dim] of `split` ("labelled" or "test")."""
        import h5py

        if split not in SPLITS:
            raise SettingError(f"split must be one of {SPLITS}, not {split!r}")
        total = self.shapes[split][0]
        wanted = list(range(total)) if passes is None else [int(p) for p in passes]
        bad = [p for p in wanted if not 0 <= p < total]
        if bad:
            raise SettingError(f"{self.path}: {split} features have passes 0..{total - 1}, not {bad}")
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[split]["features"]
                out = np.empty((len(wanted), ds.shape[1], ds.shape[2]), np.float32)
                for k, p in enumerate(wanted):
                    out[k] = ds[p]
        except (OSError, KeyError) as e:
            raise DamagedError(f"{self.path}: {DAMAGED_HINT} (reading {split} features: {str(e)[:120]})") from None
        return out


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


def open_cache(path: str | Path) -> FeatureCache:
    """Open a complete cache, or raise CacheError saying what is wrong and what to do."""
    import h5py

    path = Path(path)
    if not path.exists():
        if PartialCache(path).exists():
            raise CacheError(f"{path}: {RESUME_HINT}")
        raise CacheError(f"{path}: no feature cache there; run `dogtl extract-features` first (or pass --cache FILE)")
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a feature cache: pass --cache FILE")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CacheError(f"{path}: not a dogtl feature cache; pass the file written by extract-features")
            if not f.attrs.get("complete", False):
                raise CacheError(f"{path}: {RESUME_HINT}")
            cache = FeatureCache(
                path=path,
                fingerprint=json.loads(f.attrs["fingerprint"]),
                versions=json.loads(f.attrs["versions"]),
                classes=list(f["classes"].asstr()[:]),
                ids=f["labelled/ids"].asstr()[:],
                labels=f["labelled/labels"][:],
                is_val=f["labelled/is_val"][:].astype(bool),
                test_ids=f["test/ids"].asstr()[:],
                skipped=list(f["skipped"].asstr()[:]),
                shapes={s: f[s]["features"].shape for s in SPLITS},
                weights_path=f.attrs.get("weights_path"),
                format_version=int(f.attrs.get("format_version", 1)),
                updates=json.loads(f.attrs.get("updates", "[]")),
            )
            _check_sources(path, f)
            stored = f.attrs.get("content_sha256")
            if stored is not None and stored != content_digest(f):
                raise DamagedError(f"{path}: {DAMAGED_HINT} (its attributes or image ids changed since it was written)")
    except CacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        if not is_cache_file(path):
            raise CacheError(f"{path}: not a dogtl feature cache; pass the file written by extract-features") from None
        raise CacheError(f"{path}: damaged or {RESUME_HINT} ({str(e)[:120]})") from None
    _check_consistent(cache)
    return cache


def _check_sources(path: Path, f) -> None:
    """A cache merged from shards as virtual datasets (shards.py) reads them in place: a missing
    shard would read as fill values, so it is refused here. Relative names are beside `path`."""
    for split in SPLITS:
        ds = f[split]["features"]
        if ds.is_virtual:
            for source in {m.file_name for m in ds.virtual_sources()}:
                if source != "." and not (path.parent / source).exists():
                    raise CacheError(f"{path} reads its features from the shard {path.parent / source}, which is "
                                     "missing: put it back, or merge the shards again with --copy")


def _check_consistent(c: FeatureCache) -> None:
    fp = c.fingerprint
    want = {"labelled": (1 + fp.get("passes", c.num_passes - 1), len(c.ids), fp.get("feature_dim")),
            "test": (1 + fp.get("tta_passes", c.num_test_passes - 1), len(c.test_ids), fp.get("feature_dim"))}
    problems = [f"{s}/features is {tuple(c.shapes[s])}, expected {want[s]}"
                for s in SPLITS if tuple(c.shapes[s]) != want[s]]
    if len(c.labels) != len(c.ids) or len(c.is_val) != len(c.ids):
        problems.append("labels, is_val and ids differ in length")
    if len(c.labels) and (c.labels.min() < 0 or c.labels.max() >= len(c.classes)):
        problems.append("labels out of range of classes")
    if problems:
        raise CacheError(f"{c.path}: damaged or {RESUME_HINT} ({'; '.join(problems)})")
