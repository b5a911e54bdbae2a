"""dogtl export: the SavedModel gives dogtl predict's probabilities; the TFLite file agrees on top-1."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import _tiny
from conftest import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny.model_path()


@pytest.fixture(scope="module")
def serving_model():
    return _tiny.serving_model()


@pytest.fixture(scope="module")
def serving_images():
    return list(_tiny.images())

DECODABLE = ("rgb", "png", "grey", "cmyk", "png16", "rgba", "gif", "huge")


@pytest.fixture(scope="module")
def saved_model(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    result = run_cli("export", tiny_model, "--format", "savedmodel", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def loaded(saved_model):
    import tensorflow as tf

    return tf.saved_model.load(str(saved_model / "1"))


@pytest.fixture(scope="module")
def tflite(tiny_model, serving_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "tiny.tflite"
    args = [a for p in serving_images for a in ("--check-images", p)]
    result = run_cli("export", tiny_model, "--format", "tflite", "--out", out, *args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_savedmodel_equals_dogtl_predict(saved_model, loaded, serving_model, serving_images, odd_images):
    import tensorflow as tf

    from dogtl.evaluation.inference import predict_images
    from dogtl.evaluation.predict import predict_top_k
    from dogtl.evaluation.settings import PredictConfig

    assert (saved_model / "1" / "saved_model.pb").is_file()  # TF Serving's layout: BASE/VERSION/
    assert (saved_model / "labels.txt").read_text().split() == serving_model.classes
    paths = list(serving_images) + [odd_images[name] for name in DECODABLE]
    out = loaded.signatures["serving_default"](images=tf.constant([p.read_bytes() for p in paths]))
    sm = serving_model
    expected, ok = predict_images(sm.model, paths, sm.inputs[0].spec, sm.size)
    assert ok.all()
    probs = out["probabilities"].numpy()
    assert probs.shape == (len(paths), len(sm.classes))
    np.testing.assert_allclose(probs, expected, rtol=1e-3, atol=2e-4)  # graph vs eager kernels
    assert np.ptp(probs[:, 0]) > 0.05  # the images really are told apart, so equality means something
    top = predict_top_k(PredictConfig(model=str(sm.path), images=tuple(str(p) for p in paths), top_k=3))
    names = out["classes"].numpy().astype(str)
    for row, want in zip(names, top):
        assert list(row[:3]) == want.classes
    np.testing.assert_allclose(out["scores"].numpy()[:, 0], probs.max(1), atol=1e-6)


def test_savedmodel_refuses_bad_image_and_overwrite(saved_model, loaded, tiny_model, odd_images):
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](images=tf.constant([odd_images["bad_not_image"].read_bytes()]))
    # What an export killed at its end left (its pid is gone) goes, even when the rerun is refused.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (saved_model / f"1.tmp-{gone}").mkdir()
    (saved_model / f"labels.tmp-{gone}.txt").write_text("a")
    assert_clean_error(run_cli("export", tiny_model, "--out", saved_model), "exists", "--force")
    assert sorted(p.name for p in saved_model.iterdir()) == ["1", "labels.txt"]


def test_tflite_uint8_input_labels_and_check(tflite, serving_model, serving_images):
    from dogtl.serving.export import check_tflite, labels_path, tflite_interpreter

    path, output = tflite
    assert "deprecated" not in output  # tf.lite.Interpreter's warning: LiteRT's interpreter checks the model
    assert labels_path(path).read_text().split() == serving_model.classes
    interpreter = tflite_interpreter(path)
    (inp,) = interpreter.get_input_details()
    assert inp["dtype"] == np.uint8 and list(inp["shape"]) == [1, 32, 32, 3]
    assert "top-1 agreement with the Keras model 100.0%" in output, output
    check = check_tflite(path, serving_model, serving_images)
    assert check.images == len(serving_images) and check.top1_agreement == 1.0
    # Rounding the resized pixels to uint8 moves this random network's probabilities a little; the
    # conversion itself changes next to nothing:
    assert check.top1_same_pixels == 1.0 and check.max_abs_diff_same_pixels < 1e-3


@pytest.mark.parametrize("args, needles", [
    (["--format", "pb"], ["--format 'pb'", "savedmodel", "openvino"]),
    (["--format", "onnx", "--out", "x.xml"], [r"must end in \.onnx"]),
    (["--quantize", "dynamic"], ["--quantize applies to --format tflite"]),
    (["--format", "tflite", "--quantize", "int4"], ["--quantize 'int4'", "float16"]),
    (["--format", "tflite", "--out", "x.bin"], [r"must end in \.tflite"]),
])
def test_export_bad_options(tiny_model, tmp_path, args, needles):
    args = [a if a not in ("x.bin", "x.xml") else tmp_path / a for a in args]
    assert_clean_error(run_cli("export", tiny_model, *args), *needles)


def test_export_missing_model(tmp_path):
    assert_clean_error(run_cli("export", tmp_path / "nope.keras", "--out", tmp_path / "o"), "no such model file")


def test_head_model_deploys_with_its_backbone(stage3):
    """A head file: the deployable model is backbone + head, and export finds its validation images."""
    from dogtl.evaluation.predict import predict_top_k
    from dogtl.evaluation.settings import PredictConfig
    from dogtl.serving.app import Predictor
    from dogtl.serving.export import validation_images
    from dogtl.serving.model import load_serving_model

    sm = load_serving_model(stage3.head)
    assert sm.model.input.shape[1:] == (48, 48, 3) and sm.inputs[0].spec.name == "mobilenet_v2"
    val = validation_images(sm, stage3.data)
    assert val and all(p.parent.name == "train" for p in val)
    sm.metadata.settings = {**(sm.metadata.settings or {}), "data": str(stage3.data)}  # as a fine-tuned model records it
    assert validation_images(sm) == val  # no --data: the folder the model was trained on
    predictor = Predictor(sm, top_k=3)
    row = predictor.predict(tuple(x[None] for x in predictor.decode(val[0].read_bytes())))[0]
    want = predict_top_k(PredictConfig(model=str(stage3.head), images=(str(val[0]),), top_k=3))[0]
    assert [p["class"] for p in predictor.top(row)] == want.classes
    np.testing.assert_allclose([p["probability"] for p in predictor.top(row)], want.probabilities, rtol=1e-3, atol=2e-4)


# ----------------------------------------------------------------------------- ONNX and OpenVINO

@pytest.fixture(scope="module", params=["onnx", "openvino"])
def runtime_export(request, tiny_model, serving_images, tmp_path_factory):
    """(format, exported file, export's output): `dogtl export --format onnx|openvino`, checked on the images."""
    from dogtl.core.runtimes import installed
    from dogtl.serving.export import RUNTIME_OF, SUFFIX

    fmt = request.param
    if not installed(RUNTIME_OF[fmt]):
        pytest.skip(f"{RUNTIME_OF[fmt]} is not installed (pip install 'dogtl[onnx]' or openvino); .ci/run installs it")
    out = tmp_path_factory.mktemp(fmt) / f"tiny{SUFFIX[fmt]}"
    args = [a for p in serving_images for a in ("--check-images", p)]
    result = run_cli("export", tiny_model, "--format", fmt, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return fmt, out, result.output


def test_onnx_and_openvino_exports_agree_with_keras(runtime_export, serving_model, serving_images):
    """The exported file takes decoded pixels and gives dogtl predict's probabilities; the export's
    own check says so, and its labels and metadata lie beside it."""
    import tensorflow as tf

    from dogtl.core.runtimes import file_forward
    from dogtl.evaluation.inference import predict_images
    from dogtl.core.metadata import metadata_path
    from dogtl.serving.export import labels_path
    from dogtl.serving.model import encoded_to_pixels

    fmt, path, output = runtime_export
    assert "top-1 agreement with the Keras model 100.0%" in output, output
    assert labels_path(path).read_text().split() == serving_model.classes
    meta = json.loads(metadata_path(path).read_text())
    assert meta["classes"] == serving_model.classes and meta["inputs"] == [{"backbone": "mobilenet_v2", "size": 32,
                                                                            "name": "pixels"}]
    if fmt == "openvino":
        assert path.with_suffix(".bin").stat().st_size > 1e6  # the weights
    pixels = np.stack([encoded_to_pixels(tf.constant(p.read_bytes()), serving_model.inputs)[0].numpy()
                       for p in serving_images])
    assert pixels.max() > 100  # 0-255 pixels, not preprocessed
    got = file_forward(path, "auto", "float32")(pixels)
    want, ok = predict_images(serving_model.model, serving_images, serving_model.inputs[0].spec, serving_model.size)
    assert ok.all() and np.ptp(want[:, 0]) > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4)


def test_serve_serves_the_exported_file(runtime_export, serving_images):
    """`dogtl serve tiny.onnx|.xml`: no Keras model; the same answers as the .keras model's server."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'dogtl[serve]'")
    from fastapi.testclient import TestClient

    from dogtl.serving.app import create_app
    from dogtl.serving.model import load_serving_model

    fmt, path, _ = runtime_export
    sm = load_serving_model(path)
    assert sm.model is None and sm.exported == fmt and sm.classes == _tiny.CLASSES
    with TestClient(create_app(sm)) as exported, TestClient(create_app(_tiny.serving_model(), runtime="tensorflow")) as keras_app:
        health = exported.get("/health").json()
        assert health["runtime"] == ("onnxruntime" if fmt == "onnx" else "openvino") and health["model"] == "tiny"
        for p in serving_images[:4]:
            a = exported.post("/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
            b = keras_app.post("/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
            assert [x["class"] for x in a["predictions"]] == [x["class"] for x in b["predictions"]]
            np.testing.assert_allclose([x["probability"] for x in a["predictions"]],
                                       [x["probability"] for x in b["predictions"]], rtol=1e-3, atol=2e-4)
    missing = path.with_name("lost" + path.suffix)
    missing.write_bytes(path.read_bytes())
    assert_clean_error(run_cli("serve", missing), "cannot read its metadata", "export the model again")


def test_serve_runs_a_keras_models_backbone_on_openvino(runtime_export, serving_images):
    """`dogtl serve model.keras --runtime openvino`: the model converted (the export's conversion,
    reused from the conversion cache), the same probabilities as on TensorFlow."""
    from dogtl.serving.app import Predictor

    fmt, _, _ = runtime_export
    if fmt != "openvino":
        pytest.skip("one runtime is enough here")
    on_tf, on_ov = Predictor(_tiny.serving_model(), runtime="tensorflow"), Predictor(_tiny.serving_model(),
                                                                                     runtime="openvino")
    assert on_ov.runtime == "openvino" and on_tf.runtime == "tensorflow"
    inputs = [on_tf.decode(p.read_bytes()) for p in serving_images]
    stacked = tuple(np.stack(parts) for parts in zip(*inputs))
    np.testing.assert_allclose(on_ov.predict(stacked), on_tf.predict(stacked), rtol=1e-3, atol=2e-4)
