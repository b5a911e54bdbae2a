"""Concurrent writers, full and read-only disks, bit rot and bugs, as a user meets them (issue 15).

The fault-injection harness that kills every long command at random moments is
benchmarks/faults.py (slow, opt-in); these are its fast, always-run counterparts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CHEAP, assert_clean_error, run_cli
from dogtl.core.errors import CacheError, DamagedError
from dogtl.core.locks import lock_path
from dogtl.features.cache import open_cache
from dogtl.features.partial import partial_dir

SMALL = [*CHEAP, "--passes", 2, "--tta-passes", 1]  # the settings of conftest's small_cache


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_a_second_writer_is_refused_and_the_first_finishes_intact(synthetic_data, small_cache, tmp_path):
    """Two real processes: a running extraction holds the cache's lock, a second one on the same
    cache is refused at once, naming the first; the first's cache equals an uninterrupted run's."""
    cache = tmp_path / "c.h5"
    first = subprocess.Popen([sys.executable, "-m", "dogtl.cli", "extract-features", "--data", str(synthetic_data),
                              "--cache", str(cache), *map(str, SMALL)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not lock_path(cache).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert lock_path(cache).exists(), first.communicate()
        second = run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *SMALL)
        assert_clean_error(second, rf"another dogtl process \(pid {first.pid}, started .*\) is writing the feature "
                                   rf"cache .*c\.h5; wait for it or stop it")
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert not lock_path(cache).exists() and not partial_dir(cache).exists()
    got, want = open_cache(cache), open_cache(small_cache)
    np.testing.assert_array_equal(got.features("labelled"), want.features("labelled"))
    np.testing.assert_array_equal(got.features("test"), want.features("test"))


def _fail_after(monkeypatch, batches: int, error: OSError):
    """Make the (batches+1)-th saved batch of an extraction fail with `error`."""
    from dogtl.features.partial import PartialCache

    real, count = PartialCache.write, {"n": 0}

    def write(self, split, pass_index, positions, features):
        count["n"] += 1
        if count["n"] > batches:
            raise OSError(error.errno, os.strerror(error.errno), str(self.dir / f"{split}-p{pass_index}.npz"))
        return real(self, split, pass_index, positions, features)

    monkeypatch.setattr(PartialCache, "write", write)


@pytest.mark.parametrize("code, needle", [(errno.ENOSPC, "the disk is full: free space on /"),
                                          (errno.EROFS, "the file system is read-only")])
def test_os_errors_are_one_line_and_work_is_kept(synthetic_data, small_cache, tmp_path, monkeypatch, code, needle):
    cache = tmp_path / "c.h5"
    _fail_after(monkeypatch, 3, OSError(code, os.strerror(code)))
    failed = run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *SMALL)
    line = assert_clean_error(failed, needle, r"c\.h5\.partial", "rerun the same command")
    assert failed.exit_code == 1 and "finished work is kept" in line
    saved = sorted(p.name for p in partial_dir(cache).glob("*.npz"))
    assert len(saved) == 3, saved  # the batches done before the error are kept
    assert not lock_path(cache).exists()
    monkeypatch.undo()
    if code == errno.ENOSPC:  # the rerun, with room, resumes and gives the uninterrupted numbers
        assert run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *SMALL).exit_code == 0
        np.testing.assert_array_equal(open_cache(cache).features(), open_cache(small_cache).features())


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_a_real_small_disk_is_refused_before_any_work(synthetic_data, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = run_cli("extract-features", "--data", synthetic_data, "--cache", mnt / "c.h5", *SMALL)
        assert_clean_error(result, r"extract-features .*needs about [\d.]+ MB", "rerun the same command: finished work is kept")
        assert not partial_dir(mnt / "c.h5").exists()
    finally:
        subprocess.run(["umount", str(mnt)])


def test_permission_denied_is_one_line(monkeypatch, small_cache, tmp_path):
    import dogtl.api

    def denied(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "models"))

    monkeypatch.setattr(dogtl.api, "train_head", denied)
    result = run_cli("train-head", "--cache", small_cache, "--out", tmp_path / "models" / "h.keras")
    assert_clean_error(result, r"models: permission denied: make it writable .* finished work is kept")


def test_a_path_that_is_a_folder_is_one_line(tmp_path, small_cache):
    out = tmp_path / "head.keras"
    out.mkdir()
    result = run_cli("train-head", "--cache", small_cache, "--out", out, "--force", "--epochs", 1)
    assert_clean_error(result, r"head\.keras is a folder")


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_feature_byte_is_damage_not_numbers(small_cache, synthetic_data, tmp_path):
    cache = tmp_path / "c.h5"
    shutil.copy(small_cache, cache)
    with h5py.File(cache, "r") as f:
        ds = f["labelled/features"]
        assert ds.fletcher32 and f["labelled/labels"].fletcher32
        offset = ds.id.get_chunk_info(0).byte_offset + 100
    _flip(cache, offset)
    opened = open_cache(cache)  # the small datasets still check out
    with pytest.raises(DamagedError, match="damaged: rerun extract-features --force"):
        opened.features("labelled")
    result = run_cli("train-head", "--cache", cache, "--out", tmp_path / "h.keras", "--epochs", 1)
    assert_clean_error(result, r"c\.h5: damaged: rerun extract-features --force")
    # without --force the cache looks up to date; with it, the damage is found and the cache redone
    redo = run_cli("extract-features", "--data", synthetic_data, "--cache", cache, *SMALL, "--force")
    assert redo.exit_code == 0 and "wrote" in redo.stdout, redo.output
    np.testing.assert_array_equal(open_cache(cache).features(), open_cache(small_cache).features())


def test_a_flipped_id_byte_is_detected_on_open(small_cache, tmp_path):
    cache = tmp_path / "c.h5"
    shutil.copy(small_cache, cache)
    first_id = open_cache(cache).ids[0].encode()
    data = cache.read_bytes()
    _flip(cache, data.index(first_id) + 1)
    with pytest.raises(CacheError, match="damaged: rerun extract-features --force"):
        open_cache(cache)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import keras

    from dogtl.core.artifacts import save_model
    from dogtl.core.metadata import ModelMetadata

    path = tmp_path_factory.mktemp("model") / "head.keras"
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    save_model(model, path, ModelMetadata(kind="head", classes=["a", "b", "c"], metrics={"val_log_loss": 0.5}))
    return path


def test_models_carry_content_hashes_checked_on_load(tiny_model, tmp_path):
    from dogtl.core.artifacts import load_model
    from dogtl.core.metadata import metadata_path

    meta = json.loads(metadata_path(tiny_model).read_text())
    assert set(meta["integrity"]) == {"model_sha256", "metadata_sha256"}
    load_model(tiny_model, compile=False)  # intact: loads

    damaged = tmp_path / "head.keras"
    shutil.copy(tiny_model, damaged)
    shutil.copy(metadata_path(tiny_model), metadata_path(damaged))
    _flip(damaged, damaged.stat().st_size // 2)
    with pytest.raises(DamagedError, match=r"head\.keras: damaged \(its content hash differs"):
        load_model(damaged)

    shutil.copy(tiny_model, damaged)
    edited = metadata_path(damaged).read_text().replace('"val_log_loss": 0.5', '"val_log_loss": 0.4')
    metadata_path(damaged).write_text(edited)
    result = run_cli("predict", "--model", damaged, "--data", tmp_path)
    assert_clean_error(result, r"head\.json: damaged metadata \(its content hash differs")


def test_an_unexpected_exception_is_shown_as_a_bug(monkeypatch, small_cache, tmp_path):
    import dogtl.api

    def broken(**kwargs):
        raise ValueError("Shapes (None, 3) and (None, 5) are incompatible")

    monkeypatch.setattr(dogtl.api, "train_head", broken)
    result = run_cli("train-head", "--cache", small_cache, "--out", tmp_path / "h.keras")
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: Shapes (None, 3) and (None, 5) are incompatible" in result.stderr
    assert "this is a bug in dogtl" in result.stderr
    import keras
    import tensorflow as tf

    from dogtl import __version__
    assert f"dogtl {__version__}" in result.stderr and f"tensorflow {tf.__version__}" in result.stderr
    assert f"keras {keras.__version__}" in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_an_unknown_os_error_is_a_bug_too(monkeypatch, small_cache, tmp_path):
    import dogtl.api

    def broken(**kwargs):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(dogtl.api, "train_head", broken)
    result = run_cli("train-head", "--cache", small_cache, "--out", tmp_path / "h.keras")
    assert result.exit_code == 1 and "this is a bug in dogtl" in result.stderr


def test_setting_errors_stay_one_line(synthetic_data, tmp_path):
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "c.h5", "--passes", -1)
    assert_clean_error(result, "--passes -1")
    assert result.exit_code == 2
