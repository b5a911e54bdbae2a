"""What fine-tuning minimises and how: Keras's optimizers with a learning rate per layer, and the
cross-entropy with label smoothing.

Discriminative rates (ULMFiT, Howard & Ruder 2018): the head and the top block train at the
schedule's rate, each block below at `--block-lr-decay` times the rate of the block above.
Gradual unfreezing: block k from the top is held still (rate 0) until epoch (k - 1) x
`--unfreeze-every`. Keras optimizers have one rate, so `Layerwise` scales it per variable in
`update_step` (the method Keras documents for optimizers to implement) before Keras's own update
runs, and applies decoupled weight decay (AdamW, Loshchilov & Hutter 2019) there too, at each
variable's own rate: a block held still is not decayed either. `adamw` is Keras's Adam update
with that decay (Keras's AdamW class is exactly Adam with its weight decay required).
"""

from __future__ import annotations

import keras
from keras import ops

from dogtl.core.keras_private import variable_index
from dogtl.core.schedules import OPTIMIZER_CLASSES


class _Layerwise:
    """Mixed into a Keras optimizer: per variable (in the order it is built with), a rate
    multiplier, the iteration before which it is held still, and a weight decay."""

    def __init__(self, *args, multipliers=(), thaw_steps=(), decays=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.multipliers = [float(m) for m in multipliers]
        self.thaw_steps = [int(t) for t in thaw_steps]
        self.decays = [float(d) for d in decays]

    def build(self, variables):
        if not len(self.multipliers) == len(self.thaw_steps) == len(self.decays) == len(variables):
            raise ValueError(f"{type(self).__name__}: {len(self.multipliers)} layer rates for {len(variables)} "
                             "variables; build it with the variables its rates were made for")
        super().build(variables)

    def update_step(self, gradient, variable, learning_rate):
        i = variable_index(self, variable)
        lr = ops.cast(learning_rate, variable.dtype) * self.multipliers[i]
        if self.thaw_steps[i]:
            lr = lr * ops.cast(ops.greater_equal(self.iterations, self.thaw_steps[i]), variable.dtype)
        if self.decays[i]:
            self.assign_sub(variable, variable * (lr * self.decays[i]))
        return super().update_step(gradient, variable, lr)

    def get_config(self):
        return {**super().get_config(), "multipliers": self.multipliers, "thaw_steps": self.thaw_steps,
                "decays": self.decays}


def _layerwise_class(name: str, base):
    cls = type(f"Layerwise{name}", (_Layerwise, base), {"__doc__": f"Keras's {base.__name__} with a rate, a start "
                                                        "and a weight decay per variable."})
    return keras.saving.register_keras_serializable(package="dogtl")(cls)


LAYERWISE = {name: (_layerwise_class({"adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop"}[name], cls), args)
             for name, (cls, args) in OPTIMIZER_CLASSES.items()}
LAYERWISE["adamw"] = (_layerwise_class("AdamW", keras.optimizers.Adam), {})


def layer_rates(model, backbone, depths: dict, *, block_lr_decay: float, unfreeze_every: int,
                steps_per_epoch: int, weight_decay: float) -> tuple[list, list, list]:
    """(multipliers, thaw steps, decays) for `model.trainable_variables`, in that order.

    `depths` maps each backbone layer's name to its block counted from the top (1: the top
    block; models.block_depths); variables outside the backbone (the head) count as the top
    block. Biases are not decayed."""
    depth_of = {id(v): depths[layer.name] for layer in backbone.layers for v in layer.trainable_weights}
    multipliers, thaw_steps, decays = [], [], []
    for v in model.trainable_variables:
        below = max(depth_of.get(id(v), 1), 1) - 1  # blocks below the top one
        multipliers.append(block_lr_decay ** below)
        thaw_steps.append(below * unfreeze_every * steps_per_epoch)
        decays.append(0.0 if v.name == "bias" else weight_decay)
    return multipliers, thaw_steps, decays


def make_optimizer(name: str, learning_rate, rates: tuple[list, list, list], ema_momentum: float | None = None):
    """Optimizer `name` (sgd, rmsprop, adam, adamw) at `learning_rate`, with `layer_rates`, and
    Keras's moving average of the weights at `ema_momentum` per step (None: none)."""
    cls, args = LAYERWISE[name]
    multipliers, thaw_steps, decays = rates
    ema = dict(use_ema=True, ema_momentum=ema_momentum) if ema_momentum is not None else {}
    return cls(learning_rate=learning_rate, multipliers=multipliers, thaw_steps=thaw_steps, decays=decays,
               **args, **ema)


@keras.saving.register_keras_serializable(package="dogtl")
class SmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy of softmax outputs against integer labels, the targets smoothed as Keras's
    CategoricalCrossentropy smooths them: (1 - e) on the true class plus e / classes on each."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        targets = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(targets, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
