"""extract-features --precision and --cut-blocks: the precision is recorded and refused on a
mismatch; the cut activations are the frozen part's output on the same augmented pass; the disk
is checked first; sharding, merging and int8 storage keep them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import CHEAP, assert_clean_error, run_cli

from dogtl.core.errors import DiskSpaceError
from dogtl.features.cache import open_cache
from dogtl.features.fingerprint import fingerprint_differences
from dogtl.features.partial import PartialCache


def test_precision_is_recorded_and_old_caches_count_as_float32(cut_stage3):
    fp = open_cache(cut_stage3.cache).fingerprint
    assert fp["precision"] == "float32"  # auto on this CPU (AVX2, no GPU)
    assert fp["cut"] == {"blocks": 2, "dtype": "float16", "shape": [2, 2, 160]}
    older = {k: v for k, v in fp.items() if k != "precision"}
    assert fingerprint_differences(older, fp) == []
    assert fingerprint_differences(fp, {**fp, "precision": "bfloat16"}) == [
        "precision: cache has 'float32', now 'bfloat16'"]


def test_a_cache_of_another_precision_is_refused_naming_it(small_cache, synthetic_data, tmp_path):
    import shutil

    copy = shutil.copy(small_cache, tmp_path / "features.h5")
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", copy, *CHEAP, "--passes", 2,
                     "--tta-passes", 1, "--precision", "bfloat16")
    assert_clean_error(result, "precision: cache has 'float32', now 'bfloat16'", "--force")


def test_cut_activations_equal_the_frozen_part_on_the_same_augmented_pass(cut_stage3):
    from dogtl.core.models import build_backbone
    from dogtl.data.augment import AugmentConfig
    from dogtl.data.folders import load_dataset
    from dogtl.data.images import image_dataset
    from dogtl.core.backbones import get_backbone
    from dogtl.features.cut import CutReader, split_backbone

    cache = open_cache(cut_stage3.cache)
    spec, size = get_backbone("mobilenet_v2"), 48
    frozen, top = split_backbone(build_backbone(spec, str(cut_stage3.weights), size), spec, 2)
    with h5py.File(cut_stage3.cache) as f:
        index, keys = f["labelled/index"][:], f["labelled/key"][:]
    paths = [load_dataset(cut_stage3.data).paths[i] for i in index]
    reader = CutReader(cache)
    for p in (0, 1):
        _, _, images = next(iter(image_dataset(paths, spec, size, indices=keys, pass_index=p, seed=cache.fingerprint["seed"],
                                               augmentation=AugmentConfig(**cache.fingerprint["augmentation"]),
                                               batch_size=len(paths))))
        want = np.asarray(frozen(images, training=False))
        got = reader.read("labelled", p, np.arange(len(paths))[::-1])[::-1]  # any row order
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        # and the top part on them gives the cached pooled features
        np.testing.assert_allclose(np.asarray(top(got)), cache.features("labelled", [p])[0], rtol=1e-2,
                                   atol=1e-2 * np.abs(want).max())
    reader.close()
    assert cache.features("labelled", [1])[0].std() > 0 and not np.allclose(
        CutReader(cache).read("labelled", 0, [0]), CutReader(cache).read("labelled", 1, [0]))  # augmented


def test_int8_cut_round_trips_within_half_a_step():
    from dogtl.features.cut import decode, encode

    x = np.random.default_rng(0).normal(size=(3, 4, 4, 5)).astype(np.float32) * np.arange(1, 6)
    x[1, ..., 2] = 0.0  # an all-zero channel
    stored = encode(x, "int8")
    assert stored["cut"].dtype == np.int8 and stored["cut_scale"].shape == (3, 5)
    back = decode(stored["cut"], stored["cut_scale"])
    assert np.all(np.abs(back - x) <= stored["cut_scale"][:, None, None, :] / 2 + 1e-7)
    assert np.all(back[1, ..., 2] == 0)


def test_no_room_for_the_cut_is_refused_before_any_work(cut_stage3, tmp_path, monkeypatch):
    from dogtl.core import diskspace
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 10_000)
    cache = tmp_path / "features.h5"
    with pytest.raises(DiskSpaceError, match=r"--cut-blocks 2 .*free .* MB"):
        extract_features(ExtractConfig(data=str(cut_stage3.data), cache=str(cache), backbone="mobilenet_v2",
                                       weights=str(cut_stage3.weights), image_size=48, passes=1, cut_blocks=2))
    assert not cache.exists() and not PartialCache(cache).dir.exists()


@pytest.mark.slow
def test_sharded_int8_cut_merges_into_one_cache(synthetic_data, tmp_path):
    args = [*CHEAP, "--passes", 1, "--tta-passes", 0, "--dtype", "float32", "--cut-blocks", 1]
    for i in (1, 2):
        r = run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "features.h5", *args,
                    "--cut-dtype", "int8", "--shard", f"{i}/2")
        assert r.exit_code == 0, r.output
        assert "cut activations (top 1 blocks, [2, 2, 1024] in int8)" in r.output
    shards = [tmp_path / f"features.shard-{i}-of-2.h5" for i in (1, 2)]
    for mode in ("virtual", "copy"):
        out = tmp_path / f"merged-{mode}.h5"
        r = run_cli("merge-cache", *shards, "--out", out, *(["--copy"] if mode == "copy" else []))
        assert r.exit_code == 0, r.output
        with h5py.File(shards[0]) as a, h5py.File(shards[1]) as b, h5py.File(out) as m:
            for key in ("cut", "cut_scale", "features"):
                both = np.concatenate([a[f"labelled/{key}"][:], b[f"labelled/{key}"][:]], axis=1)
                assert np.array_equal(m[f"labelled/{key}"][:], both), (mode, key)
                assert m[f"labelled/{key}"].shape[1] == 24
        assert open_cache(out).fingerprint["cut"]["dtype"] == "int8"
    wrong = run_cli("extract-features", "--data", synthetic_data, "--cache", tmp_path / "features.h5", *args,
                    "--cut-dtype", "float16", "--shard", "1/2")
    assert_clean_error(wrong, "cut.dtype: cache has 'int8', now 'float16'")
