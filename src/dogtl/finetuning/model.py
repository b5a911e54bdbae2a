"""The model fine-tuning trains: backbone -> pooling -> the trained head object itself, so it
starts exactly where the head stopped. Only the top N blocks learn; BatchNorm layers stay
frozen (inference mode)."""

from __future__ import annotations

from dogtl.finetuning.settings import FinetuneConfig


def build_model(config: FinetuneConfig, meta: dict, spec, image_size: int, weights: str, steps_per_epoch: int):
    """(compiled model, the head inside it, names of the trainable backbone layers), built under
    the caller's distribution scope."""
    from dogtl.core.artifacts import load_model
    from dogtl.core.modelinfo import check_model_matches
    from dogtl.core.models import build_backbone, compose, freeze_batchnorm, unfreeze_top_blocks

    head, _ = load_model(config.head, compile=False)
    check_model_matches(head, meta, config.head)
    backbone = build_backbone(spec, weights, image_size)
    trainable = unfreeze_top_blocks(backbone, spec, config.trainable_blocks)
    freeze_batchnorm(head)
    model = compose(backbone, head)
    compile_model(model, config, steps_per_epoch)  # after every trainability change
    return model, head, trainable


def compile_model(model, config: FinetuneConfig, steps_per_epoch: int) -> None:
    import keras

    from dogtl.core.precision import resolve
    from dogtl.head.schedules import make_optimizer

    optimizer = make_optimizer(config.optimizer, learning_rate(config, steps_per_epoch))
    if resolve(config.precision) == "float16":  # float16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer,
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # so every checkpoint holds its state


def learning_rate(config: FinetuneConfig, steps_per_epoch: int):
    """`--base-lr` for the constant schedule, else train-head's cyclical schedule."""
    from dogtl.head.schedules import CyclicLR

    if config.schedule == "constant":
        return config.base_lr
    return CyclicLR(config.base_lr, config.max_lr, config.cycle_step_size(steps_per_epoch),
                    mode=config.schedule, gamma=config.cycle_gamma())
