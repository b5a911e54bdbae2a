"""What a fine-tuning run reads and checks before it trains: the head, its backbone and cache,
the split, the checkpoints folder; one `Setup` that every other step of the run reads.

Runs from images (train.py), from the cache's cut activations (fromcache.py) and with the
frozen part on a runtime (frozenpart.py) all start here; only their split and their `source`
(the hooks for building, batches, validation and export) differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dogtl.core.artifacts import check_writable
from dogtl.core.distribute import check_global_batch, training_steps, worker
from dogtl.core.errors import DataError
from dogtl.core.locks import hold
from dogtl.core.backbones import BackboneSpec
from dogtl.core.metadata import ModelMetadata
from dogtl.core.modelinfo import check_metadata
from dogtl.core.precision import resolve
from dogtl.data.augment import AugmentConfig
from dogtl.features.cache import FeatureCache
from dogtl.features.modelcache import open_model_cache
from dogtl.features.modelweights import backbone_weights
from dogtl.finetuning.checkpoints import Checkpoints
from dogtl.finetuning.data import training_augmentation
from dogtl.finetuning.settings import RESUMABLE, FinetuneConfig
from dogtl.head.ensemble import refuse_composite


@dataclass(frozen=True)
class Setup:
    """Everything a run reads before training, checked: the head, its backbone and cache, the split."""

    config: FinetuneConfig
    strategy: object  # a tf.distribute strategy, or None for one device
    out: Path  # this worker's model path
    meta: ModelMetadata  # the head's
    spec: BackboneSpec
    size: int
    weights: str  # what rebuilds the head's backbone: 'imagenet', 'none' or a file
    cache: FeatureCache
    split: dict  # modelcache.split_paths
    augmentation: AugmentConfig | None  # None: --no-augment
    seed: int
    steps: int  # per epoch
    checkpoints: Checkpoints
    precision: str = "float32"  # resolved --precision (core/precision.py)
    source: object = None  # None: train on the images; fromcache.CacheSource: on cut activations;
    # frozenpart.FrozenPartSource: on images, the frozen part on a runtime


def prepare_common(config: FinetuneConfig, strategy, make_split, **extra) -> Setup:
    """What every run checks and reads first; `make_split(cache)` gives the train/val split."""
    # Every worker of a multi-worker run saves its own copy; only the chief's is at --out.
    out = check_writable(worker(strategy).private_path(config.out), config.force)
    hold(out, "the model")  # and its checkpoints folder
    meta, spec, size = check_metadata(config.head, kinds=("head",))
    refuse_composite(meta, config.head)
    weights = backbone_weights(meta.backbones[0], config.weights)
    cache = open_model_cache(meta, config.cache)
    if not cache.is_val.any():
        raise DataError(f"{cache.path} has no validation split (--val-fraction 0): fine-tuning needs "
                        "one to stop early and keep the best model; extract with --val-fraction > 0")
    split = make_split(cache)
    images = len(split["train"]["labels"])
    if images == 0:
        raise DataError(f"{cache.path} has no training images outside the validation split")
    check_global_batch(config.batch_size, strategy, images)
    fingerprint = cache.fingerprint
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE}
    identity = {"settings": settings, "head": meta.to_dict(), "cache_fingerprint": fingerprint}
    if callable(extra.get("source")):  # chosen once the head's backbone is known
        extra["source"] = extra["source"](spec)
    return Setup(config, strategy, out, meta, spec, size, weights, cache, split,
                 augmentation=training_augmentation(config.augment, fingerprint["augmentation"], config.from_cache),
                 seed=int(fingerprint.get("seed", 0)) if config.seed is None else config.seed,
                 steps=training_steps(images, config.batch_size, strategy),
                 checkpoints=Checkpoints.beside(out, identity), precision=resolve(config.precision), **extra)
