"""Reading data folders (both layouts), the validation split, image decoding, and the
one-line errors for structurally bad data."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import CHEAP, assert_clean_error, run_cli
from PIL import Image

from dogtl.data.folders import content_hashes, load_dataset, split_validation
from dogtl.core.errors import DataError


@pytest.fixture
def data_copy(synthetic_data, tmp_path):
    """A private, editable copy of the synthetic Kaggle data set."""
    return shutil.copytree(synthetic_data, tmp_path / "data")


def test_kaggle_layout(synthetic_data):
    ds = load_dataset(synthetic_data)
    table = pd.read_csv(synthetic_data / "labels.csv")
    assert ds.layout == "kaggle"
    assert list(ds.classes) == sorted(table["breed"].unique())
    assert list(ds.ids) == list(table["id"])
    assert [ds.classes[k] for k in ds.labels] == list(table["breed"])
    assert all(p == synthetic_data / "train" / f"{i}.jpg" for i, p in zip(ds.ids, ds.paths))
    assert list(ds.test_ids) == sorted(p.stem for p in (synthetic_data / "test").iterdir())
    assert ds.sample_submission == synthetic_data / "sample_submission.csv"
    hashes = content_hashes(ds.paths)
    assert hashes[0] == hashlib.sha256(ds.paths[0].read_bytes()).hexdigest() and len(set(hashes)) == len(hashes)
    assert content_hashes([synthetic_data / "nothing.jpg"]) == [""]  # unreadable: tried (and reported) later


def test_file_lists_see_changed_labels_and_contents_but_test_images_apart(data_copy):
    from dogtl.features.incremental import image_lists, list_fingerprint

    def lists():
        return list_fingerprint(image_lists(load_dataset(data_copy)))

    before = lists()
    table = pd.read_csv(data_copy / "labels.csv")
    table.loc[0, "breed"], table.loc[len(table) - 1, "breed"] = table.loc[len(table) - 1, "breed"], table.loc[0, "breed"]
    table.to_csv(data_copy / "labels.csv", index=False)
    relabelled = lists()
    image = data_copy / "train" / f"{table.loc[1, 'id']}.jpg"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 1  # same size, other content
    image.write_bytes(bytes(data))
    edited = lists()
    assert len({before["file_list"], relabelled["file_list"], edited["file_list"]}) == 3
    assert before["test_file_list"] == edited["test_file_list"] and edited["num_images"] == len(table)
    (data_copy / "test" / "late.jpg").write_bytes(image.read_bytes())
    assert lists()["test_file_list"] != edited["test_file_list"] and lists()["file_list"] == edited["file_list"]


def test_folder_per_class_layout(tmp_path):
    root = tmp_path / "mine"
    for name, colour in (("zebra", (250, 250, 250)), ("ant", (10, 10, 10))):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (40, 30), colour).save(root / name / f"img{k}.jpg")
    Image.new("RGB", (40, 30)).save(root / "ant" / "extra.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.jpg")
    (root / "empty_class").mkdir()
    (root / "test").mkdir()
    Image.new("RGB", (40, 30)).save(root / "test" / "t1.jpg")

    ds = load_dataset(root)
    assert ds.layout == "folders"
    assert ds.classes == ("ant", "zebra")  # hidden and empty folders are not classes
    assert list(ds.ids) == ["ant/extra", "ant/img0", "ant/img1", "ant/img2", "zebra/img0", "zebra/img1", "zebra/img2"]
    assert list(ds.labels) == [0, 0, 0, 0, 1, 1, 1]
    assert ds.test_ids == ("t1",) and ds.sample_submission is None


def test_split_is_each_images_own_draw_stratified_on_average_and_never_a_whole_class():
    ids = [f"img{i:05d}" for i in range(4011)]
    labels = np.repeat(np.arange(4), [2000, 2000, 10, 1]).astype(np.int32)
    a = split_validation(ids, labels, 0.2, seed=2018)
    assert a.dtype == bool and np.array_equal(a, split_validation(ids, labels, 0.2, seed=2018))
    assert not np.array_equal(a, split_validation(ids, labels, 0.2, seed=7))
    for k in (0, 1):  # 20% of a class on average: 400 +- 4 standard deviations (17.9)
        assert abs(int(a[labels == k].sum()) - 400) < 72
    assert not a[labels == 3].any()  # a class of one trains
    # Its own draw: other images arriving, leaving or changing class do not move an image.
    kept = np.r_[0:1500, 2000:4011]
    assert np.array_equal(split_validation([ids[i] for i in kept], labels[kept], 0.2, seed=2018), a[kept])
    relabelled = labels.copy()
    relabelled[:100] = 1
    assert np.array_equal(split_validation(ids, relabelled, 0.2, seed=2018), a)
    assert not split_validation(ids, np.zeros(len(ids), np.int32), 0.0, seed=1).any()
    # The one guard: a class never goes wholly to validation (its highest draw trains).
    pairs = split_validation(ids[:40], np.repeat(np.arange(20), 2).astype(np.int32), 0.9, seed=1)
    assert pairs.reshape(20, 2).sum(axis=1).max() == 1 and pairs.sum() > 10


def _edit_labels(data, transform):
    table = pd.read_csv(data / "labels.csv", dtype=str)
    transform(table).to_csv(data / "labels.csv", index=False)
    return table


# Each case breaks a copy of the data set; the run must stop before any work with one line.
DATA_PROBLEMS = {
    "labels_unknown_columns": (lambda d: _edit_labels(d, lambda t: t.rename(columns={"breed": "dog"}).assign(owner="x")),
                               r"labels\.csv: cannot tell which column holds the labels \(found: id, dog, owner\): "
                               r"name them with --id-column NAME --label-column NAME"),
    "labels_empty_file": (lambda d: (d / "labels.csv").write_text(""), r"labels\.csv is empty"),
    "labels_header_only": (lambda d: (d / "labels.csv").write_text("id,breed\n"), r"header but no rows"),
    "labels_blank_breed": (lambda d: _edit_labels(d, lambda t: t.assign(breed=t["breed"].where(t.index != 2))),
                           r"empty id or breed in row\(s\) 3"),
    "duplicate_ids": (lambda d: _edit_labels(d, lambda t: pd.concat([t, t.iloc[[4]]])), r"duplicate ids"),
    "missing_image": (lambda d: next((d / "train").iterdir()).unlink(), r"1 ids have no image in .*train"),
    "empty_train_folder": (lambda d: [p.unlink() for p in (d / "train").iterdir()], r"holds none of the 24 images"),
    "no_train_folder": (lambda d: shutil.rmtree(d / "train"), r"train not found"),
    "single_class": (lambda d: _edit_labels(d, lambda t: t.assign(breed="dog")), r"single class"),
    "submission_columns": (
        lambda d: pd.read_csv(d / "sample_submission.csv").rename(columns=lambda c: c.replace("_02", "_99"))
        .to_csv(d / "sample_submission.csv", index=False),
        r"sample_submission\.csv: class columns do not match.*missing synthetic_triangle_02.*unknown synthetic_triangle_99"),
    "duplicate_test_ids": (lambda d: Image.new("RGB", (8, 8)).save(d / "test" / "test00000.png"),
                           r"duplicate image ids test00000"),
}


@pytest.mark.parametrize("problem", sorted(DATA_PROBLEMS))
def test_structural_data_problems_are_one_clear_line(problem, data_copy, tmp_path):
    breaks, message = DATA_PROBLEMS[problem]
    breaks(data_copy)
    result = run_cli("extract-features", "--data", data_copy, "--cache", tmp_path / "c.h5", *CHEAP, "--passes", 0)
    assert_clean_error(result, message)
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()


def test_missing_and_empty_data_folders(tmp_path):
    assert_clean_error(run_cli("extract-features", "--data", tmp_path / "nope", "--cache", tmp_path / "c.h5", *CHEAP),
                       r"data folder .*nope.* not found")
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    assert_clean_error(run_cli("extract-features", "--data", tmp_path / "empty", "--cache", tmp_path / "c.h5", *CHEAP),
                       r"no images found in")


def test_duplicate_ids_in_folder_layout(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match="duplicate image ids a/x"):
        load_dataset(tmp_path)


# --- decoding -------------------------------------------------------------------------------

def _rgb(name, odd_images, size=24):
    from dogtl.data.images import load_image

    return load_image(str(odd_images[name]), size).numpy()


@pytest.mark.parametrize("name,tolerance", [("png", 3.0), ("gif", 12.0), ("rgba", 3.0), ("cmyk", 6.0)])
def test_other_formats_and_modes_decode_like_the_rgb_jpeg(name, tolerance, odd_images):
    reference = _rgb("rgb", odd_images)
    image = _rgb(name, odd_images)
    assert image.shape == (24, 24, 3) and image.dtype == np.float32
    assert np.abs(image - reference).mean() < tolerance


def test_grey_and_16_bit_images_decode_to_three_equal_channels(odd_images):
    grey, g16 = _rgb("grey", odd_images), _rgb("png16", odd_images)
    rgb = _rgb("rgb", odd_images)
    for image, channel in ((grey, 0), (g16, 1)):
        assert image.shape == (24, 24, 3)
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
        assert np.abs(image[..., 0] - rgb[..., channel]).mean() < 3.0  # 16-bit scaled to 0..255


def test_huge_jpeg_is_decoded_shrunk_and_right(odd_images):
    import tensorflow as tf

    from dogtl.data.images import _decode_jpeg

    data = tf.io.read_file(str(odd_images["huge"]))
    # 6400 x 4800 decoded at 1/8 scale (800 x 600) for a 32 px target: memory stays small.
    assert tuple(_decode_jpeg(data, 32).shape) == (600, 800, 3)
    assert tuple(_decode_jpeg(data, 1000).shape) == (1200, 1600, 3)
    assert tuple(_decode_jpeg(data, 4800).shape) == (4800, 6400, 3)
    image = _rgb("huge", odd_images, 32)
    assert np.allclose(image.reshape(-1, 3).mean(0), [200, 40, 90], atol=3)


@pytest.mark.parametrize("name,reason", [
    ("bad_truncated", r"^Premature end of JPEG data \(truncated file\)$"),
    ("bad_corrupt", r"^Invalid JPEG data"),
    ("bad_not_image", r"^Unknown image file format \(not a JPEG, PNG, GIF, BMP or WebP image\)$"),
    ("bad_empty", r"^empty file$"),
    ("bad_bomb", r"^image too large \(10,000,000,000 pixels, at most 40,000,000\)$"),
])
def test_unreadable_files_get_a_short_clean_reason(name, reason, odd_images):
    import re

    import tensorflow as tf

    from dogtl.data.images import decode_error, load_image

    with pytest.raises(tf.errors.OpError):
        load_image(str(odd_images[name]), 32)
    text = decode_error(odd_images[name])
    assert re.search(reason, text), text
    assert "\n" not in text and "{{" not in text and "[Op:" not in text


def test_readable_files_have_no_decode_error(odd_images):
    from dogtl.data.images import decode_error

    assert [n for n in odd_images if not n.startswith("bad_") and decode_error(odd_images[n])] == []
    assert decode_error(odd_images["rgb"].parent / "missing.jpg").startswith("cannot read the file")


def test_image_pipelines_run_without_tf_datas_autotuner(synthetic_data):
    """Every image pipeline (extraction's passes, prediction and fine-tuning's batches) has
    tf.data's autotuner off: with it on, deleting a finished iterator stalled extractions for ~5 s
    (benchmarks/bench_iterator_stall.py), and the batches are the same either way."""
    import tensorflow as tf

    from dogtl.core.backbones import get_backbone
    from dogtl.data.images import image_dataset, multi_pass_dataset
    from dogtl.finetuning.data import training_dataset

    dataset, spec = load_dataset(synthetic_data), get_backbone("mobilenet_v2")
    paths = [str(p) for p in dataset.paths[:5]]
    pipelines = {
        "passes": multi_pass_dataset([(0, range(5), np.arange(5), paths)], spec, 32, seed=0, augmentation=None,
                                     batch_size=2),
        "images": image_dataset(paths, spec, 32, batch_size=2),
        "training": training_dataset(paths, np.arange(5), dataset.labels[:5], spec, 32, seed=0, augmentation=None,
                                     batch_size=2, epochs=[0]),
    }
    for name, ds in pipelines.items():
        assert ds.options().autotune.enabled is False, name
    on = tf.data.Options()
    on.autotune.enabled = True
    images = np.concatenate([batch[-1] for batch in pipelines["passes"]])
    assert images.shape == (5, 32, 32, 3) and np.ptp(images) > 0
    np.testing.assert_array_equal(images, np.concatenate([b[-1] for b in pipelines["passes"].with_options(on)]))
