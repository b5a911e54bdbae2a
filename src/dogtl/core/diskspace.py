"""Refusing a long write early when the disk cannot hold it, instead of failing hours in."""

from __future__ import annotations

import shutil
from pathlib import Path

from dogtl.core.errors import DiskSpaceError

MB = 1024 * 1024


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(path: str | Path, needed_bytes: int, what: str, margin: float = 1.05) -> None:
    """Raise DiskSpaceError naming `what`, the sizes and what to do unless the file system
    holding `path` has `needed_bytes` (times `margin`) free."""
    free = free_bytes(path)
    if free < needed_bytes * margin:
        raise DiskSpaceError(
            f"{what} needs about {_mb(needed_bytes)} at {path} but only {_mb(free)} are free there; "
            f"free {_mb(max(needed_bytes * margin - free, 0))} (or choose another path) and rerun the same "
            "command: finished work is kept"
        )


def _mb(size: float) -> str:
    """Megabytes, with a decimal while small (a 0.3 MB cut should not read as 0 MB)."""
    return f"{size / MB:,.1f} MB" if size < 10 * MB else f"{size / MB:,.0f} MB"
