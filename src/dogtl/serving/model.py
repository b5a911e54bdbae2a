"""A trained dogtl model as deployment sees it: one Keras model on images, its class names,
and how one encoded image becomes the model's input(s).

Every deployment path (SavedModel, TFLite, ONNX, OpenVINO, `dogtl serve`) goes through
`encoded_to_inputs`, `encoded_to_pixels` or `pixels_to_inputs`, which call the same
decode/resize (`data.images.decode_image`) and backbone preprocessing
(`data.images.preprocess_fn`) as `dogtl predict`, so they see the same pixels. A model with
several image inputs (one per backbone) lists one `ImageInput` each; these functions return one
tensor per input, in the model's input order.

An ONNX or OpenVINO export (serving/export.py) is `pixel_model`: decoded float RGB pixels
(0-255, each input at its own size) in, the backbone's preprocessing inside, probabilities out;
`dogtl serve` runs that same model, converted for its --runtime or read from the exported file.
`load_serving_model` loads either kind of file as a ServingModel.

TensorFlow and Keras are imported in the functions that use them: the web app and the bot
import this module for its types before any model is loaded.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from dogtl.core.backbones import BackboneSpec, get_backbone
from dogtl.core.errors import DogtlError
from dogtl.core.metadata import ModelMetadata, metadata_path
from dogtl.data.images import decode_image, preprocess_fn


EXPORT_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}


@dataclass(frozen=True)
class ImageInput:
    """One image input of the model: the backbone whose preprocessing it takes, at `size` px."""
    spec: BackboneSpec
    size: int


@dataclass
class ServingModel:
    model: object  # keras.Model on preprocessed images; None for an ONNX/OpenVINO export
    classes: list[str]
    inputs: tuple[ImageInput, ...]
    name: str
    path: Path
    metadata: ModelMetadata | None  # None for an ONNX/OpenVINO export (its own .json: serving/export.py)

    @property
    def size(self) -> int:
        """The image size a client sends to TFLite (the largest input's; others are resized)."""
        return max(i.size for i in self.inputs)

    exported: str | None = None  # 'onnx' or 'openvino': `path` is such an export (dogtl export)

    def call(self, inputs):
        """Probabilities [N, C] for a tuple of preprocessed input batches."""
        return self.model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)


def encoded_to_inputs(data, inputs: tuple[ImageInput, ...]):
    """One encoded image (a scalar tf.string) -> the model's preprocessed inputs, exactly as
    `dogtl predict` computes them from the file."""
    return tuple(preprocess(decode_image(data, i.size)) for i, preprocess in zip(inputs, _preprocessors(inputs)))


def encoded_to_pixels(data, inputs: tuple[ImageInput, ...]):
    """One encoded image -> decoded float RGB pixels at each input's size (`pixel_model`'s inputs)."""
    return tuple(decode_image(data, i.size) for i in inputs)


def pixel_model(sm: ServingModel):
    """pixels (float RGB 0-255, one input per image input, at its size) -> probabilities: the
    backbones' preprocessing as layers in front of the model (what ONNX/OpenVINO exports hold)."""
    import keras

    pixels = [keras.Input((i.size, i.size, 3), name=f"pixels_{k}" if len(sm.inputs) > 1 else "pixels")
              for k, i in enumerate(sm.inputs)]
    prepared = [keras.layers.Lambda(f, name=f"preprocess_{k}")(x)
                for k, (x, f) in enumerate(zip(pixels, _preprocessors(sm.inputs)))]
    outputs = sm.model(prepared[0] if len(prepared) == 1 else prepared, training=False)
    return keras.Model(pixels[0] if len(pixels) == 1 else pixels, outputs, name=f"{sm.name}_on_pixels")


def pixels_to_inputs(pixels, inputs: tuple[ImageInput, ...]):
    """A batch of uint8 RGB images [N, s, s, 3] -> the model's preprocessed inputs (TFLite's
    input: the client has decoded and resized the image already)."""
    import tensorflow as tf

    image = tf.cast(pixels, tf.float32)
    out = []
    for i, preprocess in zip(inputs, _preprocessors(inputs)):
        x = image if image.shape[1] == i.size else tf.image.resize(image, [i.size, i.size], antialias=True)
        out.append(preprocess(x))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _preprocessors(inputs: tuple[ImageInput, ...]):
    """The backbones' preprocess_input functions, looked up once outside any traced function."""
    return tuple(preprocess_fn(i.spec) for i in inputs)


def load_serving_model(path: str | Path, weights: str | None = None) -> ServingModel:
    """A fine-tuned model, or a head composed with the backbone(s) its features came from
    (an ensemble of them too), or an ONNX/OpenVINO export of one."""
    from dogtl.evaluation.inference import load_image_model  # local: Keras, only once a model loads

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


def load_exported(path: str | Path) -> ServingModel:
    """An ONNX / OpenVINO export of `dogtl export` as a ServingModel (no Keras model inside);
    its .json is the export's own (serving/export.py writes it), not a model's metadata."""
    path = Path(path)
    if not path.is_file():
        raise DogtlError(f"{path}: no such model file")
    try:
        meta = json.loads(metadata_path(path).read_text())
        inputs = tuple(ImageInput(get_backbone(i["backbone"]), int(i["size"])) for i in meta["inputs"])
        classes = [str(c) for c in meta["classes"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DogtlError(f"{path}: cannot read its metadata {metadata_path(path)} ({e}); export the model again "
                         "with dogtl export") from None
    return ServingModel(model=None, classes=classes, inputs=inputs, name=str(meta.get("name") or path.stem),
                        path=path, metadata=None, exported=EXPORT_SUFFIXES[path.suffix])


def encoded_batch_fn(sm: ServingModel, top_k: int = 5):
    """images (tf.string [N], encoded files) -> {probabilities [N, C], classes [N, k], scores [N, k]}:
    the SavedModel's serving signature, with the class names inside the graph."""
    import tensorflow as tf

    k = min(int(top_k), len(sm.classes))
    specs = tuple(tf.TensorSpec([i.size, i.size, 3], tf.float32) for i in sm.inputs)

    def serve(images):
        inputs = tf.map_fn(lambda data: encoded_to_inputs(data, sm.inputs), images, fn_output_signature=specs)
        probabilities = sm.call(inputs)
        top = tf.math.top_k(probabilities, k=k)
        classes = tf.constant(sm.classes, dtype=tf.string)
        return {"probabilities": probabilities, "classes": tf.gather(classes, top.indices), "scores": top.values}

    return serve
