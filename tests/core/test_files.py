"""core.files: a failed write leaves the old file (and no temporary one), overwriting needs
--force, and a model is saved with its metadata as a pair."""

from __future__ import annotations

import json

import pytest

from dogtl.core import artifacts
from dogtl.core import metadata as model_metadata
from dogtl.core.errors import DogtlError
from dogtl.core.files import atomic_path, atomic_paths, check_overwrite, write_json_atomic, write_text_atomic
from dogtl.core.temporaries import temporary_sibling


class Boom(Exception):
    pass


def boom(*args, **kwargs):
    raise Boom


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "report.json"
    write_text_atomic(target, "old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise Boom
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file behind

    write_json_atomic(target, {"b": 1, "a": (2, 3)}, durable=True)
    assert json.loads(target.read_text()) == {"a": [2, 3], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_fixed_temporary_name_and_endings_that_pick_a_format(tmp_path):
    fixed = tmp_path / "features.h5.tmp"
    with atomic_path(tmp_path / "features.h5", tmp=fixed) as tmp:
        assert tmp == fixed
        tmp.write_bytes(b"cache")
    assert (tmp_path / "features.h5").read_bytes() == b"cache" and not fixed.exists()
    # Keras wants .keras and .weights.h5, matplotlib .png: the whole ending is kept.
    assert temporary_sibling(tmp_path / "backbone.weights.h5").name.endswith(".weights.h5")
    assert temporary_sibling(tmp_path / "head.keras").suffix == ".keras"


def test_an_os_error_without_a_file_name_is_given_the_target_s(tmp_path):
    """Keras's zip writer on a full disk raises ENOSPC naming no file: the one-line message
    must still say which file could not be written."""
    import errno

    from dogtl.core.errors import os_error_message

    target = tmp_path / "head.keras"
    with pytest.raises(OSError) as caught:
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(target)
    assert os_error_message(caught.value).startswith(f"{target}: the disk is full")
    with pytest.raises(OSError) as caught:  # a named file keeps its own name
        with atomic_path(target):
            raise OSError(errno.EACCES, "Permission denied", str(tmp_path / "other"))
    assert caught.value.filename == str(tmp_path / "other")


def test_atomic_paths_renames_none_until_all_are_written(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(Boom):
        with atomic_paths(a, b) as (tmp_a, tmp_b):
            tmp_a.write_text("new a")
            raise Boom
    assert not a.exists() and not b.exists() and list(tmp_path.iterdir()) == []


def test_check_overwrite_refuses_without_force_naming_the_file_and_force(tmp_path):
    existing = tmp_path / "submission.csv"
    existing.write_text("keep me")
    with pytest.raises(DogtlError, match=rf"{existing.name} exists: pass --force .* another --out$"):
        check_overwrite(existing, force=False)
    with pytest.raises(DogtlError, match=r"exists and is not a cache: pass --force .* another --cache"):
        check_overwrite(existing, False, "--cache", detail=" and is not a cache")
    assert check_overwrite(existing, force=True) == existing and existing.read_text() == "keep me"
    assert check_overwrite(str(tmp_path / "new.csv"), force=False) == tmp_path / "new.csv"
    assert check_overwrite(tmp_path / "new" / "deeper" / "x.csv", force=False) == tmp_path / "new" / "deeper" / "x.csv"
    assert (tmp_path / "new" / "deeper").is_dir()  # outputs get their folder, whatever the command
    with pytest.raises(DogtlError, match=r"submission.csv: a part of this path is a file"):
        check_overwrite(existing / "x.csv", force=True)


class FakeModel:
    """Stands in for a Keras model: save() writes its version to the path it is given."""

    def __init__(self, version: str, fail: bool = False):
        self.version, self.fail = version, fail

    def save(self, path):
        path.write_text(f"model {self.version}")
        if self.fail:
            raise Boom


def _pair(path):
    return path.read_text(), json.loads(model_metadata.metadata_path(path).read_text())["version"]


def _version(v: str):
    return model_metadata.ModelMetadata(extra={"version": v})


def test_a_model_and_its_metadata_are_both_old_or_both_new(tmp_path, monkeypatch):
    path = tmp_path / "head.keras"
    artifacts.save_model(FakeModel("1"), path, _version("1"))
    assert _pair(path) == ("model 1", "1")

    with pytest.raises(Boom):  # the model is written, then writing its metadata fails
        with monkeypatch.context() as m:
            m.setattr(model_metadata, "json_text", boom)
            artifacts.save_model(FakeModel("2"), path, _version("2"))
    assert _pair(path) == ("model 1", "1")
    with pytest.raises(Boom):  # writing the model fails
        artifacts.save_model(FakeModel("2", fail=True), path, _version("2"))
    assert _pair(path) == ("model 1", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.keras"]

    artifacts.save_model(FakeModel("2"), path, _version("2"))
    assert _pair(path) == ("model 2", "2")


def test_check_writable_wants_keras_files_and_force(tmp_path):
    path = tmp_path / "head.keras"
    path.write_text("a model")
    with pytest.raises(DogtlError, match="head.keras exists: pass --force"):
        artifacts.check_writable(path, force=False)
    assert artifacts.check_writable(path, force=True) == path
    with pytest.raises(DogtlError, match="must end in .keras"):
        artifacts.check_writable(tmp_path / "head.h5", force=True)
