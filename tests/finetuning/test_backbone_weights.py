"""A model remembers where its local backbone weights file was: used again while its hash
matches, asked for (one line) when it moved or changed."""

from __future__ import annotations

import shutil

import pytest
from _stage3 import copy_head
from conftest import assert_clean_error, run_cli

from dogtl.core.errors import DogtlError
from dogtl.core.metadata import BackboneInput
from dogtl.features.modelweights import backbone_weights


@pytest.fixture
def recorded(stage3, tmp_path):
    """Head metadata naming a copy of the stage-three weights file, and that copy."""
    from dogtl.core.models import weights_identity

    weights = tmp_path / "weights" / "backbone.weights.h5"
    weights.parent.mkdir()
    shutil.copy(stage3.weights, weights)
    return BackboneInput(weights=weights_identity(str(weights)), weights_path=str(weights)), weights


def test_extraction_records_the_weights_path_outside_the_fingerprint(stage3):
    from dogtl.features.cache import open_cache

    cache = open_cache(stage3.cache)
    assert cache.weights_path == str(stage3.weights.resolve())
    assert str(stage3.weights) not in str(cache.fingerprint)  # a renamed copy still matches by hash


def test_the_recorded_path_is_used_while_its_hash_matches(recorded):
    meta, weights = recorded
    assert backbone_weights(meta) == str(weights)
    assert backbone_weights(BackboneInput(weights="imagenet")) == "imagenet"


def test_a_moved_file_is_asked_for_in_one_line(recorded, tmp_path):
    meta, weights = recorded
    moved = tmp_path / "elsewhere.weights.h5"
    weights.rename(moved)
    with pytest.raises(DogtlError, match=r"weights file backbone.weights.h5 is no longer at .*weights/"
                                         r"backbone.weights.h5; pass --weights PATH$") as e:
        backbone_weights(meta)
    assert "\n" not in str(e.value)
    assert backbone_weights(meta, str(moved)) == str(moved)  # same content: accepted
    with pytest.raises(DogtlError, match="pass it again with --weights PATH"):  # older metadata: no path
        backbone_weights(BackboneInput(weights=meta.weights))


def test_a_different_file_with_the_same_name_is_refused(recorded):
    meta, weights = recorded
    weights.write_bytes(b"not the same weights")
    with pytest.raises(DogtlError, match=r"backbone.weights.h5 is no longer the model's backbone weights file "
                                         r"backbone.weights.h5 .*content changed; pass --weights PATH$"):
        backbone_weights(meta)
    with pytest.raises(DogtlError, match="is not the backbone the model was trained on"):
        backbone_weights(meta, str(weights))


def test_cli_asks_for_a_moved_weights_file(stage3, tmp_path):
    head = copy_head(stage3, tmp_path / "head", weights_path=str(tmp_path / "gone" / "backbone.weights.h5"))
    assert_clean_error(run_cli("finetune", "--data", stage3.data, "--head", head, "--out", tmp_path / "ft.keras"),
                       r"backbone.weights.h5 is no longer at .*gone/backbone.weights.h5; pass --weights PATH$")
