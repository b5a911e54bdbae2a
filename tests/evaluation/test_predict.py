"""Submissions and top-k predictions: columns, clipping, TTA, cached vs computed, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import assert_clean_error, run_cli

from dogtl.core.errors import DataError, DogtlError
from dogtl.core.metrics import clip_rows
from dogtl.evaluation.predict import predict_submission, predict_top_k
from dogtl.evaluation.settings import PredictConfig


@pytest.fixture(scope="module")
def data(stage3, tmp_path_factory):
    """A copy of the data folder whose sample_submission.csv lists the classes in a shuffled order."""
    root = tmp_path_factory.mktemp("predict") / "data"
    shutil.copytree(stage3.data, root)
    sample = pd.read_csv(root / "sample_submission.csv")
    classes = list(sample.columns[1:])
    sample[["id", classes[2], classes[0], classes[1]]].to_csv(root / "sample_submission.csv", index=False)
    return root


def _config(stage3, model, tmp_path, **kw):
    kw.setdefault("out", str(tmp_path / "submission.csv"))
    return PredictConfig(model=str(model), weights=str(stage3.weights), **kw)


def test_clip_rows_bounds_and_renormalises():
    p = clip_rows(np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]))
    assert p.min() >= 1e-15 * (1 - 1e-9) and np.allclose(p.sum(axis=1), 1)
    assert p[0, 1] == pytest.approx(1e-15) and p[1].tolist() == pytest.approx([0.2, 0.3, 0.5])


def test_finetuned_submission_follows_sample_submission(stage3, finetuned, data, tmp_path):
    s = predict_submission(_config(stage3, finetuned.model_path, tmp_path, data=str(data)))
    table = pd.read_csv(s.path)
    sample = pd.read_csv(data / "sample_submission.csv")
    assert list(table.columns) == list(sample.columns)  # exactly the sample's order, not sorted
    assert sorted(table["id"]) == sorted(p.stem for p in (data / "test").iterdir())
    probs = table.iloc[:, 1:].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1) and probs.min() >= 1e-15 * (1 - 1e-9)
    assert s.source == "images" and s.passes == 1 and not s.skipped

    tta = predict_submission(_config(stage3, finetuned.model_path, tmp_path, data=str(data), tta=True,
                                     tta_passes=2, out=str(tmp_path / "tta.csv")))
    assert tta.passes == 3
    tta_probs = pd.read_csv(tta.path).iloc[:, 1:].to_numpy()
    assert np.allclose(tta_probs.sum(axis=1), 1) and not np.allclose(tta_probs, probs)


def test_head_uses_cached_test_features_equal_to_computed_ones(stage3, data, tmp_path):
    from dogtl.core.artifacts import load_model
    from dogtl.features.cache import open_cache

    cached = predict_submission(_config(stage3, stage3.head, tmp_path, data=str(data), out=str(tmp_path / "a.csv")))
    computed = predict_submission(_config(stage3, stage3.head, tmp_path, data=str(data), use_cache=False,
                                          out=str(tmp_path / "b.csv")))
    assert cached.source == "cached features" and computed.source == "images"
    a, b = pd.read_csv(cached.path), pd.read_csv(computed.path)
    assert a["id"].tolist() == b["id"].tolist()
    assert np.max(np.abs(a.iloc[:, 1:].to_numpy() - b.iloc[:, 1:].to_numpy())) <= 1e-4

    tta = predict_submission(_config(stage3, stage3.head, tmp_path, data=str(data), tta=True,
                                     out=str(tmp_path / "c.csv")))
    assert tta.source == "cached features" and tta.passes == 2  # clean + the cache's one TTA pass
    head, meta = load_model(stage3.head, compile=False)
    cache = open_cache(stage3.cache)
    mean = np.mean([head.predict(f, verbose=0) for f in cache.features("test")], axis=0)
    order = [meta.classes.index(c) for c in pd.read_csv(tta.path).columns[1:]]
    rows = [list(cache.test_ids).index(i) for i in pd.read_csv(tta.path)["id"]]
    assert np.allclose(pd.read_csv(tta.path).iloc[:, 1:].to_numpy(), clip_rows(mean[rows][:, order]), atol=1e-6)


def test_unreadable_test_images_skip_uniform_or_fail(stage3, finetuned, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(stage3.data, data)
    (data / "test" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (data / "sample_submission.csv").unlink()
    n = len(list((data / "test").iterdir()))

    skip = predict_submission(_config(stage3, finetuned.model_path, tmp_path, data=str(data)))
    table = pd.read_csv(skip.path)
    assert len(table) == n - 1 and "broken" not in set(table["id"])
    assert len(skip.skipped) == 1 and skip.skipped[0].startswith(str(data / "test" / "broken.jpg"))
    assert list(table.columns[1:]) == sorted(table.columns[1:])  # no sample: sorted class names

    uniform = predict_submission(_config(stage3, finetuned.model_path, tmp_path, data=str(data),
                                         on_bad_image="uniform", out=str(tmp_path / "u.csv")))
    table = pd.read_csv(uniform.path).set_index("id")
    assert len(table) == n and uniform.filled == 1
    assert np.allclose(table.loc["broken"].to_numpy(), 1 / 3)

    with pytest.raises(DataError, match="broken.jpg: cannot read image"):
        predict_submission(_config(stage3, finetuned.model_path, tmp_path, data=str(data), on_bad_image="fail",
                                   out=str(tmp_path / "f.csv")))
    assert not (tmp_path / "f.csv").exists()


def test_top_k_for_image_paths_and_cli(stage3, finetuned, tmp_path):
    images = sorted((stage3.data / "test").iterdir())[:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    results = predict_top_k(_config(stage3, finetuned.model_path, tmp_path, images=tuple(map(str, images + [bad])),
                                    top_k=2))
    assert [r.path for r in results] == [str(p) for p in images + [bad]]
    for r in results[:2]:
        assert len(r.classes) == 2 and r.probabilities == sorted(r.probabilities, reverse=True)
        assert 0 < sum(r.probabilities) <= 1 + 1e-6
    assert results[2].error and not results[2].classes

    result = run_cli("predict", "--model", finetuned.model_path, "--top-k", 3, *images)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(images[0]) and len(lines) == 8 and lines[1].strip().endswith(tuple(results[0].classes[:1]))


def test_bad_input_gives_one_line_errors(stage3, finetuned, data, tmp_path):
    base = ["predict", "--data", data, "--model", finetuned.model_path]
    (tmp_path / "a-file").write_text("x")
    assert_clean_error(run_cli(*base, "--out", tmp_path / "a-file" / "s.csv"), "a part of this path is a file")
    existing = tmp_path / "s.csv"
    existing.write_text("x")
    assert_clean_error(run_cli(*base, "--out", existing), "exists: pass --force")

    lonely = tmp_path / "m" / "model.keras"
    lonely.parent.mkdir()
    shutil.copy(finetuned.model_path, lonely)
    assert_clean_error(run_cli("predict", "--data", data, "--model", lonely, "--out", tmp_path / "x.csv"),
                       "metadata model.json is missing")

    wrong = tmp_path / "wrong"
    shutil.copytree(data, wrong)
    sample = pd.read_csv(wrong / "sample_submission.csv").rename(columns=lambda c: c.replace("00", "99"))
    sample.to_csv(wrong / "sample_submission.csv", index=False)
    assert_clean_error(run_cli("predict", "--data", wrong, "--model", finetuned.model_path, "--out",
                               tmp_path / "y.csv"), "class columns do not match")

    with pytest.raises(DataError, match="test not found"):
        predict_submission(_config(stage3, finetuned.model_path, tmp_path, data=str(tmp_path / "m")))
    with pytest.raises(DogtlError, match="no such model file"):
        predict_submission(_config(stage3, tmp_path / "none.keras", tmp_path, data=str(data)))


def test_help_says_what_happens_to_unreadable_test_images():
    result = run_cli("predict", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Unreadable test images" in text and "skipped" in text and "uniform" in text
