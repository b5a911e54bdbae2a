"""Writing files so that a crash leaves the old file or the new one, never half of one,
and refusing to overwrite what a user made unless they say --force.

Every file dogtl writes (models, metadata, CSV and JSON reports, plots, feature caches,
sweep records) goes through `atomic_path`: the content is written to a temporary sibling
(same folder, so the final rename stays on one file system) and renamed over the target
at the end. This module is the only place that renames a file into place; core.temporaries
names the temporaries.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dogtl.core.errors import DogtlError
from dogtl.core.locks import tidy
from dogtl.core.temporaries import temporary_sibling

@contextmanager
def atomic_path(path: str | Path, tmp: str | Path | None = None, durable: bool = False):
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed.

    `tmp` fixes the temporary name where a rerun must find or overwrite what a killed run
    left (the feature cache); `durable` fsyncs the file before the rename, for files whose
    loss in an operating-system crash would cost more than the fsync.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temporary_sibling(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if not e.filename:  # a writer that does not say which file (Keras's zip on a full disk)
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_paths(*paths: str | Path):
    """Temporary paths for files that belong together (a model and its metadata): none is
    renamed into place until every one is written, so a failed write leaves all the old files.
    (Only a crash in the microseconds between the renames could still mix old and new.)"""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MB blocks (models, weights files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)


def json_text(value, indent: int = 2) -> str:
    """dogtl's JSON: sorted keys, NumPy scalars as numbers, anything else unknown as its str."""
    return json.dumps(value, indent=indent, sort_keys=True, default=_json_default)


def write_json_atomic(path: str | Path, value, indent: int = 2, durable: bool = False) -> None:
    write_text_atomic(path, json_text(value, indent), durable=durable)


def write_csv_atomic(frame, path: str | Path, **kwargs) -> None:
    """A pandas DataFrame as CSV, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **kwargs)


def check_overwrite(path: str | Path, force: bool, option: str = "--out", detail: str = "") -> Path:
    """Refuse, before any work is done, to replace an existing file without --force; make the
    folder it goes in when there is none yet (every output, whatever the command).
    `detail` says more about what is there (" and is not a dogtl feature cache")."""
    path = Path(path)
    make_folder(path.parent, option)
    if path.is_dir():
        raise DogtlError(f"{path} is a folder: pass a file name or choose another {option}")
    if path.exists() and not force:
        tidy(path)  # a writer killed after its final rename left its lock or progress folder
        raise DogtlError(f"{path} exists{detail}: pass --force to overwrite it or choose another {option}")
    return path


def make_folder(folder: str | Path, option: str = "--out") -> Path:
    """`folder` and its parents, made if missing; a file in the way is one clear error."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DogtlError(f"{folder}: a part of this path is a file, not a folder; choose another {option}") from None
    return folder
