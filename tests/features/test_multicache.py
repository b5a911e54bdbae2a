"""Several caches, one head: refusals, training, metadata, and the multi-backbone model on images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CHEAP, assert_clean_error, run_cli
from dogtl.core.errors import CacheError
from dogtl.features.multicache import MultiCache, open_caches
from dogtl.features.synthetic import write_feature_cache

BASE = dict(num_images=120, num_classes=3, dim=32, passes=2, val_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return write_feature_cache(folder / "a.h5", **BASE), folder


@pytest.mark.parametrize("change,named", [
    ({"passes": 3}, "passes"),
    ({"seed": 1}, "file_list|seed"),
    ({"val_fraction": 0.5}, "val_fraction"),
    ({"num_images": 150}, "num_images"),
    ({"num_classes": 4}, "classes"),
], ids=["passes", "seed", "split", "images", "classes"])
def test_caches_of_other_images_are_refused_naming_the_setting(synthetic_pair, change, named):
    a, folder = synthetic_pair
    b = write_feature_cache(folder / f"b-{'-'.join(change)}.h5", **{**BASE, **change})
    with pytest.raises(CacheError, match=named):
        open_caches([a, b])
    result = run_cli("train-head", "--cache", a, "--cache", b, "--out", folder / "never.keras", "--epochs", 1)
    assert_clean_error(result, "does not describe the same images", named)
    assert not (folder / "never.keras").exists()


def test_validation_split_and_pass_count_are_checked_beyond_the_fingerprint(synthetic_pair):
    import h5py

    a, folder = synthetic_pair
    b = write_feature_cache(folder / "split.h5", **BASE)
    with h5py.File(b, "r+") as f:
        is_val = f["labelled/is_val"][:]
        f["labelled/is_val"][...] = np.roll(is_val, 1)
    with pytest.raises(CacheError, match="validation split differ"):
        open_caches([a, b])
    with pytest.raises(CacheError, match="given twice"):
        open_caches([a, a])


def test_other_feature_sizes_concatenate_per_row_in_cache_order(synthetic_pair):
    from dogtl.features.cache import open_cache

    a, folder = synthetic_pair
    b = write_feature_cache(folder / "wide.h5", **{**BASE, "dim": 16})
    multi = open_caches([a, b])
    assert isinstance(multi, MultiCache) and multi.feature_dim == 48 and multi.num_passes == 3
    both = multi.features("labelled", passes=[0, 2])
    assert np.array_equal(both[..., :32], open_cache(a).features("labelled", passes=[0, 2]))
    assert np.array_equal(both[..., 32:], open_cache(b).features("labelled", passes=[0, 2]))


# -- real caches of one image folder: resnet50 at 32 and at 40 px ------------------------------

@pytest.fixture(scope="module")
def second_cache(synthetic_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache40") / "features40.h5"
    cheap = [a if a != "32" else "40" for a in CHEAP]
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", path, *cheap,
                     "--passes", 2, "--tta-passes", 1)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def multi_head(small_cache, second_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "head.keras"
    result = run_cli("train-head", "--cache", small_cache, "--cache", second_cache, "--out", out, "--epochs", 3,
                     "--hidden", "none", "--batch-size", 8)
    assert result.exit_code == 0, result.output
    return out


def test_multi_head_records_every_cache(multi_head, small_cache, second_cache):
    meta = json.loads(multi_head.with_suffix(".json").read_text())
    assert [b["cache"] for b in meta["backbones"]] == [str(small_cache), str(second_cache)]
    assert [b["image_size"] for b in meta["backbones"]] == [32, 40]
    assert meta["feature_dim"] == 4096 and all(b["feature_dim"] == 2048 for b in meta["backbones"])


def test_multi_head_evaluates_from_its_caches_and_refuses_finetuning(multi_head, synthetic_data, tmp_path):
    result = run_cli("evaluate", "--model", multi_head, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "c.eval.json").read_text())
    meta = json.loads(multi_head.with_suffix(".json").read_text())
    assert report["source"] == "cached features"
    assert report["log_loss"] == pytest.approx(meta["metrics"]["val_log_loss"], rel=1e-5)
    result = run_cli("finetune", "--data", synthetic_data, "--head", multi_head, "--out", tmp_path / "ft.keras")
    assert_clean_error(result, "concatenated caches", "one backbone")


def test_ensemble_of_multi_heads_saves_loads_and_predicts_from_image_files(multi_head, synthetic_data, tmp_path):
    """One model, one image input per backbone (each at its own size) -> each member head, averaged:
    on image files it equals the head on the concatenated cached features (identical members)."""
    from dogtl.core.artifacts import load_model
    from dogtl.evaluation.inference import load_image_model, predict_images

    out = tmp_path / "ens.keras"
    result = run_cli("ensemble", multi_head, multi_head, "--out", out)
    assert result.exit_code == 0, result.output
    model, meta, specs, sizes = load_image_model(out)
    assert [i.name for i in model.inputs] == ["image_0_resnet50_32", "image_1_resnet50_40"]
    assert meta.ensemble["members"] == [str(multi_head)] * 2
    multi = open_caches([b.cache for b in meta.backbones])
    rows = np.arange(6)
    probs, ok = predict_images(model, [synthetic_data / "train" / f"{multi.ids[r]}.jpg" for r in rows], specs, sizes)
    head, _ = load_model(multi_head, compile=False)
    expected = head.predict(multi.features("labelled", passes=[0])[0][rows], verbose=0)
    assert ok.all()
    np.testing.assert_allclose(probs, expected, atol=1e-4)

    # It deploys as it predicts: the SavedModel takes the encoded files, one input per backbone inside.
    import tensorflow as tf

    from dogtl.serving.export import export_savedmodel
    from dogtl.serving.model import load_serving_model

    sm = load_serving_model(out)
    assert [i.size for i in sm.inputs] == [32, 40]
    serve = tf.saved_model.load(str(export_savedmodel(sm, tmp_path / "export"))).signatures["serving_default"]
    files = [(synthetic_data / "train" / f"{multi.ids[r]}.jpg").read_bytes() for r in rows]
    np.testing.assert_allclose(serve(images=tf.constant(files))["probabilities"].numpy(), probs, atol=1e-4)
