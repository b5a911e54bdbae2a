"""Inputs for the stage-three tests: data, a backbone weights file, a float32 cache and a head.

The backbone is mobilenet_v2 at 48 px, randomly initialised with BatchNorm statistics taken
from the images (`models.calibrate_batchnorm`), saved as a local weights file: its features
carry signal (plain random init gives near-constant features) and every stage rebuilds
exactly the same backbone. The head is built with `models.build_head` and saved with the
metadata of the stage-two contract, so these tests do not depend on train-head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKBONE, SIZE = "mobilenet_v2", 48


@dataclass(frozen=True)
class Pipeline:
    root: Path
    data: Path
    weights: Path
    cache: Path
    head: Path


def head_metadata(cache, backbone: str, size: int, cache_path):
    """A head's metadata in the first format (one backbone's fields at the top level), upgraded."""
    from dogtl.core.metadata import ModelMetadata
    from dogtl.core.backbones import get_backbone

    spec = get_backbone(backbone)
    return ModelMetadata.from_dict({"kind": "head", "classes": list(cache.classes), "backbone": spec.name,
            "weights": cache.fingerprint["weights"], "weights_path": cache.weights_path, "image_size": size,
            "preprocessing": spec.preprocessing, "feature_dim": spec.feature_dim, "cache": str(cache_path),
            "cache_fingerprint": cache.fingerprint, "settings": {"epochs": 30}, "metrics": {}})


def build_pipeline(root: Path, backbone: str = BACKBONE, size: int = SIZE, **extract) -> Pipeline:
    """`extract`: more ExtractConfig settings (e.g. cut_blocks=2)."""
    import keras

    from dogtl.core import artifacts
    from dogtl.core.backbones import get_backbone
    from dogtl.features.cache import open_cache
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig
    from dogtl.data.images import image_dataset
    from dogtl.core.models import build_backbone, build_head, calibrate_batchnorm
    from dogtl.data.synthetic import make_kaggle_dataset

    root = Path(root)
    data = make_kaggle_dataset(root / "data", num_classes=3, per_class=8, test_images=4, size=size, seed=3)
    spec = get_backbone(backbone)
    bb = build_backbone(spec, "none", size)
    files = sorted((data / "train").iterdir())
    _, _, images = next(iter(image_dataset(files, spec, size, batch_size=len(files))))
    calibrate_batchnorm(bb, images)
    weights = root / "backbone.weights.h5"
    bb.save_weights(weights)

    cache_path = root / "features.h5"
    extract_features(ExtractConfig(data=str(data), cache=str(cache_path), backbone=backbone, weights=str(weights),
                                   image_size=size, passes=1, tta_passes=1, batch_size=8, val_fraction=0.25,
                                   seed=0, dtype="float32", **extract))  # seed 0: 2 of each class's 8 in validation
    cache = open_cache(cache_path)
    keras.utils.set_random_seed(0)
    head = build_head(spec.feature_dim, len(cache.classes), hidden=(32,), input_dropout=0.1, dropout=0.1)
    head.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    train = ~cache.is_val
    x = cache.features("labelled")[:, train].reshape(-1, spec.feature_dim)
    y = np.tile(cache.labels[train], cache.num_passes)
    head.fit(x, y, epochs=30, batch_size=16, verbose=0)
    (root / "models").mkdir()
    head_path = root / "models" / "head.keras"
    artifacts.save_model(head, head_path, head_metadata(cache, backbone, size, cache_path))
    return Pipeline(root, data, weights, cache_path, head_path)


def copy_head(pipeline: Pipeline, folder: Path, **changes) -> Path:
    """A copy of the head (model + metadata) in `folder`, with metadata keys changed."""
    import json
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "head.keras"
    shutil.copy(pipeline.head, target)
    meta = json.loads(pipeline.head.with_suffix(".json").read_text())
    meta.update(changes)
    target.with_suffix(".json").write_text(json.dumps(meta))
    from dogtl.core.metadata import ModelMetadata

    ModelMetadata.from_dict(meta).save(target)  # a deliberate edit: the metadata's content hash made anew
    return target
