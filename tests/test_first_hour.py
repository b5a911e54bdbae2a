"""A new user's first hour (issue 24): every friction they met, each fixed and held here.

The end-to-end test runs the real command in a subprocess with its output going to files, as
under nohup or CI: no TensorFlow start-up noise, plain progress lines, a random backbone made
useful by calibration, the ImageFolder layout's own validation split.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_clean_error, run_cli
from PIL import Image

from dogtl.core.errors import DataError
from dogtl.data.folders import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def _dogtl(*args, env=None, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    """`python [-X importtime] -m dogtl ARGS` in a subprocess, output captured (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **(env or {})}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell: dogtl itself must keep TensorFlow quiet
    kwargs.setdefault("capture_output", True)
    return subprocess.run([sys.executable, *map(str, args)], env=env, cwd=cwd, text=True, timeout=600, **kwargs)


def _shapes(folder: Path, names, size: int = 48, seed: int = 0, suffix: str = ".jpg"):
    """One small drawn image per name (class k: a square of colour k on noise)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, k in names:
        image = Image.fromarray(rng.integers(0, 90, (size, size, 3), dtype=np.uint8))
        colour = [(220, 40, 40), (40, 200, 60), (50, 70, 230)][k % 3]
        d = 8 + int(rng.integers(0, 10))
        ImageDraw.Draw(image).rectangle([d, d, size - d, size - d], fill=colour)
        path = folder / (name if Path(name).suffix else name + suffix)
        image.save(path)


def _image_folder(root: Path, train: int = 6, val: int = 2, test: int = 3) -> Path:
    for k, cls in enumerate(["beagle", "corgi", "pug"]):
        _shapes(root / "train" / cls, [(f"t{k}_{j}", k) for j in range(train)], seed=k)
        _shapes(root / "val" / cls, [(f"v{k}_{j}", k) for j in range(val)], seed=10 + k, suffix=".png")
    _shapes(root / "test", [(f"q{j}", j) for j in range(test)], seed=20)
    return root


# --- 1: --weights none, degenerate features, a head at chance ------------------------------------

def test_first_hour_end_to_end_with_output_to_files(tmp_path):
    """ImageFolder data, `--weights none`, output redirected: the note, the validation folder,
    plain progress lines, no TensorFlow noise; then a head, evaluate MODEL and a submission
    from the cache alone."""
    data = _image_folder(tmp_path / "data")
    cache = tmp_path / "cache" / "features.h5"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        done = _dogtl("-m", "dogtl", "extract-features", "--data", data, "--cache", cache, "--backbone",
                      "mobilenet_v2", "--weights", "none", "--image-size", 32, "--passes", 1, "--batch-size", 4,
                      env={"DOGTL_PROGRESS_SECONDS": "0"}, stdout=out, stderr=err, capture_output=False)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert done.returncode == 0, stdout + stderr
    assert "note: --weights none: a random backbone, its BatchNorm statistics taken from 24 labelled images" \
           in stdout and "features.random-backbone.weights.h5" in stdout
    assert "validation split: the data's own validation folder (6 images; --val-fraction is not used)" in stdout
    progress = [line for line in stderr.splitlines() if line.startswith("extracting: ")]
    assert progress[0] == "extracting: 0/51 images (0%)" and progress[-1].startswith("extracting: 51/51 images (100%)")
    assert any("images/s" in line and "ETA" in line for line in progress[1:-1]), progress
    for noise in ("oneDNN", "cuda", "absl", "TensorFlow binary", "WARNING: All log"):
        assert noise not in stdout + stderr, (noise, stderr)

    from dogtl.features.cache import open_cache
    from dogtl.features.signal import spread

    c = open_cache(cache)
    assert [i for i, v in zip(c.ids, c.is_val) if v] == sorted(i for i in c.ids if i.startswith("val/"))
    assert c.fingerprint["data_layout"] == "imagefolder" and c.fingerprint["weights"].startswith("file:")
    assert spread([c.features("labelled", passes=[0])[0]]).degenerate() is None  # calibrated: real spread

    head = tmp_path / "models" / "head.keras"
    assert run_cli("train-head", "--cache", cache, "--out", head, "--epochs", 5).exit_code == 0
    evaluated = run_cli("evaluate", head, "--out", tmp_path / "reports" / "head")  # the model first; folder made
    assert evaluated.exit_code == 0 and (tmp_path / "reports" / "head.eval.png").exists(), evaluated.output
    submission = tmp_path / "subs" / "submission.csv"
    predicted = run_cli("predict", head, "--data", tmp_path / "elsewhere", "--out", submission)  # no test/ there
    assert predicted.exit_code == 0 and "cached features" in predicted.stdout, predicted.output
    assert sorted(pd.read_csv(submission)["id"]) == ["q0", "q1", "q2"]


def test_degenerate_features_are_refused_at_extraction_and_training(synthetic_data, tmp_path):
    """A backbone whose weights carry no signal (all zero here) gives the same features for
    every image: extraction stops after the clean pass; train-head refuses such a cache."""
    from dogtl.core.models import build_backbone
    from dogtl.core.backbones import get_backbone
    from dogtl.features.synthetic import write_feature_cache

    model = build_backbone(get_backbone("resnet50"), "none", 32)
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    weights = tmp_path / "zeros.weights.h5"
    model.save_weights(weights)
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "c.h5", "--backbone",
                     "resnet50", "--weights", weights, "--image-size", 32, "--passes", 0, "--batch-size", 8)
    assert_clean_error(result, r"resnet50 with --weights .*zeros\.weights\.h5 gives degenerate features: every "
                               r"feature of the 24 clean training images is 0\. A head cannot learn from them")
    assert not (tmp_path / "c.h5").exists()

    flat = write_feature_cache(tmp_path / "flat.h5", pass_transform=lambda p, x, y, v: np.full_like(x, 1e-9))
    assert_clean_error(run_cli("train-head", "--cache", flat, "--out", tmp_path / "h.keras"),
                       r"flat\.h5 holds degenerate features: the features hardly differ between the 90 clean "
                       r"training images .* re-extract with weights that carry signal")


def test_a_head_at_chance_level_says_so(tmp_path, caplog):
    from dogtl.features.synthetic import write_feature_cache

    noise = write_feature_cache(tmp_path / "noise.h5", num_classes=4, separation=0.0)  # no signal in the features
    with caplog.at_level(logging.WARNING, logger="dogtl.head.train"):
        result = run_cli("train-head", "--cache", noise, "--out", tmp_path / "h.keras", "--epochs", 3)
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if "chance level" in r.getMessage()]
    assert len(warned) == 1 and re.search(r"against 1\.3\d", warned[0]), warned  # ~ln 4: class frequencies alone

    signal = write_feature_cache(tmp_path / "signal.h5", num_classes=4, separation=3.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dogtl.head.train"):
        assert run_cli("train-head", "--cache", signal, "--out", tmp_path / "g.keras", "--epochs", 3).exit_code == 0
    assert not [r for r in caplog.records if "chance level" in r.getMessage()]


# --- 2: data layouts ------------------------------------------------------------------------------

def test_labels_csv_columns_are_recognised_or_named_and_ids_may_carry_an_extension(tmp_path):
    root = tmp_path / "kaggle"
    rows = [(f"img{j}", ["cat", "dog"][j % 2]) for j in range(6)]
    for j, (name, _) in enumerate(rows):  # any image suffix the readers take; ids with and without it
        _shapes(root / "train", [(name, j % 2)], seed=j, suffix=[".jpg", ".png", ".webp"][j % 3])
    ids = [f"{name}.png" if j % 3 == 1 else name for j, (name, _) in enumerate(rows)]
    pd.DataFrame({"image": ids, "species": [r[1] for r in rows], "source": "web"}).to_csv(root / "labels.csv",
                                                                                         index=False)
    d = load_dataset(root)
    assert d.columns == ("image", "species") and d.classes == ("cat", "dog") and list(d.ids) == ids
    assert [p.name for p in d.paths] == ["img0.jpg", "img1.png", "img2.webp", "img3.jpg", "img4.png", "img5.webp"]

    table = pd.read_csv(root / "labels.csv").rename(columns={"image": "photo", "species": "kind"})
    table.to_csv(root / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"labels\.csv: cannot tell which column holds the image ids and the labels "
                                        r"\(found: photo, kind, source\): name them with --id-column NAME "
                                        r"--label-column NAME"):
        load_dataset(root)
    assert load_dataset(root, "photo", "kind").columns == ("photo", "kind")
    with pytest.raises(DataError, match=r"has no column 'breed' \(--label-column; found: photo, kind, source\)"):
        load_dataset(root, "photo", "breed")
    table[["photo", "kind"]].to_csv(root / "labels.csv", index=False)  # two columns: ids, then labels
    assert load_dataset(root).columns == ("photo", "kind")


def test_image_folder_layout_uses_its_own_validation_folder(tmp_path):
    root = _image_folder(tmp_path / "data", train=3, val=2, test=2)
    d = load_dataset(root)
    assert d.layout == "imagefolder" and d.classes == ("beagle", "corgi", "pug")
    assert [i for i, v in zip(d.ids, d.is_val) if v] == [f"val/{c}/v{k}_{j}" for k, c in enumerate(d.classes)
                                                         for j in range(2)]
    assert int((~d.is_val).sum()) == 9 and list(d.test_ids) == ["q0", "q1"]
    _shapes(root / "val" / "husky", [("h0", 0)])
    with pytest.raises(DataError, match=r"val/husky|class folder\(s\) husky have no images in .*train"):
        load_dataset(root)


# --- 3: plain progress lines ------------------------------------------------------------------------

def test_plain_progress_prints_start_every_interval_and_end_once(capsys):
    from dogtl.core.progress import PlainProgress

    now = [0.0]
    bar = PlainProgress("extracting", every=30, clock=lambda: now[0])
    for t, done in [(0, 100), (10, 200), (31, 400), (45, 500), (70, 900), (80, 1000), (81, 1000)]:
        now[0] = t
        bar.update(done, 1000)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["extracting: 100/1000 images (10%)",
                     "extracting: 400/1000 images (40%), 9.7 images/s, 31s elapsed, ETA 1m02s",
                     "extracting: 900/1000 images (90%), 11.4 images/s, 1m10s elapsed, ETA 9s",
                     "extracting: 1000/1000 images (100%), 11.2 images/s, 1m20s elapsed"]


# --- 4: settings checked before TensorFlow loads ---------------------------------------------------

def test_a_wrong_setting_is_answered_before_tensorflow_loads(tmp_path):
    wrong = _dogtl("-X", "importtime", "-m", "dogtl", "train-head", "--optimizer", "Adamx", "--cache", "nope.h5",
                   cwd=tmp_path)
    assert wrong.returncode == 2
    assert "error: --optimizer 'Adamx': choose one of rmsprop, adam, sgd" in wrong.stderr
    assert "| tensorflow" not in wrong.stderr  # -X importtime lists every module imported
    any_case = _dogtl("-X", "importtime", "-m", "dogtl", "train-head", "--optimizer", "ADAM", "--cache", "nope.h5",
                      cwd=tmp_path)  # accepted: the next problem is the missing cache, still without TensorFlow
    assert "error: nope.h5: no feature cache there" in any_case.stderr and "| tensorflow" not in any_case.stderr

    from dogtl.head.settings import HeadConfig

    assert HeadConfig(optimizer="RMSprop", schedule="Triangular2").optimizer == "rmsprop"


# --- 5: output folders -------------------------------------------------------------------------------

def test_output_folders_are_made_as_needed(tmp_path):
    from dogtl.features.synthetic import write_feature_cache

    cache = write_feature_cache(tmp_path / "c.h5")
    plot = tmp_path / "new" / "plots" / "lr.png"
    result = run_cli("lr-find", "--cache", cache, "--out", plot, "--steps", 20)
    assert result.exit_code == 0 and plot.is_file(), result.output


# --- 7: one model argument ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "export", "serve", "predict"])
def test_the_model_comes_first_and_model_is_the_same(command, tmp_path):
    result = run_cli(command, tmp_path / "a.keras", "--model", tmp_path / "b.keras")
    assert_clean_error(result, r"two models given, .*a\.keras and --model .*b\.keras: pass one")
    assert_clean_error(run_cli(command, "--model", tmp_path / "b.keras"), r"b\.keras")  # the alias is the model


def test_finetune_takes_the_head_first_and_ensemble_takes_model_options(tmp_path):
    assert_clean_error(run_cli("finetune", tmp_path / "a.keras", "--head", tmp_path / "b.keras"),
                       r"two heads given, .*a\.keras and --head .*b\.keras: pass one")
    assert_clean_error(run_cli("ensemble", "--model", tmp_path / "a.keras", "--model", tmp_path / "b.keras"),
                       r"a\.keras")


# --- 8: help and packaging ------------------------------------------------------------------------

def test_version_python_m_completion_backbone_help_and_rich(tmp_path):
    from dogtl import __version__
    from dogtl.core.backbones import BACKBONES

    version = _dogtl("-m", "dogtl", "--version")
    assert version.returncode == 0 and version.stdout.startswith(f"dogtl {__version__}, tensorflow ")
    completion = _dogtl("-m", "dogtl", env={"_DOGTL_COMPLETE": "complete_bash", "COMP_WORDS": "dogtl extr",
                                            "COMP_CWORD": "1"})
    assert completion.stdout.split() == ["extract-features"]  # shell completion is on
    text = " ".join(run_cli("extract-features", "--help").stdout.split())
    assert all(name in text for name in BACKBONES)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("rich") for d in dependencies)


# --- 9: plots ---------------------------------------------------------------------------------------

def test_plots_name_the_run_mark_the_kept_epoch_and_keep_accuracy_in_range(monkeypatch, tmp_path):
    from dogtl.core import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.append(fig))
    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.5, 0.3], "accuracy": [0.9, 0.99, 1.0],
                            "val_loss": [0.8, 0.6, 0.7], "val_accuracy": [0.95, 1.0, 1.0], "lr": [1e-4] * 3})
    plots.plot_history(history, tmp_path / "h.png", title="finetune f.keras from head.keras", best_epoch=2,
                       start={"val_log_loss": 0.85, "val_accuracy": 0.9})
    fig = figures.pop()
    assert fig._suptitle.get_text() == "finetune f.keras from head.keras"
    loss, accuracy = fig.axes[:2]
    assert 0.0 <= accuracy.get_ylim()[0] and accuracy.get_ylim()[1] <= 1.0
    for ax in (loss, accuracy):
        labels = ax.get_legend_handles_labels()[1]
        assert "kept: epoch 2" in labels and "start (the head)" in labels
    assert any(list(line.get_xdata()) == [0] and line.get_marker() == "o" for line in loss.get_lines())

    classes = ["staffordshire_bullterrier", "american_staffordshire_terrier", "pug"]
    plots.plot_confusion(np.array([[3, 1, 0], [1, 3, 0], [0, 0, 4]]), classes,
                         [{"true": classes[0], "predicted": classes[1]}], tmp_path / "c.png", title="m.keras")
    ax = figures.pop().axes[0]
    assert all(t.get_fontsize() >= 10 for t in ax.get_xticklabels() + ax.get_yticklabels())
    assert ax.get_title().startswith("m.keras")


# --- 10: TFLite without the deprecation warning ------------------------------------------------------

def test_tflite_models_are_checked_without_the_deprecation_warning(capfd):
    import keras
    import tensorflow as tf

    from dogtl.serving.export import tflite_interpreter

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interpreter = tflite_interpreter(content)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    assert "XNNPACK" not in capfd.readouterr().err  # TFLite's "INFO: Created ... delegate" line
    x = np.ones((1, 4), np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]),
                               model(x).numpy(), rtol=1e-5)
