"""Saving and loading trained models together with the metadata that binds them.

A model `models/head.keras` has its metadata beside it in `models/head.json`: what
kind of model it is, its classes, the backbone/weights/image size/preprocessing that
its inputs come from, the cache fingerprint, the settings used and final metrics.
Both files are written to temporary names before either is renamed (core.files), so a
failed save leaves the old pair.

The metadata's "integrity" entry binds the pair against damage on disk (bit rot, a bad copy):
the SHA-256 of the .keras file and of the metadata itself (its JSON without that entry). Both are
checked on load; models saved before this still load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dogtl.core.errors import DamagedError, DogtlError
from dogtl.core.files import atomic_paths, check_overwrite, file_sha256, json_text, write_text_atomic


def metadata_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def check_writable(path: str | Path, force: bool) -> Path:
    """A model path: refuse other suffixes (Keras needs .keras), overwriting without --force
    and a missing output folder."""
    path = Path(path)
    if path.suffix != ".keras":
        raise DogtlError(f"{path}: model files must end in .keras")
    return check_overwrite(path, force)


INTEGRITY = "integrity"
RETRAIN = "retrain it (or copy it again from where it was made)"


def _metadata_sha256(metadata: dict) -> str:
    return hashlib.sha256(json_text({k: v for k, v in metadata.items() if k != INTEGRITY}).encode()).hexdigest()


def save_model(model, path: str | Path, metadata: dict) -> None:
    """Write model + metadata as a pair (the caller has already checked overwriting), with
    their content hashes in the metadata."""
    with atomic_paths(path, metadata_path(path)) as (model_tmp, metadata_tmp):
        model.save(model_tmp)
        metadata = {k: v for k, v in metadata.items() if k != INTEGRITY}
        metadata[INTEGRITY] = {"model_sha256": file_sha256(model_tmp), "metadata_sha256": _metadata_sha256(metadata)}
        metadata_tmp.write_text(json_text(metadata))


def rewrite_metadata(path: str | Path, metadata: dict) -> None:
    """Replace a model's metadata (a deliberate edit): the model's hash is kept, the metadata's
    own hash is made anew, so the edited pair loads."""
    old = metadata.get(INTEGRITY) or json.loads(metadata_path(path).read_text()).get(INTEGRITY) or {}
    metadata = {k: v for k, v in metadata.items() if k != INTEGRITY}
    integrity = {**old, "metadata_sha256": _metadata_sha256(metadata)}
    write_text_atomic(metadata_path(path), json_text({**metadata, INTEGRITY: integrity}))


def check_model_file(path: str | Path, metadata: dict) -> None:
    """Raise DamagedError if the .keras file is not the one its metadata was saved with."""
    wanted = (metadata.get(INTEGRITY) or {}).get("model_sha256")
    if wanted and file_sha256(path) != wanted:
        raise DamagedError(f"{path}: damaged (its content hash differs from the one in {metadata_path(path).name}); "
                           f"{RETRAIN}")


def load_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DogtlError(f"{path}: no such model file; train one first or pass --model/--head FILE")
    meta = metadata_path(path)
    if not meta.exists():
        raise DogtlError(f"{path}: its metadata {meta.name} is missing; dogtl needs both files side by side")
    try:
        metadata = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedError(f"{meta}: damaged metadata ({e}); {RETRAIN}") from None
    if not isinstance(metadata, dict):
        raise DamagedError(f"{meta}: damaged metadata (not a JSON object); {RETRAIN}")
    wanted = (metadata.get(INTEGRITY) or {}).get("metadata_sha256")
    if wanted and _metadata_sha256(metadata) != wanted:
        raise DamagedError(f"{meta}: damaged metadata (its content hash differs from the one it was saved with); "
                           f"{RETRAIN}")
    return metadata


def load_model(path: str | Path, compile: bool = True):
    """(keras model, metadata). Imports dogtl's custom objects so schedules load too.
    compile=False skips the optimizer (for models used only to predict or to build on)."""
    import keras

    from dogtl.core import schedules  # noqa: F401  # local: imports Keras; registers the LR schedules with it

    metadata = load_metadata(path)
    check_model_file(path, metadata)
    try:
        model = keras.saving.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many kinds for a bad zip or config
        raise DogtlError(f"{path}: cannot load model ({str(e).splitlines()[0][:160]})") from None
    return model, metadata
