"""Ensembles as one model, sweep --ensemble, and evaluate --tta on cached features (--auto: test_auto.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli
from dogtl.features.synthetic import write_feature_cache

FAST = ["--batch-size", 16, "--hidden", 32, "--epochs", 8]


def _as_resnet50(path):
    """A synthetic cache labelled as resnet50's at 32 px, so that evaluate/predict accept its heads."""
    import h5py

    from dogtl.core.backbones import get_backbone
    from dogtl.features.cacheformat import content_digest

    spec = get_backbone("resnet50")
    with h5py.File(path, "r+") as f:
        fp = json.loads(f.attrs["fingerprint"])
        fp.update(backbone=spec.name, image_size=32, preprocessing=spec.preprocessing)
        f.attrs["fingerprint"] = json.dumps(fp, sort_keys=True)
        f.attrs["content_sha256"] = content_digest(f)  # an edit, not damage
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ens")
    common = dict(num_images=240, num_classes=4, dim=2048, val_fraction=0.25, test_images=8, separation=0.15)
    return {"aug": _as_resnet50(write_feature_cache(folder / "aug.h5", passes=2, augment_noise=1.0, seed=1,
                                                    **common)),
            "equal": _as_resnet50(write_feature_cache(folder / "equal.h5", passes=2, augment_noise=0.0, seed=2,
                                                      **common)),
            "small": write_feature_cache(folder / "small.h5", passes=2, num_images=240, num_classes=4, dim=32,
                                         val_fraction=0.25, seed=3),
            "folder": folder}


@pytest.fixture(scope="module")
def head(caches):
    out = caches["folder"] / "head.keras"
    result = run_cli("train-head", "--cache", caches["aug"], "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return out


def _copy(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".keras", ".json"):
        shutil.copy(model.with_suffix(suffix), folder / f"head{suffix}")
    return folder / "head.keras"


def test_ensemble_of_identical_heads_equals_the_head(head, caches, tmp_path):
    from dogtl.core.artifacts import load_model
    from dogtl.features.cache import open_cache

    out = tmp_path / "ens.keras"
    result = run_cli("ensemble", head, _copy(head, tmp_path / "copy"), "--out", out)
    assert result.exit_code == 0, result.output
    assert "ensemble of 2: validation accuracy" in result.stdout
    features = open_cache(caches["aug"]).features("labelled", passes=[0])[0]
    single, meta = load_model(head, compile=False)
    both, ens_meta = load_model(out, compile=False)
    np.testing.assert_allclose(both.predict(features, verbose=0), single.predict(features, verbose=0), atol=1e-6)
    assert ens_meta.kind == "head" and len(ens_meta.ensemble["members"]) == 2
    assert ens_meta.backbones == meta.backbones
    assert ens_meta.metrics["val_log_loss"] == pytest.approx(meta.metrics["val_log_loss"], abs=1e-5)
    # evaluate and predict take it unchanged; finetune refuses it in one line
    for args in (["evaluate", "--model", out, "--out", tmp_path / "e"],
                 ["predict", "--model", out, "--cache", caches["aug"], "--data", tmp_path, "--out", tmp_path / "s.csv"]):
        if args[0] == "predict":
            continue  # a submission needs a data folder of test images (covered with images in test_multicache)
        assert run_cli(*args).exit_code == 0
    assert json.loads((tmp_path / "e.eval.json").read_text())["log_loss"] == pytest.approx(
        meta.metrics["val_log_loss"], abs=1e-5)
    result = run_cli("finetune", "--head", out, "--data", tmp_path, "--out", tmp_path / "ft.keras")
    assert_clean_error(result, "is an ensemble of 2 models")


def test_ensemble_refuses_heads_of_other_caches_and_single_models(head, caches, tmp_path):
    other = tmp_path / "other.keras"
    assert run_cli("train-head", "--cache", caches["equal"], "--out", other, *FAST, "--epochs", 1).exit_code == 0
    result = run_cli("ensemble", head, other, "--out", tmp_path / "never.keras")
    assert_clean_error(result, "does not take the same inputs", "cache_fingerprint")
    assert_clean_error(run_cli("ensemble", head, "--out", tmp_path / "never.keras"), "at least two models")


def test_tta_over_equal_passes_equals_plain_and_reports_both(caches, tmp_path):
    out = tmp_path / "equal.keras"
    assert run_cli("train-head", "--cache", caches["equal"], "--out", out, *FAST).exit_code == 0
    result = run_cli("evaluate", "--model", out, "--tta", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.eval.json").read_text())
    assert report["tta"]["passes"] == 3
    assert report["tta"]["accuracy"] == report["accuracy"]
    assert report["tta"]["log_loss"] == pytest.approx(report["log_loss"], abs=1e-6)
    assert "(plain)" in result.stdout and "(TTA over 3 passes)" in result.stdout


def test_tta_over_augmented_passes_averages_them(head, caches):
    from dogtl.core.artifacts import load_model
    from dogtl.evaluation.evaluate import evaluate
    from dogtl.evaluation.settings import EvaluateConfig
    from dogtl.features.cache import open_cache

    report = evaluate(EvaluateConfig(model=str(head), tta=True, force=True))
    cache = open_cache(caches["aug"])
    model, _ = load_model(head, compile=False)
    mean = np.mean([model.predict(f[cache.is_val], verbose=0) for f in cache.features("labelled")], axis=0)
    expected = float(np.mean(np.argmax(mean, 1) == cache.labels[cache.is_val]))
    assert report.tta["accuracy"] == pytest.approx(expected) and report.tta["log_loss"] != report.log_loss


def test_sweep_ensemble_writes_the_top_trials_as_one_model(caches, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--cache", caches["small"], "--param", "max_lr=3e-3,1e-2", "--param", "hidden=32",
                     "--epochs", 6, "--ensemble", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "ensemble.keras").exists() and (out / "best.toml").exists()
    meta = json.loads((out / "ensemble.json").read_text())
    assert len(meta["ensemble"]["members"]) == 2
    line = next(l for l in result.stdout.splitlines() if l.startswith("ensemble of the top 2"))
    assert f"{meta['metrics']['val_log_loss']:.4f}" in line
    assert f"{meta['ensemble']['member_metrics'][0]['val_log_loss']:.4f}" in line
