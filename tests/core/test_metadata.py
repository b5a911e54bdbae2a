"""Model metadata (core.metadata): files of the previous release load with their one backbone as a
list, several backbones round-trip, a later format is refused in one line, and what an older
dogtl needs stays on disk."""

import hashlib
import json

import pytest
from conftest import assert_clean_error, run_cli

from dogtl.core.errors import DamagedError, DogtlError
from dogtl.core.files import json_text
from dogtl.core.metadata import FORMAT_VERSION, BackboneInput, ModelMetadata, metadata_path

FINGERPRINT = {"backbone": "resnet50", "weights": "imagenet", "image_size": 224, "preprocessing": "caffe",
               "seed": 0, "augmentation": {"flip": True}}

# A head's metadata as the release before format_version wrote it (head/train.py at 615e5ae:
# head_metadata + multicache._entry, then "history"), integrity entry included.
OLD_HEAD = {"kind": "head", "classes": ["beagle", "pug"], "backbone": "resnet50", "weights": "imagenet",
            "image_size": 224, "weights_path": None, "preprocessing": "caffe", "feature_dim": 2048,
            "cache": "cache/features.h5", "cache_fingerprint": FINGERPRINT, "settings": {"epochs": 30},
            "metrics": {"val_log_loss": 0.25}, "train_images": 80, "val_images": 20, "passes_used": 3,
            "resolved": {"precision": "float32"}, "history": "head.history.csv"}


def _write_old(tmp_path, raw: dict):
    """A model file and its metadata as the previous release saved them (its content hash too)."""
    model = tmp_path / "head.keras"
    model.write_bytes(b"not a real model")
    digest = hashlib.sha256(json_text(raw).encode()).hexdigest()
    metadata_path(model).write_text(json_text({**raw, "integrity": {"model_sha256": "0" * 64,
                                                                    "metadata_sha256": digest}}))
    return model


def _two_backbones() -> ModelMetadata:
    entries = [BackboneInput("resnet50", "imagenet", 224, "caffe", 2048, None, "a.h5", FINGERPRINT),
               BackboneInput("xception", "file:x.h5:sha256:0123456789abcdef", 299, "tf", 2048, "/w/x.h5", "b.h5",
                             {**FINGERPRINT, "backbone": "xception"})]
    return ModelMetadata(kind="head", classes=["beagle", "pug"], backbones=entries, metrics={"val_log_loss": 0.2})


def test_an_old_single_backbone_file_loads_with_its_backbone_as_a_one_item_list(tmp_path):
    meta = ModelMetadata.load(_write_old(tmp_path, OLD_HEAD))
    assert meta.backbones == [BackboneInput("resnet50", "imagenet", 224, "caffe", 2048, None, "cache/features.h5",
                                            FINGERPRINT)]
    assert meta.kind == "head" and meta.classes == ["beagle", "pug"] and not meta.is_multi
    assert meta.feature_dim == 2048 and meta.history == "head.history.csv" and meta.passes_used == 3
    assert meta.extra == {}


def test_an_old_file_saved_again_keeps_its_keys_for_older_releases(tmp_path):
    model = _write_old(tmp_path, OLD_HEAD)
    ModelMetadata.load(model).save(model)
    raw = json.loads(metadata_path(model).read_text())
    assert raw["format_version"] == FORMAT_VERSION and "backbones" not in raw  # one backbone: top level, as before
    assert {k: raw[k] for k in OLD_HEAD} == OLD_HEAD
    assert raw["integrity"]["model_sha256"] == "0" * 64  # a deliberate edit keeps the model's hash
    assert ModelMetadata.load(model) == ModelMetadata.load(model)  # its own hash made anew: loads


def test_several_backbones_round_trip(tmp_path):
    model = tmp_path / "multi.keras"
    model.write_bytes(b"model")
    _two_backbones().save(model)
    loaded = ModelMetadata.load(model)
    assert loaded.backbones == _two_backbones().backbones and loaded.is_multi and loaded.feature_dim == 4096
    raw = json.loads(metadata_path(model).read_text())
    assert [b["cache"] for b in raw["backbones"]] == ["a.h5", "b.h5"]
    assert raw["backbone"] == "resnet50" and raw["feature_dim"] == 4096  # older releases read the first, the total


def test_an_old_multi_backbone_file_loads(tmp_path):
    entries = [{**OLD_HEAD, "cache": c, "feature_dim": 1024} for c in ("a.h5", "b.h5")]
    entries = [{k: e[k] for k in ("backbone", "weights", "image_size", "weights_path", "preprocessing",
                                  "feature_dim", "cache", "cache_fingerprint")} for e in entries]
    meta = ModelMetadata.load(_write_old(tmp_path, {**OLD_HEAD, "feature_dim": 2048, "backbones": entries}))
    assert [b.cache for b in meta.backbones] == ["a.h5", "b.h5"] and meta.feature_dim == 2048


def test_a_later_format_is_refused_in_one_line(tmp_path):
    model = _write_old(tmp_path, {**OLD_HEAD, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(DogtlError, match=rf"head\.json: metadata format {FORMAT_VERSION + 1} is newer than this "
                                         rf"dogtl reads \(up to {FORMAT_VERSION}\); upgrade dogtl") as e:
        ModelMetadata.load(model)
    assert "\n" not in str(e.value)
    with pytest.raises(DamagedError, match="damaged metadata"):
        ModelMetadata.from_dict({**OLD_HEAD, "format_version": "two"})
    assert_clean_error(run_cli("evaluate", "--model", model, "--out", tmp_path / "e"),
                       f"metadata format {FORMAT_VERSION + 1} is newer than this dogtl reads")


def test_keys_of_a_later_release_are_kept(tmp_path):
    model = _write_old(tmp_path, {**OLD_HEAD, "format_version": FORMAT_VERSION, "calibration": {"t": 1.5}})
    meta = ModelMetadata.load(model)
    assert meta.extra == {"calibration": {"t": 1.5}}
    meta.save(model)
    assert json.loads(metadata_path(model).read_text())["calibration"] == {"t": 1.5}


def test_metadata_lacking_a_backbone_field_is_named(tmp_path):
    from dogtl.core.modelinfo import check_metadata

    model = _write_old(tmp_path, {k: v for k, v in OLD_HEAD.items() if k not in ("image_size", "weights")})
    with pytest.raises(DogtlError, match="metadata lacks image_size, weights; retrain the model"):
        check_metadata(model)
