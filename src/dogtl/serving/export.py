"""`dogtl export`: a trained model as a TF Serving SavedModel, a TFLite, ONNX or OpenVINO file.

SavedModel: written at OUT/1/ (TF Serving's version folder), with a `serving_default`
signature on a batch of encoded images (tf.string); decoding, resizing, the backbone's
preprocessing and the class names are in the graph (model.encoded_batch_fn), so it runs with
plain TensorFlow and no dogtl. TFLite: a uint8 RGB image [1, size, size, 3] in, probabilities
out, the class names one a line in OUT's `.labels.txt` sibling; `check_tflite` compares it with
the Keras model on real images. ONNX / OpenVINO: `model.pixel_model` (decoded float RGB pixels,
0-255, at the model's size in; preprocessing inside; probabilities out), converted by the
runtimes' conversion cache (core/runtimes.py: Keras's own exporters, checked against TensorFlow)
and copied to OUT (.onnx; .xml + .bin), with the class names in `.labels.txt` and dogtl's
metadata (classes, inputs, name) in `.json` beside it, which `dogtl serve OUT` reads;
`check_exported` compares it with the Keras model on real images.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dogtl.core.diskspace import require_free_space
from dogtl.core.errors import DogtlError
from dogtl.core.files import atomic_path, check_overwrite, make_folder, write_text_atomic
from dogtl.core.temporaries import temporary_sibling
from dogtl.core.locks import artifact_lock
from dogtl.core.metadata import metadata_path
from dogtl.core.quiet import native_stderr_silenced
from dogtl.core.runtimes import ConversionError, converted, file_forward, require
from dogtl.data.images import decode_error, load_image
from dogtl.features.modelcache import open_model_cache, split_paths
from dogtl.serving.model import ServingModel, encoded_batch_fn, encoded_to_pixels, pixel_model, pixels_to_inputs

log = logging.getLogger(__name__)
FORMATS = ("savedmodel", "tflite", "onnx", "openvino")
RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino"}
SUFFIX = {"tflite": ".tflite", "onnx": ".onnx", "openvino": ".xml"}
QUANTIZE = ("none", "float16", "dynamic")
VERSION = "1"


@dataclass
class ExportCheck:
    images: int
    top1_agreement: float  # fraction of images whose top class is the Keras model's
    max_abs_diff: float  # largest |p_tflite - p_keras| over images and classes
    skipped: int = 0  # unreadable images left out
    # The same against the Keras model fed the same uint8 pixels: what conversion alone changes
    # (the rest of the difference is the uint8 input's rounding of the resized image).
    top1_same_pixels: float = float("nan")
    max_abs_diff_same_pixels: float = float("nan")


TfliteCheck = ExportCheck  # its first name


def _model_bytes(sm: ServingModel) -> int:
    return int(sm.model.count_params()) * 4 + (1 << 20)


def export_savedmodel(sm: ServingModel, out: str | Path, *, top_k: int = 5, force: bool = False) -> Path:
    """Write the SavedModel at OUT/1/ and the class names at OUT/labels.txt; returns OUT/1."""
    import keras
    import tensorflow as tf

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DogtlError(f"--out {out} is a file: a SavedModel is a folder (TF Serving's model base path)")
    target = out / VERSION
    make_folder(out)
    with artifact_lock(out, "the SavedModel folder"):  # which removes what a killed export left in it
        if target.exists() and not force:
            raise DogtlError(f"{target} exists: pass --force to overwrite it or choose another --out")
        require_free_space(out, _model_bytes(sm), "the SavedModel")

        archive = keras.export.ExportArchive()
        archive.track(sm.model)
        archive.add_endpoint(name="serving_default", fn=encoded_batch_fn(sm, top_k),
                             input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        # Not numbers, so TF Serving never loads them as versions.
        tmp, old = temporary_sibling(target), temporary_sibling(out / f"{VERSION}.old")
        try:
            archive.write_out(str(tmp), verbose=False)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        write_text_atomic(out / "labels.txt", "".join(f"{c}\n" for c in sm.classes))
    return target


def labels_path(model_path: str | Path) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}.labels.txt")


def export_runtime(sm: ServingModel, out: str | Path, fmt: str, *, force: bool = False) -> Path:
    """Write OUT (.onnx, or .xml with its .bin) and its labels and metadata files beside it."""
    out, runtime = Path(out), RUNTIME_OF[fmt]
    if out.suffix != SUFFIX[fmt]:
        raise DogtlError(f"--out {out}: an {fmt} model file must end in {SUFFIX[fmt]}")
    files = [out] + ([out.with_suffix(".bin")] if fmt == "openvino" else [])
    for f in files:
        check_overwrite(f, force)
    require_free_space(out.parent, _model_bytes(sm), f"the {fmt} model")
    require(runtime)
    try:
        folder = converted(pixel_model(sm), runtime, f"{sm.name}-pixels-{sm.size}")
    except ConversionError as e:
        raise DogtlError(f"{fmt} cannot convert {sm.path} ({e}): export it as savedmodel or tflite") from None
    sources = sorted(folder.glob("model.*"))
    for source, target in zip(sources, sorted(files, key=lambda f: f.suffix)):  # .bin before .onnx/.xml
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    meta = {"format": fmt, "name": sm.name, "classes": sm.classes,
            "inputs": [{"backbone": i.spec.name, "size": i.size, "name": f"pixels_{k}" if len(sm.inputs) > 1
                        else "pixels"} for k, i in enumerate(sm.inputs)],
            "input": "float32 RGB pixels [N, size, size, 3], 0-255 (decoded and resized; the backbone's "
                     "preprocessing is inside)", "output": "probabilities [N, classes]",
            "source": str(sm.path), "source_kind": sm.metadata.kind}
    write_text_atomic(metadata_path(out), json.dumps(meta, indent=1))
    write_text_atomic(labels_path(out), "".join(f"{c}\n" for c in sm.classes))
    return out


def check_exported(path: str | Path, sm: ServingModel, paths, runtime: str = "auto") -> ExportCheck:
    """Top-1 agreement and largest probability difference of an ONNX/OpenVINO export (run by
    `runtime` in float32) against the Keras model (dogtl's pipeline on the files) on `paths`:
    both see the same decoded pixels, so the difference is the conversion's alone."""
    import tensorflow as tf

    kept = [p for p in paths if _readable(p)]
    keras_probs = _keras_probabilities(sm, kept)
    forward = file_forward(path, runtime, "float32")
    pixels = [encoded_to_pixels(tf.constant(Path(p).read_bytes()), sm.inputs) for p in kept]
    got = np.concatenate([forward([np.stack([x[k].numpy() for x in pixels[i:i + 32]]) for k in range(len(sm.inputs))])
                          for i in range(0, len(kept), 32)]).astype(np.float64)
    diff = float(np.max(np.abs(got - keras_probs)))
    agree = float(np.mean(got.argmax(1) == keras_probs.argmax(1)))
    return ExportCheck(images=len(kept), top1_agreement=agree, max_abs_diff=diff, skipped=len(paths) - len(kept),
                       top1_same_pixels=agree, max_abs_diff_same_pixels=diff)


def _readable(path) -> bool:
    return decode_error(path) is None


def tflite_bytes(sm: ServingModel, quantize: str = "none") -> bytes:
    """The converted model: uint8 RGB [1, size, size, 3] -> probabilities [1, C]."""
    import tensorflow as tf

    if quantize not in QUANTIZE:
        raise DogtlError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    import keras

    archive = keras.export.ExportArchive()
    archive.track(sm.model)
    archive.add_endpoint(name="serving_default",
                         fn=lambda image: {"probabilities": sm.call(pixels_to_inputs(image, sm.inputs))},
                         input_signature=[tf.TensorSpec([1, sm.size, sm.size, 3], tf.uint8, name="image")])
    with tempfile.TemporaryDirectory(prefix="dogtl-tflite-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def export_tflite(sm: ServingModel, out: str | Path, *, quantize: str = "none", force: bool = False) -> Path:
    """Write OUT (a .tflite file) and its labels file beside it."""
    out = Path(out)
    if out.suffix != ".tflite":
        raise DogtlError(f"--out {out}: a TFLite model file must end in .tflite")
    check_overwrite(out, force)
    with artifact_lock(out, "the TFLite model"):
        require_free_space(out.parent, _model_bytes(sm), "the TFLite model")
        data = tflite_bytes(sm, quantize)
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        write_text_atomic(labels_path(out), "".join(f"{c}\n" for c in sm.classes))
    return out


def tflite_interpreter(tflite: str | Path | bytes):
    """An interpreter of a TFLite model (a file or its bytes), allocated: LiteRT's, the successor
    of tf.lite.Interpreter, when ai-edge-litert is installed (pip install 'dogtl[tflite]'); else
    TensorFlow's, without the deprecation warning it prints on every use (it still works in this
    TensorFlow, and the warning would only say to install LiteRT). Either prints an INFO line
    about its CPU delegate that no log level hides: kept off the screen too."""
    kwargs = {"model_content": tflite} if isinstance(tflite, bytes) else {"model_path": str(tflite)}
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings(), native_stderr_silenced():  # and its "INFO: Created ... XNNPACK delegate"
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        interpreter = Interpreter(**kwargs)
        interpreter.allocate_tensors()
    return interpreter


def tflite_predict(tflite: str | Path | bytes, pixels: np.ndarray) -> np.ndarray:
    """Probabilities [N, C] of a TFLite model on uint8 images [N, size, size, 3], one at a time."""
    interpreter = tflite_interpreter(tflite)
    (inp,), (outp,) = interpreter.get_input_details(), interpreter.get_output_details()
    rows = []
    for image in pixels:
        interpreter.set_tensor(inp["index"], image[None].astype(np.uint8))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(outp["index"])[0].astype(np.float64))
    return np.array(rows).reshape(len(pixels), -1)


def client_pixels(paths, size: int):
    """(uint8 RGB [n, size, size, 3], kept paths): what a TFLite client feeds, decoded and resized
    as dogtl does and rounded to bytes; unreadable files are left out."""
    import tensorflow as tf

    images, kept = [], []
    for path in paths:
        try:
            image = load_image(str(path), size)
        except tf.errors.OpError:
            continue
        images.append(np.clip(np.round(image.numpy()), 0, 255).astype(np.uint8))
        kept.append(path)
    return np.array(images, dtype=np.uint8).reshape(-1, size, size, 3), kept


def _keras_probabilities(sm: ServingModel, paths) -> np.ndarray:
    """The Keras model's probabilities on the files through the SavedModel's own graph (dogtl's
    float pipeline): what every export's check compares with."""
    import tensorflow as tf

    if not paths:
        raise DogtlError("none of the check images could be read")
    serve = tf.function(encoded_batch_fn(sm))
    return np.concatenate([serve(tf.constant([Path(p).read_bytes() for p in paths[i:i + 32]]))["probabilities"].numpy()
                           for i in range(0, len(paths), 32)]).astype(np.float64)


def check_tflite(tflite: str | Path | bytes, sm: ServingModel, paths) -> ExportCheck:
    """Top-1 agreement and largest probability difference of the TFLite model against the Keras
    model (dogtl's float pipeline on the files) on `paths`."""
    import tensorflow as tf

    pixels, kept = client_pixels(paths, sm.size)
    keras_probs = _keras_probabilities(sm, kept)
    on_pixels = tf.function(lambda x: sm.call(pixels_to_inputs(x, sm.inputs)))
    same = np.concatenate([on_pixels(tf.constant(pixels[i:i + 32])).numpy()
                           for i in range(0, len(kept), 32)]).astype(np.float64)
    lite = tflite_predict(tflite, pixels)
    return ExportCheck(images=len(kept),
                       top1_agreement=float(np.mean(lite.argmax(1) == keras_probs.argmax(1))),
                       max_abs_diff=float(np.max(np.abs(lite - keras_probs))), skipped=len(paths) - len(kept),
                       top1_same_pixels=float(np.mean(lite.argmax(1) == same.argmax(1))),
                       max_abs_diff_same_pixels=float(np.max(np.abs(lite - same))))


def validation_images(sm: ServingModel, data: str | Path | None = None, limit: int = 200) -> list[Path]:
    """Up to `limit` validation images of the model's cache in the data folder (default: the one a
    fine-tuned model was trained on, else data/); [] when either cannot be found (the caller says
    what to pass)."""
    data = data or (sm.metadata.settings or {}).get("data") or "data"
    try:
        cache = open_model_cache(sm.metadata, required=False)
        if cache is None or not Path(data).is_dir():
            return []
        paths = split_paths(cache, data)["val"]["paths"]
    except DogtlError as e:
        log.warning("no validation images to check against: %s", e)
        return []
    return [Path(p) for p in paths[:limit]]
