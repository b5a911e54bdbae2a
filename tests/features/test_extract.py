"""`dogtl extract-features` end to end: resume after kill -9, refusing changed settings,
bad images, the folder layout, weights and backbones, and progress accounting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CHEAP, assert_clean_error, run_cli, write_odd_images

from dogtl.features.cache import open_cache
from dogtl.features.cacheformat import RESUME_HINT
from dogtl.features.partial import PartialCache
from dogtl.core.errors import CacheError


def _same_cache(a, b, exact=True):
    a, b = open_cache(a), open_cache(b)
    assert list(a.ids) == list(b.ids) and list(a.test_ids) == list(b.test_ids)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.is_val, b.is_val)
    assert a.fingerprint == b.fingerprint and a.skipped == b.skipped
    for split in ("labelled", "test"):
        fa, fb = a.features(split), b.features(split)
        assert np.abs(fa).max() > 0
        if exact:
            assert np.array_equal(fa, fb), split
        else:  # another batch composition may round differently in the last float16 bit
            assert np.allclose(fa, fb, rtol=2e-3, atol=1e-3 * np.abs(fa).max()), split


# --- resume after kill -9 --------------------------------------------------------------------

# Runs the real CLI in a subprocess that SIGKILLs itself at a chosen moment: when renaming
# its k-th saved batch into place (the batch's temporary file is written, the rename is not)
# or when renaming the finished cache file into place. Every batch write is logged.
HARNESS = r'''
import json, os, signal, sys
from dogtl.core import files
from dogtl.features import partial

log, kill, run = os.environ["DOGTL_TEST_LOG"], os.environ.get("DOGTL_TEST_KILL", ""), os.environ["DOGTL_TEST_RUN"]
real_os, renames = files.os, [0]

class KillingOs:
    def __getattr__(self, name):
        return getattr(real_os, name)

    def replace(self, src, dst):
        if str(src).endswith(".npz.tmp"):
            renames[0] += 1
            if kill == f"batch:{renames[0]}":
                real_os.kill(real_os.getpid(), signal.SIGKILL)
        elif str(src).endswith(".h5.tmp") and kill == "cache":
            real_os.kill(real_os.getpid(), signal.SIGKILL)
        return real_os.replace(src, dst)

files.os = KillingOs()  # every rename into place is core.files's
write = partial.PartialCache.write

def logged_write(self, split, pass_index, positions, features):
    with open(log, "a") as f:
        f.write(json.dumps([run, split, pass_index, positions.tolist()]) + "\n")
    write(self, split, pass_index, positions, features)

partial.PartialCache.write = logged_write
from dogtl.cli import app
app(sys.argv[1:], prog_name="dogtl")
'''


def test_resume_after_kill_9_redoes_at_most_one_batch_per_pass(synthetic_data, small_cache, tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    log = tmp_path / "writes.jsonl"
    cache = tmp_path / "cache" / "features.h5"
    args = ["extract-features", "--data", synthetic_data, "--cache", cache, *CHEAP, "--passes", 2, "--tta-passes", 1]

    def run(name, kill):
        env = dict(os.environ, DOGTL_TEST_LOG=str(log), DOGTL_TEST_KILL=kill, DOGTL_TEST_RUN=name,
                   TF_CPP_MIN_LOG_LEVEL="3")
        return subprocess.run([sys.executable, str(harness), *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=300)

    # 24 labelled images in batches of 4: 6 batches per labelled pass, 1 per test pass.
    killed_in_clean_pass = run("first", "batch:3")
    assert killed_in_clean_pass.returncode == -9, killed_in_clean_pass.stderr
    assert not cache.exists() and len(list(PartialCache(cache).dir.glob("labelled-p0-*.npz"))) == 2
    with pytest.raises(CacheError, match=RESUME_HINT):
        open_cache(cache)

    killed_in_pass_1 = run("second", "batch:7")  # 4 batches finish pass 0, then the 3rd of pass 1
    assert killed_in_pass_1.returncode == -9, killed_in_pass_1.stderr
    killed_at_the_end = run("third", "cache")  # everything extracted, final file not renamed yet
    assert killed_at_the_end.returncode == -9, killed_at_the_end.stderr
    assert not cache.exists() and cache.with_name("features.h5.tmp").exists()
    with pytest.raises(CacheError, match=RESUME_HINT):
        open_cache(cache)

    finished = run("fourth", "")
    assert finished.returncode == 0, finished.stderr
    assert "wrote" in finished.stdout and "Traceback" not in finished.stderr
    assert not PartialCache(cache).dir.exists() and not cache.with_name("features.h5.tmp").exists()
    _same_cache(cache, small_cache)  # exactly the features of the uninterrupted run

    writes = [json.loads(line) for line in log.read_text().splitlines()]
    runs = ["first", "second", "third", "fourth"]
    assert [w for w in writes if w[0] == "fourth"] == []  # nothing was left to compute
    for split, pass_index, batches in (("labelled", 0, 6), ("labelled", 1, 6), ("labelled", 2, 6), ("test", 0, 1),
                                       ("test", 1, 1)):
        mine = [w for w in writes if w[1:3] == [split, pass_index]]
        done = set()
        for r in runs:
            ours = [set(w[3]) for w in mine if w[0] == r]
            assert sum(1 for positions in ours if positions & done) <= 1, (split, pass_index, r)  # redone
            for positions in ours:
                done |= positions
        assert done == set(range(24 if split == "labelled" else 4))
        assert len(mine) <= batches + 1  # at most one batch of this pass was computed twice
    assert len(writes) == 20 + 2  # the two batches in flight when killed were redone, nothing else


# --- settings, --force, up to date -----------------------------------------------------------

@pytest.fixture
def cache_copy(small_cache, tmp_path):
    return Path(shutil.copy(small_cache, tmp_path / "features.h5"))


def _extract(data, cache, *extra):
    return run_cli("extract-features", "--data", data, "--cache", cache, *CHEAP, "--passes", 2, "--tta-passes", 1,
                   *extra)


def test_same_settings_are_up_to_date(synthetic_data, cache_copy):
    before = cache_copy.stat().st_mtime_ns
    result = _extract(synthetic_data, cache_copy)
    assert result.exit_code == 0, result.output
    assert "already up to date" in result.stdout
    assert cache_copy.stat().st_mtime_ns == before


def test_leftovers_of_a_run_killed_after_its_rename_are_cleaned(synthetic_data, cache_copy):
    partial = PartialCache(cache_copy)
    partial.start(open_cache(cache_copy).fingerprint)
    for path in (partial.dir / "fingerprint.json", partial.dir):  # saved before the cache was written
        os.utime(path, ns=(cache_copy.stat().st_mtime_ns - 10**9,) * 2)
    result = _extract(synthetic_data, cache_copy)
    assert result.exit_code == 0 and "already up to date" in result.stdout
    assert not PartialCache(cache_copy).dir.exists()


def test_damaged_cache_is_rebuilt_but_a_foreign_file_is_not_overwritten(synthetic_data, small_cache, cache_copy,
                                                                           tmp_path):
    data = cache_copy.read_bytes()
    cache_copy.write_bytes(data[: len(data) // 3])  # e.g. an interrupted copy
    result = _extract(synthetic_data, cache_copy)
    assert result.exit_code == 0, result.output
    _same_cache(cache_copy, small_cache)
    notes = tmp_path / "notes.h5"
    notes.write_text("my precious notes")
    assert_clean_error(_extract(synthetic_data, notes), r"notes\.h5 exists and is not a dogtl feature cache", "--force")
    assert notes.read_text() == "my precious notes"


@pytest.mark.parametrize("extra,named", [
    (["--passes", 3], r"passes: cache has 2, now 3"),
    (["--rotation", 30], r"augmentation\.rotation: cache has 45\.0, now 30\.0"),
    (["--no-hflip"], r"augmentation\.hflip: cache has True, now False"),
    (["--seed", 7], r"seed: cache has 2018, now 7"),
    (["--image-size", 40], r"image_size: cache has 32, now 40"),
    (["--dtype", "float32"], r"dtype: cache has 'float16', now 'float32'"),
    (["--val-fraction", 0.2], r"val_fraction: cache has 0\.1, now 0\.2"),
])
def test_changed_setting_is_refused_naming_it(extra, named, synthetic_data, cache_copy):
    before = cache_copy.read_bytes()
    line = assert_clean_error(_extract(synthetic_data, cache_copy, *extra), named, r"--force")
    assert line.count(":") < 12  # one setting named, not the whole fingerprint
    assert cache_copy.read_bytes() == before


def test_force_replaces_a_cache_made_with_other_settings(synthetic_data, small_cache, cache_copy):
    result = _extract(synthetic_data, cache_copy, "--passes", 1, "--force")
    assert result.exit_code == 0, result.output
    new, old = open_cache(cache_copy), open_cache(small_cache)
    assert new.fingerprint["passes"] == 1 and new.num_passes == 2
    assert np.array_equal(new.features(passes=[0, 1]), old.features(passes=[0, 1]))  # same keys, same passes


def test_unfinished_run_with_other_settings_is_refused_then_forced_and_batch_size_is_irrelevant(
        synthetic_data, small_cache, tmp_path):
    """--force discards an unfinished extraction made with other settings; the features of the
    new run do not depend on the batch size (batches of 5 here, of 4 in the reference)."""
    cache = tmp_path / "features.h5"
    partial = PartialCache(cache)
    partial.start(dict(open_cache(small_cache).fingerprint, seed=7))
    partial.write("labelled", 0, np.arange(4), np.full((4, 2048), 9, np.float16))
    assert_clean_error(_extract(synthetic_data, cache), r"unfinished extraction with other settings \(seed: ")
    result = _extract(synthetic_data, cache, "--batch-size", 5, "--force")
    assert result.exit_code == 0, result.output
    _same_cache(cache, small_cache, exact=False)


def test_options_reach_the_pipeline(synthetic_data, small_cache, tmp_path):
    """No-op augmentation makes the augmented pass equal the clean one; float32 storage; the seed
    draws another split but the clean pass stays the same."""
    cache = tmp_path / "features.h5"
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *CHEAP, "--passes", 1,
                     "--seed", 7, "--rotation", 0, "--zoom", 0, "--shift", 0, "--no-hflip", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    c, ref = open_cache(cache), open_cache(small_cache)
    features = c.features()
    assert np.array_equal(features[0], features[1])
    assert np.array_equal(features[0].astype(np.float16).astype(np.float32), ref.features(passes=[0])[0])
    assert not np.array_equal(features[0], features[0].astype(np.float16))  # really stored as float32
    assert not np.array_equal(c.is_val, ref.is_val)


# --- progress and interruption ---------------------------------------------------------------

def test_interrupt_keeps_work_and_progress_resumes_where_it_stopped(synthetic_data, tmp_path, monkeypatch):
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig

    cache = tmp_path / "features.h5"
    real_write, writes = PartialCache.write, []

    def interrupted(self, split, pass_index, positions, features):
        writes.append((split, pass_index, positions.tolist()))
        if len(writes) == 9:  # 6 batches of pass 0, 2 of pass 1, then Ctrl-C
            raise KeyboardInterrupt
        real_write(self, split, pass_index, positions, features)

    monkeypatch.setattr(PartialCache, "write", interrupted)
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *CHEAP, "--passes", 1)
    assert result.exit_code == 130 and "finished work is kept" in result.stderr
    monkeypatch.undo()

    seen, rewrites = [], []

    def recorded(self, split, pass_index, positions, features):
        rewrites.append((split, pass_index, positions.tolist(), seen[-1][0]))
        real_write(self, split, pass_index, positions, features)

    monkeypatch.setattr(PartialCache, "write", recorded)
    config = ExtractConfig(data=str(synthetic_data), cache=str(cache), backbone="resnet50", weights="none",
                           image_size=32, passes=1, batch_size=4)
    summary = extract_features(config, progress=lambda done, total: seen.append((done, total)))
    total = 2 * 24 + 4
    assert all(t == total for _, t in seen) and seen[-1] == (total, total)
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    # Resumed at the first unsaved batch (pass 1, images 8..11), counted as done before any work.
    assert rewrites[0] == ("labelled", 1, [8, 9, 10, 11], 24 + 8) and summary.resumed == 24 + 8
    assert len(rewrites) == 4 + 1  # the rest of pass 1 and the test images' batch
    assert summary.status == "written" and summary.images == 24 and summary.test_images == 4


def test_float16_overflow_is_an_error_and_underflow_a_warning(caplog):
    from dogtl.core.errors import DogtlError
    from dogtl.features.passes import PassRunner
    from dogtl.features.settings import ExtractConfig

    runner = PassRunner(ExtractConfig(), None, 32, None, None, None)
    assert runner._store(np.array([[1.5, -2.0]], np.float32)).dtype == np.float16
    with pytest.raises(DogtlError, match="beyond --dtype float16: rerun with --dtype float32 --force"):
        runner._store(np.array([[1e6, 0.0]], np.float32))
    with caplog.at_level("WARNING"):
        assert not runner._store(np.array([[1e-12, 3e-12]], np.float32)).any()
    assert "use --dtype float32" in caplog.text


# --- bad images ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def messy_data(tmp_path_factory):
    """Kaggle layout with odd-but-readable images, unreadable ones, a huge one and a class of one."""
    from dogtl.data.synthetic import make_kaggle_dataset

    root = make_kaggle_dataset(tmp_path_factory.mktemp("messy") / "data", num_classes=2, per_class=5,
                               test_images=2, size=48, sample_submission=False)
    odd = write_odd_images(root / "train")
    table = pd.read_csv(root / "labels.csv", dtype=str)
    classes = sorted(table["breed"].unique())
    readable = [n for n in odd if not n.startswith("bad_")]
    unreadable = ["bad_corrupt", "bad_truncated", "bad_not_image", "bad_empty", "bad_bomb"]
    shutil.copy(odd["rgb"], root / "train" / "lonely_one.jpg")
    rows = ([(n, classes[k % 2]) for k, n in enumerate(readable)] + [("lonely_one", "lonely")]
            + [(n, classes[k % 2]) for k, n in enumerate(unreadable)])
    table = pd.concat([table, pd.DataFrame(rows, columns=["id", "breed"])])
    table.to_csv(root / "labels.csv", index=False)
    shutil.copy(odd["bad_truncated"], root / "test" / "broken.jpg")
    return root, list(table["id"]), readable, unreadable


@pytest.fixture(scope="module")
def messy_skip(messy_data, tmp_path_factory):
    root = messy_data[0]
    cache = tmp_path_factory.mktemp("messy_cache") / "features.h5"
    result = run_cli("extract-features", "--data", root, "--cache", cache, *CHEAP, "--passes", 1)
    return result, cache


def test_unreadable_images_are_skipped_and_listed(messy_data, messy_skip):
    root, ids, readable, unreadable = messy_data
    result, cache = messy_skip
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    n_good = len(ids) - len(unreadable)
    assert f"wrote {cache}: {n_good} labelled images x (1 clean + 1 augmented passes), 2 test images x 1 passes, " \
           f"6 skipped" in result.stdout
    skipped_lines = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("skipped ")]
    assert len(skipped_lines) == 6
    assert f"skipped {root / 'train' / 'bad_truncated.jpg'}: Premature end of JPEG data (truncated file)" in skipped_lines
    assert f"skipped {root / 'test' / 'broken.jpg'}: Premature end of JPEG data (truncated file)" in skipped_lines

    c = open_cache(cache)
    assert list(c.ids) == [i for i in ids if i not in unreadable]  # PNG, grey, CMYK, 16-bit, GIF, huge: all in
    assert set(readable) <= set(c.ids) and list(c.test_ids) == ["test00000", "test00001"]
    reasons = dict(line.split("\t") for line in c.skipped)
    assert {Path(p).stem for p in reasons} == set(unreadable) | {"broken"}
    assert reasons[str(root / "train" / "bad_bomb.jpg")].startswith("image too large")
    assert reasons[str(root / "train" / "bad_not_image.jpg")].startswith("Unknown image file format")
    assert reasons[str(root / "train" / "bad_empty.jpg")] == "empty file"
    lonely = list(c.ids).index("lonely_one")
    assert c.classes[c.labels[lonely]] == "lonely" and not c.is_val[lonely]  # a class of one stays in training
    features = c.features()
    assert features.shape == (2, n_good, 2048) and np.isfinite(features).all()
    assert np.abs(features).max() > 0


def test_on_bad_image_fail_stops_and_keeps_work(messy_data, messy_skip, tmp_path):
    root = messy_data[0]
    cache = tmp_path / "features.h5"
    args = ["extract-features", "--data", root, "--cache", cache, *CHEAP, "--passes", 1]
    line = assert_clean_error(run_cli(*args, "--on-bad-image", "fail"),
                              r"bad_corrupt\.jpg: cannot read image \(Invalid JPEG data", r"--on-bad-image skip")
    assert "\t" not in line
    saved = sorted(PartialCache(cache).dir.glob("labelled-p0-*.npz"))
    assert len(saved) == 5 and not cache.exists()  # the 19 images before the bad one are kept
    result = run_cli(*args)  # --on-bad-image skip (default) resumes and finishes
    assert result.exit_code == 0, result.output
    _same_cache(cache, messy_skip[1])


def test_folder_per_class_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / name / f"{name}{k}.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "dog" / "extra.png")
    (root / "test").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "test" / "who.jpg")
    result = run_cli("extract-features", "--data", root, "--cache", tmp_path / "pets.h5", *CHEAP, "--passes", 0)
    assert result.exit_code == 0, result.output
    c = open_cache(tmp_path / "pets.h5")
    assert c.classes == ["cat", "dog"] and c.fingerprint["data_layout"] == "folders"
    assert list(c.ids) == ["cat/cat0", "cat/cat1", "cat/cat2", "dog/dog0", "dog/dog1", "dog/dog2", "dog/extra"]
    assert list(c.labels) == [0, 0, 0, 1, 1, 1, 1] and list(c.test_ids) == ["who"]
    assert c.features().shape == (1, 7, 2048) and c.is_val.sum() >= 1


# --- options, weights and backbones ----------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--backbone", "vgg99"], r"unknown backbone 'vgg99': choose one of convnext_base, .*, efficientnet_b0, "
                              r".*, xception"),
    (["--image-size", 16], r"--image-size 16 is too small for resnet50: use at least 32"),
    (["--backbone", "xception", "--image-size", 64], r"too small for xception: use at least 71"),
    (["--weights", "/nowhere/w.h5"], r"--weights /nowhere/w\.h5: no such file"),
    (["--on-bad-image", "ignore"], r"--on-bad-image 'ignore': choose one of skip, fail"),
    (["--val-fraction", 1.5], r"--val-fraction 1\.5 must be in \[0, 1\)"),
    (["--dtype", "float8"], r"--dtype 'float8'"),
    (["--batch-size", 0], r"--batch-size 0 must be at least 1"),
    (["--passes", -1], r"--passes -1"),
    (["--zoom", 1.5], r"--zoom 1\.5 must be in \[0, 1\)"),
])
def test_bad_options_are_one_clear_line(args, message, synthetic_data, tmp_path):
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "c.h5", *CHEAP, *args)
    assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras warns about each layer it cannot fill
def test_mismatching_weights_file_is_a_clear_error(synthetic_data, tmp_path):
    import keras

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.save_weights(tmp_path / "tiny.weights.h5")
    (tmp_path / "garbage.h5").write_bytes(b"not weights at all")
    for name in ("tiny.weights.h5", "garbage.h5"):
        result = run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "c.h5", *CHEAP,
                         "--weights", tmp_path / name)
        assert_clean_error(result, rf"--weights .*{name}: not usable for resnet50")
        assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()


def test_local_weights_file_is_used_and_identified_by_content(synthetic_data, small_cache, tmp_path):
    weights = tmp_path / "resnet50_notop.weights.h5"
    shutil.copy(open_cache(small_cache).weights_path, weights)  # --weights none's calibrated random backbone
    cache = tmp_path / "features.h5"
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *CHEAP, "--passes", 0,
                     "--weights", weights)
    assert result.exit_code == 0, result.output
    c = open_cache(cache)
    assert c.fingerprint["weights"].startswith("file:") and ":sha256:" in c.fingerprint["weights"]
    # The file holds the same weights as small_cache's backbone.
    assert np.array_equal(c.features(), open_cache(small_cache).features(passes=[0]))
    moved = weights.rename(tmp_path / "renamed.weights.h5")
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *CHEAP, "--passes", 0,
                     "--weights", moved)
    assert result.exit_code == 0 and "already up to date" in result.stdout  # same content, same cache


def test_every_backbone_builds_at_its_minimum_size_with_its_feature_dim():
    from dogtl.core.backbones import BACKBONES
    from dogtl.data.images import preprocess_fn
    from dogtl.core.models import build_backbone

    assert {"xception", "inception_v3", "resnet50", "mobilenet_v2", "efficientnet_b0"} <= set(BACKBONES)
    from conftest import CHEAP_BACKBONES

    for spec in (BACKBONES[name] for name in CHEAP_BACKBONES):  # the others: tests/core/test_backbones.py
        model = build_backbone(spec, "none", spec.min_size)
        x = preprocess_fn(spec)(np.full((1, spec.min_size, spec.min_size, 3), 128.0, np.float32))
        assert model(x, training=False).shape == (1, spec.feature_dim), spec.name
        assert not model.trainable
