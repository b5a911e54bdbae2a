"""Training several heads side by side in one TensorFlow graph: what makes sweeps cheap.

A sweep trains many small heads on the same cached features. Trained one after the other,
each pays for its own graph call per epoch, and each step's small ops leave the cores idle
between them. Here the trials of a group (equal `fuse_key`: hidden layers, batch size,
optimizer, precision) train in one graph: one step loop per epoch in which every trial
takes its step, so the executor runs the trials' independent ops side by side.

Each trial is trained with Keras's own maths, by the very objects `head.train.fit_head` would use:
its Keras head and compiled optimizer from `build_compiled_head` (same initial weights,
BatchNorm, dropout streams, optimizer, weight decay and `CyclicLR` schedule), the step of
`trainloop.EpochRunner` (Keras loss with its label smoothing, graph gradients with the fast
MatMul gradient, XLA-compiled optimizer update) and its epoch plan (`trainloop.epoch_plan`),
and early stopping on validation log loss with its own patience. So a fused trial equals
`fit_head` to float rounding, dropout included (tests/sweeps/test_fused.py pins it for every
optimizer and schedule), and never depends on which other trials share its graph.

Until commit da69aaa this module stacked the trials' weights ([T, in, out]) and ran
hand-written BatchNorm, dropout, optimizer and schedule maths with batched matmuls.
`benchmarks/bench_fused.py` times both at bench_sweep's shapes (8 trials, 2,048 features,
hidden 1,024, 120 classes, batch 128, 8,256 rows, 2 shared CPU cores): the Keras maths took
28.5 s per epoch against 96.1 s (0.30x),
its setup and first epoch (tracing and compiling 8 models) 54 s against 95 s.

`fuse_key` returns None for a setting this module does not know, and the caller uses `fit_head`.

TensorFlow is imported inside the functions that use it (local): importing this module costs no
TensorFlow start-up until training starts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np

from dogtl.core.early_stopping import EarlyStopping
from dogtl.core.epochs import EpochRecord
from dogtl.core.errors import DogtlError
from dogtl.core.metrics import scores
from dogtl.core.models import set_head_precision
from dogtl.head.settings import HEAD_SETTINGS, HeadConfig
from dogtl.head.train import build_compiled_head
from dogtl.head.trainloop import TrainStep, epoch_plan


# Settings this module trains as fit_head does (declared in HEAD_SETTINGS); any other must keep its default.
FUSABLE = {s.name for s in HEAD_SETTINGS if s.fusable}
VAL_CHUNK = 2048  # validation rows per inference call


def fuse_key(config: HeadConfig):
    """Trials with equal keys can train in one graph; None: this trial needs `fit_head`."""
    defaults = HeadConfig()
    for f in fields(config):
        if f.name not in FUSABLE and getattr(config, f.name) != getattr(defaults, f.name):
            return None
    # batch None (and so the precision "auto" picks): resolved per fold
    return (tuple(config.hidden), config.batch_size, config.optimizer, config.precision)


@dataclass
class TrialOutcome:
    """What `fit_head` reports for one trial, plus this trial's share of the wall time."""

    config: HeadConfig
    metrics: dict  # val_accuracy, val_log_loss, epochs_run, best_epoch, train_loss, train_accuracy
    history: list = field(default_factory=list)  # one EpochRecord.as_row() per epoch
    seconds: float = 0.0
    error: str | None = None


class NotFusable(Exception):
    """These trials cannot share one graph (the caller trains them one at a time instead)."""


class _Trial:
    """One trial as `fit_head` trains it: the Keras head, optimizer and learning rate that
    `build_compiled_head` makes for its settings and seed, and the step `EpochRunner` takes
    (loss, graph gradients with the fast MatMul gradient, XLA-compiled optimizer update)."""

    def __init__(self, config: HeadConfig, dim: int, num_classes: int, resolved, num_passes: int):
        self.seed = int(config.seed)
        self.passes = 1 if config.clean_only else num_passes
        self.model, self.lr = build_compiled_head(config, dim, num_classes, resolved)
        self.train_step = TrainStep(self.model, config.label_smoothing)

    def lr_at(self, iteration: int) -> float:
        """The learning rate of step `iteration` (0-based), as fit_head reports it."""
        return float(self.lr(iteration)) if callable(self.lr) else float(self.lr)


class FusedHeads:
    """The trials of a group and one compiled epoch graph and validation graph for them all.

    features [P, N, D] (all labelled rows, any float dtype), labels [N]; `train_rows` index
    the rows trained on; val_features [V, D] clean features of the validation rows.
    `trials` (some of a larger group's) continue trials already part-trained."""

    def __init__(self, configs: list[HeadConfig], features, labels, train_rows: np.ndarray,
                 val_features: np.ndarray, num_classes: int, trials: list[_Trial] | None = None):
        import tensorflow as tf

        if not configs:
            raise ValueError("no trials to train")
        keys = {fuse_key(c) for c in configs}
        if len(keys) != 1 or None in keys:
            raise NotFusable(f"trials with different fuse keys {keys}")
        self.T = len(configs)
        self.features = features if tf.is_tensor(features) else tf.convert_to_tensor(features)
        self.dim = int(self.features.shape[2])
        self.labels = tf.convert_to_tensor(np.asarray(labels, np.int32))
        self.train_rows = tf.convert_to_tensor(np.asarray(train_rows, np.int32))
        self.num_train = int(len(train_rows))
        if self.num_train < 1:
            raise ValueError("no training rows")
        resolved = [c.resolve(self.num_train) for c in configs]  # automatic settings, as fit_head resolves them
        self.batch, self.steps = resolved[0].batch_size, resolved[0].steps_per_epoch
        self.val_features = np.asarray(val_features, np.float32)
        if trials is None:
            trials = [_Trial(c, self.dim, num_classes, r, int(self.features.shape[0]))
                      for c, r in zip(configs, resolved)]
        self.trials = trials
        # One explicit trace per group and graph (a concrete function: no retracing to warn about),
        # training at the trials' precision, validating in float32 as fit_head does.
        for trial in self.trials:
            set_head_precision(trial.model, resolved[0].precision)
        self._epoch = tf.function(self._epoch_graph, autograph=False).get_concrete_function(
            tf.TensorSpec([], tf.int64))
        for trial in self.trials:
            set_head_precision(trial.model, "float32")
        self._predict = tf.function(self._predict_graph, autograph=False).get_concrete_function(
            tf.TensorSpec([None, self.dim], tf.float32))

    def _epoch_graph(self, epoch):
        """Every trial's epoch (its own order and passes, `trainloop.epoch_plan`) in one step loop."""
        import tensorflow as tf

        plans = [epoch_plan(t.seed, epoch, self.num_train, t.passes, self.batch) for t in self.trials]
        rows = tf.gather(self.train_rows, tf.stack([r for r, _ in plans]))  # [T, steps * batch]
        passes = tf.stack([p for _, p in plans])
        labels = tf.gather(self.labels, rows)
        b = self.batch

        def step(s, losses, correct):
            start = s * b
            idx, y = rows[:, start:start + b], labels[:, start:start + b]
            x = tf.cast(tf.gather_nd(self.features, tf.stack([passes[:, start:start + b], idx], -1)), tf.float32)
            outs = [trial.train_step(x[t], y[t]) for t, trial in enumerate(self.trials)]
            return (s + 1, losses.write(s, tf.stack([loss for loss, _ in outs])),
                    correct + tf.stack([hits for _, hits in outs]))

        _, losses, correct = tf.while_loop(
            lambda s, *_: s < self.steps, step,
            [tf.constant(0), tf.TensorArray(tf.float32, size=self.steps), tf.zeros([self.T], tf.int32)])
        return losses.stack(), correct

    def _predict_graph(self, x):
        import tensorflow as tf

        return tf.stack([trial.model(x, training=False) for trial in self.trials])

    def run_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """One epoch for every trial: (losses [steps, T], training accuracy [T])."""
        import tensorflow as tf

        losses, correct = self._epoch(tf.constant(epoch, tf.int64))
        return losses.numpy(), correct.numpy() / (self.steps * self.batch)

    def predict_val(self) -> np.ndarray:
        """Softmax outputs [T, V, C] on the validation rows, in inference mode."""
        parts = [self._predict(self.val_features[i:i + VAL_CHUNK]).numpy()
                 for i in range(0, len(self.val_features), VAL_CHUNK)]
        return np.concatenate(parts, axis=1)

    def lr_at(self, iteration: int) -> np.ndarray:
        return np.array([trial.lr_at(iteration) for trial in self.trials])


@dataclass
class _Tracker:
    """fit_head's per-trial bookkeeping: history, best epoch, patience."""

    config: HeadConfig
    rows: list = field(default_factory=list)
    seconds: float = 0.0
    stopping: EarlyStopping = None

    def __post_init__(self):
        self.stopping = EarlyStopping(self.config.patience)

    @property
    def best_epoch(self) -> int:
        return self.stopping.best_epoch

    @property
    def done(self) -> bool:
        return self.stopping.stopped or len(self.rows) >= self.config.epochs

    def add(self, row: EpochRecord) -> None:
        self.rows.append(row)
        self.stopping.update(row.epoch, row.val_loss if math.isfinite(row.loss) else math.nan)

    def outcome(self) -> TrialOutcome:
        history = [row.as_row() for row in self.rows]
        if not self.best_epoch:
            loss = self.rows[0].loss if self.rows else float("nan")
            nan = float("nan")
            return TrialOutcome(self.config, {"val_accuracy": nan, "val_log_loss": nan, "epochs_run": len(self.rows),
                                              "best_epoch": 0, "train_loss": nan, "train_accuracy": nan},
                                history, self.seconds,
                                f"training diverged in epoch 1 (loss {loss}): lower base_lr/max_lr")
        best = self.rows[self.best_epoch - 1]
        return TrialOutcome(self.config, {"val_accuracy": best.val_accuracy, "val_log_loss": best.val_loss,
                                          "epochs_run": len(self.rows), "best_epoch": self.best_epoch,
                                          "train_loss": best.loss, "train_accuracy": best.accuracy},
                            history, self.seconds)


def _charge(trackers: list[_Tracker], indices: list[int], seconds: float) -> None:
    """Share `seconds` of wall time equally among the trials `indices`."""
    for i in indices:
        trackers[i].seconds += seconds / len(indices)


def _clean_val(features, val_rows: np.ndarray) -> np.ndarray:
    """The validation rows' clean pass (pass 0) of features [P, N, D], an array or a tensor, in float32."""
    if isinstance(features, np.ndarray):
        return features[0][val_rows].astype(np.float32)
    import tensorflow as tf

    return tf.gather(features[0], val_rows).numpy().astype(np.float32)


def train_fused(configs: list[HeadConfig], features, labels, train_rows: np.ndarray, val_rows: np.ndarray,
                num_classes: int, on_done: Callable[[int, TrialOutcome], None] | None = None,
                shrink: bool = True) -> list[TrialOutcome]:
    """Train the trials `configs` (equal `fuse_key`) side by side on features [P, N, D] and
    return one outcome per trial, in order. `on_done(index, outcome)` is called as each
    trial finishes. With `shrink`, once half the group has stopped the rest continue in
    a smaller graph (same numbers, less wasted compute)."""
    started = time.perf_counter()
    val_rows = np.asarray(val_rows)
    if not len(val_rows):
        raise DogtlError("no validation images: early stopping and the metrics need some")
    labels = np.asarray(labels, np.int32)
    val_x, val_y = _clean_val(features, val_rows), labels[val_rows]
    trackers = [_Tracker(c) for c in configs]
    active = list(range(len(configs)))
    members = list(active)  # the trials in `group`, in its order (finished ones may still be in it)
    group = FusedHeads(configs, features, labels, train_rows, val_x, num_classes)
    _charge(trackers, active, time.perf_counter() - started)  # the set-up
    epoch = 0
    while active:
        epoch += 1
        started = time.perf_counter()
        losses, accuracy = group.run_epoch(epoch)
        probs = group.predict_val()
        lrs = group.lr_at(epoch * group.steps - 1)
        finished = []
        for i in active:
            j = members.index(i)
            val = scores(val_y, probs[j], num_classes)
            trackers[i].add(EpochRecord(epoch, float(np.mean(losses[:, j])), float(accuracy[j]), val["val_log_loss"],
                                        val["val_accuracy"], float(lrs[j])))
            if trackers[i].done:
                finished.append(i)
        _charge(trackers, active, time.perf_counter() - started)
        for i in finished:
            if on_done:
                on_done(i, trackers[i].outcome())
        active = [i for i in active if i not in finished]
        if active and shrink and len(active) <= len(members) // 2:
            started = time.perf_counter()
            group = FusedHeads([configs[i] for i in active], group.features, labels, train_rows, val_x,
                               num_classes, trials=[group.trials[members.index(i)] for i in active])
            members = list(active)
            _charge(trackers, active, time.perf_counter() - started)
    return [t.outcome() for t in trackers]
