"""Stage three: fine-tune the top backbone blocks together with the trained head, on images.

A run starts from the head on its backbone (model.py), scored on the clean validation
images as epoch 0, and trains on freshly augmented images (data.py). Each finished epoch is
checkpointed (checkpoints.py), so a killed run resumes from its last finished epoch. The
best model by validation log loss, starting with the untouched head itself, is the one
saved: never worse on validation than what the head already gave. With --calibrate (the
default) that log loss is each model's at its own best temperature, and the kept model is saved
with its temperature folded in (core/models.fold_temperature): so it scores what it was judged
by. Early stopping is the shared tracker (core/early_stopping.py), so `--patience` means what it
means in train-head.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dogtl.core.artifacts import save_model
from dogtl.core.determinism import make_deterministic
from dogtl.core.distribute import agree, make_strategy, prepare_fit, scope
from dogtl.core.early_stopping import EarlyStopping
from dogtl.core.epochs import EpochRecord, history_frame
from dogtl.core.errors import DataError
from dogtl.core.files import atomic_paths, write_csv_atomic
from dogtl.core.keras_private import swap_ema_weights
from dogtl.core.locks import writes
from dogtl.core.metadata import BackboneInput, ModelMetadata
from dogtl.core.metrics import fit_temperature, scores, tempered
from dogtl.core.modelinfo import weights_path_to_record
from dogtl.core.models import fold_temperature, reestimate_batchnorm
from dogtl.core.plots import plot_history
from dogtl.core.precision import computing_in, set_policy
from dogtl.core.progress import Progress, ProgressEvent
from dogtl.features.modelcache import split_paths
from dogtl.finetuning.checkpoints import RunState, random_state, restore_random_state
from dogtl.finetuning.data import reestimation_images, training_dataset, validate
from dogtl.finetuning.fromcache import prepare_from_cache
from dogtl.finetuning.frozenpart import frozen_part_source
from dogtl.finetuning.model import REESTIMATE_IMAGES, build_model
from dogtl.finetuning.settings import FinetuneConfig
from dogtl.finetuning.setup import Setup, prepare_common

# local: keras and tensorflow are imported inside the functions that train (here and in the
# finetuning modules imported above): make_strategy must start a multi-worker run before
# TensorFlow loads.

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    model_path: Path
    before: dict  # val_accuracy, val_log_loss of the head before fine-tuning
    after: dict  # the same for the saved (best) model
    best_epoch: int  # 0: no epoch beat the head, the saved model is the head on the backbone
    epochs_run: int
    resumed_from: int  # epochs already finished by a killed run (0 for a fresh run)
    trainable_layers: list[str]
    head_difference: float  # max |p(images) - p(cached features)| on clean validation images
    history: "object"  # pandas DataFrame, core.epochs.HISTORY_COLUMNS
    history_path: Path
    plot_path: Path | None
    seconds: float


@writes
def finetune(config: FinetuneConfig, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune, or resume a killed run of the same settings, and write the best model. `progress`
    gets ProgressEvents: images trained on (of all remaining epochs), each finished epoch, and the
    line of --batchnorm reestimate."""
    started = time.perf_counter()
    strategy = make_strategy(config.strategy)  # first: multi-worker must start before TensorFlow
    setup = prepare_from_cache(config, strategy) if config.from_cache else prepare(config, strategy)
    if config.deterministic:
        make_deterministic(setup.seed)
    state = setup.checkpoints.load(config.force)
    agree(strategy, [-1, 0] if state is None else [state.epoch, int(state.stopping.stopped)],
          "the epochs already run")
    if state is None:
        model, state = start(setup, progress)
        resumed_from = 0
    else:
        with scope(strategy):
            model = setup.checkpoints.load_model(state.last_file, state)
            restore_random_state(model, state.random_state)
        state.stopping.patience = config.patience  # may change between a kill and its resumption
        resumed_from = state.epoch
        log.info("resuming fine-tuning after epoch %d", resumed_from)
    if not state.stopping.stopped and state.epoch < config.epochs:
        with computing_in(model, setup.precision):
            train_epochs(setup, model, state, progress)
    return finish(setup, state, resumed_from, time.perf_counter() - started)


def prepare(config: FinetuneConfig, strategy) -> Setup:
    """The Setup of a run on images (the frozen part on a runtime where --runtime says so)."""
    return prepare_common(config, strategy, lambda cache: split_paths(cache, config.data),
                          source=lambda spec: frozen_part_source(config, strategy, spec))


def start(setup: Setup, progress: Progress | None = None) -> tuple[object, RunState]:
    """A fresh run: the head on its backbone, scored and checkpointed as epoch 0 (the model to
    beat); then, with --batchnorm reestimate, the model training starts from."""
    with scope(setup.strategy):  # variables mirrored on every replica
        model, head, trainable, batchnorm = (
            setup.source.build(setup) if setup.source else
            build_model(setup.config, setup.meta, setup.spec, setup.size, setup.weights, setup.steps))
    val = setup.split["val"]
    with computing_in(model, setup.precision):
        probs, before = validate_setup(setup, model)
    cached = head.predict(setup.cache.features("labelled", passes=[0])[0][val["rows"]], batch_size=1024, verbose=0)
    per_image = np.abs(probs - cached).max(axis=1)
    difference = float(per_image.max())
    # On average, not the worst image: in bfloat16 (or with the cache made on another runtime)
    # a peaked softmax may move by 0.2 on one image of many; changed weights or images move all.
    if per_image.mean() > 0.05:
        log.warning("the backbone does not reproduce the cached features (predictions differ by %.3f on "
                    "average, up to %.3f): were the weights or images changed since extraction?",
                    per_image.mean(), difference)
    first = setup.checkpoints.save_model(model, 0)
    state = RunState(epoch=0, before=before, best=before, best_file=first, last_file=first,
                     trainable_layers=trainable, head_difference=difference,
                     stopping=EarlyStopping(setup.config.patience, best_loss=before["val_log_loss"]),
                     random_state=random_state(model))
    if setup.config.batchnorm == "reestimate":
        reestimate(setup, model, batchnorm, progress)
        state.last_file = setup.checkpoints.save_model(model, 0, tag="batchnorm")
    setup.checkpoints.commit(state)
    return model, state


def reestimate(setup: Setup, model, layers: list, progress: Progress | None) -> None:
    """--batchnorm reestimate: `layers`' statistics from the clean training images (or their
    cached cut), before the first step."""
    train = setup.split["train"]
    batches = (setup.source.reestimation_batches(setup, REESTIMATE_IMAGES) if setup.source else
               reestimation_images(train["paths"], setup.spec, setup.size, seed=setup.seed, limit=REESTIMATE_IMAGES))
    reestimate_batchnorm(model, batches, layers)
    _, metrics = validate_setup(setup, model)
    line = (f"batchnorm statistics of {len(layers)} layers re-estimated: val log loss {metrics['val_log_loss']:.4f} "
            f"val acc {metrics['val_accuracy']:.3f}")
    log.info(line)
    if progress:
        progress(ProgressEvent("finetune", unit="", message=line))


def train_epochs(setup: Setup, model, state: RunState, progress: Progress | None) -> None:
    """`fit` from the state's epoch on; `end_epoch` after each epoch, which may stop it early."""
    import keras
    import tensorflow as tf

    c, train = setup.config, setup.split["train"]
    images, first = len(train["labels"]), state.epoch

    def on_batch(batch, logs=None):
        progress(ProgressEvent("finetune", (state.epoch - first) * images + min(images, (batch + 1) * c.batch_size),
                               images * (c.epochs - first)))

    def on_epoch(epoch, logs=None):
        if end_epoch(setup, model, state, epoch + 1, logs or {}, progress):
            model.stop_training = True

    dataset = (setup.source.dataset(setup, range(first, c.epochs)) if setup.source else
               training_dataset(train["paths"], train["indices"], train["labels"], setup.spec, setup.size,
                                seed=setup.seed, augmentation=setup.augmentation, batch_size=c.batch_size,
                                epochs=range(first, c.epochs), strategy=setup.strategy))
    callbacks = [keras.callbacks.LambdaCallback(on_train_batch_end=on_batch if progress else None,
                                                on_epoch_end=on_epoch)]
    if c.ema_epochs:  # first: each epoch ends with the moving average in the model, to validate and keep
        callbacks.insert(0, swap_ema_weights(resumed=first > 0))
    try:
        with prepare_fit(model, setup.strategy, dataset.element_spec):
            model.fit(dataset, epochs=c.epochs, initial_epoch=first, steps_per_epoch=setup.steps,
                      callbacks=callbacks, shuffle=False, verbose=0)
    except tf.errors.OpError as e:
        message = getattr(e, "message", str(e)).strip().splitlines()
        raise DataError(f"cannot read a training image while fine-tuning ({message[-1][:200] if message else e}); "
                        "fix or remove it and extract features again") from None


def end_epoch(setup: Setup, model, state: RunState, epoch: int, logs: dict, progress: Progress | None) -> bool:
    """Validate epoch `epoch` on clean images, checkpoint it, keep it if best; True to stop."""
    import keras

    _, metrics = validate_setup(setup, model)
    lr = float(np.asarray(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    row = EpochRecord(epoch, float(logs.get("loss", np.nan)), float(logs.get("accuracy", np.nan)),
                      metrics["val_log_loss"], metrics["val_accuracy"], lr)
    state.history.append(row.as_row())
    state.epoch = epoch
    state.last_file = setup.checkpoints.save_model(model, epoch)
    state.random_state = random_state(model)
    best = state.stopping.update(epoch, metrics["val_log_loss"])
    if best:
        state.best, state.best_file = metrics, state.last_file
    setup.checkpoints.commit(state)
    if progress:
        progress(ProgressEvent("finetune", epoch, setup.config.epochs, "epochs", row, best=best))
    return state.stopping.stopped


def validate_setup(setup: Setup, model) -> tuple[np.ndarray, dict]:
    """(probabilities, scores) on the clean validation split: its images, or its cached cut. With
    --calibrate, the scores are those at the temperature that fits them best (the one the model is
    saved with if it is kept), the raw log loss beside them."""
    probs, metrics = (setup.source.validate(setup, model) if setup.source else
                      validate(model, setup.split["val"], setup.spec, setup.size, 2 * setup.config.batch_size))
    if not setup.config.calibrate:
        return probs, metrics
    labels = setup.split["val"]["labels"]
    temperature = fit_temperature(labels, probs)
    return probs, {**scores(labels, tempered(probs, temperature), probs.shape[1]), "temperature": temperature,
                   "raw_val_log_loss": metrics["val_log_loss"]}


def finish(setup: Setup, state: RunState, resumed_from: int, seconds: float) -> FinetuneResult:
    """Write the best model with its metadata, history and plot; remove the checkpoints."""
    best = setup.checkpoints.load_model(state.best_file, state)
    if setup.source:  # the whole backbone + head, the frozen part as it came
        best = setup.source.export(setup, best)
    set_policy(best, "float32")  # saved models compute in float32, whatever they trained in
    if "temperature" in state.best:
        fold_temperature(best, state.best["temperature"])
    history = history_frame(state.history)
    best_epoch = state.stopping.best_epoch
    metrics = {**state.best, "before": state.before, "best_epoch": best_epoch, "epochs_run": state.epoch,
               "head_difference": state.head_difference}
    backbone = BackboneInput(
        backbone=setup.spec.name, weights=setup.meta.backbones[0].weights,
        weights_path=weights_path_to_record(setup.weights), image_size=setup.size,
        preprocessing=setup.spec.preprocessing, feature_dim=setup.spec.feature_dim, cache=str(setup.cache.path),
        cache_fingerprint=setup.cache.fingerprint)
    metadata = ModelMetadata(
        kind="finetuned", classes=list(setup.meta.classes), backbones=[backbone], head=str(setup.config.head),
        settings=asdict(setup.config), metrics=metrics, trainable_layers=state.trainable_layers,
        frozen_part_runtime=setup.source.runtime(setup) if hasattr(setup.source, "runtime") else None,
        augmentation=setup.augmentation.as_dict() if setup.augmentation else None)  # what --augment meant
    history_path = setup.out.with_suffix(".history.csv")
    plot_path = setup.out.with_suffix(".png") if len(history) else None
    # The files together (as train-head writes them), the checkpoints removed only after them.
    with atomic_paths(*[p for p in (history_path, plot_path) if p]) as tmps:
        write_csv_atomic(history, tmps[0])
        if plot_path:

            plot_history(history, tmps[1], title=f"finetune {setup.out.name} from {Path(setup.config.head).name}",
                         best_epoch=best_epoch, start=state.before)
        save_model(best, setup.out, metadata)
    setup.checkpoints.remove()
    return FinetuneResult(setup.out, state.before, state.best, best_epoch, state.epoch, resumed_from,
                          state.trainable_layers, state.head_difference, history, history_path, plot_path, seconds)
