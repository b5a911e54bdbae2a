"""lr-find: the exponential ramp, stopping at divergence, the suggestion, the plot, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli
from dogtl.core.errors import DogtlError
from dogtl.head.lrfind import LRFindConfig, diverged_at, lr_find, smooth, suggest
from dogtl.features.synthetic import write_feature_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # Classes far enough apart that the ramp sees learning whatever the head's initial weights
    # (at separation 1, about half of the head seeds never take the loss below chance).
    return write_feature_cache(tmp_path_factory.mktemp("lrf") / "features.h5", num_images=200, num_classes=4,
                               dim=32, passes=1, val_fraction=0.2, seed=4, separation=2.0)


@pytest.fixture(scope="module")
def found(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lrf_out") / "lr.png"
    return lr_find(LRFindConfig(batch_size=16, hidden=(32,), start_lr=1e-6, end_lr=10.0, steps=200),
                   cache=cache, out=out)


def test_ramp_is_exponential_and_stops_at_divergence(found):
    lrs = found.lrs
    assert lrs[0] == pytest.approx(1e-6)
    ratios = lrs[1:] / lrs[:-1]
    np.testing.assert_allclose(ratios, (10.0 / 1e-6) ** (1 / 199), rtol=1e-9)
    # RMSprop at rates of ~1 and above blows the head up: the test stops well before 200 steps.
    assert found.diverged and len(found.losses) < 200
    assert found.smoothed[-1] > 4 * found.smoothed.min() * 0.999


def test_suggestion_and_plot(found):
    assert found.max_lr == pytest.approx(found.lr_at_min / 10) and found.base_lr == pytest.approx(found.max_lr / 10)
    assert found.lrs[0] < found.lr_at_min < found.lrs[-1]
    # The loss falls below chance (ln 4) before it blows up: the range test saw learning.
    assert found.smoothed.min() < min(math.log(4), 0.75 * found.smoothed[0])
    assert found.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smooth_and_suggest():
    np.testing.assert_allclose(smooth(np.full(5, 2.0)), 2.0)  # bias-corrected from the first step
    lrs = 10.0 ** np.arange(-5, 1)
    at_min, base, top = suggest(lrs, np.array([3.0, 2.0, 1.0, 0.5, 2.0, 9.0]))
    assert (at_min, top, base) == pytest.approx((1e-2, 1e-3, 1e-4))


def test_divergence_is_judged_after_the_lowest_loss():
    """Easy data: the first batches' losses stand far above the minimum reached a few steps
    later (a newcomer's 192 images: 'diverged at once' from 1e-07). That is not divergence."""
    assert diverged_at(np.array([1.6, 1.2, 0.6, 0.3, 0.25, 0.3, 0.32, 0.3, 0.31, 0.35])) is None
    assert diverged_at(np.array([1.6, 0.6, 0.3, 0.25, 0.5, 1.2, 3.0])) == 5  # 1.2 > 4 x 0.25, after it


@pytest.mark.parametrize("changes, needle", [
    ({"start_lr": 0.0}, "--start-lr"),
    ({"start_lr": 1e-2, "end_lr": 1e-3}, "--end-lr"),
    ({"steps": 5}, "--steps 5"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"optimizer": "lbfgs"}, "--optimizer"),
])
def test_bad_settings(changes, needle):
    with pytest.raises(DogtlError, match=needle):
        LRFindConfig(**changes)


def test_plot_must_be_a_png(cache, tmp_path):
    with pytest.raises(DogtlError, match="PNG"):
        lr_find(LRFindConfig(), cache=cache, out=tmp_path / "plot.jpg")


def test_cli(cache, tmp_path):
    out = tmp_path / "lr.png"
    args = ["lr-find", "--cache", cache, "--out", out, "--batch-size", 16, "--hidden", 16, "--steps", 60]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "suggested: --base-lr" in result.stdout and out.exists()
    assert_clean_error(run_cli(*args), "exists.*--force")
    assert run_cli(*args, "--force").exit_code == 0
    assert_clean_error(run_cli("lr-find", "--cache", tmp_path / "none.h5", "--out", tmp_path / "x.png"),
                       "no feature cache")
