"""Learning-rate range test on cached features (Smith 2017; fastai's lr_find).

The rate grows exponentially from tiny to large, one step at a time, on the same head,
optimizer and pass sampling as train-head; the run stops once the smoothed loss has
clearly diverged. Suggested rates: max = (rate at the smoothed loss's minimum) / 10,
the usual "well before the blow-up" rule, and base = max / 10, the recipe's ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.core.files import check_overwrite
from dogtl.core.locks import hold, writes
from dogtl.core.plots import plot_lr_find
from dogtl.features.multicache import open_caches
from dogtl.head.settings import HeadConfig, LRFindConfig
from dogtl.head.train import build_compiled_head, load_training_data
from dogtl.head.trainloop import EpochRunner

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
CHUNK = 50  # steps per graph call between divergence checks


@dataclass
class LRFindResult:
    plot_path: Path
    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    lr_at_min: float
    base_lr: float
    max_lr: float
    diverged: bool
    seconds: float


def smooth(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    out, avg = np.empty(len(losses)), 0.0
    for i, value in enumerate(losses):
        avg = beta * avg + (1 - beta) * value
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float, float]:
    """(rate at the minimum of the smoothed loss, suggested base, suggested max)."""
    at_min = float(lrs[int(np.nanargmin(smoothed))])
    max_lr = at_min / 10
    return at_min, max_lr / 10, max_lr


def diverged_at(smoothed: np.ndarray) -> int | None:
    """The first step after the lowest smoothed loss where it exceeds DIVERGED times that lowest,
    or None. Steps before the lowest do not count: on small, easy data the first batches' losses
    often stand far above the minimum reached a few steps later, which is noise, not divergence."""
    low = int(np.argmin(smoothed))
    above = np.flatnonzero(smoothed[low:] > DIVERGED * smoothed[low])
    return low + int(above[0]) if len(above) else None


def range_test(config: HeadConfig, train_features: np.ndarray, train_labels: np.ndarray, num_classes: int,
               start_lr: float, end_lr: float, steps: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(rates, losses, diverged): one training step per rate, rates growing exponentially."""
    import keras  # local: importing this module (lr-find's option checks) costs no Keras start-up

    rate = (end_lr / start_lr) ** (1.0 / (steps - 1))
    ramp = keras.optimizers.schedules.ExponentialDecay(start_lr, decay_steps=1, decay_rate=rate)
    resolved = config.resolve(train_features.shape[1])
    model, _ = build_compiled_head(config, train_features.shape[2], num_classes, resolved, learning_rate=ramp)
    runner = EpochRunner(model, train_features, train_labels, resolved.batch_size, config.seed,
                         precision=resolved.precision)
    losses: list[float] = []
    diverged, call = False, 0
    while len(losses) < steps and not diverged:
        call += 1
        chunk, _ = runner.run(call, max_steps=min(CHUNK, steps - len(losses)))
        losses.extend(float(v) for v in chunk)
        smoothed = smooth(np.asarray(losses))
        finite = np.isfinite(smoothed)
        if not finite.all():
            cut = int(np.argmin(finite))
            losses, diverged = losses[:cut], True
        elif len(losses) >= 10 and (cut := diverged_at(smoothed)) is not None:
            losses, diverged = losses[:cut + 1], True
    lrs = start_lr * rate ** np.arange(len(losses))
    return lrs, np.asarray(losses), diverged


@writes
def lr_find(config: LRFindConfig, cache: str | Path = "cache/features.h5", out: str | Path = "models/lr-find.png",
            force: bool = False) -> LRFindResult:
    """Run the range test on `cache` and write the plot `out` (a PNG; existing only with `force`)."""
    started = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise DogtlError(f"--out {out}: the plot is a PNG; use a name ending in .png")
    check_overwrite(out, force)
    hold(out, "the plot")
    cache = open_caches(cache)
    data = load_training_data(cache, config.clean_only)
    lrs, losses, diverged = range_test(config.head_config(), data.train_features, data.train_labels,
                                       len(cache.classes), config.start_lr, config.end_lr, config.steps)
    if len(losses) < 2:
        raise DogtlError(f"the loss diverged at once (from {config.start_lr:g}): pass a smaller --start-lr")
    smoothed = smooth(losses)
    at_min, base_lr, max_lr = suggest(lrs, smoothed)
    plot_lr_find(lrs, losses, smoothed, out, base_lr=base_lr, max_lr=max_lr, title=f"lr-find on {cache.path.name}")
    return LRFindResult(out, lrs, losses, smoothed, at_min, base_lr, max_lr, diverged,
                        time.perf_counter() - started)
