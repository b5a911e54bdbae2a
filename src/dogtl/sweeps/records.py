"""What identifies a sweep run (its key) and what it costs: the same settings, fold and cache
give the same key, so a resumed sweep recognises finished runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from dogtl.head.settings import HeadConfig


def digest(value) -> str:
    """A stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def training_settings(config: HeadConfig) -> dict:
    """The settings that determine a trial's training, as JSON-able values."""
    return {**asdict(config), "hidden": list(config.hidden)}


def trial_key(config: HeadConfig, fingerprint: dict, folds: int | None, seed: int) -> str:
    """The run's key: its settings, the features (by fingerprint, wherever the file is) and the folds."""
    return digest({"settings": training_settings(config), "cache": fingerprint, "folds": folds or 0,
                    "fold_seed": seed if folds else None})[:12]


def head_macs(dim: int, hidden, num_classes: int) -> int:
    """Multiply-adds of one feature vector through the head's Dense layers."""
    sizes = [dim, *hidden, num_classes]
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def make_record(unit: dict, outcome, n_train: int, n_val: int, dim: int, num_classes: int, fused: bool) -> dict:
    """The JSON record of a finished run: the unit, its outcome and its multiply-adds."""
    config = HeadConfig(**unit["settings"])
    resolved = config.resolve(n_train)
    epochs = int(outcome["metrics"].get("epochs_run") or 0)
    per_row = head_macs(dim, config.hidden, num_classes)
    macs = epochs * (3 * resolved.steps_per_epoch * resolved.batch_size + n_val) * per_row
    return {**unit, **outcome, "fused": fused, "macs": macs, "train_images": n_train, "val_images": n_val}
