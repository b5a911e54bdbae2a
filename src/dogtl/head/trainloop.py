"""Training a head on in-memory features, a whole epoch inside one TensorFlow graph.

Why not `model.fit`: with ~500 small steps per epoch, per-step overhead dominates the
maths. Here every feature pass lives in one tensor, the epoch's order and pass choice
are drawn in-graph with stateless random ops keyed by (seed, epoch), and the step loop
runs in-graph. The Keras model and its compiled optimizer still do the maths (so the
saved model is an ordinary Keras model), with two speed-ups measured on CPU
(`benchmarks/bench_head.py --ablation`); both can be switched off and give the same numbers:
- The optimizer update is XLA-compiled: one fused pass over each weight instead of
  about ten separate element-wise ops (RMSprop: 2-5x less time per update).
- The gradient of the Dense layers' MatMul w.r.t. their input, grad @ W^T, is computed
  as (W @ grad^T)^T, same sums: TF's CPU kernel for a transposed 2048x1024 right-hand
  side is ~6x slower than the untransposed one. This needs graph gradients
  (`tf.gradients` + `keras_private.override_gradients`), applied only inside the training step.

TensorFlow and Keras are imported inside the functions that use them (local): importing this
module costs no TensorFlow start-up until training starts.
"""

from __future__ import annotations

import numpy as np

from dogtl.core.keras_private import override_gradients
from dogtl.core.models import set_head_precision

FAST_MATMUL_GRAD = "DogtlMatMulFastGrad"
_registered = False


def register_fast_matmul_grad() -> None:
    """Register the MatMul gradient that `TrainStep` overrides Dense layers' gradients with (once)."""
    global _registered
    if _registered:
        return
    import tensorflow as tf

    def grad(op, g):
        a, b = op.inputs
        ta, tb = op.get_attr("transpose_a"), op.get_attr("transpose_b")
        if not ta and not tb:  # the Dense layers' case
            return (tf.transpose(tf.matmul(b, g, transpose_b=True)), tf.matmul(a, g, transpose_a=True))
        if not ta and tb:
            return tf.matmul(g, b), tf.matmul(g, a, transpose_a=True)
        if ta and not tb:
            return tf.matmul(b, g, transpose_b=True), tf.matmul(a, g)
        return (tf.matmul(b, g, transpose_a=True, transpose_b=True),
                tf.matmul(g, a, transpose_a=True, transpose_b=True))

    try:
        tf.RegisterGradient(FAST_MATMUL_GRAD)(grad)
    except KeyError:  # already registered (module reloaded)
        pass
    _registered = True


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Every row is seen once per epoch; the last batch is topped up with rows seen already."""
    batch = min(batch_size, num_rows)
    return -(-num_rows // batch)


def epoch_plan(seed: int, epoch, num_rows: int, num_passes: int, batch_size: int):
    """(rows, passes) for one epoch, as tensors of length steps * batch: a random order of
    every row (topped up to whole batches), and the pass each row contributes, drawn
    uniformly per row and epoch. A pure function of (seed, epoch)."""
    import tensorflow as tf

    batch = min(batch_size, num_rows)
    total = steps_per_epoch(num_rows, batch) * batch
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 20180], tf.int64), tf.cast(epoch, tf.int64))
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_rows, dtype=tf.int32), seed=tf.random.experimental.stateless_fold_in(key, 1))
    rows = tf.tile(order, [-(-total // num_rows)])[:total]
    passes = tf.random.stateless_uniform([num_rows], seed=tf.random.experimental.stateless_fold_in(key, 2),
                                         minval=0, maxval=num_passes, dtype=tf.int32)
    return rows, tf.gather(passes, rows)


class TrainStep:
    """One training step of a compiled Keras head, for use inside a graph: the Keras loss (with
    its label smoothing), graph gradients with the fast MatMul gradient, and the model's own
    optimizer update, XLA-compiled. Shared by `EpochRunner` and the fused sweep."""

    def __init__(self, model, label_smoothing: float = 0.0, jit_optimizer: bool = True,
                 fast_matmul_grad: bool = True):
        import keras
        import tensorflow as tf

        register_fast_matmul_grad()
        self.model, self.variables = model, model.trainable_variables
        optimizer = model.optimizer
        optimizer.build(self.variables)
        self.apply = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, self.variables)),
                                 jit_compile=jit_optimizer)
        self.overrides = {"MatMul": FAST_MATMUL_GRAD} if fast_matmul_grad else {}
        self.smoothing = float(label_smoothing)
        self.loss_fn = (keras.losses.CategoricalCrossentropy(label_smoothing=self.smoothing)
                        if self.smoothing else keras.losses.SparseCategoricalCrossentropy())

    def __call__(self, x, y):
        """x [B, D], y [B] -> (loss, number of correct predictions)."""
        import tensorflow as tf

        with override_gradients(self.overrides):
            probs = self.model(x, training=True)
        loss = self.loss_fn(tf.one_hot(y, tf.shape(probs)[-1]) if self.smoothing else y, probs)
        self.apply(tf.gradients(loss, self.variables))
        return loss, tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.int32))


class EpochRunner:
    """Trains a compiled Keras model on `features` [passes, rows, dim] and `labels` [rows].

    Each call of `run` is one epoch (or its first `max_steps` steps) in one graph call.
    The model must be compiled with its optimizer; its loss is categorical cross-entropy on
    softmax outputs, with `label_smoothing` (Keras's definition) if given. Training runs the
    head's hidden layers at `precision`, predictions always in float32, so that validation
    scores are those of the float32 model that gets saved.
    """

    def __init__(self, model, features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 jit_optimizer: bool = True, fast_matmul_grad: bool = True, label_smoothing: float = 0.0,
                 precision: str = "float32"):
        import tensorflow as tf

        if features.ndim != 3 or features.shape[1] != len(labels) or not len(labels):
            raise ValueError(f"features {features.shape} and labels ({len(labels)}) do not match")
        self.model = model
        self.num_passes, self.num_rows = int(features.shape[0]), int(features.shape[1])
        self.batch = min(int(batch_size), self.num_rows)
        self.steps = steps_per_epoch(self.num_rows, self.batch)
        self.seed = int(seed)
        self.precision = precision
        self.features = tf.convert_to_tensor(features)
        self.labels = tf.convert_to_tensor(np.asarray(labels, np.int32))
        self._step = TrainStep(model, label_smoothing, jit_optimizer, fast_matmul_grad)
        self._epoch = tf.function(self._epoch_graph)
        self._predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def _epoch_graph(self, features, labels, epoch, max_steps):
        import tensorflow as tf

        rows, passes = epoch_plan(self.seed, epoch, self.num_rows, self.num_passes, self.batch)
        n = tf.minimum(max_steps, self.steps)
        losses = tf.TensorArray(tf.float32, size=n)
        correct = tf.constant(0, tf.int32)
        b = self.batch
        for s in tf.range(n):
            idx, p = rows[s * b:(s + 1) * b], passes[s * b:(s + 1) * b]
            x = tf.cast(tf.gather_nd(features, tf.stack([p, idx], 1)), tf.float32)
            loss, c = self._step(x, tf.gather(labels, idx))
            losses = losses.write(s, loss)
            correct += c
        return losses.stack(), correct

    def run(self, epoch: int, max_steps: int | None = None) -> tuple[np.ndarray, float]:
        """Train one epoch: (loss of every step, training accuracy over the epoch)."""
        import tensorflow as tf

        set_head_precision(self.model, self.precision)
        n = self.steps if max_steps is None else max(1, min(int(max_steps), self.steps))
        losses, correct = self._epoch(self.features, self.labels, tf.constant(epoch, tf.int64),
                                      tf.constant(n, tf.int32))
        return losses.numpy(), int(correct) / (n * self.batch)

    def predict(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Softmax outputs in inference mode (no dropout, BatchNorm moving statistics), in float32."""
        set_head_precision(self.model, "float32")
        parts = [self._predict(np.asarray(x[i:i + batch_size], np.float32)).numpy()
                 for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.model.output_shape[-1]), np.float32)
