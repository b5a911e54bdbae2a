"""Saving and loading trained models together with the metadata that binds them.

A model `models/head.keras` has its metadata beside it in `models/head.json`: what
kind of model it is, its classes, the backbone/weights/image size/preprocessing that
its inputs come from, the cache fingerprint, the settings used and final metrics.
Both files are written to temporary names before either is renamed (core.files), so a
failed save leaves the old pair.
"""

from __future__ import annotations

import json
from pathlib import Path

from dogtl.core.errors import DogtlError
from dogtl.core.files import atomic_paths, check_overwrite, json_text


def metadata_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def check_writable(path: str | Path, force: bool) -> Path:
    """A model path: refuse other suffixes (Keras needs .keras), overwriting without --force
    and a missing output folder."""
    path = Path(path)
    if path.suffix != ".keras":
        raise DogtlError(f"{path}: model files must end in .keras")
    return check_overwrite(path, force)


def save_model(model, path: str | Path, metadata: dict) -> None:
    """Write model + metadata as a pair (the caller has already checked overwriting)."""
    with atomic_paths(path, metadata_path(path)) as (model_tmp, metadata_tmp):
        model.save(model_tmp)
        metadata_tmp.write_text(json_text(metadata))


def load_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DogtlError(f"{path}: no such model file; train one first or pass --model/--head FILE")
    meta = metadata_path(path)
    if not meta.exists():
        raise DogtlError(f"{path}: its metadata {meta.name} is missing; dogtl needs both files side by side")
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise DogtlError(f"{meta}: damaged metadata ({e}); retrain the model") from None


def load_model(path: str | Path, compile: bool = True):
    """(keras model, metadata). Imports dogtl's custom objects so schedules load too.
    compile=False skips the optimizer (for models used only to predict or to build on)."""
    import keras

    from dogtl.head import schedules  # noqa: F401  registers the cyclical LR schedule with Keras

    metadata = load_metadata(path)
    try:
        model = keras.saving.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many kinds for a bad zip or config
        raise DogtlError(f"{path}: cannot load model ({str(e).splitlines()[0][:160]})") from None
    return model, metadata
