"""What an earlier extraction left at the cache's path: a cache that is up to date, a cache to
update (the same settings, other images), an unfinished run to resume, or something to refuse.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from dogtl.core.errors import CacheError
from dogtl.core.files import check_overwrite
from dogtl.features.cache import open_cache
from dogtl.features.cacheformat import FORMAT_VERSION, damage, is_cache_file
from dogtl.features.fingerprint import IMAGE_LISTS, fingerprint_differences
from dogtl.features.partial import PartialCache

log = logging.getLogger(__name__)


def check_existing(path: Path, partial: PartialCache, fingerprint: dict, force: bool):
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


def check_plan(partial: PartialCache, plan, lists: dict) -> str:
    """An unfinished run's batches number the images it was computing: resume them only for the
    same list (the cache it updates could have been replaced since)."""
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
