"""core/precision.py: what --precision resolves to, and computing in it without changing the model."""

from __future__ import annotations

import numpy as np
import pytest

from dogtl.core import precision


@pytest.mark.parametrize("native, cores, expected", [
    (False, None, "float32"),  # a CPU without hardware bfloat16 (AVX2/FMA only), no GPU
    (True, None, "bfloat16"),  # AVX512-BF16 / AMX CPU
    (False, True, "float16"),  # CUDA GPU with tensor cores
    (False, False, "float32"),  # older GPU
])
def test_auto_resolves_by_hardware(monkeypatch, native, cores, expected):
    monkeypatch.setattr(precision, "native_bfloat16", lambda: native)
    monkeypatch.setattr(precision, "gpu_tensor_cores", lambda: cores)
    assert precision.resolve("auto") == expected
    for forced in ("float32", "bfloat16", "float16"):
        assert precision.resolve(forced) == forced
    with pytest.raises(ValueError, match="--precision 'half'"):
        precision.resolve("half")


def test_mechanism_is_the_rewrite_only_where_bfloat16_is_native(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)
    assert precision.mechanism("bfloat16") == "onednn-rewrite"
    assert precision.mechanism("float16") == "keras-policy"
    monkeypatch.setattr(precision, "native_bfloat16", lambda: False)
    assert precision.mechanism("bfloat16") == "keras-policy"  # the rewrite is a no-op without the hardware
    assert precision.mechanism("float32") == "none"


@pytest.mark.parametrize("resolved", ["bfloat16", "float16"])
def test_computing_in_reduced_precision_then_float32_again(resolved):
    import keras
    import tensorflow as tf

    from dogtl.core.models import build_head

    model = build_head(16, 3, hidden=(8,), seed=1)
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    want = model.predict(x, verbose=0)
    with precision.computing_in(model, resolved, how="keras-policy"):
        got = tf.function(lambda v: model(v, training=False))(x)
        inner = model.get_layer("head_dense_0").compute_dtype
    assert inner == resolved and got.dtype == tf.float32  # the softmax stays float32
    np.testing.assert_allclose(np.asarray(got), want, atol=0.02)
    assert not np.array_equal(np.asarray(got), want)  # really computed in the reduced precision
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers if layer.weights)
    assert all(w.dtype == "float32" for w in model.weights)
    assert keras.Model.from_config(model.get_config()).get_layer("head_dense_0").compute_dtype == "float32"


def test_the_environment_can_overrule_the_cpu_check(monkeypatch):
    """DOGTL_NATIVE_BFLOAT16=0 makes `auto` float32 on any CPU (this test suite sets it), 1 bfloat16."""
    import re
    from pathlib import Path

    try:
        for value, expected in (("1", True), ("0", False), (None, None)):
            if value is None:
                monkeypatch.delenv(precision.NATIVE_ENV, raising=False)
                text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
                expected = bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", text))
            else:
                monkeypatch.setenv(precision.NATIVE_ENV, value)
            precision.cpu_bfloat16.cache_clear()
            precision.native_bfloat16.cache_clear()
            assert precision.cpu_bfloat16() is expected
            assert (precision.resolve("auto") == "bfloat16") is (expected and precision.gpu_tensor_cores() is None)
    finally:
        monkeypatch.undo()
        precision.cpu_bfloat16.cache_clear()
        precision.native_bfloat16.cache_clear()


def test_the_onednn_rewrite_computes_close_to_float32_and_leaves_it_float32():
    """The mechanism `auto` uses on CPUs with hardware bfloat16 (a no-op elsewhere)."""
    import tensorflow as tf

    from dogtl.core.models import build_head

    model = build_head(16, 3, hidden=(8,), seed=1)
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    want = model.predict(x, verbose=0)
    with precision.computing_in(model, "bfloat16", how="onednn-rewrite") as how:
        got = tf.function(lambda v: model(v, training=False))(x)
        assert tf.config.optimizer.get_experimental_options().get("auto_mixed_precision_onednn_bfloat16")
    assert how == "onednn-rewrite"
    assert not tf.config.optimizer.get_experimental_options().get("auto_mixed_precision_onednn_bfloat16")
    assert model.get_layer("head_dense_0").compute_dtype == "float32"
    np.testing.assert_allclose(np.asarray(got), want, atol=0.02)
