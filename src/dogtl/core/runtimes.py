"""Which library runs a frozen forward pass: one resolution of `--runtime` for every stage.

A frozen forward (extraction's backbone, prediction's model on images, serving, the frozen
part of fine-tuning) is pure inference, so any runtime that gives the same numbers may run it.
On CPUs OpenVINO and ONNX Runtime are several times faster than TensorFlow for the same
features (docs/runtimes.md has the measured table). The Keras model is converted by Keras's own
exporters (`model.export(format="onnx" | "openvino")`: tf2onnx and `openvino.convert_model`),
checked against TensorFlow on a probe batch, and kept in a conversion cache on disk
(`conversion_cache_dir`), keyed by the model's content (architecture and weights: the backbone,
its weights and the image size) and the converter's versions, so the next run loads it in
seconds. A model a runtime cannot convert, or converts to other numbers, runs on TensorFlow,
with one logged line saying so.

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

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dogtl.core.errors import DogtlError, SettingError
from dogtl.core.files import file_sha256

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "tensorflow", "onnxruntime", "openvino")
AUTO_ORDER = ("openvino", "onnxruntime")  # on CPUs, fastest first (docs/runtimes.md)
RUNTIME_HELP = ("Library that runs the frozen forward pass: auto (TensorFlow on GPUs, else OpenVINO, else "
                "ONNX Runtime, whichever is installed: several times TensorFlow's speed on CPUs), tensorflow, "
                "onnxruntime or openvino. The Keras model is converted once and kept in a conversion cache "
                "(DOGTL_RUNTIME_CACHE, default ~/.cache/dogtl/runtimes); a model a runtime cannot convert runs on "
                "TensorFlow, with one line saying so.")
CACHE_ENV = "DOGTL_RUNTIME_CACHE"
AUTO_ENV = "DOGTL_AUTO_RUNTIME"  # what `auto` means, when set (the test suite: tensorflow)
FORMAT_VERSION = 1
_MODULES = {"onnxruntime": ("onnxruntime", "tf2onnx"), "openvino": ("openvino",)}
_FILES = {"onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
# Largest difference from TensorFlow (float32) a converted model may show on the probe batch.
MIN_COSINE = 0.9999
MAX_RELATIVE = 1e-3


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise SettingError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return runtime


@functools.lru_cache(maxsize=None)
def missing(runtime: str) -> str | None:
    """The first library `runtime` needs that cannot be imported; None when all can."""
    return next((m for m in _MODULES.get(runtime, ()) if importlib.util.find_spec(m) is None), None)


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
    from dogtl.core.precision import check_precision, cpu_bfloat16, gpu_tensor_cores, resolve

    check_runtime(runtime)
    check_precision(precision)
    if strategy is not None:
        if runtime not in ("auto", "tensorflow"):
            raise SettingError(f"--runtime {runtime} runs on one device: use --runtime tensorflow with --strategy")
        runtime = "tensorflow"
    if runtime == "auto" and os.environ.get(AUTO_ENV) in RUNTIMES[1:]:
        runtime = os.environ[AUTO_ENV]
    if runtime == "auto":
        on_gpu = gpu_tensor_cores() is not None
        runtime = "tensorflow" if on_gpu else next((r for r in AUTO_ORDER if installed(r)), "tensorflow")
    if runtime == "tensorflow":
        return runtime, resolve(precision)
    require(runtime)
    if runtime == "onnxruntime":
        if precision in ("bfloat16", "float16"):
            raise SettingError(f"--runtime onnxruntime computes in float32 on CPUs: pass --precision float32 or "
                               f"auto, or --runtime openvino/tensorflow for {precision}")
        return runtime, "float32"
    if precision == "float16" or (precision == "bfloat16" and not cpu_bfloat16()):
        raise SettingError(f"--runtime openvino computes {precision} only on CPUs with hardware support for it "
                           "(bfloat16: AVX512-BF16 or AMX): pass --precision float32 or auto, or --runtime tensorflow")
    return runtime, ("bfloat16" if precision == "auto" and cpu_bfloat16() else
                     "float32" if precision == "auto" else precision)


def conversion_cache_dir() -> Path:
    """DOGTL_RUNTIME_CACHE, else $XDG_CACHE_HOME/dogtl/runtimes, else ~/.cache/dogtl/runtimes."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dogtl" / "runtimes"


def model_digest(model) -> str:
    """The model's content: its layers' classes, input and output shapes and every weight's
    bytes, in order (not layer names, which Keras numbers per process). Equal for the same
    backbone, weights and image size in any process."""
    import numpy as np

    h = hashlib.sha256()
    h.update(json.dumps([_shapes(model.inputs), _shapes(model.outputs)]).encode())

    def layers(m):
        for layer in getattr(m, "layers", []):
            yield layer
            yield from layers(layer)

    h.update(",".join(type(layer).__name__ for layer in layers(model)).encode())
    for w in model.weights:
        value = np.ascontiguousarray(np.asarray(w.numpy()))
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _shapes(tensors):
    return [list(t.shape) for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors])]


def _versions(runtime: str) -> dict:
    import keras
    import tensorflow as tf

    out = {"keras": keras.__version__, "tensorflow": tf.__version__}
    for module in _MODULES[runtime]:
        out[module] = _module_version(module)
    return out


def _module_version(module: str) -> str:
    import importlib

    m = importlib.import_module(module)
    return str(getattr(m, "__version__", None) or m.get_version())


def runtime_version(runtime: str) -> str:
    """'openvino 2026.4.1', 'onnxruntime 1.32.0' or 'tensorflow 2.21.0', as recorded."""
    if runtime == "tensorflow":
        import tensorflow as tf

        return f"tensorflow {tf.__version__}"
    return f"{runtime} {_module_version(_MODULES[runtime][0])}"


# ----------------------------------------------------------------------------- forward passes

@dataclass
class Forward:
    """A frozen model's forward pass: a batch (or a list of batches, one per model input, in the
    model's input order) -> numpy output (a list for several outputs). `with forward:` around
    the calls puts TensorFlow's precision into effect (the other runtimes are compiled in it)."""

    runtime: str  # the runtime that runs it (after any fallback)
    precision: str  # resolved
    call: object
    model: object = None
    fell_back: str | None = None  # why a runtime that was asked for is not the one running it
    _context: list = field(default_factory=list)

    def __call__(self, inputs):
        return self.call(inputs)

    @property
    def version(self) -> str:
        return runtime_version(self.runtime)

    def __enter__(self):
        if self.runtime == "tensorflow" and self.model is not None:
            from dogtl.core.precision import computing_in

            context = computing_in(self.model, self.precision)
            context.__enter__()
            self._context.append(context)
        return self

    def __exit__(self, *exc):
        if self._context:
            return self._context.pop().__exit__(*exc)
        return False


def tensorflow_forward(model, precision: str, call=None) -> Forward:
    """The model as one tf.function (traced once per batch shape), or `call` (a replicated one)."""
    import numpy as np

    import tensorflow as tf

    fn = call or tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def run(inputs):
        if isinstance(inputs, (list, tuple)):  # one batch per model input
            inputs = inputs[0] if len(inputs) == 1 else list(inputs)
        out = fn(inputs)
        return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else np.asarray(out)

    return Forward("tensorflow", precision, run, model)


def frozen_forward(model, *, runtime: str = "auto", precision: str = "auto", label: str = "model",
                   strategy=None, tf_call=None, cache_dir: str | Path | None = None, note=None) -> Forward:
    """The fastest forward pass of `model` that `runtime` and `precision` allow here.

    `label` names the model in file names and messages (e.g. 'xception-299'); `note` gets one
    line before a conversion (which takes a minute for a large backbone). A runtime that cannot
    convert the model falls back to TensorFlow with one logged warning."""
    runtime, precision = plan(runtime, precision, strategy)
    if runtime == "tensorflow":
        return tensorflow_forward(model, precision, tf_call)
    try:
        folder = converted(model, runtime, label, cache_dir, note)
        return _load(folder, runtime, precision, model)
    except ConversionError as e:
        log.warning("%s cannot run %s (%s): running it on tensorflow", runtime, label, e)
        forward = tensorflow_forward(model, precision)
        forward.fell_back = f"{runtime}: {e}"
        return forward


class ConversionError(Exception):
    """A runtime cannot convert (or reproduce) a model."""


def _load(folder: Path, runtime: str, precision: str, model) -> Forward:
    try:
        forward = _file_forward(folder / _FILES[runtime][0], runtime, precision)
    except Exception as e:  # noqa: BLE001  a runtime that cannot load or compile the file
        raise ConversionError(f"cannot load {folder}: {_first_line(e)}") from None
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
        return _file_forward(path, runtime, precision)
    except Exception as e:  # noqa: BLE001  the runtime's own message names the problem
        raise DogtlError(f"{path}: {runtime} cannot load it ({_first_line(e)})") from None


def _file_forward(path: Path, runtime: str, precision: str) -> Forward:
    import numpy as np

    call, inputs, outputs = (_onnxruntime_call(path) if runtime == "onnxruntime"
                             else _openvino_call(path, precision))

    def run(batches):
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        if len(batches) != inputs:
            raise ValueError(f"{path.name} takes {inputs} inputs, got {len(batches)}")
        outs = call([np.ascontiguousarray(np.asarray(b, dtype=np.float32)) for b in batches])
        return outs[0] if outputs == 1 else outs

    return Forward(runtime, precision, run)


def _onnxruntime_call(path: Path):
    """(call: input batches -> output arrays, number of inputs, number of outputs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return (lambda batches: session.run(None, dict(zip(names, batches)))), len(names), len(session.get_outputs())


def _openvino_call(path: Path, precision: str):
    """(call, inputs, outputs) as _onnxruntime_call, compiled for the CPU in `precision`."""
    import numpy as np

    import openvino as ov

    hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "PERFORMANCE_HINT": "LATENCY"})
    outputs = compiled.outputs
    # An infer request runs one call at a time ("Infer Request is busy"): one per thread, since
    # fine-tuning's batches come from tf.data's thread while validation runs in the main one.
    local = threading.local()

    def call(batches):
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        local.request.infer(batches)
        return [np.array(local.request.get_tensor(o).data, copy=True) for o in outputs]

    return call, len(compiled.inputs), len(outputs)


# ----------------------------------------------------------------------------- the conversion cache

def converted(model, runtime: str, label: str, cache_dir: str | Path | None = None, note=None) -> Path:
    """The folder of `model` converted for `runtime`: from the conversion cache when a valid
    entry is there, else converted now, checked against TensorFlow and stored. A damaged or
    stale entry (files changed, other key) is replaced, with a logged line."""
    root = Path(cache_dir) if cache_dir is not None else conversion_cache_dir()
    key = {"format": FORMAT_VERSION, "runtime": runtime, "label": label, "model": model_digest(model),
           "versions": _versions(runtime)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / f"{_safe(label)}-{runtime}-{digest}"
    problem = entry_problem(folder, key)
    if problem is None:
        log.info("%s for %s: reusing %s", runtime, label, folder)
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the conversion cache {root} ({e.strerror}); set {CACHE_ENV}") from None
    with _locked(root / f".{folder.name}.lock"):
        problem = entry_problem(folder, key)  # another process may have converted it meanwhile
        if problem is None:
            return folder
        if folder.exists():
            log.warning("conversion cache %s is %s: converting again", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
        (note or log.info)(f"converting {label} for {runtime} (once: kept in {root})")
        tmp = root / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            started = time.perf_counter()
            _convert(model, runtime, tmp)
            check = _check(model, runtime, tmp)
            entry = {"key": key, "files": {name: file_sha256(tmp / name) for name in _FILES[runtime]},
                     "check": check, "seconds": round(time.perf_counter() - started, 1)}
            (tmp / "entry.json").write_text(json.dumps(entry, indent=1, sort_keys=True))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s for %s in %.0f s into %s", label, runtime, entry["seconds"], folder)
    return folder


def entry_problem(folder: Path, key: dict) -> str | None:
    """None for a valid entry of `key`; else what is wrong with it ('absent', 'damaged', ...)."""
    try:
        entry = json.loads((folder / "entry.json").read_text())
    except FileNotFoundError:
        return "absent"
    except (OSError, ValueError):
        return "damaged (unreadable entry.json)"
    if entry.get("key") != key:
        return "stale (made for another model or converter version)"
    for name, sha in (entry.get("files") or {}).items():
        try:
            if file_sha256(folder / name) != sha:
                return f"damaged ({name} changed)"
        except OSError:
            return f"damaged ({name} missing)"
    if set(entry.get("files") or {}) != set(_FILES[key["runtime"]]):
        return "damaged (files missing)"
    return None


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]


@contextlib.contextmanager
def _locked(path: Path):
    """One converter per entry across processes (an OS lock: released when the process dies)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _probe(model) -> list[np.ndarray]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (2, *[int(d) for d in t.shape[1:]])).astype(np.float32) for t in model.inputs]


def _convert(model, runtime: str, folder: Path) -> None:
    """Keras's own exporters; any failure is a ConversionError naming its first line (tf2onnx
    and OpenVINO's converters print pages of notes on file descriptor 2: kept off it)."""
    import warnings

    from dogtl.core.quiet import native_stderr_silenced

    probe = _probe(model)
    model(probe if len(probe) > 1 else probe[0], training=False)  # Keras's ONNX export wants a called model
    target = folder / _FILES[runtime][0]
    try:
        with warnings.catch_warnings(), native_stderr_silenced(), _logging_kept() as said:
            warnings.simplefilter("ignore")
            model.export(str(target), format="onnx" if runtime == "onnxruntime" else "openvino", verbose=False)
    except Exception as e:  # converters raise many types for ops they do not support
        raise ConversionError(_first_line(e)) from None
    unsupported = [line for line in said if "unsupported ops" in line.lower()]
    if unsupported:  # tf2onnx logs them and writes a model no runtime loads
        raise ConversionError(unsupported[0][:200])
    if runtime == "openvino" and not (folder / "model.bin").exists():
        raise ConversionError("no model.bin written")
    if runtime == "openvino":
        _keep_model_outputs(target, len(model.outputs))


def _keep_model_outputs(path: Path, count: int) -> None:
    """OpenVINO's TensorFlow frontend makes some intermediate tensors results too (EfficientNetV2's
    blocks, with OpenVINO 2026.4): keep the model's own outputs, which come first; the check
    against TensorFlow then says whether they are right."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    if len(model.outputs) > count:
        kept = ov.Model(model.get_results()[:count], model.get_parameters(), model.friendly_name)
        for name in ("model.xml", "model.bin"):
            (path.parent / name).unlink()
        ov.save_model(kept, str(path), compress_to_fp16=False)


@contextlib.contextmanager
def _logging_kept():
    """Yields the list of what the converters log, which is kept from the user's log (tf2onnx
    logs each unsupported operation as an error before the one line dogtl says); OpenVINO's
    converter sets the root logger to ERROR and adds a filter to it (its `ovc` logger set-up,
    checked on 2026.4): the root logger is put back as it was."""
    root, converter = logging.getLogger(), logging.getLogger("tf2onnx")
    level, filters, propagate = root.level, list(root.filters), converter.propagate
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    keep = Keep(logging.WARNING)
    converter.addHandler(keep)
    converter.propagate = False
    try:
        yield said
    finally:
        converter.removeHandler(keep)
        converter.propagate = propagate
        root.setLevel(level)
        root.filters[:] = filters


def _first_line(e: BaseException) -> str:
    """The line of a converter's error that says what failed (OpenVINO's first line is an
    assertion's location; the unsupported operations come later)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"no (translator|conversion rule)|not supported|is not implemented|invalid model", line, re.I)]
    return (telling or lines or [type(e).__name__])[0][:200]


def agreement(a, b) -> dict:
    """{'cosine': lowest per-row cosine similarity, 'relative': largest |a - b| / max |b|}."""
    import numpy as np

    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300), 1.0)
    scale = max(float(np.abs(b).max()), 1e-30)
    return {"cosine": float(cosine.min()), "relative": float(np.abs(a - b).max() / scale)}


def _check(model, runtime: str, folder: Path) -> dict:
    """The converted model against TensorFlow on the probe batch, both in float32."""
    import numpy as np

    probe = _probe(model)
    want = model(probe if len(probe) > 1 else probe[0], training=False)
    want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
    try:
        got = _file_forward(folder / _FILES[runtime][0], runtime, "float32")(probe)
        got = got if isinstance(got, list) else [got]
    except Exception as e:  # noqa: BLE001  a runtime that cannot load what it converted
        raise ConversionError(f"cannot load the converted model: {_first_line(e)}") from None
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise ConversionError(f"outputs {[g.shape for g in got]} instead of {[w.shape for w in want]}")
    checks = [agreement(g, w) for g, w in zip(got, want)]
    worst = {"cosine": min(c["cosine"] for c in checks), "relative": max(c["relative"] for c in checks)}
    if worst["cosine"] < MIN_COSINE or worst["relative"] > MAX_RELATIVE:
        raise ConversionError(f"its outputs differ from TensorFlow's (cosine {worst['cosine']:.6f}, "
                              f"relative difference {worst['relative']:.2e})")
    return worst
