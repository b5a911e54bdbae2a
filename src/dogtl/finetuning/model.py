"""The model fine-tuning trains: backbone -> pooling -> the trained head object itself, so it
starts exactly where the head stopped. Only the top N blocks learn, each at its own rate
(optimizer.py); BatchNorm layers stay frozen (inference mode), their statistics optionally
re-estimated on the new domain first (`reestimate`)."""

from __future__ import annotations

from dogtl.core.models import (batchnorm_layers, block_depths, build_backbone, compose, freeze_batchnorm,
                               is_batchnorm, unfreeze_top_blocks)
from dogtl.core.precision import resolve
from dogtl.evaluation.inference import load_checked_model
from dogtl.finetuning.settings import ONE_CYCLE_WARMUP, FinetuneConfig

# local: keras, and the modules that define dogtl's Keras objects (finetuning/optimizer.py,
# core/schedules.py), are imported inside the functions that build: importing this module must
# not load TensorFlow (train.py starts a multi-worker run first).

# Images (or cut activations) whose BatchNorm statistics --batchnorm reestimate averages: plenty
# for per-channel means and variances, and one forward pass over them costs well under an epoch.
REESTIMATE_IMAGES = 4096


def build_model(config: FinetuneConfig, meta: dict, spec, image_size: int, weights: str, steps_per_epoch: int):
    """(compiled model, the head inside it, names of the trainable backbone layers, the BatchNorm
    layers --batchnorm reestimate re-estimates), built under the caller's distribution scope."""
    head = load_head(config, meta)
    backbone = build_backbone(spec, weights, image_size)
    trainable = unfreeze(backbone, head, spec, config.trainable_blocks)
    model = compose(backbone, head)
    compile_model(model, backbone, spec, config, steps_per_epoch)  # after every trainability change
    return model, head, trainable, unfrozen_batchnorm(backbone, head, spec, config.trainable_blocks)


def load_head(config: FinetuneConfig, meta: dict):
    """The trained head object fine-tuning starts from (`meta`: its metadata)."""
    return load_checked_model(config.head, meta)


def unfreeze(backbone, head, spec, blocks) -> list[str]:
    """The top `blocks` blocks of `backbone` and the head trainable, every BatchNorm frozen."""
    trainable = unfreeze_top_blocks(backbone, spec, blocks)
    freeze_batchnorm(head)
    return trainable


def compile_model(model, backbone, spec, config: FinetuneConfig, steps_per_epoch: int) -> None:
    import keras

    from dogtl.finetuning.optimizer import SmoothedCrossentropy, layer_rates, make_optimizer  # local: imports Keras

    names = [layer.name for layer in backbone.layers]
    depths = dict(zip(names, block_depths(names, spec, config.trainable_blocks)))
    rates = layer_rates(model, backbone, depths, block_lr_decay=config.block_lr_decay,
                        unfreeze_every=config.unfreeze_every, steps_per_epoch=steps_per_epoch,
                        weight_decay=config.resolved_weight_decay())
    optimizer = make_optimizer(config.optimizer, learning_rate(config, steps_per_epoch), rates,
                               config.ema_momentum(steps_per_epoch))
    if resolve(config.precision) == "float16":  # float16 gradients underflow without loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=SmoothedCrossentropy(config.label_smoothing), metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # so every checkpoint holds its state


def learning_rate(config: FinetuneConfig, steps_per_epoch: int):
    """The schedule of `--schedule` (see the setting's help), with `--warmup-epochs`."""
    import keras

    from dogtl.core.schedules import CyclicLR, OneCycleLR, Warmup  # local: imports Keras

    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    if config.schedule == "cosine":
        warmup = min(warmup, total - 1)
        return keras.optimizers.schedules.CosineDecay(
            config.base_lr if warmup else config.max_lr, total - warmup, alpha=config.base_lr / config.max_lr,
            warmup_target=config.max_lr if warmup else None, warmup_steps=warmup)
    if config.schedule == "one_cycle":
        return OneCycleLR(config.base_lr, config.max_lr, min(warmup or round(ONE_CYCLE_WARMUP * total), total - 1),
                          total)
    rate = config.base_lr if config.schedule == "constant" else CyclicLR(
        config.base_lr, config.max_lr, config.cycle_step_size(steps_per_epoch), mode=config.schedule,
        gamma=config.cycle_gamma())
    return Warmup(rate, warmup) if warmup else rate


def unfrozen_batchnorm(backbone, head, spec, blocks) -> list:
    """The BatchNorm layers --batchnorm reestimate re-estimates: those of the top `blocks`
    blocks of the backbone, and the head's."""
    depths = block_depths([layer.name for layer in backbone.layers], spec, blocks)
    return [layer for layer, d in zip(backbone.layers, depths) if d and is_batchnorm(layer)] + batchnorm_layers(head)
