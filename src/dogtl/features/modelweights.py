"""The backbone weights a saved model's features came from, found again (a local file by its hash)."""

from __future__ import annotations

from pathlib import Path

from dogtl.core.errors import DogtlError
from dogtl.core.metadata import BackboneInput
from dogtl.core.models import weights_identity
from dogtl.features.fingerprint import fingerprint_differences


def backbone_weights(entry: BackboneInput, override: str | None = None) -> str:
    """The weights argument that rebuilds the backbone the model's features came from.

    A local weights file is identified by its hash; the path it was read from is recorded
    too (`weights_path`) and used again while the file there still has that hash. A renamed
    copy is the same file, as in cache fingerprints.
    """
    recorded = entry.weights
    if override is not None:
        if not same_weights(recorded, override):
            raise DogtlError(f"--weights {override} is not the backbone the model was trained on "
                             f"({recorded}); pass that one")
        return override
    if recorded in ("imagenet", "none"):
        return recorded
    name = recorded.split(":")[1] if recorded.startswith("file:") else recorded
    path = entry.weights_path
    if not path:
        raise DogtlError(f"the model's backbone used the local weights file {name} ({recorded}); "
                         "pass it again with --weights PATH")
    if not Path(path).is_file():
        raise DogtlError(f"the model's backbone weights file {name} is no longer at {path}; "
                         "pass --weights PATH")
    if not same_weights(recorded, path):
        raise DogtlError(f"{path} is no longer the model's backbone weights file {name} ({recorded}): "
                         "its content changed; pass --weights PATH")
    return path


def same_weights(recorded: str, weights: str) -> bool:
    """Whether the weights file (or name) `weights` is the recorded one: a renamed copy is."""
    return not fingerprint_differences({"weights": recorded}, {"weights": weights_identity(weights)})
