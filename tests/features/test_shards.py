"""Sharded extraction + merge-cache: the merged cache is the single machine's cache."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import CHEAP, assert_clean_error, run_cli

from dogtl.features.cache import open_cache
from dogtl.features.cacheformat import content_digest
from dogtl.core.errors import DogtlError
from dogtl.features.shards import Shard, merge_caches, merged_path, parse_shard, shard_path

# float32: the merged features must equal the single run's bit for bit, though a shard's batches
# hold other images than the single run's (every backbone call is padded to --batch-size, so the
# same kernels run on every batch).
ARGS = [*CHEAP, "--passes", 1, "--tta-passes", 1, "--dtype", "float32", "--val-fraction", 0.25]
N = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 6 train images + 5 test images; one unreadable train and test image in
    different shards, so merging must put the skipped list back in the single run's order."""
    from dogtl.data.synthetic import make_kaggle_dataset

    root = make_kaggle_dataset(tmp_path_factory.mktemp("sharded") / "data", num_classes=3, per_class=6,
                               test_images=5, size=40, seed=1)
    train = sorted((root / "train").iterdir())
    ids = [line.split(",")[0] for line in (root / "labels.csv").read_text().splitlines()[1:]]
    (root / "train" / f"{ids[2]}.jpg").write_bytes(b"not an image")  # shard 1 of 3
    test = sorted((root / "test").iterdir())
    test[4].write_bytes(test[4].read_bytes()[:100])  # shard 3 of 3 (truncated)
    assert len(train) == 18
    return root


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "features.h5"
    result = run_cli("extract-features", "--data", data, "--cache", path, *ARGS)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for i in range(1, N + 1):
        result = run_cli("extract-features", "--data", data, "--cache", folder / "features.h5", *ARGS,
                         "--shard", f"{i}/{N}")
        assert result.exit_code == 0, result.output
        paths.append(folder / f"features.shard-{i}-of-{N}.h5")
        assert str(paths[-1]) in result.output
    return paths


def read_all(path) -> dict:
    c = open_cache(path)
    index = {s: {name: c.column(s, name) for name in ("index", "key", "sha256")} for s in ("labelled", "test")}
    return {"fingerprint": c.fingerprint, "classes": c.classes, "ids": list(c.ids), "labels": c.labels,
            "is_val": c.is_val, "test_ids": list(c.test_ids), "skipped": c.skipped, "index": index,
            "features": c.features("labelled"), "test_features": c.features("test")}


def assert_same_cache(a: dict, b: dict):
    assert a["fingerprint"] == b["fingerprint"]
    for key in ("classes", "ids", "test_ids", "skipped"):
        assert a[key] == b[key], key
    for key in ("labels", "is_val", "features", "test_features"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for split in ("labelled", "test"):
        for name in ("index", "key", "sha256"):
            np.testing.assert_array_equal(a["index"][split][name], b["index"][split][name], err_msg=name)


def test_shard_parsing_and_names(tmp_path):
    assert parse_shard("2/4") == Shard(2, 4) and parse_shard(None) is None and parse_shard(" 1 / 1 ") == Shard(1, 1)
    for bad, message in (("0/4", "count from 1"), ("5/4", "1 <= I <= N"), ("2", "I/N"), ("a/b", "I/N"),
                         ("1/0", "1 <= I <= N")):
        with pytest.raises(DogtlError, match=message):
            parse_shard(bad)
    # Disjoint contiguous blocks covering everything, for any n (also fewer images than shards).
    for n in (0, 1, 2, 7, 18, 101):
        blocks = [Shard(i, 4).rows(n) for i in range(1, 5)]
        assert [r for b in blocks for r in b] == list(range(n))
    assert shard_path("cache/features.h5", Shard(2, 4)).name == "features.shard-2-of-4.h5"
    assert merged_path(tmp_path / "x.shard-2-of-4.h5") == tmp_path / "x.h5"


def test_shards_are_disjoint_complete_caches_with_global_augmentation_keys(single, shards):
    whole = read_all(single)
    seen = []
    for i, path in enumerate(shards, start=1):
        part = read_all(path)
        fp = dict(part["fingerprint"])
        assert fp.pop("shard") == {"index": i, "count": N}
        assert fp == whole["fingerprint"]  # same fingerprint apart from the shard
        # Each row's features (clean and augmented) equal the single run's row of the same image:
        # augmentation is keyed by the image's id, not its place in the shard.
        rows = [whole["ids"].index(x) for x in part["ids"]]
        np.testing.assert_array_equal(part["features"], whole["features"][:, rows])
        np.testing.assert_array_equal(part["is_val"], whole["is_val"][rows])
        np.testing.assert_array_equal(part["index"]["labelled"]["index"], whole["index"]["labelled"]["index"][rows])
        seen += part["ids"]
    assert seen == whole["ids"]  # disjoint, in order, nothing lost
    assert len(whole["skipped"]) == 2
    # Augmented passes differ from the clean one: a wrong augmentation key could not go unnoticed.
    assert np.abs(whole["features"][1] - whole["features"][0]).max() > 0.1


@pytest.mark.parametrize("copy", [False, True], ids=["virtual", "copy"])
def test_merge_equals_single_run(single, shards, tmp_path, copy):
    out = tmp_path / "merged.h5"
    result = run_cli("merge-cache", *reversed(shards), "--out", out, *(["--copy"] if copy else []))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 3 shards, 17 labelled and 4 test images, 2 skipped" in result.output
    assert_same_cache(read_all(out), read_all(single))
    with h5py.File(out, "r") as f:
        assert f["labelled/features"].is_virtual is not copy
    # The cache is usable by the next stage like any other (the head's fingerprint check included).
    from dogtl.features.fingerprint import fingerprint_differences

    assert not fingerprint_differences(open_cache(single).fingerprint, open_cache(out).fingerprint)


def test_virtual_merge_moves_with_its_shards_and_refuses_a_missing_one(shards, tmp_path):
    folder = tmp_path / "moved"
    folder.mkdir()
    for p in shards:
        shutil.copy(p, folder / p.name)
    s = merge_caches(sorted(folder.iterdir()), mode="virtual")
    assert s.path == folder / "features.h5"
    expected = open_cache(s.path).features("labelled")
    other = tmp_path / "elsewhere"
    shutil.move(folder, other)  # relative references: the folder can move as a whole
    np.testing.assert_array_equal(open_cache(other / "features.h5").features("labelled"), expected)
    (other / shards[1].name).unlink()
    with pytest.raises(DogtlError, match=r"features.shard-2-of-3.h5, which is missing: put it back, or merge"):
        open_cache(other / "features.h5")


def test_merge_refuses_missing_duplicate_foreign_and_whole_caches(data, single, shards, tmp_path):
    out = tmp_path / "m.h5"
    assert_clean_error(run_cli("merge-cache", shards[0], shards[2], "--out", out),
                       r"shard 2/3 missing: run extract-features --shard 2/3")
    assert_clean_error(run_cli("merge-cache", *shards, shards[1], "--out", out), r"shard 2/3 given twice")
    assert_clean_error(run_cli("merge-cache", single, *shards, "--out", out), r"whole cache, not a shard")
    assert_clean_error(run_cli("merge-cache", *shards, "--out", shards[0]), r"is one of the shards")
    # A shard of another extraction (another seed): refused, naming the difference.
    foreign = tmp_path / "other" / "features.h5"
    result = run_cli("extract-features", "--data", data, "--cache", foreign, *ARGS, "--seed", 7, "--shard", f"2/{N}")
    assert result.exit_code == 0, result.output
    assert_clean_error(run_cli("merge-cache", shards[0], foreign.with_name("features.shard-2-of-3.h5"), shards[2],
                               "--out", out), r"shard of another extraction than .*seed: cache has 2018, now 7")
    # Another shard count, and a shard cut short.
    two = tmp_path / "two.shard-1-of-2.h5"
    shutil.copy(shards[0], two)
    with h5py.File(two, "r+") as f:
        fp = json.loads(f.attrs["fingerprint"])
        fp["shard"] = {"index": 1, "count": 2}
        f.attrs["fingerprint"] = json.dumps(fp)
        f.attrs["content_sha256"] = content_digest(f)  # an edit, not damage
    assert_clean_error(run_cli("merge-cache", shards[1], two, "--out", out), r"shard 1/2 but .* is shard 2/3")
    cut = tmp_path / "cut.shard-3-of-3.h5"
    cut.write_bytes(shards[2].read_bytes()[:2000])
    assert_clean_error(run_cli("merge-cache", shards[0], shards[1], cut, "--out", out), r"cut.shard-3-of-3.h5")
    assert not out.exists()
    # An existing --out needs --force.
    out.write_text("keep me")
    assert_clean_error(run_cli("merge-cache", *shards, "--out", out), r"exists: pass --force")
    assert out.read_text() == "keep me"
    assert run_cli("merge-cache", *shards, "--out", out, "--force", "--copy").exit_code == 0
    assert len(open_cache(out).ids) == 17


def test_shard_rerun_is_up_to_date_and_other_shard_counts_are_separate(data, shards, tmp_path):
    result = run_cli("extract-features", "--data", data, "--cache", shards[0].with_name("features.h5"), *ARGS,
                     "--shard", f"1/{N}")
    assert result.exit_code == 0 and "already up to date" in result.output
    assert_clean_error(run_cli("extract-features", "--data", data, "--cache", tmp_path / "f.h5", *ARGS,
                               "--shard", "4/3"), r"--shard 4/3")
    # More shards than test images: a shard may hold none of them, and is still a complete cache.
    result = run_cli("extract-features", "--data", data, "--cache", tmp_path / "f.h5", *ARGS, "--shard", "1/6")
    assert result.exit_code == 0, result.output
    part = open_cache(tmp_path / "f.shard-1-of-6.h5")
    assert len(part.ids) == 2 and len(part.skipped) == 1  # images 0..2, image 2 unreadable
    assert len(part.test_ids) == 0 and part.features("test").shape == (2, 0, 2048)
