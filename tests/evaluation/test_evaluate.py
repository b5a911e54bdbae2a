"""Validation reports: the numbers, the files, head-on-cache and fine-tuned-on-images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import assert_clean_error, run_cli
from sklearn.metrics import log_loss

from dogtl.evaluation.evaluate import evaluate, metrics_report
from dogtl.evaluation.settings import EvaluateConfig


def test_metrics_report_numbers():
    classes = ["a", "b", "c", "d"]
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    probs = np.full((8, 4), 0.05)
    predicted = [0, 1, 1, 1, 1, 2, 2, 3]  # a->b twice, d->c once
    second = [1, 0, 0, 0, 2, 3, 1, 0]
    for row, (p, s) in enumerate(zip(predicted, second)):
        probs[row, p], probs[row, s] = 0.6, 0.3
    r = metrics_report(probs, labels, classes, top_k=2, confused=5)
    assert r["accuracy"] == pytest.approx(5 / 8)
    assert r["log_loss"] == pytest.approx(log_loss(labels, probs / probs.sum(1, keepdims=True), labels=range(4)))
    assert r["top_k"] == 2 and r["top_k_accuracy"] == pytest.approx(7 / 8)  # only d->c misses c's top 2
    assert r["per_class"]["accuracy"].tolist() == pytest.approx([1 / 3, 1, 1, 0.5])
    assert r["confused"] == [{"true": "a", "predicted": "b", "count": 2, "fraction": pytest.approx(2 / 3)},
                             {"true": "d", "predicted": "c", "count": 1, "fraction": 0.5}]


def test_head_on_cache_report_files_and_numbers(stage3, tmp_path):
    from dogtl.core.artifacts import load_model
    from dogtl.features.cache import open_cache

    r = evaluate(EvaluateConfig(model=str(stage3.head), out=str(tmp_path / "head")))
    assert r.source == "cached features"
    cache = open_cache(stage3.cache)
    head, _ = load_model(stage3.head, compile=False)
    probs = head.predict(cache.features("labelled", passes=[0])[0][cache.is_val], verbose=0)
    labels = cache.labels[cache.is_val]
    assert r.images == int(cache.is_val.sum())
    assert r.accuracy == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert r.log_loss == pytest.approx(log_loss(labels, probs, labels=range(3)), rel=1e-5)
    assert r.top_k == 3 and r.top_k_accuracy == 1.0

    report = json.loads(r.json_path.read_text())
    assert report["accuracy"] == pytest.approx(r.accuracy) and report["kind"] == "head"
    assert [c["class"] for c in report["per_class"]] == cache.classes
    per_class = pd.read_csv(r.csv_path)
    assert list(per_class.columns) == ["class", "images", "correct", "accuracy"]
    assert per_class["images"].sum() == r.images
    assert r.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetuned_on_images_matches_its_recorded_metrics(stage3, finetuned, tmp_path):
    r = evaluate(EvaluateConfig(model=str(finetuned.model_path), data=str(stage3.data), out=str(tmp_path / "ft")))
    assert r.source == "images"
    assert r.accuracy == pytest.approx(finetuned.after["val_accuracy"])
    assert r.log_loss == pytest.approx(finetuned.after["val_log_loss"], abs=1e-5)

    result = run_cli("evaluate", "--model", finetuned.model_path, "--data", stage3.data, "--out", tmp_path / "ft")
    assert_clean_error(result, "exists: pass --force")
    result = run_cli("evaluate", "--model", finetuned.model_path, "--data", stage3.data, "--out", tmp_path / "ft",
                     "--force")
    assert result.exit_code == 0, result.output
    assert f"accuracy {r.accuracy:.4f}" in result.stdout and "top-3 accuracy" in result.stdout


def test_bad_input_gives_one_line_errors(stage3, tmp_path):
    assert_clean_error(run_cli("evaluate", "--model", tmp_path / "nope.keras"), "no such model file")
    assert_clean_error(run_cli("evaluate", "--model", stage3.head, "--cache", tmp_path / "nope.h5",
                               "--out", tmp_path / "x"), "no feature cache there")
    (tmp_path / "a-file").write_text("x")
    assert_clean_error(run_cli("evaluate", "--model", stage3.head, "--out", tmp_path / "a-file" / "x"),
                       "a part of this path is a file")
