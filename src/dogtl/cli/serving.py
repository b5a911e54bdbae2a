"""Deploying a trained model: dogtl export and dogtl serve."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from dogtl.cli.common import chosen_model, friendly_errors, model_argument, model_option
from dogtl.core.errors import SettingError
from dogtl.core.precision import PRECISION_HELP
from dogtl.core.runtimes import RUNTIME_HELP


@friendly_errors
def export_cmd(
    model: Optional[Path] = model_argument("Fine-tuned or head model (.keras, with its .json beside it); a head is exported together with its backbone"),
    model_opt: Optional[Path] = model_option(),
    format: str = typer.Option("savedmodel", "--format", help="'savedmodel' (TF Serving / TensorFlow: encoded image bytes in, decoding and preprocessing inside), 'tflite' (mobile: uint8 RGB pixels at the model's size in), 'onnx' or 'openvino' (ONNX Runtime / OpenVINO: float32 RGB pixels 0-255 at the model's size in, preprocessing inside; `dogtl serve` serves them)."),
    out: Optional[Path] = typer.Option(None, "--out", help="SavedModel: the model base folder (written at OUT/1/, class names at OUT/labels.txt; default export/<model>). TFLite, ONNX, OpenVINO: a .tflite, .onnx or .xml file (OpenVINO: and its .bin), its labels beside it as <name>.labels.txt (ONNX/OpenVINO: and dogtl's metadata as <name>.json; default export/<model>.tflite|.onnx|.xml)."),
    quantize: str = typer.Option("none", help="TFLite only: 'none' (float32), 'float16' (half-size weights) or 'dynamic' (int8 weights, quarter size)."),
    top_k: int = typer.Option(5, help="SavedModel: how many class names and scores the signature returns beside the probabilities."),
    data: Optional[Path] = typer.Option(None, show_default=False, help="TFLite/ONNX/OpenVINO check: data folder holding the model's validation images (default: the folder a fine-tuned model was trained on, else data/)."),
    check_images: Optional[list[Path]] = typer.Option(None, "--check-images", help="TFLite/ONNX/OpenVINO check: these image files instead of the validation images (repeat the option)."),
    check_limit: int = typer.Option(200, help="TFLite/ONNX/OpenVINO check: at most this many validation images."),
    weights: Optional[str] = typer.Option(None, help="Only for a head whose backbone came from a local weights file that moved: that file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing export."),
):
    """Export MODEL for deployment: a TF Serving SavedModel, a TFLite, an ONNX or an OpenVINO file.

    SavedModel: the 'serving_default' signature takes a batch of encoded images (tf.string: JPEG, PNG, GIF, BMP, WebP) and returns 'probabilities' [N, classes], 'classes' (top-k names) and 'scores'. Decoding, resizing and the backbone's preprocessing run inside, with the same pixels as dogtl predict, so plain tf.saved_model.load (no dogtl) or TF Serving can use it.

    TFLite: input uint8 RGB [1, size, size, 3] (the model's size), output probabilities. After writing it, the TFLite model is compared with the Keras model on the validation images (or --check-images): top-1 agreement and the largest probability difference are printed.

    ONNX / OpenVINO: input float32 RGB pixels [N, size, size, 3] (0-255, decoded and resized; one input per backbone for a head on several caches), output probabilities; converted once (the runtimes' conversion cache, see docs/runtimes.md) and checked like TFLite. `dogtl serve export/MODEL.onnx` (or .xml) serves it.
    """
    from dogtl.serving import export as ex  # local: TensorFlow's converters, not needed for --help
    from dogtl.serving.model import load_serving_model

    _check_export_options(format, quantize, out, check_images)
    model = chosen_model(model, model_opt)
    sm = load_serving_model(model, weights)
    if out is None:
        out = Path("export") / (model.stem + ex.SUFFIX.get(format, ""))
    if format == "savedmodel":
        target = ex.export_savedmodel(sm, out, top_k=top_k, force=force)
        typer.echo(f"wrote SavedModel {target} ({len(sm.classes)} classes, {sm.size} px, signature "
                   f"serving_default: encoded images -> probabilities, top-{min(top_k, len(sm.classes))} "
                   f"classes) and {out / 'labels.txt'}")
        typer.echo(f"TF Serving: docker run -p 8501:8501 -v {out.resolve()}:/models/{sm.name} "
                   f"-e MODEL_NAME={sm.name} tensorflow/serving")
        return
    if format == "tflite":
        path = ex.export_tflite(sm, out, quantize=quantize, force=force)
        typer.echo(f"wrote TFLite {path} ({path.stat().st_size / 1e6:.1f} MB, quantize {quantize}, input uint8 "
                   f"[1, {sm.size}, {sm.size}, 3]) and {ex.labels_path(path)}")
    else:
        path = ex.export_runtime(sm, out, format, force=force)
        size = sum(f.stat().st_size for f in (path, path.with_suffix(".bin")) if f.exists())
        typer.echo(f"wrote {format} {path} ({size / 1e6:.1f} MB, input float32 RGB pixels 0-255 "
                   f"[N, {sm.size}, {sm.size}, 3]), {ex.labels_path(path)} and {ex.metadata_path(path)}")
    paths = list(check_images) if check_images else ex.validation_images(sm, data, check_limit)
    if not paths:
        typer.secho(f"no validation images found to check the {format} model against: pass --data with the "
                    "model's data folder or --check-images FILES", err=True, fg=typer.colors.YELLOW)
        return
    _check_export(path, sm, format, quantize, paths, given=bool(check_images))


def _check_export_options(format: str, quantize: str, out: Path | None, check_images) -> None:
    """export's options that contradict each other or name no file, refused before any work."""
    from dogtl.serving import export as ex  # local: TensorFlow's converters, not needed for --help

    if format not in ex.FORMATS:
        raise SettingError(f"--format {format!r}: choose one of {', '.join(ex.FORMATS)}")
    if quantize not in ex.QUANTIZE:
        raise SettingError(f"--quantize {quantize!r}: choose one of {', '.join(ex.QUANTIZE)}")
    if format == "savedmodel" and quantize != "none":
        raise SettingError("--quantize applies to --format tflite only")
    if format in ex.SUFFIX and out is not None and out.suffix != ex.SUFFIX[format]:
        raise SettingError(f"--out {out}: {'a TFLite' if format == 'tflite' else f'an {format}'} model file must end "
                           f"in {ex.SUFFIX[format]}")
    if check_images:
        absent = [str(p) for p in check_images if not p.is_file()]
        if absent:
            raise SettingError(f"--check-images: no such file: {', '.join(absent[:3])}")


def _check_export(path: Path, sm, format: str, quantize: str, paths: list, given: bool) -> None:
    """The exported model against the Keras model on `paths`, printed."""
    from dogtl.serving import export as ex  # local: TensorFlow's converters, not needed for --help

    if format == "tflite":
        c = ex.check_tflite(path, sm, paths)
    else:
        c = ex.check_exported(path, sm, paths, ex.RUNTIME_OF[format])
    typer.echo(f"check on {c.images} {'given' if given else 'validation'} images"
               + (f", quantize {quantize}" if format == "tflite" else "")
               + f": top-1 agreement with the Keras model {c.top1_agreement:.1%}, "
               f"largest probability difference {c.max_abs_diff:.4f}"
               + (f" ({c.skipped} unreadable left out)" if c.skipped else ""))
    if format == "tflite":
        typer.echo(f"  on the same uint8 pixels (conversion alone): top-1 agreement {c.top1_same_pixels:.1%}, "
                   f"largest probability difference {c.max_abs_diff_same_pixels:.4f}")


@friendly_errors
def serve_cmd(
    model: Optional[Path] = model_argument("Fine-tuned or head model (.keras, with its .json beside it), or an ONNX (.onnx) / OpenVINO (.xml) file from `dogtl export` (with its .json beside it)"),
    model_opt: Optional[Path] = model_option(),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch: int = typer.Option(32, help="Most images per model call: requests arriving together are batched."),
    batch_wait_ms: float = typer.Option(5.0, help="How long the first request of a batch waits for others (ms)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest upload accepted; bigger ones get 413."),
    max_files: int = typer.Option(16, help="Most images in one POST /predict/batch request."),
    top_k: int = typer.Option(5, help="Classes returned per image."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Print one line per request on stdout: time, client, method, path, status, images, milliseconds."),
    weights: Optional[str] = typer.Option(None, help="Only for a head whose backbone came from a local weights file that moved: that file."),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP + " An exported .onnx file runs on onnxruntime or openvino, an .xml file on openvino."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
):
    """Serve MODEL over HTTP, with a web page to try it (needs: pip install 'dogtl\\[serve]').

    GET / is a page where you choose or drop a photo and see its top 5 classes. POST /predict takes a multipart field 'file' or a raw image body and answers JSON {"model", "predictions": [{"class", "probability"}], "ms"}; bad input gets {"error"} and a 4xx status. POST /predict/batch takes several file fields and answers {"model", "results": [{"file", "predictions"} or {"file", "error"}], "ms"}. GET /health is for load balancers. Ctrl-C or SIGTERM stops after the requests in flight.

    Example: curl -F file=@dog.jpg http://127.0.0.1:8000/predict

    curl -F file=@a.jpg -F file=@b.jpg http://127.0.0.1:8000/predict/batch
    """
    from dogtl.serving.app import require_serve_extra  # local: the serving stack loads only for this command

    require_serve_extra()  # before FastAPI and uvicorn load: says what to install
    # local: FastAPI, uvicorn and TensorFlow, after the check above
    from dogtl.serving.app import create_app
    from dogtl.serving.model import load_serving_model
    from dogtl.serving.server import make_server

    sm = load_serving_model(chosen_model(model, model_opt), weights)
    app = create_app(sm, max_batch=max_batch, max_upload_mb=max_upload_mb, batch_wait_ms=batch_wait_ms,
                     top_k=top_k, max_files=max_files, runtime=runtime, precision=precision)
    if access_log:
        _print_access_log()
    typer.echo(f"serving {sm.name} ({len(sm.classes)} classes, {app.state.predictor.runtime}) on http://{host}:{port}/  "
               "(POST /predict, POST /predict/batch, GET /health; Ctrl-C to stop)")
    # uvicorn finishes the requests in flight, then raises the signal again for the default
    # handler: turn that into a normal exit (code 0, no "interrupted" message).
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        make_server(app, host=host, port=port).run()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    typer.echo("stopped")


def _print_access_log():
    """The app's access log (logger dogtl.access) as lines on stdout, with the time."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("dogtl.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _Stop(Exception):
    pass


def _stopped(signum, frame):
    raise _Stop()
