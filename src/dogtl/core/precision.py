"""Which number format a model computes in: one resolution of `--precision` for every stage.

`auto` means bfloat16 on a CPU that multiplies bfloat16 in hardware (AVX512-BF16 or AMX) and
no GPU, mixed float16 on a CUDA GPU with tensor cores (compute capability 7.0 or more), and
float32 otherwise. Weights always stay float32, and so do saved models: a reduced precision
changes how a model computes in this process, never what is written.

Two mechanisms are used, each where it measures fastest:
- bfloat16 on a CPU with hardware bfloat16: TensorFlow's oneDNN graph rewrite
  (`auto_mixed_precision_onednn_bfloat16`), 1.45x float32 for Xception against 1.27x for the
  Keras policy on the AMX machine of issue 13. The rewrite is a no-op on CPUs without it, so
  a forced bfloat16 there (emulated, slow, for checking numbers) uses the Keras policy.
- float16 (and bfloat16 on GPUs): the Keras `mixed_float16` / `mixed_bfloat16` dtype policy
  on every layer, final softmax kept in float32 (Keras's mixed-precision guide).

A head's time goes into its hidden Dense layers' matmuls, and `resolve(precision, head_batch=B)`
says what they compute in: on CPUs that multiply bfloat16 in hardware those run ~1.7x faster in
bfloat16 than in float32, with float32 accumulation, weights, normalisation and softmax
(`benchmarks/bench_head.py` measures the speed, `benchmarks/batch_quality.py` the validation log
loss). Below a batch of HEAD_AUTO_MIN_BATCH the casts cost more than the smaller matmuls save,
and elsewhere bfloat16 is emulated and slower, so `auto` keeps a head in float32 there (and on
GPUs, where the head costs nothing anyway).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from dogtl.core.errors import SettingError
from dogtl.core.settings import choices_help

# local: tensorflow and numpy are imported inside functions: `dogtl --help` imports this module.
log = logging.getLogger(__name__)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
HEAD_PRECISIONS = ("auto", "float32", "bfloat16")  # a head's hidden matmuls (models.set_head_precision)
HEAD_AUTO_MIN_BATCH = 64
PRECISION_HELP = ("Number format of the backbone's arithmetic: " + choices_help(PRECISIONS, {
    "auto": "bfloat16 on CPUs with AVX512-BF16/AMX, mixed float16 on CUDA GPUs with tensor cores, else float32"})
    + ". Weights and saved models stay float32.")
_REWRITE = "auto_mixed_precision_onednn_bfloat16"


NATIVE_ENV = "DOGTL_NATIVE_BFLOAT16"


@functools.lru_cache(maxsize=1)
def cpu_bfloat16() -> bool:
    """True on a CPU with bfloat16 matmul instructions (AVX512-BF16 or AMX), unless
    DOGTL_NATIVE_BFLOAT16 says otherwise: 0 makes `auto` float32 everywhere (the same numbers on
    every CPU: machines of a cluster that share a cache, or a test suite), 1 trusts the CPU."""
    if os.environ.get(NATIVE_ENV) in ("0", "1"):
        return os.environ[NATIVE_ENV] == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


@functools.lru_cache(maxsize=1)
def gpu_tensor_cores() -> bool | None:
    """None without a GPU visible to TensorFlow; else whether every GPU has tensor cores (>= 7.0)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)) for g in gpus]
    return all(tuple(c) >= (7, 0) for c in capabilities)


@functools.lru_cache(maxsize=1)
def native_bfloat16() -> bool:
    """True on a CPU with bfloat16 matmul instructions and no GPU visible to TensorFlow."""
    return cpu_bfloat16() and gpu_tensor_cores() is None


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SettingError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def resolve(precision: str, head_batch: int | None = None) -> str:
    """'float32', 'bfloat16' or 'float16': what `precision` means for a backbone on this machine;
    with `head_batch`, what it means for a head's hidden matmuls at that batch size ('float32' or
    'bfloat16')."""
    check_precision(precision)
    if precision != "auto":
        return precision
    if head_batch is not None:
        return "bfloat16" if head_batch >= HEAD_AUTO_MIN_BATCH and native_bfloat16() else "float32"
    if gpu_tensor_cores():
        return "float16"
    return "bfloat16" if native_bfloat16() else "float32"


def mechanism(resolved: str) -> str:
    """'none', 'onednn-rewrite' or 'keras-policy': how `resolved` is put into effect here."""
    if resolved == "float32":
        return "none"
    if resolved == "bfloat16" and native_bfloat16():
        return "onednn-rewrite"
    return "keras-policy"


def set_policy(model, policy: str, keep_float32=("head_softmax",)) -> None:
    """Set every layer's dtype policy (nested models included) to `policy`, except the layers
    named in `keep_float32`; takes effect when a graph is next traced. Variables stay float32."""
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None):
            set_policy(layer, policy, keep_float32)
        elif layer.__class__.__name__ != "InputLayer":
            layer.dtype_policy = "float32" if layer.name in keep_float32 else policy


@contextmanager
def computing_in(model, resolved: str, how: str | None = None):
    """Within the block, graphs of `model` traced and run compute in `resolved`; afterwards the
    model computes in float32 again (so it is saved as float32). `how` forces a mechanism
    ('keras-policy' or 'onednn-rewrite'; benchmarks compare them)."""
    how = mechanism(resolved) if how is None or resolved == "float32" else how
    if how == "none":
        yield how
        return
    if how == "onednn-rewrite":
        import tensorflow as tf

        before = tf.config.optimizer.get_experimental_options().get(_REWRITE, False)
        tf.config.optimizer.set_experimental_options({_REWRITE: True})
        try:
            yield how
        finally:
            tf.config.optimizer.set_experimental_options({_REWRITE: before})
        return
    set_policy(model, {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[resolved])
    try:
        yield how
    finally:
        set_policy(model, "float32")


def as_float32(x):
    """A model output as a float32 NumPy array, whatever it was computed in."""
    import numpy as np

    return np.asarray(x).astype(np.float32)
