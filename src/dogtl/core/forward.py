"""A frozen model's forward pass on TensorFlow, ONNX Runtime or OpenVINO, behind one callable.

core/runtimes.py chooses the runtime; core/conversions.py makes the files ONNX Runtime and
OpenVINO run. NumPy, TensorFlow and the runtimes are imported in the functions that use them
(local): the CLI imports core/runtimes.py, and so this module, for its help text and checks.
"""

from __future__ import annotations

import functools
import importlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dogtl.core import precision as precisions

RUNTIME_MODULES = {"onnxruntime": ("onnxruntime", "tf2onnx"), "openvino": ("openvino",)}
RUNTIME_FILES = {"onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.bin")}


def module_version(module: str) -> str:
    m = importlib.import_module(module)
    return str(getattr(m, "__version__", None) or m.get_version())


def runtime_version(runtime: str) -> str:
    """'openvino 2026.4.1', 'onnxruntime 1.32.0' or 'tensorflow 2.21.0', as recorded."""
    if runtime == "tensorflow":
        import tensorflow as tf

        return f"tensorflow {tf.__version__}"
    return f"{runtime} {module_version(RUNTIME_MODULES[runtime][0])}"


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
            context = precisions.computing_in(self.model, self.precision)
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


def load_forward(path: Path, runtime: str, precision: str) -> Forward:
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


@functools.cache
def openvino_core():
    """The process's one OpenVINO Core. Each Core's CPU plugin swaps in an alternate signal stack
    of its own on the thread that loads it and puts the previous one back when it is freed: Cores
    freed out of the order they were made left the main thread's pointing at freed memory, and
    the next signal (Ctrl-C, SIGTERM) crashed the process with SIGSEGV."""
    import openvino as ov

    return ov.Core()


def _openvino_call(path: Path, precision: str):
    """(call, inputs, outputs) as _onnxruntime_call, compiled for the CPU in `precision`."""
    import numpy as np

    hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
    compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                                "PERFORMANCE_HINT": "LATENCY"})
    outputs = compiled.outputs
    # Every call runs in one thread of its own, where its infer request was made: fine-tuning's
    # batches come from a tf.data thread, and OpenVINO inferring there while TensorFlow trained
    # crashed the process (SIGSEGV, every run: `finetune --trainable-blocks 1 --runtime openvino`).
    worker = ThreadPoolExecutor(1, thread_name_prefix="openvino")
    request = worker.submit(compiled.create_infer_request).result()

    def infer(batches):
        request.infer(batches)
        return [np.array(request.get_tensor(o).data, copy=True) for o in outputs]

    def call(batches):
        return worker.submit(infer, batches).result()

    return call, len(compiled.inputs), len(outputs)


def first_line(e: BaseException) -> str:
    """The line of a converter's error that says what failed (OpenVINO's first line is an
    assertion's location; the unsupported operations come later)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"no (translator|conversion rule)|not supported|is not implemented|invalid model", line, re.I)]
    return (telling or lines or [type(e).__name__])[0][:200]
