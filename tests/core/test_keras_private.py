"""dogtl.core.keras_private: each private Keras/TensorFlow name it uses still exists and still
does what dogtl relies on. These tests fail, never skip, on versions that break one of them."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from dogtl.core import keras_private


def _tiny_model():
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _dataset():
    import tensorflow as tf

    x = np.random.default_rng(0).standard_normal((8, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, np.arange(8) % 2)).batch(4)


def test_keras_still_has_what_the_multi_worker_fit_workaround_replaces():
    """The replaced function is the one Keras's per-replica reduction consults, and `fit`
    still learns shapes through the model's `_maybe_symbolic_build`."""
    import keras
    from keras.src.backend.tensorflow import trainer

    assert callable(trainer._collective_all_reduce_multi_worker)
    assert "_collective_all_reduce_multi_worker(strategy)" in inspect.getsource(trainer.reduce_per_replica)
    assert "self._maybe_symbolic_build(iterator=" in inspect.getsource(trainer.TensorFlowTrainer.fit)
    assert callable(keras.Model._symbolic_build) and callable(keras.Model._maybe_symbolic_build)


def test_multi_worker_fit_builds_the_model_and_restores_keras_when_the_fit_ends():
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    original = trainer._collective_all_reduce_multi_worker
    model, dataset = _tiny_model(), _dataset()
    with keras_private.multi_worker_fit(model, tf.distribute.get_strategy(), dataset.element_spec):
        assert model.built and model.optimizer.built  # built from the element spec, before any step
        assert trainer._collective_all_reduce_multi_worker(None) is False
        assert model._maybe_symbolic_build(iterator=iter(())) is None
        model.fit(dataset, epochs=1, shuffle=False, verbose=0)
    assert trainer._collective_all_reduce_multi_worker is original
    assert "_maybe_symbolic_build" not in vars(model)

    with pytest.raises(KeyboardInterrupt):
        with keras_private.multi_worker_fit(_tiny_model(), tf.distribute.get_strategy(), dataset.element_spec):
            raise KeyboardInterrupt  # an interrupted fit restores Keras too
    assert trainer._collective_all_reduce_multi_worker is original


def test_override_gradients_swaps_an_ops_graph_gradient():
    import tensorflow as tf

    name = "DogtlTestTripledMatMulGrad"
    try:
        tf.RegisterGradient(name)(lambda op, g: [3 * t for t in (tf.matmul(g, op.inputs[1], transpose_b=True),
                                                                  tf.matmul(op.inputs[0], g, transpose_a=True))])
    except KeyError:  # registered by an earlier run of this test in the same process
        pass
    x = tf.constant(np.arange(6, dtype="float32").reshape(2, 3))
    w = tf.constant(np.ones((3, 4), "float32"))

    @tf.function
    def grads(overrides):
        with keras_private.override_gradients(overrides):
            y = tf.matmul(x, w)
        return tf.gradients(tf.reduce_sum(y), w)[0]

    np.testing.assert_allclose(grads({"MatMul": name}).numpy(), 3 * grads({}).numpy())


def test_a_missing_name_raises_and_names_the_checked_versions():
    with pytest.raises(RuntimeError, match=r"has no 'gone'.*TensorFlow 2\.21\.0 / Keras 3\.15\.1"):
        keras_private._require(object(), "gone", "object")


def test_variable_index_finds_the_raw_variables_update_step_gets():
    """The TensorFlow backend hands `update_step` the raw tf.Variable; the layer-wise rates
    (finetuning/optimizer.py) find its position in the built list through `variable_index`."""
    import keras

    a, b = keras.Variable(np.zeros(2, "float32")), keras.Variable(np.zeros(3, "float32"))
    seen = {}

    class Recording(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            seen[keras_private.variable_index(self, variable)] = tuple(variable.shape)
            return super().update_step(gradient, variable, learning_rate)

    opt = Recording(0.1)
    opt.apply([np.ones(2, "float32"), np.ones(3, "float32")], [a, b])
    assert seen == {0: (2,), 1: (3,)}


def test_swap_ema_weights_starts_with_the_average_in_the_model_when_resumed():
    """The callback still keeps which weights the model holds in the flag set here, and swaps at an
    epoch's start only when the average is in the model."""
    import keras

    assert keras_private.swap_ema_weights(True)._ema_weights_in_model is True
    assert keras_private.swap_ema_weights(False)._ema_weights_in_model is False
    begin = inspect.getsource(keras.callbacks.SwapEMAWeights.on_epoch_begin)
    assert "self._ema_weights_in_model" in begin and "_swap_variables()" in begin
