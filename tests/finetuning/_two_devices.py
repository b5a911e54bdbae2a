"""Run by test_distribute.py in subprocesses: `python _two_devices.py SCENARIO ROOT DATA WEIGHTS CACHE HEAD`.

DATA, WEIGHTS, CACHE and HEAD are the stage-three test inputs (_stage3.build_pipeline: the
cache was extracted with the default strategy). Scenarios:

  mirrored      the CPU is split into two logical devices before TensorFlow starts (impossible
                once it has started, hence the subprocess), so `mirrored` runs on two replicas;
                extracts again with it, and fine-tunes one epoch with each strategy.
  multi-worker  one worker of a cluster described by TF_CONFIG (the test starts two on
                loopback): extracts and fine-tunes with `multi-worker`.

Each prints one line "RESULT <json>" of what the test compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXTRACT = dict(backbone="mobilenet_v2", image_size=48, passes=1, tta_passes=1, batch_size=8, val_fraction=0.25, seed=0,
               dtype="float32")  # the settings of _stage3.build_pipeline
FINETUNE = dict(trainable_blocks=2, optimizer="sgd", schedule="constant", augment="cache", epochs=1, batch_size=8,
                base_lr=3e-3, patience=5)


def split_cpu(n: int = 2) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def no_dropout_head(head: Path, out: Path) -> Path:
    """A copy of the head without dropout, so runs with 1 and 2 replicas draw no random numbers
    and must agree up to rounding (dropout masks differ between replica layouts)."""
    from dogtl.core.artifacts import load_model, save_model
    from dogtl.core.metadata import ModelMetadata

    if out.exists():
        return out
    model, _ = load_model(head, compile=False)
    for layer in model.layers:
        if hasattr(layer, "rate"):
            layer.rate = 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, ModelMetadata.load(head))
    return out


def extract_with(strategy: str, root: Path, data: Path, weights: Path, name: str, **changes) -> Path:
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig

    summary = extract_features(ExtractConfig(data=str(data), cache=str(root / name), weights=str(weights),
                                             strategy=strategy, **{**EXTRACT, **changes}))
    return summary.path


def finetune_with(strategy: str, data: Path, weights: Path, cache: Path, head: Path, out: Path) -> dict:
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.finetuning.train import finetune

    r = finetune(FinetuneConfig(data=str(data), head=str(head), out=str(out), cache=str(cache),
                                weights=str(weights), strategy=strategy, **FINETUNE))
    return {"before": r.before["val_log_loss"], "loss": r.history["loss"].tolist(),
            "val": r.history["val_loss"].tolist(), "path": str(r.model_path)}


def compare_caches(a: Path, b: Path) -> dict:
    from dogtl.features.cache import open_cache

    one, two = open_cache(a), open_cache(b)
    return {"same_rows": list(one.ids) == list(two.ids) and bool((one.is_val == two.is_val).all()),
            "same_fingerprint": one.fingerprint == two.fingerprint,
            "max_diff": float(abs(one.features() - two.features()).max()),
            "test_max_diff": float(abs(one.features("test") - two.features("test")).max()),
            "max_feature": float(abs(one.features()).max())}


def mirrored(root: Path, data: Path, weights: Path, cache: Path, head: Path) -> dict:
    from dogtl.core.distribute import make_strategy

    strategy = make_strategy("mirrored")
    out = {"replicas": strategy.num_replicas_in_sync, "devices": list(strategy.extended.worker_devices)}
    # 24 labelled images in batches of 23 and 1: odd batches are padded to 12 + 12 and 1 + 1.
    out["extract"] = compare_caches(cache, extract_with("mirrored", root, data, weights, "mirrored.h5",
                                                        batch_size=23))
    head = no_dropout_head(head, root / "models" / "head.keras")
    for name in ("default", "mirrored"):
        out[name] = finetune_with(name, data, weights, cache, head, root / f"{name}.keras")
    return out


def multi_worker(root: Path, data: Path, weights: Path, cache: Path, head: Path) -> dict:
    from dogtl.core.distribute import make_strategy, worker

    strategy = make_strategy("multi-worker")  # before any other TensorFlow work
    me = worker(strategy)
    path = extract_with("multi-worker", root, data, weights, "features.h5")
    out = {"replicas": strategy.num_replicas_in_sync, "chief": me.is_chief, "cache": str(path),
           "extract": compare_caches(cache, path)}
    out["finetune"] = finetune_with("multi-worker", data, weights, cache, head, root / "finetuned.keras")
    return out


if __name__ == "__main__":
    scenario, *paths = sys.argv[1:]
    if scenario == "mirrored":
        split_cpu()
    run = {"mirrored": mirrored, "multi-worker": multi_worker}[scenario]
    print("RESULT " + json.dumps(run(*map(Path, paths))), flush=True)
