"""Learning-rate schedules: cyclical (Smith, 2017), one cycle, warm-up; and the optimizers the
recipes use. In core because head training, sweeps and fine-tuning build them and every model
loader needs them registered with Keras (a saved optimizer names its schedule).

`cyclic_formula` is the one cyclical formula; `cyclic_lr` evaluates it in plain Python (what the
tests check), `CyclicLR` is the thin Keras adapter that evaluates it in-graph and saves and loads
with a model, and the fused sweep calls each trial's `CyclicLR`. `one_cycle_formula` /
`OneCycleLR` are the same pair for fine-tuning's one-cycle schedule (its warm-up-then-cosine
schedule is Keras's own `CosineDecay`).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import keras

from dogtl.core.errors import DogtlError

MODES = ("exp_range", "triangular", "triangular2")  # the cyclical schedules (head.settings.SCHEDULES adds constant)
RECIPE_GAMMA = 0.99994  # exp_range decay per iteration of the reference recipe (batch 16)


def _check(base_lr, max_lr, step_size, mode, gamma):
    if mode not in MODES:
        raise DogtlError(f"cyclical mode {mode!r}: choose one of {', '.join(MODES)}")
    if not base_lr > 0 or not max_lr > 0:
        raise DogtlError(f"learning rates must be > 0 (base {base_lr}, max {max_lr})")
    if base_lr > max_lr:
        raise DogtlError(f"base learning rate {base_lr} is above the max {max_lr}: swap them")
    if step_size < 1:
        raise DogtlError(f"step size {step_size} must be at least 1 iteration")
    if not 0 < gamma <= 1:
        raise DogtlError(f"gamma {gamma} must be in (0, 1]")


PYTHON_MATHS = SimpleNamespace(floor=math.floor, abs=abs, power=pow, maximum=max, minimum=min,
                               cos=math.cos)  # the formulas on floats


def cyclic_formula(iteration, base_lr, max_lr, step_size, mode, gamma, maths=PYTHON_MATHS):
    """Smith's cyclical rate at `iteration` (0-based), written once against `maths` (floor, abs,
    power, maximum: Python's by default, `keras.ops` in-graph), so every schedule evaluates it:
    cycle = floor(1 + it/(2 step)), x = |it/step - 2 cycle + 1|,
    lr = base + (max - base) * max(0, 1 - x) * scale, with scale 1 (triangular),
    1/2**(cycle-1) (triangular2) or gamma**it (exp_range)."""
    cycle = maths.floor(1.0 + iteration / (2.0 * step_size))
    x = maths.abs(iteration / step_size - 2.0 * cycle + 1.0)
    if mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        scale = maths.power(0.5, cycle - 1.0)
    else:
        scale = maths.power(gamma, iteration)
    return base_lr + (max_lr - base_lr) * maths.maximum(0.0, 1.0 - x) * scale


def cyclic_lr(iteration, base_lr, max_lr, step_size, mode="triangular", gamma=1.0) -> float:
    """`cyclic_formula` in plain Python, after checking the settings: what the tests check."""
    _check(base_lr, max_lr, step_size, mode, gamma)
    return cyclic_formula(iteration, base_lr, max_lr, step_size, mode, gamma)


@keras.saving.register_keras_serializable(package="dogtl")
class CyclicLR(keras.optimizers.schedules.LearningRateSchedule):
    """`cyclic_formula` as a Keras schedule, evaluated at the optimizer's iteration count."""

    def __init__(self, base_lr, max_lr, step_size, mode="exp_range", gamma=RECIPE_GAMMA, name="CyclicLR"):
        super().__init__()
        _check(base_lr, max_lr, step_size, mode, gamma)
        self.base_lr, self.max_lr = float(base_lr), float(max_lr)
        self.step_size, self.mode, self.gamma = int(step_size), mode, float(gamma)
        self.name = name

    def __call__(self, step):
        from keras import ops

        return cyclic_formula(ops.cast(step, "float32"), self.base_lr, self.max_lr, float(self.step_size),
                              self.mode, self.gamma, ops)

    def get_config(self):
        return {"base_lr": self.base_lr, "max_lr": self.max_lr, "step_size": self.step_size,
                "mode": self.mode, "gamma": self.gamma, "name": self.name}


def one_cycle_formula(iteration, base_lr, max_lr, warmup_steps, total_steps, maths=PYTHON_MATHS):
    """The one-cycle rate at `iteration` (0-based; fastai's fit_one_cycle, PyTorch's OneCycleLR
    with cosine annealing): a half cosine up from base_lr to max_lr over `warmup_steps`, then a
    half cosine down from max_lr to 0 at `total_steps` (held there after):
    lr = (base + (max - base) * up) * down, up = (1 - cos(pi min(it, W) / W)) / 2 (1 without
    warm-up), down = (1 + cos(pi clip((it - W) / (T - W), 0, 1))) / 2."""
    up = (1.0 - maths.cos(math.pi * maths.minimum(iteration, float(warmup_steps)) / warmup_steps)) / 2.0 \
        if warmup_steps else 1.0
    fraction = maths.minimum(1.0, maths.maximum(0.0, (iteration - warmup_steps) / max(1.0, total_steps - warmup_steps)))
    return (base_lr + (max_lr - base_lr) * up) * (1.0 + maths.cos(math.pi * fraction)) / 2.0


def one_cycle_lr(iteration, base_lr, max_lr, warmup_steps, total_steps) -> float:
    """`one_cycle_formula` in plain Python: what the tests check."""
    return one_cycle_formula(iteration, base_lr, max_lr, warmup_steps, total_steps)


@keras.saving.register_keras_serializable(package="dogtl")
class OneCycleLR(keras.optimizers.schedules.LearningRateSchedule):
    """`one_cycle_formula` as a Keras schedule, evaluated at the optimizer's iteration count."""

    def __init__(self, base_lr, max_lr, warmup_steps, total_steps, name="OneCycleLR"):
        super().__init__()
        if not 0 < base_lr <= max_lr or not 0 <= warmup_steps < total_steps:
            raise DogtlError(f"one cycle from {base_lr} to {max_lr} with {warmup_steps} of {total_steps} steps "
                             "warming up: need 0 < base <= max and fewer warm-up steps than steps")
        self.base_lr, self.max_lr = float(base_lr), float(max_lr)
        self.warmup_steps, self.total_steps, self.name = int(warmup_steps), int(total_steps), name

    def __call__(self, step):
        from keras import ops

        return one_cycle_formula(ops.cast(step, "float32"), self.base_lr, self.max_lr, self.warmup_steps,
                                 self.total_steps, ops)

    def get_config(self):
        return {"base_lr": self.base_lr, "max_lr": self.max_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "name": self.name}


# The recipes' optimizers: (Keras class, its arguments other than the rate).
OPTIMIZER_CLASSES = {"rmsprop": (keras.optimizers.RMSprop, {"rho": 0.9}), "adam": (keras.optimizers.Adam, {}),
                     "sgd": (keras.optimizers.SGD, {"momentum": 0.9})}


def make_optimizer(name: str, learning_rate, **kw):
    """The recipe's optimizers: RMSprop (rho 0.9), Adam, or SGD with momentum 0.9."""
    if name not in OPTIMIZER_CLASSES:
        raise DogtlError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZER_CLASSES)}")
    cls, defaults = OPTIMIZER_CLASSES[name]
    return cls(learning_rate=learning_rate, **{**defaults, **kw})


def warmup_lr(iteration, lr: float, warmup_steps: int) -> float:
    """The rate during a linear warm-up: `lr` (the schedule's rate at `iteration`, 0-based)
    scaled by (iteration + 1) / warmup_steps until that reaches 1."""
    return lr * min(1.0, (iteration + 1) / warmup_steps) if warmup_steps else lr


@keras.saving.register_keras_serializable(package="dogtl")
class Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """`warmup_lr` as a Keras schedule around another schedule (or a constant rate)."""

    def __init__(self, schedule, warmup_steps: int, name="Warmup"):
        super().__init__()
        if int(warmup_steps) < 1:
            raise DogtlError(f"warm-up of {warmup_steps} iterations: give at least 1")
        self.schedule, self.warmup_steps, self.name = schedule, int(warmup_steps), name

    def __call__(self, step):
        from keras import ops

        it = ops.cast(step, "float32")
        lr = self.schedule(step) if callable(self.schedule) else self.schedule
        return lr * ops.minimum(1.0, (it + 1.0) / float(self.warmup_steps))

    def get_config(self):
        inner = self.schedule if not callable(self.schedule) else keras.saving.serialize_keras_object(self.schedule)
        return {"schedule": inner, "warmup_steps": self.warmup_steps, "name": self.name}

    @classmethod
    def from_config(cls, config):
        inner = config["schedule"]
        if isinstance(inner, dict):
            inner = keras.saving.deserialize_keras_object(inner)
        return cls(inner, config["warmup_steps"], config.get("name", "Warmup"))
