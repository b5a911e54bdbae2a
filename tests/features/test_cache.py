"""The HDF5 feature cache: schema and contents, readers refusing partial or damaged files,
crash-safe partial batches and streaming assembly."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import weakref

import h5py
import numpy as np
import pandas as pd
import pytest

from dogtl.data.augment import image_keys
from dogtl.features.cache import open_cache
from dogtl.features.cacheformat import RESUME_HINT
from dogtl.features.cachewriter import write_cache
from dogtl.features.fingerprint import fingerprint_differences
from dogtl.features.partial import PartialCache, partial_dir
from dogtl.core.errors import CacheError


def test_schema_is_plain_hdf5(small_cache, synthetic_data):
    table = pd.read_csv(synthetic_data / "labels.csv")
    with h5py.File(small_cache, "r") as f:
        assert f.attrs["format"] == "dogtl-features" and f.attrs["format_version"] == 2
        assert bool(f.attrs["complete"]) is True
        fp = json.loads(f.attrs["fingerprint"])
        versions = json.loads(f.attrs["versions"])
        classes = list(f["classes"].asstr()[:])
        ids = list(f["labelled/ids"].asstr()[:])
        labels = f["labelled/labels"][:]
        assert classes == sorted(table["breed"].unique())
        assert ids == list(table["id"])  # every image readable, in labels.csv order
        assert [classes[k] for k in labels] == list(table["breed"])
        assert labels.dtype == np.int32 and f["labelled/is_val"].dtype == bool
        assert list(f["labelled/index"][:]) == list(range(24))
        assert np.array_equal(f["labelled/key"][:], image_keys(ids))  # augmentation keyed by the image id
        assert list(f["labelled/sha256"].asstr()[:]) == [
            hashlib.sha256((synthetic_data / "train" / f"{i}.jpg").read_bytes()).hexdigest() for i in ids]
        assert f["labelled/features"].shape == (3, 24, 2048) and f["labelled/features"].dtype == np.float16
        assert list(f["test/ids"].asstr()[:]) == [f"test{j:05d}" for j in range(4)]
        assert f["test/features"].shape == (2, 4, 2048) and f["test/features"].dtype == np.float16
        assert f["skipped"].shape == (0,)
        features = f["labelled/features"][:].astype(np.float32)
    assert {"backbone", "weights", "image_size", "preprocessing", "feature_dim", "augmentation", "passes",
            "tta_passes", "seed", "val_fraction", "dtype", "file_list", "num_images", "test_file_list",
            "num_test_images"} <= set(fp)
    assert fp["image_key"] == "image id"
    # --weights none: the random backbone calibrated on the images, kept beside the cache.
    assert fp["backbone"] == "resnet50" and fp["image_size"] == 32
    assert fp["weights"].startswith("file:features.random-backbone.weights.h5:sha256:")
    assert fp["preprocessing"] == "keras.applications.resnet50.preprocess_input"
    assert fp["augmentation"] == {"rotation": 45.0, "zoom": 0.25, "shift": 0.2, "hflip": True}
    assert (fp["passes"], fp["tta_passes"], fp["seed"], fp["feature_dim"]) == (2, 1, 2018, 2048)
    assert {"tensorflow", "keras", "h5py", "numpy", "dogtl"} <= set(versions)
    # Real features: finite, not all zero, different per image and per pass.
    assert np.isfinite(features).all() and np.abs(features).max() > 1e-3
    assert not np.allclose(features[0, 0], features[0, 1])
    assert not np.allclose(features[0], features[1]) and not np.allclose(features[1], features[2])


def test_feature_cache_reader(small_cache):
    c = open_cache(small_cache)
    assert (c.num_passes, c.num_test_passes, c.feature_dim) == (3, 2, 2048)
    assert len(c.ids) == len(c.labels) == len(c.is_val) == 24 and len(c.test_ids) == 4
    from dogtl.data.folders import split_validation

    assert np.array_equal(c.is_val, split_validation(c.ids, c.labels, 0.1, 2018))  # each image's own draw
    assert c.is_val.any() and np.bincount(c.labels[~c.is_val]).min() >= 1  # every class trains
    everything = c.features()
    assert everything.dtype == np.float32 and everything.shape == (3, 24, 2048)
    assert np.array_equal(c.features(passes=[2, 0]), everything[[2, 0]])
    assert c.features("test").shape == (2, 4, 2048)
    with pytest.raises(ValueError, match="split"):
        c.features("train")
    with pytest.raises(ValueError, match="passes 0..2"):
        c.features(passes=[3])


def test_clean_and_augmented_passes_are_the_backbone_on_those_images(small_cache, synthetic_data):
    """Row i, pass p holds backbone(augment(image i, key (seed, p, key of id i))): nothing misordered."""
    import tensorflow as tf

    from dogtl.data.augment import AugmentConfig, augment, image_seed
    from dogtl.core.backbones import get_backbone
    from dogtl.data.images import load_image, preprocess_fn
    from dogtl.core.models import build_backbone

    c = open_cache(small_cache)
    spec = get_backbone("resnet50")
    model = build_backbone(spec, c.weights_path, 32)  # --weights none: the calibrated random backbone
    rows = [0, 9, 23]
    for p in (0, 2):
        images = []
        for i in rows:
            image = load_image(str(synthetic_data / "train" / f"{c.ids[i]}.jpg"), 32)
            if p:
                image = augment(image, AugmentConfig(), image_seed(2018, p, image_keys([c.ids[i]])[0]))
            images.append(preprocess_fn(spec)(image))
        expected = model(tf.stack(images), training=False).numpy()
        got = c.features(passes=[p])[0][rows]
        assert np.allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def _copy(small_cache, tmp_path, name="features.h5"):
    return shutil.copy(small_cache, tmp_path / name)


def test_missing_cache(tmp_path):
    with pytest.raises(CacheError, match="no feature cache there; run `dogtl extract-features` first"):
        open_cache(tmp_path / "features.h5")


def test_unfinished_extraction_is_incomplete(tmp_path):
    PartialCache(tmp_path / "features.h5").start({"backbone": "xception"})
    with pytest.raises(CacheError, match=f"features.h5: {RESUME_HINT}$"):
        open_cache(tmp_path / "features.h5")


def test_truncated_cache_is_never_taken_for_complete(small_cache, tmp_path):
    path = _copy(small_cache, tmp_path)
    data = open(path, "rb").read()
    for size in (len(data) // 2, len(data) - 4096, 4096):
        open(path, "wb").write(data[:size])
        with pytest.raises(CacheError, match=f"damaged or {RESUME_HINT}"):
            open_cache(path).features()


def test_cache_not_marked_complete_is_incomplete(small_cache, tmp_path):
    path = _copy(small_cache, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match=RESUME_HINT):
        open_cache(path)


def test_cache_with_missing_rows_is_damaged(small_cache, tmp_path):
    path = _copy(small_cache, tmp_path)
    with h5py.File(path, "r+") as f:
        features = f["labelled/features"][:, :20]
        del f["labelled/features"]
        f["labelled/features"] = features
    with pytest.raises(CacheError, match=r"damaged or .*labelled/features is \(3, 20, 2048\), expected \(3, 24, 2048\)"):
        open_cache(path)


def test_foreign_files_are_not_caches(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    (tmp_path / "notes.h5").write_text("hello")
    for name in ("other.h5", "notes.h5"):
        with pytest.raises(CacheError, match="not a dogtl feature cache"):
            open_cache(tmp_path / name)


def test_fingerprint_differences_name_the_setting():
    stored = {"backbone": "xception", "augmentation": {"rotation": 45.0, "zoom": 0.25}, "seed": 1,
              "weights": "file:a.h5:sha256:abcd", "versions": {"tensorflow": "2.1"}}
    assert fingerprint_differences(stored, stored) == []
    wanted = dict(stored, augmentation={"rotation": 30.0, "zoom": 0.25}, seed=2,
                  weights="file:renamed.h5:sha256:abcd", versions={"tensorflow": "2.2"}, batch_size=7)
    assert fingerprint_differences(stored, wanted) == ["augmentation.rotation: cache has 45.0, now 30.0",
                                                       "seed: cache has 1, now 2"]
    assert fingerprint_differences(stored, dict(stored, weights="file:a.h5:sha256:ffff")) == [
        "weights: cache has 'file:a.h5:sha256:abcd', now 'file:a.h5:sha256:ffff'"]


def test_partial_batches(tmp_path):
    partial = PartialCache(tmp_path / "f.h5")
    assert partial.dir == partial_dir(tmp_path / "f.h5") and not partial.exists()
    partial.start({"seed": 1})
    assert partial.exists() and partial.fingerprint() == {"seed": 1}
    assert partial.covered("labelled", 0) == 0
    partial.write("labelled", 0, np.array([0, 1, 3]), np.ones((3, 2), np.float16))
    partial.write("labelled", 0, np.array([5, 6]), np.full((2, 2), 2, np.float16))
    partial.write("labelled", 1, np.array([0, 1]), np.zeros((2, 2), np.float16))
    (partial.dir / "labelled-p0-000000007-000000009.npz.tmp").write_bytes(b"half a batch")  # killed mid-write
    assert partial.covered("labelled", 0) == 7 and partial.covered("labelled", 1) == 2
    assert partial.covered("test", 0) == 0
    assert partial.positions("labelled", 0).tolist() == [0, 1, 3, 5, 6]
    assert [pos.tolist() for pos, _ in partial.iter_pass("labelled", 0)] == [[0, 1, 3], [5, 6]]
    # A damaged batch (one flipped bit, or garbage) is removed and reported, so the next run redoes it.
    part = partial.dir / "labelled-p0-000000005-000000007.npz"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x10
    part.write_bytes(data)
    with pytest.raises(CacheError, match=f"damaged batch removed .*{RESUME_HINT}"):
        list(partial.iter_pass("labelled", 0))
    assert partial.covered("labelled", 0) == 4
    (partial.dir / "labelled-p1-000000000-000000002.npz").write_bytes(b"garbage")
    with pytest.raises(CacheError, match=RESUME_HINT):
        list(partial.iter_pass("labelled", 1))
    assert partial.covered("labelled", 1) == 0
    partial.remove()
    assert not partial.dir.exists()


def _cache_args(n=6, dim=4, passes=2):
    fp = {"feature_dim": dim, "dtype": "float32", "passes": passes - 1, "tta_passes": 0}
    return dict(fingerprint=fp, versions={}, classes=["a", "b"],
                test={"ids": [], "features": [np.zeros((0, dim))]}, skipped=["x.jpg\tbroken"]), n, dim


def test_write_cache_streams_one_block_at_a_time(tmp_path):
    """Assembly streams: when a block is made, every block but the one just copied is released."""
    kwargs, n, dim = _cache_args(n=10)
    alive = []

    def blocks(p):
        for start in range(0, n, 3):
            assert all(ref() is None for ref in alive[:-1]), "earlier blocks are still held"
            rows = np.arange(start, min(n, start + 3))
            block = np.tile(rows[:, None] + 100.0 * p, (1, dim)).astype(np.float32)
            alive.append(weakref.ref(block))
            yield rows, block
            del block
            gc.collect()

    write_cache(tmp_path / "c.h5", labelled={"ids": [f"i{k}" for k in range(n)], "labels": np.arange(n) % 2,
                                             "is_val": np.zeros(n, bool),
                                             "features": [lambda: blocks(0), lambda: blocks(1)]}, **kwargs)
    c = open_cache(tmp_path / "c.h5")
    features = c.features()
    assert np.array_equal(features[1, :, 0], np.arange(n) + 100.0)
    assert c.skipped == ["x.jpg\tbroken"] and list(c.ids) == [f"i{k}" for k in range(n)]


def test_write_cache_with_a_gap_leaves_no_cache(tmp_path):
    kwargs, n, dim = _cache_args()
    bad = [(np.array([0, 1]), np.zeros((2, dim))), (np.array([3, 4, 5]), np.zeros((3, dim)))]
    with pytest.raises(CacheError, match="inconsistent"):
        write_cache(tmp_path / "c.h5", labelled={"ids": list("abcdef"), "labels": np.zeros(n, np.int32),
                                                 "is_val": np.zeros(n, bool),
                                                 "features": [np.zeros((n, dim)), lambda: iter(bad)]}, **kwargs)
    assert not (tmp_path / "c.h5").exists()
