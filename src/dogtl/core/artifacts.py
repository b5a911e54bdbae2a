"""Saving and loading trained models together with the metadata that binds them.

A model `models/head.keras` has its metadata (core.metadata.ModelMetadata) beside it in
`models/head.json`. Both files are written to temporary names before either is renamed
(core.files), so a failed save leaves the old pair. The metadata records the SHA-256 of the
.keras file, checked on load (models saved before this still load).
"""

from __future__ import annotations

from pathlib import Path

from dogtl.core.errors import DamagedError, DogtlError
from dogtl.core.files import atomic_paths, check_overwrite, file_sha256
from dogtl.core.metadata import RETRAIN, ModelMetadata, metadata_path


def check_writable(path: str | Path, force: bool) -> Path:
    """A model path: refuse other suffixes (Keras needs .keras), overwriting without --force
    and a missing output folder."""
    path = Path(path)
    if path.suffix != ".keras":
        raise DogtlError(f"{path}: model files must end in .keras")
    return check_overwrite(path, force)


def save_model(model, path: str | Path, metadata: ModelMetadata) -> None:
    """Write model + metadata as a pair (the caller has already checked overwriting), with
    their content hashes in the metadata."""
    with atomic_paths(path, metadata_path(path)) as (model_tmp, metadata_tmp):
        model.save(model_tmp)
        metadata_tmp.write_text(metadata.text(model_sha256=file_sha256(model_tmp)))


def check_model_file(path: str | Path, metadata: ModelMetadata) -> None:
    """Raise DamagedError if the .keras file is not the one its metadata was saved with."""
    wanted = (metadata.integrity or {}).get("model_sha256")
    if wanted and file_sha256(path) != wanted:
        raise DamagedError(f"{path}: damaged (its content hash differs from the one in {metadata_path(path).name}); "
                           f"{RETRAIN}")


def load_model(path: str | Path, compile: bool = True):
    """(keras model, metadata). Imports dogtl's custom objects so schedules load too.
    compile=False skips the optimizer (for models used only to predict or to build on)."""
    import keras

    from dogtl.core import schedules  # noqa: F401  # local: imports Keras; registers the LR schedules with it

    metadata = ModelMetadata.load(path)
    check_model_file(path, metadata)
    try:
        model = keras.saving.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many kinds for a bad zip or config
        raise DogtlError(f"{path}: cannot load model ({str(e).splitlines()[0][:160]})") from None
    return model, metadata
