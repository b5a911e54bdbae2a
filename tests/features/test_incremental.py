"""Incremental extraction: a cache whose images changed is updated, computing only new or changed
images, and ends equal to a fresh extraction of the new image list, bit for bit; kill -9 during
an update resumes; heads trained on the old cache are refused naming the change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import CHEAP, assert_clean_error, run_cli

from dogtl.features.cache import open_cache
from dogtl.features.cacheformat import content_digest
from dogtl.features.partial import PartialCache

ARGS = [*CHEAP, "--passes", 2, "--tta-passes", 1]  # small_cache's settings
CHANGE = "+2 images, 1 relabelled, 1 changed, 1 removed; +1 test images: extracting 4"


def _extract(data, cache, *extra):
    return run_cli("extract-features", "--data", data, "--cache", cache, *ARGS, *extra)


def _copy(cache, target):
    """A copy of `cache` at `target` with its --weights none backbone beside it, as a user's
    folder holds them (without it, the copy's backbone would be calibrated again, on other
    images: another backbone, refused)."""
    from dogtl.features.random_backbone import random_backbone_path

    shutil.copy(random_backbone_path(cache), random_backbone_path(target))
    return shutil.copy(cache, target)


@pytest.fixture(scope="module")
def changed(synthetic_data, tmp_path_factory):
    """synthetic_data with two images added (in the middle of labels.csv and at its end), one
    removed, one relabelled, one edited (same id, other content) and a test image added."""
    from PIL import Image

    from dogtl.data.synthetic import draw_image

    root = shutil.copytree(synthetic_data, tmp_path_factory.mktemp("changed") / "data")
    table = pd.read_csv(root / "labels.csv", dtype=str)
    rng = np.random.default_rng(11)
    for name, label in (("new_a", 0), ("new_b", 2)):
        draw_image(label, 48, rng).save(root / "train" / f"{name}.jpg", quality=90)
    classes = sorted(table["breed"].unique())
    ids = list(table["id"])
    removed, relabelled, edited = ids[5], ids[9], ids[17]
    table.loc[table["id"] == relabelled, "breed"] = classes[0]  # was classes[1] (8 images a class)
    image = root / "train" / f"{edited}.jpg"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image, quality=90)
    table = pd.concat([table.iloc[:3], pd.DataFrame([["new_a", classes[0]]], columns=table.columns), table.iloc[3:],
                       pd.DataFrame([["new_b", classes[2]]], columns=table.columns)])
    table[table["id"] != removed].to_csv(root / "labels.csv", index=False)
    (root / "train" / f"{removed}.jpg").unlink()
    draw_image(1, 48, rng).save(root / "test" / "test_late.jpg", quality=90)
    (root / "sample_submission.csv").unlink()
    return root, {"removed": removed, "relabelled": relabelled, "edited": edited}


@pytest.fixture(scope="module")
def fresh(changed, small_cache, tmp_path_factory):
    """A fresh extraction of `changed` with small_cache's random backbone (--weights none
    calibrates on the images, which changed)."""
    from dogtl.features.random_backbone import random_backbone_path

    path = tmp_path_factory.mktemp("fresh") / "features.h5"
    shutil.copy(random_backbone_path(small_cache), random_backbone_path(path))
    result = _extract(changed[0], path)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def updated(small_cache, changed, tmp_path_factory):
    """small_cache updated to `changed`: (CLI result, cache, the batches computed)."""
    path = _copy(small_cache, tmp_path_factory.mktemp("updated") / "features.h5")
    real_write, writes = PartialCache.write, []

    def recorded(self, split, pass_index, positions, features, **extra):
        writes.append((split, pass_index, len(positions)))
        real_write(self, split, pass_index, positions, features, **extra)

    PartialCache.write = recorded
    try:
        result = _extract(changed[0], path)
    finally:
        PartialCache.write = real_write
    return result, path, writes


def columns(path) -> dict:
    c = open_cache(path)
    out = {"fingerprint": c.fingerprint, "classes": c.classes, "skipped": c.skipped, "labels": c.labels,
           "is_val": c.is_val}
    for split in ("labelled", "test"):
        for name in ("ids", "index", "key", "sha256"):
            out[f"{split}/{name}"] = c.column(split, name)
        out[f"{split}/features"] = c.features(split)
    return out


def assert_same(a, b):
    a, b = columns(a), columns(b)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bit for bit
        else:
            assert a[key] == b[key], key


def test_update_computes_only_the_change_and_equals_a_fresh_extraction(updated, fresh, small_cache, changed):
    result, path, writes = updated
    assert result.exit_code == 0, result.output
    assert CHANGE in result.output
    assert f"updated {path}: 25 labelled images" in result.output and "(4 images computed, 26 copied" in result.output
    # The backbone ran on the 3 new or edited labelled images in each of 3 passes, the new test image in 2:
    # 11 image-passes in 3 batches of 4 (batches run across passes).
    done = {}
    for split, pass_index, n in writes:
        done[split, pass_index] = done.get((split, pass_index), 0) + n
    assert done == {("labelled", 0): 3, ("labelled", 1): 3, ("labelled", 2): 3, ("test", 0): 1, ("test", 1): 1}
    assert_same(path, fresh)

    old, new = open_cache(small_cache), open_cache(path)
    assert new.updates[-1]["labelled"] == "+2 images, 1 relabelled, 1 changed, 1 removed"
    info = changed[1]
    kept = [i for i in old.ids if i not in (info["removed"], info["edited"])]
    o, n = [list(old.ids).index(i) for i in kept], [list(new.ids).index(i) for i in kept]
    # Unchanged and relabelled images: the same features and the same side of the split.
    np.testing.assert_array_equal(new.features()[:, n], old.features()[:, o])
    np.testing.assert_array_equal(new.is_val[n], old.is_val[o])
    r_old, r_new = list(old.ids).index(info["relabelled"]), list(new.ids).index(info["relabelled"])
    assert old.classes[old.labels[r_old]] != new.classes[new.labels[r_new]]
    e_old, e_new = list(old.ids).index(info["edited"]), list(new.ids).index(info["edited"])
    assert not np.array_equal(old.features(passes=[0])[0, e_old], new.features(passes=[0])[0, e_new])


def test_heads_of_the_old_cache_are_refused_naming_the_change_but_not_for_later_test_images(
        updated, small_cache, synthetic_data, tmp_path):
    from _stage3 import head_metadata
    from dogtl.core import artifacts
    from dogtl.features.modelcache import open_model_cache
    from dogtl.core.models import build_head

    old = open_cache(small_cache)
    head = build_head(old.feature_dim, len(old.classes), hidden=(4,), input_dropout=0.0, dropout=0.0)
    model = tmp_path / "head.keras"
    artifacts.save_model(head, model, head_metadata(old, "resnet50", 32, updated[1]))
    assert_clean_error(run_cli("evaluate", "--model", model),
                       r"was updated since the model was trained on it \(\+2 images, 1 relabelled, 1 changed, "
                       r"1 removed\); retrain")

    # The test set arriving later: only its images are computed, and the head still fits the cache.
    data = shutil.copytree(synthetic_data, tmp_path / "data")
    shutil.copy(data / "test" / "test00000.jpg", data / "test" / "test_late.jpg")
    (data / "sample_submission.csv").unlink()
    cache = _copy(small_cache, tmp_path / "features.h5")
    result = _extract(data, cache)
    assert result.exit_code == 0, result.output
    assert "+1 test images: extracting 1" in result.output and "(1 images computed, 28 copied" in result.output
    meta = head_metadata(old, "resnet50", 32, cache)
    assert open_model_cache(meta).test_ids.tolist() == [*old.test_ids, "test_late"]
    np.testing.assert_array_equal(open_cache(cache).features("test")[:, :4], old.features("test"))


# kill -9 at the k-th batch renamed into place, or at the updated cache's rename (test_extract.py's harness).
def test_kill_9_during_an_update_resumes_identically_and_keeps_the_old_cache(small_cache, changed, fresh, tmp_path):
    from test_extract import HARNESS

    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    log = tmp_path / "writes.jsonl"
    cache = tmp_path / "features.h5"
    _copy(small_cache, cache)
    args = ["extract-features", "--data", changed[0], "--cache", cache, *ARGS, "--batch-size", 2]

    def run(name, kill):
        env = dict(os.environ, DOGTL_TEST_LOG=str(log), DOGTL_TEST_KILL=kill, DOGTL_TEST_RUN=name,
                   TF_CPP_MIN_LOG_LEVEL="3")
        killed = subprocess.run([sys.executable, str(harness), *map(str, args)], env=env, capture_output=True,
                                text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr
        assert_same(cache, small_cache)  # the old cache is intact at its path until the very end

    run("first", "batch:3")  # batches of 2: [p0: 0, 1], [p0: 2, p1: 0] killed saving p1's row
    run("second", "cache")  # everything computed, the updated cache not renamed into place
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert not PartialCache(cache).dir.exists() and not cache.with_name("features.h5.tmp").exists()
    assert_same(cache, fresh)  # batches of 2 (padded), of 4 in the fresh run: the same bits

    writes = [json.loads(line) for line in log.read_text().splitlines()]
    # first: 3 saves (the 3rd killed before its rename); second: pass 1 from its first row (the row
    # in flight redone), pass 2, test passes 0 and 1, in 4 batches and 6 saves; nothing after.
    assert [w[0] for w in writes] == ["first"] * 3 + ["second"] * 6
    assert writes[2][1:] == ["labelled", 1, [0]] and writes[3][1:] == ["labelled", 1, [0, 1]]


def _format_1(cache):
    """Rewrite a copy of a cache as dogtl wrote it before incremental caches (format 1)."""
    with h5py.File(cache, "r+") as f:
        fp = json.loads(f.attrs["fingerprint"])
        for key in ("image_key", "test_file_list"):
            del fp[key]
        f.attrs["fingerprint"] = json.dumps(fp, sort_keys=True)
        f.attrs["format_version"] = 1
        for split in ("labelled", "test"):
            del f[split]["key"], f[split]["sha256"]
        f.attrs["content_sha256"] = content_digest(f)


def test_what_cannot_be_updated_is_refused_naming_why(small_cache, changed, tmp_path):
    cache = _copy(small_cache, tmp_path / "features.h5")
    before = cache.read_bytes()
    # Other settings as well as other images: refused (naming the setting) unless --force.
    assert_clean_error(_extract(changed[0], cache, "--passes", 3), r"passes: cache has 2, now 3", "--force")
    assert cache.read_bytes() == before
    # An unfinished extraction of other images is not thrown away: finish it first, or delete it.
    PartialCache(cache).start(dict(open_cache(cache).fingerprint, file_list="0123456789abcdef"))
    assert_clean_error(_extract(changed[0], cache), r"unfinished extraction of other images \(file_list ",
                       r"delete that folder to start over from .*features\.h5 \(--force recomputes everything\)")
    PartialCache(cache).remove()
    # A format-1 cache: still read by every stage (its augmentation keyed by file number), never updated.
    _format_1(cache)
    c = open_cache(cache)
    assert c.format_version == 1 and list(c.augmentation_keys()) == list(range(24))
    assert_clean_error(_extract(changed[0], cache), r"format-1 cache \(made before incremental caches", "--force")


def test_change_summary_and_disk_space_of_an_update():
    from dogtl.features.partial import space_needed
    from dogtl.features.incremental import Change

    change = Change(added={"labelled": 500, "test": 0}, removed={"labelled": 12, "test": 3},
                    changed={"labelled": 0, "test": 1}, relabelled=3)
    assert change.summary(501) == "+500 images, 3 relabelled, 12 removed; test images: 1 changed, 3 removed: " \
                                  "extracting 501"
    assert Change().summary(0) == "images reordered: extracting 0"
    fingerprint = {"dtype": "float16", "feature_dim": 10, "passes": 2, "tta_passes": 0}
    # The images computed go to batch files, then with the copied ones into the new cache file.
    assert space_needed("nowhere/f.h5", fingerprint, (1, 0), (100, 0)) == 2 * 10 * 3 * (1 + 100)


@pytest.mark.slow
def test_updated_shards_merge_into_a_fresh_single_extraction(small_cache, changed, fresh, synthetic_data, tmp_path):
    """Each shard is updated from its own old file (rows that moved to another shard's block are
    computed there) and the merged cache equals the fresh single extraction of the new list."""
    folder = tmp_path / "shards"
    for data in (synthetic_data, changed[0]):
        for i in (1, 2):
            result = _extract(data, folder / "features.h5", "--shard", f"{i}/2")
            assert result.exit_code == 0, result.output
    assert "updated" in result.output
    result = run_cli("merge-cache", *sorted(folder.glob("features.shard-*")), "--out", tmp_path / "merged.h5", "--copy")
    assert result.exit_code == 0, result.output
    assert_same(tmp_path / "merged.h5", fresh)
