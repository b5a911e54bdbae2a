"""Runtimes: what `auto` picks, the conversion cache (reused, refused and rebuilt when stale or
damaged), the one-line fallback, and features equal to TensorFlow's on every runtime."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import CHEAP, assert_clean_error, run_cli


def _needs(runtime):
    from dogtl.core.runtimes import installed

    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed (pip install 'dogtl[onnx]' or openvino); .ci/run installs it")


def _tiny(op=None, seed=0):
    """A three-layer conv net (converts in a second), optionally with `op` between its layers."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    if op is not None:
        x = keras.layers.Lambda(op)(x)
    x = keras.layers.Conv2D(5, 3)(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def _batch(n=3):
    return np.random.default_rng(1).uniform(-1, 1, (n, 12, 12, 3)).astype(np.float32)


def test_auto_and_precision_rules(monkeypatch):
    from dogtl.core import precision, runtimes
    from dogtl.core.errors import SettingError

    monkeypatch.delenv(runtimes.AUTO_ENV, raising=False)
    monkeypatch.setattr(precision, "gpu_tensor_cores", lambda: None)
    monkeypatch.setattr(runtimes, "installed", lambda r: True)
    monkeypatch.setattr(precision, "cpu_bfloat16", lambda: True)
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)  # not its cached original: restored after
    assert runtimes.plan("auto", "float32") == ("openvino", "float32")
    assert runtimes.plan("auto", "auto") == ("openvino", "bfloat16")  # OpenVINO's hint, as TensorFlow's rewrite
    assert runtimes.plan("onnxruntime", "auto") == ("onnxruntime", "float32")  # float32 only on CPUs
    assert runtimes.plan("auto", "auto", strategy="mirrored")[0] == "tensorflow"
    with pytest.raises(SettingError, match="onnxruntime computes in float32"):
        runtimes.plan("onnxruntime", "bfloat16")
    with pytest.raises(SettingError, match="--strategy"):
        runtimes.plan("openvino", "float32", strategy="mirrored")
    monkeypatch.setattr(precision, "cpu_bfloat16", lambda: False)
    assert runtimes.plan("openvino", "auto") == ("openvino", "float32")
    with pytest.raises(SettingError, match="openvino computes bfloat16 only"):
        runtimes.plan("openvino", "bfloat16")
    monkeypatch.setattr(precision, "gpu_tensor_cores", lambda: True)  # a GPU: TensorFlow unless asked
    assert runtimes.plan("auto", "float32") == ("tensorflow", "float32")
    monkeypatch.setattr(runtimes, "installed", lambda r: r == "tensorflow")
    monkeypatch.setattr(precision, "gpu_tensor_cores", lambda: None)
    assert runtimes.plan("auto", "float32") == ("tensorflow", "float32")  # nothing else installed
    monkeypatch.setenv(runtimes.AUTO_ENV, "tensorflow")
    assert runtimes.plan("auto", "float32") == ("tensorflow", "float32")
    assert_clean_error(run_cli("extract-features", "--runtime", "tvm"), "--runtime 'tvm'", "openvino")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_conversion_cache_reused_then_rebuilt_when_damaged_or_stale(runtime, tmp_path, caplog):
    from dogtl.core.conversions import model_digest
    from dogtl.core.runtimes import frozen_forward

    _needs(runtime)
    caplog.set_level(logging.INFO, logger="dogtl.core.conversions")
    model, x = _tiny(), _batch()
    want = np.asarray(model(x))
    first = frozen_forward(model, runtime=runtime, precision="float32", label="tiny", cache_dir=tmp_path)
    assert first.runtime == runtime and first.fell_back is None
    np.testing.assert_allclose(first(x), want, rtol=1e-4, atol=1e-5)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    files = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    caplog.clear()
    again = frozen_forward(_tiny(), runtime=runtime, precision="float32", label="tiny", cache_dir=tmp_path)
    assert any("reusing" in r.message for r in caplog.records)  # the same model built again: no conversion
    assert not any("converting" in r.message for r in caplog.records)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == files
    np.testing.assert_allclose(again(x), want, rtol=1e-4, atol=1e-5)

    assert model_digest(_tiny(seed=1)) != model_digest(model) == model_digest(_tiny())  # keyed by the weights

    model_file = entry / ("model.onnx" if runtime == "onnxruntime" else "model.bin")
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    model_file.write_bytes(bytes(data))
    caplog.clear()
    rebuilt = frozen_forward(model, runtime=runtime, precision="float32", label="tiny", cache_dir=tmp_path)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0] and model_file.name in warnings[0], warnings
    np.testing.assert_allclose(rebuilt(x), want, rtol=1e-4, atol=1e-5)

    meta = json.loads((entry / "entry.json").read_text())
    meta["key"]["versions"]["keras"] = "0.0.1"  # made by another converter version
    (entry / "entry.json").write_text(json.dumps(meta))
    caplog.clear()
    frozen_forward(model, runtime=runtime, precision="float32", label="tiny", cache_dir=tmp_path)
    assert any("stale" in r.message for r in caplog.records if r.levelno == logging.WARNING)
    assert json.loads((entry / "entry.json").read_text())["key"]["versions"]["keras"] != "0.0.1"

    # Called from several threads at once (fine-tuning: tf.data's thread and validation's), as
    # OpenVINO's one infer request was not: "Infer Request is busy".
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: rebuilt(x), range(32)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_model_keyed_by_its_identity_is_built_only_to_convert_it(tmp_path):
    """frozen_forward(build, identity=...): the conversion cache's entry is found by the identity,
    so the model is built on a miss (to convert it) or on TensorFlow, never on a hit; another
    identity is another entry."""
    from dogtl.core.runtimes import frozen_forward

    _needs("openvino")
    built, x = [], _batch()

    def forward(seed, runtime="openvino"):
        return frozen_forward(lambda: built.append(seed) or _tiny(seed=seed), runtime=runtime, precision="float32",
                              label="tiny", cache_dir=tmp_path, identity={"tiny": seed})

    for seed, builds in ((0, [0]), (0, [0]), (1, [0, 1])):  # converted, found, another entry converted
        got = forward(seed)
        assert got.runtime == "openvino" and built == builds
        np.testing.assert_allclose(got(x), np.asarray(_tiny(seed=seed)(x)), rtol=1e-4, atol=1e-5)
    assert len([p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2
    assert forward(0, "tensorflow").runtime == "tensorflow" and built == [0, 1, 0]


SIGNAL_AFTER_TWO_MODELS = """
import gc, os, signal, sys, time
import keras, numpy as np
from dogtl.core.runtimes import frozen_forward

def tiny(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))

x = np.zeros((2, 12, 12, 3), np.float32)
first, second = (frozen_forward(tiny(seed), runtime="openvino", precision="float32", label=f"tiny{seed}",
                                cache_dir=sys.argv[1]) for seed in (0, 1))
assert first.runtime == second.runtime == "openvino", (first.fell_back, second.fell_back)
first(x), second(x)
del first  # freed in the order they were made
gc.collect()
del second
gc.collect()
got = []
signal.signal(signal.SIGINT, lambda number, frame: got.append(number))
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.1)
print("handled", got)
"""


def test_a_signal_after_two_openvino_models_were_freed_is_handled_not_a_crash(tmp_path):
    """Each OpenVINO Core swapped its own alternate signal stack into the thread that loaded its
    CPU plugin and put back the previous one when freed: two freed in the order made left a
    freed stack in place, and the next Ctrl-C or SIGTERM was a SIGSEGV (returncode -11). One Core
    per process (core/forward.openvino_core) keeps it valid. In a process of its own: the crash
    takes the process down."""
    import subprocess
    import sys

    _needs("openvino")
    run = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_TWO_MODELS, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "handled [2]" in run.stdout, (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_model_the_runtime_cannot_convert_runs_on_tensorflow_saying_so(runtime, tmp_path, caplog):
    import tensorflow as tf

    from dogtl.core.runtimes import frozen_forward

    _needs(runtime)
    model = _tiny(op=lambda t: tf.math.bessel_i0e(t))  # no converter has a rule for BesselI0e
    forward = frozen_forward(model, runtime=runtime, precision="float32", label="bessel", cache_dir=tmp_path)
    assert forward.runtime == "tensorflow" and forward.fell_back
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"{runtime} cannot run bessel") and "running it on tensorflow" in warnings[0]
    with forward:
        np.testing.assert_allclose(forward(_batch()), np.asarray(model(_batch())), rtol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-made left behind


@pytest.mark.parametrize("runtime", ["openvino", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_extracted_features_equal_tensorflows(runtime, stage3, tmp_path):
    """The stage3 cache was extracted on TensorFlow in float32: the same settings on `runtime`
    give the same features (cosine >= 0.9999 per image) and record the runtime, and the cache
    made on one runtime is up to date for another (recorded, not refused)."""
    from dogtl.core.conversions import agreement
    from dogtl.features.cache import open_cache

    _needs(runtime)
    reference = open_cache(stage3.cache)
    out = tmp_path / "features.h5"
    args = ["--data", stage3.data, "--backbone", "mobilenet_v2", "--weights", stage3.weights, "--image-size", 48,
            "--passes", 1, "--tta-passes", 1, "--batch-size", 8, "--val-fraction", 0.25, "--seed", 0, "--dtype", "float32",
            "--precision", "float32"]
    result = run_cli("extract-features", "--cache", out, *args, "--runtime", runtime)
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    assert cache.fingerprint["runtime"] == runtime and cache.versions["runtime"].startswith(runtime)
    assert reference.fingerprint["runtime"] == "tensorflow"
    assert list(cache.ids) == list(reference.ids)
    for split, passes in (("labelled", 2), ("test", 2)):
        for p in range(passes):
            got, want = cache.features(split, passes=[p])[0], reference.features(split, passes=[p])[0]
            assert np.std(want, axis=0).mean() > 1e-3  # the features tell images apart
            check = agreement(got, want)
            assert check["cosine"] >= 0.9999 and check["relative"] < 1e-3, (split, p, check)
    again = run_cli("extract-features", "--cache", out, *args, "--runtime", "tensorflow")
    assert again.exit_code == 0 and "already up to date" in again.output, again.output


def test_an_update_on_openvino_equals_a_fresh_tensorflow_extraction(stage3, tmp_path, monkeypatch):
    """The stage3 cache (TensorFlow) updated on OpenVINO after an image was added, one removed
    and one relabelled: only the new image runs on OpenVINO, the other rows are copied bit for
    bit, and the result is a fresh TensorFlow extraction of the new list row for row (its
    computed rows within the runtimes' rounding). The backbone is built only to convert it: the
    same update again finds the converted copy by the backbone's identity and builds nothing."""
    import shutil

    import pandas as pd
    from PIL import Image

    from dogtl.core.conversions import agreement
    from dogtl.features import extract
    from dogtl.features.cache import open_cache

    _needs("openvino")
    monkeypatch.setenv("DOGTL_RUNTIME_CACHE", str(tmp_path / "runtimes"))  # converted in this test
    built, build = [], extract.build_backbone
    monkeypatch.setattr(extract, "build_backbone", lambda *a, **k: built.append(a) or build(*a, **k))
    data = shutil.copytree(stage3.data, tmp_path / "data")
    table = pd.read_csv(data / "labels.csv", dtype=str)
    removed, new = table["id"][2], table["id"][0]  # and row 5 relabelled
    shutil.copy(data / "train" / f"{new}.jpg", data / "train" / "new_a.jpg")
    Image.open(data / "train" / "new_a.jpg").transpose(Image.Transpose.ROTATE_90).save(data / "train" / "new_a.jpg")
    table.loc[5, "breed"] = table["breed"][table["breed"] != table["breed"][5]].iloc[0]
    table = pd.concat([table.iloc[:4], pd.DataFrame([["new_a", table["breed"][0]]], columns=table.columns),
                       table.iloc[4:]])
    table[table["id"] != removed].to_csv(data / "labels.csv", index=False)
    (data / "train" / f"{removed}.jpg").unlink()
    args = ["--data", data, "--backbone", "mobilenet_v2", "--weights", stage3.weights, "--image-size", 48,
            "--passes", 1, "--tta-passes", 1, "--batch-size", 8, "--val-fraction", 0.25, "--seed", 0, "--dtype", "float32",
            "--precision", "float32"]  # stage3's settings
    updated, fresh = shutil.copy(stage3.cache, tmp_path / "updated.h5"), tmp_path / "fresh.h5"
    result = run_cli("extract-features", "--cache", updated, *args, "--runtime", "openvino")
    assert result.exit_code == 0, result.output
    assert "+1 images, 1 relabelled, 1 removed: extracting 1" in result.output
    assert "(1 images computed, 27 copied" in result.output, result.output
    assert len(built) == 1  # to convert it
    again = shutil.copy(stage3.cache, tmp_path / "again.h5")
    result = run_cli("extract-features", "--cache", again, *args, "--runtime", "openvino")
    assert result.exit_code == 0 and "(1 images computed, 27 copied" in result.output, result.output
    assert len(built) == 1  # the converted copy found without building the backbone
    np.testing.assert_array_equal(open_cache(again).features(), open_cache(updated).features())
    result = run_cli("extract-features", "--cache", fresh, *args, "--runtime", "tensorflow")
    assert result.exit_code == 0, result.output

    up, ref, old = open_cache(updated), open_cache(fresh), open_cache(stage3.cache)
    assert up.fingerprint == {**ref.fingerprint, "runtime": "openvino"}
    assert up.classes == ref.classes and list(up.ids) == list(ref.ids) and list(up.test_ids) == list(ref.test_ids)
    np.testing.assert_array_equal(up.labels, ref.labels)
    np.testing.assert_array_equal(up.is_val, ref.is_val)
    for name in ("index", "key", "sha256"):
        np.testing.assert_array_equal(up.column("labelled", name), ref.column("labelled", name))
    np.testing.assert_array_equal(up.features("test"), old.features("test"))  # the test images: all copied
    ids = list(up.ids)
    computed = ids.index("new_a")
    kept = [i for i in range(len(ids)) if i != computed]
    np.testing.assert_array_equal(up.features()[:, kept], old.features()[:, [list(old.ids).index(ids[i]) for i in kept]])
    check = agreement(up.features()[:, computed], ref.features()[:, computed])  # its clean and augmented pass
    assert check["cosine"] >= 0.9999 and check["relative"] < 1e-3, check


def test_extraction_with_a_missing_runtime_says_how_to_install_it(monkeypatch, synthetic_data, tmp_path):
    from dogtl.core import runtimes

    monkeypatch.setattr(runtimes, "missing", lambda runtime: "onnxruntime" if runtime == "onnxruntime" else None)
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "f.h5", *CHEAP,
                     "--runtime", "onnxruntime")
    assert_clean_error(result, "needs onnxruntime", r"pip install 'dogtl\[onnx\]'")


@pytest.mark.slow
def test_predict_and_evaluate_on_openvino_equal_tensorflow(stage3, tmp_path):
    """A head on images (backbone + head converted as one model): the submission and the
    evaluation report equal TensorFlow's, and say which runtime ran them."""
    import pandas as pd

    _needs("openvino")
    rows = {}
    for runtime in ("tensorflow", "openvino"):
        out = tmp_path / f"{runtime}.csv"
        result = run_cli("predict", "--model", stage3.head, "--data", stage3.data, "--no-cache", "--out", out,
                         "--runtime", runtime, "--precision", "float32")
        assert result.exit_code == 0 and f"images on {runtime}" in result.output, result.output
        rows[runtime] = pd.read_csv(out)
        report = tmp_path / runtime
        result = run_cli("evaluate", "--model", stage3.head, "--data", stage3.data, "--out", report,
                         "--runtime", runtime, "--precision", "float32")
        assert result.exit_code == 0, result.output
        rows[runtime + "-eval"] = json.loads(report.with_suffix(".eval.json").read_text())
    np.testing.assert_allclose(rows["openvino"].iloc[:, 1:], rows["tensorflow"].iloc[:, 1:], rtol=1e-3, atol=2e-4)
    ov, tf = rows["openvino-eval"], rows["tensorflow-eval"]
    assert ov["runtime"] == "openvino" and tf["runtime"] == "tensorflow"
    assert ov["accuracy"] == tf["accuracy"] and abs(ov["log_loss"] - tf["log_loss"]) < 1e-4


# What each converter manages, measured with OpenVINO 2026.4 and tf2onnx 1.17 (docs/runtimes.md).
CANNOT = {("convnext_tiny", "onnxruntime"): "Erfc"}  # tf2onnx has no rule for GELU's Erfc


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("backbone", ["xception", "resnet50", "mobilenet_v2", "efficientnet_v2_b0", "convnext_tiny"])
def test_backbones_convert_or_fall_back_as_documented(backbone, runtime, tmp_path):
    from dogtl.core.models import build_backbone, calibrate_batchnorm
    from dogtl.core.backbones import get_backbone
    from dogtl.core.conversions import agreement
    from dogtl.core.runtimes import frozen_forward

    _needs(runtime)
    spec = get_backbone(backbone)
    size = max(spec.min_size, 64)
    model = build_backbone(spec, "none", size)
    x = np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
    calibrate_batchnorm(model, x)
    forward = frozen_forward(model, runtime=runtime, precision="float32", label=backbone, cache_dir=tmp_path)
    if (backbone, runtime) in CANNOT:
        assert forward.runtime == "tensorflow" and CANNOT[backbone, runtime] in forward.fell_back
        return
    assert forward.runtime == runtime, forward.fell_back
    check = agreement(forward(x), np.asarray(model(x)))
    assert check["cosine"] >= 0.9999 and check["relative"] < 1e-3, check
