"""Training several heads side by side in one TensorFlow graph: what makes sweeps cheap.

A sweep trains many small heads on the same cached features. Trained one after the other,
each pays for its own model, graph tracing and optimizer compilation, and each step's
small matrix products leave the cores idle between ops. Here the heads of trials that
share an architecture, batch size and optimizer are stacked along a leading "trial" axis
(weights [T, in, out]) and trained with batched matrix products, one epoch per graph call.

Every trial still gets exactly what `head.fit_head` would do with its settings: the same
initial weights (the Keras head built with the trial's seed), the same epoch plan (order
and pass choice, `trainloop.epoch_plan`), the same BatchNorm, optimizer and cyclical
learning-rate formulas, early stopping on validation log loss with its own patience.
Only the dropout masks come from another (stateless, per-trial) random stream, so with
dropout 0 a fused trial matches `fit_head` to float rounding (tests/test_sweep.py checks
it), and a trial's result never depends on which other trials share its graph.

Anything this module does not implement (a setting it does not know, a different layer
stack or optimizer option) makes `fuse_key` return None and the caller uses `fit_head`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np

from dogtl.core.early_stopping import EarlyStopping
from dogtl.head.settings import HeadConfig

log = logging.getLogger(__name__)

# HeadConfig settings whose effect this module reproduces; any other setting must keep its default.
FUSABLE = {"cache", "out", "force", "epochs", "batch_size", "schedule", "base_lr", "max_lr", "step_size", "gamma",
           "optimizer", "patience", "hidden", "dropout", "input_dropout", "clean_only", "label_smoothing",
           "weight_decay", "precision", "seed"}
_MODES = {"constant": 0, "triangular": 1, "triangular2": 2, "exp_range": 3}
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
    history: list = field(default_factory=list)  # one dict per epoch (head.HISTORY_COLUMNS)
    seconds: float = 0.0
    error: str | None = None


class NotFusable(Exception):
    """The Keras head or optimizer built for a trial is not one this module reproduces."""


def _initial_state(config: HeadConfig, dim: int, num_classes: int, resolved) -> dict:
    """Build the trial's Keras head exactly as fit_head does and read its initial weights,
    normalisation constants, optimizer constants and learning-rate schedule."""
    import keras

    from dogtl.head.train import build_compiled_head
    from dogtl.head.schedules import CyclicLR

    model, lr = build_compiled_head(config, dim, num_classes, resolved)
    names = [layer.name for layer in model.layers]
    expected = (["features", "head_bn", "head_dropout_in"]
                + [n for k in range(len(config.hidden)) for n in (f"head_dense_{k}", f"head_dropout_{k}")]
                + ["head_softmax"])
    if names != expected:
        raise NotFusable(f"head layers {names}")
    bn = model.get_layer("head_bn")
    if not isinstance(bn, keras.layers.BatchNormalization) or bn.renorm or not (bn.scale and bn.center):
        raise NotFusable("batch normalisation options")
    dense = []
    for name in [f"head_dense_{k}" for k in range(len(config.hidden))] + ["head_softmax"]:
        layer = model.get_layer(name)
        want = "softmax" if name == "head_softmax" else "relu"
        if (not isinstance(layer, keras.layers.Dense) or not layer.use_bias or layer.kernel_regularizer
                or layer.bias_regularizer or layer.activity_regularizer
                or getattr(layer.activation, "__name__", "") != want):
            raise NotFusable(f"layer {name}")
        kernel, bias = layer.get_weights()
        dense.append((kernel, bias))
    for k, rate in [(-1, config.input_dropout)] + [(k, config.dropout) for k in range(len(config.hidden))]:
        layer = model.get_layer("head_dropout_in" if k < 0 else f"head_dropout_{k}")
        if not isinstance(layer, keras.layers.Dropout) or abs(layer.rate - rate) > 1e-12 or layer.noise_shape:
            raise NotFusable(f"dropout layer {layer.name}")

    opt = model.optimizer
    if abs((opt.weight_decay or 0.0) - config.weight_decay) > 1e-12:
        raise NotFusable("weight decay")
    if any(getattr(opt, a, None) for a in ("clipnorm", "clipvalue", "global_clipnorm")) \
            or getattr(opt, "use_ema", False) or getattr(opt, "loss_scale_factor", None) \
            or (getattr(opt, "gradient_accumulation_steps", None) or 1) > 1:
        raise NotFusable("optimizer options")
    kind = type(opt).__name__.lower()
    if kind == "rmsprop" and not opt.centered and not opt.momentum:
        consts = {"rho": float(opt.rho), "epsilon": float(opt.epsilon)}
    elif kind == "adam" and not opt.amsgrad:
        consts = {"beta_1": float(opt.beta_1), "beta_2": float(opt.beta_2), "epsilon": float(opt.epsilon)}
    elif kind == "sgd" and not opt.nesterov:
        consts = {"momentum": float(opt.momentum)}
    else:
        raise NotFusable(f"optimizer {kind}")

    if isinstance(lr, CyclicLR):
        schedule = (_MODES[lr.mode], lr.base_lr, lr.max_lr, float(lr.step_size), lr.gamma)
    elif isinstance(lr, (int, float)):
        schedule = (0, float(lr), float(lr), 1.0, 1.0)
    else:
        raise NotFusable(f"learning rate {lr!r}")
    gamma, beta, moving_mean, moving_var = bn.get_weights()
    return {"bn": [gamma, beta, moving_mean, moving_var], "bn_eps": float(bn.epsilon),
            "bn_momentum": float(bn.momentum), "dense": dense, "optimizer": (kind, consts),
            "schedule": schedule}


def _same(values, what):
    first = values[0]
    if any(v != first for v in values[1:]):
        raise NotFusable(f"{what} differs between trials")
    return first


class FusedHeads:
    """The stacked variables and compiled epoch/validation graphs of a group of trials.

    features [P, N, D] (all labelled rows, any float dtype), labels [N]; `train_rows` index
    the rows trained on; val_features [V, D] clean features of the validation rows.
    `state` (from `state()` of a larger group) continues trials already part-trained."""

    def __init__(self, configs: list[HeadConfig], features, labels, train_rows: np.ndarray,
                 val_features: np.ndarray, num_classes: int, state: dict | None = None, iteration: int = 0):
        import tensorflow as tf

        if not configs:
            raise ValueError("no trials to train")
        keys = {fuse_key(c) for c in configs}
        if len(keys) != 1 or None in keys:
            raise NotFusable(f"trials with different fuse keys {keys}")
        self.configs = list(configs)
        self.T = len(configs)
        self.features = features if tf.is_tensor(features) else tf.convert_to_tensor(features)
        self.num_passes_total = int(self.features.shape[0])
        self.dim = int(self.features.shape[2])
        self.labels = tf.convert_to_tensor(np.asarray(labels, np.int32))
        self.train_rows = tf.convert_to_tensor(np.asarray(train_rows, np.int32))
        self.num_train = int(len(train_rows))
        if self.num_train < 1:
            raise ValueError("no training rows")
        resolved = [c.resolve(self.num_train) for c in configs]  # automatic settings, as fit_head resolves them
        self.batch, self.steps = resolved[0].batch_size, resolved[0].steps_per_epoch
        self.val_features = np.asarray(val_features, np.float32)
        self.num_classes = int(num_classes)
        self.hidden = tuple(configs[0].hidden)

        inits = ([_initial_state(c, self.dim, num_classes, r) for c, r in zip(configs, resolved)]
                 if state is None else None)
        if inits is not None:
            self.opt_kind, self.opt_consts = _same([i["optimizer"] for i in inits], "optimizer")
            self.bn_eps = _same([i["bn_eps"] for i in inits], "BatchNorm epsilon")
            self.bn_momentum = _same([i["bn_momentum"] for i in inits], "BatchNorm momentum")
            schedules = np.array([i["schedule"] for i in inits], np.float64)
            stack = lambda arrays: np.stack(arrays).astype(np.float32)  # noqa: E731
            weights = {"bn": [stack([i["bn"][j] for i in inits]) for j in range(4)],
                       "dense": [(stack([i["dense"][k][0] for i in inits]), stack([i["dense"][k][1] for i in inits]))
                                 for k in range(len(self.hidden) + 1)]}
            slots = None
        else:
            self.opt_kind, self.opt_consts = state["optimizer"]
            self.bn_eps, self.bn_momentum = state["bn_eps"], state["bn_momentum"]
            schedules = state["schedules"]
            weights, slots = state["weights"], state["slots"]
        self.schedules = schedules
        mode, base, top, step, gamma = (schedules[:, j] for j in range(5))
        self._mode = tf.constant(mode.astype(np.int32))
        self._base, self._top = tf.constant(base.astype(np.float32)), tf.constant(top.astype(np.float32))
        self._step_size, self._gamma = tf.constant(step.astype(np.float32)), tf.constant(gamma.astype(np.float32))

        v = lambda x, name, trainable=False: tf.Variable(x, name=name, trainable=trainable)  # noqa: E731
        self.bn_gamma, self.bn_beta = v(weights["bn"][0], "bn_gamma", True), v(weights["bn"][1], "bn_beta", True)
        self.moving_mean, self.moving_var = v(weights["bn"][2], "moving_mean"), v(weights["bn"][3], "moving_var")
        self.kernels = [v(w, f"kernel_{k}", True) for k, (w, _) in enumerate(weights["dense"])]
        self.biases = [v(b, f"bias_{k}", True) for k, (_, b) in enumerate(weights["dense"])]
        self.trainables = [self.bn_gamma, self.bn_beta] + [x for pair in zip(self.kernels, self.biases) for x in pair]
        n_slots = {"rmsprop": 1, "adam": 2, "sgd": 1}[self.opt_kind]
        self.slots = [[v(np.zeros(w.shape, np.float32) if slots is None else slots[i][j], f"slot{j}_{i}")
                       for j in range(n_slots)] for i, w in enumerate(self.trainables)]
        self.iteration = tf.Variable(int(iteration), dtype=tf.int64, trainable=False, name="iteration")
        self.seeds = [int(c.seed) for c in configs]
        self.passes = [1 if c.clean_only else self.num_passes_total for c in configs]
        self.precision = resolved[0].precision
        self.smoothing = np.array([c.label_smoothing for c in configs], np.float32)
        self.decay = tf.constant([c.weight_decay for c in configs], tf.float32)
        self.input_rates = tf.constant([[[float(c.input_dropout)]] for c in configs], tf.float32)
        self.rates = tf.constant([[[float(c.dropout)]] for c in configs], tf.float32)
        # autograph=False: the graphs are written with explicit loops, and converting them
        # would cost seconds per group.
        self._apply = tf.function(self._apply_graph, jit_compile=True, autograph=False)
        self._epoch = tf.function(self._epoch_graph, autograph=False)
        self._predict = tf.function(self._predict_graph, autograph=False,
                                    input_signature=[tf.TensorSpec([None, self.dim], tf.float32)])
        for fn in (self._apply, self._epoch, self._predict):
            fn._omit_frequent_tracing_warning = True  # one trace per group is the design, not a retracing bug

    # -- the maths -------------------------------------------------------------------------
    def learning_rates(self, iteration):
        """Each trial's rate at `iteration`: `schedules.cyclic_lr`, vectorised (float32, as CyclicLR)."""
        import tensorflow as tf

        it = tf.cast(iteration, tf.float32)
        cycle = tf.floor(1.0 + it / (2.0 * self._step_size))
        x = tf.abs(it / self._step_size - 2.0 * cycle + 1.0)
        scale = tf.where(self._mode == 1, 1.0,
                         tf.where(self._mode == 2, tf.pow(0.5, cycle - 1.0), tf.pow(self._gamma, it)))
        cyclic = self._base + (self._top - self._base) * tf.maximum(0.0, 1.0 - x) * scale
        return tf.where(self._mode == 0, self._base, cyclic)

    def _dropout(self, h, rates, iteration, layer):
        """Inverted dropout with per-trial rates and per-trial stateless masks."""
        import tensorflow as tf

        shape = tf.shape(h)[1:]
        masks = []
        for t, seed in enumerate(self.seeds):
            key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 31337], tf.int64), iteration)
            key = tf.random.experimental.stateless_fold_in(key, layer)
            masks.append(tf.random.stateless_uniform(shape, seed=key))
        keep = tf.cast(tf.stack(masks) >= rates, h.dtype)
        return h * keep / (1.0 - rates)

    def _forward(self, x, training, iteration=None):
        """x [T, B, D] -> logits [T, B, C]; in training, batch statistics update the moving ones."""
        import tensorflow as tf

        if training:
            mean, var = tf.nn.moments(x, axes=[1], keepdims=True)
            m = self.bn_momentum
            self.moving_mean.assign(self.moving_mean * m + mean[:, 0] * (1.0 - m))
            self.moving_var.assign(self.moving_var * m + var[:, 0] * (1.0 - m))
        else:
            mean, var = self.moving_mean[:, None], self.moving_var[:, None]
        h = tf.nn.batch_normalization(x, mean, var, self.bn_beta[:, None], self.bn_gamma[:, None], self.bn_eps)
        if training:
            h = self._dropout(h, self.input_rates, iteration, 0)
        for k, (w, b) in enumerate(zip(self.kernels, self.biases)):
            if training and k < len(self.hidden) and self.precision == "bfloat16":  # Keras's mixed_bfloat16 Dense
                bf16 = tf.bfloat16
                h = tf.cast(tf.matmul(tf.cast(h, bf16), tf.cast(w, bf16)) + tf.cast(b, bf16)[:, None], tf.float32)
            else:
                h = tf.matmul(h, w) + b[:, None]
            if k < len(self.hidden):
                h = tf.nn.relu(h)
                if training:
                    h = self._dropout(h, self.rates, iteration, k + 1)
        return h

    def _apply_graph(self, grads, lr):
        """One optimizer step for every trial, with the Keras optimizers' formulas."""
        import tensorflow as tf

        c = self.opt_consts
        step = tf.cast(self.iteration + 1, tf.float32)
        for var, grad, slots in zip(self.trainables, grads, self.slots):
            rate = tf.reshape(lr, [-1] + [1] * (len(var.shape) - 1))
            if any(var is kernel for kernel in self.kernels):  # decoupled weight decay, as Keras applies it
                var.assign(var - var * tf.reshape(self.decay, rate.shape) * rate)
            if self.opt_kind == "rmsprop":
                (velocity,) = slots
                velocity.assign(c["rho"] * velocity + (1.0 - c["rho"]) * tf.square(grad))
                var.assign_sub(rate * grad / tf.sqrt(velocity + c["epsilon"]))
            elif self.opt_kind == "adam":
                m, v = slots
                alpha = rate * tf.sqrt(1.0 - tf.pow(c["beta_2"], step)) / (1.0 - tf.pow(c["beta_1"], step))
                m.assign_add((grad - m) * (1.0 - c["beta_1"]))
                v.assign_add((tf.square(grad) - v) * (1.0 - c["beta_2"]))
                var.assign_sub(m * alpha / (tf.sqrt(v) + c["epsilon"]))
            else:
                (m,) = slots
                m.assign(m * c["momentum"] - grad * rate)
                var.assign_add(m)
        self.iteration.assign_add(1)

    def _epoch_graph(self, epoch):
        import tensorflow as tf

        from dogtl.head.trainloop import epoch_plan

        plans = [epoch_plan(seed, epoch, self.num_train, passes, self.batch)
                 for seed, passes in zip(self.seeds, self.passes)]
        rows = tf.gather(self.train_rows, tf.stack([r for r, _ in plans]))  # [T, steps * batch]
        passes = tf.stack([p for _, p in plans])
        labels = tf.gather(self.labels, rows)
        b = self.batch

        def step(s, losses, correct):
            start = s * b
            idx, y = rows[:, start:start + b], labels[:, start:start + b]
            x = tf.cast(tf.gather_nd(self.features, tf.stack([passes[:, start:start + b], idx], -1)), tf.float32)
            iteration = tf.identity(self.iteration)
            lr = self.learning_rates(iteration)
            with tf.GradientTape() as tape:
                logits = self._forward(x, True, iteration)
                if self.smoothing.any():  # Keras's label smoothing: (1 - e) one-hot + e / classes
                    e = self.smoothing[:, None, None]
                    targets = tf.one_hot(y, self.num_classes) * (1.0 - e) + e / self.num_classes
                    loss = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
                else:
                    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
                loss = tf.reduce_mean(loss, axis=1)  # [T]
                total = tf.reduce_sum(loss)
            self._apply(tape.gradient(total, self.trainables), lr)
            hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.int32), 1)
            return s + 1, losses.write(s, loss), correct + hits

        _, losses, correct = tf.while_loop(
            lambda s, *_: s < self.steps, step,
            [tf.constant(0), tf.TensorArray(tf.float32, size=self.steps), tf.zeros([self.T], tf.int32)])
        return losses.stack(), correct

    def _predict_graph(self, x):
        import tensorflow as tf

        xs = tf.broadcast_to(x[None], [self.T, tf.shape(x)[0], self.dim])
        return tf.nn.softmax(self._forward(xs, False))

    # -- the Python side -------------------------------------------------------------------
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
        return self.learning_rates(iteration).numpy()

    def state(self, keep: list[int]) -> dict:
        """Weights, optimizer slots and constants of the trials `keep`, to continue them in a smaller group."""
        pick = lambda var: var.numpy()[keep]  # noqa: E731
        return {"optimizer": (self.opt_kind, self.opt_consts), "bn_eps": self.bn_eps,
                "bn_momentum": self.bn_momentum, "schedules": self.schedules[keep],
                "weights": {"bn": [pick(self.bn_gamma), pick(self.bn_beta), pick(self.moving_mean),
                                   pick(self.moving_var)],
                            "dense": [(pick(w), pick(b)) for w, b in zip(self.kernels, self.biases)]},
                "slots": [[pick(s) for s in slots] for slots in self.slots]}


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

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.stopping.update(row["epoch"], row["val_loss"] if math.isfinite(row["loss"]) else math.nan)

    def outcome(self) -> TrialOutcome:
        if not self.best_epoch:
            loss = self.rows[0]["loss"] if self.rows else float("nan")
            nan = float("nan")
            return TrialOutcome(self.config, {"val_accuracy": nan, "val_log_loss": nan, "epochs_run": len(self.rows),
                                              "best_epoch": 0, "train_loss": nan, "train_accuracy": nan},
                                self.rows, self.seconds,
                                f"training diverged in epoch 1 (loss {loss}): lower base_lr/max_lr")
        best = self.rows[self.best_epoch - 1]
        return TrialOutcome(self.config, {"val_accuracy": best["val_accuracy"], "val_log_loss": best["val_loss"],
                                          "epochs_run": len(self.rows), "best_epoch": self.best_epoch,
                                          "train_loss": best["loss"], "train_accuracy": best["accuracy"]},
                            self.rows, self.seconds)


def train_fused(configs: list[HeadConfig], features, labels, train_rows: np.ndarray, val_rows: np.ndarray,
                num_classes: int, on_done: Callable[[int, TrialOutcome], None] | None = None,
                shrink: bool = True) -> list[TrialOutcome]:
    """Train the trials `configs` (equal `fuse_key`) side by side on features [P, N, D] and
    return one outcome per trial, in order. `on_done(index, outcome)` is called as each
    trial finishes. With `shrink`, once half the group has stopped the rest continue in
    a smaller graph (same numbers, less wasted compute)."""
    from dogtl.evaluation.metrics import scores

    started = time.perf_counter()
    val_rows = np.asarray(val_rows)
    if not len(val_rows):
        from dogtl.core.errors import DogtlError

        raise DogtlError("no validation images: early stopping and the metrics need some")
    labels = np.asarray(labels, np.int32)
    clean = features[0] if isinstance(features, np.ndarray) else None
    if clean is not None:
        val_x = clean[val_rows].astype(np.float32)
    else:
        import tensorflow as tf

        val_x = tf.gather(features[0], val_rows).numpy().astype(np.float32)
    val_y = labels[val_rows]
    trackers = [_Tracker(c) for c in configs]
    active = list(range(len(configs)))
    members = list(active)  # the trials in `group`, in its order (finished ones may still be in it)
    group = FusedHeads(configs, features, labels, train_rows, val_x, num_classes)
    setup = time.perf_counter() - started
    for t in trackers:
        t.seconds += setup / len(trackers)
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
            trackers[i].add({"epoch": epoch, "loss": float(np.mean(losses[:, j])), "accuracy": float(accuracy[j]),
                             "val_loss": val["val_log_loss"], "val_accuracy": val["val_accuracy"],
                             "lr": float(lrs[j])})
            if trackers[i].done:
                finished.append(i)
        elapsed = time.perf_counter() - started
        for i in active:
            trackers[i].seconds += elapsed / len(active)
        for i in finished:
            if on_done:
                on_done(i, trackers[i].outcome())
        active = [i for i in active if i not in finished]
        if active and shrink and len(active) <= len(members) // 2:
            started = time.perf_counter()
            state = group.state([members.index(i) for i in active])
            iteration = int(group.iteration.numpy())
            group = FusedHeads([configs[i] for i in active], group.features, labels, train_rows, val_x,
                               num_classes, state=state, iteration=iteration)
            members = list(active)
            elapsed = time.perf_counter() - started
            for i in active:
                trackers[i].seconds += elapsed / len(active)
    return [t.outcome() for t in trackers]
