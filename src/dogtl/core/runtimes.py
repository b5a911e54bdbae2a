"""Which library runs a frozen forward pass: one resolution of `--runtime` for every stage.

A frozen forward (extraction's backbone, prediction's model on images, serving, the frozen
part of fine-tuning) is pure inference, so any runtime that gives the same numbers may run it.
On CPUs OpenVINO and ONNX Runtime are several times faster than TensorFlow for the same
features (docs/runtimes.md has the measured table). The Keras model is converted by Keras's own
exporters (`model.export(format="onnx" | "openvino")`: tf2onnx and `openvino.convert_model`),
checked against TensorFlow on a probe batch, and kept in a conversion cache on disk
(core/conversions.py), keyed by the model's content (architecture and weights: the backbone,
its weights and the image size), or by what determines it when the caller knows that without
building it (extraction's backbone), and the converter's versions, so the next run loads it in
seconds. A model a runtime cannot convert, or converts to other numbers, runs on TensorFlow,
with one logged line saying so. Each runtime's forward pass is in core/forward.py.

`auto` means TensorFlow on GPUs and under a distribution strategy, else the first installed of
AUTO_ORDER (OpenVINO, then ONNX Runtime): the order measured fastest on CPUs for every
backbone of benchmarks/bench_extract.py. DOGTL_AUTO_RUNTIME=NAME makes `auto` mean NAME (the
test suite sets tensorflow, so only the tests of runtimes convert models).

Precision (core/precision.py) is resolved together with the runtime: OpenVINO computes in
float32 or, where the CPU has hardware bfloat16, in bfloat16 (its inference precision hint;
`auto` means bfloat16 there, as for TensorFlow); ONNX Runtime on CPUs computes in float32 only
(`auto` means float32; an explicit bfloat16 or float16 is refused). The converted file is the
same float32 graph for every precision (the hint applies when it is compiled), so precision is
not part of the conversion cache's key.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

from dogtl.core import precision as precisions
from dogtl.core.conversions import ConversionError, converted
from dogtl.core.errors import DogtlError, SettingError
from dogtl.core.forward import RUNTIME_FILES, RUNTIME_MODULES, Forward, first_line, load_forward, tensorflow_forward
from dogtl.core.settings import choices_help

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "tensorflow", "onnxruntime", "openvino")
AUTO_ORDER = ("openvino", "onnxruntime")  # on CPUs, fastest first (docs/runtimes.md)
RUNTIME_HELP = ("Library that runs the frozen forward pass: " + choices_help(RUNTIMES, {
    "auto": "TensorFlow on GPUs, else " + ", else ".join(AUTO_ORDER) + ", whichever is installed: several times "
            "TensorFlow's speed on CPUs"}) + ". The Keras model is converted once and kept in a conversion cache "
                "(DOGTL_RUNTIME_CACHE, default ~/.cache/dogtl/runtimes); a model a runtime cannot convert runs on "
                "TensorFlow, with one line saying so.")
AUTO_ENV = "DOGTL_AUTO_RUNTIME"  # what `auto` means, when set (the test suite: tensorflow)


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise SettingError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return runtime


@functools.lru_cache(maxsize=None)
def missing(runtime: str) -> str | None:
    """The first library `runtime` needs that cannot be imported; None when all can."""
    return next((m for m in RUNTIME_MODULES.get(runtime, ()) if importlib.util.find_spec(m) is None), None)


def installed(runtime: str) -> bool:
    return missing(runtime) is None


def require(runtime: str) -> None:
    if not installed(runtime):
        how = "pip install 'dogtl[onnx]'" if runtime == "onnxruntime" else "pip install 'openvino>=2025.1'"
        raise DogtlError(f"--runtime {runtime} needs {missing(runtime)}, which is not installed: {how}, or use "
                         "--runtime auto")


def plan(runtime: str, precision: str, strategy=None) -> tuple[str, str]:
    """(runtime, precision) that `--runtime` and `--precision` mean here, before any conversion
    (which may still fall back to TensorFlow, at the same precision)."""
    check_runtime(runtime)
    precisions.check_precision(precision)
    if strategy is not None:
        if runtime not in ("auto", "tensorflow"):
            raise SettingError(f"--runtime {runtime} runs on one device: use --runtime tensorflow with --strategy")
        runtime = "tensorflow"
    if runtime == "auto" and os.environ.get(AUTO_ENV) in RUNTIMES[1:]:
        runtime = os.environ[AUTO_ENV]
    if runtime == "auto":
        on_gpu = precisions.gpu_tensor_cores() is not None
        runtime = "tensorflow" if on_gpu else next((r for r in AUTO_ORDER if installed(r)), "tensorflow")
    if runtime == "tensorflow":
        return runtime, precisions.resolve(precision)
    require(runtime)
    if runtime == "onnxruntime":
        if precision in ("bfloat16", "float16"):
            raise SettingError(f"--runtime onnxruntime computes in float32 on CPUs: pass --precision float32 or "
                               f"auto, or --runtime openvino/tensorflow for {precision}")
        return runtime, "float32"
    if precision == "float16" or (precision == "bfloat16" and not precisions.cpu_bfloat16()):
        raise SettingError(f"--runtime openvino computes {precision} only on CPUs with hardware support for it "
                           "(bfloat16: AVX512-BF16 or AMX): pass --precision float32 or auto, or --runtime tensorflow")
    return runtime, ("bfloat16" if precision == "auto" and precisions.cpu_bfloat16() else
                     "float32" if precision == "auto" else precision)


def frozen_forward(model, *, runtime: str = "auto", precision: str = "auto", label: str = "model",
                   strategy=None, tf_call=None, cache_dir: str | Path | None = None, note=None,
                   identity: dict | None = None) -> Forward:
    """The fastest forward pass of `model` that `runtime` and `precision` allow here.

    `label` names the model in file names and messages (e.g. 'xception-299'); `note` gets one
    line before a conversion (which takes a minute for a large backbone). A runtime that cannot
    convert the model falls back to TensorFlow with one logged warning. With `identity` (what
    determines the model: conversions.converted), `model` is a function that builds it, called
    only when TensorFlow runs it or the conversion cache has no entry for it."""
    runtime, precision = plan(runtime, precision, strategy)
    build = functools.cache(model) if identity is not None else (lambda: model)
    if runtime == "tensorflow":
        return tensorflow_forward(build(), precision, tf_call)
    try:
        folder = converted(build if identity is not None else model, runtime, label, cache_dir, note, identity)
        return _load(folder, runtime, precision, model if identity is None else None)
    except ConversionError as e:
        log.warning("%s cannot run %s (%s): running it on tensorflow", runtime, label, e)
        forward = tensorflow_forward(build(), precision)
        forward.fell_back = f"{runtime}: {e}"
        return forward


def _load(folder: Path, runtime: str, precision: str, model) -> Forward:
    try:
        forward = load_forward(folder / RUNTIME_FILES[runtime][0], runtime, precision)
    except Exception as e:  # noqa: BLE001  a runtime that cannot load or compile the file
        raise ConversionError(f"cannot load {folder}: {first_line(e)}") from None
    forward.model = model
    return forward


def file_forward(path: str | Path, runtime: str = "auto", precision: str = "auto") -> Forward:
    """A model file (an ONNX or OpenVINO export) on `runtime`: openvino reads both formats,
    onnxruntime ONNX files only; TensorFlow runs neither."""
    path = Path(path)
    if runtime == "auto":  # an export's own runtime (OpenVINO also reads ONNX files)
        runtime = "onnxruntime" if path.suffix == ".onnx" and installed("onnxruntime") else "openvino"
    runtime, precision = plan(runtime, precision)
    if runtime == "tensorflow" or (runtime == "onnxruntime" and path.suffix != ".onnx"):
        raise SettingError(f"{path}: {'an ONNX' if path.suffix == '.onnx' else 'an OpenVINO'} model runs on "
                           f"{'onnxruntime or openvino' if path.suffix == '.onnx' else 'openvino'}, not {runtime}: "
                           "pass --runtime auto")
    try:
        return load_forward(path, runtime, precision)
    except Exception as e:  # noqa: BLE001  the runtime's own message names the problem
        raise DogtlError(f"{path}: {runtime} cannot load it ({first_line(e)})") from None
