"""What a saved model expects as input, checked before any image is read.

Head and fine-tuned models carry metadata (core.metadata): the backbone(s), weights, image
size and preprocessing their inputs come from, and the cache (with its validation split)
they were trained on. These checks turn a mismatch into one clear line. Finding the model's
cache and backbone weights again needs the feature stage: features/modelcache.py and
features/modelweights.py.
"""

from __future__ import annotations

from pathlib import Path

from dogtl.core.backbones import BackboneSpec, get_backbone
from dogtl.core.errors import DogtlError
from dogtl.core.metadata import BackboneInput, ModelMetadata

KINDS = ("head", "finetuned")
REQUIRED = ("classes", "backbone", "image_size", "preprocessing", "feature_dim", "weights")


def check_metadata(path: str | Path, kinds=KINDS) -> tuple[ModelMetadata, BackboneSpec, int]:
    """(metadata, first backbone's spec, its image size) of a model file, or a DogtlError naming the problem."""
    meta = ModelMetadata.load(path)
    if meta.kind not in kinds:
        raise DogtlError(f"{path}: a {meta.kind!r} model, but a {' or '.join(kinds)} model is needed here")
    first = meta.backbones[0] if meta.backbones else BackboneInput()
    missing = [k for k in REQUIRED if (meta.classes if k == "classes" else getattr(first, k)) is None]
    if missing:
        raise DogtlError(f"{path}: metadata lacks {', '.join(missing)}; retrain the model with this dogtl")
    checked = [_check_backbone(path, entry) for entry in meta.backbones]  # a multi-backbone head: every one
    spec, size = checked[0]
    return meta, spec, size


def _check_backbone(path, entry: BackboneInput) -> tuple[BackboneSpec, int]:
    try:
        spec = get_backbone(entry.backbone)
    except ValueError as e:
        raise DogtlError(f"{path}: {e}") from None
    size = int(entry.image_size)
    if size < spec.min_size:
        raise DogtlError(f"{path}: image size {size} is too small for {spec.name} (at least {spec.min_size}); "
                         "the model does not match its backbone")
    if entry.preprocessing != spec.preprocessing:
        raise DogtlError(f"{path}: recorded preprocessing {entry.preprocessing} is not {spec.name}'s "
                         f"({spec.preprocessing}); the model does not match its backbone")
    if int(entry.feature_dim) != spec.feature_dim:
        raise DogtlError(f"{path}: recorded feature size {entry.feature_dim} but {spec.name} gives "
                         f"{spec.feature_dim}; the model does not match its backbone")
    return spec, size


def check_model_matches(model, meta: ModelMetadata, path) -> None:
    """The loaded Keras model has the input and output sizes its metadata promises."""
    if isinstance(model.input, (list, tuple, dict)):  # one image input per backbone: see models.compose
        return
    inputs = model.input.shape
    outputs = model.output.shape[-1]
    first = meta.backbones[0]
    if meta.kind == "head":
        want = (int(meta.feature_dim),)
        have = tuple(inputs[1:])
    else:
        want = (int(first.image_size), int(first.image_size), 3)
        have = tuple(inputs[1:])
    if have != want:
        raise DogtlError(f"{path}: the model takes inputs of shape {have} but its metadata says {want} "
                         f"({first.backbone} at {first.image_size} px); the files do not belong together")
    if outputs != len(meta.classes):
        raise DogtlError(f"{path}: the model has {outputs} outputs but its metadata lists "
                         f"{len(meta.classes)} classes; the files do not belong together")


def weights_path_to_record(weights: str) -> str | None:
    """Where a local weights file is, recorded beside its identity so that later stages find
    it again; None for 'imagenet' and 'none'."""
    return None if weights in ("imagenet", "none") else str(Path(weights).resolve())
