"""A model file as deployment loads it: a dogtl .keras model (a head composed with its
backbone(s), or a fine-tuned model) or an ONNX/OpenVINO export, as one ServingModel."""

from __future__ import annotations

from pathlib import Path

from dogtl.core.errors import DogtlError
from dogtl.evaluation.predict import load_image_model
from dogtl.features.backbones import get_backbone
from dogtl.serving.export import load_exported
from dogtl.serving.model import EXPORT_SUFFIXES, ImageInput, ServingModel


def load_serving_model(path: str | Path, weights: str | None = None) -> ServingModel:
    """A fine-tuned model, or a head composed with the backbone(s) its features came from
    (an ensemble of them too), or an export of one."""
    path = Path(path)
    if path.suffix in EXPORT_SUFFIXES:
        return load_exported(path)
    if path.is_dir():
        raise DogtlError(f"{path}: a folder; pass a dogtl model file (models/finetuned.keras or "
                         "models/head.keras), not an export")
    model, meta, _, _ = load_image_model(path, weights)
    # One image input per backbone (a head on several caches has several), in the model's input order.
    inputs = tuple(ImageInput(get_backbone(b.backbone), int(b.image_size)) for b in meta.backbones)
    return ServingModel(model=model, classes=[str(c) for c in meta.classes], inputs=inputs,
                        name=str(meta.name or path.stem), path=path, metadata=meta)
