"""Writing files so that a crash leaves the old file or the new one, never half of one,
and refusing to overwrite what a user made unless they say --force.

Every artifact dogtl writes (models, metadata, CSV and JSON reports, plots, sweep records)
goes through `atomic_path`: the content is written to a temporary sibling (same folder, so
the final rename stays on one file system) and renamed over the target at the end.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from dogtl.core.errors import DogtlError


def temporary_sibling(path: str | Path) -> Path:
    """A name beside `path`, unique to this process, keeping its suffix (Keras and matplotlib
    pick the format from it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, value, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=True, default=_json_default))


def write_csv_atomic(frame, path: str | Path, **kwargs) -> None:
    """A pandas DataFrame as CSV, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **kwargs)


def check_overwrite(path: str | Path, force: bool, option: str = "--out") -> Path:
    """Refuse to replace an existing file without --force (before any work is done)."""
    path = Path(path)
    if path.exists() and not force:
        raise DogtlError(f"{path} exists: pass --force to overwrite it or choose another {option}")
    return path
