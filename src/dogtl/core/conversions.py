"""The conversion cache: a Keras model converted for ONNX Runtime or OpenVINO once, kept on disk.

Keras's own exporters (`model.export(format="onnx" | "openvino")`: tf2onnx and
`openvino.convert_model`) convert the model; the result is checked against TensorFlow on a probe
batch and kept under `conversion_cache_dir()`, keyed by the model's content (architecture and
weights) or an identity the caller gives (`converted`), and by the converters' versions, so the
next run loads it in seconds. NumPy, TensorFlow and the converters are imported in the functions
that use them (local): the CLI imports core/runtimes.py, which imports this module, for its help
text and checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

from dogtl.core.files import file_sha256
from dogtl.core.forward import RUNTIME_FILES, RUNTIME_MODULES, first_line, load_forward, module_version, openvino_core
from dogtl.core.quiet import native_stderr_silenced

log = logging.getLogger(__name__)
CACHE_ENV = "DOGTL_RUNTIME_CACHE"
FORMAT_VERSION = 1
# Largest difference from TensorFlow (float32) a converted model may show on the probe batch.
MIN_COSINE = 0.9999
MAX_RELATIVE = 1e-3


class ConversionError(Exception):
    """A runtime cannot convert (or reproduce) a model."""


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
    for module in RUNTIME_MODULES[runtime]:
        out[module] = module_version(module)
    return out


def converted(model, runtime: str, label: str, cache_dir: str | Path | None = None, note=None,
              identity: dict | None = None) -> Path:
    """The folder of `model` converted for `runtime`: from the conversion cache when a valid
    entry is there, else converted now, checked against TensorFlow and stored. A damaged or
    stale entry (files changed, other key) is replaced, with a logged line.

    The entry is keyed by the model's content (`model_digest`), or by `identity` when given: what
    determines the model without building it (a backbone's name, its weights' content hash, the
    image size). `model` is then a function that builds it, called only to convert it, so a run
    that finds its entry builds nothing (building and digesting a backbone was most of an
    incremental update's fixed cost)."""
    root = Path(cache_dir) if cache_dir is not None else conversion_cache_dir()
    build = model if identity is not None else (lambda: model)
    key = {"format": FORMAT_VERSION, "runtime": runtime, "label": label,
           "model": identity if identity is not None else model_digest(model), "versions": _versions(runtime)}
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
        model = build()  # a weights file that cannot be loaded fails here, before the line below
        (note or log.info)(f"converting {label} for {runtime} (once: kept in {root})")
        tmp = root / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            started = time.perf_counter()
            _convert(model, runtime, tmp)
            check = _check(model, runtime, tmp)
            entry = {"key": key, "files": {name: file_sha256(tmp / name) for name in RUNTIME_FILES[runtime]},
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
    if set(entry.get("files") or {}) != set(RUNTIME_FILES[key["runtime"]]):
        return "damaged (files missing)"
    return None


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]


@contextlib.contextmanager
def _locked(path: Path):
    """One converter per entry across processes (an OS lock: released when the process dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _probe(model) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (2, *[int(d) for d in t.shape[1:]])).astype(np.float32) for t in model.inputs]


def _convert(model, runtime: str, folder: Path) -> None:
    """Keras's own exporters; any failure is a ConversionError naming its first line (tf2onnx
    and OpenVINO's converters print pages of notes on file descriptor 2: kept off it)."""
    probe = _probe(model)
    model(probe if len(probe) > 1 else probe[0], training=False)  # Keras's ONNX export wants a called model
    target = folder / RUNTIME_FILES[runtime][0]
    try:
        with warnings.catch_warnings(), native_stderr_silenced(), _logging_kept() as said:
            warnings.simplefilter("ignore")
            model.export(str(target), format="onnx" if runtime == "onnxruntime" else "openvino", verbose=False)
    except Exception as e:  # converters raise many types for ops they do not support
        raise ConversionError(first_line(e)) from None
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

    model = openvino_core().read_model(str(path))
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
        got = load_forward(folder / RUNTIME_FILES[runtime][0], runtime, "float32")(probe)
        got = got if isinstance(got, list) else [got]
    except Exception as e:  # noqa: BLE001  a runtime that cannot load what it converted
        raise ConversionError(f"cannot load the converted model: {first_line(e)}") from None
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise ConversionError(f"outputs {[g.shape for g in got]} instead of {[w.shape for w in want]}")
    checks = [agreement(g, w) for g, w in zip(got, want)]
    worst = {"cosine": min(c["cosine"] for c in checks), "relative": max(c["relative"] for c in checks)}
    if worst["cosine"] < MIN_COSINE or worst["relative"] > MAX_RELATIVE:
        raise ConversionError(f"its outputs differ from TensorFlow's (cosine {worst['cosine']:.6f}, "
                              f"relative difference {worst['relative']:.2e})")
    return worst
