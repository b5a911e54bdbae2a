"""Shared, session-scoped fixtures: tiny synthetic data sets and one small feature cache.

Everything is cheap on 2 CPU cores: 48 px JPEGs, resnet50 at 32 px with random
(`none`) weights. Add fixtures by appending small functions.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# `auto` precision is float32 in tests on every CPU (this process and the commands it starts), so
# their numbers do not depend on whether the CPU has hardware bfloat16; tests of that choice
# patch it, and reduced precision is tested by asking for it.
os.environ.setdefault("DOGTL_NATIVE_BFLOAT16", "0")
# `auto` runtime is TensorFlow in tests (converting a backbone takes seconds); the tests of the
# other runtimes ask for them, and convert into this session's own conversion cache.
os.environ.setdefault("DOGTL_AUTO_RUNTIME", "tensorflow")
if "DOGTL_RUNTIME_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DOGTL_RUNTIME_CACHE"] = tempfile.mkdtemp(prefix="dogtl-runtimes-")
    atexit.register(shutil.rmtree, os.environ["DOGTL_RUNTIME_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

# The cheapest extraction settings: every test that extracts uses them unless it tests one.
# (resnet50, not mobilenet_v2: with random weights the latter's features are ~1e-12, zeros in float16.)
CHEAP = ["--backbone", "resnet50", "--weights", "none", "--image-size", "32", "--batch-size", "4"]


def run_cli(*args):
    """Invoke `dogtl ARGS...` in-process; returns the typer Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from dogtl.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result, *needles):
    """A failed command: non-zero exit, one 'error: ...' line naming `needles`, no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert re.search(needle, errors[0]), (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Kaggle layout: 3 classes x 8 train images (48 px), 4 test images, sample_submission.csv."""
    from dogtl.data.synthetic import make_kaggle_dataset

    return make_kaggle_dataset(tmp_path_factory.mktemp("data") / "data", num_classes=3, per_class=8,
                               test_images=4, size=48, seed=0)


@pytest.fixture(scope="session")
def small_cache(synthetic_data, tmp_path_factory):
    """A complete cache of `synthetic_data`: clean + 2 augmented passes, 1 TTA pass (read-only!)."""
    path = tmp_path_factory.mktemp("cache") / "features.h5"
    result = run_cli("extract-features", "--data", synthetic_data, "--cache", path, *CHEAP,
                     "--passes", 2, "--tta-passes", 1)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def stage3(tmp_path_factory):
    """Stage-three inputs (read-only!): data, backbone weights file, float32 cache, head (see _stage3.py)."""
    from _stage3 import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("stage3"))


@pytest.fixture(scope="session")
def finetuned(stage3, tmp_path_factory):
    """A one-epoch fine-tuning of the `stage3` head with the reference recipe (read-only!): the
    FinetuneResult. No --weights: the backbone weights file recorded with the head is used."""
    from dogtl.finetuning.settings import FinetuneConfig, recipe_settings
    from dogtl.finetuning.train import finetune

    out = tmp_path_factory.mktemp("finetuned") / "finetuned.keras"
    return finetune(FinetuneConfig(data=str(stage3.data), head=str(stage3.head), out=str(out),
                                   **{**recipe_settings("reference"), "epochs": 1, "batch_size": 8}))


def write_odd_images(folder, size: int = 48) -> dict:
    """Files that must decode (other formats, modes, a huge image) and files that cannot.

    Returns {name: path}; names starting with "bad_" are unreadable. All are named .jpg
    (the Kaggle layout's train/<id>.jpg) whatever their real format.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    paths = {}

    def save(name, image, **kw):
        paths[name] = folder / f"{name}.jpg"
        image.save(paths[name], **kw)

    save("rgb", Image.fromarray(rgb), format="JPEG", quality=95)
    save("png", Image.fromarray(rgb), format="PNG")
    save("grey", Image.fromarray(rgb[..., 0]), format="JPEG", quality=95)
    save("cmyk", Image.fromarray(rgb).convert("CMYK"), format="JPEG", quality=95)
    save("png16", Image.fromarray(rgb[..., 1].astype(np.uint16) * 257), format="PNG")
    save("rgba", Image.fromarray(rgb).convert("RGBA"), format="PNG")
    save("gif", Image.fromarray(rgb), format="GIF")
    save("huge", Image.new("RGB", (6400, 4800), (200, 40, 90)), format="JPEG", quality=75)
    good = paths["rgb"].read_bytes()
    bad = {
        "bad_truncated": good[: len(good) // 2],
        "bad_corrupt": good[:20] + rng.integers(0, 255, len(good) - 22, dtype=np.uint8).tobytes() + good[-2:],
        "bad_not_image": b"id,breed\nthis is a CSV file, not a picture\n",
        "bad_empty": b"",
        # A PNG header claiming 100000 x 100000 pixels: must be refused before decoding.
        "bad_bomb": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (100_000).to_bytes(4, "big") * 2
                    + b"\x08\x02\x00\x00\x00" + bytes(16),
    }
    for name, data in bad.items():
        paths[name] = folder / f"{name}.jpg"
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory):
    return write_odd_images(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="session")
def cut_stage3(tmp_path_factory):
    """`stage3`'s pipeline with the cache also holding the activations entering the top 2 blocks
    (extract-features --cut-blocks 2, float16) and the head trained on it (read-only!)."""
    from _stage3 import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("cut_stage3"), cut_blocks=2)


# Backbones cheap enough to build in the default run (the small variant of every family);
# tests over every backbone of the registry build the others only with --run-slow.
CHEAP_BACKBONES = ("xception", "inception_v3", "resnet50", "mobilenet_v2", "efficientnet_b0",
                   "efficientnet_v2_b0", "convnext_tiny")


# Opt-in slow tests (`@pytest.mark.slow`): skipped unless `pytest --run-slow` or DOGTL_RUN_SLOW=1.
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("DOGTL_RUN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (or DOGTL_RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
