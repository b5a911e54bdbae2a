"""Every private or compat-only Keras/TensorFlow name dogtl relies on, and nowhere else.

Each function says why no public API does its job and on which versions it was checked;
tests/core/test_keras_private.py fails (never skips) when the installed versions lack a name
used here or no longer behave as relied on, and these functions raise, never fall back, when
a name is missing at run time.
"""

from __future__ import annotations

from contextlib import contextmanager

CHECKED_ON = "TensorFlow 2.21.0 / Keras 3.15.1"


def _require(owner, name: str, where: str):
    """`owner.name`, or a RuntimeError naming what is missing and the versions it was checked on."""
    if not hasattr(owner, name):
        raise RuntimeError(f"{where} has no {name!r}: dogtl's use of it was checked on {CHECKED_ON}; "
                           "update dogtl/core/keras_private.py for the installed versions")
    return getattr(owner, name)


def override_gradients(overrides: dict):
    """A context in which ops of the given types, created inside a `tf.function`, take the
    gradients registered (with the public `tf.RegisterGradient`) under the given names, for
    graph gradients (`tf.gradients`).

    Why private-ish: only `tf.Graph.gradient_override_map`, reached through the graph-mode
    `tf.compat.v1.get_default_graph()`, changes the gradient of ops that library code (Keras's
    Dense MatMul) creates; `tf.custom_gradient` would need dogtl to own the op. Checked on
    TensorFlow 2.21.0.
    """
    import tensorflow as tf

    graph = _require(tf.compat.v1, "get_default_graph", "tf.compat.v1")()
    return _require(graph, "gradient_override_map", type(graph).__name__)(overrides)


@contextmanager
def multi_worker_fit(model, strategy, element_spec):
    """A context in which `model.fit` works under MultiWorkerMirroredStrategy (Keras 3's `fit`
    fails there: tensorflow/tensorflow#72388, keras-team/keras#20585, still so in 3.15.1; no
    public switch avoids it). Two Keras internals are worked around, and restored on exit:

    - `fit` first learns input shapes by averaging one batch over all workers' replicas, which
      fails; instead the model is built here from the dataset's element spec (`_symbolic_build`)
      and the model's own `_maybe_symbolic_build` does nothing while the context lasts.
    - Each step's scalar logs are averaged across workers along an axis they lack; with
      `_collective_all_reduce_multi_worker` answering False they are taken over this worker's
      replicas, as for MirroredStrategy. Keras's metric variables are already summed over all
      workers, so the logged loss is the global one; gradients are averaged over the global
      batch by the optimizer. Train steps traced inside the context keep this after it ends.

    Checked on TensorFlow 2.21.0 / Keras 3.15.1.
    """
    from keras.src.backend.tensorflow import trainer

    collective = _require(trainer, "_collective_all_reduce_multi_worker", trainer.__name__)
    symbolic_build = _require(model, "_symbolic_build", type(model).__name__)
    _require(model, "_maybe_symbolic_build", type(model).__name__)
    with strategy.scope():
        symbolic_build(data_batch=element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    trainer._collective_all_reduce_multi_worker = lambda strategy: False
    try:
        yield
    finally:
        trainer._collective_all_reduce_multi_worker = collective
        del model._maybe_symbolic_build


def variable_index(optimizer, variable) -> int:
    """The position of `variable` in the list `optimizer` was built with, inside its `update_step`.

    Why private: Keras's own optimizers find a variable's slots (momentums, velocities) with
    `Optimizer._get_variable_index`; in `update_step` the TensorFlow backend passes the raw
    `tf.Variable` (under tf.distribute a per-replica one), which only that method maps back to
    the built list. dogtl's layer-wise rates (finetuning/optimizer.py) look their rate up the
    same way. Checked on Keras 3.15.1.
    """
    return _require(optimizer, "_get_variable_index", type(optimizer).__name__)(variable)


def swap_ema_weights(resumed: bool):
    """Keras's `SwapEMAWeights(swap_on_epoch=True)` callback: the optimizer's moving average of the
    weights is in the model from each epoch's end (validated and checkpointed there) to the next
    epoch's start. With `resumed`, it knows the model was loaded from such a checkpoint (the
    average in the model, the raw weights in the optimizer's average slots), so it swaps them back
    before training on.

    Why private: the callback keeps which weights the model holds in `_ema_weights_in_model`, set
    False at construction, and no public argument or method sets it; the swap itself needs the
    optimizer's `_model_variables_moving_average`, which the callback reads. Checked on Keras 3.15.1.
    """
    import keras

    callback = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
    _require(callback, "_ema_weights_in_model", type(callback).__name__)
    callback._ema_weights_in_model = resumed
    return callback
