"""One tiny deployable model for every serving test, and real image files to send it, built once
per test session (cached functions, not fixtures: a conftest.py here would shadow tests/conftest.py,
which the test modules import helpers from).

mobilenet_v2 at 32 px with random weights gives features of ~1e-12 (its BatchNorm layers keep
their initial statistics), useless for comparing exports; `core.models.calibrate_batchnorm` sets its BatchNorm statistics
from the test images, so the model's probabilities differ clearly between images. (mobilenet_v2, not
resnet50: converting resnet50 to TFLite takes a minute on 2 cores.)
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

SIZE = 32
CLASSES = ["beagle", "collie", "pug", "whippet"]


def _images(folder: Path, count: int = 8) -> list[Path]:
    from dogtl.data.synthetic import draw_image

    rng = np.random.default_rng(3)
    paths = []
    for k in range(count):
        image = draw_image(k % 3, 48 + 8 * (k % 3), rng)
        path = folder / (f"img{k}.png" if k % 4 == 3 else f"img{k}.jpg")
        image.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=92)
        paths.append(path)
    return paths


def _calibrated_backbone(spec, images):
    from dogtl.core.models import build_backbone, calibrate_batchnorm
    from dogtl.data.images import load_image, preprocess_fn

    backbone = build_backbone(spec, "none", SIZE)
    calibrate_batchnorm(backbone, preprocess_fn(spec)(np.stack([load_image(str(p), SIZE).numpy() for p in images])))
    return backbone


@functools.cache
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="dogtl-serving-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.cache
def images() -> tuple[Path, ...]:
    folder = _folder() / "images"
    folder.mkdir()
    return tuple(_images(folder))


@functools.cache
def model_path() -> Path:
    """A 'finetuned' dogtl model file (with metadata) on 32 px images, 4 classes."""
    from dogtl.core.artifacts import save_model
    from dogtl.core.metadata import BackboneInput, ModelMetadata
    from dogtl.core.models import build_head, compose
    from dogtl.core.backbones import get_backbone

    spec = get_backbone("mobilenet_v2")
    backbone = _calibrated_backbone(spec, images())
    head = build_head(spec.feature_dim, len(CLASSES), hidden=(), input_dropout=0.0, seed=1)
    model = compose(backbone, head, name="tiny")
    path = _folder() / "tiny.keras"
    save_model(model, path, ModelMetadata(kind="finetuned", classes=CLASSES, backbones=[BackboneInput(
        backbone=spec.name, image_size=SIZE, preprocessing=spec.preprocessing, feature_dim=spec.feature_dim,
        weights="none")]))
    return path


@functools.cache
def serving_model():
    from dogtl.serving.model import load_serving_model

    return load_serving_model(model_path())


@functools.cache
def predicted() -> np.ndarray:
    """dogtl predict's probabilities for `images()`: what every serving path must answer."""
    from dogtl.evaluation.inference import predict_images

    sm = serving_model()
    probs, ok = predict_images(sm.model, list(images()), sm.inputs[0].spec, sm.size)
    assert ok.all()
    return probs
